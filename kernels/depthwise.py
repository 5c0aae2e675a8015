"""Elastic depthwise convolution, k in {3, 5, 7} (any odd k), stride 1 or 2, "same" padding k//2,
on channels-last activations.

Computes  y[n, oh, ow, c] = sum_{kh, kw} x[n, oh*s - p + kh, ow*s - p + kw, c] * f[c, kh, kw].
The filter f (C, k, k) is read through its strides: at the largest kernel size it is the view
W[:C, 0] of the supernet weight (no copy). For smaller k the kernel-transform matrices are applied
as one tiny pre-step in PyTorch on the C x k² crop (engine.elastic.depthwise.transformed_filter):
it touches C*k² numbers against N*H*W*C activations, and keeping it outside lets autograd give the
gradients of the 7x7 weight and of the transform matrices for free.
Backward: dX (gather form, handles stride 2) and dF with the N*OH*OW reduction split over
programs (fp32 partials summed once: deterministic); dF rows for all k² taps are accumulated in a
(next_pow2(k²), BLOCK_C) tile so dY is read once.
Reference: engine.elastic.depthwise.depthwise_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autocast_input, depthwise_autograd, empty_nchw_channels_last, rows, splits

BLOCK_P, BLOCK_C = 32, 32


@triton.jit
def _pixels(p, H, W):
    """Split a flat NHW pixel index into (n, h, w)."""
    return p // (W * H), (p // W) % H, p % W


@triton.jit
def _dw_forward_kernel(x_ptr, f_ptr, y_ptr, N, H, W, C, OH, OW, s_fc, s_fh, s_fw,
                       K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)        # output pixel index in N*OH*OW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < N * OH * OW, c < C
    n, oh, ow = _pixels(p, OH, OW)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(K):
        ih = oh * STRIDE - K // 2 + kh
        for kw in tl.static_range(K):
            iw = ow * STRIDE - K // 2 + kw
            ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + ((n * H + ih) * W + iw)[:, None] * C + c[None, :],
                         mask=ok[:, None] & cm[None, :], other=0.0)
            fv = tl.load(f_ptr + c * s_fc + kh * s_fh + kw * s_fw, mask=cm, other=0.0)
            acc += xv.to(tl.float32) * fv.to(tl.float32)[None, :]
    tl.store(y_ptr + p[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _dw_grad_input_kernel(gy_ptr, f_ptr, gx_ptr, N, H, W, C, OH, OW, s_fc, s_fh, s_fw,
                          K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)        # input pixel index in N*H*W
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm, cm = p < N * H * W, c < C
    n, ih, iw = _pixels(p, H, W)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(K):
        th = ih + K // 2 - kh                                     # = oh * STRIDE when a tap hits
        thc = tl.maximum(th, 0)
        oh = thc // STRIDE
        okh = (th >= 0) & (thc % STRIDE == 0) & (oh < OH)
        for kw in tl.static_range(K):
            tw = iw + K // 2 - kw
            twc = tl.maximum(tw, 0)
            ow = twc // STRIDE
            ok = pm & okh & (tw >= 0) & (twc % STRIDE == 0) & (ow < OW)
            g = tl.load(gy_ptr + ((n * OH + oh) * OW + ow)[:, None] * C + c[None, :],
                        mask=ok[:, None] & cm[None, :], other=0.0)
            fv = tl.load(f_ptr + c * s_fc + kh * s_fh + kw * s_fw, mask=cm, other=0.0)
            acc += g.to(tl.float32) * fv.to(tl.float32)[None, :]
    tl.store(gx_ptr + p[:, None] * C + c[None, :], acc.to(gx_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


@triton.jit
def _dw_grad_filter_kernel(x_ptr, gy_ptr, part_ptr, N, H, W, C, OH, OW, p_per_split,
                           K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    cm = c < C
    taps = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    p_lo = split * p_per_split
    p_hi = tl.minimum(p_lo + p_per_split, N * OH * OW)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < p_hi
        n, oh, ow = _pixels(p, OH, OW)
        g = tl.load(gy_ptr + p[:, None] * C + c[None, :], mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        for kh in tl.static_range(K):
            ih = oh * STRIDE - K // 2 + kh
            for kw in tl.static_range(K):
                iw = ow * STRIDE - K // 2 + kw
                ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + ((n * H + ih) * W + iw)[:, None] * C + c[None, :],
                             mask=ok[:, None] & cm[None, :], other=0.0)
                contrib = tl.sum(xv.to(tl.float32) * g, axis=0)                     # (BLOCK_C,)
                acc += tl.where(taps[:, None] == kh * K + kw, contrib[None, :], 0.0)
    out = part_ptr + split * (K * K * C) + taps[:, None] * C + c[None, :]
    tl.store(out, acc, mask=(taps[:, None] < K * K) & cm[None, :])


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _grid(pixels: int, channels: int) -> tuple[int, int]:
    return triton.cdiv(pixels, BLOCK_P), triton.cdiv(channels, BLOCK_C)


@torch.library.custom_op("engine::depthwise_conv", mutates_args=())
def _depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    n, c, h, w = x.shape
    k = filt.shape[-1]
    oh, ow = _out_size(h, stride), _out_size(w, stride)
    y = empty_nchw_channels_last(n, c, oh, ow, x)
    _dw_forward_kernel[_grid(n * oh * ow, c)](rows(x), filt, rows(y), n, h, w, c, oh, ow, *filt.stride(),
                                              K=k, STRIDE=stride, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


@_depthwise_conv.register_fake
def _(x, filt, stride):
    n, c, h, w = x.shape
    return empty_nchw_channels_last(n, c, _out_size(h, stride), _out_size(w, stride), x)


@torch.library.custom_op("engine::depthwise_conv_backward", mutates_args=())
def _depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, filt: torch.Tensor,
                             stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    k = filt.shape[-1]
    oh, ow = grad_y.shape[-2:]
    gy, x2 = rows(grad_y.to(x.dtype)), rows(x)
    grad_x = empty_nchw_channels_last(n, c, h, w, x)
    _dw_grad_input_kernel[_grid(n * h * w, c)](gy, filt, rows(grad_x), n, h, w, c, oh, ow, *filt.stride(),
                                                K=k, STRIDE=stride, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    split = splits(n * oh * ow, 2048)
    p_per_split = triton.cdiv(triton.cdiv(n * oh * ow, split), BLOCK_P) * BLOCK_P
    partial = torch.empty((split, k * k, c), dtype=torch.float32, device=x.device)
    _dw_grad_filter_kernel[(triton.cdiv(c, BLOCK_C), split)](
        x2, gy, partial, n, h, w, c, oh, ow, p_per_split, K=k, STRIDE=stride,
        BLOCK_T=triton.next_power_of_2(k * k), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    grad_f = partial.sum(0).t().reshape(c, k, k).to(filt.dtype)
    return grad_x, grad_f


@_depthwise_conv_backward.register_fake
def _(grad_y, x, filt, stride):
    n, c, h, w = x.shape
    return empty_nchw_channels_last(n, c, h, w, x), torch.empty(filt.shape, dtype=filt.dtype, device=filt.device)


_backward, _setup = depthwise_autograd(_depthwise_conv_backward)
_depthwise_conv.register_autograd(_backward, setup_context=_setup)


def depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """Depthwise conv: x (N, C, H, W), filt (C, k, k) any strides -> (N, C, ceil(H/s), ceil(W/s)) channels-last."""
    if filt.dim() != 3 or filt.shape[0] != x.shape[1] or filt.shape[1] != filt.shape[2] or filt.shape[1] % 2 == 0:
        raise ValueError(f"filter shape {tuple(filt.shape)} does not fit input {tuple(x.shape)}")
    return _depthwise_conv(autocast_input(x), filt, stride)
