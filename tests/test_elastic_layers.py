"""Reference elastic layers against plain torch layers built on copied slices."""
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic import (ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear, ElasticSE,
                            apply_activation)
from engine.elastic.se import se_mid_channels

SEEDS = range(4)


def _outside_is_zero(grad: torch.Tensor, region: tuple) -> bool:
    rest = grad.clone()
    rest[region] = 0
    return bool((rest == 0).all())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 2), (3, 1)])
def test_conv_matches_plain_conv_on_slice(seed, k, stride):
    g = torch.Generator().manual_seed(seed)
    layer = ElasticConv2d(13, 17, k, stride, bias=True)
    nn.init.normal_(layer.bias)
    cin, cout = int(torch.randint(1, 14, (1,), generator=g)), int(torch.randint(1, 18, (1,), generator=g))
    layer.set_active(cout)
    x = torch.randn(3, cin, 9, 7, generator=g, requires_grad=True)
    plain = nn.Conv2d(cin, cout, k, stride, k // 2)
    with torch.no_grad():
        plain.weight.copy_(layer.weight[:cout, :cin]); plain.bias.copy_(layer.bias[:cout])
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), plain(x2)
    torch.testing.assert_close(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy); y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad[:cout, :cin], plain.weight.grad)
    assert _outside_is_zero(layer.weight.grad, (slice(0, cout), slice(0, cin)))
    torch.testing.assert_close(layer.bias.grad[:cout], plain.bias.grad)
    assert _outside_is_zero(layer.bias.grad, (slice(0, cout),))


