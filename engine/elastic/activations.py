"""Activations used by MobileNetV3: ReLU, hard-swish, hard-sigmoid, selected by name."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "h_swish")


def apply_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Apply the activation named `act` ("none", "relu", "h_swish") elementwise.
    h_swish is x * relu6(x + 3) / 6, as ATen's hardswish computes it (one op forward, one backward)."""
    if act == "none":
        return x
    if act == "relu":
        return F.relu(x)
    if act == "h_swish":
        return F.hardswish(x)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6, the MobileNetV3 gate (ATen's hardsigmoid)."""
    return F.hardsigmoid(x)


class Activation(nn.Module):
    """Module form of `apply_activation` (plain torch: used in exported subnets)."""

    def __init__(self, act: str) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(x, self.act)

    def extra_repr(self) -> str:
        return self.act
