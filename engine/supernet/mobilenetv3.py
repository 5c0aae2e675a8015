"""OFAMobileNetV3: the weight-shared supernet (224-px ImageNet and 32-px CIFAR variants)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.elastic import Activation, ElasticConv2d, ElasticLinear, apply_activation
from engine.supernet import arch
from engine.supernet.blocks import ConvBNAct, MBConvBlock
from engine.supernet.groups import NetGroups


class OFAMobileNetV3(nn.Module):
    """OFA MobileNetV3 supernet: (N, 3, R, R) images -> (N, num_classes) logits of the active subnet.

    Per block: kernel size in spec.kernel_sizes, expand ratio in spec.expand_ratios; per stage:
    depth in spec.depths (the first d blocks run). Stem, first block and head are fixed.
    """

    def __init__(self, spec: arch.SupernetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or arch.SupernetSpec()
        plan = self.plan = arch.stage_plan(spec)
        bn = dict(bn_momentum=spec.bn_momentum, bn_eps=spec.bn_eps)
        self.first_conv = ConvBNAct(3, plan.stem_channels, 3, plan.stem_stride, "h_swish", **bn)
        self.first_block = MBConvBlock(plan.stem_channels, plan.first_block_channels, (3,), (1,),
                                       plan.first_block_stride, "relu", False, **bn)
        blocks, c_in = [], plan.first_block_channels
        for c_out, stride, act, se in zip(plan.stage_channels, plan.stage_strides, plan.stage_acts, plan.stage_se):
            for i in range(spec.max_depth):
                blocks.append(MBConvBlock(c_in, c_out, spec.kernel_sizes, spec.expand_ratios,
                                          stride if i == 0 else 1, act, se, **bn))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.final_expand = ConvBNAct(c_in, plan.final_expand_channels, 1, 1, "h_swish", **bn)
        self.feature_mix = ElasticConv2d(plan.final_expand_channels, plan.last_channels, 1)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = ElasticLinear(plan.last_channels, spec.num_classes)
        self.active_depths = list(arch.max_config(spec, plan.n_stages)["d"])

    # ---- subnet selection -------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return self.plan.n_stages

    def set_active_subnet(self, cfg: dict) -> None:
        """Activate the subnet `cfg` ({"ks": [...], "e": [...], "d": [...]}); ValueError if invalid."""
        cfg = arch.validate_config(self.spec, self.n_stages, cfg)
        for block, k, e in zip(self.blocks, cfg["ks"], cfg["e"]):
            block.set_active(k, e)
        self.active_depths = cfg["d"]

    def active_config(self) -> dict:
        """The active subnet's config (JSON-serialisable)."""
        return {"ks": [b.dw_conv.active_kernel_size for b in self.blocks],
                "e": [b.active_expand_ratio for b in self.blocks],
                "d": list(self.active_depths)}

    def set_max_net(self) -> None:
        self.set_active_subnet(arch.max_config(self.spec, self.n_stages))

    def set_min_net(self) -> None:
        self.set_active_subnet(arch.min_config(self.spec, self.n_stages))

    def sample_active_subnet(self, generator: torch.Generator | None = None) -> dict:
        """Activate and return a uniformly sampled subnet (OFA sampling)."""
        cfg = arch.random_config(self.spec, self.n_stages, generator)
        self.set_active_subnet(cfg)
        return cfg

    def sample_compound_subnet(self, generator: torch.Generator | None = None) -> dict:
        """Activate and return a CompOFA compound-sampled subnet (depth and expand ratio coupled)."""
        cfg = arch.compound_config(self.spec, self.n_stages, generator)
        self.set_active_subnet(cfg)
        return cfg

    def active_blocks(self) -> list[MBConvBlock]:
        """The stage blocks the active depths run, in order."""
        d = self.spec.max_depth
        return [self.blocks[s * d + i] for s, depth in enumerate(self.active_depths) for i in range(depth)]

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, groups: NetGroups | None = None) -> torch.Tensor:
        """Logits of the active subnet. With `groups` (the batched sandwich), x is (N, G*3, R, R), the
        images repeated for G subnets stacked on the channel axis, each run at its own settings by the
        same code (the layers' grouped forms) -> (N, G, num_classes)."""
        g = groups if groups is not None else NetGroups([(b, None) for b in [self.first_block, *self.active_blocks()]])
        x = self.first_conv(x, *g.stem)
        for block, block_groups in g.blocks:
            x = block(x, block_groups)
        x = self.final_expand(x, *g.final)                             # (N, G*960w, h, w)
        x = x.mean((2, 3), keepdim=True)                               # (N, G*960w, 1, 1)
        x = apply_activation(self.feature_mix(x, g.mix), "h_swish").flatten(1)  # (N, G*1280w)
        x = self.dropout(x)
        return self.classifier(x if groups is None else x.view(x.shape[0], groups.count, -1))

    # ---- deployment and cost ------------------------------------------------------------------
    def export_active_subnet(self) -> nn.Sequential:
        """A standalone nn.Sequential of plain torch layers for the active subnet, weights copied once."""
        layers: list[nn.Module] = [self.first_conv.export(3), self.first_block.export(self.plan.stem_channels)]
        c = self.plan.first_block_channels
        for block in self.active_blocks():
            layers.append(block.export(c))
            c = block.out
        layers += [self.final_expand.export(c), nn.AdaptiveAvgPool2d(1),
                   self.feature_mix.export(self.plan.final_expand_channels), Activation("h_swish"),
                   nn.Flatten(1), nn.Dropout(self.spec.dropout), self.classifier.export(self.plan.last_channels)]
        net = nn.Sequential(*layers)
        return net.train(self.training)

    @torch.no_grad()
    def flops(self, resolution: int = 224) -> int:
        """FLOPs (2 x multiply-accumulates of convs and linears) of one image through the active subnet."""
        net = self.export_active_subnet().eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.randn(1, 3, resolution, resolution))
        return int(counter.get_total_flops())

    def params(self) -> int:
        """Number of parameters of the active subnet (BN affine included, running stats not)."""
        return sum(p.numel() for p in self.export_active_subnet().parameters())

    def reorganize_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Sort each block's expanded channels by importance (before width shrinking starts)."""
        for block in self.blocks:
            block.reorganize_channels(optimizer)


def ofa_mobilenetv3(variant: str = "imagenet", width_mult: float = 1.0, **kwargs) -> OFAMobileNetV3:
    """Build an OFA-MobileNetV3 supernet; kwargs go to SupernetSpec."""
    return OFAMobileNetV3(arch.SupernetSpec(variant=variant, width_mult=width_mult, **kwargs))
