"""ipbench: measure what token reduction does to a Vision Transformer."""

__version__ = "0.1.0"
