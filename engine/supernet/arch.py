"""The OFA-MobileNetV3 search space: supernet spec, stage plan, and subnet configs.

A subnet config is a JSON-serialisable dict:
    {"ks": [k per block], "e": [expand ratio per block], "d": [depth per stage]}
with n_stages * max(depths) block entries (entries of blocks a depth skips are kept but unused).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from engine.elastic.utils import make_divisible

BASE_STAGE_WIDTH = (16, 16, 24, 40, 80, 112, 160, 960, 1280)
ACT_STAGES = ("relu", "relu", "relu", "h_swish", "h_swish", "h_swish")
SE_STAGES = (False, False, True, False, True, True)
# Strides of [first conv, first block, stage 1..5]. ImageNet: OFA's. CIFAR (32 px): our choice,
# stride-1 stem and first stage so a 32-px input ends at 4 x 4 (the DεpS code's exact strides were
# not available to us).
STRIDES = {"imagenet": (2, 1, 2, 2, 2, 1, 2), "cifar": (1, 1, 1, 2, 2, 1, 2)}


@dataclass
class SupernetSpec:
    """Hyper-parameters of an OFA-MobileNetV3 supernet."""

    variant: str = "imagenet"             # "imagenet" (224 px) or "cifar" (32 px)
    width_mult: float = 1.0               # 1.0 or 1.2 in OFA
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    expand_ratios: tuple[int, ...] = (3, 4, 6)
    depths: tuple[int, ...] = (2, 3, 4)
    num_classes: int = 1000
    dropout: float = 0.1
    bn_momentum: float = 0.1              # PyTorch convention
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.variant not in STRIDES:
            raise ValueError(f"variant={self.variant!r} is not one of {tuple(STRIDES)}")
        for name in ("kernel_sizes", "expand_ratios", "depths"):
            values = tuple(sorted(set(int(v) for v in getattr(self, name))))
            if not values or values[0] < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be non-empty positive integers")
            setattr(self, name, values)
        if self.width_mult <= 0 or self.num_classes < 1:
            raise ValueError(f"bad width_mult={self.width_mult} or num_classes={self.num_classes}")

    def to_dict(self) -> dict:
        """JSON-serialisable form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def max_depth(self) -> int:
        return self.depths[-1]


@dataclass
class StagePlan:
    """Concrete widths and per-stage settings derived from a spec."""

    stem_channels: int
    first_block_channels: int
    stage_channels: list[int]
    stage_strides: list[int]
    stage_acts: list[str]
    stage_se: list[bool]
    stem_stride: int
    first_block_stride: int
    final_expand_channels: int
    last_channels: int
    n_stages: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_stages = len(self.stage_channels)


def stage_plan(spec: SupernetSpec) -> StagePlan:
    """Widths, strides, activations and SE flags of the supernet described by `spec`."""
    widths = [make_divisible(w * spec.width_mult, 8) for w in BASE_STAGE_WIDTH[:-2]]
    strides = STRIDES[spec.variant]
    return StagePlan(
        stem_channels=widths[0], first_block_channels=widths[1], stage_channels=widths[2:],
        stage_strides=list(strides[2:]), stage_acts=list(ACT_STAGES[1:]), stage_se=list(SE_STAGES[1:]),
        stem_stride=strides[0], first_block_stride=strides[1],
        final_expand_channels=make_divisible(BASE_STAGE_WIDTH[-2] * spec.width_mult, 8),
        last_channels=make_divisible(BASE_STAGE_WIDTH[-1] * spec.width_mult, 8),
    )


def _pick(choices: tuple[int, ...], generator: torch.Generator | None) -> int:
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


def max_config(spec: SupernetSpec, n_stages: int) -> dict:
    """The largest subnet."""
    n = n_stages * spec.max_depth
    return {"ks": [spec.kernel_sizes[-1]] * n, "e": [spec.expand_ratios[-1]] * n, "d": [spec.depths[-1]] * n_stages}


def min_config(spec: SupernetSpec, n_stages: int) -> dict:
    """The smallest subnet."""
    n = n_stages * spec.max_depth
    return {"ks": [spec.kernel_sizes[0]] * n, "e": [spec.expand_ratios[0]] * n, "d": [spec.depths[0]] * n_stages}


def random_config(spec: SupernetSpec, n_stages: int, generator: torch.Generator | None = None) -> dict:
    """Uniform per-block kernel size and expand ratio, uniform per-stage depth (OFA sampling)."""
    n = n_stages * spec.max_depth
    return {"ks": [_pick(spec.kernel_sizes, generator) for _ in range(n)],
            "e": [_pick(spec.expand_ratios, generator) for _ in range(n)],
            "d": [_pick(spec.depths, generator) for _ in range(n_stages)]}


def compound_config(spec: SupernetSpec, n_stages: int, generator: torch.Generator | None = None) -> dict:
    """CompOFA sampling: per stage one index j picks depth depths[j] and expand ratio expand_ratios[j]
    for all its blocks (the i-th smallest depth goes with the i-th smallest ratio); kernel sizes are
    sampled per block as in OFA."""
    if len(spec.depths) != len(spec.expand_ratios):
        raise ValueError(f"compound sampling couples depths {spec.depths} with expand ratios "
                         f"{spec.expand_ratios}: they need the same number of choices")
    cfg = random_config(spec, n_stages, generator)
    for s in range(n_stages):
        j = int(torch.randint(len(spec.depths), (1,), generator=generator))
        cfg["d"][s] = spec.depths[j]
        for b in range(s * spec.max_depth, (s + 1) * spec.max_depth):
            cfg["e"][b] = spec.expand_ratios[j]
    return cfg


def validate_config(spec: SupernetSpec, n_stages: int, cfg: dict) -> dict:
    """Return a normalised copy of `cfg` or raise ValueError naming the offending entry."""
    if not isinstance(cfg, dict) or set(cfg) - {"ks", "e", "d"} or not {"ks", "e", "d"} <= set(cfg):
        raise ValueError(f"a subnet config needs exactly the keys 'ks', 'e', 'd'; got {cfg!r}")
    n = n_stages * spec.max_depth
    out = {}
    for key, length, choices in (("ks", n, spec.kernel_sizes), ("e", n, spec.expand_ratios),
                                 ("d", n_stages, spec.depths)):
        values = [int(v) for v in cfg[key]]
        if len(values) != length:
            raise ValueError(f"config[{key!r}] has {len(values)} entries, expected {length}")
        for i, v in enumerate(values):
            if v not in choices:
                raise ValueError(f"config[{key!r}][{i}]={v} is not one of {choices}")
        out[key] = values
    return out
