"""Batched sandwich: the K subnets of a step in one forward and one backward.

Layout: the K subnets are stacked along the channel axis, (N, K*C, H, W), group k holding subnet
k's activations. Then
  * a conv is one grouped conv (groups=K) with the shared weight slice repeated K times,
  * a depthwise conv is one conv with groups=K*C whose filters are each subnet's transformed k x k
    filter zero-embedded in the largest kernel (the zero taps add nothing: identical outputs),
  * batch norm statistics per (group, channel) are per-channel statistics of the stacked tensor:
    each subnet's own, over its samples; the running statistics are updated group by group in the
    sandwich's order, as the sequential loop does;
  * widths: inside a block only the expanded (mid) channels are elastic; each group computes at the
    largest mid width of the step and a 0/1 channel mask zeroes the channels beyond its own after
    every BN and in the SE, so values and gradients equal the narrow subnet's exactly;
  * depth: a block a subnet skips still runs for its group, and `where` keeps that group's input
    (an identity for it: no gradient reaches the block's weights from that group; its batch
    statistics are not folded into the running statistics).
Cost model: fewer, larger launches (one per layer instead of K) at the price of computing every
group at the step's largest width and kernel size (about 1.8x the FLOPs of the sequential sandwich
for K = 4 with the max net in it). Every step has the same shapes (only masks and filters change),
which is what a CUDA-graph capture needs. Dropout draws different masks than the sequential loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.elastic import ElasticBatchNorm2d, apply_activation, hard_sigmoid
from engine.elastic.depthwise import transformed_filter
from engine.elastic.se import se_mid_channels
from engine.supernet.blocks import ConvBNAct, MBConvBlock
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.train.losses import kd_loss, soft_labels
from engine.train.sandwich import StepResult, touch_all


def _conv(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int = 1) -> torch.Tensor:
    """Grouped conv: x (N, K*cin, H, W) with weight (cout, cin, k, k) shared by the K groups."""
    k = weight.shape[-1]
    return F.conv2d(x, weight.repeat(groups, 1, 1, 1), None, stride, k // 2, 1, groups)


def _bn(bn: ElasticBatchNorm2d, x: torch.Tensor, groups: int, widths: list[int] | None, active: list[bool],
        mask: torch.Tensor | None) -> torch.Tensor:
    """Per-(group, channel) batch norm + activation; running stats updated group by group in order."""
    n, kc, h, w = x.shape
    c = kc // groups
    stats_in = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var, mean = torch.var_mean(stats_in, dim=(0, 2, 3), unbiased=False)       # (K*C,)
    scale = bn.weight[:c].repeat(groups) * torch.rsqrt(var + bn.eps)
    y = (x - mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[:c].repeat(groups)[None, :, None, None]
    y = apply_activation(y.to(x.dtype), bn.act)
    if mask is not None:
        y = y * mask[None, :, None, None]
    for g in range(groups):
        if active[g]:
            width = c if widths is None else widths[g]
            bn.update_running_stats(mean[g * c:g * c + width], var[g * c:g * c + width], n * h * w)
    return y


def _conv_bn(layer: ConvBNAct, x: torch.Tensor, groups: int) -> torch.Tensor:
    y = _conv(x, layer.conv.weight[:layer.conv.max_out, :x.shape[1] // groups], groups, layer.conv.stride)
    return _bn(layer.bn, y, groups, None, [True] * groups, None)


def _se(block: MBConvBlock, x: torch.Tensor, groups: int, mids: list[int], mask: torch.Tensor) -> torch.Tensor:
    n, kc = x.shape[:2]
    c = kc // groups
    se_mids = [se_mid_channels(m) for m in mids]
    hidden = max(se_mids)
    s = x.mean((2, 3)).view(n, groups, c)                                      # (N, K, C)
    r, e = block.se.reduce, block.se.expand
    z = F.relu(F.linear(s, r.weight[:hidden, :c], r.bias[:hidden]))           # (N, K, hidden)
    z = z * (torch.arange(hidden, device=x.device)[None, :] < torch.tensor(se_mids, device=x.device)[:, None])
    gate = hard_sigmoid(F.linear(z, e.weight[:c, :hidden], e.bias[:c]))        # (N, K, C)
    return x * (gate.reshape(n, kc) * mask)[:, :, None, None]


def _block(block: MBConvBlock, x: torch.Tensor, groups: int, cfgs: list[tuple[int, int, bool]]) -> torch.Tensor:
    """cfgs[g] = (kernel size, expand ratio, active) of group g."""
    n, kc, _, _ = x.shape
    cin = kc // groups
    active = [a for _, _, a in cfgs]
    mids = [block.mid_channels(cin, e) for _, e, _ in cfgs]
    cmid = max(mids)
    mask = (torch.arange(cmid, device=x.device)[None, :] < torch.tensor(mids, device=x.device)[:, None])
    mask = mask.to(x.dtype).reshape(-1)                                       # (K*cmid,)
    h = x
    if block.has_expand:
        h = _bn(block.ib_bn, _conv(h, block.ib_conv.weight[:cmid, :cin], groups), groups, mids, active, mask)
    dw = block.dw_conv
    kmax = dw.kernel_sizes[-1]
    filters = []
    for k, _, _ in cfgs:
        f = transformed_filter(dw.weight, dw.transforms, dw.kernel_sizes, cmid, k)    # (cmid, k, k)
        p = (kmax - k) // 2
        filters.append(F.pad(f, (p, p, p, p)))
    filt = torch.cat(filters).unsqueeze(1)                                      # (K*cmid, 1, kmax, kmax)
    h = F.conv2d(h, filt, None, dw.stride, kmax // 2, 1, groups * cmid)
    h = _bn(block.dw_bn, h, groups, mids, active, mask)
    if block.se is not None:
        h = _se(block, h, groups, mids, mask)
    h = _bn(block.pw_bn, _conv(h, block.pw_conv.weight[:block.out, :cmid], groups), groups, None, active, None)
    if block.residual:
        h = h + x
    if not all(active):                      # only residual blocks can be skipped (depth >= 1 per stage)
        keep = torch.tensor(active, device=x.device)[None, :, None, None, None]
        h = torch.where(keep, h.view(n, groups, cin, *h.shape[2:]), x.view(n, groups, cin, *x.shape[2:]))
        h = h.reshape(n, kc, *h.shape[3:])
    return h


def batched_forward(model: OFAMobileNetV3, images: torch.Tensor, cfgs: list[dict]) -> torch.Tensor:
    """Logits of every subnet in `cfgs` on `images` (N, 3, R, R): (N, K, classes). Training mode."""
    groups, spec = len(cfgs), model.spec
    x = images.repeat(1, groups, 1, 1)                                         # (N, K*3, R, R)
    x = _conv_bn(model.first_conv, x, groups)
    x = _block(model.first_block, x, groups, [(3, 1, True)] * groups)
    for s in range(model.n_stages):
        for i in range(spec.max_depth):
            b = s * spec.max_depth + i
            per_group = [(c["ks"][b], c["e"][b], i < c["d"][s]) for c in cfgs]
            if any(a for _, _, a in per_group):
                x = _block(model.blocks[b], x, groups, per_group)
    x = _conv_bn(model.final_expand, x, groups)
    x = x.mean((2, 3), keepdim=True)                                           # (N, K*960w, 1, 1)
    fm = model.feature_mix
    x = apply_activation(_conv(x, fm.weight[:, :x.shape[1] // groups], groups), "h_swish")
    x = model.dropout(x.flatten(1)).view(images.shape[0], groups, -1)          # (N, K, 1280w)
    return model.classifier(x)                                                 # (N, K, classes)


class BatchedSandwich(torch.nn.Module):
    """`batched_forward` as a module over the supernet, so DDP can wrap it: forward(images, cfgs)."""

    def __init__(self, model: OFAMobileNetV3) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, cfgs: list[dict]) -> torch.Tensor:
        return batched_forward(self.model, images, cfgs)


def batched_step(model: OFAMobileNetV3, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 cfgs: list[dict], betas: list[float], label_smoothing: float, temperature: float,
                 scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None) -> StepResult:
    """Same contract and gradients as `sequential_step`, in one forward and one backward.
    `net` is a BatchedSandwich over `model`, or its DDP wrapper."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(images, cfgs).float()                                     # (N, K, classes)
    loss_max = F.cross_entropy(logits[:, 0], labels, label_smoothing=label_smoothing)
    targets = soft_labels(logits[:, 0], temperature)
    kd = [kd_loss(logits[:, k], targets, temperature) for k in range(1, len(cfgs))]
    total = loss_max * betas[0] + sum(b * l for b, l in zip(betas[1:], kd))
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        total = total + touch_all(model)
    (scaler.scale(total) if scaler is not None else total).backward()
    model.set_active_subnet(cfgs[-1])
    return StepResult(loss_max.item(), sum(l.item() for l in kd) / max(len(kd), 1))
