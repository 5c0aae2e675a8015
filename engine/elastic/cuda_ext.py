"""The optional CUDA C++ extension `engine._C` (csrc/): torch.ops.engine_cuda.* with fake kernels
(torch.compile) and autograd formulas registered here on first use.

Built by `python setup.py build_ext --inplace`; for development, ENGINE_JIT_BUILD=1 compiles csrc/
on first use with torch.utils.cpp_extension.load instead (cached under ~/.cache/torch_extensions).
Importing this module never fails: a missing extension is reported by `availability()`.
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

from engine.kernels.contract import act_code, autocast_input, batchnorm_autograd, depthwise_autograd

@functools.cache
def load() -> object:
    """Import engine._C (or JIT-build it with ENGINE_JIT_BUILD=1), which registers the ops, then the
    Python-side registrations; ImportError if neither is possible."""
    try:
        ext = importlib.import_module("engine._C")
    except ImportError:
        if os.environ.get("ENGINE_JIT_BUILD") != "1":
            raise
        ext = jit_build()
    _register()
    return ext


def jit_build(verbose: bool = False) -> object:
    """Compile csrc/ now with torch.utils.cpp_extension.load (development; needs nvcc and CUDA_HOME)."""
    from torch.utils.cpp_extension import load as load_extension

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    return load_extension("engine_C", [str(csrc / "ops.cpp"), str(csrc / "kernels.cu")], verbose=verbose,
                          extra_cflags=["-O3", "-DWITH_CUDA"], extra_cuda_cflags=["-O3"])


def availability() -> tuple[bool, str]:
    """(available, why) for the compiled CUDA extension."""
    try:
        ext = load()
    except ImportError as err:
        return False, f"CUDA extension engine._C not importable ({err})"
    if not ext.with_cuda:
        return False, "engine._C was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "CUDA extension built, but no CUDA device"
    return True, "engine._C"


def _nhwc_like(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((x.shape[0], h, w, c), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)


@functools.cache
def _register() -> None:
    lib = "engine_cuda::"

    @torch.library.register_fake(lib + "depthwise_conv")
    def _(x, filt, stride):
        return _nhwc_like(x, x.shape[1], (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1)

    @torch.library.register_fake(lib + "depthwise_conv_backward")
    def _(grad_y, x, filt, stride):
        return _nhwc_like(x, *x.shape[1:]), torch.empty_like(filt)

    @torch.library.register_fake(lib + "batchnorm_act")
    def _(x, weight, bias, running_mean, running_var, training, eps, act):
        return _nhwc_like(x, *x.shape[1:]), torch.empty((2, x.shape[1]), dtype=torch.float32, device=x.device)

    @torch.library.register_fake(lib + "batchnorm_act_backward")
    def _(grad_y, x, weight, bias, stats, training, eps, act):
        return _nhwc_like(x, *x.shape[1:]), torch.empty_like(weight), torch.empty_like(bias)

    ops = torch.ops.engine_cuda
    backward, setup = depthwise_autograd(ops.depthwise_conv_backward)
    torch.library.register_autograd(lib + "depthwise_conv", backward, setup_context=setup)
    backward, setup = batchnorm_autograd(ops.batchnorm_act_backward)
    torch.library.register_autograd(lib + "batchnorm_act", backward, setup_context=setup)


def depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """Depthwise conv: x (N, C, H, W), filt (C, k, k) -> (N, C, ceil(H/s), ceil(W/s)) channels-last."""
    load()
    return torch.ops.engine_cuda.depthwise_conv(autocast_input(x), filt, stride)


def batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, training: bool, eps: float,
                  act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliced BN + activation: (y channels-last, stats (2, C): mean and biased var); see kernels/batchnorm.py."""
    code = act_code(act)
    load()
    return torch.ops.engine_cuda.batchnorm_act(autocast_input(x), weight, bias, running_mean, running_var,
                                               training, eps, code)
