"""Benchmark helpers: environment record, progress lines, a wall-clock budget and JSON output (timing:
engine.timing.median_ms)."""
from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).resolve().parent / "results"
_START = time.monotonic()


def environment(device: torch.device) -> dict:
    """Device name, versions, date and the exact command line."""
    import triton

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "device_type": device.type, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def progress(message: str) -> None:
    """A progress line with the seconds since the benchmark started (flushed: a killed run shows how far it got)."""
    print(f"[{time.monotonic() - _START:7.1f} s] {message}", flush=True)


class Budget:
    """A wall-clock budget in seconds (None: unlimited). Measurements that would start after it is spent
    are skipped and reported as skipped; a measurement under way stops repeating at the deadline."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = math.inf if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write `payload` to <out>/<name>.json, or without `out` to bench/results/<name>-<device type>-<UTC date>.json."""
    if out is not None:
        path = Path(out) / f"{name}.json"
    else:
        path = RESULTS / f"{name}-{payload['env']['device_type']}-{payload['env']['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)                # a reader (or a kill) never sees half a file
    return path
