"""Run logs: per-step CSV, TensorBoard (if installed), and device-hours used / projected (gpu_hours.json
on a GPU, cpu_hours.json on a CPU).

A fresh run starts its logs in a folder without another run's files (run_dir sets them aside); a
resumed run keeps the valid rows up to the checkpoint's step and drops the ones after it (they are
trained again) and damaged ones (a warning names the file), so steps.csv holds each step once.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("engine.train")


def hours_file_name(device_label: str) -> str:
    """The device-hours report's file name: named for the kind of device the run used."""
    return "cpu_hours.json" if device_label == "cpu" else "gpu_hours.json"


class RunLogger:
    """Writes <out>/steps.csv, <out>/tb/ and <out>/<gpu|cpu>_hours.json (rank 0 only)."""

    FIELDS = ("step", "epoch", "phase", "lr", "epsilon", "loss_max", "loss_subnets", "skipped", "images_per_s",
              "seconds")

    def __init__(self, out_dir: str | Path, enabled: bool, devices: int, device_label: str,
                 resume_step: int | None = None) -> None:
        self.out, self.enabled, self.devices, self.device_label = Path(out_dir), enabled, devices, device_label
        self.hours_file = self.out / hours_file_name(device_label)
        self.step_seconds: dict[str, list[float]] = {}
        self._tb = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "steps.csv"
        if resume_step is not None:
            self._truncate(path, resume_step)
        new = not path.exists()
        self._csv_file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.FIELDS)
        if new:
            self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the resumed run's events after the checkpoint
            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:
            self._tb = None

    def _truncate(self, path: Path, step: int) -> None:
        """Rewrite steps.csv with the header and the valid rows of steps <= `step` (the checkpoint's);
        damaged rows (a torn write, stray bytes) are dropped with a warning naming the file."""
        if not path.exists():
            return
        rows = [r for r in csv.reader(path.read_text(errors="replace").replace("\0", "").splitlines()) if r]
        if rows and tuple(rows[0]) == self.FIELDS:
            rows = rows[1:]
        valid = [r for r in rows if _valid_row(r, len(self.FIELDS))]
        if len(valid) < len(rows):
            log.warning("%s: %d damaged rows dropped, the file rebuilt from its %d valid rows", path,
                        len(rows) - len(valid), len(valid))
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.FIELDS)
            writer.writerows(r for r in valid if int(r[0]) <= step)

    def log_step(self, row: dict) -> None:
        if not row.get("compiled"):                 # a step that compiled a graph says nothing of step time
            self.step_seconds.setdefault("teacher" if row["phase"] == "teacher" else "shrink", []).append(row["seconds"])
        if not self.enabled:
            return
        self._csv.writerow({k: row[k] for k in self.FIELDS})
        if self._tb is not None:
            for k in ("lr", "epsilon", "loss_max", "loss_subnets", "images_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], row["step"])

    def flush(self) -> None:
        if self.enabled:
            self._csv_file.flush()

    def device_hours(self, elapsed_s: float, remaining_teacher: int, remaining_shrink: int, subnets: int,
                     compile_s: float = 0.0) -> dict:
        """Used and projected device-hours (devices x wall time). Unseen shrink steps are estimated
        as `subnets` teacher steps (an upper bound: smaller subnets are cheaper). `compile_s`: wall
        seconds of the steps that compiled graphs (within the used time, reported apart)."""
        mean = {k: sum(v[-200:]) / len(v[-200:]) for k, v in self.step_seconds.items() if v}
        teacher_s = mean.get("teacher", mean.get("shrink", 0.0) / max(subnets, 1))
        shrink_s = mean.get("shrink", teacher_s * subnets)
        remaining_s = remaining_teacher * teacher_s + remaining_shrink * shrink_s
        return {"device": self.device_label, "devices": self.devices,
                "used_hours": self.devices * elapsed_s / 3600,
                "compile_seconds": compile_s,
                "projected_total_hours": self.devices * (elapsed_s + remaining_s) / 3600,
                "mean_step_seconds": mean}

    def write_hours(self, report: dict) -> None:
        if self.enabled:
            self.hours_file.write_text(json.dumps(report, indent=2))

    def log_eval(self, name: str, value: float, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._csv_file.close()
            if self._tb is not None:
                self._tb.close()


def _valid_row(row: list[str], width: int) -> bool:
    """A steps.csv row as RunLogger writes it: step and epoch integers, a phase, then numbers."""
    if len(row) != width or not row[0].isdigit() or not row[1].isdigit() or not row[2]:
        return False
    try:
        [float(v) for v in row[3:]]
    except ValueError:
        return False
    return True


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t, self.t0 = self.t0, time.perf_counter()
        return self.t0 - t
