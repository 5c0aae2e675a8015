"""The one place that chooses how elastic layers compute: "torch" (reference), "triton" or "cuda".

Selection: `set_backend(name)` or the environment variable ENGINE_BACKEND, with
name in {"auto", "torch", "triton", "cuda"}. "auto" (the default) runs what the installed dispatch
table (engine/elastic/dispatch.py, written by `python -m engine.tune` before training) names for the
call's signature, and the reference when no table is installed or the table has no entry: no call
ever measures anything. Inside torch.compile'd code "auto" is the reference: inductor generates (and
fuses) its kernels; a forced backend puts the custom ops there. Triton and CUDA only serve CUDA
tensors, except that Triton also serves CPU tensors under TRITON_INTERPRET=1 (how CI tests the
kernels). An explicitly requested backend that is not installed raises; one that does not cover a
particular input (a shape, a device) falls back to "torch" and logs that once per (op, reason).
`observe` lets a hook see every call's signature (the tuner's capture, tests' recording).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from typing import Callable, Iterator

import torch

from engine.elastic import dispatch

log = logging.getLogger("engine.backend")

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
_requested: str | None = None  # None: read ENGINE_BACKEND on first use
_warned: set[tuple[str, str]] = set()
_signatures: dict[tuple, str | None] = {}   # call fingerprint -> signature (None: no kernel covers the call)
_observers: list[Callable] = []


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
    """Select the backend for all elastic layers ("auto", "torch", "triton", "cuda"). A change of backend
    announces again, once per op and reason, the calls the new backend does not cover."""
    global _requested
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    if name != _requested:
        _warned.clear()
    _requested = name


def get_backend() -> str:
    """The requested backend name ("auto" unless set). ENGINE_BACKEND is read (and checked) on the first
    call outside torch.compile tracing; a traced call only reads, so the graph has no side effect."""
    if _requested is None:
        env = os.environ.get("ENGINE_BACKEND", "auto")
        if torch.compiler.is_compiling():
            return env if env in _CHOICES else "auto"
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


@contextlib.contextmanager
def observe(hook: Callable[[str, torch.Tensor, dict, Callable | None], None]) -> Iterator[None]:
    """Call `hook(signature, x, limits, measure)` for every backend-"auto" call a kernel covers
    (by shape and dtype), whatever the table says, while the context is open."""
    _observers.append(hook)
    try:
        yield
    finally:
        _observers.remove(hook)


def _on_device(name: str, x: torch.Tensor) -> bool:
    """Kernels serve CUDA tensors; Triton's also CPU tensors when interpreted (TRITON_INTERPRET=1)."""
    return x.device.type == "cuda" or (name == "triton" and triton_interpret())


def serves(name: str, x: torch.Tensor) -> bool:
    """Whether backend `name` is installed and can run on x's device here."""
    return _on_device(name, x) and availability(name)[0]


def _kernel_covers(op: str, name: str, x: torch.Tensor, limits: dict, explicit: bool) -> bool:
    """Whether `name`'s kernel serves this call (an explicit request logs why not)."""
    if name not in limits:
        if explicit:
            _note_fallback(op, name, "no kernel for this op")
        return False
    if not _on_device(name, x):
        if explicit:
            _note_fallback(op, name, f"tensors on {x.device.type}")
        return False
    # (not re-checked while torch.compile traces: the probe imports modules, which dynamo cannot
    # trace, and an explicitly requested backend was already checked by set_backend)
    if not torch.compiler.is_compiling() and not availability(name)[0]:
        return False
    reason = limits[name]() if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype}"
    if reason is not None and explicit:
        _note_fallback(op, name, reason)
    return reason is None


def _signature(op: str, x: torch.Tensor, limits: dict, measure: Callable | None, key: tuple) -> str | None:
    """The call's dispatch-table signature, or None when no kernel covers it by shape and dtype."""
    if getattr(measure, "__module__", "") == "engine.elastic.grouped" and not op.startswith("grouped_"):
        op = "grouped_" + op          # the batched sandwich's variant (grouped statistics) of a plain op
    amp = dispatch.autocast_dtype(x.device.type)
    grad = torch.is_grad_enabled()
    fingerprint = (op, x.dtype, tuple(x.shape), x.stride(), grad, amp, key)
    if fingerprint not in _signatures:
        covered = x.dtype in KERNEL_DTYPES and any(check() is None for check in limits.values())
        _signatures[fingerprint] = dispatch.signature_text(
            op, x.dtype, amp, dispatch.is_channels_last(x), grad, x.shape, key) if covered else None
    return _signatures[fingerprint]


def implementation_for(op: str, x: torch.Tensor, limits: dict[str, Callable[[], str | None]],
                       measure: Callable[[], tuple[dict[str, Callable], list[torch.Tensor]]] | None = None,
                       key: tuple = ()) -> str:
    """The backend that runs one call of `op` on activations `x` (its device, dtype, shape, strides).

    `limits` maps a backend name to a function returning None when that backend's kernel covers
    this call, or the reason it does not; backends absent from `limits` have no kernel for `op`.
    Every kernel serves float32, float16 and bfloat16 activations (float64 runs the reference).
    `measure()` returns (candidates {backend: side-effect-free callable running the op}, tensors
    to differentiate for): the tuner times those (engine/tune); here it is only handed to observers.
    `key` holds the call's settings beyond the activations (widths, kernel size, stride, activation).
    With "auto" the choice is the dispatch table's entry for the call's signature (a lookup).
    """
    requested = get_backend()
    if requested == "torch":
        return "torch"
    if requested != "auto":
        return requested if _kernel_covers(op, requested, x, limits, True) else "torch"
    if torch.compiler.is_compiling():
        return "torch"              # a compiled region: the reference ops, which inductor generates and fuses
    signature = _signature(op, x, limits, measure, key)
    if signature is None:
        return "torch"
    for hook in _observers:
        hook(signature, x, limits, measure)
    choice = dispatch.lookup(signature)
    return choice if choice != "torch" and _kernel_covers(op, choice, x, limits, False) else "torch"
