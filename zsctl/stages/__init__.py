"""One module per pipeline stage, each with a config dataclass and `run(cfg)`."""
