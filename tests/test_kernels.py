"""Triton kernels against the PyTorch references (TRITON_INTERPRET=1 on CPU; real GPU when present).

Fresh random inputs, awkward shapes (primes, non-multiples of the block sizes, active slices below
the maximum), every kernel size and stride, outputs poisoned with NaN so an unwritten element fails.
"""
import pytest
import torch

import engine.kernels.batchnorm as kbn
import engine.kernels.depthwise as kdw
import engine.kernels.pointwise as kpw
from engine.elastic.batchnorm import batchnorm_reference
from engine.elastic.conv import conv2d_reference
from engine.elastic.depthwise import depthwise_reference
from engine.elastic.grouped import grouped_depthwise_reference, grouped_pointwise_reference

from helpers import kernel_device, rel_err

pytestmark = pytest.mark.gpu_tier
DEVICE = kernel_device()
RTOL = 1e-4


@pytest.fixture(autouse=True)
def strict_fp32():
    """fp32 means fp32 on a GPU too (cuDNN convolutions and Triton dots default to TF32 there)."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(previous[0])
    torch.backends.cudnn.allow_tf32 = previous[1]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    from engine.kernels import common

    def poisoned(n, c, h, w, like):
        return common.empty_nchw_channels_last(n, c, h, w, like).fill_(float("nan"))

    for mod in (kbn, kdw, kpw):
        monkeypatch.setattr(mod, "empty_nchw_channels_last", poisoned)


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("n,h,w,max_in,max_out,cin,cout,bias", [
    (2, 5, 7, 29, 37, 19, 23, True), (1, 3, 3, 16, 16, 16, 16, False), (3, 1, 1, 67, 71, 67, 5, True),
    (2, 11, 13, 40, 24, 33, 17, False),
])
def test_pointwise_conv(n, h, w, max_in, max_out, cin, cout, bias):
    weight = torch.randn(max_out, max_in, 1, 1, device=DEVICE, requires_grad=True)
    b = torch.randn(max_out, device=DEVICE, requires_grad=True) if bias else None
    x = torch.randn(n, cin, h, w, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    y = kpw.pointwise_conv(x, weight, b, cout)
    ref = conv2d_reference(x, weight, b, cout, 1)
    assert rel_err(y, ref) < RTOL
    dy = torch.randn_like(ref)
    inputs = (x, weight) + ((b,) if bias else ())
    for got, want in zip(_grads(y, inputs, dy), _grads(ref, inputs, dy)):
        assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n,c,h,w,max_c", [(2, 19, 9, 7, 37), (1, 33, 6, 5, 33), (3, 5, 1, 4, 8)])
def test_depthwise_conv(k, stride, n, c, h, w, max_c):
    weight = torch.randn(max_c, 1, 7, 7, device=DEVICE, requires_grad=True)
    s = (7 - k) // 2
    filt = weight[:c, 0, s:s + k, s:s + k]                      # strided view, read in place
    x = torch.randn(n, c, h, w, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    y = kdw.depthwise_conv(x, filt, stride)
    ref = depthwise_reference(x, filt, stride)
    assert y.shape == ref.shape
    assert rel_err(y, ref) < RTOL
    dy = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, weight), dy), _grads(ref, (x, weight), dy)):
        assert rel_err(got, want) < RTOL


def _table(rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("n,h,w,cin,cout,max_in,max_out,widths", [
    (2, 5, 7, 19, 23, 37, 29, [[23, 19], [7, 11], [15, 1]]),       # in and out widths vary per group
    (1, 3, 3, 64, 70, 64, 70, [[70, 64], [70, 64]]),                # full width, tile boundaries
    (3, 1, 1, 33, 40, 48, 40, [[40, 33], [1, 33], [17, 33], [40, 5]]),
])
def test_grouped_pointwise_conv(n, h, w, cin, cout, max_in, max_out, widths):
    groups = len(widths)
    weight = torch.randn(max_out, max_in, 1, 1, device=DEVICE, requires_grad=True)
    x = torch.randn(n, groups * cin, h, w, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    table = _table(widths)
    y = kpw.grouped_pointwise_conv(x, weight, table, cout)
    ref = grouped_pointwise_reference(x, weight, table, cout)
    assert rel_err(y, ref) < RTOL
    assert (y.view(n, groups, cout, h, w)[:, 1, widths[1][0]:] == 0).all()      # zero beyond a group's width
    dy = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, weight), dy), _grads(ref, (x, weight), dy)):
        assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n,c,h,w,limits", [
    (2, 19, 9, 7, [[7, 19], [3, 11], [5, 1]]),
    (1, 40, 6, 5, [[7, 40], [7, 33], [3, 40], [5, 8]]),                # groups straddle channel blocks
    (3, 5, 1, 4, [[3, 5], [7, 2]]),
])
def test_grouped_depthwise_conv(stride, n, c, h, w, limits):
    groups = len(limits)
    filt = torch.randn(groups * c, 7, 7, device=DEVICE, requires_grad=True)
    x = torch.randn(n, groups * c, h, w, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    table = _table(limits)
    y = kdw.grouped_depthwise_conv(x, filt, stride, table)
    ref = grouped_depthwise_reference(x, filt, stride, table)
    assert rel_err(y, ref) < RTOL
    dy = torch.randn_like(ref)
    grads = _grads(y, (x, filt), dy)
    for got, want in zip(grads, _grads(ref, (x, filt), dy)):
        assert rel_err(got, want) < RTOL
    k0 = limits[0][0]
    outside = torch.ones(7, 7, dtype=torch.bool, device=DEVICE)
    outside[(7 - k0) // 2:(7 + k0) // 2, (7 - k0) // 2:(7 + k0) // 2] = False
    assert (grads[1][:c, outside] == 0).all()                                   # taps outside the window


@pytest.mark.parametrize("act", ["none", "relu", "h_swish"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n,c,h,w,max_c", [(3, 19, 5, 7, 37), (2, 64, 3, 3, 64), (4, 3, 1, 1, 9), (1, 70, 9, 8, 96)])
def test_batchnorm_act(act, training, n, c, h, w, max_c):
    weight = torch.randn(max_c, device=DEVICE, requires_grad=True)
    bias = torch.randn(max_c, device=DEVICE, requires_grad=True)
    rm, rv = torch.randn(max_c, device=DEVICE), torch.rand(max_c, device=DEVICE) + 0.5
    x = (torch.randn(n, c, h, w, device=DEVICE) * 2 + 1).to(memory_format=torch.channels_last).requires_grad_()
    y, stats = kbn.batchnorm_act(x, weight, bias, rm, rv, training, 1e-5, act)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    ref = batchnorm_reference(x, weight, bias, rm_ref, rv_ref, training, 0.1, 1e-5, act)
    assert rel_err(y, ref) < RTOL
    if training:
        assert rel_err(stats[0], x.detach().mean((0, 2, 3))) < RTOL
        assert rel_err(stats[1], x.detach().var((0, 2, 3), unbiased=False)) < RTOL
        kbn.running_update(rm, rv, stats, x.numel() // c, 0.1)          # the running slices, as the reference
        assert rel_err(rm, rm_ref) < RTOL and rel_err(rv, rv_ref) < RTOL
    dy = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, weight, bias), dy), _grads(ref, (x, weight, bias), dy)):
        assert rel_err(got, want) < RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["pointwise", "depthwise", "batchnorm"])
def test_bf16_kernels_on_gpu(op):
    """bf16 (GPU only: the interpreter has no bf16): |ours - fp32 ref| <= 2 |torch bf16 - fp32 ref| + atol."""
    x32 = torch.randn(8, 45, 14, 13, device="cuda").to(memory_format=torch.channels_last)
    if op == "pointwise":
        w = torch.randn(70, 64, 1, 1, device="cuda") / 8
        run = lambda x, wt: kpw.pointwise_conv(x, wt, None, 51)  # noqa: E731
        ref = lambda x, wt: conv2d_reference(x, wt, None, 51, 1)  # noqa: E731
    elif op == "depthwise":
        w = torch.randn(64, 1, 7, 7, device="cuda") / 7
        run = lambda x, wt: kdw.depthwise_conv(x, wt[:45, 0, 1:6, 1:6], 2)  # noqa: E731
        ref = lambda x, wt: depthwise_reference(x, wt[:45, 0, 1:6, 1:6], 2)  # noqa: E731
    else:
        w = torch.randn(64, device="cuda")
        b, rm, rv = torch.randn(64, device="cuda"), torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
        run = lambda x, wt: kbn.batchnorm_act(x, wt, b, rm, rv, True, 1e-5, "h_swish")[0]  # noqa: E731
        ref = lambda x, wt: batchnorm_reference(x, wt, b.to(wt.dtype), rm.to(wt.dtype), rv.to(wt.dtype),  # noqa: E731
                                                True, 0.1, 1e-5, "h_swish")
    out_ref = ref(x32.double(), w.double())
    out = run(x32.bfloat16(), w.bfloat16() if op != "batchnorm" else w).double()
    out_pt = ref(x32.bfloat16(), w.bfloat16() if op != "batchnorm" else w).double()
    assert (out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max() + 1e-2


def test_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration, as torch.compile relies on them."""
    x = torch.randn(2, 6, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    w = torch.randn(9, 8, 1, 1, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kpw._pointwise_conv, (x.requires_grad_(), w, None, 5))
    f = torch.randn(6, 5, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kdw._depthwise_conv, (x, f, 2))
    g, b = torch.randn(8, device=DEVICE, requires_grad=True), torch.randn(8, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    torch.library.opcheck(kbn._batchnorm_act, (x, g, b, rm, rv, True, 1e-5, "h_swish"))
    torch.library.opcheck(kbn._running_update, (rm, rv, torch.rand(2, 6, device=DEVICE), 40, 0.1))
    table = _table([[5, 3], [2, 1]])
    torch.library.opcheck(kpw._grouped_pointwise_conv, (x, w, table, 6))
    f7 = torch.randn(6, 7, 7, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kdw._grouped_depthwise_conv, (x, f7, 1, _table([[7, 3], [3, 2]])))


def test_elastic_layers_compile_without_graph_breaks():
    from engine.elastic import use_backend
    from engine.supernet.blocks import MBConvBlock

    block = MBConvBlock(8, 8, (3, 5, 7), (3, 4, 6), 1, "h_swish", True).to(DEVICE)
    block.set_active(5, 4)
    x = torch.randn(2, 8, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    with use_backend("triton"):
        eager = block(x)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        out = compiled(x)
        out.sum().backward()
    assert rel_err(out, eager) < RTOL


def test_backend_switch_falls_back_and_errors(caplog):
    from engine.elastic import ElasticConv2d, backend, set_backend

    with pytest.raises(ValueError, match="bogus"):
        set_backend("bogus")
    if not backend.availability("cuda")[0]:
        with pytest.raises(RuntimeError, match="not available"):
            set_backend("cuda")
    set_backend("torch")                      # a change of backend announces its fallbacks again
    set_backend("triton")
    conv = ElasticConv2d(4, 4, kernel_size=3).to(DEVICE)
    with caplog.at_level("WARNING", logger="engine.backend"):
        y = conv(torch.randn(1, 4, 5, 5, device=DEVICE))
    assert y.shape == (1, 4, 5, 5)
    assert "kernel 3" in caplog.text


def test_supernet_on_triton_matches_torch_reference():
    """A sampled subnet's loss, every gradient and every running statistic, fast path vs reference."""
    import copy

    from engine.elastic import use_backend
    from engine.supernet import ofa_mobilenetv3

    ref_model = ofa_mobilenetv3("cifar", num_classes=5, dropout=0.0).to(DEVICE)
    ref_model.set_min_net()
    cfg = ref_model.active_config()             # small (the interpreter is slow) but every kernel size
    cfg["ks"][0], cfg["e"][0], cfg["ks"][4], cfg["e"][4] = 7, 6, 5, 4
    ref_model.set_active_subnet(cfg)
    fast_model = copy.deepcopy(ref_model)
    x = torch.randn(2, 3, 12, 12, device=DEVICE).to(memory_format=torch.channels_last)  # BN needs >1 value
    for model, name in ((ref_model, "torch"), (fast_model, "triton")):
        with use_backend(name):
            model(x).square().mean().backward()
    for (name, p), q in zip(ref_model.named_parameters(), fast_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert _close(q.grad, p.grad, 1e-3), name
    for (name, b), c in zip(ref_model.named_buffers(), fast_model.buffers()):
        assert _close(c, b, RTOL), name


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    """Max-norm closeness with a floor: some values are zero in theory (a BN bias feeding a BN, the
    mean of a zero-mean input) and come out as rounding noise on both paths."""
    return bool((got - want).abs().max() <= rtol * want.abs().max() + 1e-6)


@pytest.mark.parametrize("n,h,w,max_in,max_out,cin,cout,act,res", [
    (2, 5, 7, 29, 37, 19, 23, "h_swish", False), (3, 9, 4, 16, 40, 16, 33, "none", True),
    (1, 1, 3, 70, 70, 70, 70, "relu", False),
])
def test_conv_bn_fused_matches_reference(n, h, w, max_in, max_out, cin, cout, act, res):
    """The GEMM with the BN-statistics epilogue, then BN [+ residual] from those statistics, against
    conv2d + batch_norm [+ add]: output, every gradient, the running statistics."""
    import copy

    from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, use_backend
    from engine.elastic.fused import conv_bn

    conv, bn = ElasticConv2d(max_in, max_out, 1).to(DEVICE), ElasticBatchNorm2d(max_out, act=act).to(DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    conv.set_active(cout)
    x = torch.randn(n, cin, h, w, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(n, cout, h, w, device=DEVICE).requires_grad_() if res else None
    outs = []
    for name, (c, b) in (("triton", (conv, bn)), ("torch", copy.deepcopy((conv, bn)))):
        with use_backend(name):
            y = conv_bn(c, b, x, r)
        outs.append((y, c, b))
    (y, c1, b1), (ref, c0, b0) = outs
    assert rel_err(y, ref) < RTOL
    dy = torch.randn_like(ref)
    inputs = lambda c, b: (x, c.weight, b.weight, b.bias) + ((r,) if res else ())  # noqa: E731
    for got, want in zip(_grads(y, inputs(c1, b1), dy), _grads(ref, inputs(c0, b0), dy)):
        assert rel_err(got, want) < RTOL
    assert rel_err(b1.running_mean, b0.running_mean) < RTOL and rel_err(b1.running_var, b0.running_var) < RTOL


def test_fused_ops_pass_opcheck():
    x = torch.randn(2, 6, 5, 4, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(9, 8, 1, 1, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kpw._pointwise_conv_stats, (x, w, 7))
    stats = torch.stack([torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE) + 0.5])
    g, b = torch.randn(8, device=DEVICE, requires_grad=True), torch.randn(8, device=DEVICE, requires_grad=True)
    res = torch.randn(2, 6, 5, 4, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(kbn._bn_apply, (x, stats, g, b, res, 1e-5, "h_swish"))
    torch.library.opcheck(kbn._bn_apply, (x, stats, g, b, None, 1e-5, "relu"))


@pytest.mark.parametrize("check,args", [
    (test_pointwise_conv, (2, 5, 7, 29, 37, 19, 23, True)),
    (test_grouped_pointwise_conv, (2, 5, 7, 19, 23, 37, 29, [[23, 19], [7, 11], [15, 1]])),
    (test_depthwise_conv, (5, 2, 2, 19, 9, 7, 37)),
    (test_grouped_depthwise_conv, (2, 1, 5, 6, 5, [[7, 5], [3, 2]])),
    (test_batchnorm_act, ("h_swish", True, 3, 19, 5, 7, 37)),
    (test_batchnorm_act, ("relu", False, 3, 19, 5, 7, 37)),
    (test_conv_bn_fused_matches_reference, (3, 9, 4, 16, 40, 16, 33, "none", True)),
], ids=lambda v: v.__name__.removeprefix("test_") if callable(v) else "-".join(map(str, v[:3])))
def test_split_paths_and_int64_indexing(check, args):
    """Every kernel and variant (bias, grouped, eval, statistics epilogue, residual) through its split /
    multi-split reductions (8 rows a split instead of thousands: ragged last splits, split-K chunks
    with no work) and its int64-index (WIDE) code, which production shapes reach but test shapes do not."""
    from engine.kernels.common import force_wide_index, rows_per_split

    with rows_per_split(8), force_wide_index():
        check(*args)


def test_int64_indexing_is_chosen_past_int32():
    """The batched sandwich's expand activation, G x C x H x W at b512 (4 x 144 x 112 x 112), spans
    more than 2^31 elements: its launches index in int64; at b128 int32 suffices."""
    from engine.kernels.common import wide_index

    def act(batch):
        return torch.empty(batch, 4 * 144, 112, 112, device="meta").to(memory_format=torch.channels_last)

    assert wide_index(act(512)) and not wide_index(act(128))
    assert wide_index(None, act(128), act(512).permute(0, 2, 3, 1)) and not wide_index(None)
