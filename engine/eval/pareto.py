"""Pareto report: accuracy vs FLOPs as CSV and a PNG plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def pareto_front(rows: list[dict], cost: str = "mflops") -> list[dict]:
    """Rows not dominated by another (lower-or-equal `cost` and higher-or-equal top-1, one strictly)."""
    return [r for r in rows if not any(o[cost] <= r[cost] and o["top1"] >= r["top1"]
                                       and (o[cost], o["top1"]) != (r[cost], r["top1"]) for o in rows)]


def write_report(rows: list[dict], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Write pareto.csv (every evaluated subnet, with a front flag) and pareto.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = {id(r) for r in pareto_front(rows)}
    csv_path, png_path = out / "pareto.csv", out / "pareto.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subnet", "top1", "mflops", "mparams", "on_front", "config"])
        for r in sorted(rows, key=lambda r: r["mflops"]):
            w.writerow([r["subnet"], f"{r['top1']:.2f}", f"{r['mflops']:.2f}", f"{r['mparams']:.3f}",
                        int(id(r) in front), json.dumps(r["config"], separators=(",", ":"))])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([r["mflops"] for r in rows], [r["top1"] for r in rows], c="tab:blue", label="subnets")
    pf = sorted(pareto_front(rows), key=lambda r: r["mflops"])
    ax.plot([r["mflops"] for r in pf], [r["top1"] for r in pf], "-o", c="tab:red", label="Pareto front")
    for r in rows:
        if r["subnet"] in ("max", "min"):
            ax.annotate(r["subnet"], (r["mflops"], r["top1"]), textcoords="offset points", xytext=(4, 4))
    finish_plot(fig, ax, "MFLOPs (2 x MACs) per image", title or "accuracy vs FLOPs", png_path)
    return csv_path, png_path


def finish_plot(fig, ax, xlabel: str, title: str, png_path: Path) -> None:
    """Label a top-1 plot, add its grid and legend, and write it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
