"""DALI data pipeline (`--dali`): JPEG decoding on the GPU (CPU operators with device_id=None), with
the same augmentations as the torchvision path (engine/data/transforms.py), distribution-wise.

Sources
  One external source for both kinds of data, reading the samples engine.data.sharding assigns to this
  rank (the torchvision loader's rule: every sample at most once per epoch across ranks, the same
  number of full batches on every rank), starting at (start_epoch, skip_batches) for an exact
  mid-epoch resume. ImageFolder trees of JPEGs: the encoded bytes; train: decode + random-resized-crop
  (area 0.08-1, ratio 3/4-4/3) fused in the decoder, resize, then the common training tail; val:
  resize (R / 0.875) + centre crop. In-memory arrays (CIFAR python batches, the built-in digits):
  train: padded random crop, then the common training tail.
  Training tail: [AutoAugment: ImageNet, reduced-CIFAR-10 or SVHN policy by data kind], flip (not for
  digits), normalise, [random erasing] (the pipeline is built with conditionals for AutoAugment).
Outputs are channels-last (N, 3, R, R) float tensors (float16/bfloat16/float32) and int64 labels.

Elastic resolution: pass `resolution_fn(iteration) -> int`; the resize size is an external-source
input computed from the iteration index inside the pipeline, so each step gets its resolution with no
rebuild and no lag from prefetching (a value set from Python between steps would arrive
prefetch_queue_depth batches late).

Bad input: a missing path or empty class folder fails while listing files (engine.data.index); a
file that is not a JPEG, or a truncated one (DALI's CPU decoder was seen to crash the process on one),
fails up front naming it (engine.data.checks, shared with the torchvision loader and cached per folder);
with skip_corrupt=True every file is also decoded once and the bad ones are left out and counted. An
error DALI raises while decoding (a corrupt JPEG body: DALI's message does not name the file) is
re-raised naming the unreadable files, found by a time-bounded scan on that error path (a ValueError:
bad input).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch

from engine.data import sharding
from engine.data.datasets import ArrayDataset, ImageFolderDataset, readable
from engine.data.transforms import MEAN, STD

log = logging.getLogger("engine.data.dali")
# AutoAugment policy per data kind, as the torchvision path (engine/data/transforms.py) uses them
POLICIES = {"imagenet": "image_net", "cifar": "reduced_cifar10", "digits": "svhn"}


def dali_available() -> tuple[bool, str]:
    """(available, why) for nvidia-dali."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return False, f"nvidia-dali is not installed ({err}); pip install -e .[dali]"
    return True, "nvidia-dali " + nvidia.dali.__version__


def unreadable_files(paths: list[str], limit: int = 5, seconds: float = 120.0) -> list[str]:
    """Up to `limit` files that fail to decode, scanning for at most `seconds` (error path only)."""
    bad, deadline = [], time.monotonic() + seconds
    for path in paths:
        if len(bad) >= limit or time.monotonic() > deadline:
            break
        if not readable(path):
            bad.append(path)
    return bad


