"""Every dispatched op call a run will make, enumerated from the supernet spec and the run's settings
(not by running anything): training (teacher and shrink phases, all subnets of the space, the
sequential or the batched sandwich), BN calibration, evaluation and the search.

What each phase runs (engine/train/trainer.py, engine/eval, engine/search):
  training      autograd on, BN in training mode, the run's AMP dtype and memory format, the run's
                batch per GPU; the max net alone (teacher) and every subnet (shrink); the batched
                sandwich (--sandwich batched) runs grouped ops instead, G = 1 (teacher) and G = K;
  calibration   no autograd, BN in training mode, float32 (no autocast), the run's memory format;
  evaluation    no autograd, BN in eval mode, the run's AMP dtype and memory format;
  search        calibration and evaluation in float32, channels-last (engine/search/__main__.py).
Calls under no autograd have the batch class "*" (dispatch.signature_text) and are tuned at
EVAL_BATCH. A fused op's parts (conv_bn -> pointwise_conv + batchnorm_act) are enumerated too: they
run whenever the fused op's reference is chosen. Calls no kernel covers (the stem's 3x3 conv, float64)
are not dispatched, so not listed. Not listed either: the search's one batch-1 FLOP-counting forward
(set-up, not a generation), which runs the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from engine.elastic.dispatch import signature_text
from engine.elastic.utils import make_divisible
from engine.supernet import arch

EVAL_BATCH = 256           # the calibration and evaluation batch (trainer, search)


@dataclass(frozen=True)
class Signature:
    """One op call: what the table keys on, plus `kmax` (the grouped depthwise conv's filter size,
    the space's largest kernel: needed to run the call, not part of its key)."""

    op: str
    dtype: torch.dtype
    amp: torch.dtype | None
    channels_last: bool
    grad: bool
    shape: tuple[int, int, int, int]
    key: tuple
    kmax: int = field(default=0, compare=False)

    @property
    def text(self) -> str:
        return signature_text(self.op, self.dtype, self.amp, self.channels_last, self.grad, self.shape, self.key)


@dataclass(frozen=True)
class Settings:
    """What the signatures depend on: the supernet spec and the run's step settings."""

    spec: arch.SupernetSpec
    batch_size: int
    resolution: int
    amp: torch.dtype | None
    channels_last: bool
    sandwich: str              # "sequential" or "batched"
    subnets: int               # K
    teacher: bool              # the schedule has teacher steps
    shrink: bool               # the schedule has sandwich steps

    def describe(self) -> dict:
        """JSON form (the table's `settings`)."""
        return {"spec": self.spec.to_dict(), "batch_size": self.batch_size, "resolution": self.resolution,
                "amp": str(self.amp).removeprefix("torch.") if self.amp else "off",
                "channels_last": self.channels_last, "sandwich": self.sandwich, "subnets": self.subnets,
                "teacher": self.teacher, "shrink": self.shrink}


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training uses: bf16, or fp16 on a GPU without bf16 (as engine.train)."""
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def settings_from_config(cfg, spec: arch.SupernetSpec, device: torch.device) -> Settings:
    """Settings of a training config (engine.train.config.TrainConfig) on `device`."""
    from engine.train.schedule import make_plan

    plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)
    return Settings(spec, cfg.batch_size, cfg.resolution, amp_dtype(cfg.amp, device), cfg.channels_last,
                    "batched" if cfg.sandwich == "batched" else "sequential", cfg.subnets,
                    teacher=plan.shrink_start > 0, shrink=plan.shrink_start < cfg.epochs)


@dataclass(frozen=True)
class _Mode:
    grad: bool
    bn_training: bool
    dtype: torch.dtype
    amp: torch.dtype | None
    channels_last: bool
    batch: int


@dataclass(frozen=True)
class _Block:
    c_in: int
    out: int
    stride: int
    act: str
    size: int                 # input height = width
    mids: tuple[int, ...]     # expanded widths, one per expand ratio (ascending)
    has_expand: bool
    residual: bool


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _geometry(spec: arch.SupernetSpec, resolution: int) -> tuple[int, int, list[_Block], int]:
    """(stem channels, stem output size, blocks incl. the first block, last feature-map size)."""
    plan = arch.stage_plan(spec)
    size = _ceil_div(resolution, plan.stem_stride)
    stem_size = size
    blocks = [_Block(plan.stem_channels, plan.first_block_channels, plan.first_block_stride, "relu", size,
                     (plan.stem_channels,), False,
                     plan.first_block_stride == 1 and plan.stem_channels == plan.first_block_channels)]
    size, c_in = _ceil_div(size, plan.first_block_stride), plan.first_block_channels
    has_expand = spec.expand_ratios[-1] != 1
    for c_out, stride, act in zip(plan.stage_channels, plan.stage_strides, plan.stage_acts):
        for i in range(spec.max_depth):
            s = stride if i == 0 else 1
            mids = tuple(sorted({make_divisible(round(c_in * e), 8) if has_expand else c_in
                                 for e in spec.expand_ratios}))
            blocks.append(_Block(c_in, c_out, s, act, size, mids, has_expand, s == 1 and c_in == c_out))
            size, c_in = _ceil_div(size, s), c_out
    return plan.stem_channels, stem_size, blocks, size


Call = tuple  # (op, shape (N, C, H, W), key[, kmax of a grouped depthwise conv])


def _conv_bn(n: int, c_in: int, out: int, size: int, act: str, residual: bool, bn_training: bool) -> Iterator[Call]:
    """A 1x1 conv and its BN: the fused op (training-mode BN only) and its parts."""
    shape = (n, c_in, size, size)
    if bn_training:
        yield "conv_bn", shape, (out, act, residual)
    yield "pointwise_conv", shape, (out, 1, 1)
    yield "batchnorm_act", (n, out, size, size), (act, bn_training)


def _sequential(settings: Settings, mode: _Mode, every_subnet: bool) -> Iterator[Call]:
    spec, n, bn = settings.spec, mode.batch, mode.bn_training
    stem, stem_size, blocks, last = _geometry(spec, settings.resolution)
    plan = arch.stage_plan(spec)
    yield "batchnorm_act", (n, stem, stem_size, stem_size), ("h_swish", bn)
    kernels = spec.kernel_sizes if every_subnet else spec.kernel_sizes[-1:]
    for j, b in enumerate(blocks):
        out_size = _ceil_div(b.size, b.stride)
        for mid in (b.mids if every_subnet else b.mids[-1:]):
            if b.has_expand:
                yield from _conv_bn(n, b.c_in, mid, b.size, b.act, False, bn)
            for k in (kernels if j else (3,)):
                yield "depthwise_conv", (n, mid, b.size, b.size), (k, b.stride)
            yield "batchnorm_act", (n, mid, out_size, out_size), (b.act, bn)
            yield from _conv_bn(n, mid, b.out, out_size, "none", b.residual, bn)
    yield "pointwise_conv", (n, blocks[-1].out, last, last), (plan.final_expand_channels, 1, 1)
    yield "batchnorm_act", (n, plan.final_expand_channels, last, last), ("h_swish", bn)
    yield "pointwise_conv", (n, plan.final_expand_channels, 1, 1), (plan.last_channels, 1, 1)


def _grouped(settings: Settings, n: int, g: int) -> Iterator[Call]:
    """The batched sandwich with G groups (engine/train/batched.py); the max net is in every step,
    so each block's grouped width is its widest expansion."""
    spec = settings.spec
    stem, stem_size, blocks, last = _geometry(spec, settings.resolution)
    plan = arch.stage_plan(spec)
    yield "grouped_batchnorm_act", (n, g * stem, stem_size, stem_size), ("h_swish", True)
    for j, b in enumerate(blocks):
        mid, out_size = b.mids[-1], _ceil_div(b.size, b.stride)
        if b.has_expand:
            yield "grouped_pointwise_conv", (n, g * b.c_in, b.size, b.size), (mid, g)
            yield "grouped_batchnorm_act", (n, g * mid, b.size, b.size), (b.act, True)
        kmax = spec.kernel_sizes[-1] if j else 3
        yield "grouped_depthwise_conv", (n, g * mid, b.size, b.size), (b.stride, g), kmax
        yield "grouped_batchnorm_act", (n, g * mid, out_size, out_size), (b.act, True)
        yield "grouped_pointwise_conv", (n, g * mid, out_size, out_size), (b.out, g)
        yield "grouped_batchnorm_act", (n, g * b.out, out_size, out_size), ("none", True)
    fe = plan.final_expand_channels
    yield "grouped_pointwise_conv", (n, g * blocks[-1].out, last, last), (fe, g)
    yield "grouped_batchnorm_act", (n, g * fe, last, last), ("h_swish", True)
    yield "grouped_pointwise_conv", (n, g * fe, 1, 1), (plan.last_channels, g)


def _modes(settings: Settings) -> Iterator[tuple[_Mode, str]]:
    """(mode, what runs: "train", "all" subnets sequentially) of each phase."""
    s, f32 = settings, torch.float32
    yield _Mode(True, True, s.amp or f32, s.amp, s.channels_last, s.batch_size), "train"
    yield _Mode(False, True, f32, None, s.channels_last, EVAL_BATCH), "all"                    # calibration
    yield _Mode(False, False, s.amp or f32, s.amp, s.channels_last, EVAL_BATCH), "all"         # evaluation
    yield _Mode(False, True, f32, None, True, EVAL_BATCH), "all"                                # search
    yield _Mode(False, False, f32, None, True, EVAL_BATCH), "all"


def enumerate_signatures(settings: Settings) -> dict[str, Signature]:
    """Every signature the run will request, by text (insertion order: phase by phase)."""
    out: dict[str, Signature] = {}
    for mode, what in _modes(settings):
        if what == "train" and settings.sandwich == "batched":
            groups = ([1] if settings.teacher else []) + ([settings.subnets] if settings.shrink else [])
            calls = [c for g in groups for c in _grouped(settings, mode.batch, g)]
        else:
            calls = list(_sequential(settings, mode, what == "all" or settings.shrink))
        for op, shape, key, *kmax in calls:
            sig = Signature(op, mode.dtype, mode.amp, mode.channels_last and shape[2] * shape[3] > 1, mode.grad,
                            shape, key, *kmax)
            out.setdefault(sig.text, sig)
    return out
