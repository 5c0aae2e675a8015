"""An MBConv 1x1 conv and the batch norm after it (and the block's residual add), fused in training.

Fused (Triton): the GEMM writes the conv output h and, from the tile in registers, h's per-channel
count / mean / squared deviations (kernels/pointwise.py: pointwise_conv_stats); the BN then reads h
once to write act(BN(h)) [+ residual] (kernels/batchnorm.py: bn_apply): h is read once instead of
twice, and the residual add is no pass of its own. The reference: conv2d, batch_norm, and the add.
Chosen per call signature by measurement (backend "auto"), like every fused path here: used only
where it is faster on the device. Eval mode, non-pointwise convs, convs with a bias and grouped calls
(the batched sandwich) take the layers' own paths.
"""
from __future__ import annotations

import torch

from engine.elastic import backend
from engine.elastic.batchnorm import ElasticBatchNorm2d, batchnorm_reference
from engine.elastic.conv import ElasticConv2d, conv2d_reference
from engine.elastic.fast_ops import running_update
from engine.elastic.grouped import GroupSelection


def conv_bn(conv: ElasticConv2d, bn: ElasticBatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None,
            widths: torch.Tensor | None = None, groups: GroupSelection | None = None) -> torch.Tensor:
    """bn(conv(x)) [+ residual]: x (N, in, H, W) -> (N, out, H, W), out = conv.active_out_channels;
    `residual` has the output's shape. With `widths` and `groups`: the layers' grouped forms (stacked
    subnets, see engine/elastic/grouped.py)."""
    if widths is not None:
        return _unfused(conv, bn, x, residual, widths, groups)
    if not bn.training or conv.kernel_size != 1 or conv.stride != 1 or conv.bias is not None:
        return _unfused(conv, bn, x, residual)
    out = conv.active_out_channels
    res = residual is not None

    def candidates():
        def reference():
            h = batchnorm_reference(conv2d_reference(x, conv.weight, None, out, 1), bn.weight, bn.bias,
                                    bn.running_mean.clone(), bn.running_var.clone(), True, bn.momentum, bn.eps, bn.act)
            return h + residual if res else h

        return ({"torch": reference, "triton": lambda: _fused(conv, bn, x, residual, out)[0]},
                [x, conv.weight, bn.weight, bn.bias] + ([residual] if res else []))

    choice = backend.implementation_for("conv_bn", x, {"triton": lambda: None}, candidates, key=(out, bn.act, res))
    if choice != "triton":
        return _unfused(conv, bn, x, residual)
    y, stats, count = _fused(conv, bn, x, residual, out)
    running_update(bn.running_mean, bn.running_var, stats, count, bn.momentum)
    return y


def _fused(conv: ElasticConv2d, bn: ElasticBatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None,
           out: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(y, h's batch statistics (2, out), values per channel): the GEMM with the statistics epilogue,
    then BN [+ residual] from them; the running statistics are left to the caller."""
    from engine.kernels.batchnorm import bn_apply
    from engine.kernels.pointwise import pointwise_conv_stats

    h, stats = pointwise_conv_stats(x, conv.weight, out)
    return bn_apply(h, stats, bn.weight, bn.bias, residual, bn.eps, bn.act), stats, h.numel() // out


def _unfused(conv: ElasticConv2d, bn: ElasticBatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None,
             widths: torch.Tensor | None = None, groups: GroupSelection | None = None) -> torch.Tensor:
    h = bn(conv(x, widths), groups)
    return h + residual if residual is not None else h
