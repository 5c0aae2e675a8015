"""DALI data pipeline (`--dali`): JPEG decoding on the GPU (CPU operators with device_id=None), with
the same augmentations as the torchvision path (engine/data/transforms.py), distribution-wise.

Sources
  ImageFolder trees of JPEGs: fn.readers.file, sharded by rank (shard_id/num_shards), a global
  permutation per epoch seeded with the run's seed (shuffle_after_epoch: every sample exactly once per
  epoch across ranks); train: decode + random-resized-crop (area 0.08-1, ratio 3/4-4/3) fused in the
  decoder, resize, then the common training tail; val: resize (R / 0.875) + centre crop.
  In-memory arrays (CIFAR python batches, the built-in digits): an external source over a per-epoch
  seeded permutation of this rank's shard; train: padded random crop, then the common training tail.
  Training tail: [AutoAugment: ImageNet, reduced-CIFAR-10 or SVHN policy by data kind], flip (not for
  digits), normalise, [random erasing] (the pipeline is built with conditionals for AutoAugment).
Outputs are channels-last (N, 3, R, R) float tensors (float16/bfloat16/float32) and int64 labels.

Elastic resolution: pass `resolution_fn(iteration) -> int`; the resize size is an external-source
input computed from the iteration index inside the pipeline, so each step gets its resolution with no
rebuild and no lag from prefetching (a value set from Python between steps would arrive
prefetch_queue_depth batches late).

Bad input: a missing path or empty class folder fails while listing files (engine.data.datasets); a
file that is not a JPEG, or a truncated one (no end-of-image marker: DALI's CPU decoder was seen to
crash the process on one), fails up front naming it; with skip_corrupt=True every file is decoded once
(ImageFolderDataset.without_unreadable, as the torchvision path does) and unreadable or non-JPEG ones
are left out and counted instead. An error DALI raises while decoding (a
corrupt JPEG body: DALI's message does not name the file) is re-raised naming the unreadable files,
found by a time-bounded scan on that error path (a ValueError: bad input).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch

from engine.data.datasets import ArrayDataset, ImageFolderDataset, is_jpeg, jpeg_truncated, readable
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


def checked_files(dataset: ImageFolderDataset, skip_corrupt: bool) -> tuple[list[str], list[int], int]:
    """(paths, labels, skipped). A non-JPEG file raises naming it; with skip_corrupt every file is decoded
    once and unreadable or non-JPEG ones are left out (ImageFolderDataset.without_unreadable)."""
    skipped = 0
    if skip_corrupt:
        dataset, bad = dataset.without_unreadable(jpeg_only=True)
        skipped = len(bad)
        if bad:
            log.warning("skipped %d unreadable or non-JPEG files under %s (first: %s)", skipped, dataset.root, bad[0])
    for path, _ in dataset.samples:
        if not is_jpeg(path):
            raise ValueError(f"{path} is not a JPEG file (DALI's file reader decodes JPEG only); "
                             "convert it, remove it, or pass --skip-corrupt")
        if jpeg_truncated(path):        # DALI's CPU decoder can crash the process on these
            raise ValueError(f"{path} is a truncated JPEG (no end-of-image marker); remove it, or pass "
                             "--skip-corrupt")
    return [p for p, _ in dataset.samples], [label for _, label in dataset.samples], skipped


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
                 skip_corrupt: bool = False, with_index: bool = False) -> None:
        ok, why = dali_available()
        if not ok:
            raise RuntimeError(why)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.dataset, self.batch_size, self.train, self.kind = dataset, batch_size, train, kind
        self.rank, self.world, self.seed, self.with_index = rank, world, seed, with_index
        self.resolution_fn = resolution_fn or (lambda iteration: resolution)
        self.dtype, self.skipped, self.epoch = dtype, 0, 0
        self.auto_augment, self.random_erase = auto_augment and train, random_erase if train else 0.0
        if isinstance(dataset, ImageFolderDataset):
            paths, labels, self.skipped = checked_files(dataset, skip_corrupt)
            self._paths, self.num_samples = paths, len(paths)
            build = lambda: self._file_pipeline(paths, batch_size, num_threads, device_id)  # noqa: E731
            reader = {"reader_name": "reader"}
        elif isinstance(dataset, ArrayDataset):
            labels = dataset.labels.tolist()
            self.num_samples = len(labels)
            pad = {"cifar": 4, "digits": 2}.get(kind, 0) if train else 0
            self._padded = np.pad(dataset.images, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else dataset.images
            self._shard = np.arange(rank, self.num_samples, world)
            build = lambda: self._array_pipeline(batch_size, num_threads, device_id, pad)  # noqa: E731
            reader = {"size": len(self._shard), "last_batch_padded": True}
        else:
            raise TypeError(f"DALI needs an ImageFolder or in-memory array dataset, got {type(dataset).__name__}")
        # labels stay on the output device: looked up there by index, no blocking copy per batch
        self._labels = torch.tensor(labels, dtype=torch.int64,
                                    device="cpu" if device_id is None else torch.device("cuda", device_id))
        with warnings.catch_warnings():      # DALI's own deprecated aliases; "set reader_name" (arrays)
            warnings.simplefilter("ignore")
            pipe = build()
            try:                                # the iterator runs the pipeline ahead (prefetch) already
                self._iterator = DALIGenericIterator(
                    pipe, ["images", "index"], auto_reset=True,
                    last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL, **reader)
            except RuntimeError as err:
                raise self._decode_error(err) from err

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

    def _file_pipeline(self, paths, batch_size, num_threads, device_id):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        decoder_device = "mixed" if device_id is not None else "cpu"

        # shuffle_after_epoch permutes with a fixed internal seed (identical on every shard): start
        # from a permutation drawn with the run's seed so the order still depends on it
        order = np.random.default_rng(self.seed).permutation(len(paths)) if self.train else np.arange(len(paths))

        # AutoAugment picks its operations with `if` on data nodes: DALI needs conditionals enabled
        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                      seed=self.seed * 1000 + self.rank, enable_conditionals=self.auto_augment)
        def pipeline():
            jpegs, index = fn.readers.file(files=[paths[i] for i in order], labels=order.tolist(),
                                           shard_id=self.rank, num_shards=self.world,
                                           shuffle_after_epoch=self.train, pad_last_batch=True, name="reader")
            size = self._size_source(fn)
            if self.train:
                images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                                       random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
                return self._train_tail(fn.resize(images, size=size), size, fn, types), index
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            images = fn.crop(fn.resize(images, resize_shorter=size[0] / 0.875), crop=size)
            return self._normalise(images, fn, types, 0), index

        return pipeline()

    def _array_pipeline(self, batch_size, num_threads, device_id, pad):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        loader = self
        native = list(self.dataset.images.shape[1:3])

        shard = len(self._shard)
        # whole batches only (a per-sample source ending mid-batch loses that batch): training drops
        # the remainder, evaluation pads with the last sample and the iterator trims the padding
        epoch_len = shard // batch_size * batch_size if self.train else -(-shard // batch_size) * batch_size

        def sample(info):
            if info.idx_in_epoch >= epoch_len:
                raise StopIteration
            order = loader._shard
            if loader.train:
                perm = np.random.default_rng((loader.seed, info.epoch_idx)).permutation(loader.num_samples)
                order = perm[loader.rank::loader.world][:len(loader._shard)]
            i = int(order[min(info.idx_in_epoch, shard - 1)])
            return loader._padded[i], np.array([i], np.int32)

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                      seed=self.seed * 1000 + self.rank, enable_conditionals=self.auto_augment)
        def pipeline():
            images, index = fn.external_source(source=sample, num_outputs=2, batch=False)
            if device_id is not None:
                images = images.gpu()
            size = self._size_source(fn)
            if not self.train:
                return self._normalise(fn.resize(images, size=size), fn, types, 0), index
            if pad:                                              # padded random crop at native size
                images = fn.crop(images, crop=native, crop_pos_x=fn.random.uniform(range=(0, 1)),
                                 crop_pos_y=fn.random.uniform(range=(0, 1)))
            return self._train_tail(fn.resize(images, size=size), size, fn, types), index

        return pipeline()

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
        shard = -(-self.num_samples // self.world) if self.world > 1 else self.num_samples
        return shard // self.batch_size if self.train else -(-shard // self.batch_size)

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
