"""Datasets: the built-in digits set, CIFAR-10/100 python batches, and ImageFolder trees of JPEGs.

All return (image uint8 tensor (3, H, W), label int). Augmentation randomness is seeded per
(seed, epoch, index), so a run resumed mid-epoch, or read by any number of workers, sees the same
augmented samples as an uninterrupted one.
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from engine.data import checks
from engine.data.index import FolderIndex, scan



class SeededDataset(Dataset):
    """Applies `transform` to `base[i]` under an RNG seeded from (seed, epoch, i)."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), label


class ArrayDataset(Dataset):
    """In-memory images: uint8 (N, H, W, 3) numpy array and int labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        # contiguous: CIFAR's batches arrive transposed, and DALI's external source takes dense arrays only
        self.images, self.labels, self.classes = np.ascontiguousarray(images), labels.astype(np.int64), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1), int(self.labels[index])

    def subset(self, indices: list[int]) -> "ArrayDataset":
        """The rows `indices`, as a dataset of their own."""
        return ArrayDataset(self.images[indices], self.labels[indices], self.classes)


def digits(resolution: int = 32, val_fraction: float = 0.2) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) upscaled to
    `resolution` px RGB; a fixed stratified split (every class in both parts)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1) / 16.0                  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = x.permute(0, 2, 3, 1).contiguous().numpy()
    labels = data.target
    order = np.random.default_rng(0).permutation(len(labels))
    val = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = order[labels[order] == c]
        val[members[: int(round(len(members) * val_fraction))]] = True
    classes = [str(c) for c in range(10)]
    return (ArrayDataset(images[~val], labels[~val], classes), ArrayDataset(images[val], labels[val], classes))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"cannot read CIFAR batch file {path}: {err}") from err


def cifar(path: str | os.PathLike) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python batch files in `path`."""
    root = Path(path)
    if (root / "data_batch_1").exists():
        train_files, test_files, key = [root / f"data_batch_{i}" for i in range(1, 6)], [root / "test_batch"], "labels"
        meta, names_key = root / "batches.meta", "label_names"
    elif (root / "train").exists():
        train_files, test_files, key = [root / "train"], [root / "test"], "fine_labels"
        meta, names_key = root / "meta", "fine_label_names"
    else:
        raise FileNotFoundError(f"{root} holds no CIFAR python batches (data_batch_1.. or train/test)")

    def load(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"missing CIFAR batch file {f}")
            d = _unpickle(f)
            if "data" not in d or key not in d:
                raise ValueError(f"{f} is not a CIFAR batch (no 'data' / {key!r})")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(d[key]))
        return np.concatenate(xs), np.concatenate(ys)

    classes = _unpickle(meta)[names_key] if meta.exists() else None
    (xtr, ytr), (xte, yte) = load(train_files), load(test_files)
    classes = classes or [str(c) for c in range(int(ytr.max()) + 1)]
    return ArrayDataset(xtr, ytr, classes), ArrayDataset(xte, yte, classes)


def readable(path: str) -> bool:
    """True when the image file decodes completely (PIL)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means unreadable
        return False


class ImageFolderDataset(Dataset):
    """An ImageFolder tree `root/<class>/<image>`, listed by engine.data.index.scan (or from an index
    listed elsewhere, e.g. by rank 0); an unreadable image raises naming the file."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 index: FolderIndex | None = None) -> None:
        index = index or scan(root, classes)
        self.root, self.classes, self.samples = index.root, index.classes, index.samples
        self.fingerprint = index.fingerprint
        self.checked_jpeg_only: bool | None = None    # set by `verified`: the check this copy passed

    def __len__(self) -> int:
        return len(self.samples)

    def verified(self, jpeg_only: bool = False, skip_corrupt: bool = False, workers: int = 8,
                 progress: bool = False) -> tuple["ImageFolderDataset", list[str]]:
        """(this dataset without the files engine.data.checks finds bad, their paths). Without
        `skip_corrupt` a bad file is a ValueError naming it; with it, every file is also decoded and the
        bad ones are left out."""
        bad = checks.bad_files([p for p, _ in self.samples], self.fingerprint, jpeg_only, skip_corrupt, workers,
                               progress)
        if bad and not skip_corrupt:
            path, why = next(iter(bad.items()))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"{path} {why}{more}: remove it, or pass --skip-corrupt to leave such files out")
        kept = copy.copy(self)
        kept.samples = [s for s in self.samples if s[0] not in bad]
        kept.checked_jpeg_only = jpeg_only
        if not kept.samples:
            raise ValueError(f"no readable {'JPEG ' if jpeg_only else ''}images under {self.root}")
        return kept, list(bad)

    def subset(self, indices: list[int]) -> "ImageFolderDataset":
        """The samples `indices` (the same tree, classes and checks), as a dataset of their own."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        return part

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        path, label = self.samples[index]
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except Exception as err:  # noqa: BLE001 - torchvision raises several types for bad files
            raise ValueError(f"cannot decode image {path}: {err}") from err
        return image, label
