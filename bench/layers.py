"""Per-layer micro-benchmarks on OFA-MobileNetV3 shapes, forward and forward+backward, fp32 and bf16,
channels-last, in one run on the same inputs:
  reference  the PyTorch reference on weight views (cuDNN convolutions, ATen batch_norm + activation)
  ours       the Triton kernels (backend "triton")
  compiled   torch.compile of the reference layer
  cuda       the CUDA C++ extension, when built (depthwise and BN)
Layer rows: 1x1 convs, depthwise convs (k 3/5/7, stride 1/2), BN + activation. Fused rows (training):
conv -> BN [-> + residual] of an MBConv block, ours = the GEMM with the BN-statistics epilogue then
BN [+ residual] from those statistics (engine/elastic/fused.py), reference = conv2d + batch_norm
[+ add]. Every row carries its FLOPs and the minimal bytes it must move (inputs read once, outputs
written once), the achieved GB/s of each variant and, on a GPU, the HBM roofline (memory clock x bus
width) and the fraction of it reached: a time can be read against what the memory allows.

  python bench/layers.py                      # CUDA: every layer, JSON in bench/results/
  python bench/layers.py --device cpu         # smoke: the reference only, labelled CPU
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Budget, environment, progress, write_json  # noqa: E402
from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, backend, use_backend  # noqa: E402
from engine.elastic.fused import conv_bn  # noqa: E402
from engine.timing import median_ms  # noqa: E402

# (name, layer factory, active setter, input channels, spatial)
CASES = [
    # 224 px: stage 1 (24 -> x6 = 144 at 56x56), active expand 4 (96 channels)
    ("pw_expand_24to96_56px", lambda: ElasticConv2d(24, 144, 1), lambda m: m.set_active(96), 24, 56),
    ("pw_project_96to24_56px", lambda: ElasticConv2d(144, 24, 1), lambda m: m.set_active(24), 96, 56),
    ("pw_expand_112to448_14px", lambda: ElasticConv2d(112, 672, 1), lambda m: m.set_active(448), 112, 14),
    ("dw_k7_s1_96ch_56px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 1), lambda m: m.set_active(7), 96, 56),
    ("dw_k5_s2_96ch_56px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 2), lambda m: m.set_active(5), 96, 56),
    ("dw_k3_s1_448ch_14px", lambda: ElasticDepthwiseConv2d(672, (3, 5, 7), 1), lambda m: m.set_active(3), 448, 14),
    ("dw_k3_s2_96ch_56px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 2), lambda m: m.set_active(3), 96, 56),
    ("dw_k7_s2_448ch_28px", lambda: ElasticDepthwiseConv2d(672, (3, 5, 7), 2), lambda m: m.set_active(7), 448, 28),
    ("bn_hswish_96ch_56px", lambda: ElasticBatchNorm2d(144, act="h_swish"), lambda m: None, 96, 56),
    ("bn_relu_448ch_14px", lambda: ElasticBatchNorm2d(672, act="relu"), lambda m: None, 448, 14),
    # 32 px CIFAR variant: stage 1 at 32x32
    ("pw_expand_24to96_32px", lambda: ElasticConv2d(24, 144, 1), lambda m: m.set_active(96), 24, 32),
    ("dw_k7_s1_96ch_32px", lambda: ElasticDepthwiseConv2d(144, (3, 5, 7), 1), lambda m: m.set_active(7), 96, 32),
    ("bn_hswish_96ch_32px", lambda: ElasticBatchNorm2d(144, act="h_swish"), lambda m: None, 96, 32),
]
# (name, in, max_out, active out, spatial, BN activation, residual): MBConv's expand and project convs
FUSED = [
    ("conv_bn_relu_24to96_56px", 24, 144, 96, 56, "relu", False),
    ("conv_bn_res_96to24_56px", 96, 24, 24, 56, "none", True),
    ("conv_bn_hswish_112to448_14px", 112, 672, 448, 14, "h_swish", False),
]


def roofline_gbps(device: torch.device) -> float | None:
    """Peak HBM bandwidth in GB/s: memory clock x bus width x 2 (double data rate); None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return clock_khz * 1e3 * bus_bits * 2 / 8 / 1e9 if clock_khz and bus_bits else None


