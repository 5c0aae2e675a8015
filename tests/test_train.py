"""engine.train end to end on the built-in data: resume after SIGTERM, checkpoint errors, DDP, CLI."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.train.__main__ import main
from engine.errors import EXIT_INTERRUPTED
from helpers import ranks_env

# a small supernet and 8-px inputs keep each run to seconds on a CPU
TINY = ["--resolution", "8", "--batch-size", "128", "--kernel-sizes", "3", "5", "--expand-ratios", "3", "4",
        "--depths", "2", "3", "--epochs", "3", "--teacher-epochs", "1.5", "--warmup-epochs", "1",
        "--subnets", "3", "--eval-subnets", "1", "--calib-images", "256", "--no-progress"]


def _model_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _run(out: Path, *extra: str) -> int:
    return main(TINY + ["--out", str(out), *extra])


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path):
    steps = 25                                   # 11 steps per epoch: crosses two epoch boundaries
    assert _run(tmp_path / "straight", "--max-steps", str(steps)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", *TINY, "--out", str(out), "--max-steps",
                             str(steps)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        csv = out / "steps.csv"
        if csv.exists() and len(csv.read_text().splitlines()) >= 4:          # header + 3 steps
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, proc.stderr.read().decode()
    killed = _model_state(out)
    stopped = killed["step"]
    assert 3 <= stopped < steps, stopped
    assert _run(out, "--resume", "--max-steps", str(steps)) == 0
    a, b = _model_state(tmp_path / "straight"), _model_state(out)
    assert b["elapsed_seconds"] > killed["elapsed_seconds"] > 0          # device time carries over
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)


def test_full_run_writes_reports_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "2", "--teacher-epochs", "1", "--warmup-epochs", "0.5") == 0
    for name in ("checkpoint.pt", "steps.csv", "pareto.csv", "pareto.png", "cpu_hours.json", "summary.json",
                 "config.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert {r["subnet"] for r in summary["eval"]} == {"max", "min", "random0"}
    hours = json.loads((out / "cpu_hours.json").read_text())
    assert hours["projected_total_hours"] >= hours["used_hours"] > 0
    before = (out / "checkpoint.pt").read_bytes()
    assert _run(out) == 2                                      # exists, no --resume
    assert _run(out, "--resume", "--width-mult", "1.2") == 2   # another architecture
    assert (out / "checkpoint.pt").read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error_and_kept(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level("ERROR"):
        assert _run(out, "--resume") == 2
    assert "corrupt" in caplog.text
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_config_file_and_flag_precedence(tmp_path):
    from engine.train.config import parse_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nlr: 0.5\nkernel-sizes: [3, 7]\n")
    cfg = parse_config(["--config", str(cfg_file), "--lr", "0.3"])
    assert (cfg.epochs, cfg.lr, cfg.kernel_sizes, cfg.dataset) == (7, 0.3, [3, 7], "digits")
    cfg_file.write_text('{"bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        parse_config(["--config", str(cfg_file)])
    for part in ("train", "val"):
        (tmp_path / "imagenet" / part).mkdir(parents=True)
    assert parse_config(["--dataset", "imagenet", "--data", str(tmp_path / "imagenet")]).kernel_sizes == [7]


def test_dali_training_runs(tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali"
    assert _run(out, "--dali", "--max-steps", "3") == 0
    assert _model_state(out)["step"] == 3


@pytest.mark.parametrize("sandwich", ["sequential", "batched"])
def test_ddp_two_ranks_hold_identical_weights(tmp_path, sandwich):
    out = tmp_path / "ddp"
    env = ranks_env(2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "engine.train", *TINY, "--batch-size", "64", "--out", str(out), "--max-steps", "14",
           "--sandwich", sandwich]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((out / "ddp_check.json").read_text())
    assert check == {"ranks": 2, "identical": True, "max_abs_diff": 0.0}
    assert _model_state(out)["step"] == 14
