"""Host work and modelled memory traffic of one training step, every path and both anchors measured in
the same run, the same way.

Setup: OFA-MobileNetV3 imagenet supernet (1000 classes), batch 128, 224 px, bf16 autocast,
channels_last; the shrink step is 4 subnets from sample_sandwich(..., "random", Generator().manual_seed(0)),
the teacher step the max net alone; counted on the second step (the first one warms the choices up).
Everything runs on fake tensors (FakeTensorMode, CPU device, CPU autocast's bf16 policy): shapes and
dtypes are the real ones, no data is computed, so the real size costs seconds. Paths:
  reference     the engine's PyTorch reference ops (backend "torch")
  fast          the fast path (backend "triton"), sequential sandwich; fast_batched: the batched one
  ofa           anchor: OFA-style dynamic ops (bench/ofa_reference.py)
  static        anchor: the same configs exported as static subnets (model.export_active_subnet())
Figures per step:
  host_ops      every op reaching the dispatcher (metadata queries, prim.*, left out), including the
                aten ops a custom op's launcher runs (its Python implementation is run under the counter)
  launches      device kernels: aten ops that are not views or allocations, plus one per Triton kernel
                launch (counted at the launcher boundary: the kernel objects are replaced by counters)
  host_syncs    Tensor.item / .cpu / .tolist / .nonzero calls (on a GPU each waits for the device)
  gb            modelled HBM traffic: each op's input + output bytes (views and allocations excluded;
                a custom op counts its own inputs and outputs once, its inner launcher ops not at all)
  roofline_ms   gb at the HBM bandwidth of an H200 (4.8 TB/s) and an H100 (3.35 TB/s): the time an
                unfused, bandwidth-bound step would take
The fast path's "launches + host ops" is compared with the static subnets' host ops (target: <=), its
shrink traffic with the OFA-style ops' (target: <= 0.6x).

  python bench/op_counts.py [--batch 128 --resolution 224]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYNC_METHODS = ("item", "cpu", "tolist", "nonzero")
HBM_BYTES_PER_S = {"h200": 4.8e12, "h100": 3.35e12}
ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
               "aten.new_empty.default", "aten.new_empty_strided.default"}
PATHS = ("reference", "fast", "fast_batched", "ofa", "static")


def _is_view(func) -> bool:
    """An op whose output aliases an input without writing it (view, permute, t, detach, ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _bytes(tree) -> int:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class StepMeter(TorchDispatchMode):
    """Counts host ops, device launches and modelled bytes (see the module's docstring) by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ops, self.launches, self.bytes = Counter(), Counter(), Counter()
        self._depth = 0                                    # > 0: inside a custom op's launcher

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import _maybe_get_opdef

        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("prim."):
            return func(*args, **kwargs)
        self.host_ops[name] += 1
        opdef = _maybe_get_opdef(func) if func.namespace == "engine" else None
        if opdef is not None:                              # run the launcher itself, under this counter
            self._depth += 1
            try:
                with self:
                    out = opdef._init_fn(*args, **kwargs)
            finally:
                self._depth -= 1
        else:
            out = func(*args, **kwargs)
        moves = name not in ALLOCATIONS and not _is_view(func)
        if moves and opdef is None:
            self.launches[name] += 1
        if moves and self._depth == 0:
            self.bytes[name] += _bytes((args, kwargs, out))
        return out


class _LaunchCounter:
    """Stands in for a Triton kernel: `kernel[grid](...)` counts one launch and runs nothing."""

    def __init__(self, name: str, counts: Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.counts.update([f"triton.{self.name}"])


@contextlib.contextmanager
def counting_launches(counts: Counter):
    """Replace every Triton kernel of the engine's kernel modules by a launch counter."""
    import engine.kernels.batchnorm as kbn
    import engine.kernels.depthwise as kdw
    import engine.kernels.pointwise as kpw

    saved = [(mod, name, obj) for mod in (kbn, kdw, kpw) for name, obj in vars(mod).items()
             if name.endswith("_kernel") and hasattr(obj, "__getitem__")]
    for mod, name, _ in saved:
        setattr(mod, name, _LaunchCounter(name, counts))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


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


class StaticSubnets(torch.nn.Module):
    """The anchor: each config exported as a static nn.Sequential; runs the one for the supernet's
    active config (sequential_step sets it before each forward)."""

    def __init__(self, model, cfgs: list[dict]) -> None:
        super().__init__()
        self.model = model
        self.index = {}
        nets = []
        for cfg in cfgs:
            model.set_active_subnet(cfg)
            self.index[json.dumps(model.active_config(), sort_keys=True)] = len(nets)
            nets.append(model.export_active_subnet())
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.nets[self.index[json.dumps(self.model.active_config(), sort_keys=True)]](images)


@contextlib.contextmanager
def _interpreter_backend():
    """Lets the Triton kernels be chosen for CPU tensors (TRITON_INTERPRET=1; nothing is launched)."""
    from engine.elastic import backend

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    backend.availability.cache_clear()
    quiet = logging.getLogger("engine.backend")        # "no kernel for the 3x3 stem": expected, not news
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        backend.availability.cache_clear()


def _runner(path: str, model, cfgs: list[dict], x: torch.Tensor, y: torch.Tensor):
    """The step function of `path` (amp bf16, no loss scaler)."""
    from bench.ofa_reference import OFAReference
    from engine.train.batched import BatchedSandwich, batched_step
    from engine.train.sandwich import sequential_step

    betas = [1.0] + [0.5] * (len(cfgs) - 1)
    net = {"ofa": OFAReference, "fast_batched": BatchedSandwich}.get(path, lambda m: m)(model)
    if path == "static":
        net = StaticSubnets(model, cfgs)
    fn = batched_step if path == "fast_batched" else sequential_step
    return lambda: fn(model, net, x, y, cfgs, betas, 0.1, 1.0, None, torch.bfloat16)


def measure(path: str, phase: str = "shrink", batch: int = 128, resolution: int = 224,
            net: str = "imagenet", subnets: int = 4, **supernet: object) -> dict:
    """One step of `phase` on `path` (see the module docstring): host_ops, launches, host_syncs, gb,
    roofline_ms and the per-op breakdowns (Counters by op name: host_ops, launches, bytes).
    `supernet`: extra ofa_mobilenetv3 arguments (tests: a smaller space)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.elastic import use_backend
    from engine.supernet import ofa_mobilenetv3
    from engine.train.sandwich import sample_sandwich

    torch.manual_seed(0)
    model = ofa_mobilenetv3(net, num_classes=1000 if net == "imagenet" else 10, dropout=0.0, **supernet)
    model = model.to(memory_format=torch.channels_last)
    n = subnets if phase == "shrink" else 1
    cfgs = sample_sandwich(model, "shrink", n, "random", torch.Generator().manual_seed(0)) if n > 1 else []
    if not cfgs:
        model.set_max_net()
        cfgs = [model.active_config()]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    meter, triton_launches = StepMeter(), Counter()
    with _interpreter_backend(), mode, use_backend("triton" if path.startswith("fast") else "torch"):
        model = model._apply(mode.from_tensor)
        x = torch.randn(batch, 3, resolution, resolution).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000 if net == "imagenet" else 10, (batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run = _runner(path, model, cfgs, x, y)
            run()
            with counting_launches(triton_launches), count_syncs() as syncs, meter:
                run()
    meter.launches.update(triton_launches)
    gb = sum(meter.bytes.values()) / 1e9
    return {"host_ops": sum(meter.host_ops.values()), "launches": sum(meter.launches.values()),
            "triton_launches": sum(triton_launches.values()), "host_syncs": sum(syncs.values()), "gb": gb,
            "roofline_ms": {gpu: 1e3 * gb * 1e9 / bw for gpu, bw in HBM_BYTES_PER_S.items()},
            "by_op": {"host_ops": meter.host_ops, "launches": meter.launches, "bytes": meter.bytes}}


def biggest(by_bytes: Counter, n: int = 6) -> list[list]:
    """The n op types moving the most bytes: [[op, GB], ...]."""
    return [[op, round(b / 1e9, 2)] for op, b in by_bytes.most_common(n)]


def all_counts(batch: int = 128, resolution: int = 224) -> dict:
    """The figures the benchmarks report, per phase and path, with the targets checked in the same run."""
    out: dict = {"setup": f"imagenet supernet, batch {batch}, {resolution} px, bf16 autocast, channels_last, "
                          "fake tensors", "phases": {}}
    for phase in ("teacher", "shrink"):
        rows = {}
        for path in PATHS:
            if path == "fast_batched" and phase == "teacher":
                continue
            m = measure(path, phase, batch, resolution)
            rows[path] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in m.items() if k != "by_op"}
            rows[path]["roofline_ms"] = {g: round(v, 1) for g, v in m["roofline_ms"].items()}
            rows[path]["biggest_gb"] = biggest(m["by_op"]["bytes"])
        out["phases"][phase] = rows
    shrink = out["phases"]["shrink"]
    out["targets"] = {
        "fast_launches_plus_host_ops_vs_static_host_ops":
            [shrink["fast"]["launches"] + shrink["fast"]["host_ops"], shrink["static"]["host_ops"]],
        "fast_shrink_gb_over_ofa_gb (target <= 0.6)": round(shrink["fast"]["gb"] / shrink["ofa"]["gb"], 3),
        "fast_batched_shrink_gb_over_ofa_gb": round(shrink["fast_batched"]["gb"] / shrink["ofa"]["gb"], 3),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--json", metavar="FILE", help="also write the figures there")
    args = p.parse_args(argv)
    counts = all_counts(args.batch, args.resolution)
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1))
    print(counts["setup"])
    for phase, rows in counts["phases"].items():
        for path, r in rows.items():
            print(f"{phase:7s} {path:12s} host ops {r['host_ops']:6d}  launches {r['launches']:6d} "
                  f"(triton {r['triton_launches']})  syncs {r['host_syncs']}  {r['gb']:7.1f} GB  "
                  f"{r['roofline_ms']['h200']:6.1f} ms @H200  {r['roofline_ms']['h100']:6.1f} ms @H100")
            print(f"        biggest: {r['biggest_gb']}")
    print("targets:", json.dumps(counts["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
