"""The edgekd version (one place; `edgekd.__version__` re-exports it)."""

__version__ = "0.1.0"
