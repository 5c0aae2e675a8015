"""ElasticLinear: a linear layer whose active weight is the prefix slice W[:out, :in]."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic.utils import check_channels, prefix


class ElasticLinear(nn.Module):
    """Linear over feature prefixes: (N, in) with in <= max_in -> (N, out), out = `active_out_features`."""

    def __init__(self, max_in: int, max_out: int, bias: bool = True) -> None:
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.weight = nn.Parameter(torch.empty(max_out, max_in))
        self.bias = nn.Parameter(torch.empty(max_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(max_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self.active_out_features = max_out

    def set_active(self, out_features: int) -> None:
        """Select the number of output features (1..max_out)."""
        self.active_out_features = check_channels("out_features", out_features, self.max_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_features = check_channels("in_features", x.shape[-1], self.max_in)
        out = self.active_out_features
        bias = None if self.bias is None else prefix(self.bias, out)
        return F.linear(x, prefix(prefix(self.weight, out), in_features, 1), bias)

    def export(self, in_features: int) -> nn.Linear:
        """A plain nn.Linear holding a copy of the active slice."""
        out = self.active_out_features
        lin = nn.Linear(in_features, out, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight[:out, :in_features])
            if self.bias is not None:
                lin.bias.copy_(self.bias[:out])
        return lin

    def extra_repr(self) -> str:
        return f"max_in={self.max_in}, max_out={self.max_out}, bias={self.bias is not None}"
