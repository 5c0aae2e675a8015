"""Build datasets and the torchvision DataLoaders (sharded per rank, resumable mid-epoch)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from engine.data import datasets
from engine.data.transforms import train_transform, val_transform

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


log = logging.getLogger("engine.data")


@dataclass
class Data:
    train: datasets.SeededDataset
    val: datasets.SeededDataset
    num_classes: int
    kind: str            # transform family: "digits", "cifar" or "imagenet"
    resolution: int
    skipped: list[str] = field(default_factory=list)     # image files left out by skip_corrupt


def load_data(dataset: str, path: str | None, resolution: int, seed: int, auto_augment: bool = False,
              random_erase: float = 0.0, skip_corrupt: bool = False, jpeg_only: bool = False,
              workers: int = 8) -> Data:
    """dataset: "digits" (built in, no path), "cifar10"/"cifar100" (python batches in `path`),
    "imagenet" (ImageFolder trees `path`/train and `path`/val of JPEGs).

    skip_corrupt: decode every image file once (on `workers` threads) and leave out the unreadable ones
    (and non-JPEG ones with `jpeg_only`, for DALI) from both splits, so training, BN calibration and
    evaluation all see the same files."""
    skipped: list[str] = []
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
        root = Path(path)
        train = datasets.ImageFolderDataset(root / "train")
        val = datasets.ImageFolderDataset(root / "val", classes=train.classes)
        kind = "imagenet"
        if skip_corrupt:
            (train, bad_train), (val, bad_val) = (d.without_unreadable(jpeg_only, workers) for d in (train, val))
            skipped = bad_train + bad_val
            if skipped:
                log.warning("--skip-corrupt: left out %d unreadable%s image files (first: %s)", len(skipped),
                            " or non-JPEG" if jpeg_only else "", skipped[0])
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return Data(datasets.SeededDataset(train, train_transform(kind, resolution, auto_augment, random_erase), seed),
                datasets.SeededDataset(val, val_transform(kind, resolution), seed),
                len(train.classes), kind, resolution, skipped)


def train_loader(data: Data, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 skip_batches: int = 0, workers: int = 0) -> DataLoader:
    """This rank's shard of epoch `epoch` (shuffled with the run's seed, incomplete batch dropped),
    starting after `skip_batches` batches (mid-epoch resume)."""
    sampler = DistributedSampler(data.train, world, rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    data.train.set_epoch(epoch)
    indices = list(sampler)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"batch size {batch_size} x {world} ranks exceeds the {len(data.train)} training images")
    return DataLoader(data.train, batch_sampler=batches[skip_batches:], num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def steps_per_epoch(data: Data, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch."""
    return (len(data.train) // world) // batch_size


def shard_loader(dataset: Dataset, batch_size: int, rank: int = 0, world: int = 1, workers: int = 0) -> DataLoader:
    """In-order loader over this rank's shard (indices rank, rank + world, ...): every sample once overall."""
    indices = list(range(rank, len(dataset), world))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers)


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
