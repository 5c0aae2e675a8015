"""The search's report: every measured subnet as CSV, and the searched front beside the random, min and
max subnets as a PNG (top-1 vs cost), the chosen subnet of each budget marked with its budget."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from engine.eval.pareto import finish_plot, pareto_front

STYLE = {"searched": ("tab:red", "o"), "random": ("tab:gray", "."), "min": ("tab:blue", "s"), "max": ("tab:blue", "^"),
         "chosen": ("black", "*")}


def write_front(points: list[dict], out: Path, title: str, unit: str) -> tuple[Path, Path]:
    """points: {"source", "top1", "cost", "config"} rows ("label": the budget of a "chosen" row). Writes front.csv (with a Pareto flag over all
    points) and front.png; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    front = {id(r) for r in pareto_front(points, "cost")}
    csv_path, png_path = out / "front.csv", out / "front.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "top1", "cost", "unit", "on_front", "config"])
        for r in sorted(points, key=lambda r: r["cost"]):
            w.writerow([r["source"], f"{r['top1']:.2f}", f"{r['cost']:.4f}", unit, int(id(r) in front),
                        json.dumps(r["config"], separators=(",", ":"))])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for source, (color, marker) in STYLE.items():
        rows = [r for r in points if r["source"] == source]
        if rows:
            ax.scatter([r["cost"] for r in rows], [r["top1"] for r in rows], c=color, marker=marker, label=source)
    for r in points:
        if "label" in r:
            ax.annotate(f"budget {r['label']}", (r["cost"], r["top1"]), textcoords="offset points", xytext=(4, 4))
    searched = sorted(pareto_front([r for r in points if r["source"] == "searched"], "cost"), key=lambda r: r["cost"])
    if searched:
        ax.plot([r["cost"] for r in searched], [r["top1"] for r in searched], "-", c="tab:red", label="searched front")
    finish_plot(fig, ax, unit, title, png_path)
    return csv_path, png_path
