"""Long-run behaviour in one process: periodic checkpoints, --resume auto, SIGTERM without evaluation,
--help defaults per dataset."""
import os
import signal

import pytest

from engine.train import checkpoint, trainer
from engine.train.__main__ import main
from engine.train.config import _parser
from engine.errors import EXIT_INTERRUPTED, EXIT_OK
from engine.train.periodic import Cadence, parse_cadence
from test_train import TINY

RUN = [*TINY, "--eval-subnets", "0"]


def test_cadence_forms():
    assert parse_cadence("30") == parse_cadence("30min") == Cadence(minutes=30.0)
    assert parse_cadence("30min,500steps") == Cadence(30.0, 500)
    assert parse_cadence("off") == Cadence()
    for bad in ("0", "5s", "-1", "0steps", "soon"):
        with pytest.raises(ValueError):
            parse_cadence(bad)


def test_periodic_checkpoints_and_resume_auto(tmp_path, monkeypatch, caplog):
    saved = []
    write = checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "save_atomic", lambda state, path: (saved.append(state["step"]),
                                                                         write(state, path)))
    out = str(tmp_path / "run")
    # fresh with auto (nothing to resume); 11 steps per epoch: 2, 4 periodic, 5 the --max-steps end
    assert main([*RUN, "--out", out, "--max-steps", "5", "--checkpoint-every", "2steps", "--resume", "auto"]) == EXIT_OK
    assert saved == [2, 4, 5]
    with caplog.at_level("INFO"):
        assert main([*RUN, "--out", out, "--max-steps", "7", "--checkpoint-every", "2steps", "--resume", "auto"]) \
            == EXIT_OK
    assert "resumed from step 5" in caplog.text
    assert saved == [2, 4, 5, 6, 7]


def test_sigterm_checkpoints_and_exits_without_evaluating(tmp_path, monkeypatch):
    def sigterm_at_step_3(rank, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated after SIGTERM")

    monkeypatch.setattr(trainer, "kill_for_test", sigterm_at_step_3)
    monkeypatch.setattr(trainer, "evaluate_subnets", no_evaluation)
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == EXIT_INTERRUPTED
    assert checkpoint.read(out / "checkpoint.pt")["step"] == 3


def test_help_shows_each_datasets_default():
    helps = {a.dest: a.help for a in _parser()._actions}
    assert "digits 5, cifar10/cifar100 200, imagenet 270" in helps["epochs"]
    assert "(default: 0.9)" in helps["momentum"]
    assert "under torchrun auto" in helps["resume"]
    assert all(text.count("default") == 1 for dest, text in helps.items() if dest not in ("help", "config"))
