"""The one place that chooses how elastic layers compute: "torch" (reference), "triton" or "cuda".

Selection: `set_backend(name)` or the environment variable ENGINE_BACKEND, with
name in {"auto", "torch", "triton", "cuda"}. "auto" (the default) is measured: among the reference
and every kernel that is available and covers the call, the fastest on this device for the call's
signature (engine/elastic/dispatch.py: timed once, cached in memory and in a per-device JSON file);
before a measurement exists, and on CPU, the reference. Inside torch.compile'd code "auto" is the
reference: inductor generates (and fuses) its kernels; a forced backend puts the custom ops there. Triton and CUDA only serve CUDA tensors,
except that Triton also serves CPU tensors under TRITON_INTERPRET=1 (how CI tests the kernels) when
asked for by name, or for measurement with an injected timer. An explicitly requested backend that
is not installed raises; one that does not cover a particular input (a shape, a device) falls back
to "torch" and logs that once per (op, reason).
Layers keep each call's choice in a small per-layer memo (`remember`), so the decision is made once
per (input shape, active setting), not per call.
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
_generation = 0               # bumped when the backend or the timer changes: per-layer memos expire


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
    global _requested, _generation
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    if name != _requested:
        _requested, _generation = name, _generation + 1


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


def set_timer(timer: Callable | None, devices: tuple[str, ...] = ("cuda",)) -> None:
    """Measure "auto" choices with `timer(backend, run, device) -> ms` on `devices` (tests inject a
    deterministic timer on "cpu"); None restores CUDA events on CUDA."""
    global _generation
    from engine.elastic.dispatch import DISPATCHER

    DISPATCHER.set_timer(timer, devices)
    _generation += 1


def remember(memo: dict, key: tuple, decide: Callable[[], str]) -> str:
    """`decide()` once per `key` (and backend setting) in a layer's `memo`; not while compiling."""
    if torch.compiler.is_compiling():
        return decide()
    full = (_generation, get_backend()) + key
    choice = memo.get(full)
    if choice is None:
        choice = memo[full] = decide()
    return choice


def _shape_class(x: torch.Tensor) -> str:
    """The part of a call signature that comes from the activations: batch rounded up to a power of
    two, channels to a multiple of 16, the spatial size exact."""
    dims = list(x.shape)
    if dims:
        dims[0] = 1 << max(int(dims[0]) - 1, 0).bit_length()
    if len(dims) > 1:
        dims[1] = -(-int(dims[1]) // 16) * 16
    return "x".join(str(d) for d in dims)


def _kernel_covers(op: str, name: str, x: torch.Tensor, limits: dict, explicit: bool,
                   measured_here: bool) -> bool:
    if name not in limits:
        if explicit:
            _note_fallback(op, name, "no kernel for this op")
        return False
    cpu_ok = name == "triton" and triton_interpret() and (explicit or measured_here)
    if x.device.type != "cuda" and not cpu_ok:
        if explicit:
            _note_fallback(op, name, f"tensors on {x.device.type}")
        return False
    # (not re-checked while torch.compile traces: the probe imports modules, which dynamo cannot
    # trace, and an explicitly requested backend was already checked by set_backend)
    if not torch.compiler.is_compiling() and not availability(name)[0]:
        return False
    reason = limits[name]() if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype}"
    if reason is not None:
        _note_fallback(op, name, reason)
    return reason is None


def choose(op: str, x: torch.Tensor, limits: dict[str, Callable[[], str | None]],
           measure: Callable[[], tuple[dict[str, Callable], list[torch.Tensor]]] | None = None,
           key: tuple = ()) -> str:
    """Pick the backend for one call of `op` on activations `x` (its device and dtype).

    `limits` maps a backend name to a function returning None when that backend's kernel covers
    this call, or the reason it does not. Backends absent from `limits` have no kernel for `op`.
    Every kernel serves float32, float16 and bfloat16 activations (float64 runs the reference).
    With "auto", `measure()` returns (candidates {backend: side-effect-free callable running the
    op}, tensors to differentiate for) for timing, called only on the signature's first use; `key`
    holds the call's settings beyond the activations' shape and dtype (stride, kernel size, widths).
    """
    requested = get_backend()
    if requested == "torch":
        return "torch"
    if requested != "auto":
        return requested if _kernel_covers(op, requested, x, limits, True, False) else "torch"
    if torch.compiler.is_compiling():
        return "torch"              # a compiled region: the reference ops, which inductor generates and fuses
    from engine.elastic.dispatch import DISPATCHER

    measured_here = measure is not None and DISPATCHER.can_measure(x)
    kernels = [n for n in ("triton", "cuda") if _kernel_covers(op, n, x, limits, False, measured_here)]
    if not kernels or measure is None:
        return "torch"
    signature = "|".join([op, str(x.dtype).removeprefix("torch."), _shape_class(x), *map(str, key)])
    cached = DISPATCHER.cached(signature, x.device)
    if cached is not None:
        return cached if cached == "torch" or cached in kernels else "torch"
    if not measured_here:
        return "torch"                                  # the prior until this device measures it
    candidates, grad_inputs = measure()
    return DISPATCHER.measure(signature, x.device, {k: v for k, v in candidates.items()
                                                   if k == "torch" or k in kernels}, grad_inputs)
