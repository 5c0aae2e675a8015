"""Elastic depthwise convolution, k in {3, 5, 7} (any odd k), stride 1 or 2, "same" padding k//2,
on channels-last activations.

Computes  y[n, oh, ow, c] = sum_{kh, kw} x[n, oh*s - p + kh, ow*s - p + kw, c] * f[c, kh, kw].
The filter f (C, k, k) is read through its strides: at the largest kernel size it is the view
W[:C, 0] of the supernet weight (no copy). For smaller k the kernel-transform matrices are applied
as one tiny pre-step in PyTorch on the C x k² crop (engine.elastic.depthwise.transformed_filter):
it touches C*k² numbers against N*H*W*C activations, and keeping it outside lets autograd give the
gradients of the 7x7 weight and of the transform matrices for free.
Backward: dX (gather form, handles stride 2) and dF as a two-level reduction: one program per (tap,
split of the N*OH*OW pixels, channel block) accumulates x * dy products in registers and reduces
them once; the fp32 partials of the splits are summed once (deterministic). One program per tap,
rather than all k² taps in one tile, avoids a masked select per tap and pixel.
Forward and dX read the k² taps of a tile with one load each, which the L1 cache serves from the
tile's footprint (Triton has no shared-memory sliding window to load it once explicitly).
Grouped form (the batched sandwich): G channel groups, each with its own kernel size k_g <= K and
width c_g from a (G, 2) int32 table; the filter is (G*C, K, K) and group g reads only its centred
k_g x k_g window (a uniform branch per tap skips the others) and only its first c_g channels.
Reference: engine.elastic.depthwise.depthwise_reference (grouped: engine.elastic.grouped).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune, empty_nchw_channels_last, program_id, prune_blocks, rows, size_class, splits, wide_index
from .contract import autocast_input, check_depthwise_filter, depthwise_autograd

DEFAULT = ({"BLOCK_P": 32, "BLOCK_C": 32}, 4)
_SPACE = [({"BLOCK_P": p, "BLOCK_C": c}, w) for p, c, w in
          ((32, 32, 4), (64, 32, 4), (16, 64, 4), (32, 64, 4), (64, 64, 8), (128, 32, 8), (16, 128, 4))]
_TUNE = dict(key=["P_CLASS", "CG", "K"], prune=prune_blocks({"BLOCK_C": "CG"}))


@triton.jit
def _pixels(p, H, W):
    """Split a flat NHW pixel index into (n, h, w)."""
    return p // (W * H), (p // W) % H, p % W


@triton.jit
def _group(lim_ptr, CG, K: tl.constexpr, BLOCK_C: tl.constexpr, GROUPED: tl.constexpr):
    """This program's group g (grid axis 2): its kernel size k, the first tap of its centred window in
    the K x K filter, whether any of its channels is within the group's width, its channel indices
    (global) and masks (within the width; within the group). One group: all compile-time constants."""
    g = tl.program_id(2)
    k, width, live = K, CG, True
    if GROUPED:
        k = tl.load(lim_ptr + g * 2)
        width = tl.load(lim_ptr + g * 2 + 1)
        live = tl.program_id(1) * BLOCK_C < width
    cl = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return k, (K - k) // 2, live, g * CG + cl, cl < width, cl < CG


@autotune(_SPACE, DEFAULT, **_TUNE)
@triton.jit
def _dw_forward_kernel(x_ptr, f_ptr, y_ptr, lim_ptr, N, H, W, CG, CT, OH, OW, s_fc, s_fh, s_fw, P_CLASS,
                       K: tl.constexpr, STRIDE: tl.constexpr, GROUPED: tl.constexpr, WIDE: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = program_id(0, WIDE) * BLOCK_P + tl.arange(0, BLOCK_P)        # output pixel index in N*OH*OW
    k, lo, live, c, cm, cs = _group(lim_ptr, CG, K, BLOCK_C, GROUPED)
    pm = p < N * OH * OW
    n, oh, ow = _pixels(p, OH, OW)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(K):      # a rolled loop: 7x7 unrolled taps spilled registers (sm_90, 255 regs)
        ih = oh * STRIDE - K // 2 + kh
        for kw in tl.static_range(K):
            if live & (kh >= lo) & (kh < lo + k) & (kw >= lo) & (kw < lo + k):     # group's window only
                iw = ow * STRIDE - K // 2 + kw
                ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + ((n * H + ih) * W + iw)[:, None] * CT + c[None, :],
                             mask=ok[:, None] & cm[None, :], other=0.0)
                fv = tl.load(f_ptr + c * s_fc + kh * s_fh + kw * s_fw, mask=cm, other=0.0)
                acc += xv.to(tl.float32) * fv.to(tl.float32)[None, :]
    tl.store(y_ptr + p[:, None] * CT + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & cs[None, :])


@autotune(_SPACE, DEFAULT, **_TUNE)
@triton.jit
def _dw_grad_input_kernel(gy_ptr, f_ptr, gx_ptr, lim_ptr, N, H, W, CG, CT, OH, OW, s_fc, s_fh, s_fw, P_CLASS,
                          K: tl.constexpr, STRIDE: tl.constexpr, GROUPED: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = program_id(0, WIDE) * BLOCK_P + tl.arange(0, BLOCK_P)        # input pixel index in N*H*W
    k, lo, live, c, cm, cs = _group(lim_ptr, CG, K, BLOCK_C, GROUPED)
    pm = p < N * H * W
    n, ih, iw = _pixels(p, H, W)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(K):      # a rolled loop: 7x7 unrolled taps spilled registers (sm_90, 255 regs)
        th = ih + K // 2 - kh                                     # = oh * STRIDE when a tap hits
        thc = tl.maximum(th, 0)
        oh = thc // STRIDE
        okh = (th >= 0) & (thc % STRIDE == 0) & (oh < OH)
        for kw in tl.static_range(K):
            if live & (kh >= lo) & (kh < lo + k) & (kw >= lo) & (kw < lo + k):
                tw = iw + K // 2 - kw
                twc = tl.maximum(tw, 0)
                ow = twc // STRIDE
                ok = pm & okh & (tw >= 0) & (twc % STRIDE == 0) & (ow < OW)
                g = tl.load(gy_ptr + ((n * OH + oh) * OW + ow)[:, None] * CT + c[None, :],
                            mask=ok[:, None] & cm[None, :], other=0.0)
                fv = tl.load(f_ptr + c * s_fc + kh * s_fh + kw * s_fw, mask=cm, other=0.0)
                acc += g.to(tl.float32) * fv.to(tl.float32)[None, :]
    tl.store(gx_ptr + p[:, None] * CT + c[None, :], acc.to(gx_ptr.dtype.element_ty), mask=pm[:, None] & cs[None, :])


@autotune(_SPACE, DEFAULT, **_TUNE)
@triton.jit
def _dw_grad_filter_kernel(x_ptr, gy_ptr, part_ptr, lim_ptr, N, H, W, CG, CT, OH, OW, p_per_split, P_CLASS,
                           K: tl.constexpr, STRIDE: tl.constexpr, GROUPED: tl.constexpr, WIDE: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """partial[split, tap, c] = sum over this split's output pixels of x(tap-shifted) * dy: ONE tap per
    program, its products accumulated in a (BLOCK_P, BLOCK_C) register tile and reduced once at the
    end (no per-tap masked accumulation); the splits are summed once on the host. Taps outside a
    group's window and channels beyond its width get 0. Grid: (taps x splits, tap fastest, so the
    programs reading one split's dy tile run side by side and share it in L2; channel blocks; groups)."""
    pid = program_id(0, WIDE)
    tap, split = pid % (K * K), pid // (K * K)
    kh, kw = tap // K, tap % K
    k, lo, live, c, cm, cs = _group(lim_ptr, CG, K, BLOCK_C, GROUPED)
    in_window = live & (kh >= lo) & (kh < lo + k) & (kw >= lo) & (kw < lo + k)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    p_lo = split * p_per_split
    p_hi = tl.minimum(p_lo + p_per_split, N * OH * OW)
    p_hi = tl.where(in_window, p_hi, p_lo)                          # a tap outside the window: zeros
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < p_hi
        n, oh, ow = _pixels(p, OH, OW)
        g = tl.load(gy_ptr + p[:, None] * CT + c[None, :], mask=pm[:, None] & cm[None, :], other=0.0)
        ih = oh * STRIDE - K // 2 + kh
        iw = ow * STRIDE - K // 2 + kw
        ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + ((n * H + ih) * W + iw)[:, None] * CT + c[None, :],
                     mask=ok[:, None] & cm[None, :], other=0.0)
        acc += xv.to(tl.float32) * g.to(tl.float32)
    tl.store(part_ptr + (split * K * K + tap) * CT + c, tl.sum(acc, axis=0), mask=cs)


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _launch(x, filt, stride, out, grad_y=None, limits=None):
    """Run the forward (grad_y None: out = y) or both backward kernels (out = grad_x; returns the
    (k*k, CT) fp32 filter gradient) over the G = len(limits) channel groups (1 without limits)."""
    n, ct, h, w = x.shape
    k = filt.shape[-1]
    groups = 1 if limits is None else limits.shape[0]
    cg = ct // groups
    lim = limits if limits is not None else filt
    common = dict(K=k, STRIDE=stride, GROUPED=limits is not None, WIDE=wide_index(x, out, grad_y))

    def grid(pixels):
        return lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(cg, meta["BLOCK_C"]), groups)

    if grad_y is None:
        oh, ow = out.shape[-2:]
        _dw_forward_kernel[grid(n * oh * ow)](rows(x), filt, rows(out), lim, n, h, w, cg, ct, oh, ow, *filt.stride(),
                                              size_class(n * oh * ow), **common)
        return None
    oh, ow = grad_y.shape[-2:]
    gy, x2 = rows(grad_y.to(x.dtype)), rows(x)
    _dw_grad_input_kernel[grid(n * h * w)](gy, filt, rows(out), lim, n, h, w, cg, ct, oh, ow, *filt.stride(),
                                           size_class(n * h * w), **common)
    split = splits(n * oh * ow, 2048)
    p_per_split = triton.cdiv(n * oh * ow, split)
    partial = torch.empty((split, k * k, ct), dtype=torch.float32, device=x.device)
    _dw_grad_filter_kernel[lambda meta: (k * k * split, triton.cdiv(cg, meta["BLOCK_C"]), groups)](
        x2, gy, partial, lim, n, h, w, cg, ct, oh, ow, p_per_split, size_class(n * oh * ow), **common)
    return partial.sum(0)


