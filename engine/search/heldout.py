"""The search's images: held-out training images score subnets, other training images re-calibrate BN,
and the validation split is read only for the chosen subnets (once each), so the reported val top-1 is
not the figure the search selected on. The held-out images are the ones the run never trained on
(engine.data.heldout, `python -m engine.train --heldout-images`); for a run that held none out, a seeded
subset of its training split, which the supernet has seen (said in the summary).

Everything streams: a loader yields batches and `OnDevice` moves one batch at a time to the device, so
host and device memory stay bounded by a few batches whatever the split size. The loader is the run's:
torchvision's, or with `dali` one DALI evaluation pipeline per stream (engine.data.dali; a pass cut short
is read to its end, so the next starts at the first image). DALI re-calibrates BN on centre-cropped
training images: its training pipeline would draw new crops for every subnet, the torchvision path's
fixed epoch-0 crops have no DALI counterpart.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Subset

from engine.data import datasets
from engine.data.dali import DaliLoader
from engine.data.datasets import ArrayDataset, ImageFolderDataset
from engine.data.heldout import default_count
from engine.data.loader import Data
from engine.data.transforms import val_transform
from engine.errors import BadInput


class OnDevice:
    """Re-iterable: each (images, labels) batch of `loader` (a DataLoader, or any re-iterable of CPU
    batches) moved to `device` (images channels-last) when it is reached; with `images_only`, the images
    alone (what BN re-calibration takes)."""

    def __init__(self, loader: Iterable, device: torch.device, images_only: bool = False) -> None:
        self.loader, self.device, self.images_only = loader, device, images_only

    def __iter__(self) -> Iterator:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images if self.images_only else (images, labels.to(self.device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class SearchImages:
    heldout: OnDevice                 # (images, labels) scoring every subnet: train images, val transform
    calib: OnDevice                   # images re-calibrating BN: other train images (DALI: centre-cropped)
    val: OnDevice                     # (images, labels) of the validation split, for the chosen subnets
    sizes: dict[str, int | bool | str]    # image counts, whether the held-out ones were trained on, loader


def split_train(n_train: int, heldout: int, calib: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint (held-out, calibration) index lists drawn by a `seed`ed permutation of the training split;
    BadInput when they do not fit in it."""
    if heldout + calib > n_train:
        asked = f"--heldout-images {heldout} + --calib-images {calib} exceed" if heldout else \
            f"--calib-images {calib} exceeds"
        raise BadInput(f"{asked} the {n_train} training images")
    order = random.Random(seed).sample(range(n_train), heldout + calib)
    return sorted(order[:heldout]), sorted(order[heldout:heldout + calib])


class DaliPasses:
    """Re-iterable: each pass is one epoch of one DALI evaluation pipeline over `dataset` (an in-memory or
    ImageFolder dataset) on `device`: (images channels-last, labels) batches in dataset order. A pass cut
    short is read to its end when it stops, so the next pass starts at the first image."""

    def __init__(self, dataset: ArrayDataset | ImageFolderDataset, kind: str, resolution: int, batch_size: int,
                 threads: int, device: torch.device) -> None:
        device_id = None if device.type != "cuda" else \
            device.index if device.index is not None else torch.cuda.current_device()
        self.loader = DaliLoader(dataset, batch_size, train=False, kind=kind, resolution=resolution,
                                 num_threads=threads, device_id=device_id)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        finished = False
        try:
            yield from self.loader
            finished = True
        finally:
            if not finished:
                for _ in self.loader:
                    pass

    def __len__(self) -> int:
        return len(self.loader)


def search_images(data: Data, heldout: int | None, calib: int, val: int | None, batch_size: int, workers: int,
                  seed: int, device: torch.device, dali: bool = False) -> SearchImages:
    """The three streams of the search (see the module docstring); `None` counts take the defaults: all
    the images the run held out, else engine.data.heldout's default."""
    if data.heldout is not None:
        if heldout is not None and heldout > len(data.heldout):
            raise BadInput(f"--heldout-images {heldout} exceeds the {len(data.heldout)} training images the run "
                           "held out (python -m engine.train --heldout-images)")
        scored, everything = data.heldout, range(len(data.heldout))   # fewer: a seeded sample, every class
        held_idx = everything if heldout is None else sorted(random.Random(seed).sample(everything, heldout))
        calib_idx = split_train(len(data.train), 0, calib, seed)[1]
    else:
        heldout = default_count(data.kind, len(data.train)) if heldout is None else heldout
        held_idx, calib_idx = split_train(len(data.train), heldout, calib, seed)
        scored = datasets.SeededDataset(data.train.base, val_transform(data.kind, data.resolution), data.train.seed)
    data.train.set_epoch(0)
    val_idx = range(min(val, len(data.val)) if val is not None else len(data.val))

    def loader(dataset: datasets.SeededDataset, indices: Iterable[int]) -> Iterable:
        if dali:
            return DaliPasses(dataset.base.subset(list(indices)), data.kind, data.resolution, batch_size,
                              max(workers, 1), device)
        return DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, num_workers=workers,
                          pin_memory=device.type == "cuda")

    return SearchImages(OnDevice(loader(scored, held_idx), device),
                        OnDevice(loader(data.train, calib_idx), device, images_only=True),
                        OnDevice(loader(data.val, val_idx), device),
                        {"heldout_images": len(held_idx), "calib_images": len(calib_idx), "val_images": len(val_idx),
                         "train_split": len(data.train), "val_split": len(data.val),
                         "heldout_seen_in_training": data.heldout is None, "loader": "dali" if dali else "torchvision"})
