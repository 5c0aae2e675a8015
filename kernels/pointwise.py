"""Elastic pointwise (1x1, stride 1) convolution as a GEMM on channels-last activations.

Computes   y[m, :o] = x[m, :i] @ W[:o, :i]^T (+ b[:o])   with m over N*H*W,
reading W[:o, :i] in place through its strides (no slice copy; a weight of another dtype, e.g.
fp32 master weights under bf16 autocast, is converted while loading).
Backward: dX = dY @ W[:o, :i] (same GEMM kernel, other strides) and dW[:o, :i] = dY^T @ X with
the long M reduction split over SPLIT programs (fp32 partials, summed once: deterministic).
The weight gradient is returned full-sized (zeros outside [:o, :i]) so autograd, DDP's reducer and
torch.compile see an ordinary gradient; writing into .grad behind autograd's back would break both.
Grouped form (the batched sandwich, engine.elastic.grouped): G subnets stacked on the channel axis,
group g computing y_g[:, :o_g] = x_g[:, :i_g] @ W[:o_g, :i_g]^T with its own widths read from a
(G, 2) int32 table on the device; tiles beyond a group's widths write zeros without a K loop. The
same kernel serves both forms (one group, full widths: the plain GEMM).
Limits: 1x1 kernels, stride 1, groups 1 (ElasticConv2d falls back to the reference otherwise).
Blocks: autotuned per shape class (kernels.common.autotune; default 64x64x32, the one config the
interpreter runs), pruned to tiles no larger than twice each dimension; the split-K chunk of the
weight gradient is derived in the kernel from BLOCK_K, so the host's split count is config-free.
Reference: engine.elastic.conv.conv2d_reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (autotune, dot_precision, empty_nchw_channels_last, program_id, prune_blocks, rows, size_class,
                     splits, wide_index)
from .contract import autocast_input

_SPACE = [({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, w, st) for m, n, k, w, st in (
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3), (32, 64, 32, 4, 4),
    (64, 32, 32, 4, 4), (128, 32, 64, 4, 3), (32, 32, 64, 4, 4))]
DEFAULT = ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 3)


@triton.jit
def _limit(lim_ptr, g, full, SRC: tl.constexpr):
    """Group g's extent of one GEMM dimension: `full`, or column SRC of the (groups, 2) table."""
    if SRC >= 0:
        full = tl.load(lim_ptr + g * 2 + SRC)
    return full


@autotune(_SPACE, DEFAULT, key=["M_CLASS", "N_CLASS", "K_CLASS"],
          prune=prune_blocks({"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"}))
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, lim_ptr, stats_ptr, M, N, K,
                   s_am, s_ak, s_bk, s_bn, s_cs, s_cm, s_cn, a_goff, b_goff, c_goff, n_splits, M_CLASS, N_CLASS, K_CLASS,
                   HAS_BIAS: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                   M_SRC: tl.constexpr, N_SRC: tl.constexpr, K_SRC: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[z, m, n] = sum over split s's k < k_g of a[m, k] * b[k, n] (+ bias[n]) for m < m_g, n < n_g,
    and 0 for the rest of the (M, N) block; z = g * n_splits + s; fp32 accumulate.
    Group g's operands start g * {a,b,c}_goff elements in; (m_g, n_g, k_g) come from the limits
    table (M_SRC/N_SRC/K_SRC name its column, -1 the full M/N/K). One group: an ordinary GEMM."""
    pid_m, pid_n, pid_z = program_id(0, WIDE), program_id(1, WIDE), program_id(2, WIDE)
    g, split = pid_z // n_splits, pid_z % n_splits
    m_lim = _limit(lim_ptr, g, M, M_SRC)
    n_lim = _limit(lim_ptr, g, N, N_SRC)
    k_lim = _limit(lim_ptr, g, K, K_SRC)
    a_ptr += g * a_goff
    b_ptr += g * b_goff
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, n_splits), BLOCK_K) * BLOCK_K
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_lim)
    k_hi = tl.where((pid_m * BLOCK_M < m_lim) & (pid_n * BLOCK_N < n_lim), k_hi, k_lo)   # tile beyond: zeros
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak,
                    mask=(rm[:, None] < m_lim) & (rk[None, :] < k_hi), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(rk[:, None] < k_hi) & (rn[None, :] < n_lim), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < n_lim, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + pid_z * s_cs + g * c_goff + rm[:, None] * s_cm + rn[None, :] * s_cn
    out = acc.to(c_ptr.dtype.element_ty)
    tl.store(c, out, mask=(rm[:, None] < M) & (rn[None, :] < N))
    if STATS:   # BN statistics epilogue: this tile's count, mean and squared deviations per column, of the
        #         values as stored (one group, no split); merged across tiles on the host (Chan et al.)
        valid = rm < M
        count = tl.sum(valid.to(tl.float32), axis=0)
        v = tl.where(valid[:, None], out.to(tl.float32), 0.0)
        mean = tl.sum(v, axis=0) / tl.maximum(count, 1.0)
        d = tl.where(valid[:, None], v - mean[None, :], 0.0)
        base = stats_ptr + pid_m * 3 * N + rn
        tl.store(base, tl.zeros_like(mean) + count, mask=rn < N)
        tl.store(base + N, mean, mask=rn < N)
        tl.store(base + 2 * N, tl.sum(d * d, axis=0), mask=rn < N)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor] = None,
            split: int = 1, limits: Optional[torch.Tensor] = None, sources: tuple[int, int, int] = (-1, -1, -1),
            group_offsets: tuple[int, int, int] = (0, 0, 0), stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[s] = a[:, k-chunk s] @ b[k-chunk s, :] for s < split (out: (split, M, N) or (M, N) if split 1).

    a: (M, K), b: (K, N), any strides; the dot runs in a's dtype.
    Grouped (limits (G, 2) int32): group g's a, b, out start group_offsets[...] * g elements further,
    `stats` (zeroed, (cdiv(M, 16), 3, N) fp32): the statistics epilogue writes each M tile's (count,
    mean, squared deviations) of the stored values into row pid_m (one group, no split only).
    its extents are (M, N, K) with columns `sources` of limits substituted, out is (G * split, M, N)
    (or (M, N) + the group's offset when split is 1) and is zero beyond the group's extents.
    """
    (m, k), n = a.shape, b.shape[1]
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    groups = 1 if limits is None else limits.shape[0]
    s_cs = out3.stride(0) if out.dim() == 3 else 0
    _matmul_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), groups * split)](
        a, b, out3, bias if bias is not None else a, limits if limits is not None else a,
        stats if stats is not None else a, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        s_cs, out3.stride(1), out3.stride(2), *group_offsets, split, size_class(m), size_class(n), size_class(k),
        HAS_BIAS=bias is not None, STATS=stats is not None, PRECISION=dot_precision(a.dtype),
        M_SRC=sources[0], N_SRC=sources[1], K_SRC=sources[2], WIDE=wide_index(a, b, out3))
    return out


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """(max_o, max_i, 1, 1) -> (max_o, max_i) view."""
    return weight.view(weight.shape[0], weight.shape[1])