def _output(x: torch.Tensor, stride: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return empty_nchw_channels_last(n, c, _out_size(h, stride), _out_size(w, stride), x)


@torch.library.custom_op("engine::depthwise_conv", mutates_args=())
def _depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    y = _output(x, stride)
    _launch(x, filt, stride, y)
    return y


@_depthwise_conv.register_fake
def _(x, filt, stride):
    return _output(x, stride)


@torch.library.custom_op("engine::depthwise_conv_backward", mutates_args=())
def _depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, filt: torch.Tensor,
                             stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = empty_nchw_channels_last(*x.shape, x)
    grad_f = _launch(x, filt, stride, grad_x, grad_y)
    return grad_x, grad_f.t().reshape(filt.shape).to(filt.dtype)


@_depthwise_conv_backward.register_fake
def _(grad_y, x, filt, stride):
    return empty_nchw_channels_last(*x.shape, x), torch.empty(filt.shape, dtype=filt.dtype, device=filt.device)


_backward, _setup = depthwise_autograd(_depthwise_conv_backward)
_depthwise_conv.register_autograd(_backward, setup_context=_setup)


def depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """Depthwise conv: x (N, C, H, W), filt (C, k, k) any strides -> (N, C, ceil(H/s), ceil(W/s)) channels-last."""
    check_depthwise_filter(x, filt)
    return _depthwise_conv(autocast_input(x), filt, stride)


@torch.library.custom_op("engine::grouped_depthwise_conv", mutates_args=())
def _grouped_depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int, limits: torch.Tensor) -> torch.Tensor:
    y = _output(x, stride)
    _launch(x, filt, stride, y, limits=limits)
    return y


