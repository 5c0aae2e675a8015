"""Training images held out of training, for the search's fitness (engine.search): as OFA does, a fixed
part of the training split is never trained on, so the search ranks subnets on images the supernet has
not seen, and the validation split stays for the chosen subnet's reported top-1.

The set is chosen by a seeded hash of each sample's key (an ImageFolder file's path relative to its
tree, an in-memory array's row), the `count` smallest hashes, over the split as listed, before any file
check left files out: the same images are held out whatever order the files are listed in and whichever
files a check (--skip-corrupt, DALI's JPEG-only) dropped, so training and the search agree.
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Sequence

from engine.data.datasets import ArrayDataset, ImageFolderDataset
from engine.errors import BadInput

IMAGENET_HELDOUT = 10_000       # OFA's held-out subset of the ImageNet training split (valid_size)


def default_count(kind: str, n_train: int) -> int:
    """OFA's default: 10,000 training images for ImageNet (a tenth of a smaller tree), a tenth of the
    training split otherwise."""
    tenth = max(1, n_train // 10)
    return min(IMAGENET_HELDOUT, tenth) if kind == "imagenet" else tenth


def _key(base: ArrayDataset | ImageFolderDataset, path_or_row: str | int) -> str:
    if isinstance(base, ImageFolderDataset):
        return str(path_or_row).removeprefix(str(base.root).rstrip("/") + "/")
    return str(path_or_row)


def held_out_keys(keys: list[str], count: int, seed: int) -> set[str]:
    """The `count` keys of smallest seeded hash; BadInput when `count` leaves no training image."""
    if not 0 <= count < len(keys):
        raise BadInput(f"--heldout-images {count} must be in [0, {len(keys)}): the training split has {len(keys)} "
                       "images and training needs some")
    return set(heapq.nsmallest(count, keys, key=lambda k: hashlib.blake2b(f"{seed}:{k}".encode(),
                                                                           digest_size=8).digest()))


def split(base: ArrayDataset | ImageFolderDataset, count: int, seed: int, left_out: Sequence[str] = ()
          ) -> tuple[ArrayDataset | ImageFolderDataset, ArrayDataset | ImageFolderDataset]:
    """(the training images left for training, the held-out ones), each of `base`'s type: `count` chosen
    over `base` and the files `left_out` of it by a check (paths), so a dropped file is not replaced."""
    rows = [path for path, _ in base.samples] if isinstance(base, ImageFolderDataset) else range(len(base))
    keys = [_key(base, r) for r in rows]
    held = held_out_keys(keys + [_key(base, p) for p in left_out], count, seed)
    inside = [k in held for k in keys]
    return (base.subset([i for i, h in enumerate(inside) if not h]),
            base.subset([i for i, h in enumerate(inside) if h]))
