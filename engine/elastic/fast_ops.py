"""The fast implementation of each op with more than one (Triton kernel or CUDA extension), by the
backend name the dispatcher chose. Imported on first use, so that the engine imports neither Triton
nor the extension before an op needs them."""
from __future__ import annotations

from typing import Callable

import torch


def depthwise_op(choice: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The depthwise conv (x, filt (C, k, k), stride) -> y of backend `choice` ("triton" or "cuda")."""
    if choice == "triton":
        from engine.kernels.depthwise import depthwise_conv
    else:
        from engine.elastic.cuda_ext import depthwise_conv
    return depthwise_conv


def batchnorm_op(choice: str) -> Callable:
    """The fused `batchnorm_act` op of backend `choice` ("triton" or "cuda"); same signature for both:
    (x, weight, bias, running_mean, running_var, training, eps, act) -> (y, stats (2, C) [mean, biased var])."""
    if choice == "triton":
        from engine.kernels.batchnorm import batchnorm_act
    else:
        from engine.elastic.cuda_ext import batchnorm_act
    return batchnorm_act


def running_update(running_mean: torch.Tensor, running_var: torch.Tensor, stats: torch.Tensor, count: int,
                   momentum: float) -> None:
    """Fold a fused op's batch statistics `stats` (2, C) into the running slices (kernels/batchnorm.py)."""
    from engine.kernels.batchnorm import running_update as update

    update(running_mean, running_var, stats, count, momentum)
