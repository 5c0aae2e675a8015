"""The batched sandwich's grouped layers, K = 4 subnets (max, min, two random) on OFA-MobileNetV3 shapes:
  sequential  K launches of our per-layer op, one per subnet (what `--sandwich sequential` runs)
  grouped     one launch of the grouped op (engine/elastic/grouped.py; Triton on CUDA)
  reference   the grouped op's PyTorch reference (masked groups=K conv, cuDNN)
forward and forward+backward, in one run on the same inputs; ratios against `sequential`.

  python bench/grouped.py                   # CUDA, JSON in bench/results/
  python bench/grouped.py --device cpu      # smoke: reference ops only, labelled CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Budget, environment, progress, write_json  # noqa: E402
from engine.elastic import ElasticConv2d, ElasticDepthwiseConv2d, use_backend  # noqa: E402
from engine.elastic.grouped import grouped_depthwise_conv, grouped_pointwise_conv  # noqa: E402
from engine.timing import median_ms  # noqa: E402

# 224-px stage 1 block (24 channels in, expand 3/4/6 -> 72/96/144 mid, 56x56) and a 14-px stage
MIDS = {"56px": (24, 56, [144, 72, 96, 120]), "14px": (112, 14, [672, 336, 448, 560])}
KERNELS = [7, 3, 5, 5]


def _cases(device: torch.device, dtype: torch.dtype, batch: int):
    """(name, sequential fn, grouped fn, inputs needing grads) per layer."""
    for tag, (cin, size, mids) in MIDS.items():
        groups, cmid = len(mids), max(mids)
        conv = ElasticConv2d(cin, cmid, 1).to(device, dtype)
        x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        xs = x.repeat(1, groups, 1, 1).requires_grad_()
        x.requires_grad_()
        widths = torch.tensor([[m, cin] for m in mids], dtype=torch.int32, device=device)

        def seq_pw(conv=conv, x=x, mids=mids):
            out = []
            for m in mids:
                conv.set_active(m)
                out.append(conv(x))
            return out

        yield (f"pw_expand_{cin}to{cmid}_{tag}", seq_pw,
               lambda conv=conv, xs=xs, w=widths, c=cmid: [grouped_pointwise_conv(xs, conv.weight, w, c)],
               [x, xs, conv.weight])
        dw = ElasticDepthwiseConv2d(cmid, (3, 5, 7), 1).to(device, dtype)
        h = [torch.randn(batch, m, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
             .requires_grad_() for m in mids]
        hs = torch.cat([F.pad(t.detach(), (0, 0, 0, 0, 0, cmid - t.shape[1])) for t in h], 1)
        hs = hs.contiguous(memory_format=torch.channels_last).requires_grad_()
        limits = torch.tensor([[k, m] for k, m in zip(KERNELS, mids)], dtype=torch.int32, device=device)
        filt = torch.randn(groups * cmid, 7, 7, device=device, dtype=dtype, requires_grad=True)

        def seq_dw(dw=dw, h=h):
            out = []
            for t, k in zip(h, KERNELS):
                dw.set_active(k)
                out.append(dw(t))
            return out

        yield (f"dw_k7533_{cmid}ch_{tag}", seq_dw,
               lambda hs=hs, f=filt, lim=limits: [grouped_depthwise_conv(hs, f, 1, lim)], h + [hs, dw.weight, filt])


def _fwd_bwd(fn, inputs):
    outs = fn()
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.grad(outs, inputs, grads, allow_unused=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 128 (CUDA), 2 (CPU)")
    p.add_argument("--dtype", default="bfloat16", help="CUDA only; float32 on a CPU")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget; rows that would start after it are reported as skipped")
    p.add_argument("--out", metavar="DIR", help="write grouped.json there (default bench/results/)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    budget = Budget(args.max_seconds)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch, dtype = args.batch or (128 if cuda else 2), getattr(torch, args.dtype) if cuda else torch.float32
    ours = "triton" if cuda else "torch"
    reps = (10, 50) if cuda else (1, 3)
    rows = []
    payload = {"env": environment(device), "rows": rows, "note": "" if cuda else "CPU smoke: reference ops"}
    for name, seq, grouped, inputs in _cases(device, dtype, batch):
        if budget.spent():
            rows.append({"layer": name, "skipped": "--max-seconds budget spent"})
            progress(f"{name}: skipped (budget spent)")
            continue
        row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "subnets": len(KERNELS)}
        for variant, fn, backend_name in (("sequential", seq, ours), ("grouped", grouped, ours),
                                          ("reference", grouped, "torch")):
            with use_backend(backend_name):
                row[variant] = {"fwd_ms": median_ms(fn, device, *reps, budget.deadline),
                                "fwd_bwd_ms": median_ms(lambda fn=fn: _fwd_bwd(fn, inputs), device, *reps,
                                                        budget.deadline)}
        for variant in ("grouped", "reference"):
            for key in ("fwd_ms", "fwd_bwd_ms"):
                row[variant][key.replace("_ms", "_speedup")] = row["sequential"][key] / row[variant][key]
        rows.append(row)
        progress(f"{name:28s} " + "  ".join(f"{v}: {row[v]['fwd_ms']:.3f}/{row[v]['fwd_bwd_ms']:.3f} ms"
                                            for v in ("sequential", "grouped", "reference")))
        if not args.no_save:
            write_json("grouped", payload, args.out)
    if not args.no_save:
        print("wrote", write_json("grouped", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
