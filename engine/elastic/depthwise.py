"""ElasticDepthwiseConv2d: depthwise conv with elastic kernel size (centre crop + kernel transforms)."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic import backend
from engine.elastic.fast_ops import depthwise_op
from engine.elastic.grouped import KernelGroups, grouped_depthwise_conv
from engine.elastic.utils import check_channels, check_choice


def transformed_filter(weight: torch.Tensor, transforms: Mapping[str, torch.Tensor],
                       kernel_sizes: Sequence[int], channels: int, kernel_size: int) -> torch.Tensor:
    """The active depthwise filter, (channels, k, k).

    Starts from W[:channels, 0] (the largest kernel, a view); for each step src -> dst of the sorted
    kernel sizes above k, takes the centre dst x dst crop and applies the learned (dst², dst²)
    matrix M as crop @ M^T (OFA's chained 7->5->3 transform). At k = max nothing is copied.
    """
    ks = sorted(kernel_sizes)
    filt = weight[:channels, 0]
    for i in range(len(ks) - 1, 0, -1):
        src, dst = ks[i], ks[i - 1]
        if src <= kernel_size:
            break
        s = (src - dst) // 2
        crop = filt[:, s:s + dst, s:s + dst].reshape(channels, dst * dst)
        filt = F.linear(crop, transforms[f"{src}to{dst}"]).view(channels, dst, dst)
    return filt


def depthwise_reference(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """Reference depthwise conv: x (N, C, H, W), filt (C, k, k) -> (N, C, ceil(H/s), ceil(W/s)), padding k//2."""
    c, k = filt.shape[0], filt.shape[-1]
    return F.conv2d(x, filt.unsqueeze(1), None, stride, k // 2, 1, c)


def _depthwise(choice: str, x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    """The depthwise conv on backend `choice`."""
    return (depthwise_reference if choice == "torch" else depthwise_op(choice))(x, filt, stride)


class ElasticDepthwiseConv2d(nn.Module):
    """Depthwise conv, (N, C, H, W) with C <= max_channels -> (N, C, H', W'), no bias.

    `active_kernel_size` is one of `kernel_sizes`; the filter is the transformed centre crop of the
    largest kernel (see `transformed_filter`). Transform matrices start as identity.
    """

    def __init__(self, max_channels: int, kernel_sizes: Sequence[int] = (3, 5, 7), stride: int = 1) -> None:
        super().__init__()
        ks = sorted(set(kernel_sizes))
        for k in ks:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel size {k} must be odd and positive")
        if stride not in (1, 2):
            raise ValueError(f"stride={stride} is not 1 or 2")
        self.max_channels, self.kernel_sizes, self.stride = max_channels, tuple(ks), stride
        kmax = ks[-1]
        self.weight = nn.Parameter(torch.empty(max_channels, 1, kmax, kmax))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.transforms = nn.ParameterDict({
            f"{src}to{dst}": nn.Parameter(torch.eye(dst * dst)) for src, dst in zip(ks[:0:-1], ks[-2::-1])
        })
        self.active_kernel_size = kmax

    def set_active(self, kernel_size: int) -> None:
        """Select the kernel size (one of `kernel_sizes`)."""
        self.active_kernel_size = check_choice("kernel_size", kernel_size, self.kernel_sizes)

    def active_filter(self, channels: int) -> torch.Tensor:
        """(channels, k, k) filter of the active kernel size."""
        return transformed_filter(self.weight, self.transforms, self.kernel_sizes, channels,
                                  self.active_kernel_size)

    def grouped_filter(self, channels: int, kernel_sizes: Sequence[int]) -> torch.Tensor:
        """(G*channels, kmax, kmax): group g's transformed k_g x k_g filter zero-embedded in the largest
        kernel (each distinct kernel size is transformed once)."""
        kmax = self.kernel_sizes[-1]
        padded = {}
        for k in sorted(set(kernel_sizes)):
            p = (kmax - k) // 2
            filt = transformed_filter(self.weight, self.transforms, self.kernel_sizes, channels, k)
            padded[k] = F.pad(filt, (p, p, p, p))
        return torch.cat([padded[k] for k in kernel_sizes])

    def forward(self, x: torch.Tensor, groups: KernelGroups | None = None) -> torch.Tensor:
        """Depthwise conv of x (N, C, H, W) at the active kernel size; with `groups`, of G subnets
        stacked on the channel axis, (N, G*C, H, W), each at its own kernel size and width."""
        if groups is not None:
            filt = self.grouped_filter(x.shape[1] // groups.limits.shape[0], groups.kernel_sizes)
            return grouped_depthwise_conv(x, filt, self.stride, groups.limits)
        c = check_channels("channels", x.shape[1], self.max_channels)
        filt = self.active_filter(c)
        k, stride = self.active_kernel_size, self.stride
        choice = backend.implementation_for(
            "depthwise_conv", x, {"triton": lambda: None, "cuda": lambda: None},
            lambda: ({name: (lambda name=name: _depthwise(name, x, filt, stride)) for name in backend.BACKENDS},
                     [x, filt]),
            key=(k, stride))
        return _depthwise(choice, x, filt, stride)

    def export(self, channels: int) -> nn.Conv2d:
        """A plain depthwise nn.Conv2d holding the active (transformed) filter."""
        k = self.active_kernel_size
        conv = nn.Conv2d(channels, channels, k, self.stride, k // 2, groups=channels, bias=False)
        with torch.no_grad():
            conv.weight.copy_(self.active_filter(channels).unsqueeze(1))
        return conv

    def extra_repr(self) -> str:
        return f"max_channels={self.max_channels}, kernel_sizes={self.kernel_sizes}, stride={self.stride}"
