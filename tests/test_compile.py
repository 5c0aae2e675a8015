"""--compile: the teacher phase as one compiled graph, MBConv blocks compiled per variant; numerics
against eager, recompile counts, resume, DDP, fallback. Most checks use the aot_eager backend (the
graphs dynamo captures and AOT autograd's backward, without code generation: seconds on a CPU);
one runs inductor's CPU backend on a block."""
import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch

from engine.supernet import ofa_mobilenetv3
from engine.train import compile as engine_compile
from engine.train.compile import Compiler, graphs_compiled
from engine.train.sandwich import sample_sandwich, sequential_step
from helpers import ranks_env


def _model(seed=0):
    torch.manual_seed(seed)
    model = ofa_mobilenetv3("cifar", width_mult=0.5, num_classes=10, dropout=0.0, depths=(1, 2),
                            expand_ratios=(2, 3), kernel_sizes=(3, 5))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "transforms"):
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn_like(p))
    return model.to(memory_format=torch.channels_last)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(model, net_for, steps, phase, x, y, seed=0):
    """`steps` SGD steps of `phase` with the net `net_for(phase)` returns; (losses, grads after the
    last backward)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        cfgs = sample_sandwich(model, phase, 3, "random", torch.Generator().manual_seed(seed + i))
        opt.zero_grad(set_to_none=True)
        r = sequential_step(model, net_for(phase), x, y, cfgs, [1.0, 0.5, 0.5][:len(cfgs)], 0.1, 1.0, None, None)
        losses.append(r.losses.clone())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return torch.stack([l.sum() for l in losses]), grads


def _compare(a: torch.nn.Module, b: torch.nn.Module, ga: dict, gb: dict, rtol=1e-5, atol=1e-6):
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=f"grad {name}")
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, t, rtol=rtol, atol=atol, msg=name)          # parameters and running stats


@contextlib.contextmanager
def _no_eager_fallback():
    """Dynamo must not quietly run a frame eager: reaching the recompile limit raises instead, and no
    graph break or frame that failed to compile may be counted inside."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    frames = dict(counters["frames"])
    breaks = sum(counters["graph_break"].values())
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    new_total = counters["frames"]["total"] - frames.get("total", 0)
    new_ok = counters["frames"]["ok"] - frames.get("ok", 0)
    assert new_total == new_ok, f"{new_total - new_ok} frames ran eager"
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


@pytest.mark.parametrize("mode,phase", [("teacher", "teacher"), ("blocks", "shrink")])
def test_compiled_steps_match_eager_and_compile_a_bounded_number_of_graphs(mode, phase):
    eager = _model()
    compiled = copy.deepcopy(eager)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    steps = 4
    le, ge = _train(eager, lambda p: eager, steps, phase, x, y)
    compiler = Compiler(compiled, mode, x.device, backend="aot_eager")
    assert compiler.mode == mode
    before = graphs_compiled()
    with _no_eager_fallback():
        lc, gc = _train(compiled, lambda p: compiler.net(p, compiled), steps, phase, x, y)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    _compare(eager, compiled, ge, gc)
    new = graphs_compiled() - before
    if mode == "teacher":
        assert new == 1                                           # exactly one compilation for the phase
    else:                                                         # at most one graph per (block, kernel, expand) seen
        seen = set()
        for i in range(steps):
            for cfg in sample_sandwich(compiled, phase, 3, "random", torch.Generator().manual_seed(i)):
                for b, (k, e) in enumerate(zip(cfg["ks"], cfg["e"])):
                    if b % compiled.spec.max_depth < cfg["d"][b // compiled.spec.max_depth]:
                        seen.add((b, k, e))
        assert 0 < new <= len(seen)
        again = graphs_compiled()
        with _no_eager_fallback():
            _train(compiled, lambda p: compiler.net(p, compiled), steps, phase, x, y)   # the same configs again
        assert graphs_compiled() == again


def test_inductor_compiles_a_block_variant_to_the_same_numbers():
    model = _model()
    block = model.blocks[1]
    block.set_active(5, 3)
    twin = copy.deepcopy(block)
    twin.compile(backend="inductor")
    x = torch.randn(8, block.max_in, 8, 8).to(memory_format=torch.channels_last)
    outs, grads = [], []
    for b in (block, twin):
        xi = x.clone().requires_grad_()
        out = b(xi)
        out.square().mean().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in b.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-5)
    for (n, t), u in zip(block.named_buffers(), twin.buffers()):
        torch.testing.assert_close(u, t, rtol=1e-4, atol=1e-6, msg=n)


def test_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(engine_compile, "probe", lambda backend, device: "RuntimeError: no C++ compiler")
    model = _model()
    with caplog.at_level("WARNING", logger="engine.train"):
        compiler = Compiler(model, "all", torch.device("cpu"))
    assert compiler.mode == "off" and compiler.net("teacher", model) is model
    assert caplog.text.count("training runs eager") == 1


def test_auto_is_off_on_cpu():
    assert Compiler(_model(), "auto", torch.device("cpu")).mode == "off"


TINY = ["--resolution", "8", "--batch-size", "128", "--kernel-sizes", "3", "5", "--expand-ratios", "3", "4",
        "--depths", "2", "3", "--epochs", "3", "--teacher-epochs", "1.5", "--warmup-epochs", "0.5",
        "--subnets", "3", "--eval-subnets", "1", "--calib-images", "256", "--no-progress",
        "--compile", "teacher", "--compile-backend", "aot_eager"]     # 11 steps an epoch: shrinking from step 11


def test_resumed_compiled_run_matches_the_uninterrupted_one(tmp_path):
    from engine.train.__main__ import main

    steps = "13"                                     # crosses from the compiled teacher into the eager sandwich
    assert main(TINY + ["--out", str(tmp_path / "straight"), "--max-steps", steps]) == 0
    assert main(TINY + ["--out", str(tmp_path / "parts"), "--max-steps", "5"]) == 0
    assert main(TINY + ["--out", str(tmp_path / "parts"), "--max-steps", steps, "--resume"]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "parts"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)
    hours = json.loads((tmp_path / "straight" / "cpu_hours.json").read_text())
    assert hours["compile_seconds"] > 0


def test_ddp_with_a_compiled_teacher(tmp_path):
    out = tmp_path / "ddp"
    env = ranks_env(2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "engine.train", *TINY, "--batch-size", "64", "--out", str(out), "--max-steps", "12"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "ddp_check.json").read_text())["identical"] is True
