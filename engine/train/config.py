"""Run configuration: dataclass defaults < per-dataset defaults (the method's hyper-parameters,
docs/method.md) < --config FILE (JSON or YAML) < command-line flags; then one validation pass over
everything the run will need, before any data is read or any step is run."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from engine.data.loader import DATASETS
from engine.train.schedule import METHODS, make_plan

# exit codes of `python -m engine.train` (also in --help and the README)
EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NON_FINITE = 0, 2, 3, 4
EXIT_CODES = (f"exit codes: {EXIT_OK} finished (all epochs, or --max-steps reached); {EXIT_BAD_INPUT} bad input "
              f"(settings, data, checkpoint), nothing trained; {EXIT_INTERRUPTED} interrupted by SIGTERM/SIGINT "
              f"after writing a checkpoint (continue with --resume); {EXIT_NON_FINITE} stopped on non-finite "
              "losses or gradients (the last good checkpoint is kept)")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its --help text."""
    factory = {"default_factory": (lambda: list(default))} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, **kwargs}, **factory)


@dataclass
class TrainConfig:
    method: str = _opt("deps", "training method: deps (DεpS), bignas, ofa-ps (progressive shrinking), compofa")
    dataset: str = _opt("digits", "digits (built in, no download), cifar10, cifar100 or imagenet")
    data: str | None = _opt(None, "dataset folder: CIFAR python batches, or imagenet with train/ and val/ "
                                  "ImageFolder trees (digits takes none)")
    epochs: int = _opt(8, "total epochs E")
    teacher_epochs: float = _opt(4, "T, epochs; DεpS trains the max net alone for T - W epochs, then shrinks")
    warmup_epochs: float = _opt(1, "W, epochs of the ε ramp (the subnets' learning-rate weight rises from 0)")
    batch_size: int = _opt(64, "images per step per GPU/process")
    lr: float = _opt(0.1625, "learning rate per 128 images per process (scaled by batch x processes / 128)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum")
    weight_decay: float = _opt(3e-5, "weight decay (not on BN parameters and biases)")
    label_smoothing: float = _opt(0.1, "label smoothing of the max net's cross-entropy")
    dropout: float = _opt(0.1, "dropout before the classifier")
    bn_momentum: float = _opt(0.1, "BN running-statistics momentum, PyTorch convention (weight of the new batch)")
    temperature: float = _opt(1.0, "knowledge-distillation temperature τ (OFA's default: 1)")
    subnets: int = _opt(4, "K, subnets per sandwich step (max, min and K - 2 sampled), >= 2")
    sampler: str = _opt("random", "how the K - 2 subnets are sampled: random (OFA) or compound (CompOFA)")
    max_multiplier: float = _opt(1.0, "loss weight of the max net")
    min_multiplier: float = _opt(1.0, "loss weight of the min net (times ε)")
    other_multiplier: float = _opt(1.0, "loss weight of each sampled subnet (times ε)")
    reorganize: bool = _opt(True, "sort expanded channels by importance when shrinking starts")
    variant: str = _opt("cifar", "supernet: cifar (32-px strides) or imagenet (224-px strides)")
    width_mult: float = _opt(1.0, "supernet width multiplier (OFA: 1.0 or 1.2)")
    kernel_sizes: list[int] = _opt([3, 5, 7], "elastic depthwise kernel sizes (odd)", nargs="+")
    expand_ratios: list[int] = _opt([3, 4, 6], "elastic expand ratios", nargs="+")
    depths: list[int] = _opt([2, 3, 4], "elastic depths (blocks per stage)", nargs="+")
    resolution: int = _opt(32, "training image size, pixels")
    auto_augment: bool = _opt(False, "AutoAugment (ImageNet policy; CIFAR-10 policy for cifar, SVHN for digits)")
    random_erase: float = _opt(0.0, "random-erasing probability per image")
    amp: bool = _opt(False, "mixed precision: bf16 autocast (fp16 + gradient scaling on GPUs without bf16; "
                            "bf16 autocast on a CPU too)")
    channels_last: bool = _opt(False, "channels-last memory format for the model and images")
    dali: bool = _opt(False, "DALI data pipeline (GPU decoding; CPU operators without a GPU)")
    skip_corrupt: bool = _opt(False, "verify every image file up front and leave out unreadable ones (and, with "
                                     "--dali, non-JPEG ones) from training, BN calibration and evaluation")
    sandwich: str = _opt("sequential", "sequential or batched (all K subnets in one pass)")
    backend: str = _opt("auto", "elastic-layer backend: auto (the tuned dispatch table), torch, triton or cuda")
    tune: str = _opt("auto", "dispatch table for backend auto: auto (load the cached table, tune what it lacks "
                             "before step 0), off (the reference everywhere) or PATH (this table only)")
    compile: str = _opt("auto", "torch.compile: off, teacher (the max-net phase as one graph), blocks (each "
                                "MBConv block per variant), all; auto = teacher on CUDA, off on CPU")
    compile_backend: str = _opt("inductor", "torch.compile backend (inductor; aot_eager to debug)")
    cuda_graphs: bool = _opt(False, "capture the compiled teacher step in CUDA graphs (reduce-overhead)")
    out: str | None = _opt(None, "run folder (default runs/<method>-<dataset>)")
    resume: str | None = _opt(None, "resume from PATH, or from <out>/checkpoint.pt when no PATH is given")
    seed: int = _opt(0, "random seed (weights, data order, augmentation, subnet sampling)")
    workers: int = _opt(0, "data-loading worker processes (torchvision loader; DALI threads)")
    max_steps: int | None = _opt(None, "stop after this many global steps, with a checkpoint (default: all epochs)")
    log_every: int = _opt(20, "steps between reads of the losses on the host (steps.csv, progress bar, checks)")
    max_bad_steps: int = _opt(5, "stop after this many consecutive steps with non-finite losses or gradients "
                                 "(each is skipped, as GradScaler does)")
    eval_subnets: int = _opt(3, "random subnets evaluated at the end besides max and min")
    calib_images: int = _opt(2000, "training images for BN re-calibration per evaluated subnet")
    progress: bool = _opt(True, "progress bar")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # built-in default: a few CPU minutes. The 8x8 scans are upscaled to 16 px (32 px adds no
    # information and costs 4x); T and W scaled down from the method's ~55% / 5 epochs
    "digits": dict(epochs=5, teacher_epochs=3, warmup_epochs=1, batch_size=64, lr=0.2, variant="cifar",
                   resolution=16),
    # method: E = 200 on the 32-px variant; T not given: the ImageNet fraction (150/270), W = 5
    "cifar10": dict(epochs=200, teacher_epochs=110, warmup_epochs=5, batch_size=128, variant="cifar", resolution=32),
    "cifar100": dict(epochs=200, teacher_epochs=110, warmup_epochs=5, batch_size=128, variant="cifar",
                     resolution=32),
    # the reference launch: E 270, T 150, W 5, lr 0.1625/128 img/GPU, wd 3e-5, BN momentum 0.01,
    # kernel 7 fixed, AutoAugment, random erase 0.2
    "imagenet": dict(epochs=270, teacher_epochs=150, warmup_epochs=5, batch_size=128, variant="imagenet",
                     resolution=224, bn_momentum=0.01, kernel_sizes=[7], auto_augment=True, random_erase=0.2),
}

