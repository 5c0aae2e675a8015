"""The tuned dispatch table on disk: read (with one warning line for a missing, corrupt, foreign-device
or foreign-version file), write (atomically), its default place, and its broadcast to every rank.

File (JSON): {"format", "device", "versions": {torch, triton, cuda, engine, driver}, "settings": [the
settings it covers], "notes": [failed candidates, ...], "seconds": tuning time,
"entries": {signature: {"choice": backend, "ms": {backend: median ms forward + backward}}}}.
An entry's `ms` holds every candidate that ran; a candidate that failed is absent (and named in notes).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("engine.tune")
FORMAT = 2


class TableError(ValueError):
    """A table that cannot be used (unreadable, corrupt, or for another device or versions)."""


@dataclass
class Table:
    device: str
    versions: dict[str, str]
    settings: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    entries: dict[str, dict] = field(default_factory=dict)

    def choices(self) -> dict[str, str]:
        """signature -> chosen backend (what dispatch.install takes)."""
        return {sig: entry["choice"] for sig, entry in self.entries.items()}

    def to_json(self) -> dict:
        return {"format": FORMAT, "device": self.device, "versions": self.versions, "settings": self.settings,
                "notes": self.notes, "seconds": round(self.seconds, 3), "entries": self.entries}


def device_name(device: torch.device) -> str:
    real_cuda = device.type == "cuda" and torch.cuda.is_available()   # else a fake CUDA device: no runtime
    return torch.cuda.get_device_name(device) if real_cuda else device.type


def versions() -> dict[str, str]:
    """What a table's timings depend on besides the device."""
    import engine

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "engine": engine.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "none"
    out["driver"] = _driver_version()
    return out


def _driver_version() -> str:
    if not torch.cuda.is_available():
        return "none"
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unusable: the CUDA runtime's view
        return "cuda-runtime " + str(torch.version.cuda)


def new_table(device: torch.device) -> Table:
    return Table(device_name(device), versions())


def default_path(device: torch.device) -> Path:
    """$ENGINE_CACHE_DIR (default ~/.cache/engine)/dispatch-<device>.json."""
    root = Path(os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "engine")
    return root / f"dispatch-{re.sub(r'[^A-Za-z0-9_.-]+', '_', device_name(device))}.json"


def read(path: Path, device: torch.device) -> Table:
    """The table at `path` for `device`; TableError (one line) if it is missing, corrupt or foreign."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise TableError(f"dispatch table {path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise TableError(f"dispatch table {path} is not a format-{FORMAT} table")
    mine = new_table(device)
    if data.get("device") != mine.device or data.get("versions") != mine.versions:
        raise TableError(f"dispatch table {path} was written for {data.get('device')} {data.get('versions')}, "
                         f"not {mine.device} {mine.versions}")
    entries = {k: v for k, v in data["entries"].items()
               if isinstance(v, dict) and isinstance(v.get("choice"), str) and isinstance(v.get("ms"), dict)}
    try:
        return Table(mine.device, mine.versions, list(data.get("settings", [])), list(data.get("notes", [])),
                     float(data.get("seconds", 0.0)), entries)
    except (TypeError, ValueError) as err:          # valid JSON, malformed fields
        raise TableError(f"dispatch table {path} is malformed ({err})") from None


def read_or_none(path: Path, device: torch.device) -> Table | None:
    """`read`, or None with one warning line (a missing file: None, silently)."""
    if not Path(path).exists():
        return None
    try:
        return read(path, device)
    except TableError as err:
        log.warning("%s: ignored", err)
        return None


def write(table: Table, path: Path) -> None:
    """Write `table` to `path` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1, sort_keys=True))
    tmp.replace(path)

