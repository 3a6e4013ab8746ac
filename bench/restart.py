"""Scenario: restart (see bench/scale.py, which loads the server the same way for all three).

    python -m bench.restart [--quick] [--users 1000000] [--events 20000000]
"""

from bench.scale import main

if __name__ == "__main__":
    main(["restart"], "restart")
