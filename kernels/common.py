"""Helpers shared by the Triton op files: channels-last views, split counts, dot precision, autotuning."""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl


def rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) view of the channels-last layout (copies only if x is not channels-last)."""
    n, c, h, w = x.shape
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def empty_nchw_channels_last(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (N, C, H, W) tensor in channels-last memory, dtype/device of `like`."""
    return torch.empty((n, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def tuning_enabled() -> bool:
    """Autotuning runs on a GPU unless ENGINE_AUTOTUNE=0; under TRITON_INTERPRET=1 one config runs."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("ENGINE_AUTOTUNE", "1") != "0"


def autotune(space: Sequence[tuple], default: tuple, key: Sequence[str], prune: Callable | None = None):
    """triton.autotune over `space`, [(block sizes, num_warps[, num_stages])], keyed on the argument
    names `key` (the shape class; tensor dtypes are added by Triton), with an optional early pruning
    rule prune(configs, named_args, **kwargs) -> configs; the chosen configs are cached on disk where
    this Triton can. With tuning off (see `tuning_enabled`) only `default` exists: one compile per
    variant."""
    entries = space if tuning_enabled() else [default]
    configs = [triton.Config(dict(e[0]), num_warps=e[1], num_stages=e[2] if len(e) > 2 else 3) for e in entries]
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=list(key), prune_configs_by={"early_config_prune": prune} if prune else None,
                           **extra)


def size_class(n: int) -> int:
    """The power of two at or above n: the shape class autotuning is keyed on (one tuning per class)."""
    return triton.next_power_of_2(max(int(n), 1))


_ROWS_PER_SPLIT_OVERRIDE: int | None = None
_FORCE_WIDE = False
INT32_LIMIT = 2**31 - 1


@contextlib.contextmanager
def rows_per_split(rows: int):
    """Test hook: every `splits` call inside uses `rows` rows per program instead of its threshold
    (thousands), so the interpreter reaches the split and multi-split reduction paths at tiny shapes."""
    global _ROWS_PER_SPLIT_OVERRIDE
    previous, _ROWS_PER_SPLIT_OVERRIDE = _ROWS_PER_SPLIT_OVERRIDE, rows
    try:
        yield
    finally:
        _ROWS_PER_SPLIT_OVERRIDE = previous


def splits(rows_total: int, rows_per_program: int, cap: int = 128) -> int:
    """How many programs share a long reduction over `rows_total` rows."""
    per = _ROWS_PER_SPLIT_OVERRIDE or rows_per_program
    return max(1, min(cap, -(-rows_total // per)))


def span(t: torch.Tensor) -> int:
    """The largest element offset a kernel can form into t: sum of (size - 1) * stride (0 if empty)."""
    return 0 if t.numel() == 0 else sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def wide_index(*tensors: torch.Tensor | None) -> bool:
    """True when an element offset into one of `tensors` can pass int32 (2^31 - 1): the kernels then
    index in int64 (their WIDE constexpr), otherwise in int32, which is cheaper. A small margin covers
    offsets a masked-out lane forms past the end (a tile beyond the edge)."""
    return any(t is not None and span(t) + 2**20 > INT32_LIMIT for t in tensors) or _FORCE_WIDE



@contextlib.contextmanager
def force_wide_index():
    """Test hook: launch every kernel with int64 indexing, so its WIDE path runs at tiny shapes."""
    global _FORCE_WIDE
    previous, _FORCE_WIDE = _FORCE_WIDE, True
    try:
        yield
    finally:
        _FORCE_WIDE = previous


@triton.jit
def program_id(axis: tl.constexpr, WIDE: tl.constexpr):
    """tl.program_id(axis), as int64 when WIDE: every offset derived from it is then computed in int64."""
    pid = tl.program_id(axis)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid


def dot_precision(dtype: torch.dtype) -> str:
    """Triton dot precision following torch's float32 matmul setting (tf32 unless "highest")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def prune_blocks(limits: dict[str, str]) -> Callable:
    """An early pruning rule: drop configs whose block `BLOCK_X` exceeds twice the next power of two of
    the launch argument limits["BLOCK_X"] (a tile mostly past the edge); the first config always stays."""
    def prune(configs, named_args, **kwargs):
        kept = [cfg for cfg in configs if all(
            cfg.kwargs[block] <= max(16, 2 * triton.next_power_of_2(int(named_args[arg])))
            for block, arg in limits.items() if block in cfg.kwargs)]
        return kept or configs[:1]

    return prune
