"""autopar: automatic parallelism compiler for PyTorch."""
__version__ = "0.1.0"
