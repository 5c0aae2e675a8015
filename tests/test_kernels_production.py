"""GPU only: the kernels as production runs them, with the configs autotuning picks, at the OFA-MobileNetV3
layer shapes of a b128, 224 px, bf16, channels-last step, against the float64 reference with the
project's error rule: |ours - ref64| <= 2 |torch bf16 - ref64| + atol (forward and every gradient).
Autotuning is switched on here whatever ENGINE_AUTOTUNE says (the kernel's whole space is restored), so
the config checked is the one a training run would pick on this GPU."""
import pytest
import torch
import triton

import engine.kernels.batchnorm as kbn
import engine.kernels.depthwise as kdw
import engine.kernels.pointwise as kpw
from engine.elastic.batchnorm import batchnorm_reference
from engine.elastic.conv import conv2d_reference
from engine.elastic.depthwise import depthwise_reference
from engine.elastic.grouped import grouped_depthwise_reference, grouped_pointwise_reference

pytestmark = pytest.mark.gpu
ATOL = 1e-2
SPACES = [(kpw, "_matmul_kernel", kpw._SPACE), (kbn, "_reduce_kernel", kbn._REDUCE_SPACE),
          (kbn, "_apply_kernel", kbn._APPLY_SPACE), (kdw, "_dw_forward_kernel", kdw._SPACE),
          (kdw, "_dw_grad_input_kernel", kdw._SPACE), (kdw, "_dw_grad_filter_kernel", kdw._SPACE)]


@pytest.fixture(autouse=True)
def autotuned(monkeypatch):
    """Every autotuned kernel tunes over its whole space (fresh choices for these shapes)."""
    for module, name, space in SPACES:
        kernel = getattr(module, name)
        configs = [triton.Config(dict(e[0]), num_warps=e[1], num_stages=e[2] if len(e) > 2 else 3) for e in space]
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})


def _act(n, c, h, w, scale=1.0):
    return (torch.randn(n, c, h, w, device="cuda") * scale).to(memory_format=torch.channels_last)


def _check(fast, ref, tensors32, backward=True):
    """fast/ref: fn(*tensors) -> output; the rule on the output and (backward) on each tensor's gradient."""
    def grads(fn, dtype):
        ts = [t.detach().to(dtype).requires_grad_(backward) for t in tensors32]
        out = fn(*ts)
        if not backward:
            return [out.double()]
        dy = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(out.dtype)
        return [out.double(), *(g.double() for g in torch.autograd.grad(out, ts, dy))]

    want, ours, torch_lp = grads(ref, torch.float64), grads(fast, torch.bfloat16), grads(ref, torch.bfloat16)
    for i, (w, o, t) in enumerate(zip(want, ours, torch_lp)):
        bound = 2 * (t - w).abs().max() + ATOL * w.abs().max().clamp_min(1.0)
        assert (o - w).abs().max() <= bound, (i, (o - w).abs().max().item(), bound.item())


@pytest.mark.parametrize("n,cin,cout,px", [(128, 24, 144, 56), (128, 240, 40, 28), (128, 960, 160, 7)])
def test_pointwise_at_production_shapes(n, cin, cout, px):
    w = torch.randn(cout + 8, cin + 8, 1, 1, device="cuda") / cin ** 0.5
    _check(lambda x, wt: kpw.pointwise_conv(x, wt, None, cout), lambda x, wt: conv2d_reference(x, wt, None, cout, 1),
           [_act(n, cin, px, px), w])


@pytest.mark.parametrize("n,c,cout,px", [(128, 24, 144, 56)])
def test_pointwise_stats_at_production_shapes(n, c, cout, px):
    w = torch.randn(cout, c, 1, 1, device="cuda") / c ** 0.5

    def fast(x, wt):
        y, stats = kpw.pointwise_conv_stats(x, wt, cout)
        return (y.float() - stats[0][None, :, None, None]) * stats[1][None, :, None, None].rsqrt()

    def ref(x, wt):
        y = conv2d_reference(x, wt, None, cout, 1)
        yf = y.float() if y.dtype != torch.float64 else y
        return (yf - yf.mean((0, 2, 3), keepdim=True)) / yf.var((0, 2, 3), unbiased=False, keepdim=True).sqrt()

    _check(fast, ref, [_act(n, c, px, px), w], backward=False)     # the statistics carry no gradient


@pytest.mark.parametrize("k,stride,c,px", [(7, 1, 144, 56), (5, 2, 96, 112), (3, 1, 960, 7)])
def test_depthwise_at_production_shapes(k, stride, c, px):
    f = torch.randn(c, k, k, device="cuda") / k
    _check(lambda x, ft: kdw.depthwise_conv(x, ft, stride), lambda x, ft: depthwise_reference(x, ft, stride),
           [_act(128, c, px, px), f])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("c,px", [(144, 56), (240, 28)])
def test_batchnorm_at_production_shapes(training, c, px):
    b = torch.randn(c, device="cuda")
    rm, rv = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5

    def fast(x, wt):
        return kbn.batchnorm_act(x, wt.float(), b, rm, rv, training, 1e-5, "h_swish")[0]

    def ref(x, wt):
        return batchnorm_reference(x, wt, b.to(wt.dtype), rm.to(wt.dtype).clone(), rv.to(wt.dtype).clone(), training,
                                   0.1, 1e-5, "h_swish")

    _check(fast, ref, [_act(128, c, px, px, 2.0) + 1, torch.rand(c, device="cuda") + 0.5])


def test_grouped_at_production_shapes():
    """The batched sandwich's four groups at the 28 px stage (b128)."""
    widths = torch.tensor([[240, 40], [120, 40], [160, 40], [200, 40]], dtype=torch.int32, device="cuda")
    w = torch.randn(240, 40, 1, 1, device="cuda") / 40 ** 0.5
    _check(lambda x, wt: kpw.grouped_pointwise_conv(x, wt, widths, 240),
           lambda x, wt: grouped_pointwise_reference(x, wt, widths, 240), [_act(128, 4 * 40, 28, 28), w])
    limits = torch.tensor([[7, 240], [3, 120], [5, 160], [7, 200]], dtype=torch.int32, device="cuda")
    f = torch.randn(4 * 240, 7, 7, device="cuda") / 7
    _check(lambda x, ft: kdw.grouped_depthwise_conv(x, ft, 1, limits),
           lambda x, ft: grouped_depthwise_reference(x, ft, 1, limits), [_act(128, 4 * 240, 28, 28), f])
