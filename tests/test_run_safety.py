"""No run destroys another's results, and every failure ends in one clear line and its exit code
(issue 23): the --out lock, run ids, foreign checkpoints, failed writes, data failures, start-up checks,
config-file errors. Most cases fail before any data is read; the few that train run 1-3 tiny steps."""
import errno
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.train import checkpoint, run_dir, trainer
from engine.train.__main__ import main
from engine.errors import EXIT_BAD_INPUT, EXIT_DATA_FAILED, EXIT_OK, EXIT_WRITE_FAILED
from helpers import make_jpeg_tree
from test_reliability import TINY


def _run(out, *extra) -> int:
    return main(TINY + ["--out", str(out), *extra])


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run stopped at --max-steps 2 (its checkpoint at step 2); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(out, "--max-steps", "2") == EXIT_OK
    return out


@pytest.fixture
def copy_of(finished, tmp_path):
    def copy(name: str = "copy"):
        return shutil.copytree(finished, tmp_path / name)
    return copy


# ---- the --out lock ------------------------------------------------------------------------------

def test_second_run_into_a_locked_folder_exits_2_naming_the_holder(tmp_path, caplog):
    """A live run in another process holds --out: the second run refuses before reading any data and
    touches none of the first run's files."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "steps.csv").write_text("the first run's log\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps({'run_id': 'first', 'pid': os.getpid(), 'host': 'h', 'started': 't'}).encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.ERROR):
            assert _run(out, "--max-steps", "1") == EXIT_BAD_INPUT
    finally:
        holder.kill()
        holder.wait()
    assert f"in use by another run (run first, PID {holder.pid} on h" in caplog.text
    assert (out / "steps.csv").read_text() == "the first run's log\n"
    assert not (out / "summary.json").exists()


def test_lock_of_a_dead_run_is_taken_over_with_a_log_line(tmp_path, caplog):
    (tmp_path / ".lock").write_text(json.dumps({"run_id": "old", "pid": 999999999, "host": "h", "started": "t"}))
    lock = run_dir.RunLock(tmp_path, "new")
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        assert "its holder (run old, PID 999999999" in caplog.text and "no longer running" in caplog.text
        assert json.loads((tmp_path / ".lock").read_text())["run_id"] == "new"
        second = run_dir.RunLock(tmp_path, "other")
        with pytest.raises(run_dir.BadInput, match="in use by another run .run new"):
            second.acquire()
    finally:
        lock.release()
    third = run_dir.RunLock(tmp_path, "third")
    third.acquire()                                                   # released: free again
    third.release()


# ---- run ids and foreign checkpoints ---------------------------------------------------------------

def test_resuming_into_a_folder_of_another_run_is_refused_unless_moved_aside(finished, copy_of, caplog):
    """--out B --resume A/checkpoint.pt, B holding run Y's checkpoint: exit 2, B untouched; with
    --move-aside Y's files move to B/set-aside-Y/ and A's run continues in B."""
    run_id = json.loads((finished / "config.json").read_text())["run_id"]
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["run_id"] == run_id
    other = copy_of("other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "run_id": "run-y"}))
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    with caplog.at_level(logging.ERROR):
        assert _run(other, "--resume", str(finished / "checkpoint.pt"), "--max-steps", "3") == EXIT_BAD_INPUT
    assert "holds the checkpoint of run run-y" in caplog.text and "--move-aside" in caplog.text
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    assert _run(other, "--resume", str(finished / "checkpoint.pt"), "--max-steps", "3", "--move-aside") == EXIT_OK
    aside = other / "set-aside-run-y"
    assert (aside / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert (aside / "steps.csv").read_bytes() == before["steps.csv"]
    assert torch.load(other / "checkpoint.pt", weights_only=True)["run_id"] == run_id
    assert [r.split(",")[0] for r in (other / "steps.csv").read_text().splitlines()[1:]] == ["3"]   # 1-2: in A


# ---- failed writes ------------------------------------------------------------------------------

def test_failed_checkpoint_write_exits_5_keeping_the_last_good_one(copy_of, monkeypatch, caplog):
    """A full disk while the checkpoint is written: one line naming the cause and the last good
    checkpoint, exit 5, the temporary file gone, the old checkpoint intact, summary.json written."""
    out = copy_of()
    good = (out / "checkpoint.pt").read_bytes()
    (out / ".checkpoint.pt.tmp999999999").write_bytes(b"x" * 1000)   # a dead writer's leftover
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--resume", "--max-steps", "3") == EXIT_WRITE_FAILED
    assert "No space left on device" in caplog.text
    assert f"the last good checkpoint is {out / 'checkpoint.pt'} (step 2)" in caplog.text
    assert (out / "checkpoint.pt").read_bytes() == good
    assert [p.name for p in out.glob(".checkpoint.pt.tmp*")] == []
    assert _summary(out)["exit_code"] == EXIT_WRITE_FAILED and _summary(out)["step"] == 3


def test_file_size_limit_during_a_checkpoint_write(tmp_path):
    """RLIMIT_FSIZE in a child process: torch.save's failure names the OS's cause; no temporary stays."""
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "import torch\n"
            "from engine.train.checkpoint import save_atomic\n"
            "from engine.errors import WriteFailed\n"
            "try:\n"
            f"    save_atomic({{'model': {{'w': torch.zeros(100_000)}}, 'arch': {{}}}}, {str(tmp_path / 'c.pt')!r})\n"
            "except WriteFailed as err:\n"
            "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "File too large" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under a file", "not writable"])
def test_unusable_out_exits_2_before_reading_data(tmp_path, monkeypatch, caplog, where):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    if where == "not writable":
        out = tmp_path / "ro"

        def refuse(self, data):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(run_dir.Path, "write_bytes", refuse)
    monkeypatch.setattr(trainer, "load_data", lambda *a, **k: pytest.fail("data read before --out was checked"))
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--max-steps", "1") == EXIT_BAD_INPUT
    assert "cannot create the folder" in caplog.text if where == "under a file" else "is not writable" in caplog.text


def test_too_little_free_space_exits_2_before_reading_data(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10**6))
    monkeypatch.setattr(trainer, "load_data", lambda *a, **k: pytest.fail("data read before the space check"))
    with caplog.at_level(logging.ERROR):
        assert _run(tmp_path / "run", "--max-steps", "1") == EXIT_BAD_INPUT
    assert "1.0 MiB free, the run needs" in caplog.text


# ---- data failures mid-run and start-up checks ----------------------------------------------------

def test_a_batch_failing_mid_epoch_checkpoints_the_last_step_and_exits_6(tmp_path, monkeypatch, caplog):
    real_loaders = trainer._loaders

    def failing_third_batch(*args, **kwargs):
        epoch_batches, val, spe = real_loaders(*args, **kwargs)

        def batches(epoch, skip):
            for i, batch in enumerate(epoch_batches(epoch, skip)):
                if i == 2:
                    raise ValueError("cannot decode image train/class1/7.jpg: truncated")
                yield batch
        return batches, val, spe

    monkeypatch.setattr(trainer, "_loaders", failing_third_batch)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert _run(out) == EXIT_DATA_FAILED
    assert "reading the training data failed after step 2" in caplog.text and "7.jpg" in caplog.text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert _summary(out)["exit_code"] == EXIT_DATA_FAILED


def _cifar(root, labels_train, labels_test, names=None):
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = labels_test if name == "test_batch" else labels_train
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8), "labels": labels}, f)
    if names is not None:
        with open(root / "batches.meta", "wb") as f:
            pickle.dump({"label_names": names}, f)
    return root


@pytest.mark.parametrize("case,message", [
    ("batch larger than the split", "exceeds the 1438 training images"),
    ("labels out of range", "the training labels hold 20 values outside [0, 9] (e.g. 12)"),
    ("one class", "the training data has 1 class"),
])
def test_data_that_cannot_train_exits_2_before_any_step(tmp_path, caplog, case, message):
    flags = ["--batch-size", "2000"]
    if case == "labels out of range":
        flags = ["--dataset", "cifar10", "--data", str(_cifar(tmp_path / "c", [0, 12] * 4, [0, 1], list("abcdefghij"))),
                 "--batch-size", "4"]
    elif case == "one class":
        flags = ["--dataset", "cifar10", "--data", str(_cifar(tmp_path / "c", [0] * 8, [0, 0])), "--batch-size", "4"]
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert _run(out, *flags, "--heldout-images", "0") == EXIT_BAD_INPUT       # counts of the whole split
    assert message in caplog.text
    assert not (out / "steps.csv").exists() and _summary(out)["exit_code"] == EXIT_BAD_INPUT


def test_val_classes_missing_from_train_are_named(tmp_path, caplog):
    root = tmp_path / "imagenet"
    make_jpeg_tree(root / "train", classes=2, per_class=2)
    make_jpeg_tree(root / "val", classes=3, per_class=1)
    with caplog.at_level(logging.WARNING):
        assert main(["--dataset", "imagenet", "--data", str(root), "--batch-size", "64", "--resolution", "32",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == EXIT_BAD_INPUT     # 4 images: no batch
    assert "val/ has 1 class folders that train/ lacks, left out of the evaluation: class2" in caplog.text


def test_unexpected_error_mid_run_is_not_bad_input(tmp_path, monkeypatch):
    """A ValueError from the step (a bug) propagates with its traceback (exit 1), summary.json says so."""
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(trainer, "sequential_step", broken)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="a bug"):
        _run(out)
    assert _summary(out)["exit_code"] == 1 and "a bug" in _summary(out)["error"]


# ---- settings and config files ---------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("epochs: 3\nlr: [0.1\n", "line 3, column 1: not valid YAML"),
    ("epochs: three\namp: 'yes'\nkernel_sizes: 3\nout: 5\n",
     "--epochs 'three': must be an integer; --kernel-sizes 3: must be a list of integers; --amp 'yes': must be "
     "true or false; --out 5: must be a string"),
])
def test_config_file_errors_are_one_line_naming_the_file(tmp_path, caplog, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with caplog.at_level(logging.ERROR):
        assert main(["--config", str(path)]) == EXIT_BAD_INPUT
    assert all(part in caplog.text for part in message.split("; "))
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert "\n" not in caplog.records[-1].getMessage()


def test_json_config_error_names_the_line(tmp_path, caplog):
    path = tmp_path / "c.json"
    path.write_text('{\n  "epochs": 3,\n  "lr": 0.1,,\n}')
    with caplog.at_level(logging.ERROR):
        assert main(["--config", str(path)]) == EXIT_BAD_INPUT
    assert f"config file {path} line 3" in caplog.text


def test_flag_errors_are_all_listed_and_resolution_below_the_minimum_refused(caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["--batch-size", "abc", "--resolution", "1", "--dropout", "2"]) == EXIT_BAD_INPUT
    for part in ("--batch-size 'abc': must be an integer", "--resolution 1: the cifar supernet halves the image "
                 "3 times: it needs at least 8 pixels", "--dropout 2.0"):
        assert part in caplog.text
    with caplog.at_level(logging.ERROR):
        assert main(["--no-such-flag"]) == EXIT_BAD_INPUT
    assert "unrecognized arguments: --no-such-flag" in caplog.text


def test_damaged_steps_csv_is_rebuilt_on_resume(copy_of, caplog):
    out = copy_of()
    with open(out / "steps.csv", "a") as f:
        f.write("\x00\x00garbage,,\n2,0,teac")                         # a torn write and stray bytes
    with caplog.at_level(logging.WARNING):
        assert _run(out, "--resume", "--max-steps", "3") == EXIT_OK
    assert f"{out / 'steps.csv'}: 2 damaged rows dropped, the file rebuilt from its 2 valid rows" in caplog.text
    assert [r.split(",")[0] for r in (out / "steps.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path, caplog):
    (tmp_path / ".checkpoint.pt.tmp999999999").write_bytes(b"partial")
    mine = tmp_path / f".checkpoint.pt.tmp{os.getpid()}"
    mine.write_bytes(b"mine")
    with caplog.at_level(logging.WARNING):
        run_dir.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]
    assert "tmp999999999, a partial checkpoint left by a process that died" in caplog.text



def test_a_validation_file_failing_keeps_the_epoch_checkpoint_and_exits_6(tmp_path, monkeypatch, caplog):
    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "cannot identify image file val/class2/1.jpg")

    monkeypatch.setattr(trainer, "evaluate_subnets", unreadable)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        assert _run(out, "--max-steps", "1") == EXIT_DATA_FAILED
    assert "evaluating on the validation data failed after step 1" in caplog.text and "1.jpg" in caplog.text
    assert f"the last good checkpoint is {out / 'checkpoint.pt'} (step 1)" in caplog.text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
