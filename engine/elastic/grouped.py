"""Grouped elastic ops for the batched sandwich: G subnets stacked on the channel axis, (N, G*C, H, W),
each group reading its own prefix slice (and kernel size) of one shared weight.

Per-group settings come as small int32 tensors on the activations' device (no host sync, the same
shapes every step): `widths` (G, 2) = [out width, in width] for a pointwise conv, `limits` (G, 2) =
[kernel size, channels] for a depthwise conv. Outputs beyond a group's width are zero, and inputs
beyond it are ignored, so a narrow subnet's values and gradients are exactly its own.
Each op has a PyTorch reference here and a Triton kernel (engine.kernels), chosen by backend.implementation_for.
The elastic layers run these ops when their forward is given a group table (see `GroupSelection`,
`KernelGroups`); the supernet's block and net forwards pass the tables through.
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from engine.elastic import backend
from engine.elastic.activations import apply_activation
from engine.elastic.fast_ops import batchnorm_op
from engine.kernels.contract import check_depthwise_filter



class GroupSelection(NamedTuple):
    """The live channels of a stacked BN input (N, G*C, H, W): `mask` (G*C,) 0/1 zeroes each group's
    channels beyond its width (None: all live); `select` (G, C) bool marks the live channels of the
    groups that run the layer (only their statistics are folded into the running ones)."""

    mask: torch.Tensor | None
    select: torch.Tensor


class KernelGroups(NamedTuple):
    """A grouped depthwise conv's settings: `limits` (G, 2) int32 [k_g, c_g] on the device, and the
    same kernel sizes on the host (which transformed filters to build)."""

    limits: torch.Tensor
    kernel_sizes: tuple[int, ...]


def group_selection(active: torch.Tensor, channels: int, widths: torch.Tensor | None = None) -> GroupSelection:
    """The channels of each group within its width `widths` (G,) (None: all `channels`), of the
    groups with active[g] != 0."""
    groups = active.shape[0]
    select = active.bool()[:, None].expand(groups, channels)
    if widths is None:
        return GroupSelection(None, select)
    mask = channel_mask(widths, channels, torch.float32)
    return GroupSelection(mask, select & (mask.view(groups, channels) > 0))


def _dispatched(op: str, signature: tuple, x: torch.Tensor, impls: dict[str, Callable], inputs: list,
                key: tuple) -> object:
    """Run `impls` (backend name -> zero-argument call, "torch" the reference) on the backend chosen
    for this call `signature`; every fast implementation covers every call."""
    fast = {name: (lambda: None) for name in impls if name != "torch"}
    choice = backend.implementation_for(op, x, fast, lambda: (impls, inputs), key=key)
    return impls[choice]()


def _triton(family: str, name: str, *args) -> Callable[[], object]:
    """A call of the Triton op engine.kernels.<family>.<name> (imported on first use) on `args`."""
    return lambda: getattr(importlib.import_module(f"engine.kernels.{family}"), name)(*args)


def channel_mask(widths: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(G,) widths -> (G * channels,) 0/1 mask selecting each group's first widths[g] channels."""
    arange = torch.arange(channels, device=widths.device)
    return (arange[None, :] < widths[:, None]).to(dtype).reshape(-1)


def _check(x: torch.Tensor, table: torch.Tensor, what: str) -> int:
    if table.dim() != 2 or table.shape[1] != 2 or table.dtype != torch.int32:
        raise ValueError(f"{what} must be an int32 (groups, 2) tensor, got {table.dtype} {tuple(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"{what} is on {table.device}, activations on {x.device}")
    if x.shape[1] % table.shape[0]:
        raise ValueError(f"{x.shape[1]} channels do not split into {table.shape[0]} groups")
    return x.shape[1] // table.shape[0]


def grouped_pointwise_reference(x: torch.Tensor, weight: torch.Tensor, widths: torch.Tensor,
                                out_per_group: int) -> torch.Tensor:
    """Reference: masked input, a groups=G conv with W[:O, :I] repeated, masked output."""
    groups = widths.shape[0]
    cin = x.shape[1] // groups
    x = x * channel_mask(widths[:, 1], cin, x.dtype)[None, :, None, None]
    y = F.conv2d(x, weight[:out_per_group, :cin].repeat(groups, 1, 1, 1).to(x.dtype), None, 1, 0, 1, groups)
    return y * channel_mask(widths[:, 0], out_per_group, y.dtype)[None, :, None, None]


def grouped_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, widths: torch.Tensor,
                           out_per_group: int) -> torch.Tensor:
    """G 1x1 convs sharing `weight` (max_o, max_i, 1, 1): x (N, G*I, H, W) -> (N, G*O, H, W),
    O = out_per_group; group g is x_g[:, :i_g] conv W[:o_g, :i_g] and zero beyond o_g, with
    widths[g] = [o_g, i_g] (o_g <= O, i_g <= I)."""
    cin = _check(x, widths, "widths")
    if weight.shape[-2:] != (1, 1) or out_per_group > weight.shape[0] or cin > weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} cannot serve {out_per_group} x {cin} pointwise groups")
    impls = {"torch": lambda: grouped_pointwise_reference(x, weight, widths, out_per_group),
             "triton": _triton("pointwise", "grouped_pointwise_conv", x, weight, widths, out_per_group)}
    return _dispatched("grouped_pointwise_conv", ("pw", x.shape, x.dtype, x.device, out_per_group), x, impls,
                       [x, weight], (out_per_group, widths.shape[0]))