def _cost(layer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(FLOPs, minimal bytes forward, minimal bytes forward+backward): inputs read once, outputs written
    once; the backward reads x and dy and writes dx (and the weight gradient)."""
    e = x.element_size()
    act = (x.numel() + y.numel()) * e
    if isinstance(layer, ElasticConv2d):
        w = y.shape[1] * x.shape[1] * e
        return 2 * y.numel() * x.shape[1], act + w, act + w + (2 * x.numel() + y.numel()) * e + w
    if isinstance(layer, ElasticDepthwiseConv2d):
        k = layer.active_kernel_size
        return 2 * y.numel() * k * k, act, act + (2 * x.numel() + y.numel()) * e
    return 6 * y.numel(), act, act + (2 * x.numel() + y.numel()) * e


def _measure(fn, inputs, out_like, device, budget) -> dict:
    dy = torch.randn_like(out_like)
    fwd = median_ms(fn, device, 10, 50, budget.deadline)
    fwd_bwd = median_ms(lambda: torch.autograd.grad(fn(), inputs, dy, allow_unused=True), device, 10, 50,
                        budget.deadline)
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}


def _rates(row: dict, variants: list[str], roof: float | None) -> None:
    for v in variants:
        m = row[v]
        m["fwd_GBps"] = row["min_bytes_fwd"] / m["fwd_ms"] / 1e6
        m["fwd_bwd_GBps"] = row["min_bytes_fwd_bwd"] / m["fwd_bwd_ms"] / 1e6
        if roof:
            m["fwd_bwd_roofline_fraction"] = m["fwd_bwd_GBps"] / roof
        if v != "reference":
            m["fwd_speedup"] = row["reference"]["fwd_ms"] / m["fwd_ms"]
            m["fwd_bwd_speedup"] = row["reference"]["fwd_bwd_ms"] / m["fwd_bwd_ms"]


def _layer_row(name, make, activate, channels, size, dtype, batch, device, variants, budget) -> dict:
    layer = make().to(device)
    activate(layer)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    layer = layer.to(dtype)
    with use_backend("torch"):
        y = layer(x)
    flops, fwd_bytes, all_bytes = _cost(layer, x, y)
    row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "flops": flops,
           "min_bytes_fwd": fwd_bytes, "min_bytes_fwd_bwd": all_bytes}
    for variant in variants:
        fn = torch.compile(layer) if variant == "compiled" else layer
        with use_backend({"ours": "triton", "cuda": "cuda"}.get(variant, "torch")):
            row[variant] = _measure(lambda: fn(x), [x] + list(layer.parameters()), y, device, budget)
    return row


def _fused_row(name, cin, max_out, out, size, act, residual, dtype, batch, device, budget) -> dict:
    conv, bn = ElasticConv2d(cin, max_out, 1).to(device, dtype), ElasticBatchNorm2d(max_out, act=act).to(device, dtype)
    conv.set_active(out)
    x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    x.requires_grad_()
    res = torch.randn(batch, out, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    res = res.requires_grad_() if residual else None
    e, m = x.element_size(), batch * size * size
    # forward: x, W, (res) in, h and y out, h read once by BN; backward: dy, h, x, W in, dh?, dx, dW out
    fwd = (m * cin + cin * out + 2 * m * out + (m * out if residual else 0)) * e
    row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "flops": 2 * m * cin * out,
           "min_bytes_fwd": fwd, "min_bytes_fwd_bwd": fwd + (3 * m * out + 2 * m * cin + 2 * cin * out) * e}
    for variant, name_of_backend in (("reference", "torch"), ("ours", "triton")):
        c, b = copy.deepcopy((conv, bn))
        inputs = [x, c.weight, b.weight, b.bias] + ([res] if residual else [])
        with use_backend(name_of_backend):
            y = conv_bn(c, b, x, res)
            row[variant] = _measure(lambda c=c, b=b: conv_bn(c, b, x, res), inputs, y, device, budget)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 128 (CUDA), 2 (CPU)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget; rows that would start after it are reported as skipped")
    p.add_argument("--out", metavar="DIR", help="write layers.json there (default bench/results/)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    budget = Budget(args.max_seconds)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 2)
    variants = ["reference", "ours", "compiled"] if cuda else ["reference"]
    if cuda and backend.availability("cuda")[0]:
        variants.append("cuda")
    roof = roofline_gbps(device)
    rows: list[dict] = []
    payload = {"env": environment(device), "roofline_GBps": roof, "rows": rows,
               "note": "" if cuda else "CPU smoke: reference only"}
    jobs = [("layer", c, dt) for dt in (args.dtypes if cuda else ["float32"]) for c in CASES]
    jobs += [("fused", c, dt) for dt in (args.dtypes if cuda else []) for c in FUSED]
    for kind, case, dtype_name in jobs:
        name = case[0]
        if budget.spent():
            rows.append({"layer": name, "dtype": dtype_name, "skipped": "--max-seconds budget spent"})
            progress(f"{name} {dtype_name}: skipped (budget spent)")
            continue
        dtype = getattr(torch, dtype_name)
        if kind == "layer":
            row = _layer_row(*case, dtype, batch, device, variants, budget)
            measured = variants
        else:
            row = _fused_row(*case, dtype, batch, device, budget)
            measured = ["reference", "ours"]
        _rates(row, measured, roof)
        rows.append(row)
        progress(f"{name:30s} {dtype_name:8s} " + "  ".join(
            f"{v}: {row[v]['fwd_ms']:.3f}/{row[v]['fwd_bwd_ms']:.3f} ms ({row[v]['fwd_bwd_GBps']:.0f} GB/s)"
            for v in measured))
        if not args.no_save:
            write_json("layers", payload, args.out)
    if not args.no_save:
        print("wrote", write_json("layers", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
