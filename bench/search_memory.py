"""Peak host memory (RSS) of `python -m engine.search` as the dataset grows: it should not grow with it.

Generates ImageFolder trees (train/ and val/, ImageNet-like JPEGs: 375x500 crops of scikit-learn's
photos, bench/loader_throughput.make_jpegs) of increasing size, and a checkpoint of a small randomly
initialised ImageNet-variant supernet whose run config points at the tree (ImageNet transforms:
resize + crop to --resolution). Each size runs the whole search (held-out fitness on a tenth of the
training split, BN calibration, val top-1 of the chosen subnet over the whole val split, export)
in a fresh process and records that process's peak RSS (getrusage ru_maxrss).

  python bench/search_memory.py                       # 1,000 / 2,000 / 4,000 training images
  python bench/search_memory.py --sizes 100 --no-save  # smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import environment, write_json  # noqa: E402
from bench.loader_throughput import make_jpegs  # noqa: E402

CHILD = ("import json, resource, sys; from engine.search.__main__ import main; rc = main(sys.argv[1:]); "
         "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
         "print('RESULT', json.dumps({'rc': rc, 'peak_rss_mb': peak}))")


def make_checkpoint(path: Path, tree: Path, resolution: int) -> float:
    """A random supernet's checkpoint for `tree`; returns the midpoint MFLOPs budget."""
    from engine.search.costs import FlopTable
    from engine.search.evolution import SearchSpace
    from engine.supernet import ofa_mobilenetv3
    from engine.train.checkpoint import save_atomic

    torch.manual_seed(0)
    model = ofa_mobilenetv3("imagenet", num_classes=4, kernel_sizes=(3, 5), expand_ratios=(3, 4), depths=(2, 3))
    config = {"dataset": "imagenet", "data": str(tree), "resolution": resolution, "seed": 0, "workers": 0}
    save_atomic({"model": model.state_dict(), "arch": model.spec.to_dict(), "config": config}, path)
    table, space = FlopTable(model, resolution), SearchSpace(model.spec, model.n_stages)
    return (table(space.smallest()) + table(space.largest())) / 2e6


def measure(root: Path, images: int, resolution: int) -> dict:
    tree = root / f"tree{images}"
    make_jpegs(tree / "train", images)
    make_jpegs(tree / "val", images // 4)
    budget = make_checkpoint(root / f"ck{images}.pt", tree, resolution)
    argv = ["--checkpoint", str(root / f"ck{images}.pt"), "--max-mflops", f"{budget:.3f}", "--population", "2",
            "--generations", "1", "--compare-random", "0", "--heldout-images", str(images // 10),
            "--calib-images", "64", "--batch-size", "64",
            "--no-progress", "--device", "cpu", "--out", str(root / f"out{images}")]
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[0][7:]) if lines else {"rc": run.returncode}
    if result["rc"] != 0:
        raise RuntimeError(f"search failed on {images} images:\n{run.stderr[-2000:]}")
    summary = json.loads((root / f"out{images}" / "search.json").read_text())
    return {"train_images": images, "val_images": images // 4, **summary["data"], **result,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000], help="training images per tree")
    p.add_argument("--resolution", type=int, default=64, help="the run's resolution (default: 64)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.sizes:
            rows.append(measure(Path(tmp), n, args.resolution))
            print(json.dumps(rows[-1]), flush=True)
    peaks = [r["peak_rss_mb"] for r in rows]
    record = {"note": "peak RSS of python -m engine.search per dataset size (fresh process each); JPEGs 375x500 "
                      f"decoded at full size, network at {args.resolution} px; held-out = a tenth of train, "
                      "val = whole split", "rows": rows, "peak_rss_spread_mb": max(peaks) - min(peaks),
              "env": environment(torch.device("cpu"))}
    print(json.dumps({k: v for k, v in record.items() if k != "env"}, indent=1))
    if not args.no_save:
        print("written", write_json("search-memory", record))


if __name__ == "__main__":
    main()
