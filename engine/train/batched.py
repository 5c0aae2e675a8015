"""Batched sandwich: the K subnets of a step in one forward and one backward.

Layout: the K subnets are stacked along the channel axis, (N, K*C, H, W), group k holding subnet
k's activations; every layer is one grouped op (engine/elastic/grouped.py: Triton kernels on a GPU,
PyTorch references elsewhere) reading each group's own slice of the shared weights:
  * a 1x1 conv multiplies group k by W[:o_k, :i_k] (the stem's 3x3 conv: groups=K, same width),
  * a depthwise conv applies group k's transformed k_k x k_k filter (zero-embedded in the largest
    kernel, of which the kernel reads only the group's window) to its first mid_k channels,
  * batch norm statistics per (group, channel) are per-channel statistics of the stacked tensor:
    each subnet's own, over its samples; the running statistics of each group's channel prefix are
    folded in the sandwich's order, as the sequential loop updates them;
  * widths: inside a block only the expanded (mid) channels are elastic; each group's tensor has
    the step's largest mid width and is zero beyond its own (the convs write zeros there, BN folds a
    0/1 mask into its affine parameters), so values and gradients equal the narrow subnet's exactly;
  * depth: a block a subnet skips still runs for its group, and `where` keeps that group's input
    (an identity for it: no gradient reaches the block's weights from that group; its batch
    statistics are not folded into the running statistics).
Per-group widths and kernel sizes are int32 tables on the device (one host-to-device copy a step).
Every step with the max net in it has the same shapes. Dropout draws different masks than the
sequential loop. The Python-side structure (which blocks run, which transformed filters are built)
still follows the sampled configs, so the step is not yet captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from engine.elastic import ElasticBatchNorm2d, apply_activation, hard_sigmoid
from engine.elastic.depthwise import transformed_filter
from engine.elastic.grouped import channel_mask, grouped_batchnorm_act, grouped_depthwise_conv, grouped_pointwise_conv
from engine.elastic.se import se_mid_channels
from engine.supernet.blocks import MBConvBlock
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.train.compile import unwrap
from engine.train.guard import grads_nonfinite
from engine.train.losses import kd_loss, soft_labels
from engine.train.sandwich import StepResult, touch_all


class _Plan:
    """One step's per-group settings: int32 (G, 2) tables on the device, packed into one tensor so a
    single host-to-device copy carries them (the kernels read them there; masks are built there),
    plus the Python-side shapes (each block's widest mid and SE widths, whether any group runs it)."""

    def __init__(self, model: OFAMobileNetV3, cfgs: list[dict], device: torch.device) -> None:
        groups, spec = len(cfgs), model.spec
        self.groups = groups
        self.blocks: list[MBConvBlock] = [model.first_block]
        per_block = [[(3, 1, True)] * groups]
        for s in range(model.n_stages):
            for i in range(spec.max_depth):
                b = s * spec.max_depth + i
                self.blocks.append(model.blocks[b])
                per_block.append([(c["ks"][b], c["e"][b], i < c["d"][s]) for c in cfgs])
        tables: dict[str, list[list[int]]] = {}
        self.cmid, self.hidden, self.runs = [], [], []
        for j, (block, settings) in enumerate(zip(self.blocks, per_block)):
            mids = [block.mid_channels(block.max_in, e) for _, e, _ in settings]
            se = [se_mid_channels(m) for m in mids]
            self.cmid.append(max(mids))
            self.hidden.append(max(se))
            self.runs.append(any(a for _, _, a in settings))
            tables[f"{j}.expand"] = [[m, block.max_in] for m in mids]
            tables[f"{j}.dw"] = [[k, m] for (k, _, _), m in zip(settings, mids)]
            tables[f"{j}.se"] = [[h, m] for h, m in zip(se, mids)]
            tables[f"{j}.project"] = [[block.out, m] for m in mids]
            tables[f"{j}.active"] = [[int(a), 0] for _, _, a in settings]
        self.kernel_sizes = [[k for k, _, _ in settings] for settings in per_block]
        for name, conv in (("final", model.final_expand.conv), ("mix", model.feature_mix)):
            tables[name] = [[conv.max_out, conv.max_in]] * groups
        tables["all"] = [[1, 0]] * groups
        packed = torch.tensor(list(tables.values()), dtype=torch.int32)
        if device.type == "cuda" and not is_fake(packed):     # (fake tensors: no pinned memory, no runtime)
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
        self.table = dict(zip(tables, packed.unbind(0)))


def _conv(x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    """Grouped regular conv (the stem): x (N, K*cin, H, W), weight (cout, cin, k, k) shared by the K groups."""
    k = weight.shape[-1]
    return F.conv2d(x, weight.repeat(groups, 1, 1, 1), None, stride, k // 2, 1, groups)


def _selection(active: torch.Tensor, channels: int,
               widths: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(0/1 width mask (G*C,) or None, running-stat selection (G, C) bool): the channels of each group
    within its width, of the groups that run the layer."""
    groups = active.shape[0]
    select = active.bool()[:, None].expand(groups, channels)
    if widths is None:
        return None, select
    mask = channel_mask(widths, channels, torch.float32)
    return mask, select & (mask.view(groups, channels) > 0)


def _bn(bn: ElasticBatchNorm2d, x: torch.Tensor, groups: int,
        selection: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    """Per-(group, channel) BN + activation, zero beyond each group's width (`_selection`); the running
    statistics of the selected channels are folded in group order (the sequential loop's order)."""
    n, _, h, w = x.shape
    mask, select = selection
    y, mean, var = grouped_batchnorm_act(x, bn.weight, bn.bias, groups, mask, bn.eps, bn.act)
    bn.fold_running_stats(mean, var, n * h * w, select)
    return y


def _se(block: MBConvBlock, x: torch.Tensor, groups: int, hidden: int, se_widths: torch.Tensor) -> torch.Tensor:
    """Per-group SE. Channels beyond a group's width are zero in x, so only the hidden units need a mask."""
    n, kc = x.shape[:2]
    c = kc // groups
    s = x.mean((2, 3)).view(n, groups, c)                                      # (N, K, C)
    r, e = block.se.reduce, block.se.expand
    z = F.relu(F.linear(s, r.weight[:hidden, :c], r.bias[:hidden]))           # (N, K, hidden)
    z = z * channel_mask(se_widths, hidden, z.dtype).view(groups, hidden)
    gate = hard_sigmoid(F.linear(z, e.weight[:c, :hidden], e.bias[:c]))        # (N, K, C)
    return x * gate.reshape(n, kc)[:, :, None, None]


def _filters(block: MBConvBlock, cmid: int, kernel_sizes: list[int]) -> torch.Tensor:
    """(K*cmid, kmax, kmax): group g's transformed k_g x k_g filter, zero-embedded in the largest kernel."""
    dw = block.dw_conv
    kmax = dw.kernel_sizes[-1]
    padded = {}
    for k in sorted(set(kernel_sizes)):
        p = (kmax - k) // 2
        padded[k] = F.pad(transformed_filter(dw.weight, dw.transforms, dw.kernel_sizes, cmid, k), (p, p, p, p))
    return torch.cat([padded[k] for k in kernel_sizes])


def _block(plan: _Plan, j: int, x: torch.Tensor) -> torch.Tensor:
    """Block j of the plan (0: the first block) for all groups."""
    block, groups, t = plan.blocks[j], plan.groups, plan.table
    cmid, active = plan.cmid[j], t[f"{j}.active"][:, 0]
    mid = _selection(active, cmid, t[f"{j}.dw"][:, 1])              # shared by the expand and depthwise BNs
    h = x
    if block.has_expand:
        h = _bn(block.ib_bn, grouped_pointwise_conv(h, block.ib_conv.weight, t[f"{j}.expand"], cmid), groups, mid)
    h = grouped_depthwise_conv(h, _filters(block, cmid, plan.kernel_sizes[j]), block.dw_conv.stride, t[f"{j}.dw"])
    h = _bn(block.dw_bn, h, groups, mid)
    if block.se is not None:
        h = _se(block, h, groups, plan.hidden[j], t[f"{j}.se"][:, 0])
    h = grouped_pointwise_conv(h, block.pw_conv.weight, t[f"{j}.project"], block.out)
    h = _bn(block.pw_bn, h, groups, _selection(active, block.out))
    if block.residual:                # a skipped block (only residual ones can be) is the identity for its group
        n, kc = x.shape[:2]
        keep = active.bool()[None, :, None, None, None]
        h = torch.where(keep, (h + x).view(n, groups, kc // groups, *h.shape[2:]),
                        x.view(n, groups, kc // groups, *x.shape[2:])).view(x.shape)
    return h


def batched_forward(model: OFAMobileNetV3, images: torch.Tensor, cfgs: list[dict]) -> torch.Tensor:
    """Logits of every subnet in `cfgs` on `images` (N, 3, R, R): (N, K, classes). Training mode."""
    plan = _Plan(model, cfgs, images.device)
    groups, every = plan.groups, plan.table["all"][:, 0]
    x = images.repeat(1, groups, 1, 1)                                         # (N, K*3, R, R)
    if images.is_contiguous(memory_format=torch.channels_last):                # repeat returns NCHW
        x = x.contiguous(memory_format=torch.channels_last)
    stem = model.first_conv
    x = _bn(stem.bn, _conv(x, stem.conv.weight, groups, stem.conv.stride), groups, _selection(every, stem.conv.max_out))
    for j in range(len(plan.blocks)):
        if plan.runs[j]:
            x = _block(plan, j, x)
    fe, fm = model.final_expand, model.feature_mix
    x = grouped_pointwise_conv(x, fe.conv.weight, plan.table["final"], fe.conv.max_out)
    x = _bn(fe.bn, x, groups, _selection(every, fe.conv.max_out))
    x = x.mean((2, 3), keepdim=True)                                           # (N, K*960w, 1, 1)
    x = apply_activation(grouped_pointwise_conv(x, fm.weight, plan.table["mix"], fm.max_out), "h_swish")
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
                 scaler: torch.amp.GradScaler | None, amp_dtype: torch.dtype | None,
                 check_grads: bool = False) -> StepResult:
    """Same contract and gradients as `sequential_step`, in one forward and one backward.
    `net` is a BatchedSandwich over `model`, or its DDP wrapper. One backward: a non-finite gradient
    is reported for every subnet."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = net(images, cfgs).float()                                     # (N, K, classes)
    loss_max = F.cross_entropy(logits[:, 0], labels, label_smoothing=label_smoothing)
    targets = soft_labels(logits[:, 0], temperature)
    kd = [kd_loss(logits[:, k], targets, temperature) for k in range(1, len(cfgs))]
    total = loss_max * betas[0] + sum(b * l for b, l in zip(betas[1:], kd))
    if isinstance(unwrap(net), torch.nn.parallel.DistributedDataParallel):
        total = total + touch_all(model)
    (scaler.scale(total) if scaler is not None else total).backward()
    model.set_active_subnet(cfgs[-1])
    losses = torch.stack([loss_max.detach()] + [l.detach() for l in kd])
    grads_bad = (grads_nonfinite(model.parameters()).bool().expand(len(cfgs)) if check_grads
                 else torch.zeros_like(losses, dtype=torch.bool))
    return StepResult(losses, grads_bad)
