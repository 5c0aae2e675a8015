"""Side-by-side training-step throughput, peak memory and projected GPU-hours.

Variants, measured in one run on the same weights, batch, precision and sandwich configs:
  ofa         the public OFA code's dynamic ops (bench/ofa_reference.py: contiguous weight slices,
              F.conv2d, sliced BN), NCHW as shipped; gradients summed in .grad
  ofa_cl      the same in channels_last
  deps_masks  the DεpS code's aggregation: slice ops, per-subnet zero_grad and per-parameter gradient
              masks summed into an accumulator
  ours        this engine's default path (backend "auto"), sequential sandwich, gradients summed in .grad
  torch       this engine with backend "torch" (cuDNN/ATen on weight views)
  batched     the batched sandwich: all K subnets in one forward and one backward (engine/train/batched.py)
  compile_teacher  --compile teacher: the max net as one compiled graph (teacher phase only)
  compile_blocks   --compile blocks: every MBConv block compiled per (kernel, expand) variant
               (the compile variants run on a copy of the supernet; their compile time, the warm-up
               steps' time, is reported apart as compile_seconds)
for the OFA-MobileNetV3 32-px (CIFAR) and 224-px (ImageNet) supernets, teacher phase (max net) and
shrinking phase (K subnets). Ratios are against the faster of `ofa` and `ofa_cl`. GPU-hours of a full
DεpS run are projected from the measured step times and the spec's schedule.

Progress lines go to stdout as it measures; the JSON is rewritten after every measurement (a killed run
keeps what it measured). `--max-seconds` bounds the whole run: a measurement that would start after the
budget is spent is reported as skipped, and one under way stops repeating at the deadline.

  python bench/run_throughput.py                       # GPU: full table, JSON in bench/results/
  python bench/run_throughput.py --device cpu --steps 2 --nets cifar --batch 8   # CPU smoke
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Budget, environment, progress, write_json  # noqa: E402
from bench.ofa_reference import OFAReference  # noqa: E402
from engine.tune import install_table  # noqa: E402
from engine.elastic import use_backend  # noqa: E402
from engine.supernet import ofa_mobilenetv3  # noqa: E402
from engine.train.batched import BatchedSandwich, batched_step  # noqa: E402
from engine.train.losses import kd_loss, soft_labels  # noqa: E402
from engine.train.sandwich import sample_sandwich, sequential_step  # noqa: E402
from engine.timing import median_ms  # noqa: E402

NETS = {"cifar": ("cifar", 32, 256, 10), "imagenet": ("imagenet", 224, 128, 1000)}
# in the order they are measured (the most telling first, should the budget run out)
VARIANTS = ("ofa_cl", "ours", "torch", "batched", "ofa", "deps_masks", "compile_teacher", "compile_blocks")
BASELINES = ("ofa", "ofa_cl")
CPU_VARIANTS = ["ofa_cl", "ours", "batched", "deps_masks"]     # compiling takes minutes on a CPU
# spec schedule: (images per epoch, epochs E, teacher T, warm-up W, net); paper's reported costs
SCHEDULES = {"cifar10": (50_000, 200, 110, 5, "cifar"), "imagenet1k": (1_281_167, 270, 150, 5, "imagenet")}
PAPER = {"ofa_progressive_shrinking_imagenet1k_gpu_hours": 1200,
         "deps_vs_best_prior": "2.5x fewer GPU-hours (DεpS paper)"}


def masked_step(model, images, labels, cfgs, betas, acc, amp_dtype):
    """One sandwich step as the DεpS code aggregates it: per-subnet gradients, masked and summed."""
    for a in acc:
        a.zero_()
    params = list(model.parameters())
    targets = None
    for i, (cfg, beta) in enumerate(zip(cfgs, betas)):
        model.set_active_subnet(cfg)
        model.zero_grad(set_to_none=False)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        if i == 0:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
            targets = soft_labels(logits, 1.0)
        else:
            loss = kd_loss(logits, targets, 1.0)
        (loss * beta).backward()
        for p, a in zip(params, acc):
            if p.grad is not None:
                a.add_(p.grad * (p.grad != 0))                       # the per-parameter mask
    for p, a in zip(params, acc):
        if p.grad is not None:
            p.grad.copy_(a)


class _Setup:
    """One (net, phase): the supernet, a batch, the sandwich configs and an optimizer, shared by every variant."""

    def __init__(self, args, device: torch.device, net_name: str, phase: str) -> None:
        variant, self.resolution, default_batch, classes = NETS[net_name]
        self.batch = args.batch or default_batch
        torch.manual_seed(0)
        self.model = ofa_mobilenetv3(variant, num_classes=classes, dropout=0.0).to(device)
        self.images = torch.randn(self.batch, 3, self.resolution, self.resolution, device=device)
        self.labels = torch.randint(0, classes, (self.batch,), device=device)
        self.cfgs = sample_sandwich(self.model, phase, args.subnets, "random", torch.Generator().manual_seed(0))
        self.betas = [1.0] * len(self.cfgs)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.amp_dtype = torch.bfloat16 if args.amp else None
        self.acc = [torch.zeros_like(p) for p in self.model.parameters()]
        self.wrappers: dict[str, torch.nn.Module] = {}

    def step_fn(self, variant: str, channels_last: bool):
        """A callable running one optimizer step of `variant`, with the model and batch in the right layout."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        images = self.images.contiguous(memory_format=fmt)
        m, y, cfgs, betas, amp = self.model, self.labels, self.cfgs, self.betas, self.amp_dtype

        def run() -> None:
            self.opt.zero_grad(set_to_none=False)
            if variant in BASELINES:
                net = self.wrappers.setdefault("ofa", OFAReference(m))
                with use_backend("torch"):
                    sequential_step(m, net, images, y, cfgs, betas, 0.1, 1.0, None, amp)
            elif variant == "deps_masks":
                with use_backend("torch"):
                    masked_step(m, images, y, cfgs, betas, self.acc, amp)
            elif variant in ("ours", "torch"):
                with use_backend("auto" if variant == "ours" else "torch"):
                    sequential_step(m, m, images, y, cfgs, betas, 0.1, 1.0, None, amp)
            elif variant == "batched":
                net = self.wrappers.setdefault("batched", BatchedSandwich(m))
                batched_step(m, net, images, y, cfgs, betas, 0.1, 1.0, None, amp)
            else:
                self._compiled(variant).run(images)
            self.opt.step()

        return run

    def _compiled(self, variant: str) -> "_CompiledVariant":
        if variant not in self.wrappers:
            self.wrappers[variant] = _CompiledVariant(self, variant.removeprefix("compile_"))
        return self.wrappers[variant]


