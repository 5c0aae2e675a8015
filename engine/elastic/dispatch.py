"""The dispatch table backend "auto" reads: per op call signature, the implementation to run.

The table is written before training by `python -m engine.tune` (engine/tune/), loaded on rank 0 and
broadcast to every rank (engine.tune.prepare_for_training), and installed here with `install`.
Nothing here measures: a call looks its signature up in a dictionary. A signature the table does not
hold runs the reference (logged once per signature); so does every call while no table is installed.

A signature is one line of text, e.g.
    conv_bn|bfloat16|amp=bfloat16|cl|grad|128x144x56x56|144|relu|False
fields: op (with its variant: `grouped_` for the batched sandwich's grouped ops), the activations'
dtype, the autocast dtype ("amp=off" without autocast), the memory format ("cl": channels-last and
not also NCHW-contiguous, "nchw" otherwise, e.g. any 1x1 map), grad mode ("grad": autograd on;
"nograd": BN calibration, evaluation, search), the activations' shape (exact; under "nograd" the
batch is "*": calibration and evaluation batches, tails included, share one entry, tuned at the
evaluation batch), then the op's own settings as the layer passes them (e.g. out width, kernel
size, stride, activation, BN training flag, residual).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger("engine.dispatch")

_choices: dict[str, str] | None = None    # installed table: signature -> implementation name
_logged_missing: set[str] = set()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def signature_text(op: str, dtype: torch.dtype, amp: torch.dtype | None, channels_last: bool, grad: bool,
                   shape: Sequence[int], key: Sequence) -> str:
    """The table key of one call (format in the module docstring)."""
    dims = ["*" if i == 0 and not grad else str(int(d)) for i, d in enumerate(shape)]
    return "|".join([op, _dtype_name(dtype), "amp=" + (_dtype_name(amp) if amp is not None else "off"),
                     "cl" if channels_last else "nchw", "grad" if grad else "nograd", "x".join(dims),
                     *map(str, key)])


def is_channels_last(x: torch.Tensor) -> bool:
    """The memory-format field: channels-last strides that are not also plain contiguous ones."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def install(choices: dict[str, str] | None) -> None:
    """Use `choices` (signature -> implementation name) from now on; None: the reference everywhere."""
    global _choices
    _choices = dict(choices) if choices is not None else None
    _logged_missing.clear()


def installed() -> dict[str, str] | None:
    """The installed choices (None when no table is installed)."""
    return _choices


def lookup(signature: str) -> str:
    """The implementation the table names for `signature`; "torch" (the reference) when it has none."""
    if _choices is None:
        return "torch"
    choice = _choices.get(signature)
    if choice is None:
        if signature not in _logged_missing:
            _logged_missing.add(signature)
            log.warning("dispatch table has no entry for %s: running the reference", signature)
        return "torch"
    return choice
