"""`python -m engine.search.latency_table --checkpoint RUN/checkpoint.pt --device cuda --batch 64 --out T.json`:
OFA's latency lookup table, measured on the device a subnet will be deployed on.

Each stage block variant (kernel size, expand ratio) is exported and timed once on its own input shape
(median after a warm-up, engine.timing.median_ms); the fixed part (stem, first block, head, and the
per-block overheads the sum misses) is fitted so that the table's prediction equals the timed min and max
nets on average. Then `--check` random subnets are timed whole and compared with the prediction: the
table records each, and the largest relative error, so a search run anywhere with
`python -m engine.search --max-latency-ms B --latency-table T.json` states how far its latencies can be
trusted. Exit codes: 0 written, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

import torch

from engine.search.costs import add_up, block_costs, model_device, time_ms
from engine.search.evolution import SearchSpace
from engine.errors import BadInput
from engine.search.settings import device as parse_device, new_file
from engine.supernet.mobilenetv3 import OFAMobileNetV3

log = logging.getLogger("engine.search")


def measure_table(model: OFAMobileNetV3, resolution: int, batch: int, check: int = 4, seed: int = 0,
                  warmup: int = 3, reps: int = 10) -> dict:
    """The table (JSON-ready) of `model` (on its deployment device) at `batch` x `resolution` px."""
    timer = lambda net, x: time_ms(net, x, warmup, reps)              # noqa: E731
    device = model_device(model)
    blocks, _ = block_costs(model, resolution, batch, timer, device)
    space, depth = SearchSpace(model.spec, model.n_stages), model.spec.max_depth
    images = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)

    def whole(cfg: dict) -> float:
        model.set_active_subnet(cfg)
        return timer(model.export_active_subnet().eval().to(device, memory_format=torch.channels_last), images)

    anchors = [space.smallest(), space.largest()]
    fixed = sum(whole(c) - add_up(0.0, blocks, depth, c) for c in anchors) / len(anchors)
    rng = random.Random(seed)
    checks = []
    for cfg in [space.random(rng) for _ in range(check)]:
        predicted, measured = add_up(fixed, blocks, depth, cfg), whole(cfg)
        checks.append({"config": cfg, "predicted_ms": predicted, "measured_ms": measured,
                       "relative_error": abs(predicted - measured) / measured})
    model.set_max_net()
    return {"device": str(device), "device_name": _device_name(device), "batch": batch, "resolution": resolution,
            "spec": model.spec.to_dict(), "fixed_ms": fixed,
            "blocks": [[[k, e, ms] for (k, e), ms in costs.items()] for costs in blocks],
            "check": checks, "max_relative_error": max((c["relative_error"] for c in checks), default=None)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    from engine.search.__main__ import load_supernet

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m engine.search.latency_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the run's checkpoint.pt (its supernet spec and resolution)")
    p.add_argument("--device", required=True, help="the deployment device: cpu or cuda[:index]")
    p.add_argument("--batch", type=int, default=1, help="batch size the latency is for (default: 1)")
    p.add_argument("--check", type=int, default=4, help="random whole subnets timed to state the table's error "
                                                        "(default: 4)")
    p.add_argument("--out", required=True, help="the table's JSON file (new)")
    args = p.parse_args(argv)
    try:
        dev = parse_device(args.device, "--device")
        if args.batch < 1 or args.check < 0:
            raise BadInput(f"--batch {args.batch} must be >= 1 and --check {args.check} >= 0")
        out = Path(args.out)
        new_file(out, "--out")
        model, run_cfg = load_supernet(args.checkpoint)
        table = measure_table(model.to(dev, memory_format=torch.channels_last), run_cfg["resolution"], args.batch,
                              args.check)
    except BadInput as err:
        log.error("%s", err)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    log.info("latency table of %s, batch %d, %d px written to %s; predicted vs timed whole subnets: max error %s",
             table["device_name"], args.batch, table["resolution"], out,
             f"{100 * table['max_relative_error']:.1f}%" if table["check"] else "not checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
