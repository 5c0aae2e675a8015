"""Building blocks of the OFA-MobileNetV3 supernet: conv+BN+act and the elastic MBConv block,
each with `export()` to plain torch layers."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticSE
from engine.elastic.fused import conv_bn
from engine.elastic.grouped import GroupSelection
from engine.elastic.utils import check_choice, make_divisible
from engine.supernet.groups import UNGROUPED, BlockGroups


class ConvBNAct(nn.Module):
    """ElasticConv2d -> ElasticBatchNorm2d(+act): (N, in, H, W) -> (N, out, H/stride, W/stride)."""

    def __init__(self, max_in: int, max_out: int, kernel_size: int, stride: int, act: str,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = ElasticConv2d(max_in, max_out, kernel_size, stride)
        self.bn = ElasticBatchNorm2d(max_out, bn_momentum, bn_eps, act)

    def forward(self, x: torch.Tensor, widths: torch.Tensor | None = None,
                groups: GroupSelection | None = None) -> torch.Tensor:
        """With `widths` and `groups`: G stacked subnets (the layers' grouped forms)."""
        return self.bn(self.conv(x, widths), groups)

    def export(self, in_channels: int) -> nn.Sequential:
        return nn.Sequential(self.conv.export(in_channels), self.bn.export(self.conv.active_out_channels))


class StaticMBConv(nn.Module):
    """Exported MBConv: `layers` (plain torch) with an optional identity shortcut."""

    def __init__(self, layers: nn.Sequential, residual: bool) -> None:
        super().__init__()
        self.layers, self.residual = layers, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return y + x if self.residual else y


class MBConvBlock(nn.Module):
    """Elastic inverted-residual block: [1x1 expand -> BN+act] -> kxk depthwise -> BN+act -> [SE]
    -> 1x1 project -> BN, plus identity when stride 1 and in == out.

    (N, in, H, W) -> (N, out, H/stride, W/stride); mid = make_divisible(round(in * e), 8)
    (mid = in when the largest expand ratio is 1: no expansion layer, as OFA's first block).
    """

    def __init__(self, max_in: int, out: int, kernel_sizes: Sequence[int], expand_ratios: Sequence[int],
                 stride: int, act: str, use_se: bool, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.kernel_sizes, self.expand_ratios = tuple(sorted(kernel_sizes)), tuple(sorted(expand_ratios))
        self.max_in, self.out, self.stride = max_in, out, stride
        self.has_expand = self.expand_ratios[-1] != 1
        max_mid = self.mid_channels(max_in, self.expand_ratios[-1])
        bn = dict(momentum=bn_momentum, eps=bn_eps)
        if self.has_expand:
            self.ib_conv = ElasticConv2d(max_in, max_mid, 1)
            self.ib_bn = ElasticBatchNorm2d(max_mid, act=act, **bn)
        self.dw_conv = ElasticDepthwiseConv2d(max_mid, self.kernel_sizes, stride)
        self.dw_bn = ElasticBatchNorm2d(max_mid, act=act, **bn)
        self.se = ElasticSE(max_mid) if use_se else None
        self.pw_conv = ElasticConv2d(max_mid, out, 1)
        self.pw_bn = ElasticBatchNorm2d(out, **bn)
        self.residual = stride == 1 and max_in == out
        self.active_expand_ratio = self.expand_ratios[-1]

    def mid_channels(self, in_channels: int, expand_ratio: int | None = None) -> int:
        """Expanded width for `in_channels` inputs at `expand_ratio` (default: the active one)."""
        e = self.active_expand_ratio if expand_ratio is None else expand_ratio
        return make_divisible(round(in_channels * e), 8) if self.has_expand else in_channels

    def set_active(self, kernel_size: int, expand_ratio: int) -> None:
        """Select the depthwise kernel size and the expand ratio."""
        self.dw_conv.set_active(kernel_size)
        self.active_expand_ratio = check_choice("expand_ratio", expand_ratio, self.expand_ratios)

    def forward(self, x: torch.Tensor, groups: BlockGroups | None = None) -> torch.Tensor:
        """The active subnet's block on x (N, in, H, W) -> (N, out, H/s, W/s). With `groups`, G subnets
        stacked on the channel axis, (N, G*in, H, W) -> (N, G*out, H/s, W/s), each at its own settings
        (the batched sandwich); the same code runs, each layer in its grouped form."""
        g = groups if groups is not None else UNGROUPED
        h = x
        if self.has_expand:
            self.ib_conv.set_active(self.mid_channels(x.shape[1]) if groups is None else groups.mid_channels)
            h = conv_bn(self.ib_conv, self.ib_bn, h, None, g.expand, g.mid)            # (N, mid, H, W)
        h = self.dw_bn(self.dw_conv(h, g.depthwise), g.mid)                          # (N, mid, H/s, W/s)
        if self.se is not None:
            h = self.se(h, g.se)
        y = conv_bn(self.pw_conv, self.pw_bn, h, x if self.residual else None, g.project, g.out)
        if groups is not None and self.residual:          # only residual blocks can be skipped
            y = groups.pass_skipped(y, x)
        return y                                                                     # (N, out, H/s, W/s)

    def export(self, in_channels: int) -> StaticMBConv:
        mid = self.mid_channels(in_channels)
        layers: list[nn.Module] = []
        if self.has_expand:
            self.ib_conv.set_active(mid)
            layers += [self.ib_conv.export(in_channels), self.ib_bn.export(mid)]
        layers += [self.dw_conv.export(mid), self.dw_bn.export(mid)]
        if self.se is not None:
            layers.append(self.se.export(mid))
        layers += [self.pw_conv.export(mid), self.pw_bn.export(self.out)]
        return StaticMBConv(nn.Sequential(*layers), self.residual)

    @torch.no_grad()
    def reorganize_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Sort the expanded channels by importance (L1 norm of the projection weight per input
        channel), descending, so width prefixes keep the most important; SE hidden units are sorted
        likewise. The max net's function is unchanged. Optimizer state tensors shaped like a
        permuted parameter (e.g. SGD momentum) are permuted with it."""
        if not self.has_expand:
            return
        order = torch.argsort(self.pw_conv.weight.abs().sum((0, 2, 3)), descending=True)
        moves = [(self.pw_conv.weight, 1), (self.dw_conv.weight, 0), (self.ib_conv.weight, 0)]
        moves += [(t, 0) for t in (self.dw_bn.weight, self.dw_bn.bias, self.dw_bn.running_mean,
                                   self.dw_bn.running_var, self.ib_bn.weight, self.ib_bn.bias,
                                   self.ib_bn.running_mean, self.ib_bn.running_var)]
        if self.se is not None:
            moves += [(self.se.expand.weight, 0), (self.se.expand.bias, 0), (self.se.reduce.weight, 1)]
        for tensor, dim in moves:
            _permute(tensor, dim, order, optimizer)
        if self.se is not None:
            se_order = torch.argsort(self.se.expand.weight.abs().sum(0), descending=True)
            for tensor, dim in ((self.se.expand.weight, 1), (self.se.reduce.weight, 0), (self.se.reduce.bias, 0)):
                _permute(tensor, dim, se_order, optimizer)


def _permute(tensor: torch.Tensor, dim: int, order: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    tensor.copy_(tensor.index_select(dim, order))
    if optimizer is not None and isinstance(tensor, nn.Parameter):
        for value in optimizer.state.get(tensor, {}).values():
            if torch.is_tensor(value) and value.shape == tensor.shape:
                value.copy_(value.index_select(dim, order))
