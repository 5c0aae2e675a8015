"""Timing the implementations of each signature, one child process per op family.

For a signature, `candidates` builds the layer that makes that call (fresh weights, random inputs
of the signature's shape, dtype and memory format), runs it once under the signature's grad mode
and autocast with a backend.observe hook, and takes the layer's own candidate table from the call
(the same callables the layer executes). Each candidate is timed forward and backward as training
runs it (`timer(backend, run, device) -> ms`; CUDA events by default).

A journal (JSON lines beside the table) records each candidate before it starts and after it ends:
an interrupted tune continues where it stopped, and when a child process dies (a kernel fault), the
candidate it was running is recorded as failed and a new child continues with the rest.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import multiprocessing
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engine.elastic import backend
from engine.tune.signatures import EVAL_BATCH, Signature
from engine.timing import median_ms

log = logging.getLogger("engine.tune")
WARMUP, REPS = 3, 10
Timer = Callable[[str, Callable[[], None], torch.device], float]


def cuda_event_timer(name: str, run: Callable[[], None], device: torch.device) -> float:  # noqa: ARG001
    """Median milliseconds of run() after WARMUP calls (CUDA events on a GPU)."""
    return median_ms(run, device, WARMUP, REPS)


def resolve_timer(ref: str | None) -> Timer:
    """The timer named "module:function" (tests inject one), or CUDA events for None."""
    if ref is None:
        return cuda_event_timer
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- one signature ---------------------------------------------------------------------------------
def _input(sig: Signature, device: torch.device, channels: int | None = None) -> torch.Tensor:
    n, c, h, w = sig.shape
    x = torch.randn(EVAL_BATCH if not sig.grad else n, channels or c, h, w, device=device).to(sig.dtype)
    if sig.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(sig.grad)


def _call(sig: Signature, device: torch.device) -> Callable[[], Any]:
    """A function making the call `sig` describes (layers from engine.elastic)."""
    from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, fused, grouped

    x, c, op, key = _input(sig, device), sig.shape[1], sig.op, sig.key
    if op == "pointwise_conv":
        conv = ElasticConv2d(c, key[0], key[1], key[2]).to(device)
        return lambda: conv(x)
    if op == "conv_bn":
        conv, bn = ElasticConv2d(c, key[0], 1).to(device), ElasticBatchNorm2d(key[0], act=key[1]).to(device)
        res = _input(sig, device, key[0]) if key[2] else None
        return lambda: fused.conv_bn(conv, bn, x, res)
    if op == "depthwise_conv":
        dw = ElasticDepthwiseConv2d(c, (key[0],), key[1]).to(device)
        return lambda: dw(x)
    if op == "batchnorm_act":
        bn = ElasticBatchNorm2d(c, act=key[0]).to(device).train(key[1])
        return lambda: bn(x)
    weight = torch.ones(c, device=device, requires_grad=sig.grad)
    if op == "grouped_batchnorm_act":
        return lambda: grouped.grouped_batchnorm_act(x, weight, weight, 1, None, 1e-5, key[0])
    g = key[1]
    if op == "grouped_pointwise_conv":
        w = torch.randn(key[0], c // g, 1, 1, device=device, requires_grad=sig.grad)
        widths = torch.tensor([[key[0], c // g]] * g, dtype=torch.int32, device=device)
        return lambda: grouped.grouped_pointwise_conv(x, w, widths, key[0])
    if op == "grouped_depthwise_conv":
        filt = torch.randn(c, sig.kmax, sig.kmax, device=device, requires_grad=sig.grad)
        limits = torch.tensor([[sig.kmax, c // g]] * g, dtype=torch.int32, device=device)
        return lambda: grouped.grouped_depthwise_conv(x, filt, key[0], limits)
    raise ValueError(f"no builder for op {op!r}")


def _modes(sig: Signature, device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.set_grad_enabled(sig.grad))
    stack.enter_context(torch.autocast(device.type, dtype=sig.amp, enabled=sig.amp is not None))
    return stack


def candidates(sig: Signature, device: torch.device, kernels_here: bool) -> tuple[dict, list[torch.Tensor]]:
    """({backend: callable} of the implementations that serve `sig` on `device`, tensors to
    differentiate for). `kernels_here`: whether kernels may be candidates (False: the reference only)."""
    call, seen = _call(sig, device), []

    def hook(text: str, x: torch.Tensor, limits: dict, measure: Callable | None) -> None:
        if text == sig.text and not seen and measure is not None:
            seen.append((x, limits, measure))

    with backend.use_backend("auto"), backend.observe(hook), _modes(sig, device):
        call()
    if not seen:
        raise LookupError(f"the {sig.op} layer did not request {sig.text}")
    x, limits, measure = seen[0]
    impls, grad_inputs = measure()
    usable = {name for name, check in limits.items()
              if kernels_here and backend.serves(name, x) and check() is None}
    return {n: fn for n, fn in impls.items() if n == "torch" or n in usable}, grad_inputs


def forward_backward(sig: Signature, device: torch.device, fn: Callable[[], Any],
                     grad_inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """fn() under the signature's modes, then (with autograd) the backward into `grad_inputs`."""
    needs = [t for t in grad_inputs if t.requires_grad] if sig.grad else []

    def run() -> None:
        with _modes(sig, device):
            out = fn()
            y = out[0] if isinstance(out, (tuple, list)) else out
        if needs and y.requires_grad:
            torch.autograd.grad(y, needs, torch.ones_like(y), allow_unused=True)

    return run


