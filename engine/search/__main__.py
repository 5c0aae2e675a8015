"""`python -m engine.search --checkpoint RUN/checkpoint.pt --max-mflops 100,150,200`: specialise a trained
supernet, one chosen and exported subnet per budget.

Finds the most accurate subnet within each FLOPs budget (--max-mflops) or latency budget (--max-latency-ms:
predicted from a --latency-table measured on the deployment device, or timed here on --latency-device at
--latency-batch) by evolutionary search over the supernet's configs (engine/search/evolution.py), one
evolution per budget over one shared history of measured subnets: each budget's subnet is the best of
that whole history within the budget. A candidate's fitness is its top-1 on the training images the run
held out of training (--heldout-images; engine/search/heldout.py), BN re-calibrated on other training
images (cached per config),
or, with --predictor, a ridge regression fitted on measured subnets (its fit error is reported). Only
the chosen subnets are evaluated on the validation split, once each: "val top-1" is reported apart from
the "search top-1 (held-out)" the selection used. --compare-random random subnets per budget are
measured on the held-out images beside it. Images stream from the run's dataset through the run's
loader (torchvision or DALI, --dali/--no-dali) with its resolution, normalisation and --skip-corrupt, a
batch at a time.

Writes into the output folder (new or empty; default <run>/search-<budgets>/): front.csv and front.png
(held-out top-1 vs cost of every measured subnet, the chosen ones marked), search.json (settings, data
sizes, per budget: chosen subnet, history, random baseline, export checks; timings) and per budget a
folder <budget>/ with chosen.json and the subnet exported with its re-calibrated BN (subnet.pt,
subnet.pt2 and a self-contained subnet.onnx when onnx is installed; engine/search/export.py), each
checked against the supernet. Exit codes: 0 done, 2 bad input (settings, checkpoint, budget, data).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.data.dali import dali_available
from engine.data.loader import load_data
from engine.errors import BadInput
from engine.eval.evaluate import top1
from engine.search.accuracy import MeasuredAccuracy, RidgePredictor, config_key, features, fit_report
from engine.search.costs import FlopTable, LatencyMeter, LatencyTable
from engine.search.evolution import SearchSpace, evolve, sample_within
from engine.search.export import export_subnet
from engine.search.heldout import SearchImages, search_images
from engine.search.report import write_front
from engine.search.settings import check, parser
from engine.supernet import OFAMobileNetV3, SupernetSpec
from engine.tune import install_table
from engine.train import checkpoint
from engine.train.config import LEGACY_SETTINGS

log = logging.getLogger("engine.search")


@dataclass
class Setup:
    """What every phase works with: the supernet on its device, the images, the cost and the fitness."""
    model: OFAMobileNetV3
    images: SearchImages
    space: SearchSpace
    cost: Callable[[dict], float]
    unit: str
    measured: MeasuredAccuracy
    low: float                       # the min and max nets' costs
    high: float
    dispatch_table: str              # what engine.tune.install_table installed


def load_supernet(path: str) -> tuple[OFAMobileNetV3, dict]:
    """The supernet of a training checkpoint (verified, on the CPU), and the run's config (a setting the
    checkpoint predates: what runs then did, engine.train.config.LEGACY_SETTINGS)."""
    state = checkpoint.read(path)
    try:
        model = OFAMobileNetV3(SupernetSpec(**state["arch"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"checkpoint {path} is not an OFA-MobileNetV3 supernet of this engine "
                                         f"({str(err).splitlines()[0][:200]})") from err
    return model, {**LEGACY_SETTINGS, **state["config"]}


def setup(args: argparse.Namespace) -> Setup:
    """Phase 1: the supernet on --device, the run's data as streams, the cost table; budgets checked
    against the min and max nets (BadInput before any measurement)."""
    model, run_cfg = load_supernet(args.checkpoint)
    device = args.torch_device
    skip = run_cfg.get("skip_corrupt", False) if args.skip_corrupt is None else args.skip_corrupt
    workers = run_cfg.get("workers", 0) if args.workers is None else args.workers
    dali = run_cfg.get("dali", False) if args.dali is None else args.dali
    available, why = dali_available()
    if dali and not available:
        raise BadInput(f"--dali (the run's loader unless --no-dali): {why}")
    try:
        data = load_data(run_cfg["dataset"], args.data or run_cfg.get("data"), run_cfg["resolution"], run_cfg["seed"],
                         skip_corrupt=skip, jpeg_only=dali, workers=max(workers, 4),
                         heldout_images=run_cfg["heldout_images"])
    except ValueError as err:
        raise BadInput(str(err)) from err
    images = search_images(data, args.heldout_images, args.calib_images, args.eval_images, args.batch_size, workers,
                           args.seed, device, dali)
    model = model.to(device, memory_format=torch.channels_last)
    space = SearchSpace(model.spec, model.n_stages)
    if args.max_mflops is not None:
        table = FlopTable(model, data.resolution)
        cost, unit = (lambda cfg: table(cfg) / 1e6), "MFLOPs"
    elif args.table is not None:
        lut = LatencyTable(args.table, model.spec.to_dict(), data.resolution, model.spec.max_depth)
        cost = lut
        unit = f"ms ({args.table.get('device_name', args.table.get('device'))}, batch {args.table.get('batch')}, table)"
    else:
        cost = LatencyMeter(model, data.resolution, torch.device(args.latency_device), args.latency_batch)
        unit = f"ms ({args.latency_device}, batch {args.latency_batch})"
    low, high = cost(space.smallest()), cost(space.largest())
    if args.budgets[0] < low:
        raise BadInput(f"budget {args.budgets[0]:g} {unit} is below the min net's {low:.4g}: no subnet fits")
    if args.budgets[-1] >= high:
        raise BadInput(f"budget {args.budgets[-1]:g} {unit} is at or above the max net's {high:.4g}: the max net "
                       "fits, nothing to search")
    measured = MeasuredAccuracy(model, images.calib, images.heldout, device)
    return Setup(model, images, space, cost, unit, measured, low, high, install_table(args.tune, device))


def fitness(args: argparse.Namespace, s: Setup, summary: dict) -> Callable[[dict], float]:
    """Phase 2: the search's fitness: the measured held-out top-1, or a predictor fitted on it."""
    if not args.predictor:
        return s.measured
    rng = random.Random(args.seed + 1)
    samples = [s.space.random(rng) for _ in range(args.predictor_samples)]
    spec = s.model.spec
    predictor = RidgePredictor(lambda c: features(c, spec.kernel_sizes, spec.expand_ratios, spec.depths))
    summary["predictor"] = fit_report(predictor, samples, [s.measured(c) for c in samples])
    log.info("predictor fitted on %d measured subnets: RMSE %.2f top-1 points, Kendall tau %.2f on %d held out",
             len(samples), summary["predictor"]["rmse_top1"], summary["predictor"]["kendall_tau"],
             summary["predictor"]["test_pairs"])
    return predictor


