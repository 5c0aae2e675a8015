"""The batched sandwich step equals the sequential reference: loss, every gradient, every BN running
statistic, and the parameters after one optimizer step.

Compared in float64: with 4 images the deepest stages batch-normalise over 4 values, which amplifies
float32 rounding (different but equally valid summation orders) to ~1e-2 in early-layer gradients;
in float64 the two paths agree to ~1e-12, which is the semantic check."""
import copy

import pytest
import torch

from engine.supernet import ofa_mobilenetv3
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.sandwich import sample_sandwich, sequential_step


def _pair(variant, seed):
    torch.manual_seed(seed)
    model = ofa_mobilenetv3(variant, width_mult=0.5, num_classes=10, dropout=0.0)   # narrow: float64 on CPU
    with torch.no_grad():                           # non-identity transforms exercise the kernel chain
        for m in model.modules():
            if hasattr(m, "transforms"):
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn_like(p))
    model.double()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("variant,res,seed,sampler", [("cifar", 12, 0, "random"), ("cifar", 12, 1, "compound"),
                                                      ("imagenet", 32, 2, "random")])
def test_batched_equals_sequential(variant, res, seed, sampler):
    seq, bat = _pair(variant, seed)
    x, y = torch.randn(4, 3, res, res, dtype=torch.float64), torch.randint(0, 10, (4,))
    cfgs = sample_sandwich(seq, "shrink", 4, sampler, torch.Generator().manual_seed(seed))
    betas = [1.0, 0.6, 0.3, 0.3]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (seq, bat)]
    r1 = sequential_step(seq, seq, x, y, cfgs, betas, 0.1, 1.0, None, None)
    r2 = batched_step(bat, BatchedSandwich(bat), x, y, cfgs, betas, 0.1, 1.0, None, None)
    assert r2.loss_max == pytest.approx(r1.loss_max, rel=1e-9)
    assert r2.loss_subnets == pytest.approx(r1.loss_subnets, rel=1e-9)
    for (name, p), q in zip(seq.named_parameters(), bat.parameters()):
        g1 = p.grad if p.grad is not None else torch.zeros_like(p)
        g2 = q.grad if q.grad is not None else torch.zeros_like(q)
        assert (g2 - g1).abs().max() <= 1e-7 * g1.abs().max() + 1e-12, name
    for (name, b1), b2 in zip(seq.named_buffers(), bat.buffers()):
        assert (b2 - b1).abs().max() <= 1e-9 * b1.abs().max() + 1e-12, name
    for opt in opts:
        opt.step()
    for (name, p), q in zip(seq.named_parameters(), bat.parameters()):
        assert (q - p).abs().max() <= 1e-9 * p.abs().max() + 1e-12, name
