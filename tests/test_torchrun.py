"""Runs under torchrun on one host (CPU, gloo): two nodes over a c10d rendezvous on 127.0.0.1, and a
rank killed mid-run whose job restarts and resumes by itself from the last periodic checkpoint."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch
from torch.distributed.elastic.utils.distributed import get_free_port

from test_train import TINY

STEPS = 9                                       # 2 ranks x 64 images: 11 steps per epoch
RUN = [*TINY, "--batch-size", "64", "--max-steps", str(STEPS), "--checkpoint-every", "4steps", "--eval-subnets", "0", "--calib-images", "64"]


def _torchrun(log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """torchrun in the background, its output in `log` (a pipe could fill up and stall it). On the CPU
    with gloo even on a GPU host (the bit-identical comparison is of the CPU reference path)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                               "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def _wait(proc: subprocess.Popen, log: Path) -> None:
    """Exit code 0 within 10 minutes, else the job is killed (no orphan ranks) and its log shown."""
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()                       # torchrun passes SIGTERM on to its workers
        proc.wait(timeout=60)
        code = "timeout"
    assert code == 0, log.read_text()[-3000:]


def _weights(out) -> dict:
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == STEPS
    return state["model"]


def test_two_nodes_then_a_killed_rank_restarts_to_the_same_weights(tmp_path):
    # two "nodes" (one torchrun agent each) meeting at a c10d rendezvous on the loopback interface
    endpoint, run_id = f"127.0.0.1:{get_free_port()}", uuid.uuid4().hex[:8]
    nodes = [_torchrun(tmp_path / f"node{i}.log", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
                       "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "-m", "engine.train", *RUN,
                       "--out", str(tmp_path / "nodes"))
             for i in range(2)]
    for i, node in enumerate(nodes):
        _wait(node, tmp_path / f"node{i}.log")
    # one node, two ranks; rank 1 SIGKILLs itself after step 6 in the first attempt: torchrun restarts
    # both ranks, which resume from the step-4 checkpoint with no --resume given
    killed = _torchrun(tmp_path / "killed.log", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                       "-m", "engine.train", *RUN, "--out", str(tmp_path / "killed"), env={"ENGINE_TEST_KILL": "1:6"})
    _wait(killed, tmp_path / "killed.log")
    log = (tmp_path / "killed.log").read_text()
    assert "resumed from step 4" in log, log[-3000:]
    a, b = _weights(tmp_path / "nodes"), _weights(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
