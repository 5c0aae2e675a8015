"""The run folder (--out): one run at a time, an id per run, room for its checkpoints, no stale files.

Rank 0 holds an exclusive advisory lock (flock) on <out>/.lock for the run's life; the file names the
holder (run id, PID, host, start time) so a second run can say who is using the folder. The kernel
drops a flock when its process dies, so a lock left by a killed run is taken over (and said so).
Because only the lock holder writes checkpoints, any `.checkpoint.pt.tmp<pid>` found after taking the
lock is the remains of a dead writer and is removed.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from engine.errors import BadInput

log = logging.getLogger("engine.train")
LOCK_NAME = ".lock"
MIB = 2 ** 20


def new_run_id() -> str:
    """A fresh run id: UTC start time and 6 random hex digits, e.g. 20261203-201502-a3f09c."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class RunLock:
    """Exclusive lock on a run folder, held from `acquire` until `release` (or the process's end)."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.path, self.run_id, self._fd = out / LOCK_NAME, run_id, None

    def acquire(self) -> None:
        """Take the lock; BadInput naming the holder when a live run holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise BadInput(f"--out {self.path.parent}: cannot create its lock file ({err.strerror})") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_fd(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BadInput(f"--out {self.path.parent}: cannot lock {self.path} ({err.strerror})") from err
            raise BadInput(f"--out {self.path.parent} is in use by another run ({_describe(holder)}); wait for it "
                           "to end or choose another --out") from err
        previous = _read_fd(fd)
        if previous:
            log.warning("taking over %s: its holder (%s) is no longer running", self.path, _describe(previous))
        me = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file (a clean end: the next run has nothing to take over) and unlock it.
        The file stays: unlinking it would let a waiting process lock an orphaned inode."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass                             # a full or read-only disk: the next run takes the lock over
            os.close(self._fd)
            self._fd = None


def _read_fd(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown"
    return f"run {holder.get('run_id')}, PID {holder['pid']} on {holder.get('host')}, started {holder.get('started')}"


def create(out: Path) -> None:
    """Create --out (and its parents) and check a file can be written in it; BadInput otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"--out {out}: cannot create the folder ({err.strerror or err})") from err
    probe = out / f".write-test{os.getpid()}"
    try:
        probe.write_bytes(b"x")
    except OSError as err:
        raise BadInput(f"--out {out} is not writable ({err.strerror or err})") from err
    finally:
        probe.unlink(missing_ok=True)


def check_free_space(out: Path, checkpoint_bytes: int, existing: Path | None) -> None:
    """BadInput unless --out has room for two checkpoints (a new one is written beside the old one,
    then renamed over it); an `existing` checkpoint there already holds one of the two."""
    held = existing.stat().st_size if existing is not None and existing.is_file() else 0
    need = 2 * checkpoint_bytes - held
    free = shutil.disk_usage(out).free
    if free < need:
        raise BadInput(f"--out {out}: {free / MIB:.1f} MiB free, the run needs {need / MIB:.1f} MiB (room for two "
                       f"checkpoints of about {checkpoint_bytes / MIB:.1f} MiB); free some space or choose another "
                       "--out")


def remove_stale_temporaries(out: Path, name: str = "checkpoint.pt") -> None:
    """Remove `.<name>.tmp<pid>` files of other processes (call with the lock held: no one else writes)."""
    for tmp in out.glob(f".{name}.tmp*"):
        if tmp.name != f".{name}.tmp{os.getpid()}":
            tmp.unlink(missing_ok=True)
            log.warning("removed %s, a partial checkpoint left by a process that died while writing it", tmp)


# what a run writes into its folder (besides the lock); moved together when set aside
RUN_FILES = ("checkpoint.pt", "config.json", "steps.csv", "gpu_hours.json", "cpu_hours.json", "summary.json",
             "pareto.csv", "pareto.png", "ddp_check.json", "skipped_files.txt", "tb")


def folder_owner(out: Path) -> str | None:
    """The run id of the run files in `out` (from its config.json), "unknown" when they carry none,
    None when `out` holds no run files."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    try:
        run_id = json.loads((out / "config.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        run_id = None
    return run_id if isinstance(run_id, str) and run_id else "unknown"


def move_aside(out: Path, owner: str) -> Path:
    """Move the run files of run `owner` into a new <out>/set-aside-<owner>[-n]/ folder; returns it."""
    dest, n = out / f"set-aside-{owner}", 1
    while dest.exists():
        dest, n = out / f"set-aside-{owner}-{n}", n + 1
    dest.mkdir()
    for name in RUN_FILES:
        if (out / name).exists():
            os.replace(out / name, dest / name)
    log.warning("moved the files of run %s in %s to %s", owner, out, dest)
    return dest
