"""Dispatch for backend "auto": the installed table's choice runs (a lookup, nothing measured); a signature
the table lacks, or a choice that cannot serve the call, runs the reference (logged once); a forced
backend is obeyed; compiled regions run the reference."""
import logging

import pytest
import torch

import engine.kernels.pointwise as pointwise
from engine.elastic import ElasticConv2d, backend, dispatch

from helpers import kernel_device

pytestmark = pytest.mark.gpu_tier
DEVICE = kernel_device()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of the Triton pointwise kernel (which still runs); no table installed afterwards."""
    calls, real = [], pointwise.pointwise_conv

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pointwise, "pointwise_conv", spy)
    backend.set_backend("auto")
    yield calls
    dispatch.install(None)


def _conv():
    layer = ElasticConv2d(12, 20, 1).to(DEVICE)
    layer.set_active(9)
    return layer, torch.randn(2, 7, 5, 5, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()


def _signature(layer, x) -> str:
    seen = []
    with backend.observe(lambda sig, *_: seen.append(sig)):
        layer(x)
    (sig,) = seen
    return sig


def test_the_table_choice_runs(kernel_calls):
    layer, x = _conv()
    sig = _signature(layer, x)
    assert sig == "pointwise_conv|float32|amp=off|cl|grad|2x7x5x5|9|1|1" and kernel_calls == []   # no table: reference
    dispatch.install({sig: "triton"})
    y = layer(x)
    assert kernel_calls == [1]
    with backend.use_backend("torch"):
        torch.testing.assert_close(y, layer(x))
    assert kernel_calls == [1]


def test_a_missing_signature_runs_the_reference_logged_once(kernel_calls, caplog):
    layer, x = _conv()
    dispatch.install({"some|other|signature": "triton"})
    with caplog.at_level(logging.WARNING, logger="engine.dispatch"):
        layer(x)
        layer(x)
    assert kernel_calls == [] and len(caplog.records) == 1 and "no entry for pointwise_conv" in caplog.text


def test_a_choice_that_cannot_serve_the_call_runs_the_reference(kernel_calls):
    layer, x = _conv()
    dispatch.install({_signature(layer, x): "cuda"})            # no CUDA kernel for this op
    layer(x)
    assert kernel_calls == []


def test_a_forced_backend_is_obeyed(kernel_calls):
    layer, x = _conv()
    dispatch.install({_signature(layer, x): "triton"})
    with backend.use_backend("torch"):
        layer(x)
    assert kernel_calls == []
    dispatch.install(None)
    with backend.use_backend("triton"):
        layer(x)
    assert kernel_calls == [1]


def test_compiled_regions_run_the_reference(kernel_calls):
    layer, x = _conv()
    dispatch.install({_signature(layer, x): "triton"})
    torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert kernel_calls == []
