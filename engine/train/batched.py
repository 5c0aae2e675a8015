"""Batched sandwich: the K subnets of a step in one forward and one backward.

Layout: the K subnets are stacked along the channel axis, (N, K*C, H, W), group k holding subnet
k's activations. The supernet's own forward runs them (OFAMobileNetV3.forward with group tables,
engine/supernet/groups.py): each elastic layer, given a table, runs its grouped form
(engine/elastic/grouped.py: Triton kernels on a GPU, PyTorch references elsewhere), reading each
group's own slice of the shared weights:
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
This module keeps only what is batching: the plan (the group tables of a step's configs), the input
repeat and the loss split. The tables are int32 on the device, packed so that one host-to-device copy
carries them. Every step with the max net in it has the same shapes. Dropout draws different masks
than the sequential loop. The Python-side structure (which blocks run, which transformed filters are
built) still follows the sampled configs, so the step is not yet captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from engine.elastic.grouped import KernelGroups, group_selection
from engine.elastic.se import se_mid_channels
from engine.supernet.blocks import MBConvBlock
from engine.supernet.groups import BlockGroups, NetGroups
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.train.compile import unwrap
from engine.train.guard import grads_nonfinite
from engine.train.losses import kd_loss, soft_labels
from engine.train.sandwich import StepResult, touch_all


def _settings(model: OFAMobileNetV3, cfgs: list[dict]) -> list[tuple]:
    """[(block, [(kernel size, expand ratio, runs) per group])] for the first block and every stage block."""
    spec = model.spec
    per_block = [(model.first_block, [(3, 1, True)] * len(cfgs))]
    for s in range(model.n_stages):
        for i in range(spec.max_depth):
            b = s * spec.max_depth + i
            per_block.append((model.blocks[b], [(c["ks"][b], c["e"][b], i < c["d"][s]) for c in cfgs]))
    return per_block


def _tables(model: OFAMobileNetV3, per_block: list[tuple], groups: int) -> dict[str, list[list[int]]]:
    """Every (G, 2) table of the step, by name (see `plan`)."""
    tables: dict[str, list[list[int]]] = {}
    for j, (block, settings) in enumerate(per_block):
        mids = [block.mid_channels(block.max_in, e) for _, e, _ in settings]
        tables[f"{j}.expand"] = [[m, block.max_in] for m in mids]
        tables[f"{j}.dw"] = [[k, m] for (k, _, _), m in zip(settings, mids)]
        tables[f"{j}.se"] = [[se_mid_channels(m), m] for m in mids]
        tables[f"{j}.project"] = [[block.out, m] for m in mids]
        tables[f"{j}.active"] = [[int(a), 0] for _, _, a in settings]
    for name, conv in (("stem", model.first_conv.conv), ("final", model.final_expand.conv),
                       ("mix", model.feature_mix)):
        tables[name] = [[conv.max_out, conv.max_in]] * groups
    tables["all"] = [[1, 0]] * groups
    return tables


def _block_groups(t: dict[str, torch.Tensor], j: int, block: MBConvBlock, settings: list[tuple]) -> BlockGroups:
    """Block j's group tables (`t`: the step's tables on the device, by name)."""
    active = t[f"{j}.active"][:, 0]
    mid = max(block.mid_channels(block.max_in, e) for _, e, _ in settings)
    return BlockGroups(mid_channels=mid, expand=t[f"{j}.expand"], se=t[f"{j}.se"], project=t[f"{j}.project"],
                       depthwise=KernelGroups(t[f"{j}.dw"], tuple(k for k, _, _ in settings)),
                       mid=group_selection(active, mid, t[f"{j}.dw"][:, 1]),
                       out=group_selection(active, block.out), active=active)


def plan(model: OFAMobileNetV3, cfgs: list[dict], device: torch.device) -> NetGroups:
    """The group tables that run the subnets `cfgs` as the groups of one forward (one host-to-device
    copy); a block no subnet runs is left out."""
    groups, per_block = len(cfgs), _settings(model, cfgs)
    tables = _tables(model, per_block, groups)
    packed = torch.tensor(list(tables.values()), dtype=torch.int32)
    if device.type == "cuda" and not is_fake(packed):     # (fake tensors: no pinned memory, no runtime)
        packed = packed.pin_memory()
    t = dict(zip(tables, packed.to(device, non_blocking=True).unbind(0)))
    blocks = [(block, _block_groups(t, j, block, settings)) for j, (block, settings) in enumerate(per_block)
              if any(runs for _, _, runs in settings)]
    every = t["all"][:, 0]
    stem, final = model.first_conv.conv, model.final_expand.conv
    return NetGroups(blocks, groups, stem=(t["stem"], group_selection(every, stem.max_out)),
                     final=(t["final"], group_selection(every, final.max_out)), mix=t["mix"])


def batched_forward(model: OFAMobileNetV3, images: torch.Tensor, cfgs: list[dict]) -> torch.Tensor:
    """Logits of every subnet in `cfgs` on `images` (N, 3, R, R): (N, K, classes). Training mode."""
    x = images.repeat(1, len(cfgs), 1, 1)                                      # (N, K*3, R, R)
    if images.is_contiguous(memory_format=torch.channels_last):                # repeat returns NCHW
        x = x.contiguous(memory_format=torch.channels_last)
    return model(x, plan(model, cfgs, images.device))


class BatchedSandwich(torch.nn.Module):
    """`batched_forward` as a module over the supernet, so DDP can wrap it: forward(images, cfgs)."""

    def __init__(self, model: OFAMobileNetV3) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, cfgs: list[dict]) -> torch.Tensor:
        return batched_forward(self.model, images, cfgs)


def batched_step(model: OFAMobileNetV3, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 cfgs: list[dict], epsilons: list[float], label_smoothing: float, temperature: float,
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
    total = loss_max * epsilons[0] + sum(e * l for e, l in zip(epsilons[1:], kd))
    if isinstance(unwrap(net), torch.nn.parallel.DistributedDataParallel):
        total = total + touch_all(model)
    (scaler.scale(total) if scaler is not None else total).backward()
    model.set_active_subnet(cfgs[-1])
    losses = torch.stack([loss_max.detach()] + [l.detach() for l in kd])
    grads_bad = (grads_nonfinite(model.parameters()).bool().expand(len(cfgs)) if check_grads
                 else torch.zeros_like(losses, dtype=torch.bool))
    return StepResult(losses, grads_bad)
