"""The search's target on the built-in digits run, over seeds: at the midpoint budget (halfway between the
min and max nets' MFLOPs), the searched subnet's held-out top-1 >= the best of 50 random subnets' at the
same budget, measured the same way in the same run; the chosen subnet's val top-1 reported apart.

  python -m engine.train                            # the default digits run: runs/deps-digits/
  python bench/search_digits.py                     # seeds 0 1 2 (one process each), JSON in bench/results/
  python bench/search_digits.py --seeds 0 --random 4 --generations 2 --no-save     # smoke
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_json  # noqa: E402
from engine.search.__main__ import load_supernet, main as search  # noqa: E402
from engine.search.costs import FlopTable  # noqa: E402
from engine.search.evolution import SearchSpace  # noqa: E402


def one_seed(job: tuple[list[str], int, Path]) -> dict | None:
    """One search (seed `seed`, into `out`) and its figures; None when it failed."""
    argv, seed, out = job
    t0 = time.perf_counter()
    if search([*argv, "--seed", str(seed), "--out", str(out)]) != 0:
        return None
    summary = json.loads((out / "search.json").read_text())
    entry = summary["budgets"][0]
    row = {"seed": seed, "chosen": entry["chosen"], "random_baseline": entry["random_baseline"],
           "target_met": entry["chosen"]["heldout_top1"] >= entry["random_baseline"]["best_top1"],
           "subnets_measured": summary["subnets_measured"], "data": summary["data"],
           "seconds": time.perf_counter() - t0}
    print(json.dumps({k: v for k, v in row.items() if k != "chosen"}), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/deps-digits/checkpoint.pt")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--random", type=int, default=50, help="random subnets per seed (default: 50)")
    p.add_argument("--generations", type=int, default=10, help="generations of the search (default: 10)")
    p.add_argument("--calib-images", type=int, default=256, help="BN re-calibration images (default: 256)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    model, run_cfg = load_supernet(args.checkpoint)
    table, space = FlopTable(model, run_cfg["resolution"]), SearchSpace(model.spec, model.n_stages)
    budget = round((table(space.smallest()) + table(space.largest())) / 2e6, 2)
    spawn = multiprocessing.get_context("spawn")      # a fork after torch's threads ran can deadlock the child
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(len(args.seeds), mp_context=spawn) as pool:
        argv = ["--checkpoint", args.checkpoint, "--max-mflops", str(budget), "--compare-random", str(args.random),
                "--generations", str(args.generations), "--calib-images", str(args.calib_images), "--device", "cpu",
                "--no-progress"]
        rows = list(pool.map(one_seed, [(argv, seed, Path(tmp) / f"seed{seed}") for seed in args.seeds]))
    if any(r is None for r in rows):
        return 2
    record = {"note": "search target on the digits run: searched held-out top-1 >= best of random subnets at the "
                      "midpoint budget, per seed; held-out = the training images the run held out of training (a "
                      "seeded tenth), BN re-calibrated on other train images; val top-1 of the chosen subnet "
                      "measured once, reported apart",
              "checkpoint": args.checkpoint, "budget_mflops": budget, "min_net_mflops": table(space.smallest()) / 1e6,
              "max_net_mflops": table(space.largest()) / 1e6, "seeds": rows,
              "target_met_all_seeds": all(r["target_met"] for r in rows), "env": environment(torch.device("cpu"))}
    if not args.no_save:
        print("written", write_json("search-digits", record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
