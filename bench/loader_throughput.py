"""Images/s of the DALI pipeline vs the torchvision DataLoader on the same files, side by side.

Makes its own data: JPEGs (real photos from scikit-learn, random crops of ~375x500) for the 224-px
ImageNet-style path and a 32-px in-memory array set (CIFAR-style). The torchvision loader uses all
CPU cores as workers; DALI decodes on the GPU when there is one (CPU operators otherwise).

  python bench/loader_throughput.py                  # JSON in bench/results/
  python bench/loader_throughput.py --images 64 --epochs 1 --no-save   # smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_json  # noqa: E402
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


def rate(loader, epochs: int, device: torch.device) -> float:
    """Images per second over `epochs` passes (batches moved to `device`), after one warm-up pass."""
    for epoch in range(epochs + 1):
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            count, t0 = 0, time.perf_counter()
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if epoch:
                count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_id = 0 if device.type == "cuda" else None
    env, rows = environment(device), []
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp), args.images)
        folder = datasets.ImageFolderDataset(tmp)
        rng = np.random.default_rng(0)
        arrays = datasets.ArrayDataset(rng.integers(0, 255, (args.images * 8, 32, 32, 3), dtype=np.uint8),
                                       np.arange(args.images * 8) % 10, [str(c) for c in range(10)])
        for name, data, kind, res in (("imagefolder_224px", folder, "imagenet", 224),
                                      ("arrays_32px", arrays, "cifar", 32)):
            tv = torch.utils.data.DataLoader(datasets.SeededDataset(data, train_transform(kind, res)),
                                             batch_size=args.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
            dl = DaliLoader(data, args.batch, True, kind, res, device_id=device_id,
                            num_threads=max(1, args.workers))
            row = {"data": name, "resolution": res, "torchvision_img_s": rate(tv, args.epochs, device),
                   "dali_img_s": rate(dl, args.epochs, device), "dali_device": "gpu" if device_id is not None else "cpu"}
            row["dali_vs_torchvision"] = row["dali_img_s"] / row["torchvision_img_s"]
            rows.append(row)
            print(f"{name:18s} torchvision ({args.workers} workers) {row['torchvision_img_s']:9.1f} img/s   "
                  f"DALI ({row['dali_device']}) {row['dali_img_s']:9.1f} img/s   {row['dali_vs_torchvision']:.2f}x",
                  flush=True)
    if not args.no_save:
        print("wrote", write_json("loader", {"env": env, "args": vars(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
