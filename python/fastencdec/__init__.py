"""fastencdec: kernels and a thin PyTorch layer for small encoder-decoder LMs."""

from . import ops, reference

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__"]
