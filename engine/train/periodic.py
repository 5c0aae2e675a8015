"""When a run writes its periodic checkpoint: --checkpoint-every MINUTES and/or STEPS.

A step count is the same on every rank; elapsed time is not, so the time rule is checked where the
ranks already synchronise (every --log-every steps) and agreed on (distributed.any_rank: due when due on
any rank's clock), so all ranks take the checkpoint at the same step.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

FORM = "'30min', '500steps', '30min,500steps' (a plain number is minutes) or 'off'"


@dataclass(frozen=True)
class Cadence:
    minutes: float | None = None
    steps: int | None = None


def parse_cadence(text: str) -> Cadence:
    """The cadence written as FORM; ValueError naming the form otherwise."""
    if str(text).strip().lower() == "off":
        return Cadence()
    minutes, steps = None, None
    for part in str(text).lower().replace(" ", "").split(","):
        if match := re.fullmatch(r"(\d+)steps?", part):
            steps = int(match[1])
        elif match := re.fullmatch(r"(\d+(?:\.\d+)?)(?:min|m)?", part):
            minutes = float(match[1])
        if not match or steps == 0 or minutes == 0:
            raise ValueError(f"must be {FORM}")
    return Cadence(minutes, steps)


class Periodic:
    """Tracks the time since the last checkpoint; says at which steps the next one is due."""

    def __init__(self, cadence: Cadence) -> None:
        self.cadence, self.last = cadence, time.monotonic()

    def step_due(self, step: int) -> bool:
        return self.cadence.steps is not None and step % self.cadence.steps == 0

    def time_due(self) -> bool:
        return self.cadence.minutes is not None and time.monotonic() - self.last >= 60 * self.cadence.minutes

    def saved(self) -> None:
        self.last = time.monotonic()