class _CompiledVariant:
    """A --compile mode on a copy of the supernet (compiling blocks changes them in place)."""

    def __init__(self, setup: "_Setup", mode: str) -> None:
        import copy

        from engine.train.compile import Compiler

        self.setup = setup
        self.model = copy.deepcopy(setup.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.phase = "teacher" if len(setup.cfgs) == 1 else "shrink"
        self.net = Compiler(self.model, mode, setup.images.device).net(self.phase, self.model)

    def run(self, images: torch.Tensor) -> None:
        s = self.setup
        self.opt.zero_grad(set_to_none=False)
        sequential_step(self.model, self.net, images.contiguous(memory_format=torch.channels_last), s.labels, s.cfgs,
                        s.betas, 0.1, 1.0, None, s.amp_dtype)
        self.opt.step()


def measure(args, device: torch.device, net_name: str, phase: str, budget: Budget, save) -> dict:
    setup = _Setup(args, device, net_name, phase)
    row = {"net": net_name, "phase": phase, "batch": setup.batch, "resolution": setup.resolution,
           "subnets": len(setup.cfgs)}
    save(row)
    for variant in args.variants:
        label = f"{net_name} {phase} {variant}"
        if budget.spent():
            row[variant] = {"skipped": "--max-seconds budget spent"}
            progress(f"{label}: skipped (budget spent)")
            continue
        if variant == "compile_teacher" and phase != "teacher":
            row[variant] = {"skipped": "teacher phase only"}
            continue
        progress(f"{label}: warm-up ({args.warmup} steps; compiles kernels on first use)")
        channels_last = variant != "ofa" and (args.channels_last or variant == "ofa_cl")
        run = setup.step_fn(variant, channels_last)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compile_s = None
        if variant.startswith("compile_"):                 # the warm-up compiles: timed apart
            t0 = time.perf_counter()
            median_ms(run, device, 0, max(args.warmup, 1))
            compile_s = time.perf_counter() - t0
            progress(f"{label}: compiled in {compile_s:.1f} s")
        with _profiler(args, f"{net_name}-{phase}-{variant}"):
            ms = median_ms(run, device, 0 if compile_s is not None else args.warmup, args.steps, budget.deadline)
        row[variant] = {"ms_per_step": ms, "images_per_s": setup.batch * 1e3 / ms,
                        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if compile_s is not None:
            row[variant]["compile_seconds"] = compile_s
        progress(f"{label}: {ms:.2f} ms/step, {row[variant]['images_per_s']:.1f} img/s")
        save(row)
    base = min((row[v]["ms_per_step"] for v in BASELINES if "ms_per_step" in row.get(v, {})), default=None)
    for variant in args.variants:
        if base and "ms_per_step" in row[variant]:
            row[variant]["speedup_vs_ofa"] = base / row[variant]["ms_per_step"]
    save(row)
    return row


def _profiler(args, name: str):
    if not args.profile:
        return contextlib.nullcontext()
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    return torch.profiler.profile(on_trace_ready=lambda p: p.export_chrome_trace(str(out / f"{name}.json")))


def project_gpu_hours(rows: list[dict], variants: list[str]) -> dict:
    """GPU-hours of a full DεpS run per variant: teacher epochs (T - W) at the teacher step time, the
    rest at the sandwich step time, images/epoch / batch steps each (ideal multi-GPU scaling)."""
    out = {}
    for dataset, (images, epochs, teacher, warmup, net) in SCHEDULES.items():
        by_phase = {r["phase"]: r for r in rows if r["net"] == net}
        if {"teacher", "shrink"} - set(by_phase):
            continue
        for variant in variants:
            t, s = by_phase["teacher"].get(variant, {}), by_phase["shrink"].get(variant, {})
            if "ms_per_step" not in t or "ms_per_step" not in s:
                continue
            steps = images / by_phase["teacher"]["batch"]
            hours = steps * ((teacher - warmup) * t["ms_per_step"] + (epochs - teacher + warmup) * s["ms_per_step"])
            out.setdefault(dataset, {})[variant] = hours / 1e3 / 3600
    return out


def table(rows: list[dict], variants: list[str]) -> list[str]:
    """Short text table: ms per step and speed-up against the faster OFA variant."""
    lines = [f"{'net':9s} {'phase':8s} {'K':>2s} {'batch':>5s} " + " ".join(f"{v:>20s}" for v in variants)]
    for r in rows:
        cells = []
        for v in variants:
            m = r.get(v, {})
            ratio = f"{m['speedup_vs_ofa']:5.2f}x" if "speedup_vs_ofa" in m else "     -"
            cells.append(f"{m['ms_per_step']:8.2f} ms {ratio}" if "ms_per_step" in m
                         else ("skipped" if "skipped" in m else "n/a"))
        lines.append(f"{r['net']:9s} {r['phase']:8s} {r['subnets']:2d} {r['batch']:5d} "
                     + " ".join(f"{c:>20s}" for c in cells))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--phases", nargs="+", default=["teacher", "shrink"], choices=["teacher", "shrink"])
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help=f"default: all on CUDA; {' '.join(CPU_VARIANTS)} on CPU (compiling takes minutes there)")
    p.add_argument("--batch", type=int, default=None, help="default 256 at 32 px, 128 at 224 px")
    p.add_argument("--subnets", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel compilation, dispatch)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget for the whole run; what does not fit is reported as skipped")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 (default on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's variants in channels_last (the ofa variants are fixed: NCHW and CL)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace per measurement")
    p.add_argument("--out", metavar="DIR", help="write throughput.json there (default bench/results/)")
    p.add_argument("--no-save", action="store_true", help="write no JSON")
    p.add_argument("--tune", metavar="PATH", default="auto",
                   help="dispatch table the engine's variants run with (python -m engine.tune): a file, 'auto' (this "
                        "device's cached table when there is one) or 'off' (the reference everywhere)")
    p.add_argument("--no-op-counts", action="store_true",
                   help="leave out the host-work and modelled-traffic figures (bench/op_counts.py: minutes on a CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = list(VARIANTS) if device.type == "cuda" else list(CPU_VARIANTS)
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    budget = Budget(args.max_seconds)
    env = environment(device)
    env["dispatch_table"] = install_table(args.tune, device)      # engine.tune
    label = "GPU" if device.type == "cuda" else "CPU (not comparable with GPU figures)"
    rows: list[dict] = []
    payload = {"env": env, "args": vars(args), "rows": rows, "paper": PAPER,
               "note": "" if device.type == "cuda" else "CPU timings are a smoke test, never to be compared with GPU ones"}

    def save(row: dict) -> None:
        if not any(r is row for r in rows):
            rows.append(row)
        payload["projected_hours"] = project_gpu_hours(rows, args.variants)
        if not args.no_save:
            write_json("throughput", payload, args.out)

    progress(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  amp={args.amp}  [{label}]")
    for net in args.nets:
        for phase in args.phases:
            measure(args, device, net, phase, budget, save)
    if args.no_op_counts:
        payload["host_work_and_traffic"] = {"skipped": "--no-op-counts"}
    elif budget.spent():
        payload["host_work_and_traffic"] = {"skipped": "--max-seconds budget spent"}
    else:
        from bench.op_counts import all_counts

        counts = payload["host_work_and_traffic"] = all_counts()   # fake tensors at b128, 224 px (bench/op_counts.py)
        shrink = counts["phases"]["shrink"]
        progress("shrink step, launches per step: " + ", ".join(f"{k} {v['launches']}" for k, v in shrink.items())
                 + "; modelled GB: " + ", ".join(f"{k} {v['gb']:.0f}" for k, v in shrink.items()))
    print("\n".join(table(rows, args.variants)))
    for dataset, per_variant in payload["projected_hours"].items():
        print(f"projected {label} hours, full DεpS on {dataset}: "
              + ", ".join(f"{v} {h:,.1f}" for v, h in per_variant.items()))
    if not args.no_save:
        print("wrote", write_json("throughput", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
