"""Checkpoints: atomic save (write, fsync, rename) and verified load.

A checkpoint holds only tensors and plain data (loadable with torch.load(..., weights_only=True)):
model, optimizer and scaler state, RNG states, epoch/step, the exact run config and the supernet spec,
plus "integrity": the format version and a SHA-256 of everything else (every tensor's dtype, shape and
bytes, and the plain data), checked on load, so a file damaged on disk is refused instead of loading
silently wrong weights.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import BadInput, WriteFailed

FORMAT = 2            # the integrity record's format


class CheckpointError(BadInput):
    """A checkpoint that cannot be used for this run (unreadable, damaged, or another architecture)."""


def digest(value: Any) -> str:
    """SHA-256 over a nested structure of dicts, lists, tuples, tensors and plain values, in order."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            for k, item in v.items():
                feed(k)
                feed(item)
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for item in v:
                feed(item)
        else:
            h.update(f"V{type(v).__name__}:{v!r}".encode())

    feed(value)
    return h.hexdigest()


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Add the integrity record, write to a temporary file beside `path`, fsync, then rename over it:
    a crash mid-write never leaves a truncated checkpoint. A failed write removes the temporary file and
    raises WriteFailed naming the cause; `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "integrity": {"format": FORMAT, "sha256": digest(state)}}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:       # a partial temporary must never stay behind (it may fill the disk)
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):
            raise WriteFailed(f"writing checkpoint {path} failed ({write_error_cause(err)})") from err
        raise


def write_error_cause(err: BaseException) -> str:
    """The OS's reason behind a failed write: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") whose context is the OSError (disk full, file too large, permission)."""
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return f"{seen.strerror or seen}" + (f": {seen.filename}" if seen.filename else "")


def read(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint of this engine, its integrity verified (CheckpointError otherwise); not yet matched
    against any architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this engine (no 'model'/'arch' entries)")
    integrity = state.pop("integrity", None)
    if integrity is None:
        raise CheckpointError(f"checkpoint {path} has no integrity record: not written by this engine, or damaged")
    if not isinstance(integrity, dict) or integrity.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown integrity record {str(integrity)[:80]}; this "
                              f"engine reads format {FORMAT}")
    elif digest(state) != integrity.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is damaged: its contents do not match the SHA-256 it was "
                              "written with (restore a copy, or start a new run)")
    return state


def load(path: str | os.PathLike, arch: dict) -> dict[str, Any]:
    """`read` a checkpoint and check it against the supernet spec `arch` (SupernetSpec.to_dict())."""
    state = read(path)
    check_arch(state, path, arch)
    return state


def check_arch(state: dict[str, Any], path: str | os.PathLike, arch: dict) -> None:
    """CheckpointError unless the checkpoint `state` (read from `path`) holds the supernet spec `arch`."""
    if state["arch"] != arch:
        diff = {k: (state["arch"].get(k), v) for k, v in arch.items() if state["arch"].get(k) != v}
        raise CheckpointError(f"checkpoint {path} is for another architecture: (checkpoint, this run) = {diff}")


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
