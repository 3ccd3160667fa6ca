"""``python -m wrenn_engine.bench``: see ``wrenn_engine.bench.runner``."""

from wrenn_engine.bench.runner import main

if __name__ == "__main__":
    main()
