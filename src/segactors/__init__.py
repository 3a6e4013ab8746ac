"""segactors: real-time behavioral segments, exact at every instant."""

__version__ = "0.1.0"
