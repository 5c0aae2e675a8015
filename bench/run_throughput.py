"""Side-by-side training-step throughput, peak memory and projected GPU-hours.

Variants, measured in one run on the same batch, precision and sandwich:
  reference  OFA/DεpS-style: PyTorch slice (+ implicit copy) ops, per-subnet zero_grad and
             per-parameter mask aggregation of the gradients
  ours       our elastic layers (backend "auto": Triton kernels on CUDA), sequential sandwich,
             gradients summed in .grad (no masks)
  compiled   torch.compile of the reference layers (one graph per subnet config, compiled in warm-up)
  batched    the batched sandwich: all K subnets in one forward and one backward (engine/train/batched.py)
for the OFA-MobileNetV3 32-px (CIFAR) and 224-px (ImageNet) supernets, teacher phase (max net) and
shrinking phase (K subnets). Ratios are against the reference variant. GPU-hours of a full DεpS run
are projected from the measured step times and the spec's schedule.

  python bench/run_throughput.py                       # GPU: full table, JSON in bench/results/
  python bench/run_throughput.py --device cpu --steps 2 --nets cifar --batch 8   # CPU smoke
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, time_ms, write_json  # noqa: E402
from engine.elastic import use_backend  # noqa: E402
from engine.supernet import ofa_mobilenetv3  # noqa: E402
from engine.train.losses import kd_loss, soft_labels  # noqa: E402
from engine.train.batched import BatchedSandwich, batched_step  # noqa: E402
from engine.train.sandwich import sample_sandwich, sequential_step  # noqa: E402

NETS = {"cifar": ("cifar", 32, 256, 10), "imagenet": ("imagenet", 224, 128, 1000)}
VARIANTS = ("reference", "ours", "compiled", "batched")
# spec schedule: (images per epoch, epochs E, teacher T, warm-up W, net); paper's reported costs
SCHEDULES = {"cifar10": (50_000, 200, 110, 5, "cifar"), "imagenet1k": (1_281_167, 270, 150, 5, "imagenet")}
PAPER = {"ofa_progressive_shrinking_imagenet1k_gpu_hours": 1200,
         "deps_vs_best_prior": "2.5x fewer GPU-hours (DεpS paper)"}


def reference_step(model, images, labels, cfgs, betas, acc, amp_dtype):
    """One sandwich step as the reference code does it: per-subnet gradients, masked and summed."""
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


def measure(args, device, net_name: str, phase: str, env_rows: list) -> dict:
    variant_name, res, default_batch, classes = NETS[net_name]
    batch = args.batch or default_batch
    torch.manual_seed(0)
    model = ofa_mobilenetv3(variant_name, num_classes=classes, dropout=0.0).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, res, res, device=device)
    if args.channels_last:
        images = images.to(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    cfgs = sample_sandwich(model, phase, args.subnets, "random", torch.Generator().manual_seed(0))
    betas = [1.0] * len(cfgs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp_dtype = torch.bfloat16 if args.amp else None
    acc = [torch.zeros_like(p) for p in model.parameters()]
    compiled, batched = None, BatchedSandwich(model)
    row = {"net": net_name, "phase": phase, "batch": batch, "resolution": res, "subnets": len(cfgs)}

    def run(variant: str):
        opt.zero_grad(set_to_none=False)
        if variant == "reference":
            with use_backend("torch"):
                reference_step(model, images, labels, cfgs, betas, acc, amp_dtype)
        elif variant == "ours":
            sequential_step(model, model, images, labels, cfgs, betas, 0.1, 1.0, None, amp_dtype)
        elif variant == "batched":
            batched_step(model, batched, images, labels, cfgs, betas, 0.1, 1.0, None, amp_dtype)
        else:
            with use_backend("torch"):
                sequential_step(model, compiled, images, labels, cfgs, betas, 0.1, 1.0, None, amp_dtype)
        opt.step()

    for variant in args.variants:
        if variant == "compiled" and compiled is None:
            compiled = torch.compile(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prof = _profiler(args, f"{net_name}-{phase}-{variant}")
        with prof:
            ms = time_ms(lambda: run(variant), device, args.warmup, args.steps)
        row[variant] = {"ms_per_step": ms, "images_per_s": batch * 1e3 / ms,
                        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    base = row.get("reference", {}).get("ms_per_step")
    for variant in args.variants:
        if base and "ms_per_step" in row[variant]:
            row[variant]["speedup_vs_reference"] = base / row[variant]["ms_per_step"]
    env_rows.append(row)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="default: all on CUDA; reference, ours and batched on CPU (compiling takes minutes there)")
    p.add_argument("--batch", type=int, default=None, help="default 256 at 32 px, 128 at 224 px")
    p.add_argument("--subnets", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 (default on CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace per measurement")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.variants is None:
        args.variants = list(VARIANTS) if device.type == "cuda" else ["reference", "ours", "batched"]
    if "reference" not in args.variants:
        args.variants.insert(0, "reference")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    env = environment(device)
    rows: list[dict] = []
    for net in args.nets:
        for phase in ("teacher", "shrink"):
            measure(args, device, net, phase, rows)
    hours = project_gpu_hours(rows, args.variants)
    label = "GPU" if device.type == "cuda" else "CPU (not comparable with GPU figures)"
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  amp={args.amp}  [{label}]")
    print(f"{'net':9s} {'phase':8s} {'K':>2s} {'batch':>5s} " + " ".join(f"{v:>22s}" for v in args.variants))
    for r in rows:
        cells = []
        for v in args.variants:
            m = r[v]
            cells.append(f"{m['images_per_s']:9.1f} img/s {m.get('speedup_vs_reference', 1):5.2f}x"
                         if "ms_per_step" in m else f"{'n/a':>22s}")
        print(f"{r['net']:9s} {r['phase']:8s} {r['subnets']:2d} {r['batch']:5d} " + " ".join(f"{c:>22s}" for c in cells))
    for dataset, per_variant in hours.items():
        print(f"projected {label} hours, full DεpS on {dataset}: "
              + ", ".join(f"{v} {h:,.1f}" for v, h in per_variant.items()))
    payload = {"env": env, "args": vars(args), "rows": rows, "projected_hours": hours, "paper": PAPER,
               "note": "CPU timings are a smoke test, never to be compared with GPU ones" if device.type != "cuda" else ""}
    if not args.no_save:
        print("wrote", write_json("throughput", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
