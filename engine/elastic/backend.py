"""The one place that chooses how elastic layers compute: "torch" (reference), "triton" or "cuda".

Selection: `set_backend(name)` or the environment variable ENGINE_BACKEND, with
name in {"auto", "torch", "triton", "cuda"}. "auto" (the default) picks, per call, the first of
triton -> cuda -> torch that is available and covers the inputs; Triton and CUDA only serve CUDA
tensors, except that Triton also serves CPU tensors under TRITON_INTERPRET=1 when asked for by name
(that is how CI tests the kernels). An explicitly requested backend that is not installed raises;
one that does not cover a particular input (a shape, a device) falls back to "torch" and logs
that once per (op, reason).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Callable, Iterator

import torch

log = logging.getLogger("engine.backend")

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_requested: str | None = None  # None: read ENGINE_BACKEND on first use
_warned: set[tuple[str, str]] = set()


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def availability(name: str) -> tuple[bool, str]:
    """(available, why) for a backend name; `why` explains a missing backend. Cached: asked per call."""
    if name == "torch":
        return True, "reference PyTorch ops"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "the triton package is not installed"
        if not torch.cuda.is_available() and not triton_interpret():
            return False, "no CUDA device (set TRITON_INTERPRET=1 to run kernels on the CPU)"
        return True, "triton " + _version("triton")
    if name == "cuda":
        from engine.elastic import cuda_ext

        return cuda_ext.availability()
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def _version(pkg: str) -> str:
    try:
        return __import__(pkg).__version__
    except Exception:  # noqa: BLE001 - a version string is informational only
        return "?"


def set_backend(name: str) -> None:
    """Select the backend for all elastic layers ("auto", "torch", "triton", "cuda")."""
    global _requested
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    _requested = name


def get_backend() -> str:
    """The requested backend name ("auto" unless set)."""
    global _requested
    if _requested is None:
        env = os.environ.get("ENGINE_BACKEND", "auto")
        set_backend(env)
    return _requested  # type: ignore[return-value]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (tests and benchmarks)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _note_fallback(op: str, backend: str, reason: str) -> None:
    key = (op, backend + ": " + reason)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: %s backend does not cover this call (%s); using the torch reference", op, backend, reason)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose(op: str, x: torch.Tensor, limits: dict[str, Callable[[], str | None]]) -> str:
    """Pick the backend for one call of `op` on activations `x` (its device and dtype).

    `limits` maps a backend name to a function returning None when that backend's kernel covers
    this call, or the reason it does not. Backends absent from `limits` have no kernel for `op`.
    Every kernel serves float32, float16 and bfloat16 activations (float64 runs the reference).
    """
    device = x.device
    requested = get_backend()
    if requested == "torch":
        return "torch"
    candidates = ("triton", "cuda") if requested == "auto" else (requested,)
    for name in candidates:
        if name not in limits:
            if requested != "auto":
                _note_fallback(op, name, "no kernel for this op")
            continue
        if device.type != "cuda" and not (name == "triton" and requested == "triton" and triton_interpret()):
            if requested != "auto":
                _note_fallback(op, name, f"tensors on {device.type}")
            continue
        # (not re-checked while torch.compile traces: the probe imports modules, which dynamo cannot
        # trace, and an explicitly requested backend was already checked by set_backend)
        if not torch.compiler.is_compiling() and not availability(name)[0]:
            continue
        reason = limits[name]() if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype}"
        if reason is None:
            return name
        _note_fallback(op, name, reason)
    return "torch"
