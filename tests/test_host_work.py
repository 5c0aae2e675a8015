"""Host work and modelled memory traffic of a sandwich step (bench/op_counts.py), each path compared
with the anchors measured in the same run, the same way (a small supernet space and size: the counts
are per op, the traffic per op's tensors; bench/op_counts.py reports the real size, b128 at 224 px)."""
import functools

import pytest
import torch

from bench.op_counts import StepMeter, measure

SMALL = dict(net="cifar", batch=4, resolution=32, subnets=3, width_mult=0.5, depths=(1, 2),
             expand_ratios=(2, 3), kernel_sizes=(3, 5))


@functools.lru_cache(maxsize=None)
def _measured(path: str, phase: str = "shrink") -> dict:
    return measure(path, phase, **SMALL)


def test_traffic_model_counts_inputs_and_outputs_not_views():
    x = torch.randn(2, 3, 4, 4)
    with StepMeter() as meter:
        y = torch.relu(x.view(2, 48)).t()          # a view, one op reading 384 B and writing 384 B, a view
        torch.empty(10)
    assert sum(meter.bytes.values()) == 2 * x.numel() * 4 and y.shape == (48, 2)
    assert sum(meter.launches.values()) == 1 and sum(meter.host_ops.values()) == 4


def test_fast_path_counts_what_its_launchers_do():
    """Every custom op's launcher is run under the counter: at least one Triton launch per custom op,
    and the launcher's own aten ops are host ops (more host ops than the custom ops and their callers)."""
    fast = _measured("fast")
    custom = sum(n for op, n in fast["by_op"]["host_ops"].items() if op.startswith("engine."))
    assert custom > 0 and fast["triton_launches"] >= custom
    inner = [op for op in fast["by_op"]["host_ops"] if op.startswith("aten.") and op in ("aten.permute.default",
                                                                                        "aten.empty.memory_format")]
    assert inner, fast["by_op"]["host_ops"].most_common(10)


def test_modelled_traffic_within_the_anchors():
    """Per shrink step: fast path <= the static subnets <= the OFA-style dynamic ops, all measured here."""
    fast, static, ofa = (_measured(p)["gb"] for p in ("fast", "static", "ofa"))
    assert fast <= static <= ofa, (fast, static, ofa)


def test_reference_host_work_within_the_ofa_anchor():
    assert _measured("reference")["host_ops"] <= _measured("ofa")["host_ops"]


@pytest.mark.xfail(strict=True, reason="target not met: the launchers' own aten ops (output allocation, "
                                       "channels-last views, split partial sums) outnumber the static graph's ops")
def test_fast_launches_and_host_ops_within_the_static_anchor():
    fast = _measured("fast")
    assert fast["launches"] + fast["host_ops"] <= _measured("static")["host_ops"]


@pytest.mark.parametrize("path", ["reference", "fast", "fast_batched"])
def test_a_step_makes_no_host_sync(path):
    """No .item(), .cpu(), .tolist() or .nonzero() inside a step: losses stay on the device."""
    assert _measured(path)["host_syncs"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["sequential", "batched"])
def test_training_step_runs_under_sync_debug_mode_error(step):
    """On a GPU: after warm-up (Triton compiles, autotuning and the dispatcher's first measurements
    synchronise once), a whole training step (forward, backward, non-finite guard, fused optimizer
    step) runs with torch.cuda.set_sync_debug_mode("error")."""
    from engine.supernet import ofa_mobilenetv3
    from engine.train.batched import BatchedSandwich, batched_step
    from engine.train.guard import NonFiniteGuard
    from engine.train.sandwich import sample_sandwich, sequential_step

    torch.manual_seed(0)
    model = ofa_mobilenetv3("cifar", num_classes=10, dropout=0.1).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    guard = NonFiniteGuard(4, x.device, 5)
    net = BatchedSandwich(model) if step == "batched" else model
    fn = batched_step if step == "batched" else sequential_step

    def one(seed):
        cfgs = sample_sandwich(model, "shrink", 4, "random", torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        result = fn(model, net, x, y, cfgs, [1.0, 0.5, 0.5, 0.5], 0.1, 1.0, None, torch.bfloat16, check_grads=True)
        opt.found_inf = guard.update(result.losses, result.grads_bad)
        opt.step()

    for seed in range(3):
        one(seed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one(0)                                                    # configs seen in the warm-up
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