def search(args: argparse.Namespace, s: Setup, score: Callable[[dict], float]) -> tuple[dict, dict[float, list]]:
    """Phase 3: one evolution per budget over one shared history; returns ({config key: config} of every
    subnet scored, {budget: its evolution's per-generation history})."""
    scored: dict[str, dict] = {}
    histories: dict[float, list] = {}
    bar = _progress(not args.no_progress, args.generations * len(args.budgets))
    for i, budget in enumerate(args.budgets):
        def on_generation(generation: int, result, budget=budget) -> None:
            bar.update(1)
            log.info("budget %g: generation %d/%d: best %s %.2f%% at %.4g %s (%d subnets measured)", budget,
                     generation + 1, args.generations, "predicted top-1" if args.predictor else "held-out top-1",
                     result.fitness, result.cost, s.unit, len(s.measured))

        result = evolve(s.space, score, s.cost, budget, args.population, args.generations, args.parent_ratio,
                        args.mutation_ratio, args.mutate_prob, args.seed + 100 * i, on_generation)
        scored.update({config_key(m): m for m in result.members})
        histories[budget] = result.history
    bar.close()
    return scored, histories


def choose(s: Setup, score: Callable[[dict], float], scored: dict, budget: float) -> dict:
    """Phase 4: the best-scoring subnet of the whole history within `budget` (ties: the cheaper)."""
    within = [c for c in scored.values() if s.cost(c) <= budget]
    return max(within, key=lambda c: (score(c), -s.cost(c)))


def random_baseline(args: argparse.Namespace, s: Setup, budget: float, seed: int) -> tuple[list[dict], dict]:
    """Phase 5: --compare-random random subnets within `budget` on the held-out images, and their spread
    beside the held-out measurement's own noise (binomial standard error at the median, in points)."""
    rng = random.Random(seed)
    randoms = [sample_within(lambda: s.space.random(rng), s.cost, budget) for _ in range(args.compare_random)]
    accs = [s.measured(c) for c in randoms]
    if not accs:
        return randoms, {"subnets": 0}
    median, n = statistics.median(accs), s.images.sizes["heldout_images"]
    return randoms, {"subnets": len(accs), "best_top1": max(accs), "median_top1": median,
                     "mean_top1": statistics.fmean(accs), "std_top1": statistics.pstdev(accs),
                     "noise_se_top1": 100 * math.sqrt(median / 100 * (1 - median / 100) / n)}


