"""`python -m engine.search --checkpoint RUN/checkpoint.pt --max-mflops 300`: specialise a trained supernet.

Finds the most accurate subnet within a FLOPs budget (--max-mflops) or a latency budget
(--max-latency-ms, timed on --latency-device at --latency-batch), by evolutionary search over the
supernet's configs (engine/search/evolution.py). A candidate's accuracy is measured (BN re-calibrated on
training images, top-1 on the validation split, cached per config) or, with --predictor, predicted by a
ridge regression fitted on measured subnets (its fit error is reported). The best of --compare-random
random subnets within the same budget is measured beside it.

Writes into the output folder (default <run>/search-<budget>/): front.csv and front.png (top-1 vs cost
of every measured subnet, the searched front beside the random, min and max subnets), chosen.json (the
config, its cost and accuracy), search.json (settings, per-generation best, the random baseline,
predictor fit, timings) and the chosen subnet exported with its re-calibrated BN (subnet.pt,
subnet.pt2 and subnet.onnx when onnx is installed; engine/search/export.py), each checked against
the supernet. Exit codes: 0 done, 2 bad input (checkpoint, budget, data, settings).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

from engine.data.loader import calibration_batches, load_data, shard_loader
from engine.search.accuracy import MeasuredAccuracy, RidgePredictor, config_key, features, fit_report
from engine.search.costs import FlopTable, LatencyMeter
from engine.search.evolution import SearchSpace, evolve, sample_within
from engine.search.export import export_subnet
from engine.search.report import write_front
from engine.supernet import OFAMobileNetV3, SupernetSpec
from engine.train import checkpoint

log = logging.getLogger("engine.search")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by python -m engine.train")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-mflops", type=float, help="FLOPs budget, millions per image (2 x MACs)")
    budget.add_argument("--max-latency-ms", type=float, help="latency budget, milliseconds per batch")
    p.add_argument("--latency-device", default="cpu", help="device the latency is measured on: cpu or cuda "
                                                          "(default: cpu)")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement (default: 1)")
    p.add_argument("--population", type=int, default=20, help="subnets per generation (default: 20)")
    p.add_argument("--generations", type=int, default=10, help="generations (default: 10)")
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
    p.add_argument("--compare-random", type=int, default=50, help="random subnets within the budget measured for "
                                                                  "comparison (default: 50; 0: none)")
    p.add_argument("--calib-images", type=int, default=256, help="training images for BN re-calibration per subnet "
                                                                 "(default: 256; more for large images)")
    p.add_argument("--eval-images", type=int, default=None, help="validation images per accuracy (default: all)")
    p.add_argument("--data", help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the accuracy measurements (default: cuda if available, else cpu)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/search-<budget>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and of the random subnets (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(args: argparse.Namespace) -> None:
    problems = []
    for name, low in (("population", 2), ("generations", 1), ("predictor_samples", 5), ("calib_images", 1),
                      ("latency_batch", 1)):
        if getattr(args, name) < low:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    for name in ("parent_ratio", "mutation_ratio", "mutate_prob"):
        if not 0 < getattr(args, name) <= 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)}: must be in (0, 1]")
    if args.compare_random < 0:
        problems.append(f"--compare-random {args.compare_random}: must be >= 0")
    budget = args.max_mflops if args.max_mflops is not None else args.max_latency_ms
    if not budget > 0:
        problems.append(f"budget {budget}: must be > 0")
    if args.latency_device not in ("cpu", "cuda") or (args.latency_device == "cuda" and not torch.cuda.is_available()):
        problems.append(f"--latency-device {args.latency_device}: must be cpu, or cuda on a machine with a GPU")
    if problems:
        raise ValueError("invalid settings:\n  " + "\n  ".join(problems))


def _load(path: str) -> tuple[OFAMobileNetV3, dict]:
    """The supernet of a training checkpoint (verified), and the run's config."""
    state = checkpoint.read(path)
    try:
        model = OFAMobileNetV3(SupernetSpec(**state["arch"]))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"checkpoint {path} is not an OFA-MobileNetV3 supernet of this engine "
                                         f"({str(err).splitlines()[0][:200]})") from err
    return model, state["config"]


