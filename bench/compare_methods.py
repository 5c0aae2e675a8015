"""DεpS vs BigNAS-style sandwich-from-start (and optionally OFA-PS / CompOFA) at the same number of
steps on the same data: top-1 of the max, min and random subnets after BN re-calibration, and the
device-hours each run used. Runs `engine.train` once per method.

  python bench/compare_methods.py                         # built-in digits, the default schedule
  python bench/compare_methods.py --methods deps bignas ofa-ps compofa -- --epochs 8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_json  # noqa: E402
from engine.train.__main__ import main as train_main  # noqa: E402
from engine.train.logger import hours_file_name  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["deps", "bignas"])
    p.add_argument("--no-save", action="store_true")
    p.add_argument("train_args", nargs="*", help="extra engine.train flags (after --)")
    args = p.parse_args(argv)
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = Path(tmp) / method
            if train_main(["--method", method, "--out", str(out), "--no-progress", *args.train_args]) != 0:
                raise SystemExit(f"engine.train --method {method} failed")
            summary = json.loads((out / "summary.json").read_text())
            hours = json.loads((out / hours_file_name("cpu" if env["device_type"] == "cpu" else "gpu")).read_text())
            results[method] = {"eval": summary["eval"], "device_hours": hours["used_hours"], "steps": summary["step"]}
    names = [r["subnet"] for r in next(iter(results.values()))["eval"]]
    print(f"{'method':8s} {'steps':>5s} {'hours':>7s} " + " ".join(f"{n:>8s}" for n in names))
    for method, r in results.items():
        print(f"{method:8s} {r['steps']:5d} {r['device_hours']:7.4f} " + " ".join(f"{e['top1']:8.2f}" for e in r["eval"]))
    if not args.no_save:
        print("wrote", write_json("compare_methods", {"env": env, "args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
