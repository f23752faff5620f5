"""Reading sources, fetching built-in assets, writing checkpoints."""
