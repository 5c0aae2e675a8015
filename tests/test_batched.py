"""The batched sandwich step equals the sequential reference: loss, every gradient, every BN running
statistic, and the parameters after one optimizer step.

Compared in float64: with 4 images the deepest stages batch-normalise over 4 values, which amplifies
float32 rounding (different but equally valid summation orders) to ~1e-2 in early-layer gradients;
in float64 the two paths agree to ~1e-12, which is the semantic check."""
import copy

import pytest
import torch

from engine.supernet import ofa_mobilenetv3
from helpers import kernel_device, rel_max
from engine.train.batched import BatchedSandwich, batched_step
from engine.train.sandwich import sample_sandwich, sequential_step


def _pair(variant, seed):
    torch.manual_seed(seed)
    model = ofa_mobilenetv3(variant, width_mult=0.5, num_classes=10, dropout=0.0)   # narrow: float64 on CPU
    _perturb_transforms(model)
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
    torch.testing.assert_close(r2.losses, r1.losses, rtol=1e-9, atol=0)
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


def _block_run(model, cfgs, j, x, dy, backend_name):
    from engine.elastic import use_backend
    from engine.train.batched import plan

    with use_backend(backend_name):
        x = x.clone().requires_grad_()
        block, groups = plan(model, cfgs, x.device).blocks[j]
        out = block(x, groups)
        (out * dy).sum().backward()
    return out.detach(), x.grad


