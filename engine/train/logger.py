"""Run logs: per-step CSV, TensorBoard (if installed), and GPU-hours used / projected."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path


class RunLogger:
    """Writes <out>/steps.csv (appending on resume), <out>/tb/ and <out>/gpu_hours.json (rank 0 only)."""

    FIELDS = ("step", "epoch", "phase", "lr", "beta", "loss_max", "loss_subnets", "images_per_s", "seconds")

    def __init__(self, out_dir: str | Path, enabled: bool, devices: int, device_label: str) -> None:
        self.out, self.enabled, self.devices, self.device_label = Path(out_dir), enabled, devices, device_label
        self.step_seconds: dict[str, list[float]] = {}
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "steps.csv"
        new = not path.exists()
        self._csv_file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.FIELDS)
        if new:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        except ImportError:
            self._tb = None

    def log_step(self, row: dict) -> None:
        self.step_seconds.setdefault("teacher" if row["phase"] == "teacher" else "shrink", []).append(row["seconds"])
        if not self.enabled:
            return
        self._csv.writerow({k: row[k] for k in self.FIELDS})
        self._csv_file.flush()
        if self._tb is not None:
            for k in ("lr", "beta", "loss_max", "loss_subnets", "images_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def device_hours(self, elapsed_s: float, remaining_teacher: int, remaining_shrink: int, subnets: int) -> dict:
        """Used and projected device-hours (devices x wall time). Unseen shrink steps are estimated
        as `subnets` teacher steps (an upper bound: smaller subnets are cheaper)."""
        mean = {k: sum(v[-200:]) / len(v[-200:]) for k, v in self.step_seconds.items() if v}
        teacher_s = mean.get("teacher", mean.get("shrink", 0.0) / max(subnets, 1))
        shrink_s = mean.get("shrink", teacher_s * subnets)
        remaining_s = remaining_teacher * teacher_s + remaining_shrink * shrink_s
        return {"device": self.device_label, "devices": self.devices,
                "used_hours": self.devices * elapsed_s / 3600,
                "projected_total_hours": self.devices * (elapsed_s + remaining_s) / 3600,
                "mean_step_seconds": mean}

    def write_hours(self, report: dict) -> None:
        if self.enabled:
            (self.out / "gpu_hours.json").write_text(json.dumps(report, indent=2))

    def log_eval(self, name: str, value: float, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._csv_file.close()
            if self._tb is not None:
                self._tb.close()


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t, self.t0 = self.t0, time.perf_counter()
        return self.t0 - t
