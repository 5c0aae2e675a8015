"""Small helpers shared by the elastic layers: channel rounding and setting checks."""
from __future__ import annotations

from typing import Iterable

import torch


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `v` to the nearest multiple of `divisor`, never below 90% of `v` (the MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def check_channels(name: str, value: int, maximum: int) -> int:
    """Raise ValueError unless 1 <= value <= maximum."""
    if not isinstance(value, int) or value < 1 or value > maximum:
        raise ValueError(f"{name}={value!r} is outside [1, {maximum}]")
    return value


def check_choice(name: str, value: int, choices: Iterable[int]) -> int:
    """Raise ValueError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return value


def prefix(t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """t[:n] along `dim`, or t itself when that is all of it (a full-width layer dispatches no slice)."""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)
