"""`python -m engine.info`: versions, device, which backends are available and the measured backend
choices cached for this device (paste into bug reports)."""
from __future__ import annotations

import platform
from importlib import metadata

import torch

from engine.elastic import backend


def report() -> str:
    """A multi-line description of the environment."""
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
    from engine.elastic.dispatch import DISPATCHER

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entries = DISPATCHER.entries(device)
    lines.append(f"measured choices ({len(entries)}, {DISPATCHER.path(DISPATCHER.device_name(device))}):")
    for key, entry in sorted(entries.items()):
        timings = ", ".join(f"{k} {v:.4f}" for k, v in sorted(entry.get("ms", {}).items()))
        lines.append(f"  {key}: {entry['choice']}  (ms: {timings})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
