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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(path: str) -> bool:
    """True when the file starts with the JPEG magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(3) == JPEG_MAGIC
    except OSError:
        return False


def jpeg_truncated(path: str, tail: int = 1024) -> bool:
    """True when a JPEG file has no end-of-image marker (FF D9) in its last `tail` bytes: cut short
    (a cheap check, no decoding; some decoders crash on such files instead of failing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail))
            return b"\xff\xd9" not in f.read()
    except OSError:
        return True


def readable(path: str, jpeg_only: bool = False) -> bool:
    """True when the image file decodes completely (PIL), and is a JPEG if `jpeg_only`."""
    from PIL import Image

    if jpeg_only and not is_jpeg(path):
        return False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means unreadable
        return False


class ImageFolderDataset(Dataset):
    """An ImageFolder tree `root/<class>/<image>`; checked up front (missing path, no classes, an
    empty class folder) and an unreadable image raises naming the file."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not found:
            raise ValueError(f"{self.root} has no class sub-folders (expected root/<class>/<image>.jpg)")
        self.classes = classes or found
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                raise FileNotFoundError(f"class folder {folder} is missing")
            files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(f, label) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    def without_unreadable(self, jpeg_only: bool = False, workers: int = 8) -> tuple["ImageFolderDataset", list[str]]:
        """(a copy holding only the files that decode (and are JPEG, with `jpeg_only`: DALI's file reader
        decodes JPEG only), the paths left out). Every file is decoded once, on `workers` threads."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, workers)) as pool:
            ok = list(pool.map(lambda sample: readable(sample[0], jpeg_only), self.samples))
        kept = copy.copy(self)
        kept.samples = [s for s, good in zip(self.samples, ok) if good]
        skipped = [s[0] for s, good in zip(self.samples, ok) if not good]
        if not kept.samples:
            raise ValueError(f"no readable {'JPEG ' if jpeg_only else ''}images under {self.root}")
        return kept, skipped

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image, read_file

        path, label = self.samples[index]
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except Exception as err:  # noqa: BLE001 - torchvision raises several types for bad files
            raise ValueError(f"cannot decode image {path}: {err}") from err
        return image, label
