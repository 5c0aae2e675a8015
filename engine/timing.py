"""One timer for everything that measures: the median milliseconds of a call after a warm-up, with
CUDA events on a GPU (device-synchronised) and the wall clock on CPU."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
              deadline: float = math.inf) -> float:
    """Median milliseconds of fn() after `warmup` calls; at least one timed call, then no more once
    time.monotonic() passes `deadline`."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    for _ in range(reps):
        if times and time.monotonic() > deadline:
            break
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
