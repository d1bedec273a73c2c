"""clipsvd: few-shot adaptation of CLIP-style models to medical images by training singular values."""

__version__ = "0.1.0"