# ---- the journal -----------------------------------------------------------------------------------
class Journal:
    """Append-only JSON lines: {"sig", "backend", "start"} before a candidate runs, {"sig", "backend",
    "ms"} or {"sig", "backend", "error"} after, {"sig", "done"} when a signature is complete."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue            # a line cut short by a crash
        return out

    def add(self, **record: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def state(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]], set[str]]:
        """(ms per signature and backend, errors likewise, completed signatures)."""
        ms: dict[str, dict[str, float]] = {}
        errors: dict[str, dict[str, str]] = {}
        done: set[str] = set()
        for r in self.records():
            if "ms" in r:
                ms.setdefault(r["sig"], {})[r["backend"]] = r["ms"]
            elif "error" in r:
                errors.setdefault(r["sig"], {})[r["backend"]] = r["error"]
            elif r.get("done"):
                done.add(r["sig"])
        return ms, errors, done

    def unfinished(self) -> tuple[str, str] | None:
        """The (signature, backend) started last and never finished (a child that died)."""
        started = None
        for r in self.records():
            if r.get("start"):
                started = (r["sig"], r["backend"])
            elif started and (r["sig"], r.get("backend")) == started:
                started = None
        return started


def measure_family(sigs: Sequence[Signature], device: torch.device, timer: Timer, journal: Journal,
                   kernels_here: bool) -> None:
    """Time every candidate of `sigs` not yet in the journal, recording each as it goes."""
    ms, errors, done = journal.state()
    for sig in sigs:
        if sig.text in done:
            continue
        try:
            impls, grad_inputs = candidates(sig, device, kernels_here)
        except Exception as err:  # noqa: BLE001 - named in the notes, the reference runs
            journal.add(sig=sig.text, backend="torch", error=f"could not build the call: {err}")
            journal.add(sig=sig.text, done=True)
            continue
        for name, fn in impls.items() if len(impls) > 1 else ():
            if name in ms.get(sig.text, {}) or name in errors.get(sig.text, {}):
                continue
            journal.add(sig=sig.text, backend=name, start=True)
            try:
                journal.add(sig=sig.text, backend=name,
                            ms=float(timer(name, forward_backward(sig, device, fn, grad_inputs), device)))
            except Exception as err:  # noqa: BLE001 - a failing implementation is left out, not chosen
                journal.add(sig=sig.text, backend=name, error=f"{type(err).__name__}: {str(err)[:200]}")
                log.debug("%s", traceback.format_exc())
        journal.add(sig=sig.text, done=True)


def _child(sigs: list[Signature], device: str, timer_ref: str | None, journal: str, kernels_here: bool) -> None:
    measure_family(sigs, torch.device(device), resolve_timer(timer_ref), Journal(Path(journal)), kernels_here)


def measure_isolated(sigs: list[Signature], device: torch.device, timer_ref: str | None, journal: Journal,
                     kernels_here: bool, on_progress: Callable[[], None]) -> None:
    """`measure_family` in child processes (spawned): a child that dies has the candidate it was
    running recorded as failed, and a new child continues."""
    ctx = multiprocessing.get_context("spawn")
    while True:
        done = journal.state()[2]
        todo = [s for s in sigs if s.text not in done]
        if not todo:
            return
        proc = ctx.Process(target=_child, args=(todo, str(device), timer_ref, str(journal.path), kernels_here))
        proc.start()
        while proc.is_alive():
            proc.join(0.5)
            on_progress()
        if proc.exitcode != 0:
            lost = journal.unfinished()
            if lost is None:             # died outside a candidate: do not loop forever
                for s in todo:
                    if s.text not in journal.state()[2]:
                        journal.add(sig=s.text, backend="torch", error=f"tuner process exit code {proc.exitcode}")
                        journal.add(sig=s.text, done=True)
                continue
            journal.add(sig=lost[0], backend=lost[1], error=f"the process died (exit code {proc.exitcode})")
