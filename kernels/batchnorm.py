"""Channel-sliced batch norm with a fused activation (none / relu / h_swish), channels-last.

x is (N, C, H, W) with C <= max_features, viewed as (M = N*H*W, C) rows; the affine parameters are
read as the prefix [:C] of the shared (max_features,) tensors in place.
Training forward: ONE reduction pass reads x for both statistics: each program keeps its rows' mean
and sum of squared deviations, merging tile after tile with Chan's parallel formula (as accurate as two
passes: no E[x²] - E[x]² cancellation), and the splits are merged the same way in fp32; then ONE pass
writes y = act(x * scale + shift), scale = gamma * rstd, shift = beta - mean * scale: x is read twice
in all (a separate pass for the variance would make it three).
The op returns (y, stats): stats (2, C) fp32 = [mean, biased var] (batch statistics in training, the
running ones in eval). `running_update` folds them into the running-statistic slices in place (one
tiny kernel: r <- r + momentum * (stat - r), the variance made unbiased, fp32 math whatever the
buffers' dtype).
Backward recomputes the pre-activation z from x (x is saved, not z), g = dy * act'(z):
  training: dx = scale * (g - mean(g) - xhat * mean(g * xhat)),  eval: dx = scale * g,
  dgamma = sum(g * xhat), dbeta = sum(g)  (returned full-sized, zeros beyond C):
one pass for both reductions, one pass for dx.
Reductions over M are split across programs into fp32 partials (deterministic), the split count fixed
by M (not by the block sizes, which are autotuned: kernels.common.autotune).
`bn_apply`: the same BN from statistics computed elsewhere (the producing GEMM's epilogue,
kernels/pointwise.py), with the block's residual added in the same pass: one read of x (and the
residual), one write; its backward is the training backward above (through the statistics).
Reference: engine.elastic.batchnorm.batchnorm_reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (autotune, empty_nchw_channels_last, program_id, prune_blocks, rows, size_class, splits,
                     wide_index)
from .contract import ACT_CODE, act_code, autocast_input, batchnorm_autograd

SPLIT_MOMENTS, GRAD_SUMS = 0, 2
ROWS_PER_SPLIT = 4096
DEFAULT = ({"BLOCK_M": 64, "BLOCK_C": 32}, 4)


_REDUCE_SPACE = [({"BLOCK_M": m, "BLOCK_C": c}, w) for m, c, w in
                 ((32, 32, 4), (64, 32, 4), (128, 32, 8), (32, 64, 4), (64, 64, 8), (32, 128, 8))]
_APPLY_SPACE = [({"BLOCK_M": m, "BLOCK_C": c}, w) for m, c, w in
                ((64, 32, 4), (128, 32, 4), (32, 64, 4), (64, 64, 4), (128, 64, 8), (32, 128, 4), (64, 128, 8))]


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


@autotune(_REDUCE_SPACE, DEFAULT, key=["M_CLASS", "C"], prune=prune_blocks({"BLOCK_C": "C"}))
@triton.jit
def _reduce_kernel(x_ptr, gy_ptr, mean_ptr, scale_ptr, shift_ptr, rstd_ptr, out_ptr, M, C, rows_per_split, M_CLASS,
                   MODE: tl.constexpr, ACT: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel partials over this split's rows into out (2, splits, C).
    MODE 0: the split's mean and sum of squared deviations from it, tile by tile with Chan's merge
    (one read, as accurate as two passes) | 2: sum g and sum g * xhat (g = dy * act'(z))."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split, n_splits = program_id(1, WIDE), tl.num_programs(1)
    cm = c < C
    if MODE == 0:
        mean_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        m2_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
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
        if MODE == 0:   # this tile's mean and squared deviations, merged into the split's (Chan et al.)
            n_t = tl.minimum(BLOCK_M, hi - m0).to(tl.float32)
            n_before = (m0 - lo).to(tl.float32)
            mean_t = tl.sum(x, axis=0) / n_t
            d = tl.where(mask, x - mean_t[None, :], 0.0)
            delta = mean_t - mean_acc
            mean_acc += delta * (n_t / (n_before + n_t))
            m2_acc += tl.sum(d * d, axis=0) + delta * delta * (n_before * n_t / (n_before + n_t))
        else:
            gy = tl.load(gy_ptr + m[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = gy * _activate_grad(x * scale[None, :] + shift[None, :], ACT)
            acc1 += g
            acc2 += g * (x - mean[None, :]) * rstd[None, :]
    if MODE == 0:
        tl.store(out_ptr + split * C + c, mean_acc, mask=cm)
        tl.store(out_ptr + (n_splits + split) * C + c, m2_acc, mask=cm)
    else:
        tl.store(out_ptr + split * C + c, tl.sum(acc1, axis=0), mask=cm)
        tl.store(out_ptr + (n_splits + split) * C + c, tl.sum(acc2, axis=0), mask=cm)


@autotune(_APPLY_SPACE, DEFAULT, key=["M_CLASS", "C"], prune=prune_blocks({"BLOCK_C": "C"}))
@triton.jit
def _apply_kernel(x_ptr, gy_ptr, out_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sum_g_ptr, sum_gx_ptr, res_ptr,
                  M, C, M_CLASS, BACKWARD: tl.constexpr, TRAINING: tl.constexpr, ACT: tl.constexpr,
                  HAS_RES: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward: out = act(x * scale + shift) [+ residual]. Backward: out = dx from the reduce pass's sums."""
    m = program_id(0, WIDE) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        if HAS_RES:
            out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _running_update_kernel(rm_ptr, rv_ptr, stats_ptr, C, momentum, unbias, BLOCK: tl.constexpr):
    """r[:C] <- r + momentum * (stat - r) for the mean and the (unbiased) variance; fp32 math.
    Not autotuned: benchmarking would apply the update more than once."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = c < C
    mean = tl.load(stats_ptr + c, mask=cm, other=0.0)
    var = tl.load(stats_ptr + C + c, mask=cm, other=0.0) * unbias
    rm = tl.load(rm_ptr + c, mask=cm, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(rm_ptr + c, (rm + momentum * (mean - rm)).to(rm_ptr.dtype.element_ty), mask=cm)
    tl.store(rv_ptr + c, (rv + momentum * (var - rv)).to(rv_ptr.dtype.element_ty), mask=cm)


def _reduce(mode: int, x2: torch.Tensor, gy2=None, mean=None, scale=None, shift=None, rstd=None,
            act: int = 0) -> torch.Tensor:
    """MODE 0: (2, C) [mean, biased variance] of x2's columns; MODE 2: (2, C) [sum g, sum g * xhat]."""
    m, c = x2.shape
    split = splits(m, ROWS_PER_SPLIT)
    per_split = triton.cdiv(m, split)
    split = triton.cdiv(m, per_split)                                   # no empty split
    out = torch.empty((2, split, c), dtype=torch.float32, device=x2.device)
    _reduce_kernel[lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), split)](
        x2, gy2 if gy2 is not None else x2, mean if mean is not None else out, scale if scale is not None else out,
        shift if shift is not None else out, rstd if rstd is not None else out, out, m, c, per_split,
        size_class(m), MODE=mode, ACT=act, WIDE=wide_index(x2, gy2))
    if mode != SPLIT_MOMENTS:
        return out.sum(1)
    counts = torch.full((split, 1), float(per_split), device=x2.device)
    counts[-1] = m - per_split * (split - 1)
    means, m2 = out[0], out[1]                                           # (splits, C) each
    mean = (counts * means).sum(0) / m
    return torch.stack([mean, (m2.sum(0) + (counts * (means - mean) ** 2).sum(0)) / m])


