"""Images/s and CPU cores used by the DALI pipeline vs the torchvision DataLoader on the same files, side by side.

Makes its own data: JPEGs at ImageNet-like sizes (random 375x500 crops of the real photos that
scikit-learn ships) for the 224-px ImageNet-style path, and a 32-px in-memory array set (CIFAR-style).
The torchvision loader uses all CPU cores as workers; DALI decodes on the GPU when there is one
(`mixed` decoder; CPU operators otherwise). CPU cores used = CPU seconds of this process and its
worker processes / wall seconds, over the timed epochs.

  python bench/loader_throughput.py                  # 2,000 JPEGs, JSON in bench/results/
  python bench/loader_throughput.py --images 64 --epochs 1 --no-save   # smoke
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Budget, environment, progress, write_json  # noqa: E402
from engine.data import datasets  # noqa: E402
from engine.data.dali import DaliLoader  # noqa: E402
from engine.data.transforms import train_transform  # noqa: E402


def make_jpegs(root: Path, images: int, classes: int = 4) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - 375), rng.integers(0, photo.shape[1] - 500)
        Image.fromarray(photo[y:y + 375, x:x + 500]).save(folder / f"{i}.jpg", quality=90)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live descendant (Linux /proc; this process only elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime+stime
    if not stats:
        times = os.times()
        return times.user + times.system
    family, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in family:
                family.add(pid)
                frontier.append(pid)
    return sum(stats[pid][1] for pid in family if pid in stats)


def rate(loader, epochs: int, device: torch.device) -> tuple[float, float]:
    """(images per second, CPU cores used) over `epochs` passes (batches moved to `device`), after one warm-up pass."""
    for epoch in range(epochs + 1):
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            count, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if epoch:
                count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    return count / wall, (cpu_seconds() - c0) / wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="JPEG files made for the 224-px path")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed passes (after one warm-up pass)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="torchvision workers and DALI threads")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="wall-clock budget; data sets that would start after it are reported as skipped")
    p.add_argument("--out", metavar="DIR", help="write loader.json there (default bench/results/)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    budget = Budget(args.max_seconds)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_id = 0 if device.type == "cuda" else None
    rows: list[dict] = []
    payload = {"env": environment(device), "args": vars(args), "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"making {args.images} JPEGs (375x500)")
        make_jpegs(Path(tmp), args.images)
        folder = datasets.ImageFolderDataset(tmp)
        rng = np.random.default_rng(0)
        arrays = datasets.ArrayDataset(rng.integers(0, 255, (args.images * 8, 32, 32, 3), dtype=np.uint8),
                                       np.arange(args.images * 8) % 10, [str(c) for c in range(10)])
        for name, data, kind, res in (("imagefolder_224px", folder, "imagenet", 224),
                                      ("arrays_32px", arrays, "cifar", 32)):
            if budget.spent():
                rows.append({"data": name, "skipped": "--max-seconds budget spent"})
                progress(f"{name}: skipped (budget spent)")
                continue
            tv = torch.utils.data.DataLoader(datasets.SeededDataset(data, train_transform(kind, res)),
                                             batch_size=args.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
            row = {"data": name, "resolution": res, "images": len(data),
                   "dali_device": "gpu (mixed decoder)" if device_id is not None else "cpu"}
            row["torchvision_img_s"], row["torchvision_cpu_cores"] = rate(tv, args.epochs, device)
            del tv
            dl = DaliLoader(data, args.batch, True, kind, res, device_id=device_id,
                            num_threads=max(1, args.workers))
            row["dali_img_s"], row["dali_cpu_cores"] = rate(dl, args.epochs, device)
            # a DALI pipeline left to the garbage collector would be collected inside the next forked
            # DataLoader worker, where its shutdown (external-source threads) never returns
            del dl
            gc.collect()
            row["dali_vs_torchvision"] = row["dali_img_s"] / row["torchvision_img_s"]
            rows.append(row)
            progress(f"{name:18s} torchvision ({args.workers} workers) {row['torchvision_img_s']:9.1f} img/s "
                     f"{row['torchvision_cpu_cores']:5.1f} cores   DALI ({row['dali_device']}) "
                     f"{row['dali_img_s']:9.1f} img/s {row['dali_cpu_cores']:5.1f} cores   "
                     f"{row['dali_vs_torchvision']:.2f}x")
            if not args.no_save:
                write_json("loader", payload, args.out)
    if not args.no_save:
        print("wrote", write_json("loader", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
