"""Checkpoints: atomic save (write, fsync, rename) and validated load.

A checkpoint holds only tensors and plain data (loadable with weights_only=True): model, optimizer
and scaler state, RNG states, epoch/step, the exact run config and the supernet spec.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (unreadable, or another architecture)."""


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: a crash mid-write never
    leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike, arch: dict) -> dict[str, Any]:
    """Load and check a checkpoint against the supernet spec `arch` (SupernetSpec.to_dict())."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this engine (no 'model'/'arch' entries)")
    if state["arch"] != arch:
        diff = {k: (state["arch"].get(k), v) for k, v in arch.items() if state["arch"].get(k) != v}
        raise CheckpointError(f"checkpoint {path} is for another architecture: (checkpoint, this run) = {diff}")
    return state


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