def _apply(x2, out2, scale, shift, act, gy2=None, mean=None, rstd=None, sums=None, training=False, res2=None):
    m, c = x2.shape
    dummy = scale
    _apply_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))](
        x2, gy2 if gy2 is not None else x2, out2, scale, shift, mean if mean is not None else dummy,
        rstd if rstd is not None else dummy, sums[0] if sums is not None else dummy,
        sums[1] if sums is not None else dummy, res2 if res2 is not None else x2, m, c, size_class(m),
        BACKWARD=gy2 is not None, TRAINING=training, ACT=act, HAS_RES=res2 is not None,
        WIDE=wide_index(x2, gy2, out2, res2))


def _affine(weight, bias, mean, var, eps, c):
    rstd = torch.rsqrt(var + eps)
    scale = weight[:c].float() * rstd
    return rstd, scale, bias[:c].float() - mean * scale


@torch.library.custom_op("engine::batchnorm_act", mutates_args=())
def _batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, training: bool, eps: float,
                   act: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x2 = rows(x)
    if training:
        stats = _reduce(SPLIT_MOMENTS, x2)                               # one read of x
    else:
        stats = torch.stack([running_mean[:c], running_var[:c]]).float()
    _, scale, shift = _affine(weight, bias, stats[0], stats[1], eps, c)
    y = empty_nchw_channels_last(n, c, h, w, x)
    _apply(x2, rows(y), scale, shift, ACT_CODE[act])
    return y, stats


