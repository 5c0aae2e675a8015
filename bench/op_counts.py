"""Dispatched ops and host syncs of one 4-subnet sandwich step: how much host work a step costs.

Setup (as the anchors were measured): OFA-MobileNetV3 imagenet supernet at 32 px, batch 2,
channels_last, configs from sample_sandwich(..., "random", Generator().manual_seed(0)), one step after
a warm-up step. Every op that reaches the dispatcher is counted with a TorchDispatchMode (metadata
queries, prim.*, are not ops). Paths:
  reference  the engine's PyTorch reference ops (backend "torch"), real CPU tensors
  fast       the GPU fast path (backend "triton"): fake tensors on the CPU, so each custom op runs its
             fake kernel (TRITON_INTERPRET=1 lets the kernels be chosen for CPU tensors; nothing runs)
  ofa        the public OFA code's dynamic ops (bench/ofa_reference.py), for comparison
Host syncs: calls of Tensor.item / .cpu / .tolist / .nonzero during the step (on a GPU each waits for
the device). Anchors measured the same way: the public OFA code 6,312 ops; the same configs as
exported static subnets 4,746.

  python bench/op_counts.py          # prints the counts
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ANCHORS = {"public_ofa_code": 6312, "exported_static_subnets": 4746}
SYNC_METHODS = ("item", "cpu", "tolist", "nonzero")


class OpCounter(TorchDispatchMode):
    """Counts the ops reaching the dispatcher, by name (prim.* metadata queries left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if not name.startswith("prim."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def count_syncs():
    """Counts host-sync calls (Tensor.item/.cpu/.tolist/.nonzero) made in the block: yields a Counter."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def step_counts(path: str = "reference", step: str = "sequential") -> dict:
    """{"ops": total, "syncs": total, "by_op": Counter} of one 4-subnet step on `path`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.ofa_reference import OFAReference
    from engine.elastic import use_backend
    from engine.supernet import ofa_mobilenetv3
    from engine.train.batched import BatchedSandwich, batched_step
    from engine.train.sandwich import sample_sandwich, sequential_step

    torch.manual_seed(0)
    model = ofa_mobilenetv3("imagenet", num_classes=10, dropout=0.0).to(memory_format=torch.channels_last)
    cfgs = sample_sandwich(model, "shrink", 4, "random", torch.Generator().manual_seed(0))
    fake = path == "fast"
    previous = os.environ.get("TRITON_INTERPRET")
    if fake:
        os.environ["TRITON_INTERPRET"] = "1"          # lets the kernels be chosen for CPU tensors
        from engine.elastic import backend

        backend.availability.cache_clear()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    quiet = logging.getLogger("engine.backend")        # "no kernel for the 3x3 stem": expected, not news
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with mode, use_backend("triton" if fake else "torch"):
            x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (2,))
            if step == "batched":
                net = BatchedSandwich(model)
                run = lambda: batched_step(model, net, x, y, cfgs, [1.0] * 4, 0.1, 1.0, None, None)  # noqa: E731
            else:
                net = OFAReference(model) if path == "ofa" else model
                run = lambda: sequential_step(model, net, x, y, cfgs, [1.0] * 4, 0.1, 1.0, None, None)  # noqa: E731
            run()
            with count_syncs() as syncs, OpCounter() as counter:
                run()
    finally:
        quiet.setLevel(level)
        if fake:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
            backend.availability.cache_clear()
    return {"ops": counter.total, "syncs": sum(syncs.values()), "by_op": counter.ops}


def all_counts() -> dict:
    """The counts the benchmarks report: each path's ops and syncs, with the anchors."""
    out = {"anchors": ANCHORS}
    for path in ("reference", "fast", "ofa"):
        counts = step_counts(path)
        out[path] = {"ops": counts["ops"], "host_syncs": counts["syncs"]}
    return out


def main() -> int:
    counts = all_counts()
    for path in ("reference", "fast", "ofa"):
        print(f"{path:9s} {counts[path]['ops']:6d} ops, {counts[path]['host_syncs']} host syncs per 4-subnet step")
    print(f"anchors: public OFA code {ANCHORS['public_ofa_code']}, exported static subnets "
          f"{ANCHORS['exported_static_subnets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
