"""BN re-calibration: reset and re-estimate the running statistics of the active subnet."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from engine.elastic import ElasticBatchNorm2d


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Reset every ElasticBatchNorm2d's running stats and re-estimate them for the active subnet as
    the average of the batch statistics of `batches` (images, on the model's device).

    Returns the number of images seen. The model's train/eval mode and BN momenta are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, ElasticBatchNorm2d)]
    momenta, was_training = [bn.momentum for bn in bns], model.training
    for bn in bns:
        bn.reset_running_stats()
    model.train()
    seen = 0
    try:
        for i, images in enumerate(batches):
            for bn in bns:
                bn.momentum = 1.0 / (i + 1)   # running value = mean of the per-batch statistics
            model(images)
            seen += images.shape[0]
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrate_bn got no batches")
    return seen


@contextlib.contextmanager
def calibrated(model: nn.Module, cfg: dict, batches: Iterable[torch.Tensor]) -> Iterator[nn.Module]:
    """The supernet `model` set to subnet `cfg` with its BN statistics re-calibrated on `batches`, in
    eval mode; on exit the supernet's own running statistics, active subnet and mode come back."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    active, training = model.active_config(), model.training
    try:
        model.set_active_subnet(cfg)
        recalibrate_bn(model, batches)
        yield model.eval()
    finally:
        model.load_state_dict(saved, strict=False)
        model.set_active_subnet(active)
        model.train(training)