@_grouped_depthwise_conv.register_fake
def _(x, filt, stride, limits):
    return _output(x, stride)


@torch.library.custom_op("engine::grouped_depthwise_conv_backward", mutates_args=())
def _grouped_depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, filt: torch.Tensor, stride: int,
                                     limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x = empty_nchw_channels_last(*x.shape, x)
    grad_f = _launch(x, filt, stride, grad_x, grad_y, limits)
    return grad_x, grad_f.t().reshape(filt.shape).to(filt.dtype)


@_grouped_depthwise_conv_backward.register_fake
def _(grad_y, x, filt, stride, limits):
    return empty_nchw_channels_last(*x.shape, x), torch.empty(filt.shape, dtype=filt.dtype, device=filt.device)


_grouped_backward, _grouped_setup = depthwise_autograd(_grouped_depthwise_conv_backward)
_grouped_depthwise_conv.register_autograd(_grouped_backward, setup_context=_grouped_setup)


def grouped_depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int, limits: torch.Tensor) -> torch.Tensor:
    """G depthwise convs of per-group kernel size: x (N, G*C, H, W), filt (G*C, K, K), limits (G, 2)
    int32 [k_g, c_g] -> (N, G*C, H', W') channels-last; group g convolves its first c_g channels with
    the centred k_g x k_g taps of its filters (other taps ignored, zero beyond c_g).
    Checked by engine.elastic.grouped."""
    return _grouped_depthwise_conv(autocast_input(x), filt, stride, limits)