@_batchnorm_act.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, act):
    n, c, h, w = x.shape
    return empty_nchw_channels_last(n, c, h, w, x), torch.empty((2, c), dtype=torch.float32, device=x.device)


@torch.library.custom_op("engine::batchnorm_act_backward", mutates_args=())
def _batchnorm_act_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            stats: torch.Tensor, training: bool, eps: float,
                            act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    x2, gy2 = rows(x), rows(grad_y.to(x.dtype))
    mean = stats[0].contiguous()
    rstd, scale, shift = _affine(weight, bias, mean, stats[1], eps, c)
    sums = _reduce(GRAD_SUMS, x2, gy2, mean, scale, shift, rstd, ACT_CODE[act])   # (sum g, sum g*xhat)
    grad_x = empty_nchw_channels_last(n, c, h, w, x)
    _apply(x2, rows(grad_x), scale, shift, ACT_CODE[act], gy2, mean, rstd, sums, training)
    grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
    grad_w[:c], grad_b[:c] = sums[1], sums[0]
    return grad_x, grad_w, grad_b


@_batchnorm_act_backward.register_fake
def _(grad_y, x, weight, bias, stats, training, eps, act):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


_backward, _setup = batchnorm_autograd(_batchnorm_act_backward)
_batchnorm_act.register_autograd(_backward, setup_context=_setup)


def batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                  running_var: torch.Tensor, training: bool, eps: float,
                  act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliced BN + activation on x (N, C, H, W) -> (y channels-last, stats (2, C) fp32: mean and biased
    variance). stats carries no gradient (the statistics' gradient flows through y); running statistics
    are read in eval and not modified (see `running_update`)."""
    act_code(act)
    return _batchnorm_act(autocast_input(x), weight, bias, running_mean, running_var, training, eps, act)


@torch.library.custom_op("engine::bn_apply", mutates_args=())
def _bn_apply(x: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              residual: Optional[torch.Tensor], eps: float, act: str) -> torch.Tensor:
    n, c, h, w = x.shape
    _, scale, shift = _affine(weight, bias, stats[0], stats[1], eps, c)
    y = empty_nchw_channels_last(n, c, h, w, x)
    _apply(rows(x), rows(y), scale, shift, ACT_CODE[act], res2=None if residual is None else rows(residual.to(x.dtype)))
    return y


@_bn_apply.register_fake
def _(x, stats, weight, bias, residual, eps, act):
    n, c, h, w = x.shape
    return empty_nchw_channels_last(n, c, h, w, x)


def _bn_apply_setup(ctx, inputs, output):
    x, stats, weight, bias, residual, eps, act = inputs
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.eps, ctx.act, ctx.has_res = eps, act, residual is not None


def _bn_apply_backward(ctx, grad_y):
    x, weight, bias, stats = ctx.saved_tensors
    grad_x, grad_w, grad_b = _batchnorm_act_backward(grad_y, x, weight, bias, stats, True, ctx.eps, ctx.act)
    return grad_x, None, grad_w, grad_b, (grad_y if ctx.has_res else None), None, None


_bn_apply.register_autograd(_bn_apply_backward, setup_context=_bn_apply_setup)


def bn_apply(x: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             residual: Optional[torch.Tensor], eps: float, act: str) -> torch.Tensor:
    """Training-mode BN + activation [+ residual] of x (N, C, H, W) with its batch statistics `stats`
    (2, C) already computed (by the producing GEMM's epilogue: x is not read for them): one read of x
    (and the residual), one write. The backward differentiates through the statistics, as a BN over x
    does; `stats` gets no gradient."""
    act_code(act)
    return _bn_apply(autocast_input(x), stats, weight, bias, residual, eps, act)


@torch.library.custom_op("engine::running_update", mutates_args=("running_mean", "running_var"))
def _running_update(running_mean: torch.Tensor, running_var: torch.Tensor, stats: torch.Tensor, count: int,
                    momentum: float) -> None:
    c = stats.shape[1]
    block = min(1024, triton.next_power_of_2(c))
    _running_update_kernel[(triton.cdiv(c, block),)](running_mean, running_var, stats.contiguous(), c, momentum,
                                                     count / max(count - 1, 1), BLOCK=block)


@_running_update.register_fake
def _(running_mean, running_var, stats, count, momentum):
    return None


def running_update(running_mean: torch.Tensor, running_var: torch.Tensor, stats: torch.Tensor, count: int,
                   momentum: float) -> None:
    """Fold batch stats (2, C) (mean, biased var over `count` values) into running_mean[:C] and
    running_var[:C] in place, as ElasticBatchNorm2d.update_running_stats does, in one kernel."""
    _running_update(running_mean, running_var, stats, count, momentum)