@torch.library.custom_op("engine::pointwise_conv", mutates_args=())
def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    out_channels: int) -> torch.Tensor:
    n, cin, h, w = x.shape
    y = empty_nchw_channels_last(n, out_channels, h, w, x)
    b = None if bias is None else bias[:out_channels]
    w2 = _matrix(weight)[:out_channels, :cin]                                    # (o, i) view
    _matmul(rows(x), w2.t(), rows(y), b)                                        # (M, i) @ (i, o)
    return y


@_pointwise_conv.register_fake
def _(x, weight, bias, out_channels):
    n, _, h, w = x.shape
    return empty_nchw_channels_last(n, out_channels, h, w, x)


@torch.library.custom_op("engine::pointwise_conv_backward", mutates_args=())
def _pointwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             out_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, cin, h, w = x.shape
    gy, x2 = rows(grad_y.to(x.dtype)), rows(x)                                  # (M, o), (M, i)
    w2 = _matrix(weight)[:out_channels, :cin]
    grad_x = empty_nchw_channels_last(n, cin, h, w, x)
    _matmul(gy, w2, rows(grad_x))                                               # (M, o) @ (o, i)
    split = splits(gy.shape[0], 4096)
    partial = torch.empty((split, out_channels, cin), dtype=torch.float32, device=x.device)
    _matmul(gy.t(), x2, partial, split=split)                                   # (o, M) @ (M, i)
    grad_w = torch.zeros_like(weight)
    _matrix(grad_w)[:out_channels, :cin] = partial.sum(0)
    grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    grad_b[:out_channels] = gy.float().sum(0)
    return grad_x, grad_w, grad_b


@_pointwise_conv_backward.register_fake
def _(grad_y, x, weight, out_channels):
    n, cin, h, w = x.shape
    return (empty_nchw_channels_last(n, cin, h, w, x), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, out_channels = inputs
    ctx.save_for_backward(x, weight)
    ctx.out_channels, ctx.has_bias = out_channels, bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _pointwise_conv_backward(grad_y, x, weight, ctx.out_channels)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None


_pointwise_conv.register_autograd(_backward, setup_context=_setup)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   out_channels: int) -> torch.Tensor:
    """Elastic 1x1 conv: x (N, i, H, W), weight (max_o, max_i, 1, 1) -> (N, o, H, W) channels-last."""
    return _pointwise_conv(autocast_input(x), weight, bias, out_channels)


MIN_BLOCK_M = min(entry[0]["BLOCK_M"] for entry in _SPACE)   # the most M tiles any config writes


def merge_tile_stats(partial: torch.Tensor, m: int) -> torch.Tensor:
    """(tiles, 3, C) [count, mean, squared deviations] -> (2, C) [mean, biased variance] over m rows
    (Chan's parallel merge; unwritten tiles have count 0)."""
    count, mean_t, m2_t = partial.unbind(1)
    mean = (count * mean_t).sum(0) / m
    return torch.stack([mean, (m2_t.sum(0) + (count * (mean_t - mean) ** 2).sum(0)) / m])


