"""ElasticConv2d: a regular (groups=1) convolution whose active weight is the prefix slice W[:out, :in]."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic import backend
from engine.elastic.grouped import grouped_conv_reference, grouped_pointwise_conv
from engine.elastic.utils import check_channels, prefix


def conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     out_channels: int, stride: int) -> torch.Tensor:
    """Reference: F.conv2d with W[:out, :in] (in = x.shape[1]), "same" padding k // 2.

    x: (N, in, H, W); weight: (max_out, max_in, k, k); returns (N, out, ceil(H/stride), ceil(W/stride)).
    """
    k = weight.shape[-1]
    b = None if bias is None else prefix(bias, out_channels)
    return F.conv2d(x, prefix(prefix(weight, out_channels), x.shape[1], 1), b, stride, k // 2)


class ElasticConv2d(nn.Module):
    """Conv2d over channel prefixes: input (N, in, H, W) with in <= max_in -> (N, out, H', W').

    `active_out_channels` (default max_out) selects out; `in` is read from the input. 1x1 stride-1
    convolutions run on the fused pointwise kernel when the backend allows; others use the reference.
    """

    def __init__(self, max_in: int, max_out: int, kernel_size: int = 1, stride: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.kernel_size, self.stride = kernel_size, stride
        self.weight = nn.Parameter(torch.empty(max_out, max_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.active_out_channels = max_out

    def set_active(self, out_channels: int) -> None:
        """Select the number of output channels (1..max_out)."""
        self.active_out_channels = check_channels("out_channels", out_channels, self.max_out)

    def forward(self, x: torch.Tensor, widths: torch.Tensor | None = None) -> torch.Tensor:
        """The conv of x (N, in, H, W); with `widths` (G, 2) int32 [out_g, in_g], of G subnets stacked on
        the channel axis, (N, G*in, H, W) -> (N, G*out, H', W'), out = active_out_channels."""
        if widths is not None:
            return self._grouped(x, widths)
        check_channels("in_channels", x.shape[1], self.max_in)
        out = self.active_out_channels
        impls = self._implementations(x, out)
        choice = backend.implementation_for(
            "pointwise_conv", x, {"triton": lambda: self._uncovered()},
            lambda: (impls, [x, self.weight] + ([self.bias] if self.bias is not None else [])),
            key=(out, self.kernel_size, self.stride))
        return impls[choice]()

    def _grouped(self, x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Group g reads its first in_g channels and writes its first out_g (zero beyond). A 1x1 conv
        only: a larger one (the stem, not elastic) runs every group at full width."""
        if self.bias is not None:
            raise ValueError("grouped convolutions take no bias")
        out = self.active_out_channels
        if self.kernel_size == 1 and self.stride == 1:
            return grouped_pointwise_conv(x, self.weight, widths, out)
        return grouped_conv_reference(x, prefix(self.weight, out), widths.shape[0], self.stride)

    def _uncovered(self) -> str | None:
        """Why the pointwise kernel does not cover this layer (None: it does)."""
        if self.kernel_size == 1 and self.stride == 1:
            return None
        return f"kernel {self.kernel_size}, stride {self.stride}"

    def _implementations(self, x: torch.Tensor, out: int) -> dict:
        def triton() -> torch.Tensor:
            from engine.kernels.pointwise import pointwise_conv

            return pointwise_conv(x, self.weight, self.bias, out)

        return {"torch": lambda: conv2d_reference(x, self.weight, self.bias, out, self.stride), "triton": triton}

    def export(self, in_channels: int) -> nn.Conv2d:
        """A plain nn.Conv2d holding a copy of the active slice."""
        out, k = self.active_out_channels, self.kernel_size
        conv = nn.Conv2d(in_channels, out, k, self.stride, k // 2, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight[:out, :in_channels])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out])
        return conv

    def extra_repr(self) -> str:
        return f"max_in={self.max_in}, max_out={self.max_out}, kernel_size={self.kernel_size}, stride={self.stride}"
