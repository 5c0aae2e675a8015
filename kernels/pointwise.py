"""Elastic pointwise (1x1, stride 1) convolution as a GEMM on channels-last activations.

Computes   y[m, :o] = x[m, :i] @ W[:o, :i]^T (+ b[:o])   with m over N*H*W,
reading W[:o, :i] in place through its strides (no slice copy; a weight of another dtype, e.g.
fp32 master weights under bf16 autocast, is converted while loading).
Backward: dX = dY @ W[:o, :i] (same GEMM kernel, other strides) and dW[:o, :i] = dY^T @ X with
the long M reduction split over SPLIT programs (fp32 partials, summed once: deterministic).
The weight gradient is returned full-sized (zeros outside [:o, :i]) so autograd, DDP's reducer and
torch.compile see an ordinary gradient; writing into .grad behind autograd's back would break both.
Limits: 1x1 kernels, stride 1, groups 1 (ElasticConv2d falls back to the reference otherwise).
Blocks 64x64x32: a safe default for every shape; GPU tuning is pending a GPU measurement.
Reference: engine.elastic.conv.conv2d_reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import autocast_input, dot_precision, empty_nchw_channels_last, rows, splits

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                   s_am, s_ak, s_bk, s_bn, s_cs, s_cm, s_cn, k_per_split,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[split, m, n] = sum over this split's k of a[m, k] * b[k, n] (+ bias[n]); fp32 accumulate."""
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(rk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + split * s_cs + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor] = None,
            split: int = 1) -> torch.Tensor:
    """out[s] = a[:, k-chunk s] @ b[k-chunk s, :] for s < split (out: (split, M, N) or (M, N) if split 1).

    a: (M, K), b: (K, N), any strides; the dot runs in a's dtype.
    """
    (m, k), n = a.shape, b.shape[1]
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    k_per_split = triton.cdiv(triton.cdiv(k, split), BLOCK_K) * BLOCK_K
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N), split)
    _matmul_kernel[grid](a, b, out3, bias if bias is not None else a, m, n, k,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out3.stride(0), out3.stride(1), out3.stride(2), k_per_split,
                         HAS_BIAS=bias is not None, PRECISION=dot_precision(a.dtype),
                         BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


@torch.library.custom_op("engine::pointwise_conv", mutates_args=())
def _pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    out_channels: int) -> torch.Tensor:
    n, cin, h, w = x.shape
    y = empty_nchw_channels_last(n, out_channels, h, w, x)
    b = None if bias is None else bias[:out_channels]
    w2 = weight.view(weight.shape[0], weight.shape[1])[:out_channels, :cin]     # (o, i) view
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
    w2 = weight.view(weight.shape[0], weight.shape[1])[:out_channels, :cin]
    grad_x = empty_nchw_channels_last(n, cin, h, w, x)
    _matmul(gy, w2, rows(grad_x))                                               # (M, o) @ (o, i)
    split = splits(gy.shape[0], 4096)
    partial = torch.empty((split, out_channels, cin), dtype=torch.float32, device=x.device)
    _matmul(gy.t(), x2, partial, split=split)                                   # (o, M) @ (M, i)
    grad_w = torch.zeros_like(weight)
    grad_w.view(weight.shape[0], weight.shape[1])[:out_channels, :cin] = partial.sum(0)
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
