"""The `wrenn-engine` command line: ``main.main`` is the entry point."""