def _perturb_transforms(model):
    """Non-identity kernel transforms, so the 7 -> 5 -> 3 chain is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "transforms"):
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn_like(p))


@pytest.mark.gpu_tier
@pytest.mark.parametrize("want", ["se_residual", "stride2"])
def test_batched_block_on_triton_matches_torch(want):
    """One block of the batched step on the grouped Triton kernels (on the GPU, or TRITON_INTERPRET on
    CPU) against the torch path in float64: output, input gradient, every parameter gradient and
    running statistic, each within 2x the float32 reference's own error (+1e-5 relative).

    Why the bound is what it is: the BN weight gradient sum(g * xhat) nearly cancels (terms of both
    signs), so every float32 evaluation of it is ~1e-3 off float64, and how far depends on the
    summation order alone: on the same inputs the torch path is 6.6e-4 off in channels_last and
    9.9e-4 in NCHW, and the interpreted kernels (numpy reductions) land at 1.3e-3 on an AVX-512 CPU and
    1.5e-3 on an AVX2 one. The BN statistics themselves (one read, Chan merge) are within 3 ulp of
    float64, as torch's are. One float32 run is one draw of an order-dependent error, so the
    reference's error is the largest over three equally valid orders (channels_last, NCHW, the batch
    reversed), and the bound holds on any x86-64 machine (checked over 6 seeds, AVX-512 and AVX2).
    Per block: a whole tiny net in float32 is too ill-conditioned to compare (BN over 2 values), and
    the torch path is checked against the sequential step above in float64."""
    for name, err_fast, err_ref in _block_errors(want, seed=0):
        assert err_fast <= 2 * err_ref + 1e-5, (name, err_fast, err_ref)


def _block_errors(want, seed):
    """[(name, fast path's error, reference's error)] against float64 for one block of the batched step."""
    device = kernel_device()
    torch.manual_seed(3 + 100 * seed)
    ref = ofa_mobilenetv3("imagenet", width_mult=0.5, num_classes=10, depths=(1, 2), expand_ratios=(2, 3))
    _perturb_transforms(ref)
    ref = ref.to(device)
    pick = {"se_residual": lambda b: b.se is not None and b.residual, "stride2": lambda b: b.stride == 2}[want]
    j = 1 + next(i for i, b in enumerate(ref.blocks) if pick(b))          # plan index: 0 is the first block
    cfgs = sample_sandwich(ref, "shrink", 4, "random", torch.Generator().manual_seed(1 + seed))
    x = torch.randn(2, 4 * ref.blocks[j - 1].max_in, 6, 6, device=device).to(memory_format=torch.channels_last)
    dy = torch.randn(2, 4 * ref.blocks[j - 1].out, *(3, 3) if want == "stride2" else (6, 6), device=device)
    truth = _block_values(copy.deepcopy(ref).double(), cfgs, j, x.double(), dy.double(), "torch")
    fast = _block_values(copy.deepcopy(ref), cfgs, j, x, dy, "triton")
    references = [_block_values(copy.deepcopy(ref), cfgs, j, x, dy, "torch"),
                  _block_values(copy.deepcopy(ref), cfgs, j, x.contiguous(), dy, "torch"),
                  _block_values(copy.deepcopy(ref), cfgs, j, x, dy, "torch", reverse_batch=True)]
    return [(name, rel_max(fast[i][1], value), max(rel_max(r[i][1], value) for r in references))
            for i, (name, value) in enumerate(truth)]


def _block_values(model, cfgs, j, x, dy, backend_name, reverse_batch=False):
    """[(name, tensor)] of one block run in fp32-means-fp32: output, input gradient, parameter gradients,
    buffers. `reverse_batch` runs the images in reverse order (another summation order of the same
    sums) and puts the output and input gradient back in order."""
    flip = (lambda t: t.flip(0)) if reverse_batch else (lambda t: t)
    with _strict_fp32():
        out, gx = _block_run(model, cfgs, j, flip(x), flip(dy), backend_name)
    block = model.blocks[j - 1]
    return ([("out", flip(out)), ("grad x", flip(gx))]
            + [(n, p.grad) for n, p in block.named_parameters() if p.grad is not None] + list(block.named_buffers()))


class _strict_fp32:
    """fp32 means fp32 on a GPU too: no TF32 in cuDNN convolutions, matmuls or Triton dots."""

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous[0])
        torch.backends.cudnn.allow_tf32 = self.previous[1]


def _step_values(model, step, x, y, cfgs, backend_name):
    """Run one sandwich step on `backend_name`: [("loss_max", ..), ("loss_subnets", ..), (grad name, grad)]."""
    from engine.elastic import use_backend

    betas = [1.0, 0.5, 0.5, 0.5]
    with use_backend(backend_name):
        if step == "batched":
            r = batched_step(model, BatchedSandwich(model), x, y, cfgs, betas, 0.1, 1.0, None, None)
        else:
            r = sequential_step(model, model, x, y, cfgs, betas, 0.1, 1.0, None, None)
    values = [("loss_max", r.losses[0]), ("loss_subnets", r.losses[1:].mean())]
    return values + [(n, p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("variant,res,n", [("cifar", 32, 32), ("imagenet", 64, 16)])
def test_batched_on_gpu_matches_sequential(variant, res, n):
    """On a GPU, the whole step on the Triton kernels (sequential, per-layer kernels; batched, grouped
    kernels) against a float64 run of the torch reference on the same GPU: loss and every gradient,
    each within 2x the error of the float32 torch paths (sequential and batched, no TF32) + 1e-5.

    Why not fast-vs-fast: many gradients of these nets are ill-conditioned in float32 (ReLU masks that
    flip on rounding, BN-bias sums of near-cancelling terms): measured on CPU against float64, the
    float32 torch paths themselves are up to ~2e-2 (relative to the tensor's max) off on some early
    layers, and differ from each other by that much with a change of memory layout alone. The float64
    run is the truth; each fast path must be as close to it as valid float32 computations are."""
    torch.manual_seed(0)
    base = ofa_mobilenetv3(variant, num_classes=10, dropout=0.0).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(n, 3, res, res, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device="cuda")
    cfgs = sample_sandwich(base, "shrink", 4, "random", torch.Generator().manual_seed(0))
    runs = {}
    with _strict_fp32():
        for name, step, backend_name, dtype in (("fp64", "sequential", "torch", torch.float64),
                                                ("torch_seq", "sequential", "torch", torch.float32),
                                                ("torch_bat", "batched", "torch", torch.float32),
                                                ("triton_seq", "sequential", "triton", torch.float32),
                                                ("triton_bat", "batched", "triton", torch.float32)):
            runs[name] = _step_values(copy.deepcopy(base).to(dtype), step, x.to(dtype), y, cfgs, backend_name)
    failures = []
    for i, (name, truth) in enumerate(runs["fp64"]):
        allowed = 2 * max(rel_max(runs[t][i][1], truth) for t in ("torch_seq", "torch_bat")) + 1e-5
        for fast in ("triton_seq", "triton_bat"):
            err = rel_max(runs[fast][i][1], truth)
            if err > allowed:
                failures.append(f"{fast} {name}: {err:.2e} > {allowed:.2e}")
    assert not failures, "\n".join(failures)
