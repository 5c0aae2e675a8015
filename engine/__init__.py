"""elastic: a fused-kernel once-for-all training engine.

Importing `engine` never initialises CUDA and never imports Triton; both happen on first use.
"""
from engine.elastic.backend import get_backend, set_backend

__all__ = ["get_backend", "set_backend"]
__version__ = "0.1.0"
