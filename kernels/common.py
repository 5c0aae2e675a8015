"""Helpers shared by the Triton op files: channels-last views, split counts, dot precision."""
from __future__ import annotations

import torch


def rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) view of the channels-last layout (copies only if x is not channels-last)."""
    n, c, h, w = x.shape
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def empty_nchw_channels_last(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (N, C, H, W) tensor in channels-last memory, dtype/device of `like`."""
    return torch.empty((n, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def splits(rows_total: int, rows_per_program: int, cap: int = 128) -> int:
    """How many programs share a long reduction over `rows_total` rows."""
    return max(1, min(cap, -(-rows_total // rows_per_program)))


def dot_precision(dtype: torch.dtype) -> str:
    """Triton dot precision following torch's float32 matmul setting (tf32 unless "highest")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Cast to the autocast dtype when autocast is on for x's device (custom ops are not autocast-aware)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(dev))
    return x