CHOICES = {"method": METHODS, "dataset": DATASETS, "sampler": ("random", "compound"),
           "variant": ("cifar", "imagenet"), "sandwich": ("sequential", "batched"),
           "backend": ("auto", "torch", "triton", "cuda"), "compile": ("auto", "off", "teacher", "blocks", "all")}
# total stride of each supernet variant: the last stage's feature map is resolution / this
TOTAL_STRIDE = {"cifar": 8, "imagenet": 32}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train", epilog=EXIT_CODES,
                                description="Once-for-all supernet training (DεpS and baselines). Defaults per "
                                            "dataset follow the method (docs/method.md); shown defaults are "
                                            "the built-in ones before those.")
    p.add_argument("--config", help="JSON or YAML file holding any of the options below (flags win)")
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type == "bool":
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.metadata.get("nargs"):
            p.add_argument(_flag(f.name), type=int, nargs="+", default=None, help=help_text)
        elif f.name == "resume":
            p.add_argument(_flag(f.name), nargs="?", const="auto", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            p.add_argument(_flag(f.name), type=kind, default=None, choices=CHOICES.get(f.name), help=help_text)
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {file} must hold a mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {file} has unknown options {unknown}")
    return data


def parse_config(argv: Sequence[str] | None = None, check_paths: bool = True) -> TrainConfig:
    """Build the run's TrainConfig from flags, an optional config file and the dataset's defaults, and
    validate it (ValueError listing every problem; `check_paths` False: not the data/out/resume paths)."""
    args = vars(_parser().parse_args(argv))
    file_values = _read_config_file(args.pop("config")) if args.get("config") else {}
    cli = {k: v for k, v in args.items() if v is not None}
    dataset = cli.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    if dataset not in DATASET_DEFAULTS:
        raise ValueError(f"--dataset {dataset!r} is not one of {tuple(DATASET_DEFAULTS)}")
    cfg = TrainConfig(**{**DATASET_DEFAULTS[dataset], **file_values, **cli})
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-{cfg.dataset}"
    validate(cfg, check_paths)
    return cfg


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Check every setting any phase of the run will need; ValueError naming each bad flag and value."""
    problems: list[str] = []

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            problems.append(f"{_flag(name)} {getattr(cfg, name)!r}: {what}")

    def number(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> None:
        v = getattr(cfg, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        need(ok, name, f"must be a number in {bounds}")

    for name, allowed in CHOICES.items():
        need(getattr(cfg, name) in allowed, name, f"must be one of {allowed}")
    for name in ("epochs", "batch_size", "subnets", "resolution", "calib_images", "log_every", "max_bad_steps"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1, name, "must be an integer >= 1")
    for name in ("eval_subnets", "workers"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0, name, "must be an integer >= 0")
    if cfg.max_steps is not None:
        need(isinstance(cfg.max_steps, int) and cfg.max_steps >= 1, "max_steps", "must be an integer >= 1")
    number("lr", 0, low_open=True)
    number("momentum", 0, 1, high_open=True)
    number("weight_decay", 0)
    number("label_smoothing", 0, 1, high_open=True)
    number("dropout", 0, 1, high_open=True)
    number("bn_momentum", 0, 1)
    number("temperature", 0, low_open=True)
    number("random_erase", 0, 1)
    number("width_mult", 0, low_open=True)
    for name in ("max_multiplier", "min_multiplier", "other_multiplier"):
        number(name, 0)
    number("teacher_epochs", 0)
    number("warmup_epochs", 0)
    for name, low, odd in (("kernel_sizes", 1, True), ("expand_ratios", 1, False), ("depths", 1, False)):
        values = getattr(cfg, name)
        need(bool(values) and all(isinstance(v, int) and v >= low and (v % 2 == 1 or not odd) for v in values),
             name, f"must be integers >= {low}{', odd' if odd else ''}")
    if cfg.sampler == "compound" or cfg.method == "compofa":
        need(len(set(cfg.depths)) == len(set(cfg.expand_ratios)), "depths",
             f"compound sampling pairs each depth with an expand ratio: needs as many as --expand-ratios "
             f"{cfg.expand_ratios}")
    schedule = ("epochs", "teacher_epochs", "warmup_epochs")
    if cfg.method in METHODS and not any(p.startswith(tuple(_flag(n) + " " for n in schedule)) for p in problems):
        try:
            plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)
        except ValueError as err:
            problems.append(f"--epochs {cfg.epochs} / --teacher-epochs {cfg.teacher_epochs} / "
                            f"--warmup-epochs {cfg.warmup_epochs}: {err}")
        else:
            # checked now, not when the sandwich starts (after the teacher phase, 145 epochs on ImageNet)
            if plan.shrink_start < cfg.epochs:
                need(cfg.subnets >= 2, "subnets", f"the {cfg.method} schedule runs a sandwich (from epoch "
                     f"{plan.shrink_start:g}), which needs at least 2 subnets (max and min)")
    if cfg.variant in TOTAL_STRIDE and isinstance(cfg.resolution, int) and isinstance(cfg.batch_size, int) \
            and cfg.resolution >= 1 and cfg.batch_size >= 1:
        side = -(-cfg.resolution // TOTAL_STRIDE[cfg.variant])
        need(cfg.batch_size * side * side >= 2, "batch_size",
             f"with --resolution {cfg.resolution} the last stage is {side}x{side}: batch norm needs at least 2 "
             "values per channel, so use a larger batch or resolution")
    if check_paths:
        _check_paths(cfg, problems)
    if problems:
        raise ValueError("invalid settings:\n  " + "\n  ".join(problems))


def _check_paths(cfg: TrainConfig, problems: list[str]) -> None:
    if cfg.dataset == "digits":
        if cfg.data:
            problems.append(f"--data {cfg.data!r}: --dataset digits is built in and takes no --data path")
    elif cfg.dataset in DATASETS:
        if not cfg.data:
            problems.append(f"--data: --dataset {cfg.dataset} needs a data folder")
        elif not Path(cfg.data).is_dir():
            problems.append(f"--data {cfg.data!r}: no such folder")
        elif cfg.dataset == "imagenet":
            for part in ("train", "val"):
                if not (Path(cfg.data) / part).is_dir():
                    problems.append(f"--data {cfg.data!r}: no {part}/ ImageFolder tree inside")
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        problems.append(f"--out {cfg.out!r}: exists and is not a folder")
    if cfg.tune not in ("auto", "off") and not Path(cfg.tune).is_file():
        problems.append(f"--tune {cfg.tune!r}: no such dispatch table file (or auto, off)")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        problems.append(f"--resume {cfg.resume!r}: no such checkpoint file")
    if cfg.dali:
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            problems.append("--dali: nvidia-dali is not installed (pip install -e .[dali])")
