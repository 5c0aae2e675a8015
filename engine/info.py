"""`python -m engine.info [--table PATH]`: versions, device, which backends are available, and the dispatch
table in use (default: the one `--tune auto` reads for this device): signatures per backend and the
summed time of the chosen implementations against all-reference (the speed-up the table claims).
Paste into bug reports."""
from __future__ import annotations

import argparse
import platform
from importlib import metadata
from pathlib import Path

import torch

from engine.elastic import backend


def table_summary(path: Path, device: torch.device) -> list[str]:
    """Lines describing the table at `path` (or why it cannot be used)."""
    from engine.tune.table import TableError, read

    try:
        table = read(path, device)
    except TableError as err:
        return [f"dispatch table: none usable ({err})"]
    per_backend: dict[str, int] = {}
    chosen = reference = 0.0
    for entry in table.entries.values():
        per_backend[entry["choice"]] = per_backend.get(entry["choice"], 0) + 1
        ms = entry["ms"]
        if "torch" in ms and entry["choice"] in ms:
            chosen, reference = chosen + ms[entry["choice"]], reference + ms["torch"]
    lines = [f"dispatch table {path}: {len(table.entries)} signatures, tuned in {table.seconds:.1f} s",
             "  per backend: " + ", ".join(f"{k} {v}" for k, v in sorted(per_backend.items()))]
    if reference:
        lines.append(f"  summed forward+backward ms: chosen {chosen:.3f} vs all-reference {reference:.3f} "
                     f"(claimed speed-up {reference / chosen:.3f}x)")
    lines += [f"  note: {n}" for n in table.notes[:20]]
    return lines


def report(table: Path | None = None) -> str:
    """A multi-line description of the environment and the dispatch table."""
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}"]
    for dist in ("triton", "torchvision", "nvidia-dali-cuda130", "onnxruntime"):     # setup.py's packages
        try:
            lines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist} not installed")
    lines.append(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu only'}")
    lines.append(f"requested backend: {backend.get_backend()}")
    for name in backend.BACKENDS:
        ok, why = backend.availability(name)
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    from engine.tune.table import default_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "\n".join(lines + table_summary(table or default_path(device), device))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m engine.info", description=__doc__.split("\n")[0])
    parser.add_argument("--table", type=Path, help="dispatch table file (default: the cache table for this device)")
    print(report(parser.parse_args().table))
