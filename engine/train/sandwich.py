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
from engine.train.compile import unwrap
from engine.train.guard import grads_nonfinite
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
    """What a step leaves on the device (nothing is read on the host: no sync per step)."""

    losses: torch.Tensor          # (K,) float32: the max net's CE, then each subnet's unweighted KD loss
    grads_bad: torch.Tensor       # (K,) bool: subnet k's backward left a non-finite gradient (k and later)


def touch_all(model: nn.Module) -> torch.Tensor:
    """0 * sum of every parameter: gives each one a (zero) gradient in this backward, so DDP's
    reducer sees all parameters used even when the subnet skips blocks or kernel transforms."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def sequential_step(model: OFAMobileNetV3, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    cfgs: list[dict], epsilons: list[float], label_smoothing: float, temperature: float,
                    scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None,
                    check_grads: bool = False) -> StepResult:
    """Forward/backward each subnet in turn; gradients accumulate in .grad (no optimizer step).

    cfgs[0] must be the max net: it is trained on `labels` with label-smoothed CE;
    every later subnet k is distilled from its detached soft labels. Loss k is weighted by epsilons[k]:
    the max net's multiplier, then DεpS's ε times each subnet's multiplier (docs/method.md).
    `net` is `model` or its DDP wrapper (only the last backward synchronises), either of them possibly
    torch.compile'd. With `check_grads`,
    the gradients are checked for inf/NaN after each subnet's backward (on the device).
    """
    inner = unwrap(net)
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    losses, bad, targets = [], [], None
    for i, (cfg, epsilon) in enumerate(zip(cfgs, epsilons)):
        model.set_active_subnet(cfg)
        last = i == len(cfgs) - 1
        with (inner.no_sync() if ddp and not last else contextlib.nullcontext()):
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(images)
            if i == 0:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                targets = soft_labels(logits, temperature)
            else:
                loss = kd_loss(logits, targets, temperature)
            weighted = loss * epsilon + (touch_all(model) if ddp and last else 0.0)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        losses.append(loss.detach().float())
        if check_grads:
            bad.append(grads_nonfinite(model.parameters()))
    losses_t = torch.stack(losses)
    grads_bad = torch.cat(bad).bool() if check_grads else torch.zeros_like(losses_t, dtype=torch.bool)
    return StepResult(losses_t, grads_bad)
