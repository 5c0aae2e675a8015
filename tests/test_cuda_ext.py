"""engine._C: built, importable, ops registered with the right schemas; its CPU path (ATen reference)
and, on a GPU, its CUDA kernels against the PyTorch references."""
import os
from pathlib import Path

import pytest
import torch

from engine.elastic import cuda_ext
from engine.elastic.batchnorm import batchnorm_reference
from engine.elastic.depthwise import depthwise_reference
from helpers import rel_err

try:
    EXT = cuda_ext.load()
except ImportError as err:
    # where nvcc is installed (our machines, CI) a missing extension is a failed build, not a skip
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if nvcc.exists() and os.environ.get("ENGINE_NO_CUDA") != "1":
        raise RuntimeError(f"{nvcc} exists but engine._C is not built: run `python setup.py build_ext "
                           f"--inplace` ({err})") from err
    pytest.skip(f"engine._C not built and no nvcc: {err}", allow_module_level=True)

SCHEMAS = {
    "depthwise_conv": "engine_cuda::depthwise_conv(Tensor x, Tensor filt, int stride) -> Tensor",
    "depthwise_conv_backward": "engine_cuda::depthwise_conv_backward(Tensor grad_y, Tensor x, Tensor filt, "
                               "int stride) -> (Tensor, Tensor)",
    "batchnorm_act": "engine_cuda::batchnorm_act(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, "
                     "Tensor running_var, bool training, float eps, int act) -> (Tensor, Tensor)",
    "batchnorm_act_backward": "engine_cuda::batchnorm_act_backward(Tensor grad_y, Tensor x, Tensor weight, "
                              "Tensor bias, Tensor stats, bool training, float eps, int act) "
                              "-> (Tensor, Tensor, Tensor)",
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_ops_are_registered_with_schemas():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.engine_cuda, name).default._schema) == schema


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2), (7, 1), (7, 2)])
def test_depthwise_matches_reference(device, k, stride):
    weight = torch.randn(37, 1, 7, 7, device=device, requires_grad=True)
    s = (7 - k) // 2
    filt = weight[:19, 0, s:s + k, s:s + k]
    x = torch.randn(2, 19, 9, 7, device=device).to(memory_format=torch.channels_last).requires_grad_()
    y, ref = cuda_ext.depthwise_conv(x, filt, stride), depthwise_reference(x, filt, stride)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < 1e-4
    dy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, weight), dy), torch.autograd.grad(ref, (x, weight), dy)):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["none", "relu", "h_swish"])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_reference(device, act, training):
    w, b = (torch.randn(40, device=device, requires_grad=True) for _ in range(2))
    rm, rv = torch.randn(40, device=device), torch.rand(40, device=device) + 0.5
    x = (torch.randn(3, 27, 5, 6, device=device) * 2 + 1).to(memory_format=torch.channels_last).requires_grad_()
    y, stats = cuda_ext.batchnorm_act(x, w, b, rm, rv, training, 1e-5, act)
    ref = batchnorm_reference(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, act)
    assert rel_err(y, ref) < 1e-4
    if training:
        want = torch.stack([x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)])
        assert rel_err(stats, want) < 1e-4
    dy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(ref, (x, w, b), dy)):
        assert rel_err(got, want) < 1e-4


def test_opcheck_cpu():
    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.engine_cuda.depthwise_conv.default, (x, torch.randn(6, 3, 3), 2))
    g, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.engine_cuda.batchnorm_act.default,
                          (x.requires_grad_(), g, b, torch.zeros(8), torch.ones(8), True, 1e-5, 2))


def test_backend_reports_cuda_extension_state():
    from engine.elastic import backend

    ok, why = backend.availability("cuda")
    assert ok == (EXT.with_cuda and torch.cuda.is_available()), why
