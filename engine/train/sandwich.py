"""One training step: the teacher step (max net) or the sandwich (max, min, random subnets).

`sequential_step` is the reference: one forward and one backward per subnet, gradients summed
in .grad (aggregation "sum": a subnet's gradient is zero outside its slices, so no masks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.supernet import arch
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.train.losses import kd_loss, soft_labels

# which dimensions are elastic in each phase of OFA progressive shrinking (others stay at max)
ELASTIC_DIMS = {"kernel": ("ks",), "depth": ("ks", "d"), "width": ("ks", "d", "e"), "shrink": ("ks", "d", "e")}


def sample_sandwich(model: OFAMobileNetV3, phase: str, n_subnets: int, sampler: str,
                    generator: torch.Generator) -> list[dict]:
    """Configs of one step: [max] in the teacher phase, else [max, min, n_subnets - 2 sampled],
    restricted to the phase's elastic dimensions (progressive shrinking)."""
    spec, stages = model.spec, model.n_stages
    largest = arch.max_config(spec, stages)
    if phase == "teacher":
        return [largest]
    if n_subnets < 2:
        raise ValueError(f"a sandwich needs at least 2 subnets (max and min), got {n_subnets}")
    dims = ELASTIC_DIMS[phase]
    sample = arch.compound_config if sampler == "compound" else arch.random_config
    cfgs = [arch.min_config(spec, stages)] + [sample(spec, stages, generator) for _ in range(n_subnets - 2)]
    return [largest] + [{k: (cfg[k] if k in dims else largest[k]) for k in cfg} for cfg in cfgs]


@dataclass
class StepResult:
    loss_max: float
    loss_subnets: float           # mean unweighted KD loss of the other subnets (0 if none)


def touch_all(model: nn.Module) -> torch.Tensor:
    """0 * sum of every parameter: gives each one a (zero) gradient in this backward, so DDP's
    reducer sees all parameters used even when the subnet skips blocks or kernel transforms."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def sequential_step(model: OFAMobileNetV3, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    cfgs: list[dict], betas: list[float], label_smoothing: float, temperature: float,
                    scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None) -> StepResult:
    """Forward/backward each subnet in turn; gradients accumulate in .grad (no optimizer step).

    cfgs[0] must be the max net: it is trained on `labels` with label-smoothed CE (weight betas[0]);
    every later subnet k is distilled from its detached soft labels with weight betas[k].
    `net` is `model` or its DDP wrapper (only the last backward synchronises).
    """
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    losses, targets = [], None
    for i, (cfg, beta) in enumerate(zip(cfgs, betas)):
        model.set_active_subnet(cfg)
        last = i == len(cfgs) - 1
        with (net.no_sync() if ddp and not last else contextlib.nullcontext()):
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(images)
            if i == 0:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                targets = soft_labels(logits, temperature)
            else:
                loss = kd_loss(logits, targets, temperature)
            weighted = loss * beta + (touch_all(model) if ddp and last else 0.0)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        losses.append(loss.item())
    return StepResult(losses[0], sum(losses[1:]) / max(len(losses) - 1, 1))
