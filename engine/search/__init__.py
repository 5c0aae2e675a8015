"""Specialise a trained supernet: search the best subnet under a FLOPs or latency budget, export it."""
from engine.search.export import export_subnet, load_subnet

__all__ = ["export_subnet", "load_subnet"]
