"""Group tables: how G subnets stacked on the channel axis, (N, G*C, H, W), run through the supernet's
one forward (the batched sandwich, engine/train/batched.py builds them). Every tensor is int32 on the
activations' device; `None` everywhere is the ordinary single-subnet forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.elastic.grouped import GroupSelection, KernelGroups


@dataclass(frozen=True)
class BlockGroups:
    """One MBConv block's per-group settings (G groups).

    mid_channels: the widest group's expanded width (every group's tensor has it, zero beyond its own);
    expand, project: (G, 2) [out_g, in_g] of the 1x1 convs; depthwise: kernel sizes and widths;
    se: (G, 2) [hidden_g, mid_g] of the SE; mid, out: the BN selections after the expand and depthwise
    convs and after the projection; active: (G,) 1 where the group runs the block (a skipped block is
    its identity).
    All None (`UNGROUPED`): the single-subnet forward.
    """

    mid_channels: int | None = None
    expand: torch.Tensor | None = None
    depthwise: KernelGroups | None = None
    se: torch.Tensor | None = None
    project: torch.Tensor | None = None
    mid: GroupSelection | None = None
    out: GroupSelection | None = None
    active: torch.Tensor | None = None

    def pass_skipped(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y where the group runs the block, else its input x (same shape, (N, G*C, H, W))."""
        n, groups = x.shape[0], self.active.shape[0]
        keep = self.active.bool()[None, :, None, None, None]
        stacked = (n, groups, x.shape[1] // groups, *x.shape[2:])
        return torch.where(keep, y.view(stacked), x.view(stacked)).view(x.shape)


UNGROUPED = BlockGroups()


@dataclass(frozen=True)
class NetGroups:
    """The whole net's group tables: the stem's, the blocks any group runs (in order, with theirs), the
    final 1x1 conv's and the feature mix's. The single-subnet forward is `NetGroups(blocks=...)`."""

    blocks: list[tuple[nn.Module, BlockGroups | None]]
    count: int | None = None
    stem: tuple[torch.Tensor, GroupSelection] | tuple[None, None] = (None, None)
    final: tuple[torch.Tensor, GroupSelection] | tuple[None, None] = (None, None)
    mix: torch.Tensor | None = None
