"""ElasticBatchNorm2d: batch norm over the first C channels of shared parameters and statistics,
with an optional fused activation (none / relu / h_swish)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from engine.elastic import backend
from engine.elastic.activations import ACTIVATIONS, Activation, apply_activation
from engine.elastic.fast_ops import batchnorm_op, running_update
from engine.elastic.grouped import GroupSelection, grouped_batchnorm_act
from engine.elastic.utils import check_channels, prefix


def batchnorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                        running_var: torch.Tensor, training: bool, momentum: float, eps: float,
                        act: str) -> torch.Tensor:
    """Reference: F.batch_norm on the [:C] slices (C = x.shape[1]) then the activation.

    In training, batch statistics over (N, H, W) normalise x and the running-stat slices are updated
    in place: r <- (1 - momentum) r + momentum * stat (unbiased variance), as nn.BatchNorm2d does.
    """
    c = x.shape[1]
    y = F.batch_norm(x, prefix(running_mean, c), prefix(running_var, c), prefix(weight, c), prefix(bias, c),
                     training, momentum, eps)
    return apply_activation(y, act)


class ElasticBatchNorm2d(nn.Module):
    """BatchNorm2d + activation over a channel prefix: (N, C, H, W), C <= max_features -> same shape.

    `momentum` uses PyTorch's convention (weight of the new batch statistic).
    """

    def __init__(self, max_features: int, momentum: float = 0.1, eps: float = 1e-5, act: str = "none") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum} is outside [0, 1]")
        self.max_features, self.momentum, self.eps, self.act = max_features, momentum, eps, act
        self.weight = nn.Parameter(torch.ones(max_features))
        self.bias = nn.Parameter(torch.zeros(max_features))
        self.register_buffer("running_mean", torch.zeros(max_features))
        self.register_buffer("running_var", torch.ones(max_features))

    def reset_running_stats(self) -> None:
        """Running mean to 0 and variance to 1 (before BN re-calibration)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def _stat_dtype(self) -> torch.dtype:
        """Running statistics are updated in float32 (float64 for a float64 module), whatever the
        buffers' dtype: a bf16 module keeps bf16 buffers, but its updates are computed in fp32."""
        return torch.float64 if self.running_mean.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Fold batch statistics of the first len(mean) channels into the running slices in place:
        r <- (1 - momentum) r + momentum * stat, with var (biased, over `count` values) made unbiased."""
        c, work = mean.shape[0], self._stat_dtype()
        unbiased = var.detach().to(work) * (count / max(count - 1, 1))
        for running, stat in ((self.running_mean, mean.detach().to(work)), (self.running_var, unbiased)):
            r = running[:c]
            if r.dtype == work:
                r.lerp_(stat, self.momentum)
            else:
                r.copy_(r.to(work).lerp_(stat, self.momentum))

    @torch.no_grad()
    def fold_running_stats(self, means: torch.Tensor, variances: torch.Tensor, count: int,
                           select: torch.Tensor) -> None:
        """Fold G batch statistics (G, C) into the [:C] running slices as G calls of
        `update_running_stats` in order g = 0..G-1 would, channel c of group g only where select[g, c]
        (bool): r <- r * prod_g (1 - a_g) + sum_g a_g * prod_{h>g} (1 - a_h) * stat_g, a = momentum * select.
        One pass, no host sync (the batched sandwich's per-group widths live on the device)."""
        c, work = means.shape[1], self._stat_dtype()
        a = self.momentum * select.to(work)
        keep = (1 - a).flip(0).cumprod(0).flip(0)                      # keep[g] = prod_{h>=g} (1 - a_h)
        weights = a * torch.cat([keep[1:], torch.ones_like(keep[:1])])  # a_g * prod_{h>g} (1 - a_h)
        unbiased = variances.to(work) * (count / max(count - 1, 1))
        for running, stat in ((self.running_mean, means.to(work)), (self.running_var, unbiased)):
            running[:c] = running[:c].to(work) * keep[0] + (weights * stat).sum(0)

    def forward(self, x: torch.Tensor, groups: GroupSelection | None = None) -> torch.Tensor:
        """BN + activation of x (N, C, H, W); with `groups`, of G subnets stacked on the channel axis,
        (N, G*C, H, W), each normalised with its own statistics (`_grouped`)."""
        if groups is not None:
            return self._grouped(x, groups)
        c = check_channels("features", x.shape[1], self.max_features)
        choice = backend.implementation_for(
            "batchnorm_act", x, {"triton": lambda: None, "cuda": lambda: None}, lambda: self._candidates(x),
            key=(self.act, self.training))
        if choice != "torch":
            y, stats = batchnorm_op(choice)(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            self.training, self.eps, self.act)
            if self.training:
                running_update(self.running_mean, self.running_var, stats, x.numel() // c, self.momentum)
            return y
        return batchnorm_reference(x, self.weight, self.bias, self.running_mean, self.running_var,
                                   self.training, self.momentum, self.eps, self.act)

    def _grouped(self, x: torch.Tensor, groups: GroupSelection) -> torch.Tensor:
        """Training-mode BN of stacked subnets: statistics per (group, channel) over the group's own
        samples, zero beyond each group's width; the running statistics of the selected channels are
        folded in group order, as the sequential loop over the subnets updates them."""
        if not self.training:
            raise ValueError("a grouped batch norm runs in training mode only")
        n, _, h, w = x.shape
        y, mean, var = grouped_batchnorm_act(x, self.weight, self.bias, groups.select.shape[0], groups.mask,
                                             self.eps, self.act)
        self.fold_running_stats(mean, var, n * h * w, groups.select)
        return y

    def _candidates(self, x: torch.Tensor):
        """The implementations for timing, without side effects (the reference gets copies of the
        running statistics to update)."""
        def reference():
            return batchnorm_reference(x, self.weight, self.bias, self.running_mean.clone(), self.running_var.clone(),
                                       self.training, self.momentum, self.eps, self.act)

        def fused(name):
            return lambda: batchnorm_op(name)(x, self.weight, self.bias, self.running_mean, self.running_var,
                                              self.training, self.eps, self.act)

        return {"torch": reference, "triton": fused("triton"), "cuda": fused("cuda")}, [x, self.weight, self.bias]

    def export(self, features: int) -> nn.Module:
        """nn.BatchNorm2d (followed by the activation, if any) holding copies of the [:C] slices."""
        bn = nn.BatchNorm2d(features, eps=self.eps, momentum=self.momentum)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(self, name)[:features])
        return bn if self.act == "none" else nn.Sequential(bn, Activation(self.act))

    def extra_repr(self) -> str:
        return f"max_features={self.max_features}, momentum={self.momentum}, eps={self.eps}, act={self.act}"
