"""Non-finite losses and gradients: detected on the device, the step skipped, the run stopped in time.

Every step reports its K subnets' losses and whether their backward left a non-finite gradient
(`StepResult`). `NonFiniteGuard.update` turns that into a (1,) flag that the fused optimizer reads as
`found_inf` (the update is skipped, as GradScaler skips one) and keeps running counts on the device: no
host sync per step. `read()`, called once per logging interval (when the losses are read anyway),
raises `NonFiniteError` once `max_bad` consecutive steps were bad, naming the steps and the subnets.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import EXIT_NON_FINITE


class NonFiniteError(RuntimeError):
    """Training stopped: too many consecutive steps with non-finite losses or gradients."""

    exit_code = EXIT_NON_FINITE


def grads_nonfinite(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """(1,) float32 on the gradients' device: 1.0 when any gradient holds an inf or NaN, else 0.0.
    One fused multi-tensor check per (device, dtype) group, no host sync."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not groups:
        return torch.zeros(1)
    device = next(iter(groups))[0]
    found, one = torch.zeros(1, device=device), torch.ones(1, device=device)
    for grads in groups.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)   # scale 1: a pure check
    return found


def subnet_name(index: int) -> str:
    """Name of position `index` in a sandwich: max, min, random1, random2, ..."""
    return ("max", "min")[index] if index < 2 else f"random{index - 1}"


class NonFiniteGuard:
    """Device-side record of bad steps (non-finite loss or gradient) for up to `subnets` subnets a step."""

    def __init__(self, subnets: int, device: torch.device, max_bad: int, first_step: int = 0) -> None:
        self.max_bad, self.subnets, self._seen = max_bad, subnets, 0
        z = dict(dtype=torch.int64, device=device)
        self.step = torch.full((), first_step, **z)          # index of the next step
        self.run = torch.zeros((), **z)                      # consecutive bad steps so far
        self.total = torch.zeros((), **z)                    # bad (skipped) steps in the whole run
        self.first = torch.full((), -1, **z)                 # first step of the current bad run
        self.per_subnet = torch.zeros(subnets, **z)          # bad steps per subnet in the current run

    def update(self, losses: torch.Tensor, grads_bad: torch.Tensor) -> torch.Tensor:
        """Record one step: losses (K,), grads_bad (K,) bool (subnet k's backward left a non-finite
        gradient). Returns the (1,) float32 found_inf flag for the optimizer. Under torch.distributed the
        flags are max-reduced over the ranks first, so every rank skips (and stops) alike."""
        bad = ~torch.isfinite(losses) | grads_bad                               # (K,)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = bad.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = flags.bool()
        any_bad = bad.any()
        self.first = torch.where(any_bad & (self.run == 0), self.step, self.first)
        self.run = (self.run + 1) * any_bad
        self.total += any_bad
        counts = torch.zeros_like(self.per_subnet)
        counts[:bad.shape[0]] = bad
        self.per_subnet = (self.per_subnet + counts) * any_bad
        self.step += 1
        return any_bad.float().reshape(1)

    def read(self) -> dict:
        """One host read of the counts; NonFiniteError once `max_bad` consecutive steps were bad."""
        values = torch.cat([torch.stack([self.run, self.total, self.first, self.step]), self.per_subnet]).tolist()
        run, total, first, step = values[:4]
        state = {"consecutive_bad": run, "skipped_steps": total, "new_skipped": total - self._seen}
        self._seen = total
        if run >= self.max_bad:
            subnets = ", ".join(f"{subnet_name(k)} in {n}" for k, n in enumerate(values[4:]) if n)
            raise NonFiniteError(
                f"non-finite losses or gradients in {run} consecutive steps (steps {first + 1}-{step} as numbered in "
                f"steps.csv; each was skipped): "
                f"{subnets} of them. Training has diverged: lower --lr (or check the data); the last good "
                f"checkpoint is kept. (--max-bad-steps {self.max_bad})")
        return state


@torch.no_grad()
def repair_running_stats(model: nn.Module) -> int:
    """Reset non-finite running-statistics entries (a bad step's forward can write NaN into them) to
    mean 0 / variance 1; returns how many were reset. Evaluation re-calibrates them anyway."""
    fixed = 0
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and name.endswith(("running_mean", "running_var")):
            bad = ~torch.isfinite(buf)
            n = int(bad.sum())
            if n:
                buf.masked_fill_(bad, 1.0 if name.endswith("running_var") else 0.0)
                fixed += n
    return fixed
