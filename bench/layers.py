"""Per-layer micro-benchmarks on OFA-MobileNetV3 shapes: our Triton kernels ("ours") and, when built,
the CUDA C++ extension ("cuda") vs the reference (slice + copy + cuDNN) vs torch.compile of the
reference; forward and forward+backward; fp32 and bf16; channels-last.
Each row carries the minimal bytes and FLOPs so a time can be read against the roofline.

  python bench/layers.py                      # CUDA: every layer, JSON in bench/results/
  python bench/layers.py --device cpu         # smoke: the reference only, labelled CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Budget, environment, progress, time_ms, write_json  # noqa: E402
from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, backend, use_backend  # noqa: E402

# (name, layer factory, active setter, input channels, spatial, FLOPs/bytes per output element)
CASES = [
    # 224 px: stage 1 (24 -> x6 = 144 at 56x56), active expand 4 (96 channels)
    ("pw_expand_24to96_56px", lambda: ElasticConv2d(24, 144, 1), lambda m: m.set_active(96), 24, 56),
    ("pw_project_96to24_56px", lambda: ElasticConv2d(144, 24, 1), lambda m: m.set_active(24), 96, 56),
    ("pw_expand_112to448_14px", lambda: ElasticConv2d(112, 672, 1), lambda m: m.set_active(448), 112, 14),
    ("dw_k7_s1_96ch_56px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 1), lambda m: m.set_active(7), 96, 56),
    ("dw_k5_s2_96ch_56px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 2), lambda m: m.set_active(5), 96, 56),
    ("dw_k3_s1_448ch_14px", lambda: ElasticDepthwiseConv2d(672, (3, 5, 7), 1), lambda m: m.set_active(3), 448, 14),
    ("bn_hswish_96ch_56px", lambda: ElasticBatchNorm2d(144, act="h_swish"), lambda m: None, 96, 56),
    ("bn_relu_448ch_14px", lambda: ElasticBatchNorm2d(672, act="relu"), lambda m: None, 448, 14),
    # 32 px CIFAR variant: stage 1 at 32x32
    ("pw_expand_24to96_32px", lambda: ElasticConv2d(24, 144, 1), lambda m: m.set_active(96), 24, 32),
    ("dw_k7_s1_96ch_32px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 1), lambda m: m.set_active(7), 96, 32),
    ("bn_hswish_96ch_32px", lambda: ElasticBatchNorm2d(144, act="h_swish"), lambda m: None, 96, 32),
]


def _cost(layer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(FLOPs, minimal bytes) of one forward: inputs read once, output written once."""
    e = x.element_size()
    if isinstance(layer, ElasticConv2d):
        flops = 2 * y.numel() * x.shape[1]
        return flops, (x.numel() + y.numel() + y.shape[1] * x.shape[1]) * e
    if isinstance(layer, ElasticDepthwiseConv2d):
        k = layer.active_kernel_size
        return 2 * y.numel() * k * k, (x.numel() + y.numel()) * e
    return 6 * y.numel(), (x.numel() + y.numel()) * e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 128 (CUDA), 2 (CPU)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget; rows that would start after it are reported as skipped")
    p.add_argument("--out", metavar="DIR", help="write layers.json there (default bench/results/)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    budget = Budget(args.max_seconds)
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 2)
    variants = ["reference", "ours", "compiled"] if device.type == "cuda" else ["reference"]
    if device.type == "cuda" and backend.availability("cuda")[0]:
        variants.append("cuda")
    env, rows = environment(device), []
    payload = {"env": env, "rows": rows, "note": "" if device.type == "cuda" else "CPU smoke: reference only"}
    for name, make, activate, channels, size in CASES:
        for dtype_name in args.dtypes if device.type == "cuda" else ["float32"]:
            if budget.spent():
                rows.append({"layer": name, "dtype": dtype_name, "skipped": "--max-seconds budget spent"})
                progress(f"{name} {dtype_name}: skipped (budget spent)")
                continue
            dtype = getattr(torch, dtype_name)
            layer = make().to(device)
            activate(layer)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            x = x.to(memory_format=torch.channels_last).requires_grad_()
            layer = layer.to(dtype)
            with use_backend("torch"):
                y = layer(x)
            flops, nbytes = _cost(layer, x, y)
            row = {"layer": name, "dtype": dtype_name, "batch": batch, "flops": flops, "min_bytes": nbytes}
            for variant in variants:
                name_of_backend = {"ours": "triton", "cuda": "cuda"}.get(variant, "torch")
                fn = torch.compile(layer) if variant == "compiled" else layer
                dy = torch.randn_like(y)
                with use_backend(name_of_backend):
                    fwd = time_ms(lambda: fn(x), device, 10, 50, budget.deadline)
                    fwd_bwd = time_ms(lambda: torch.autograd.grad(fn(x), [x] + list(layer.parameters()), dy,
                                                                  allow_unused=True), device, 10, 50, budget.deadline)
                row[variant] = {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "fwd_GBps": nbytes / fwd / 1e6}
            for variant in variants[1:]:
                row[variant]["fwd_speedup"] = row["reference"]["fwd_ms"] / row[variant]["fwd_ms"]
                row[variant]["fwd_bwd_speedup"] = row["reference"]["fwd_bwd_ms"] / row[variant]["fwd_bwd_ms"]
            rows.append(row)
            progress(f"{name:28s} {dtype_name:8s} " + "  ".join(
                f"{v}: {row[v]['fwd_ms']:.3f}/{row[v]['fwd_bwd_ms']:.3f} ms" for v in variants))
            if not args.no_save:
                write_json("layers", payload, args.out)
    if not args.no_save:
        print("wrote", write_json("layers", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
