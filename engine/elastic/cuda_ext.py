"""Loader for the optional CUDA C++ extension (`engine._C`, built from csrc/ by setup.py).

Importing this module never fails: a missing extension is reported by `availability()`.
"""
from __future__ import annotations

import importlib


def availability() -> tuple[bool, str]:
    """(available, why) for the compiled CUDA extension."""
    try:
        importlib.import_module("engine._C")
    except ImportError as err:
        return False, f"CUDA extension engine._C not importable ({err})"
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA extension built, but no CUDA device"
    return True, "engine._C"
