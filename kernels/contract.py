"""What the Triton kernels, the CUDA extension and the engine share, without importing Triton: the
activation codes, input checks, autocast of inputs and the wiring of the autograd formulas."""
from __future__ import annotations

import torch

ACT_CODE = {"none": 0, "relu": 1, "h_swish": 2}     # the activation argument of the fused BN ops


def act_code(act: str) -> int:
    """The fused BN ops' code for activation `act`; ValueError for an unknown one."""
    if act not in ACT_CODE:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACT_CODE)}")
    return ACT_CODE[act]


def check_depthwise_filter(x: torch.Tensor, filt: torch.Tensor) -> None:
    """Raise ValueError unless filt is (C, k, k) with odd k for x (N, C, H, W)."""
    if filt.dim() != 3 or filt.shape[0] != x.shape[1] or filt.shape[1] != filt.shape[2] or filt.shape[1] % 2 == 0:
        raise ValueError(f"filter shape {tuple(filt.shape)} does not fit input {tuple(x.shape)}")


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Cast to the autocast dtype when autocast is on for x's device (custom ops are not autocast-aware)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(dev))
    return x


def depthwise_autograd(backward_op):
    """(backward, setup_context) for a depthwise op (x, filt, stride, *tensors) -> y whose `backward_op`
    (grad_y, x, filt, stride, *tensors) returns (grad_x, grad_filt); the trailing tensors (a grouped
    op's limits) get no gradient. Shared by the Triton and C++ ops."""
    def setup(ctx, inputs, output):
        x, filt, stride, *extra = inputs
        ctx.save_for_backward(x, filt, *extra)
        ctx.stride = stride

    def backward(ctx, grad_y):
        x, filt, *extra = ctx.saved_tensors
        grad_x, grad_f = backward_op(grad_y, x, filt, ctx.stride, *extra)
        return (grad_x, grad_f, None) + (None,) * len(extra)

    return backward, setup


def batchnorm_autograd(backward_op):
    """(backward, setup_context) for a BN op (x, weight, bias, running_mean, running_var, training, eps,
    act) -> (y, stats (2, C): batch or running mean and biased variance) whose `backward_op` (grad_y, x,
    weight, bias, stats, training, eps, act) returns (grad_x, grad_weight, grad_bias); `stats` carries
    no gradient (its gradient is not even materialised). Shared by the Triton and C++ ops."""
    def setup(ctx, inputs, output):
        x, weight, bias, _, _, training, eps, act = inputs
        ctx.save_for_backward(x, weight, bias, output[1])
        ctx.training, ctx.eps, ctx.act = training, eps, act
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, grad_stats):
        x, weight, bias, stats = ctx.saved_tensors
        grads = backward_op(grad_y, x, weight, bias, stats, ctx.training, ctx.eps, ctx.act)
        return (*grads, None, None, None, None, None)

    return backward, setup
