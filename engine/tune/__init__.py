"""Tuning once, before training: which implementation serves each op call signature (engine.tune.signatures
enumerates them), timed in child processes (engine.tune.runner), written to one table (engine.tune.table)
that training loads on rank 0, broadcasts to every rank and installs (engine.elastic.dispatch).

A kernel wins a signature only if it beats the reference (cuDNN/ATen) by MARGIN; otherwise, and when a
candidate fails, the reference is kept. On a CPU there is nothing to tune (the kernels are CUDA kernels;
the Triton interpreter is a test vehicle): every signature gets the reference without any timing,
unless a timer is injected (`set_timer`, tests).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from engine.elastic import dispatch
from engine.errors import BadInput
from engine.train.distributed import from_rank0
from engine.tune import runner
from engine.tune.signatures import Settings, Signature, enumerate_signatures, settings_from_config
from engine.tune.table import Table, TableError, default_path, new_table, read, read_or_none, write

log = logging.getLogger("engine.tune")
MARGIN = 0.03
_timer_ref: str | None = None      # "module:function" (tests); None: CUDA events, nothing to tune on CPU
isolate = True                     # time in child processes (tests switch it off for speed)


def set_timer(ref: str | None) -> None:
    """Inject a timer "module:function" with (backend, run, device) -> ms (tests); None restores CUDA events."""
    global _timer_ref
    _timer_ref = ref


def can_tune(device: torch.device) -> bool:
    """Whether kernels are timed on `device` (CUDA, or any device with an injected timer)."""
    return device.type == "cuda" or _timer_ref is not None


def choose_entry(ms: dict[str, float]) -> str:
    """The winner among measured candidates: the fastest kernel if it beats the reference by MARGIN."""
    ref = ms.get("torch")
    kernels = {k: v for k, v in ms.items() if k != "torch"}
    if ref is None or not kernels:
        return "torch"
    best = min(kernels, key=kernels.get)
    return best if kernels[best] < ref * (1 - MARGIN) else "torch"


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="tune", disable=not enabled, dynamic_ncols=True, leave=False)


def _measure(sigs: list[Signature], device: torch.device, journal: runner.Journal, progress: bool) -> None:
    bar = _progress(progress, len(sigs))
    texts = {s.text for s in sigs}

    def update() -> None:
        bar.update(len(journal.state()[2] & texts) - bar.n)

    families: dict[str, list[Signature]] = {}
    for s in sigs:
        families.setdefault(s.op, []).append(s)
    kernels_here = can_tune(device)
    for family in families.values():
        if isolate:
            runner.measure_isolated(family, device, _timer_ref, journal, kernels_here, update)
        else:
            runner.measure_family(family, device, runner.resolve_timer(_timer_ref), journal, kernels_here)
        update()
    bar.close()


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One tune at a time per folder (two runs starting together share the cache table): an flock
    on the folder itself, released by the kernel if the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another tune writing into %s", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def tune(settings: Sequence[Settings], device: torch.device, out: Path, progress: bool = True) -> Table:
    """The table at `out` completed with every signature of `settings` (tuning those it lacks), written
    back to `out`. A table there for another device or versions is replaced (one warning line)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent):
        return _complete(settings, device, out, progress)


def _complete(settings: Sequence[Settings], device: torch.device, out: Path, progress: bool) -> Table:
    table = read_or_none(out, device) or new_table(device)
    wanted: dict[str, Signature] = {}
    for s in settings:
        wanted.update(enumerate_signatures(s))
        if s.describe() not in table.settings:
            table.settings.append(s.describe())
    missing = [s for text, s in wanted.items() if text not in table.entries]
    if not missing:
        return table
    started = time.perf_counter()
    journal = runner.Journal(out.with_name(out.name + ".partial"))
    if not can_tune(device):
        log.info("nothing to tune on %s: the reference for all %d signatures", device.type, len(missing))
        table.notes.append(f"{device.type}: no kernels timed, the reference everywhere")
    else:
        log.info("tuning %d signatures on %s (%s)", len(missing), table.device, ", ".join(sorted({s.op for s in missing})))
        _measure(missing, device, journal, progress)
    ms, errors, _ = journal.state()
    for s in missing:
        table.entries[s.text] = {"choice": choose_entry(ms.get(s.text, {})), "ms": ms.get(s.text, {})}
        table.notes += [f"{s.text}: {name} failed ({err})" for name, err in errors.get(s.text, {}).items()]
    table.seconds += time.perf_counter() - started
    write(table, out)
    journal.path.unlink(missing_ok=True)
    log.info("tuned %d signatures in %.1f s: %s", len(missing), time.perf_counter() - started, out)
    return table


def prepare_for_training(cfg, model, device: torch.device) -> Table | None:
    """Before step 0: the run's dispatch table (`cfg.tune`: off | auto | PATH) loaded, or tuned for the
    signatures it lacks, on rank 0, broadcast to every rank and installed; returns it (None: the
    reference everywhere; so with a forced --backend, which uses no table). BadInput (exit 2) on every
    rank when --tune PATH is not a readable file; any error of rank 0's is raised on every rank (no rank
    is left waiting in the broadcast)."""
    if cfg.tune not in ("off", "auto") and not (Path(cfg.tune).is_file() and os.access(cfg.tune, os.R_OK)):
        raise BadInput(f"--tune {cfg.tune!r}: not a readable file")
    table = None if cfg.backend != "auto" else from_rank0(lambda: _load_or_tune(cfg, model, device))
    dispatch.install(table.choices() if table is not None else None)
    return table


def install_table(tune: str, device: torch.device) -> str:
    """Install, without tuning, the dispatch table `tune` names (a path; 'auto': this device's cached
    table if there is one; 'off'), for the benchmarks and the search; returns what was installed, for
    their reports. A table for another device or versions, or a corrupt one, is a warning and the
    reference, as in training."""
    path = default_path(device) if tune == "auto" else None if tune == "off" else Path(tune)
    table = read_or_none(path, device) if path is not None else None
    dispatch.install(table.choices() if table is not None else None)
    return f"{path} ({len(table.entries)} signatures)" if table is not None else "none: the reference everywhere"


def _load_or_tune(cfg, model, device: torch.device) -> Table | None:
    if cfg.tune == "off":
        log.info("--tune off: the reference implementations everywhere")
        return None
    if cfg.tune != "auto":
        try:
            return read(Path(cfg.tune), device)
        except TableError as err:
            log.warning("%s: the reference implementations everywhere", err)
            return None
    if not can_tune(device):
        log.info("nothing to tune on %s: the reference implementations everywhere", device.type)
        return None
    path, started = default_path(device), time.perf_counter()
    try:
        table = tune([settings_from_config(cfg, model.spec, device)], device, path, progress=cfg.progress)
    except OSError as err:                  # e.g. a read-only cache folder: train, on the reference
        log.warning("dispatch table %s not written (%s): the reference implementations everywhere", path, err)
        return None
    log.info("dispatch table %s ready in %.1f s (%d signatures)", path, time.perf_counter() - started,
             len(table.entries))
    return table


__all__ = ["install_table", "MARGIN", "Settings", "Signature", "Table", "can_tune", "choose_entry", "enumerate_signatures",
           "prepare_for_training", "set_timer", "settings_from_config", "tune"]
