"""The fake-CUDA tier: every entry point's device handling, run on a CUDA device faked on the CPU.

Under FakeTensorMode a tensor can live on "cuda" without a GPU: shapes, dtypes, devices and memory
formats propagate, the custom ops run their fake kernels, no data is computed. So a CPU tensor meeting
a CUDA one, a `.cuda()` or CUDA-runtime call where a fake tensor suffices (on a machine without a
driver any runtime call raises), a lost channels-last layout or a wrong autocast dtype fails here,
in CI, instead of on the first GPU. What fake tensors cannot do stops the run "as far as it goes":
reading a value (`.item()`, `float()`: the data-dependent exception) and, without a driver, autograd's
backward (its engine asks the CUDA runtime for the device's primary context). Those stops are the only
accepted ones (`reached`). Forward passes run on both backends: "torch" (the reference ops) and "triton"
(the custom ops' fake kernels: the fast path's launch-side shapes and layouts).
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
                                          unset_fake_temporarily)

from engine.elastic import use_backend
from engine.supernet import ofa_mobilenetv3

CUDA = torch.device("cuda", 0)
NO_DRIVER = not torch.cuda.is_available()
# the only ways a fake run may stop: it needs a value, or (no driver) autograd's engine needs the runtime
_DATA = (DataDependentOutputException, DynamicOutputShapeException)


def reached(fn) -> str:
    """Run fn(); "done", "needs data" (it read a tensor's value) or "backward" (autograd needed the
    CUDA runtime, only on a machine without a driver). Any other error propagates: a real failure."""
    try:
        fn()
    except _DATA:
        return "needs data"
    except RuntimeError as err:
        if NO_DRIVER and "hasPrimaryContext" in str(err):
            return "backward"
        raise
    return "done"


@pytest.fixture
def fake(monkeypatch):
    """A fake-tensor mode (real CPU tensors may enter: the model's weights, a loader's batches). CUDA
    autocast is let on (torch would disable it without a driver; it needs none: it is dispatcher state)."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _model():
    """A small supernet built with real CPU weights, then moved to the fake CUDA device."""
    with unset_fake_temporarily():
        model = ofa_mobilenetv3("cifar", num_classes=10, dropout=0.1, width_mult=0.5, depths=(1, 2),
                                expand_ratios=(2, 3), kernel_sizes=(3, 7))
    return model.to(CUDA, memory_format=torch.channels_last)


def _images(batch=4, res=32):
    return torch.randn(batch, 3, res, res, device=CUDA).to(memory_format=torch.channels_last)


def _configs(model, n=4):
    """Sampled on the host, as in training (a CPU generator's draws are real values)."""
    from engine.train.sandwich import sample_sandwich

    with unset_fake_temporarily():
        return sample_sandwich(model, "shrink", n, "random", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend,training,subnet", [("torch", True, "max"), ("triton", True, "random"),
                                                     ("triton", False, "min"), ("torch", False, "random")])
def test_supernet_forward(fake, backend, training, subnet):
    model = _model().train(training)
    with unset_fake_temporarily():
        {"max": model.set_max_net, "min": model.set_min_net,
         "random": lambda: model.sample_active_subnet(torch.Generator().manual_seed(1))}[subnet]()
    with use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(_images())
    assert logits.device == CUDA and logits.shape == (4, 10) and logits.dtype == torch.bfloat16
    assert all(b.device == CUDA for b in model.buffers())


@pytest.mark.parametrize("step", ["sequential", "batched"])
def test_training_step(fake, step):
    """The sandwich step (autocast bf16, losses and the non-finite flags kept on the device) and the
    guard's update, as far as fake tensors go: through backward where a driver exists."""
    from engine.train.batched import BatchedSandwich, batched_step
    from engine.train.guard import NonFiniteGuard
    from engine.train.sandwich import sequential_step

    model = _model()
    labels = torch.randint(0, 10, (4,), device=CUDA)
    net, fn = (BatchedSandwich(model), batched_step) if step == "batched" else (model, sequential_step)
    guard = NonFiniteGuard(4, CUDA, 5)
    seen = {}

    def run():
        result = fn(model, net, _images(), labels, _configs(model), [1.0, 0.5, 0.5, 0.5], 0.1, 1.0, None,
                    torch.bfloat16, check_grads=True)
        seen["losses"] = result.losses
        seen["found_inf"] = guard.update(result.losses, result.grads_bad)

    assert reached(run) in ({"backward"} if NO_DRIVER else {"done"})
    if not NO_DRIVER:
        assert seen["losses"].device == CUDA and seen["found_inf"].device == CUDA


def test_batched_forward(fake):
    from engine.train.batched import BatchedSandwich

    model = _model()
    with use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = BatchedSandwich(model)(_images(), _configs(model))
    assert logits.device == CUDA and logits.shape == (4, 4, 10)


def test_bn_calibration(fake):
    from engine.eval.bn_calibration import calibrated

    model = _model()
    model.set_min_net()
    with calibrated(model, model.active_config(), [_images(), _images()]) as net:
        assert net(_images()).device == CUDA
    assert all(b.device == CUDA for b in model.buffers())


def test_evaluation(fake):
    """Loader batches (real CPU tensors) moved to the device, autocast bf16; stops where the top-1
    count is read."""
    from engine.eval.evaluate import top1

    model = _model()
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    assert reached(lambda: top1(model, loader, CUDA, channels_last=True, amp_dtype=torch.bfloat16)) == "needs data"


def test_export(fake, tmp_path):
    """A CUDA supernet's subnet exported: the export moves it to the CPU itself; stops where the logit
    scale is read."""
    from engine.search.export import export_subnet

    model = _model().eval()
    model.set_min_net()
    assert reached(lambda: export_subnet(model, model.active_config(), _images(2), tmp_path)) == "needs data"


def test_reached_lets_real_errors_through(fake):
    """The tier's one escape hatch is narrow: a device mismatch is an error, not a stop."""
    model = _model()
    with pytest.raises(RuntimeError):
        reached(lambda: model(torch.randn(2, 3, 32, 32)))          # CPU images into a CUDA model


def test_ranks_env_picks_devices_that_exist(monkeypatch):
    """Multi-rank tests: with fewer GPUs than ranks the GPUs are hidden (gloo on the CPU)."""
    from helpers import ranks_env

    for gpus, hidden in ((0, True), (1, True), (2, False), (8, False)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        env = ranks_env(2, {"PATH": "/bin"})
        assert (env.get("CUDA_VISIBLE_DEVICES") == "") is hidden and env["OMP_NUM_THREADS"] == "1"