def validate_and_export(s: Setup, cfg: dict, out: Path) -> tuple[float, dict]:
    """Phase 6: the chosen subnet, BN re-calibrated once, evaluated on the validation split (once) and
    exported from the same statistics; returns (val top-1, export report)."""
    with s.measured.calibrated(cfg) as net:
        val = top1(net, s.images.val, s.measured.device, channels_last=True)
        sample = next(iter(s.images.heldout))[0][:8]
        return val, export_subnet(net, cfg, sample, out)


def run(args: argparse.Namespace) -> dict:
    """The search, its report and the exports; returns the summary written to search.json."""
    started = time.perf_counter()
    check(args)
    s = setup(args)
    out = Path(args.out)
    if s.images.sizes["heldout_seen_in_training"]:
        log.warning("the run held no training images out (python -m engine.train --heldout-images 0, or an older "
                    "run): the held-out images are ones the supernet was trained on; held-out top-1 ranks subnets "
                    "without touching val, but reads high")
    summary: dict = {"checkpoint": str(args.checkpoint), "dispatch_table": s.dispatch_table, "unit": s.unit,
                     "min_net_cost": s.low, "max_net_cost": s.high, "data": s.images.sizes,
                     "settings": {k: v for k, v in vars(args).items() if k not in ("table", "torch_device")}}
    score = fitness(args, s, summary)
    t0 = time.perf_counter()
    scored, histories = search(args, s, score)
    summary["search_seconds"], summary["budgets"] = time.perf_counter() - t0, []
    points = _points(s, [] if args.predictor else scored.values(), "searched")     # predictor: unmeasured
    for i, budget in enumerate(args.budgets):
        entry = _budget(args, s, score, scored, budget, i, out, points)
        entry["history"] = histories[budget]
        summary["budgets"].append(entry)
    summary["subnets_measured"] = len(s.measured)
    write_front(points, out, f"search under {', '.join(f'{b:g}' for b in args.budgets)} {s.unit}", s.unit)
    summary["seconds"] = time.perf_counter() - started
    (out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _budget(args: argparse.Namespace, s: Setup, score, scored: dict, budget: float, i: int, out: Path,
            points: list[dict]) -> dict:
    """Phases 4-6 for one budget; writes <out>/<budget>/ and adds the chosen and random points."""
    chosen = choose(s, score, scored, budget)
    folder = out / f"{budget:g}"
    randoms, baseline = random_baseline(args, s, budget, args.seed + 2 + 1000 * i)
    held = s.measured(chosen)
    val, export = validate_and_export(s, chosen, folder)
    entry = {"budget": budget, "chosen": {"config": chosen, "cost": s.cost(chosen), "heldout_top1": held,
                                          "val_top1": val, **({"predicted_top1": score(chosen)} if args.predictor
                                                              else {})},
             "random_baseline": baseline, "export": export, "folder": str(folder)}
    (folder / "chosen.json").write_text(json.dumps({**entry["chosen"], "budget": budget, "unit": s.unit,
                                                    "spec": s.model.spec.to_dict()}, indent=2))
    points += _points(s, randoms, "random") + [{**_points(s, [chosen], "chosen")[0], "label": f"{budget:g}"}]
    log.info("budget %g %s: chosen subnet at %.4g: search top-1 (held-out) %.2f%%, val top-1 %.2f%%%s; in %s",
             budget, s.unit, s.cost(chosen), held, val,
             f"; {baseline['subnets']} random subnets (held-out): best {baseline['best_top1']:.2f}%, median "
             f"{baseline['median_top1']:.2f}%" if randoms else "", folder)
    return entry


def _points(s: Setup, cfgs, source: str) -> list[dict]:
    """Rows for the front report (held-out top-1 and cost); min and max nets join the searched rows."""
    extra = [("min", s.space.smallest()), ("max", s.space.largest())] if source == "searched" else []
    return [{"source": src, "top1": s.measured(c), "cost": s.cost(c), "config": c}
            for src, c in extra + [(source, c) for c in cfgs]]


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generations", disable=not enabled, dynamic_ncols=True, leave=False)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(parser(__doc__).parse_args(argv))
    except (BadInput, FileNotFoundError) as err:      # CheckpointError is a BadInput
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
