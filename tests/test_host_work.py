"""Host work of a sandwich step (issue: a sync-free, lean default path): the ops a 4-subnet step sends to
the dispatcher and the host syncs it makes, counted on the CPU (bench/op_counts.py)."""
import pytest

from bench.op_counts import ANCHORS, step_counts


@pytest.mark.parametrize("path,bound", [("reference", ANCHORS["public_ofa_code"]),
                                        ("fast", ANCHORS["exported_static_subnets"])])
def test_dispatched_ops_per_step_within_the_anchors(path, bound):
    """reference path <= the public OFA code's count; the GPU fast path (fake tensors through the
    kernels' fake implementations) <= the same configs run as exported static subnets."""
    counts = step_counts(path)
    assert counts["ops"] <= bound, counts["by_op"].most_common(12)


@pytest.mark.parametrize("path,step", [("reference", "sequential"), ("fast", "sequential"),
                                       ("reference", "batched"), ("fast", "batched")])
def test_a_step_makes_no_host_sync(path, step):
    """No .item(), .cpu(), .tolist() or .nonzero() inside a step: losses stay on the device."""
    assert step_counts(path, step)["syncs"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("step", ["sequential", "batched"])
def test_training_step_runs_under_sync_debug_mode_error(step):
    """On a GPU: after warm-up (Triton compiles, autotuning and the dispatcher's first measurements
    synchronise once), a whole training step (forward, backward, non-finite guard, fused optimizer
    step) runs with torch.cuda.set_sync_debug_mode("error")."""
    import torch

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