@torch.library.custom_op("engine::pointwise_conv_stats", mutates_args=())
def _pointwise_conv_stats(x: torch.Tensor, weight: torch.Tensor,
                          out_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, cin, h, w = x.shape
    y = empty_nchw_channels_last(n, out_channels, h, w, x)
    m = n * h * w
    partial = torch.zeros((triton.cdiv(m, MIN_BLOCK_M), 3, out_channels), dtype=torch.float32, device=x.device)
    _matmul(rows(x), _matrix(weight)[:out_channels, :cin].t(), rows(y), stats=partial)
    return y, merge_tile_stats(partial, m)


@_pointwise_conv_stats.register_fake
def _(x, weight, out_channels):
    n, _, h, w = x.shape
    return (empty_nchw_channels_last(n, out_channels, h, w, x),
            torch.empty((2, out_channels), dtype=torch.float32, device=x.device))


def _stats_setup(ctx, inputs, output):
    x, weight, out_channels = inputs
    ctx.save_for_backward(x, weight)
    ctx.out_channels, ctx.has_bias = out_channels, False
    ctx.set_materialize_grads(False)


def _stats_backward(ctx, grad_y, grad_stats):
    grad_x, grad_w, _, _ = _backward(ctx, grad_y)
    return grad_x, grad_w, None


_pointwise_conv_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


def pointwise_conv_stats(x: torch.Tensor, weight: torch.Tensor, out_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elastic 1x1 conv (no bias) with its output's BN statistics from the GEMM epilogue: x (N, i, H, W)
    -> (y (N, o, H, W) channels-last, stats (2, o) fp32 [mean, biased variance] of y as stored). The
    statistics carry no gradient: the BN that consumes them differentiates through them itself."""
    return _pointwise_conv_stats(autocast_input(x), weight, out_channels)


@torch.library.custom_op("engine::grouped_pointwise_conv", mutates_args=())
def _grouped_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, widths: torch.Tensor,
                            out_per_group: int) -> torch.Tensor:
    n, gi, h, w = x.shape
    groups = widths.shape[0]
    cin, cout = gi // groups, out_per_group
    y = empty_nchw_channels_last(n, groups * cout, h, w, x)
    w2 = _matrix(weight)[:cout, :cin]
    _matmul(rows(x)[:, :cin], w2.t(), rows(y)[:, :cout], limits=widths, sources=(-1, 0, 1),
            group_offsets=(cin, 0, cout))
    return y


@_grouped_pointwise_conv.register_fake
def _(x, weight, widths, out_per_group):
    n, _, h, w = x.shape
    return empty_nchw_channels_last(n, widths.shape[0] * out_per_group, h, w, x)


@torch.library.custom_op("engine::grouped_pointwise_conv_backward", mutates_args=())
def _grouped_pointwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     widths: torch.Tensor, out_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, gi, h, w = x.shape
    groups = widths.shape[0]
    cin, cout = gi // groups, out_per_group
    gy, x2 = rows(grad_y.to(x.dtype))[:, :cout], rows(x)[:, :cin]             # group 0's (M, o), (M, i)
    w2 = _matrix(weight)[:cout, :cin]
    grad_x = empty_nchw_channels_last(n, gi, h, w, x)
    _matmul(gy, w2, rows(grad_x)[:, :cin], limits=widths, sources=(-1, 1, 0), group_offsets=(cout, 0, cin))
    split = splits(gy.shape[0], 4096)
    partial = torch.empty((groups * split, cout, cin), dtype=torch.float32, device=x.device)
    _matmul(gy.t(), x2, partial, split=split, limits=widths, sources=(0, 1, -1), group_offsets=(cout, cin, 0))
    grad_w = torch.zeros_like(weight)
    _matrix(grad_w)[:cout, :cin] = partial.sum(0)
    return grad_x, grad_w


@_grouped_pointwise_conv_backward.register_fake
def _(grad_y, x, weight, widths, out_per_group):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight)


def _grouped_setup(ctx, inputs, output):
    x, weight, widths, out_per_group = inputs
    ctx.save_for_backward(x, weight, widths)
    ctx.out_per_group = out_per_group


def _grouped_backward(ctx, grad_y):
    x, weight, widths = ctx.saved_tensors
    grad_x, grad_w = _grouped_pointwise_conv_backward(grad_y, x, weight, widths, ctx.out_per_group)
    return grad_x, grad_w, None, None


_grouped_pointwise_conv.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def grouped_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, widths: torch.Tensor,
                           out_per_group: int) -> torch.Tensor:
    """G groups of 1x1 convs sharing one weight: x (N, G*I, H, W), weight (max_o, max_i, 1, 1),
    widths (G, 2) int32 [o_g, i_g] -> (N, G*O, H, W) channels-last (O = out_per_group), where
    group g = x_g[:, :i_g] conv W[:o_g, :i_g], zero beyond o_g. Checked by engine.elastic.grouped."""
    return _grouped_pointwise_conv(autocast_input(x), weight, widths, out_per_group)
