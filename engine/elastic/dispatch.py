"""Measured backend choice for backend "auto": on first use of an op call signature, time every
implementation that covers it (the PyTorch reference on weight views, i.e. cuDNN/ATen; Triton; the
CUDA extension), forward and backward, with CUDA events after a warm-up, and keep the fastest: in
memory and in a JSON file per device (like torch.backends.cudnn.benchmark, but persistent).

The cache file: $ENGINE_DISPATCH_CACHE, else ~/.cache/engine/dispatch-<device>.json. It records the
device name and the torch / triton / engine versions; a file written for another device or other
versions, or one that does not parse, is ignored with a warning (and rewritten), never a crash.
Measuring needs a real CUDA tensor outside torch.compile tracing and CUDA-graph capture; until a
measurement exists (and on CPU) the prior is the reference. `set_timer` injects a timer (tests).
`python -m engine.info` prints the cached choices.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engine.timing import median_ms

log = logging.getLogger("engine.dispatch")
FORMAT = 1
WARMUP, REPS = 2, 5

Candidates = dict[str, Callable[[], Any]]


def cuda_event_timer(backend: str, run: Callable[[], None], device: torch.device) -> float:  # noqa: ARG001
    """Median milliseconds of run() (backend `backend`'s implementation) on `device` after WARMUP calls
    (CUDA events)."""
    return median_ms(run, device, WARMUP, REPS)


class Dispatcher:
    """Measured choices per call-signature key, loaded from and saved to one JSON file per device."""

    def __init__(self) -> None:
        self._timer: Callable[[str, Callable[[], None], torch.device], float] = cuda_event_timer
        self._measured_devices: tuple[str, ...] = ("cuda",)
        self._entries: dict[str, dict] = {}
        self._loaded_for: str | None = None
        self._lock = threading.Lock()

    # ---- configuration ---------------------------------------------------------------------------
    def set_timer(self, timer: Callable[[str, Callable[[], None], torch.device], float] | None,
                  devices: Sequence[str] = ("cuda",)) -> None:
        """Replace the timer (tests: a deterministic one) and the device types measured on; None restores
        the CUDA-event timer. Forgets the in-memory choices (the file is read again on next use)."""
        self._timer = timer or cuda_event_timer
        self._measured_devices = tuple(devices)
        self._entries, self._loaded_for = {}, None

    def can_measure(self, x: torch.Tensor) -> bool:
        if x.device.type not in self._measured_devices or torch.compiler.is_compiling() or _is_fake(x):
            return False                            # (fake first: a fake CUDA tensor needs no CUDA runtime)
        return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    # ---- the cache file ------------------------------------------------------------------------
    @staticmethod
    def device_name(device: torch.device) -> str:
        real_cuda = device.type == "cuda" and torch.cuda.is_available()   # else a fake CUDA device: no runtime
        return torch.cuda.get_device_name(device) if real_cuda else device.type

    @staticmethod
    def path(device_name: str) -> Path:
        explicit = os.environ.get("ENGINE_DISPATCH_CACHE")
        if explicit:
            return Path(explicit)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name)
        return Path.home() / ".cache" / "engine" / f"dispatch-{safe}.json"

    @staticmethod
    def versions() -> dict[str, str]:
        import engine

        out = {"torch": torch.__version__, "engine": engine.__version__}
        try:
            import triton

            out["triton"] = triton.__version__
        except ImportError:
            out["triton"] = "none"
        return out

    def _load(self, device_name: str) -> None:
        if self._loaded_for == device_name:
            return
        self._entries, self._loaded_for = {}, device_name
        path = self.path(device_name)
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
                raise ValueError("no 'choices' mapping")
        except (OSError, ValueError) as err:
            log.warning("dispatch cache %s is unreadable (%s): ignored, it will be rewritten", path, err)
            return
        mine = {"format": FORMAT, "device": device_name, "versions": self.versions()}
        theirs = {k: data.get(k) for k in mine}
        if theirs != mine:
            log.warning("dispatch cache %s was written for %s, not %s: ignored, it will be rewritten", path,
                        theirs, mine)
            return
        self._entries = {k: v for k, v in data["choices"].items() if isinstance(v, dict) and "choice" in v}

    def _save(self, device_name: str) -> None:
        path = self.path(device_name)
        payload = {"format": FORMAT, "device": device_name, "versions": self.versions(), "choices": self._entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError as err:                          # a read-only home: the choices stay in memory
            log.warning("dispatch cache %s not written (%s)", path, err)

    # ---- choosing ------------------------------------------------------------------------------
    def cached(self, key: str, device: torch.device) -> str | None:
        with self._lock:
            self._load(self.device_name(device))
            entry = self._entries.get(key)
        return entry["choice"] if entry else None

    def measure(self, key: str, device: torch.device, candidates: Candidates,
                grad_inputs: Sequence[torch.Tensor]) -> str:
        """Time each candidate (forward, and backward into `grad_inputs` when any needs a gradient),
        remember and persist the fastest. A candidate that raises is left out (and logged)."""
        name = self.device_name(device)
        timings: dict[str, float] = {}
        for backend, fn in candidates.items():
            try:
                timings[backend] = self._timer(backend, _forward_backward(fn, grad_inputs), device)
            except Exception as err:  # noqa: BLE001 - a failing implementation is simply not chosen
                log.warning("%s: the %s implementation failed while being measured (%s: %s); not chosen",
                            key, backend, type(err).__name__, str(err)[:200])
        choice = min(timings, key=timings.get) if timings else "torch"
        with self._lock:
            self._load(name)
            self._entries[key] = {"choice": choice, "ms": {k: round(v, 6) for k, v in timings.items()}}
            self._save(name)
        log.info("%s on %s: %s (ms: %s)", key, name, choice, ", ".join(f"{k} {v:.4f}" for k, v in timings.items()))
        return choice

    def entries(self, device: torch.device) -> dict[str, dict]:
        """The cached choices for `device` (python -m engine.info)."""
        with self._lock:
            self._load(self.device_name(device))
            return dict(self._entries)


def _forward_backward(fn: Callable[[], Any], grad_inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    needs = [t for t in grad_inputs if t.requires_grad]

    def run() -> None:
        with torch.enable_grad() if needs else torch.no_grad():
            out = fn()
            y = out[0] if isinstance(out, (tuple, list)) else out
            if needs and y.requires_grad:
                torch.autograd.grad(y, needs, torch.ones_like(y), allow_unused=True)

    return run


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


DISPATCHER = Dispatcher()
