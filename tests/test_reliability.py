"""Bad runs and bad input end clearly: divergence, damaged checkpoints, settings checked up front,
corrupt images, DALI with every augmentation, logs after a resume, exit codes and --help."""
import csv
import json
import logging
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.train import checkpoint, trainer
from engine.train.__main__ import main
from engine.train.config import TrainConfig, _parser
from engine.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK
from helpers import make_jpeg_tree

TINY = ["--resolution", "8", "--batch-size", "128", "--kernel-sizes", "3", "5", "--expand-ratios", "3", "4",
        "--depths", "2", "3", "--epochs", "3", "--teacher-epochs", "1.5", "--warmup-epochs", "1",
        "--subnets", "3", "--eval-subnets", "1", "--calib-images", "256", "--no-progress", "--log-every", "4"]
STEPS_PER_EPOCH = (1438 - 1438 // 10) // 128        # the digits' training split less its held-out tenth, // 128


def _run(out, *extra) -> int:
    return main(TINY + ["--out", str(out), *extra])


def _steps(out) -> list[int]:
    with open(out / "steps.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_diverging_run_stops_and_keeps_no_nan_checkpoint(tmp_path, caplog):
    """--lr 1e6: the loss overflows by step 3; each non-finite step is skipped, the run stops with
    exit code 4 naming the steps and the subnet, and no checkpoint holds non-finite weights."""
    out = tmp_path / "nan"
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--lr", "1e6", "--max-steps", "10", "--max-bad-steps", "3", "--log-every", "2") \
            == EXIT_NON_FINITE
    assert "consecutive steps (steps 3-" in caplog.text and "max in" in caplog.text
    assert not (out / "checkpoint.pt").exists()                      # no epoch ended: nothing written
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [r["skipped"] for r in rows[:2]] == ["0", "0"] and all(r["skipped"] == "1" for r in rows[2:])
    assert json.loads((out / "summary.json").read_text())["exit_code"] == EXIT_NON_FINITE   # on every exit


def test_divergence_after_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, caplog):
    """Images turn to NaN from step 15 (in epoch 1): the epoch-0 checkpoint (step 10) stays, finite."""
    real, calls = trainer.sequential_step, {"n": 0}

    def poisoned(model, net, images, *args, **kwargs):
        calls["n"] += 1
        return real(model, net, images * float("nan") if calls["n"] >= 15 else images, *args, **kwargs)

    monkeypatch.setattr(trainer, "sequential_step", poisoned)
    out = tmp_path / "late"
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--max-steps", "30") == EXIT_NON_FINITE
    assert "steps 15-" in caplog.text
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_with_another_number_of_processes_is_refused(tmp_path, caplog):
    """The learning rate, steps per epoch and data shards depend on the world size: a checkpoint written by
    2 processes does not resume in 1."""
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "3") == EXIT_OK
    state = checkpoint.read(out / "checkpoint.pt")
    assert state["world"] == 1
    checkpoint.save_atomic({**state, "world": 2}, out / "checkpoint.pt")
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--resume", "--max-steps", "6") == EXIT_BAD_INPUT
    assert "written by a run of 2 processes, this one has 1" in caplog.text


def test_damaged_checkpoint_is_refused(tmp_path, caplog):
    """4 KiB of random bytes inside the tensor data: torch.load still reads the file, the checksum does not match."""
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "3") == EXIT_OK
    path = out / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    assert good["integrity"]["format"] == 2 and len(good["integrity"]["sha256"]) == 64
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    torch.load(path, weights_only=True)                               # loads: only the checksum can tell
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--resume", "--max-steps", "6") == EXIT_BAD_INPUT
    assert f"checkpoint {path} is damaged" in caplog.text
    assert path.read_bytes() == damaged                               # left as it was

    del good["integrity"]                                             # a file without the record: refused
    torch.save(good, path)
    with pytest.raises(checkpoint.CheckpointError, match="no integrity record"):
        checkpoint.read(path)


@pytest.mark.parametrize("flags,message", [
    (["--subnets", "1"], "--subnets 1: the deps schedule runs a sandwich"),
    (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
    (["--epochs", "0", "--teacher-epochs", "0", "--warmup-epochs", "0"], "--epochs 0: must be an integer >= 1"),
    (["--lr", "-1"], "--lr -1.0: must be a number in (0"),
    (["--resolution", "8", "--batch-size", "1"], "batch norm needs at least 2 values"),
    (["--teacher-epochs", "9"], "--teacher-epochs 9.0"),
    (["--dataset", "imagenet", "--data", "/no/such/folder"], "--data '/no/such/folder': no such folder"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 2^32)"),
    (["--resolution", "4"], "--resolution 4: the cifar supernet halves the image 3 times"),
])
def test_settings_are_checked_before_any_work(tmp_path, caplog, flags, message):
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert main([*TINY, *flags, "--out", str(out)]) == EXIT_BAD_INPUT       # the last flag wins
    assert message in caplog.text
    assert not out.exists()                                           # nothing read, nothing written


def test_every_problem_is_listed_at_once(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["--batch-size", "0", "--dropout", "1.5", "--subnets", "1"]) == EXIT_BAD_INPUT
    for flag in ("--batch-size 0", "--dropout 1.5", "--subnets 1"):
        assert flag in caplog.text


def test_every_option_has_help_with_its_default():
    parser = _parser()
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        assert action.help and "default" in action.help, action.dest
    assert "exit codes" in parser.epilog
    assert {a.dest for a in parser._actions} >= {f.name for f in TrainConfig.__dataclass_fields__.values()}


def test_resume_truncates_steps_csv_and_says_so(tmp_path, caplog):
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "14") == EXIT_OK                  # checkpoint at 11 (epoch end) and 14
    assert _steps(out) == list(range(1, 15))
    with caplog.at_level(logging.INFO):
        assert _run(out, "--resume", "--max-steps", "20") == EXIT_OK
    assert "resumed from step 14 (epoch 1)" in caplog.text
    assert _steps(out) == list(range(1, 21))


