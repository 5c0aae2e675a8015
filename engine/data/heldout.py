"""Training images held out of training, for the search's fitness (engine.search): as OFA does, a fixed
part of the training split is never trained on, so the search ranks subnets on images the supernet has
not seen, and the validation split stays for the chosen subnet's reported top-1.

The set is chosen by a seeded hash of each sample's key (an ImageFolder file's path relative to its
tree, an in-memory array's row), the `count` smallest hashes: the same images are held out whatever
order the files are listed in, and a file another check left out changes the set by one image at most.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from engine.data.datasets import ArrayDataset, ImageFolderDataset
from engine.errors import BadInput

IMAGENET_HELDOUT = 10_000       # OFA's held-out subset of the ImageNet training split (valid_size)


def default_count(kind: str, n_train: int) -> int:
    """OFA's default: 10,000 training images for ImageNet, a tenth of the training split otherwise."""
    return IMAGENET_HELDOUT if kind == "imagenet" else max(1, n_train // 10)


def _keys(base: ArrayDataset | ImageFolderDataset) -> Sequence[str]:
    if isinstance(base, ImageFolderDataset):
        root = str(base.root).rstrip("/") + "/"
        return [path.removeprefix(root) for path, _ in base.samples]
    return [str(i) for i in range(len(base))]


def held_out_indices(base: ArrayDataset | ImageFolderDataset, count: int, seed: int) -> list[int]:
    """Sorted indices into `base` of the `count` samples held out under `seed`; BadInput when `count`
    leaves no training image."""
    if not 0 <= count < len(base):
        raise BadInput(f"--heldout-images {count} must be in [0, {len(base)}): the training split has {len(base)} "
                       "images and training needs some")

    def rank(key: str) -> bytes:
        return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()

    keys = _keys(base)
    return sorted(sorted(range(len(keys)), key=lambda i: rank(keys[i]))[:count])


def split(base: ArrayDataset | ImageFolderDataset, count: int,
          seed: int) -> tuple[ArrayDataset | ImageFolderDataset, ArrayDataset | ImageFolderDataset]:
    """(the training images left for training, the `count` held out), each of `base`'s type."""
    held = held_out_indices(base, count, seed)
    chosen = set(held)
    return base.subset([i for i in range(len(base)) if i not in chosen]), base.subset(held)