def grouped_conv_reference(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """G full-width regular convs sharing `weight` (out, in, k, k): x (N, G*in, H, W) -> (N, G*out, H', W'),
    "same" padding k // 2 (the stem, whose widths are not elastic)."""
    k = weight.shape[-1]
    return F.conv2d(x, weight.repeat(groups, 1, 1, 1), None, stride, k // 2, 1, groups)


def grouped_depthwise_reference(x: torch.Tensor, filt: torch.Tensor, stride: int,
                                limits: torch.Tensor) -> torch.Tensor:
    """Reference: each group's filters masked to its centred k_g x k_g window and first c_g channels,
    then one depthwise conv over all G*C channels."""
    groups, kmax = limits.shape[0], filt.shape[-1]
    channels = x.shape[1] // groups
    offset = (torch.arange(kmax, device=x.device) - kmax // 2).abs()
    window = (offset[None, :] <= limits[:, :1] // 2).to(filt.dtype)                 # (G, K)
    taps = window[:, :, None] * window[:, None, :]                                   # (G, K, K)
    chans = channel_mask(limits[:, 1], channels, filt.dtype).view(groups, channels, 1, 1)
    f = (filt.view(groups, channels, kmax, kmax) * taps[:, None] * chans).view(-1, 1, kmax, kmax)
    return F.conv2d(x, f.to(x.dtype), None, stride, kmax // 2, 1, x.shape[1])


def grouped_depthwise_conv(x: torch.Tensor, filt: torch.Tensor, stride: int, limits: torch.Tensor) -> torch.Tensor:
    """G depthwise convs with per-group kernel size and width: x (N, G*C, H, W), filt (G*C, K, K)
    (K odd, the largest kernel), limits[g] = [k_g, c_g] -> (N, G*C, ceil(H/s), ceil(W/s)); group g
    uses the centred k_g x k_g taps of its filters on its first c_g channels, zero beyond c_g."""
    _check(x, limits, "limits")
    check_depthwise_filter(x, filt)
    if stride not in (1, 2):
        raise ValueError(f"stride={stride} is not 1 or 2")
    impls = {"torch": lambda: grouped_depthwise_reference(x, filt, stride, limits),
             "triton": _triton("depthwise", "grouped_depthwise_conv", x, filt, stride, limits)}
    return _dispatched("grouped_depthwise_conv", ("dw", x.shape, x.dtype, x.device, stride), x, impls, [x, filt],
                       (stride, limits.shape[0]))


def grouped_batchnorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                                act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: training-mode BN + activation with per-channel statistics of x (N, C, H, W) and
    per-channel affine weight/bias (C,) -> (y, batch mean (C,), biased batch var (C,)) in fp32."""
    stats_in = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var, mean = torch.var_mean(stats_in, dim=(0, 2, 3), unbiased=False)
    scale = weight * torch.rsqrt(var + eps)
    y = (x - mean[None, :, None, None]) * scale[None, :, None, None] + bias[None, :, None, None]
    return apply_activation(y.to(x.dtype), act), mean.detach(), var.detach()


def grouped_batchnorm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                          mask: torch.Tensor | None, eps: float,
                          act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BN + activation for G groups, x (N, G*C, H, W), sharing weight[:C], bias[:C]:
    statistics per (group, channel) over the group's own samples -> (y, mean (G, C), var (G, C)).
    `mask` (G*C,) 0/1 zeroes channels beyond a group's width; it is folded into the affine
    parameters (act(0 * z + 0) = 0 for relu, h_swish and none), so it costs nothing extra."""
    channels = x.shape[1] // groups
    if x.shape[1] % groups or channels > weight.shape[0]:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups of at most {weight.shape[0]}")
    gamma, beta = weight[:channels].repeat(groups), bias[:channels].repeat(groups)
    if mask is not None:
        gamma, beta = gamma * mask, beta * mask
    def fused(name: str):
        def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # training mode: the op ignores its running-statistics arguments, any (G*C,) tensors do
            y, stats = batchnorm_op(name)(x, gamma, beta, gamma.detach(), gamma.detach(), True, eps, act)
            return y, stats[0], stats[1]
        return run

    impls = {"torch": lambda: grouped_batchnorm_reference(x, gamma, beta, eps, act), "triton": fused("triton"),
             "cuda": fused("cuda")}
    y, mean, var = _dispatched("batchnorm_act", ("bn", x.shape, x.dtype, x.device, act), x, impls, [x, gamma, beta],
                               (act, True))
    return y, mean.view(groups, channels), var.view(groups, channels)