def test_steps_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    """Rows written after the last checkpoint (a kill between checkpoints) are trained again: kept once."""
    out = tmp_path / "run"
    assert _run(out, "--max-steps", "11") == EXIT_OK
    with open(out / "steps.csv", "a") as f:                          # what a killed run had logged beyond
        f.write("12,1,teacher,0.1,0.0,1.0,0.0,0,1.0,1.0\n13,1,teacher,0.1,0.0,1.0,0.0,0,1.0,1.0\n")
    assert _run(out, "--resume", "--max-steps", "13") == EXIT_OK
    assert _steps(out) == list(range(1, 14))


def test_fresh_run_never_appends_to_old_logs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "steps.csv").write_text("step,epoch\n99,9\n")               # a run killed before its first checkpoint
    (out / "tb").mkdir()
    (out / "tb" / "events.out.tfevents.old").write_text("old")
    assert _run(out, "--max-steps", "3") == EXIT_OK
    assert _steps(out) == [1, 2, 3]
    assert not (out / "tb" / "events.out.tfevents.old").exists()


def test_sigterm_exits_with_the_interrupted_code(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "engine.train", *TINY, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "steps.csv").exists() and len(_steps(out)) >= 4):
        time.sleep(0.05)
    proc.send_signal(15)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, proc.stderr.read().decode()[-2000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= 4


# ---- images: corrupt files and DALI ---------------------------------------------------------------

@pytest.fixture
def imagenet_tree(tmp_path):
    """train/ and val/ ImageFolder trees of small JPEGs, 3 classes."""
    root = tmp_path / "imagenet"
    make_jpeg_tree(root / "train", classes=3, per_class=6)
    make_jpeg_tree(root / "val", classes=3, per_class=2, seed=1)
    return root


IMAGENET = ["--dataset", "imagenet", "--resolution", "32", "--batch-size", "4", "--epochs", "2",
            "--teacher-epochs", "1", "--warmup-epochs", "0.5", "--subnets", "2", "--eval-subnets", "0",
            "--calib-images", "8", "--no-progress", "--width-mult", "0.5"]


def _corrupt(root):
    for part, name in (("train", "class1/0.jpg"), ("val", "class2/1.jpg")):
        path = root / part / name
        path.write_bytes(path.read_bytes()[:300])                     # a truncated JPEG body


@pytest.mark.parametrize("dali", [False, True])
def test_skip_corrupt_leaves_bad_files_out_everywhere(tmp_path, imagenet_tree, dali, caplog):
    if dali:
        pytest.importorskip("nvidia.dali")
    _corrupt(imagenet_tree)
    extra = ["--dali"] if dali else []
    with caplog.at_level(logging.ERROR):
        assert main([*IMAGENET, *extra, "--data", str(imagenet_tree), "--out", str(tmp_path / "bad")]) \
            == EXIT_BAD_INPUT
    assert "0.jpg" in caplog.text or "1.jpg" in caplog.text           # the unreadable file is named
    out = tmp_path / "skip"
    assert main([*IMAGENET, *extra, "--skip-corrupt", "--data", str(imagenet_tree), "--out", str(out)]) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_corrupt_files"] == 2 and summary["step"] > 0
    assert sorted(line.rsplit("/", 2)[-2:] for line in (out / "skipped_files.txt").read_text().splitlines()) \
        == [["class1", "0.jpg"], ["class2", "1.jpg"]]


def test_dali_imagenet_with_autoaugment_and_random_erasing(tmp_path, imagenet_tree):
    """The ImageNet defaults (AutoAugment, random erase 0.2) through DALI's CPU operators (it once
    crashed with a TypeError: AutoAugment needs a pipeline built with conditionals)."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali"
    assert main([*IMAGENET, "--dali", "--data", str(imagenet_tree), "--out", str(out)]) == EXIT_OK
    assert json.loads((out / "config.json").read_text())["auto_augment"] is True
    assert len(_steps(out)) == 2 * (18 // 4)                         # 2 epochs of whole batches


def _fake_cifar(root, n=64):
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}, f)
    return root


@pytest.mark.parametrize("dataset", ["cifar10", "digits"])
def test_dali_arrays_with_every_augmentation(tmp_path, dataset):
    pytest.importorskip("nvidia.dali")
    data = ["--data", str(_fake_cifar(tmp_path / "cifar"))] if dataset == "cifar10" else []
    out = tmp_path / "run"
    assert main([*TINY, "--dataset", dataset, *data, "--dali", "--auto-augment", "--random-erase", "0.5",
                 "--max-steps", "3", "--out", str(out), "--batch-size", "32"]) == EXIT_OK
    assert _steps(out) == [1, 2, 3]


def test_amp_on_cpu_says_what_it_does(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert _run(tmp_path / "amp", "--amp", "--max-steps", "1") == EXIT_OK
    assert "--amp on a CPU: bf16 autocast" in caplog.text


def test_method_document_ships_with_the_project():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "method.md").read_text()
    assert "| epochs E |" in text and "arXiv:2407.06167" in text
    assert "docs/method.md" in (root / "README.md").read_text()
    assert "docs/method.md" in (root / "engine" / "train" / "schedule.py").read_text()
    assert "shared/docs" not in (root / "README.md").read_text() + (root / "engine" / "train" / "schedule.py").read_text()
    assert os.path.exists(root / "docs" / "method.md")
