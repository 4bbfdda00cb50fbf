"""zsctl: train LLM search agents with a simulated search engine (ZeroSearch, arXiv 2505.04588)."""

__version__ = "0.1.0"
