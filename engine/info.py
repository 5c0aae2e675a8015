"""`python -m engine.info`: versions, device and which backends are available (paste into bug reports)."""
from __future__ import annotations

import importlib.util
import platform

import torch

from engine.elastic import backend


def report() -> str:
    """A multi-line description of the environment."""
    lines = [f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}"]
    for pkg in ("triton", "torchvision", "nvidia.dali"):
        spec = importlib.util.find_spec(pkg.split(".")[0]) if "." not in pkg else None
        try:
            mod = __import__(pkg, fromlist=["__version__"]) if spec or "." in pkg else None
            lines.append(f"{pkg} {getattr(mod, '__version__', '?') if mod else 'not installed'}")
        except ImportError:
            lines.append(f"{pkg} not installed")
    lines.append(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu only'}")
    lines.append(f"requested backend: {backend.get_backend()}")
    for name in backend.BACKENDS:
        ok, why = backend.availability(name)
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
