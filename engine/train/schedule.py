"""The training schedules as small pure functions (steps are global optimizer steps from 0).

DεpS (docs/method.md), with E epochs, T teacher epochs, W subnet warm-up epochs:
  epochs [0, T - W): teacher phase, max net only;
  epochs [T - W, T): sandwich, the subnets' effective lr rises linearly from 0 to
                     multiplier * lr(T) over W * steps_per_epoch steps; ε = effective / lr(t);
  epochs >= T: ε = multiplier.
Baselines: BigNAS (sandwich from step 0, ε = multiplier), OFA progressive shrinking (teacher,
then kernel -> depth -> width phases of equal length), CompOFA (teacher, then compound sandwich).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = ("deps", "bignas", "ofa-ps", "compofa")


def cosine_lr(step: int, total_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Cosine decay from base_lr at step 0 to min_lr at total_steps."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Plan:
    """When each phase starts, in epochs."""

    method: str
    epochs: int
    shrink_start: float          # first epoch of the sandwich (T - W for DεpS)
    ramp_epochs: float           # W: length of the ε ramp (0: none)
    sampler: str                 # "random" or "compound"

    def phase(self, epoch: float) -> str:
        """Phase at a (fractional) epoch, step / steps_per_epoch: "teacher" or the shrinking phase:
        "shrink", or for ofa-ps "kernel" / "depth" / "width"."""
        if epoch < self.shrink_start:
            return "teacher"
        if self.method != "ofa-ps":
            return "shrink"
        third = (self.epochs - self.shrink_start) / 3.0
        return ("kernel", "depth", "width")[min(2, int((epoch - self.shrink_start) // third))]


def make_plan(method: str, epochs: int, teacher_epochs: float, warmup_epochs: float, sampler: str = "random") -> Plan:
    """Phase plan. teacher_epochs = T and warmup_epochs = W in the spec's notation."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if not 0 <= warmup_epochs <= teacher_epochs <= epochs:
        raise ValueError(f"need 0 <= W ({warmup_epochs}) <= T ({teacher_epochs}) <= epochs ({epochs})")
    if method == "deps":
        return Plan(method, epochs, teacher_epochs - warmup_epochs, warmup_epochs, sampler)
    if method == "bignas":
        return Plan(method, epochs, 0, 0, sampler)
    if method == "ofa-ps":
        return Plan(method, epochs, teacher_epochs, 0, "random")
    return Plan(method, epochs, teacher_epochs, 0, "compound")


def subnet_epsilon(step: int, steps_per_epoch: int, plan: Plan, multiplier: float, total_steps: int,
                base_lr: float) -> float:
    """ε weight of a subnet loss at `step` (0 in the teacher phase)."""
    start = plan.shrink_start * steps_per_epoch
    if step < start:
        return 0.0
    ramp = plan.ramp_epochs * steps_per_epoch
    if step >= start + ramp:
        return multiplier
    lr_t = cosine_lr(step, total_steps, base_lr)
    lr_T = cosine_lr(int(round(start + ramp)), total_steps, base_lr)
    effective = multiplier * lr_T * (step - start) / ramp
    return effective / lr_t if lr_t > 0 else 0.0


