"""ElasticSE: squeeze-and-excite over a channel prefix (reduction 4, mid channels divisible by 8,
ReLU inside, hard-sigmoid gate), and its plain export `SqueezeExcite`."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic.activations import hard_sigmoid
from engine.elastic.grouped import channel_mask
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

    def forward(self, x: torch.Tensor, widths: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) gated per channel; with `widths` (G, 2) int32 [hidden_g, c_g], G subnets
        stacked on the channel axis, (N, G*C, H, W), group g with its own hidden width (`_grouped`)."""
        if widths is not None:
            return self._grouped(x, widths)
        c = check_channels("channels", x.shape[1], self.max_channels)
        mid = se_mid_channels(c)
        r, e = self.reduce, self.expand
        # the two linears as 1x1 convs on the pooled (N, C, 1, 1) map: one op forward, one backward
        # each (F.linear is a transpose and an addmm, and five ops backward), and the gate broadcasts
        y = x.mean((2, 3), keepdim=True)                                                    # (N, C, 1, 1)
        y = F.relu(F.conv2d(y, prefix(prefix(r.weight, mid), c, 1).view(mid, c, 1, 1), prefix(r.bias, mid)))
        y = hard_sigmoid(F.conv2d(y, prefix(prefix(e.weight, c), mid, 1).view(c, mid, 1, 1), prefix(e.bias, c)))
        return x * y

    def _grouped(self, x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Channels beyond a group's width are zero in x (so are their gates' inputs), so only the
        hidden units need a mask; the widest group's hidden width is se_mid_channels(C)."""
        groups = widths.shape[0]
        n, c = x.shape[0], x.shape[1] // groups
        hidden = se_mid_channels(c)
        s = x.mean((2, 3)).view(n, groups, c)                                              # (N, G, C)
        r, e = self.reduce, self.expand
        z = F.relu(F.linear(s, r.weight[:hidden, :c], r.bias[:hidden]))                   # (N, G, hidden)
        z = z * channel_mask(widths[:, 0], hidden, z.dtype).view(groups, hidden)
        gate = hard_sigmoid(F.linear(z, e.weight[:c, :hidden], e.bias[:c]))                # (N, G, C)
        return x * gate.reshape(n, groups * c)[:, :, None, None]

    def export(self, channels: int) -> SqueezeExcite:
        """A plain SqueezeExcite holding copies of the active slices."""
        self._set_widths(channels)
        return SqueezeExcite(self.reduce.export(channels), self.expand.export(se_mid_channels(channels)))
