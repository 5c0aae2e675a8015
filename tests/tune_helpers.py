"""Timers and a rank worker for tests/test_tune.py, in a module light enough for spawned processes to
import quickly (what they need is imported inside)."""
import json
import os
from pathlib import Path

CALLS: list[str] = []


def torch_wins(name, run, device):
    CALLS.append(name)
    return {"torch": 1.0, "triton": 2.0, "cuda": 3.0}[name]


def triton_wins(name, run, device):
    return 0.5 if name == "triton" else 1.0


def triton_fails(name, run, device):
    if name == "triton":
        raise RuntimeError("kernel exploded")
    return 1.0


def triton_dies_once(name, run, device):
    """The process dies (as on a kernel fault) the first time a Triton candidate is timed."""
    marker = Path(os.environ["KILL_MARKER"])
    if name == "triton" and not marker.exists():
        marker.write_text("")
        os._exit(7)
    return 1.0


def tune_on_rank(rank: int, init: str, cache: str, result: str) -> None:
    """Rank `rank` of 2 (gloo): prepare the table with a timer of its own, write the installed choices."""
    from types import SimpleNamespace

    import torch

    from engine import tune
    from engine.elastic import dispatch
    from engine.supernet import SupernetSpec

    os.environ["ENGINE_CACHE_DIR"] = cache + str(rank)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tune.isolate = False
    tune.set_timer("tune_helpers:triton_wins" if rank == 0 else "tune_helpers:torch_wins")
    spec = SupernetSpec(variant="cifar", width_mult=0.25, kernel_sizes=(3,), expand_ratios=(3,), depths=(1,))
    cfg = SimpleNamespace(tune="auto", method="deps", epochs=2, teacher_epochs=1, warmup_epochs=0.5,
                          sampler="random", batch_size=2, resolution=8, amp=False, channels_last=False,
                          sandwich="sequential", subnets=2, progress=False, backend="auto")
    tune.prepare_for_training(cfg, SimpleNamespace(spec=spec), torch.device("cpu"))
    Path(result + str(rank)).write_text(json.dumps(dispatch.installed()))
    torch.distributed.destroy_process_group()
