"""scalelab: a hackable lab for how language models scale."""

__version__ = "0.1.0"
