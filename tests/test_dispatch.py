"""Measured dispatch (backend "auto"): timed once per call signature, the fastest kept in memory and in a
per-device JSON file; a corrupt or foreign file is ignored with a warning; a forced backend is obeyed.
Deterministic: an injected timer stands in for CUDA events (on the GPU, or on CPU where the Triton
kernels run in the interpreter)."""
import json
import logging

import pytest
import torch

from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, backend
from engine.elastic.dispatch import DISPATCHER

from helpers import kernel_device

pytestmark = pytest.mark.gpu_tier
DEVICE = kernel_device()


@pytest.fixture
def timer(monkeypatch, tmp_path):
    """A timer that says `ms[backend]` and records every call; the cache in a temporary file."""
    monkeypatch.setenv("ENGINE_DISPATCH_CACHE", str(tmp_path / "dispatch.json"))
    calls = []
    ms = {"torch": 2.0, "triton": 1.0, "cuda": 3.0}

    def fake(name, run, device):
        run()                                             # the candidate must really run (fwd + bwd)
        calls.append(name)
        return ms[name]

    backend.set_timer(fake, devices=(torch.device(DEVICE).type,))
    backend.set_backend("auto")
    yield ms, calls, tmp_path / "dispatch.json"
    backend.set_timer(None)


def _conv():
    layer = ElasticConv2d(12, 20, 1).to(DEVICE)
    layer.set_active(9)
    return layer, torch.randn(2, 7, 5, 5, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()


def test_picks_the_fastest_once_and_persists(timer):
    ms, calls, path = timer
    layer, x = _conv()
    before = layer.weight.grad
    y = layer(x)
    assert set(calls) == {"torch", "triton"} and layer.weight.grad is before     # timing leaves no gradient
    assert _kernel_used(layer, x) == "triton"
    layer(x)
    assert len(calls) == 2                                                      # measured once
    data = json.loads(path.read_text())
    (key, entry), = data["choices"].items()
    assert key.startswith("pointwise_conv|float32|") and entry["choice"] == "triton"
    assert entry["ms"] == {"torch": 2.0, "triton": 1.0}
    assert data["device"] == DISPATCHER.device_name(x.device)
    assert {"torch", "triton", "engine"} <= set(data["versions"])
    ms["triton"] = 9.0                      # a new process reads the file: no measurement, same choice
    backend.set_timer(timer_that_fails, devices=(torch.device(DEVICE).type,))
    fresh, _ = _conv()
    assert _kernel_used(fresh, x) == "triton"
    torch.testing.assert_close(y, layer(x))


def timer_that_fails(name, run, device):
    raise AssertionError("measured again although the choice was cached")


def test_the_reference_wins_when_faster_and_without_a_timer(timer):
    ms, calls, _ = timer
    ms["torch"] = 0.5
    layer, x = _conv()
    assert _kernel_used(layer, x) == "torch"
    backend.set_timer(None)                 # CPU and the CUDA-event timer: nothing is measured: the prior
    layer2 = ElasticDepthwiseConv2d(8, (3, 5, 7))
    assert _kernel_used(layer2, torch.randn(2, 8, 6, 6)) == "torch"     # (CPU tensors even on a GPU machine)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "device": "NVIDIA H200",
                                                                  "versions": {}, "choices": {}})])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(timer, caplog, content):
    ms, calls, path = timer
    path.write_text(content)
    layer, x = _conv()
    with caplog.at_level(logging.WARNING, logger="engine.dispatch"):
        layer(x)
    assert "ignored, it will be rewritten" in caplog.text
    assert calls and json.loads(path.read_text())["device"] == DISPATCHER.device_name(x.device)


def test_a_forced_backend_is_obeyed_without_measuring(timer):
    _, calls, _ = timer
    for name in ("torch", "triton"):
        backend.set_backend(name)
        layer, x = _conv()
        assert _kernel_used(layer, x) == name
    assert calls == []


def test_batchnorm_measurement_has_no_side_effects(timer):
    _, calls, _ = timer
    bn = ElasticBatchNorm2d(16, act="h_swish").to(DEVICE)
    before = bn.running_mean.clone()
    x = torch.randn(3, 10, 4, 4, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    bn(x)
    assert set(calls) == {"torch", "triton"}
    ref = ElasticBatchNorm2d(16, act="h_swish").to(DEVICE)
    with backend.use_backend("torch"):
        ref(x)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)             # updated exactly once
    assert not torch.equal(bn.running_mean, before)


def test_no_measurement_while_compiling(timer):
    _, calls, _ = timer
    layer, x = _conv()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x)
    assert calls == []


def test_engine_info_prints_the_cached_choices(timer):
    from engine import info

    layer, x = _conv()
    layer(x)
    text = info.report()
    assert "measured choices" in text and "pointwise_conv|float32" in text and "triton" in text


def _kernel_used(layer, x) -> str:
    """Which implementation `layer` runs for x (the memoised choice)."""
    layer(x)
    (choice,) = {v for v in layer._choices.values()}
    return choice
