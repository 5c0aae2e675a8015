"""OFA-MobileNetV3 supernet: export equivalence, cost counters, sampling, channel re-organisation."""
import json

import pytest
import torch

from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear, ElasticSE
from engine.elastic.se import se_mid_channels
from engine.eval.bn_calibration import recalibrate_bn
from engine.supernet import ofa_mobilenetv3

VARIANTS = [("cifar", 1.0, 32), ("cifar", 1.2, 32), ("imagenet", 1.0, 96), ("imagenet", 1.2, 96)]


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ElasticBatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)


def _configs(model, n_random=5):
    g = torch.Generator().manual_seed(1)
    model.set_max_net(); yield "max"
    model.set_min_net(); yield "min"
    for i in range(n_random):
        model.sample_active_subnet(g); yield f"random{i}"


@pytest.mark.parametrize("variant,width,res", VARIANTS)
def test_export_matches_supernet(variant, width, res):
    model = ofa_mobilenetv3(variant, width, num_classes=7).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, res, res)
    for name in _configs(model):
        exported = model.export_active_subnet().eval()
        assert not any(isinstance(m, (ElasticConv2d, ElasticBatchNorm2d)) for m in exported.modules())
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5, msg=name)


def _hook_counter(model, res):
    """MACs and parameters of the active subnet counted by forward hooks on the supernet's elastic
    modules, from the shapes each call actually used."""
    counts = {"macs": 0, "params": 0}

    def conv_hook(m, inp, out):
        cin, cout, k = inp[0].shape[1], out.shape[1], m.kernel_size
        counts["macs"] += out[0].numel() * cin * k * k
        counts["params"] += cout * cin * k * k + (cout if m.bias is not None else 0)

    def dw_hook(m, inp, out):
        k = m.active_kernel_size
        counts["macs"] += out[0].numel() * k * k
        counts["params"] += out.shape[1] * k * k

    def linear_hook(m, inp, out):
        counts["macs"] += out.shape[-1] * inp[0].shape[-1]
        counts["params"] += out.shape[-1] * (inp[0].shape[-1] + 1)

    def se_hook(m, inp, out):                # the SE's two linears run on its pooled input
        c = inp[0].shape[1]
        mid = se_mid_channels(c)
        counts["macs"] += 2 * c * mid
        counts["params"] += 2 * c * mid + c + mid

    def bn_hook(m, inp, out):
        counts["params"] += 2 * out.shape[1]

    hooks = [m.register_forward_hook({ElasticConv2d: conv_hook, ElasticDepthwiseConv2d: dw_hook,
                                      ElasticLinear: linear_hook, ElasticBatchNorm2d: bn_hook,
                                      ElasticSE: se_hook}[type(m)])
             for m in model.modules() if type(m) in (ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear,
                                                     ElasticBatchNorm2d, ElasticSE)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, res, res))
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("variant,width,res", [("cifar", 1.0, 32), ("imagenet", 1.2, 224)])
def test_flops_and_params_match_hook_counter(variant, width, res):
    model = ofa_mobilenetv3(variant, width, num_classes=10)
    for name in _configs(model, n_random=2):
        counts = _hook_counter(model, res)
        assert model.flops(res) == 2 * counts["macs"], name
        assert model.params() == counts["params"], name


def test_sampling_is_reproducible_and_round_trips():
    model = ofa_mobilenetv3("cifar")
    a = [model.sample_active_subnet(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(6)
    for sample in (model.sample_active_subnet, model.sample_compound_subnet):
        cfg = sample(g)
        assert model.active_config() == cfg
        text = json.dumps(model.active_config())
        model.set_max_net()
        model.set_active_subnet(json.loads(text))
        assert model.active_config() == cfg


def test_compound_sampling_couples_depth_and_expand():
    model = ofa_mobilenetv3("cifar")
    g = torch.Generator().manual_seed(0)
    pairs = dict(zip(model.spec.depths, model.spec.expand_ratios))
    for _ in range(5):
        cfg = model.sample_compound_subnet(g)
        for s, d in enumerate(cfg["d"]):
            stage = cfg["e"][s * model.spec.max_depth:(s + 1) * model.spec.max_depth]
            assert set(stage) == {pairs[d]}


def test_bad_config_raises():
    model = ofa_mobilenetv3("cifar")
    cfg = model.active_config()
    cfg["ks"][3] = 4
    with pytest.raises(ValueError, match=r"ks.*\[3\]=4"):
        model.set_active_subnet(cfg)
    with pytest.raises(ValueError, match="entries"):
        model.set_active_subnet({"ks": [3], "e": [3], "d": [2]})


def test_reorganize_channels_keeps_max_net_and_permutes_momentum():
    model = ofa_mobilenetv3("cifar", num_classes=5).eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    model.set_max_net()
    before = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()(x).sum().backward()
    opt.step()
    block = model.blocks[0]
    mom = opt.state[block.pw_conv.weight]["momentum_buffer"].clone()
    weight = block.pw_conv.weight.detach().clone()
    model.eval()
    before = model(x)
    model.reorganize_channels(opt)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    importance = block.pw_conv.weight.abs().sum((0, 2, 3))
    assert (importance[:-1] >= importance[1:]).all()
    order = torch.argsort(weight.abs().sum((0, 2, 3)), descending=True)
    torch.testing.assert_close(opt.state[block.pw_conv.weight]["momentum_buffer"], mom[:, order])


def test_bn_recalibration_estimates_batch_statistics():
    model = ofa_mobilenetv3("cifar", num_classes=5)
    model.set_min_net()
    batches = [torch.randn(8, 3, 32, 32) * 2 + 0.5 for _ in range(3)]
    assert recalibrate_bn(model, batches) == 24
    bn = model.first_conv.bn
    stem = model.first_conv.conv
    means = torch.stack([stem(b).mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means.detach(), rtol=1e-4, atol=1e-5)
    assert model.training  # mode restored


@pytest.mark.parametrize("seed,position", [(0, 1), (1, 1), (2, 3)])
def test_block_forward_with_group_tables_runs_each_subnet(seed, position):
    """MBConvBlock.forward given the batched step's group tables: group g of the output equals the
    block's plain forward on group g's input at config g (its own kernel size, width, SE hidden width
    and BN batch statistics), and a group whose subnet skips the block gets its input back. Stage 1's
    blocks (SE, residual): position 1 runs in every subnet, position 3 is skipped by the min net.
    float64: the paths differ only by summation order (~1e-15), so 1e-9 relative catches any real
    difference."""
    from engine.train.batched import plan
    from engine.train.sandwich import sample_sandwich

    torch.manual_seed(seed)
    model = ofa_mobilenetv3("cifar", width_mult=0.5, num_classes=10, dropout=0.0).double()
    cfgs = sample_sandwich(model, "shrink", 4, "random", torch.Generator().manual_seed(seed))
    d = model.spec.max_depth
    j = d + position
    block, groups = plan(model, cfgs, torch.device("cpu")).blocks[1 + j]
    assert block.residual and block.se is not None
    x = torch.randn(2, len(cfgs), block.max_in, 6, 6, dtype=torch.float64)
    got = block(x.flatten(1, 2), groups).view(2, len(cfgs), block.out, 6, 6)
    runs = [position < cfg["d"][1] for cfg in cfgs]
    for g, cfg in enumerate(cfgs):
        model.set_active_subnet(cfg)
        want = block(x[:, g]) if runs[g] else x[:, g]
        assert (got[:, g] - want).abs().max() <= 1e-9 * want.abs().max(), (g, runs[g])
    assert position == 1 or not all(runs), "no group skips the block: the test checks less than it says"