def run(args: argparse.Namespace) -> dict:
    """The search, its report and the export; returns the summary written to search.json."""
    _check(args)
    started = time.perf_counter()
    model, run_cfg = _load(args.checkpoint)
    device = torch.device(args.device)
    data = load_data(run_cfg["dataset"], args.data or run_cfg.get("data"), run_cfg["resolution"], run_cfg["seed"])
    model = model.to(device, memory_format=torch.channels_last)
    space = SearchSpace(model.spec, model.n_stages)
    resolution = data.resolution
    if args.max_mflops is not None:
        table = FlopTable(model, resolution)
        cost, budget, unit = (lambda cfg: table(cfg) / 1e6), args.max_mflops, "MFLOPs"
    else:
        meter = LatencyMeter(model, resolution, torch.device(args.latency_device), args.latency_batch)
        cost, budget, unit = meter, args.max_latency_ms, f"ms ({args.latency_device}, batch {args.latency_batch})"
    low, high = cost(space.smallest()), cost(space.largest())
    if budget < low:
        raise ValueError(f"budget {budget:g} {unit} is below the min net's {low:.4g}: no subnet fits")
    if budget >= high:
        raise ValueError(f"budget {budget:g} {unit} is at or above the max net's {high:.4g}: the max net fits, "
                         "nothing to search")
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / (
        f"search-{budget:g}{'mflops' if args.max_mflops is not None else 'ms'}")
    calib = calibration_batches(data, args.calib_images, 256, device, channels_last=True)
    measured = MeasuredAccuracy(model, calib, _eval_batches(data, args.eval_images, device))

    summary: dict = {"checkpoint": str(args.checkpoint), "budget": budget, "unit": unit,
                     "min_net_cost": low, "max_net_cost": high, "settings": {k: v for k, v in vars(args).items()}}
    fitness = measured
    if args.predictor:
        rng = random.Random(args.seed + 1)
        samples = [space.random(rng) for _ in range(args.predictor_samples)]
        predictor = RidgePredictor(lambda c: features(c, model.spec.kernel_sizes, model.spec.expand_ratios,
                                                      model.spec.depths))
        summary["predictor"] = fit_report(predictor, samples, [measured(c) for c in samples])
        log.info("predictor fitted on %d measured subnets: RMSE %.2f top-1 points, Kendall tau %.2f on %d held out",
                 len(samples), summary["predictor"]["rmse_top1"], summary["predictor"]["kendall_tau"],
                 summary["predictor"]["test_pairs"])
        fitness = predictor

    bar = _progress(not args.no_progress, args.generations)

    def on_generation(generation: int, result) -> None:
        bar.update(1)
        log.info("generation %d/%d: best top-1 %.2f%%%s at %.4g %s (%d subnets measured)", generation + 1,
                 args.generations, result.fitness, " (predicted)" if args.predictor else "", result.cost, unit,
                 len(measured))

    t0 = time.perf_counter()
    result = evolve(space, fitness, cost, budget, args.population, args.generations, args.parent_ratio,
                    args.mutation_ratio, args.mutate_prob, args.seed, on_generation)
    bar.close()
    search_seconds = time.perf_counter() - t0
    chosen = result.best
    top1 = measured(chosen)
    rng = random.Random(args.seed + 2)
    randoms = [sample_within(lambda: space.random(rng), cost, budget) for _ in range(args.compare_random)]
    random_top1 = [measured(c) for c in randoms]
    points = _points(space, measured, cost, result.members if not args.predictor else [chosen], randoms)
    summary.update({
        "chosen": {"config": chosen, "cost": cost(chosen), "top1": top1,
                   **({"predicted_top1": result.fitness} if args.predictor else {})},
        "history": result.history,
        "random_baseline": {"subnets": len(randoms), "best_top1": max(random_top1, default=None),
                            "mean_top1": sum(random_top1) / len(random_top1) if random_top1 else None},
        "subnets_measured": len(measured), "search_seconds": search_seconds})
    with measured.calibrated(chosen) as calibrated:
        images = torch.cat([x for x, _ in measured.batches])[:8]
        summary["export"] = export_subnet(calibrated, chosen, images, out)
    write_front(points, out, f"search under {budget:g} {unit}", unit)
    (out / "chosen.json").write_text(json.dumps({"config": chosen, "cost": cost(chosen), "unit": unit,
                                                 "top1": top1, "spec": model.spec.to_dict()}, indent=2))
    summary["seconds"] = time.perf_counter() - started
    (out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    best_random = summary["random_baseline"]["best_top1"]
    log.info("chosen subnet: top-1 %.2f%% at %.4g %s (budget %g)%s; written to %s", top1, cost(chosen), unit, budget,
             f"; best of {len(randoms)} random subnets within the budget: {best_random:.2f}%" if randoms else "", out)
    return summary


def _eval_batches(data, limit: int | None, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The validation split (or its first `limit` images) as channels-last batches on `device`, read once."""
    batches, seen = [], 0
    for images, labels in shard_loader(data.val, 256):
        if limit is not None:
            images, labels = images[:limit - seen], labels[:limit - seen]
        if len(labels) == 0:
            break
        batches.append((images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)))
        seen += len(labels)
    return batches


def _points(space: SearchSpace, measured, cost, searched: list[dict], randoms: list[dict]) -> list[dict]:
    """Rows for the front report: every distinct measured subnet with its source."""
    rows, seen = [], set()
    for source, cfgs in (("min", [space.smallest()]), ("max", [space.largest()]), ("searched", searched),
                         ("random", randoms)):
        for cfg in cfgs:
            key = config_key(cfg)
            if key not in seen:
                seen.add(key)
                rows.append({"source": source, "top1": measured(cfg), "cost": cost(cfg), "config": cfg})
    return rows


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generations", disable=not enabled, dynamic_ncols=True, leave=False)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(_parser().parse_args(argv))
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
