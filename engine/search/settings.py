"""The search's command line: its flags and their checks, all made before any work.

Every bad setting is reported in one `BadInput` line (exit code 2 in `python -m engine.search`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from engine.errors import BadInput


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.search", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by python -m engine.train")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-mflops", help="FLOPs budget(s), millions per image (2 x MACs); comma-separated "
                                             "for one chosen subnet per budget, e.g. 100,150,200")
    budget.add_argument("--max-latency-ms", help="latency budget(s), milliseconds per batch; comma-separated")
    p.add_argument("--latency-table", help="latency table (JSON, python -m engine.search.latency_table) of the "
                                           "deployment device: latencies predicted from it instead of timed here")
    p.add_argument("--latency-device", default="cpu", help="device the latency is timed on without a table: cpu "
                                                          "or cuda (default: cpu)")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement (default: 1)")
    p.add_argument("--population", type=int, default=20, help="subnets per generation (default: 20)")
    p.add_argument("--generations", type=int, default=10, help="generations per budget (default: 10)")
    p.add_argument("--parent-ratio", type=float, default=0.25, help="share of each generation kept as parents "
                                                                    "(default: 0.25)")
    p.add_argument("--mutation-ratio", type=float, default=0.5, help="share of the children made by mutation, the "
                                                                     "rest by crossover (default: 0.5)")
    p.add_argument("--mutate-prob", type=float, default=0.1, help="probability a gene is resampled in a mutation "
                                                                  "(default: 0.1)")
    p.add_argument("--predictor", action="store_true", help="search on an accuracy predictor fitted on measured "
                                                            "subnets instead of measuring every candidate")
    p.add_argument("--predictor-samples", type=int, default=100, help="subnets measured to fit the predictor "
                                                                      "(default: 100)")
    p.add_argument("--compare-random", type=int, default=50, help="random subnets per budget measured for "
                                                                  "comparison (default: 50; 0: none)")
    p.add_argument("--heldout-images", type=int, default=None,
                   help="held-out training images scoring subnets (default: all the run held out, python -m "
                        "engine.train --heldout-images; for a run that held none out, a seeded subset of its "
                        "training split: 10,000 for ImageNet (at most a tenth), a tenth otherwise)")
    p.add_argument("--dali", action=argparse.BooleanOptionalAction, default=None,
                   help="read the images through DALI evaluation pipelines (default: as the run did)")
    p.add_argument("--calib-images", type=int, default=256, help="other training images for BN re-calibration per "
                                                                 "subnet (default: 256)")
    p.add_argument("--eval-images", type=int, default=None, help="validation images for the chosen subnets' val "
                                                                 "top-1 (default: all)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch on the device (default: 128)")
    p.add_argument("--workers", type=int, default=None, help="data-loading worker processes (default: the run's)")
    p.add_argument("--skip-corrupt", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out unreadable image files (default: as the run did)")
    p.add_argument("--data", help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the accuracy measurements (default: cuda if available, else cpu)")
    p.add_argument("--tune", default="auto", help="dispatch table (python -m engine.tune) for backend auto: auto "
                                                  "(this device's cached table, if any), off, or a table file")
    p.add_argument("--out", help="output folder, new or empty (default: <checkpoint folder>/search-<budgets>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration images (and the held-out "
                                                       "ones of a run that held none out), the search and the "
                                                       "random subnets (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def budgets(text: str) -> list[float]:
    """Sorted distinct budgets of a comma-separated list; BadInput when one is not a positive number."""
    try:
        values = sorted({float(v) for v in text.split(",")})
    except ValueError:
        raise BadInput(f"budget {text!r}: expected numbers separated by commas, e.g. 100,150,200") from None
    if not all(v > 0 for v in values):
        raise BadInput(f"budget {text!r}: every budget must be > 0")
    return values


def device(name: str, flag: str) -> torch.device:
    """`name` as a device this machine has (cpu, or cuda[:i] with a GPU); BadInput otherwise."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    ok = dev is not None and (dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_available()
                                                    and (dev.index or 0) < torch.cuda.device_count()))
    if not ok:
        raise BadInput(f"{flag} {name}: must be cpu, or cuda[:index] of a GPU this machine has")
    return dev


def writable_folder(path: Path, flag: str, empty: bool = True) -> None:
    """BadInput unless `path` is a folder (an empty one, with `empty`) or can be made one (no file on the
    way, a writable parent)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise BadInput(f"{flag} {path}: {parent} is a file, not a folder")
            if empty and parent == path and any(path.iterdir()):
                raise BadInput(f"{flag} {path}: not empty (another search's files?); choose a new folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise BadInput(f"{flag} {path}: {parent} is not writable")
            return


def new_file(path: Path, flag: str) -> None:
    """BadInput unless `path` does not exist and can be written."""
    if path.exists():
        raise BadInput(f"{flag} {path}: exists; choose a new file")
    writable_folder(path.parent, flag, empty=False)


def check(args: argparse.Namespace) -> None:
    """Check every flag (BadInput naming all bad ones); parses args.budgets, args.torch_device and, with
    --latency-table, args.table (the JSON)."""
    problems = []
    for name, low in (("population", 2), ("generations", 1), ("predictor_samples", 5), ("calib_images", 1),
                      ("latency_batch", 1), ("batch_size", 1), ("heldout_images", 1), ("eval_images", 1),
                      ("compare_random", 0), ("workers", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            problems.append(f"--{name.replace('_', '-')} {value}: must be >= {low}")
    for name in ("parent_ratio", "mutation_ratio", "mutate_prob"):
        if not 0 < getattr(args, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in (0, 1]")
    args.table = None
    for flag, run in (("budget", _budgets), ("--device", _device), ("--latency-device", _latency_device),
                      ("--latency-table", _table), ("--checkpoint", _checkpoint), ("--out", _out)):
        try:
            run(args)
        except BadInput as err:
            problems.append(str(err))
    if args.tune not in ("auto", "off") and not Path(args.tune).is_file():
        problems.append(f"--tune {args.tune!r}: no such dispatch table file (or auto, off)")
    if problems:
        raise BadInput("invalid settings: " + "; ".join(problems))


def _budgets(args: argparse.Namespace) -> None:
    args.budgets = budgets(args.max_mflops if args.max_mflops is not None else args.max_latency_ms)


def _device(args: argparse.Namespace) -> None:
    args.torch_device = device(args.device, "--device")


def _latency_device(args: argparse.Namespace) -> None:
    if args.max_latency_ms is not None and args.latency_table is None:
        device(args.latency_device, "--latency-device")


def _table(args: argparse.Namespace) -> None:
    if args.latency_table is None:
        return
    if args.max_latency_ms is None:
        raise BadInput("--latency-table: only with --max-latency-ms")
    try:
        args.table = json.loads(Path(args.latency_table).read_text())
        args.table["blocks"], args.table["fixed_ms"]                   # noqa: B018 - the keys it must have
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInput(f"--latency-table {args.latency_table}: not a latency table ({str(err)[:120]})") from None


def _checkpoint(args: argparse.Namespace) -> None:
    if not Path(args.checkpoint).is_file():
        raise BadInput(f"--checkpoint {args.checkpoint}: no such file")


def _out(args: argparse.Namespace) -> None:
    if args.out is None:
        if not hasattr(args, "budgets"):
            return                                                      # reported by _budgets
        unit = "mflops" if args.max_mflops is not None else "ms"
        args.out = str(Path(args.checkpoint).parent / f"search-{'_'.join(f'{b:g}' for b in args.budgets)}{unit}")
    writable_folder(Path(args.out), "--out")