class DaliLoader:
    """One rank's loader over `dataset` (an ImageFolderDataset or ArrayDataset): each `iter()` is one
    epoch of (images (N, 3, R, R) channels-last, labels (N,)) on the pipeline's device; a partial
    last batch is dropped in training and kept in evaluation. `with_index=True` also yields the
    dataset indices of the samples."""

    def __init__(self, dataset: ImageFolderDataset | ArrayDataset, batch_size: int, train: bool, kind: str,
                 resolution: int, seed: int = 0, rank: int = 0, world: int = 1, device_id: int | None = None,
                 num_threads: int = 2, dtype: torch.dtype = torch.float32, auto_augment: bool = False,
                 random_erase: float = 0.0, resolution_fn: Callable[[int], int] | None = None,
                 skip_corrupt: bool = False, with_index: bool = False, start_epoch: int = 0,
                 skip_batches: int = 0) -> None:
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(why)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.dataset, self.batch_size, self.train, self.kind = dataset, batch_size, train, kind
        self.rank, self.world, self.seed, self.with_index = rank, world, seed, with_index
        self.start_epoch, self.skip_batches, self._order = start_epoch, skip_batches, (-1, np.zeros(0, np.int64))
        self.resolution_fn = resolution_fn or (lambda iteration: resolution)
        self.dtype, self.skipped, self.epoch = dtype, 0, 0
        self.auto_augment, self.random_erase = auto_augment and train, random_erase if train else 0.0
        if isinstance(dataset, ImageFolderDataset):
            bad = []
            if not dataset.checked_jpeg_only:       # load_data's check (rank 0's, for every rank) is not redone
                dataset, bad = dataset.verified(jpeg_only=True, skip_corrupt=skip_corrupt, workers=num_threads)
            self.skipped = len(bad)
            if bad:
                log.warning("skipped %d unreadable or non-JPEG files under %s (first: %s)", len(bad), dataset.root,
                            bad[0])
            self._paths, labels = [p for p, _ in dataset.samples], [label for _, label in dataset.samples]
            read, pad = (lambda i: np.fromfile(self._paths[i], dtype=np.uint8)), 0
        elif isinstance(dataset, ArrayDataset):
            labels = dataset.labels.tolist()
            pad = {"cifar": 4, "digits": 2}.get(kind, 0) if train else 0
            padded = np.pad(dataset.images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else dataset.images
            read = padded.__getitem__
        else:
            raise TypeError(f"DALI needs an ImageFolder or in-memory array dataset, got {type(dataset).__name__}")
        self.num_samples = len(labels)
        # evaluation: the last partial batch is padded with the shard's last sample; the iterator trims it
        shard = sharding.eval_shard(self.num_samples, rank, world)
        self._eval = np.array(shard + shard[-1:] * (-len(shard) % batch_size), np.int64)
        # labels stay on the output device: looked up there by index, no blocking copy per batch
        self._labels = torch.tensor(labels, dtype=torch.int64,
                                    device="cpu" if device_id is None else torch.device("cuda", device_id))
        with warnings.catch_warnings():      # DALI's own deprecated aliases
            warnings.simplefilter("ignore")
            pipe = self._pipeline(read, isinstance(dataset, ImageFolderDataset), pad, num_threads, device_id)
            size = {"size": len(shard), "last_batch_padded": True} if not train else {}
            try:                                # the iterator runs the pipeline ahead (prefetch) already
                self._iterator = DALIGenericIterator(
                    pipe, ["images", "index"], auto_reset=True,
                    last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL, **size)
            except RuntimeError as err:
                raise self._decode_error(err) from err

    def _indices(self, dali_epoch: int) -> np.ndarray:
        """Dataset indices of the pipeline's epoch `dali_epoch` on this rank, in reading order."""
        if not self.train:
            return self._eval
        if self._order[0] != dali_epoch:            # one permutation per epoch, not per sample
            batches = sharding.epoch_batches(self.num_samples, self.batch_size, self.seed,
                                             self.start_epoch + dali_epoch, self.rank, self.world)
            skip = self.skip_batches if dali_epoch == 0 else 0
            self._order = (dali_epoch, np.array(batches[skip:], np.int64).reshape(-1))
        return self._order[1]

    # ---- pipelines ---------------------------------------------------------------------------
    def _normalise(self, images, fn, types, mirror):
        scale = 255.0
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC", mirror=mirror,
            mean=[m * scale for m in MEAN[self.kind]], std=[s * scale for s in STD[self.kind]])

    def _train_tail(self, images, size, fn, types):
        """The training augmentations after cropping/resizing, as the torchvision path applies them:
        [AutoAugment (uint8)], flip (not for digits), normalise, [random erasing]."""
        if self.auto_augment:
            from nvidia.dali.auto_aug import auto_augment as aa

            images = aa.auto_augment(images, policy_name=POLICIES[self.kind], shape=size)
        images = self._normalise(images, fn, types, fn.random.coin_flip() if self.kind != "digits" else 0)
        if self.random_erase > 0:
            images = self._random_erase(images, fn, types)
        return images

    def _random_erase(self, images, fn, types):
        """torchvision's RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0) on the normalised
        image; an erased box larger than the image is clipped to it (torchvision retries instead)."""
        import nvidia.dali.math as dmath

        area = fn.random.uniform(range=(0.02, 0.33))
        ratio = dmath.exp(fn.random.uniform(range=(math.log(0.3), math.log(3.3))))
        h = dmath.min(dmath.sqrt(area * ratio), 1.0)
        w = dmath.min(dmath.sqrt(area / ratio), 1.0)
        anchor = fn.stack(fn.random.uniform(range=(0.0, 1.0)) * (1.0 - h), fn.random.uniform(range=(0.0, 1.0)) * (1.0 - w))
        apply = fn.cast(fn.random.coin_flip(probability=self.random_erase), dtype=types.FLOAT)
        return fn.erase(images, anchor=anchor, shape=fn.stack(h, w) * apply, axis_names="HW",
                        normalized_anchor=True, normalized_shape=True, fill_value=0.0)

    def _size_source(self, fn):
        res = self.resolution_fn
        return fn.external_source(source=lambda info: np.array([res(info.iteration)] * 2, np.float32),
                                  batch=False)

    def _pipeline(self, read: Callable[[int], np.ndarray], encoded: bool, pad: int, num_threads: int,
                  device_id: int | None):
        """`read(i)`: sample i's JPEG bytes (`encoded`) or HWC uint8 image padded by `pad` pixels."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        loader, native = self, None if encoded else list(self.dataset.images.shape[1:3])

        def sample(info):
            order = loader._indices(info.epoch_idx)
            if info.idx_in_epoch >= len(order):
                raise StopIteration
            i = int(order[info.idx_in_epoch])
            return read(i), np.array([i], np.int32)

        # AutoAugment picks its operations with `if` on data nodes: DALI needs conditionals enabled
        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id,
                      seed=self.seed * 1000 + self.rank, enable_conditionals=self.auto_augment)
        def pipeline():
            data, index = fn.external_source(source=sample, num_outputs=2, batch=False)
            size = self._size_source(fn)
            if encoded:
                return self._decode(data, size, fn, types, "mixed" if device_id is not None else "cpu"), index
            images = data.gpu() if device_id is not None else data
            if not self.train:
                return self._normalise(fn.resize(images, size=size), fn, types, 0), index
            if pad:                                              # padded random crop at native size
                images = fn.crop(images, crop=native, crop_pos_x=fn.random.uniform(range=(0, 1)),
                                 crop_pos_y=fn.random.uniform(range=(0, 1)))
            return self._train_tail(fn.resize(images, size=size), size, fn, types), index

        return pipeline()

    def _decode(self, jpegs, size, fn, types, device: str):
        """Decoded, cropped and augmented JPEGs (train) or resized and centre-cropped ones (val)."""
        if self.train:
            images = fn.decoders.image_random_crop(jpegs, device=device, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
            return self._train_tail(fn.resize(images, size=size), size, fn, types)
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB)
        images = fn.crop(fn.resize(images, resize_shorter=size[0] / 0.875), crop=size)
        return self._normalise(images, fn, types, 0)

    # ---- iteration -------------------------------------------------------------------------------
    def _decode_error(self, err: RuntimeError) -> ValueError:
        """DALI's decoding error (which names no file) as a ValueError naming the unreadable files."""
        root = getattr(self.dataset, "root", "the in-memory dataset")
        named = ""
        if isinstance(self.dataset, ImageFolderDataset):
            bad = unreadable_files(self._paths)
            named = f"\nunreadable files: {', '.join(bad)}" if bad else ""
        return ValueError(f"DALI failed while decoding {root}: {err}{named}\nRe-run with --skip-corrupt to "
                          "verify every file and leave unreadable ones out.")

    def __len__(self) -> int:
        """Batches in a full epoch (training: engine.data.sharding.steps_per_epoch)."""
        if self.train:
            return sharding.steps_per_epoch(self.num_samples, self.batch_size, self.world)
        return -(-len(sharding.eval_shard(self.num_samples, self.rank, self.world)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        try:
            for batch in self._iterator:
                images = batch[0]["images"].permute(0, 3, 1, 2).to(self.dtype)   # NHWC -> channels-last NCHW
                index = batch[0]["index"].reshape(-1).long()                     # (CPU output)
                labels = self._labels[index.to(self._labels.device, non_blocking=True)]
                yield (images, labels, index) if self.with_index else (images, labels)
        except RuntimeError as err:
            raise self._decode_error(err) from err
        self.epoch += 1
