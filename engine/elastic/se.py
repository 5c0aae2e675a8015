"""ElasticSE: squeeze-and-excite over a channel prefix (reduction 4, mid channels divisible by 8,
ReLU inside, hard-sigmoid gate), and its plain export `SqueezeExcite`."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic.activations import hard_sigmoid
from engine.elastic.linear import ElasticLinear
from engine.elastic.utils import check_channels, make_divisible, prefix

REDUCTION = 4


def se_mid_channels(channels: int) -> int:
    """Hidden width of the SE block for `channels` inputs."""
    return make_divisible(channels // REDUCTION, 8)


def excite(x: torch.Tensor, reduce: nn.Module, expand: nn.Module) -> torch.Tensor:
    """x * hsigmoid(expand(relu(reduce(mean_hw(x))))); x: (N, C, H, W)."""
    y = x.mean((2, 3))                                # (N, C)
    y = hard_sigmoid(expand(F.relu(reduce(y))))       # (N, C)
    return x * y[:, :, None, None]


class SqueezeExcite(nn.Module):
    """Plain SE on (N, C, H, W) with nn.Linear reduce (C -> mid) and expand (mid -> C)."""

    def __init__(self, reduce: nn.Linear, expand: nn.Linear) -> None:
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return excite(x, self.reduce, self.expand)


class ElasticSE(nn.Module):
    """SE over (N, C, H, W) with C <= max_channels; uses the [:mid, :C] / [:C, :mid] weight slices."""

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.max_channels = max_channels
        max_mid = se_mid_channels(max_channels)
        self.reduce = ElasticLinear(max_channels, max_mid)
        self.expand = ElasticLinear(max_mid, max_channels)

    def _set_widths(self, channels: int) -> None:
        check_channels("channels", channels, self.max_channels)
        self.reduce.set_active(se_mid_channels(channels))
        self.expand.set_active(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = check_channels("channels", x.shape[1], self.max_channels)
        mid = se_mid_channels(c)
        r, e = self.reduce, self.expand
        # the two linears as 1x1 convs on the pooled (N, C, 1, 1) map: one op forward, one backward
        # each (F.linear is a transpose and an addmm, and five ops backward), and the gate broadcasts
        y = x.mean((2, 3), keepdim=True)                                                    # (N, C, 1, 1)
        y = F.relu(F.conv2d(y, prefix(prefix(r.weight, mid), c, 1).view(mid, c, 1, 1), prefix(r.bias, mid)))
        y = hard_sigmoid(F.conv2d(y, prefix(prefix(e.weight, c), mid, 1).view(c, mid, 1, 1), prefix(e.bias, c)))
        return x * y

    def export(self, channels: int) -> SqueezeExcite:
        """A plain SqueezeExcite holding copies of the active slices."""
        self._set_widths(channels)
        return SqueezeExcite(self.reduce.export(channels), self.expand.export(se_mid_channels(channels)))
