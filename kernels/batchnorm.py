"""Channel-sliced batch norm with a fused activation (none / relu / h_swish), channels-last.

x is (N, C, H, W) with C <= max_features, viewed as (M = N*H*W, C) rows; the affine parameters are
read as the prefix [:C] of the shared (max_features,) tensors in place.
Training forward: two reduction passes (mean, then centred sum of squares: no cancellation in
fp32), then y = act(x * scale + shift) with scale = gamma * rstd, shift = beta - mean * scale.
The op returns (y, batch mean, biased batch var); the layer updates its running-stat slice in
place from them (a C-length lerp). Eval: mean/var are the running statistics.
Backward recomputes the pre-activation z from x (x is saved, not z), g = dy * act'(z):
  training: dx = scale * (g - mean(g) - xhat * mean(g * xhat)),  eval: dx = scale * g,
  dgamma = sum(g * xhat), dbeta = sum(g)  (returned full-sized, zeros beyond C).
Reductions over M are split across programs into fp32 partials (deterministic).
Reference: engine.elastic.batchnorm.batchnorm_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autocast_input, batchnorm_autograd, empty_nchw_channels_last, rows, splits

BLOCK_M, BLOCK_C = 64, 32
ACT_CODE = {"none": 0, "relu": 1, "h_swish": 2}
SUM, CENTRED_SQUARES, GRAD_SUMS = 0, 1, 2


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    return z


@triton.jit
def _activate_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    else:
        d = tl.where(z < -3.0, 0.0, tl.where(z > 3.0, 1.0, (2.0 * z + 3.0) / 6.0))
    return d


@triton.jit
def _reduce_kernel(x_ptr, gy_ptr, mean_ptr, scale_ptr, shift_ptr, rstd_ptr, out_ptr, M, C, rows_per_split,
                   MODE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel partial sums over this split's rows; out: (2, splits, C).
    MODE 0: sum x | 1: sum (x - mean)^2 | 2: sum g and sum g * xhat (g = dy * act'(z))."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, n_splits = tl.program_id(1), tl.num_programs(1)
    cm = c < C
    if MODE != 0:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    if MODE == 2:
        scale = tl.load(scale_ptr + c, mask=cm, other=0.0)
        shift = tl.load(shift_ptr + c, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + c, mask=cm, other=0.0)
    acc1 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, M)
    for m0 in range(lo, hi, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mask = (m < hi)[:, None] & cm[None, :]
        x = tl.load(x_ptr + m[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            acc1 += x
        elif MODE == 1:
            d = tl.where(mask, x - mean[None, :], 0.0)
            acc1 += d * d
        else:
            gy = tl.load(gy_ptr + m[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = gy * _activate_grad(x * scale[None, :] + shift[None, :], ACT)
            acc1 += g
            acc2 += g * (x - mean[None, :]) * rstd[None, :]
    tl.store(out_ptr + split * C + c, tl.sum(acc1, axis=0), mask=cm)
    if MODE == 2:
        tl.store(out_ptr + (n_splits + split) * C + c, tl.sum(acc2, axis=0), mask=cm)


@triton.jit
def _apply_kernel(x_ptr, gy_ptr, out_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gx_ptr, M, C,
                  BACKWARD: tl.constexpr, TRAINING: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward: out = act(x * scale + shift). Backward: out = dx from the sums of the reduce pass."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mask = (m < M)[:, None] & cm[None, :]
    offs = m[:, None] * C + c[None, :]
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x * scale + shift
    if BACKWARD:
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * _activate_grad(z, ACT)
        if TRAINING:
            mean = tl.load(mean_ptr + c, mask=cm, other=0.0)[None, :]
            rstd = tl.load(rstd_ptr + c, mask=cm, other=0.0)[None, :]
            mean_g = tl.load(sum_g_ptr + c, mask=cm, other=0.0)[None, :] / M
            mean_gx = tl.load(sum_gx_ptr + c, mask=cm, other=0.0)[None, :] / M
            g = g - mean_g - (x - mean) * rstd * mean_gx
        out = g * scale
    else:
        out = _activate(z, ACT)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _reduce(mode: int, x2: torch.Tensor, gy2=None, mean=None, scale=None, shift=None, rstd=None, act: int = 0):
    m, c = x2.shape
    split = splits(m, 4 * BLOCK_M * 16)
    rows_per_split = triton.cdiv(triton.cdiv(m, split), BLOCK_M) * BLOCK_M
    out = torch.empty((2, split, c), dtype=torch.float32, device=x2.device)
    _reduce_kernel[(triton.cdiv(c, BLOCK_C), split)](
        x2, gy2 if gy2 is not None else x2, mean if mean is not None else out, scale if scale is not None else out,
        shift if shift is not None else out, rstd if rstd is not None else out, out, m, c, rows_per_split,
        MODE=mode, ACT=act, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return out.sum(1)                                                   # (2, C)


def _apply(x2, out2, scale, shift, act, gy2=None, mean=None, rstd=None, sums=None, training=False):
    m, c = x2.shape
    dummy = scale
    _apply_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(c, BLOCK_C))](
        x2, gy2 if gy2 is not None else x2, out2, scale, shift, mean if mean is not None else dummy,
        rstd if rstd is not None else dummy, sums[0] if sums is not None else dummy,
        sums[1] if sums is not None else dummy, m, c,
        BACKWARD=gy2 is not None, TRAINING=training, ACT=act, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)


def _affine(weight, bias, mean, var, eps, c):
    rstd = torch.rsqrt(var + eps)
    scale = weight[:c].float() * rstd
    return rstd, scale, bias[:c].float() - mean * scale


@torch.library.custom_op("engine::batchnorm_act", mutates_args=())
def _batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, training: bool, eps: float,
                   act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x2 = rows(x)
    if training:
        mean = _reduce(SUM, x2)[0] / x2.shape[0]
        var = _reduce(CENTRED_SQUARES, x2, mean=mean)[0] / x2.shape[0]
    else:
        mean, var = running_mean[:c].float().clone(), running_var[:c].float().clone()
    _, scale, shift = _affine(weight, bias, mean, var, eps, c)
    y = empty_nchw_channels_last(n, c, h, w, x)
    _apply(x2, rows(y), scale, shift, ACT_CODE[act])
    return y, mean, var


@_batchnorm_act.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, act):
    n, c, h, w = x.shape
    stat = torch.empty(c, dtype=torch.float32, device=x.device)
    return empty_nchw_channels_last(n, c, h, w, x), stat, stat.clone()


@torch.library.custom_op("engine::batchnorm_act_backward", mutates_args=())
def _batchnorm_act_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            mean: torch.Tensor, var: torch.Tensor, training: bool, eps: float,
                            act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x2, gy2 = rows(x), rows(grad_y.to(x.dtype))
    rstd, scale, shift = _affine(weight, bias, mean, var, eps, c)
    sums = _reduce(GRAD_SUMS, x2, gy2, mean, scale, shift, rstd, ACT_CODE[act])   # (sum g, sum g*xhat)
    grad_x = empty_nchw_channels_last(n, c, h, w, x)
    _apply(x2, rows(grad_x), scale, shift, ACT_CODE[act], gy2, mean, rstd, sums, training)
    grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
    grad_w[:c], grad_b[:c] = sums[1], sums[0]
    return grad_x, grad_w, grad_b


@_batchnorm_act_backward.register_fake
def _(grad_y, x, weight, bias, mean, var, training, eps, act):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


_backward, _setup = batchnorm_autograd(_batchnorm_act_backward)
_batchnorm_act.register_autograd(_backward, setup_context=_setup)


def batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, training: bool, eps: float,
                  act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sliced BN + activation on x (N, C, H, W) -> (y channels-last, batch mean (C,), biased var (C,)).

    The mean/var outputs carry no gradient (the statistics' gradient flows through y).
    Running statistics are not modified here.
    """
    if act not in ACT_CODE:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACT_CODE)}")
    return _batchnorm_act(autocast_input(x), weight, bias, running_mean, running_var, training, eps, act)
