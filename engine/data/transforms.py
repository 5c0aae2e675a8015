"""Train/val transforms on uint8 (3, H, W) tensors -> normalised float (3, R, R)."""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

MEAN = {"imagenet": (0.485, 0.456, 0.406), "cifar": (0.4914, 0.4822, 0.4465), "digits": (0.5, 0.5, 0.5)}
STD = {"imagenet": (0.229, 0.224, 0.225), "cifar": (0.2470, 0.2435, 0.2616), "digits": (0.5, 0.5, 0.5)}


def _normalise(kind: str) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN[kind], STD[kind])]


POLICIES = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar": v2.AutoAugmentPolicy.CIFAR10,
            "digits": v2.AutoAugmentPolicy.SVHN}


def train_transform(kind: str, resolution: int, auto_augment: bool = False,
                    random_erase: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """kind: "imagenet" (random-resized-crop (0.08, 1), flip), "cifar" (4-px padded random crop, flip),
    "digits" (2-px padded random crop, no flip); then [AutoAugment with the kind's policy: ImageNet,
    CIFAR-10, SVHN], normalise, [random erasing with probability `random_erase`]."""
    if kind == "imagenet":
        ops = [v2.RandomResizedCrop(resolution, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif kind == "cifar":
        ops = [v2.RandomCrop(resolution, padding=4), v2.RandomHorizontalFlip()]
    elif kind == "digits":
        ops = [v2.RandomCrop(resolution, padding=2)]
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    if auto_augment:
        ops.append(v2.AutoAugment(POLICIES[kind]))
    ops += _normalise(kind)
    if random_erase > 0:
        ops.append(v2.RandomErasing(random_erase))
    return v2.Compose(ops)


def val_transform(kind: str, resolution: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize (to 8/7 of the crop) + centre crop for ImageNet-style data, identity size otherwise."""
    if kind == "imagenet":
        return v2.Compose([v2.Resize(int(round(resolution / 0.875)), antialias=True), v2.CenterCrop(resolution)]
                          + _normalise(kind))
    return v2.Compose([v2.Resize(resolution, antialias=True)] + _normalise(kind))
