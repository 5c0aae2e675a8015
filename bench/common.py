"""Benchmark helpers: environment record, timing (CUDA events / do_bench on GPU, wall clock on CPU), JSON."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> dict:
    """Device name, versions, date and the exact command line."""
    import triton

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "device_type": device.type, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() after `warmup` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_json(name: str, payload: dict) -> Path:
    """bench/results/<name>-<device type>-<UTC date>.json"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = payload["env"]["date"][:10]
    path = RESULTS / f"{name}-{payload['env']['device_type']}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
