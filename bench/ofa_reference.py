"""The public OFA code's way of running a sampled subnet (mit-han-lab/once-for-all, its dynamic ops in
ofa/imagenet_classification/elastic_nn/modules/dynamic_op.py), written anew over this engine's supernet
parameters, so that both run the same weights, configs and FLOPs side by side in the benchmarks.
It is an independent re-implementation on purpose: it is the baseline the engine is compared against,
so it shares no block code with engine/supernet (a change to the engine's block must not change it).

What it does as OFA does, per call:
  dynamic 1x1 convs      F.conv2d with W[:o, :i].contiguous() (a copy of the slice)
  dynamic depthwise      the centre crop of the 7x7 kernel, chained through the transform matrices
                         (.contiguous(), .view, F.linear), then F.conv2d(groups=C)
  dynamic batch norm     nn.BatchNorm2d at full width, else F.batch_norm on [:C] slices of the
                         parameters and running statistics
  dynamic SE             x.mean(3).mean(2), 1x1 convs on contiguous weight slices, ReLU, hard sigmoid
  activations            x * relu6(x + 3) / 6 and relu6(x + 3) / 6, as OFA's Hswish / Hsigmoid
  stem, first block, final expand, feature mix, classifier: static layers at full width.
Memory format follows the input and weights (NCHW as shipped, or channels_last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticDepthwiseConv2d
from engine.elastic.se import se_mid_channels
from engine.supernet.blocks import ConvBNAct, MBConvBlock
from engine.supernet.mobilenetv3 import OFAMobileNetV3


def _act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "h_swish":
        return x * F.relu6(x + 3.0) / 6.0
    return x


def _bn(bn: ElasticBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if c == bn.max_features:        # OFA calls the full nn.BatchNorm2d
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)
    else:
        y = F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c], bn.training,
                         bn.momentum, bn.eps)
    return _act(y, bn.act)


def _conv(conv: ElasticConv2d, x: torch.Tensor, out: int, dynamic: bool) -> torch.Tensor:
    w = conv.weight[:out, :x.shape[1]].contiguous() if dynamic else conv.weight
    return F.conv2d(x, w, None, conv.stride, conv.kernel_size // 2)


def _depthwise_filter(dw: ElasticDepthwiseConv2d, channels: int) -> torch.Tensor:
    """OFA's get_active_filter: (channels, 1, k, k), transformed from the 7x7 centre crop."""
    ks, k = dw.kernel_sizes, dw.active_kernel_size
    filt = dw.weight[:channels, :1]
    for i in range(len(ks) - 1, 0, -1):
        src, dst = ks[i], ks[i - 1]
        if src <= k:
            break
        s = (src - dst) // 2
        crop = filt[:, :, s:s + dst, s:s + dst].contiguous()
        crop = crop.view(crop.size(0), crop.size(1), -1).view(-1, dst * dst)
        filt = F.linear(crop, dw.transforms[f"{src}to{dst}"]).view(channels, 1, dst, dst)
    return filt.contiguous()


def _se(block: MBConvBlock, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    mid = se_mid_channels(c)
    r, e = block.se.reduce, block.se.expand
    y = x.mean(3, keepdim=True).mean(2, keepdim=True)
    y = F.relu(F.conv2d(y, r.weight[:mid, :c].contiguous()[:, :, None, None], r.bias[:mid]))
    y = F.conv2d(y, e.weight[:c, :mid].contiguous()[:, :, None, None], e.bias[:c])
    return x * (F.relu6(y + 3.0) / 6.0)


def _block(block: MBConvBlock, x: torch.Tensor, dynamic: bool) -> torch.Tensor:
    h = x
    mid = block.mid_channels(x.shape[1])
    if block.has_expand:
        h = _bn(block.ib_bn, _conv(block.ib_conv, h, mid, dynamic))
    dw = block.dw_conv
    filt = _depthwise_filter(dw, h.shape[1]) if dynamic else dw.weight
    h = _bn(block.dw_bn, F.conv2d(h, filt, None, dw.stride, filt.shape[-1] // 2, 1, h.shape[1]))
    if block.se is not None:
        h = _se(block, h)
    h = _bn(block.pw_bn, _conv(block.pw_conv, h, block.out, dynamic))
    return h + x if block.residual else h


def _conv_bn_act(layer: ConvBNAct, x: torch.Tensor) -> torch.Tensor:
    return _bn(layer.bn, _conv(layer.conv, x, layer.conv.max_out, False))


def ofa_forward(model: OFAMobileNetV3, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model`'s active subnet on x (N, 3, R, R), computed the way the public OFA code does."""
    x = _block(model.first_block, _conv_bn_act(model.first_conv, x), dynamic=False)
    for block in model.active_blocks():
        x = _block(block, x, dynamic=True)
    x = _conv_bn_act(model.final_expand, x)
    x = x.mean(3, keepdim=True).mean(2, keepdim=True)
    x = _act(F.conv2d(x, model.feature_mix.weight), "h_swish").flatten(1)
    return F.linear(model.dropout(x), model.classifier.weight, model.classifier.bias)


class OFAReference(torch.nn.Module):
    """`ofa_forward` as a module over the supernet (what the benchmarks time as the `ofa` variants)."""

    def __init__(self, model: OFAMobileNetV3) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ofa_forward(self.model, x)
