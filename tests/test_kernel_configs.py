"""Every config of every autotuned kernel's space gives the reference's numbers (the interpreter runs
one config per kernel otherwise; on a GPU autotuning may pick any of them). Small awkward shapes, so
that even the largest tiles cover several programs or a ragged edge. Not in the GPU suite's tier: on a
GPU each config is one more compile (about 100 s in all), and every config already compiles to cubin
in CI (tests/test_kernels_compile.py)."""
import pytest
import torch
import triton

import engine.kernels.batchnorm as kbn
import engine.kernels.depthwise as kdw
import engine.kernels.pointwise as kpw
from engine.elastic.batchnorm import batchnorm_reference
from engine.elastic.conv import conv2d_reference
from engine.elastic.depthwise import depthwise_reference
from helpers import kernel_device, rel_err as _rel

DEVICE = kernel_device()


def _space(module, name):
    return {"_matmul_kernel": kpw._SPACE, "_reduce_kernel": kbn._REDUCE_SPACE, "_apply_kernel": kbn._APPLY_SPACE,
            "_dw_forward_kernel": kdw._SPACE, "_dw_grad_input_kernel": kdw._SPACE,
            "_dw_grad_filter_kernel": kdw._SPACE}[name]


CASES = [(kpw, "_matmul_kernel"), (kbn, "_reduce_kernel"), (kbn, "_apply_kernel"), (kdw, "_dw_forward_kernel"),
         (kdw, "_dw_grad_input_kernel"), (kdw, "_dw_grad_filter_kernel")]


@pytest.fixture
def only(monkeypatch):
    """Make an autotuned kernel run exactly one given config."""
    def set_config(module, name, entry):
        kernel = getattr(module, name)
        config = triton.Config(dict(entry[0]), num_warps=entry[1], num_stages=entry[2] if len(entry) > 2 else 3)
        monkeypatch.setattr(kernel, "configs", [config])
        monkeypatch.setattr(kernel, "cache", {})
    return set_config


def _check(run, ref, inputs):
    y, want = run(), ref()
    assert _rel(y, want) < 1e-4
    dy = torch.randn_like(want)
    for got, exp in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        assert _rel(got, exp) < 1e-4


@pytest.mark.parametrize("case,index", [(c, i) for c in CASES for i in range(len(_space(*c)))],
                         ids=lambda v: v[1] if isinstance(v, tuple) else str(v))
def test_every_config_matches_the_reference(only, case, index):
    module, name = case
    only(module, name, _space(module, name)[index])
    torch.set_float32_matmul_precision("highest")
    if module is kpw:
        w = torch.randn(140, 150, 1, 1, device=DEVICE, requires_grad=True)
        x = torch.randn(1, 133, 5, 7, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
        _check(lambda: kpw.pointwise_conv(x, w, None, 137), lambda: conv2d_reference(x, w, None, 137, 1), (x, w))
    elif module is kbn:
        w, b = (torch.randn(150, device=DEVICE, requires_grad=True) for _ in range(2))
        rm, rv = torch.zeros(150, device=DEVICE), torch.ones(150, device=DEVICE)
        x = (torch.randn(2, 133, 5, 7, device=DEVICE) + 1).to(memory_format=torch.channels_last).requires_grad_()
        _check(lambda: kbn.batchnorm_act(x, w, b, rm, rv, True, 1e-5, "h_swish")[0],
               lambda: batchnorm_reference(x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, "h_swish"), (x, w, b))
    else:
        f = torch.randn(133, 5, 5, device=DEVICE, requires_grad=True)
        x = torch.randn(1, 133, 5, 7, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
        _check(lambda: kdw.depthwise_conv(x, f, 2), lambda: depthwise_reference(x, f, 2), (x, f))
