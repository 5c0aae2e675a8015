"""Helpers shared by the test modules."""
import os

import pytest
import torch


def kernel_device() -> str:
    """Where the Triton kernel tests run: "cuda" with a GPU, "cpu" under the interpreter; a test that
    would otherwise silently run the reference is skipped instead."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                allow_module_level=True)