def _independent_filter(weight, transforms, c, k):
    """Filter by explicit crops and matrix-vector products, one channel at a time."""
    out = []
    for ch in range(c):
        f = weight[ch, 0]
        size = f.shape[-1]
        while size > k:
            dst = size - 2
            vec = f[1:-1, 1:-1].reshape(-1)
            f = (transforms[f"{size}to{dst}"] @ vec).reshape(dst, dst)
            size = dst
        out.append(f)
    return torch.stack(out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_matches_plain_conv(seed, k, stride):
    g = torch.Generator().manual_seed(seed)
    layer = ElasticDepthwiseConv2d(11, (3, 5, 7), stride)
    with torch.no_grad():  # random transforms so the chain is really exercised
        for p in layer.transforms.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    c = int(torch.randint(1, 12, (1,), generator=g))
    layer.set_active(k)
    x = torch.randn(2, c, 10, 9, generator=g, requires_grad=True)
    filt = _independent_filter(layer.weight.detach(), {n: p.detach() for n, p in layer.transforms.items()}, c, k)
    plain = nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
    with torch.no_grad():
        plain.weight.copy_(filt.unsqueeze(1))
    y = layer(x)
    torch.testing.assert_close(y, plain(x))
    y.backward(torch.randn_like(y))
    # gradient lands in the first c channels; k < 7 reads only the 5x5 centre (the 7->5 crop)
    lo, hi = (0, 7) if k == 7 else (1, 6)
    assert _outside_is_zero(layer.weight.grad, (slice(0, c), slice(None), slice(lo, hi), slice(lo, hi)))
    assert layer.weight.grad[:c].abs().sum() > 0
    for name, p in layer.transforms.items():
        used = int(name.split("to")[1]) >= k
        assert (p.grad is not None and p.grad.abs().sum() > 0) == used, name


def test_depthwise_transform_identity_is_centre_crop():
    layer = ElasticDepthwiseConv2d(5, (3, 5, 7))
    for k in (3, 5):
        s = (7 - k) // 2
        layer.set_active(k)
        torch.testing.assert_close(layer.active_filter(5), layer.weight[:, 0, s:s + k, s:s + k])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("act", ["none", "relu", "h_swish"])
def test_batchnorm_matches_plain_bn(seed, act):
    g = torch.Generator().manual_seed(seed)
    layer = ElasticBatchNorm2d(19, momentum=0.3, act=act)
    with torch.no_grad():
        layer.weight.normal_(generator=g); layer.bias.normal_(generator=g)
        layer.running_mean.normal_(generator=g); layer.running_var.uniform_(0.5, 2.0, generator=g)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    c = int(torch.randint(1, 20, (1,), generator=g))
    plain = nn.BatchNorm2d(c, momentum=0.3)
    with torch.no_grad():
        for n in ("weight", "bias", "running_mean", "running_var"):
            getattr(plain, n).copy_(getattr(layer, n)[:c])
    x = (torch.randn(4, c, 5, 3, generator=g) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x), apply_activation(plain(x2), act)
    torch.testing.assert_close(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy); y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight.grad[:c], plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad[:c], plain.bias.grad)
    assert _outside_is_zero(layer.weight.grad, (slice(0, c),))
    torch.testing.assert_close(layer.running_mean[:c], plain.running_mean)
    torch.testing.assert_close(layer.running_var[:c], plain.running_var)
    torch.testing.assert_close(layer.running_mean[c:], before_mean[c:])
    torch.testing.assert_close(layer.running_var[c:], before_var[c:])
    layer.eval(); plain.eval()
    torch.testing.assert_close(layer(x), apply_activation(plain(x), act))


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_matches_plain_linear(seed):
    g = torch.Generator().manual_seed(seed)
    layer = ElasticLinear(23, 11)
    i, o = int(torch.randint(1, 24, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
    layer.set_active(o)
    x = torch.randn(5, i, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight[:o, :i].detach().clone(), layer.bias[:o].detach()))
    layer(x).sum().backward()
    assert _outside_is_zero(layer.weight.grad, (slice(0, o), slice(0, i)))


@pytest.mark.parametrize("seed", SEEDS)
def test_se_matches_independent_computation(seed):
    g = torch.Generator().manual_seed(seed)
    layer = ElasticSE(48)
    c = int(torch.randint(8, 49, (1,), generator=g))
    x = torch.randn(2, c, 4, 5, generator=g)
    mid = se_mid_channels(c)
    assert mid % 8 == 0
    w1, b1 = layer.reduce.weight[:mid, :c].detach(), layer.reduce.bias[:mid].detach()
    w2, b2 = layer.expand.weight[:c, :mid].detach(), layer.expand.bias[:c].detach()
    s = x.mean((2, 3))
    gate = F.hardsigmoid(F.relu(s @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(layer(x), x * gate[:, :, None, None])
    torch.testing.assert_close(layer.export(c)(x), x * gate[:, :, None, None])


def test_bad_settings_raise_value_error():
    with pytest.raises(ValueError, match="4"):
        ElasticDepthwiseConv2d(8).set_active(4)
    with pytest.raises(ValueError, match="9"):
        ElasticConv2d(8, 8).set_active(9)
    with pytest.raises(ValueError, match="12"):
        ElasticConv2d(8, 8)(torch.randn(1, 12, 3, 3))
    with pytest.raises(ValueError, match="20"):
        ElasticBatchNorm2d(16)(torch.randn(2, 20, 3, 3))
    with pytest.raises(ValueError, match="swish"):
        ElasticBatchNorm2d(16, act="swish")
    with pytest.raises(ValueError, match="3"):
        ElasticDepthwiseConv2d(8, stride=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_running_stats_update_whatever_the_module_dtype(dtype):
    """The fused kernels return float32 batch statistics; a module cast with .to(torch.bfloat16) (pure-bf16
    training) keeps bf16 running buffers. Both updates (one batch, and G batches folded in order) are
    computed in float32 and stored in the buffers' dtype (bf16 once crashed: lerp_ dtype mismatch)."""
    bn = ElasticBatchNorm2d(12, momentum=0.3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn = bn.to(dtype)
    start_mean, start_var = bn.running_mean.double().clone(), bn.running_var.double().clone()
    mean, var = torch.randn(7), torch.rand(7) + 0.1
    bn.update_running_stats(mean, var, 10)
    want_mean = start_mean[:7] * 0.7 + 0.3 * mean.double()
    want_var = start_var[:7] * 0.7 + 0.3 * var.double() * 10 / 9
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-6)
    assert bn.running_mean.dtype == dtype
    torch.testing.assert_close(bn.running_mean[:7].double(), want_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.running_var[:7].double(), want_var, rtol=tol, atol=tol)
    assert torch.equal(bn.running_mean[7:].double(), start_mean[7:])
    means, variances = torch.randn(3, 5), torch.rand(3, 5) + 0.1
    select = torch.tensor([[True] * 5, [True, False] * 2 + [True], [False] * 5])
    running = bn.running_mean[:5].double().clone(), bn.running_var[:5].double().clone()
    bn.fold_running_stats(means, variances, 10, select)
    for g in range(3):                                          # the sequential definition, in float64
        a = 0.3 * select[g].double()
        running = (running[0] * (1 - a) + a * means[g].double(),
                   running[1] * (1 - a) + a * variances[g].double() * 10 / 9)
    torch.testing.assert_close(bn.running_mean[:5].double(), running[0], rtol=tol, atol=tol)
    torch.testing.assert_close(bn.running_var[:5].double(), running[1], rtol=tol, atol=tol)


def test_pure_bf16_model_trains_both_sandwich_modes():
    """model.to(torch.bfloat16): a sequential and a batched sandwich step run and keep finite statistics."""
    from engine.supernet import ofa_mobilenetv3
    from engine.train.batched import BatchedSandwich, batched_step
    from engine.train.sandwich import sample_sandwich, sequential_step

    model = ofa_mobilenetv3("cifar", width_mult=0.5, num_classes=10, dropout=0.0).to(torch.bfloat16)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.bfloat16), torch.randint(0, 10, (4,))
    cfgs = sample_sandwich(model, "shrink", 3, "random", torch.Generator().manual_seed(0))
    sequential_step(model, model, x, y, cfgs, [1.0] * 3, 0.1, 1.0, None, None)
    batched_step(model, BatchedSandwich(model), x, y, cfgs, [1.0] * 3, 0.1, 1.0, None, None)
    for name, buf in model.named_buffers():
        assert buf.dtype == torch.bfloat16 and torch.isfinite(buf).all(), name


def test_kernels_import_nothing_from_engine_and_the_cuda_wrapper_no_triton():
    """kernels/ sits below engine/ (it imports no engine.* module: no cycle between the two folders),
    and importing the elastic layers and the CUDA extension's wrapper loads no Triton."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "engine" for n in names), (path.name, names)
    code = "import sys, engine.elastic, engine.elastic.cuda_ext; assert 'triton' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
