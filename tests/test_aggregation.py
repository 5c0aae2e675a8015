"""A sandwich step's summed gradient equals the reference's per-subnet masked accumulation."""
import copy

import torch
import torch.nn.functional as F

from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d, ElasticLinear, ElasticSE
from engine.elastic.se import se_mid_channels
from engine.supernet import ofa_mobilenetv3
from engine.train.losses import kd_loss, soft_labels
from engine.train.sandwich import sample_sandwich, sequential_step


def _slice_masks(model, x):
    """Masks marking the weight slices the active subnet reads (recorded by forward hooks), as the
    reference implementations build them."""
    masks = {id(p): torch.zeros_like(p) for p in model.parameters()}

    def conv(m, inp, out):
        masks[id(m.weight)][:out.shape[1], :inp[0].shape[1]] = 1
        if m.bias is not None:
            masks[id(m.bias)][:out.shape[1]] = 1

    def dw(m, inp, out):
        c, k, kmax = out.shape[1], m.active_kernel_size, m.kernel_sizes[-1]
        lo = 0 if k == kmax else (kmax - m.kernel_sizes[-2]) // 2
        masks[id(m.weight)][:c, :, lo:kmax - lo, lo:kmax - lo] = 1
        for name, p in m.transforms.items():
            if int(name.split("to")[1]) >= k:
                masks[id(p)][:] = 1

    def bn(m, inp, out):
        masks[id(m.weight)][:out.shape[1]] = 1
        masks[id(m.bias)][:out.shape[1]] = 1

    def se(m, inp, out):                      # its two linears' slices: [:mid, :c] and [:c, :mid]
        c = inp[0].shape[1]
        mid = se_mid_channels(c)
        masks[id(m.reduce.weight)][:mid, :c] = 1
        masks[id(m.reduce.bias)][:mid] = 1
        masks[id(m.expand.weight)][:c, :mid] = 1
        masks[id(m.expand.bias)][:c] = 1

    hooks = {ElasticConv2d: conv, ElasticLinear: conv, ElasticDepthwiseConv2d: dw, ElasticBatchNorm2d: bn,
             ElasticSE: se}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return masks


def test_summed_gradients_equal_masked_accumulation():
    torch.manual_seed(0)
    model = ofa_mobilenetv3("cifar", num_classes=10, dropout=0.0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    cfgs = sample_sandwich(model, "shrink", 4, "random", torch.Generator().manual_seed(4))
    epsilons = [1.0, 0.7, 0.3, 0.3]
    reference = copy.deepcopy(model)

    sequential_step(model, model, x, y, cfgs, epsilons, 0.1, 1.0, None, None)

    acc = {id(p): torch.zeros_like(p) for p in reference.parameters()}
    reference.set_active_subnet(cfgs[0])
    targets = soft_labels(reference(x), 1.0)
    for cfg, epsilon in zip(cfgs, epsilons):
        reference.set_active_subnet(cfg)
        masks = _slice_masks(reference, x)
        reference.zero_grad(set_to_none=False)
        logits = reference(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1) if cfg == cfgs[0] else kd_loss(logits, targets, 1.0)
        loss.backward()
        for p in reference.parameters():
            if p.grad is not None:
                acc[id(p)] += epsilon * masks[id(p)] * p.grad
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, acc[id(q)], rtol=1e-4, atol=1e-6, msg=name)
