"""The pure evaluation core: compiled filters and rule kinds. No I/O, no asyncio."""
