"""Build datasets and the torchvision DataLoaders (sharded per rank, resumable mid-epoch)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from engine.data import datasets, heldout, sharding
from engine.data.index import scan
from engine.data.transforms import train_transform, val_transform

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


log = logging.getLogger("engine.data")
T = TypeVar("T")


@dataclass
class Data:
    train: datasets.SeededDataset
    val: datasets.SeededDataset
    num_classes: int
    kind: str            # transform family: "digits", "cifar" or "imagenet"
    resolution: int
    skipped: list[str] = field(default_factory=list)     # image files left out by skip_corrupt
    heldout: datasets.SeededDataset | None = None        # training images never trained on (val transform)


def load_data(dataset: str, path: str | None, resolution: int, seed: int, auto_augment: bool = False,
              random_erase: float = 0.0, skip_corrupt: bool = False, jpeg_only: bool = False,
              workers: int = 8, share: Callable[[Callable[[], T]], T] | None = None, progress: bool = False,
              heldout_images: int | None = 0) -> Data:
    """dataset: "digits" (built in, no path), "cifar10"/"cifar100" (python batches in `path`),
    "imagenet" (ImageFolder trees `path`/train and `path`/val of JPEGs).

    ImageFolder trees are listed once and every file is checked up front (engine.data.checks: structure,
    JPEG-only with `jpeg_only` for DALI; cached per folder contents, on `workers` threads): a bad file is
    a ValueError naming it, or with `skip_corrupt` every file is also decoded and the bad ones are left
    out of both splits, so training, BN calibration and evaluation all see the same files.
    `share(fn)`: runs fn once per job and gives every rank its result (engine.train.distributed.from_rank0);
    by default fn runs here. `heldout_images` training images (None: engine.data.heldout's default) are
    held out of `train` under `seed` (engine.data.heldout), into `heldout`."""
    skipped: list[str] = []
    bad_train: list[str] = []
    if dataset == "digits":
        if path:
            raise ValueError("--dataset digits is built in and takes no --data path")
        train, val = datasets.digits(resolution)
        kind = "digits"
    elif dataset in ("cifar10", "cifar100"):
        if not path:
            raise ValueError(f"--dataset {dataset} needs --data PATH to the python batch files")
        train, val = datasets.cifar(path)
        kind = "cifar"
    elif dataset == "imagenet":
        if not path:
            raise ValueError("--dataset imagenet needs --data PATH holding train/ and val/ ImageFolder trees")
        (train, bad_train), (val, bad_val) = (share or (lambda fn: fn()))(
            lambda: _checked_trees(Path(path), jpeg_only, skip_corrupt, workers, progress))
        skipped = bad_train + bad_val
        kind = "imagenet"
        if skipped:
            log.warning("--skip-corrupt: left out %d unreadable%s image files (first: %s)", len(skipped),
                        " or non-JPEG" if jpeg_only else "", skipped[0])
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    listed = len(train) + len(bad_train)                  # the split before the checks left files out
    count = heldout.default_count(kind, listed) if heldout_images is None else heldout_images
    train, held = heldout.split(train, count, seed, bad_train) if count else (train, None)
    return Data(datasets.SeededDataset(train, train_transform(kind, resolution, auto_augment, random_erase), seed),
                datasets.SeededDataset(val, val_transform(kind, resolution), seed),
                len(train.classes), kind, resolution, skipped,
                None if held is None else datasets.SeededDataset(held, val_transform(kind, resolution), seed))


def _checked_trees(root: Path, jpeg_only: bool, skip_corrupt: bool, workers: int, progress: bool) -> list[tuple]:
    """[(train dataset, its bad files), (val dataset, its bad files)], listed and checked."""
    train = datasets.ImageFolderDataset(root / "train", index=scan(root / "train", progress=progress))
    val = datasets.ImageFolderDataset(root / "val", index=scan(root / "val", train.classes, progress))
    return [d.verified(jpeg_only, skip_corrupt, workers, progress) for d in (train, val)]


def default_workers() -> int:
    """Loader worker processes per training process: this process's CPUs shared among the processes
    torchrun starts on the node (LOCAL_WORLD_SIZE, e.g. one per GPU), less one for the training loop,
    at least 1, at most 8 (beyond that the decoder rarely pays on one GPU)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1))


def train_loader(data: Data, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 skip_batches: int = 0, workers: int = 0) -> DataLoader:
    """This rank's batches of epoch `epoch` (engine.data.sharding), starting after `skip_batches`
    batches (mid-epoch resume)."""
    batches = sharding.epoch_batches(len(data.train), batch_size, seed, epoch, rank, world)
    if not batches:
        raise ValueError(f"batch size {batch_size} x {world} ranks exceeds the {len(data.train)} training images")
    data.train.set_epoch(epoch)
    return DataLoader(data.train, batch_sampler=batches[skip_batches:], num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def steps_per_epoch(data: Data, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch."""
    return sharding.steps_per_epoch(len(data.train), batch_size, world)


def shard_loader(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
    """In-order loader over this rank's evaluation shard: every sample once overall."""
    subset = torch.utils.data.Subset(dataset, sharding.eval_shard(len(dataset), rank, world))
    return DataLoader(subset, batch_size=batch_size, num_workers=workers)


def calibration_batches(data: Data, images: int, batch_size: int, device: torch.device,
                        channels_last: bool = False) -> list[torch.Tensor]:
    """The first `images` training images (train augmentation, epoch 0), batched, on `device`."""
    data.train.set_epoch(0)
    subset = torch.utils.data.Subset(data.train, range(min(images, len(data.train))))
    out = []
    for x, _ in DataLoader(subset, batch_size=batch_size):
        x = x.to(device)
        out.append(x.to(memory_format=torch.channels_last) if channels_last else x)
    return out
