"""cmrcnet: spatial gene expression from H&E histology (CMRCNet, Medical Image Analysis 2025)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
