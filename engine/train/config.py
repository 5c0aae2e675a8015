"""Run configuration: dataclass defaults < per-dataset defaults (the method's hyper-parameters,
docs/method.md) < --config FILE (JSON or YAML) < command-line flags; then one validation pass over
everything the run will need, before any data is read or any step is run."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.data.loader import DATASETS, default_workers
from engine.train.distributed import launched_by_torchrun
from engine.errors import EXIT_CODES, BadInput
from engine.train.periodic import parse_cadence
from engine.train.schedule import METHODS, make_plan

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
    temperature: float = _opt(1.0, "knowledge-distillation temperature τ (OFA uses 1)")
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
    heldout_images: int | None = _opt(None, "training images never trained on, kept for the search's fitness "
                                            "(python -m engine.search): a seeded set, as OFA does (default: "
                                            "10,000 for imagenet, at most a tenth of the tree; a tenth of the "
                                            "training split otherwise; 0: none)")
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
    resume: str | None = _opt(None, "resume from PATH; bare --resume: from <out>/checkpoint.pt; auto: from "
                                    "<out>/checkpoint.pt when there is one, else start fresh (so a job torchrun "
                                    "restarts continues by itself)", torchrun_default="auto")
    checkpoint_every: str = _opt("30min", "periodic checkpoint besides each epoch end: every MINUTES and/or "
                                          "STEPS, e.g. 30min, 500steps, 30min,500steps, or off")
    move_aside: bool = _opt(False, "when --out holds another run's checkpoint (resuming a checkpoint of a different "
                                   "run into it), move that run's files into <out>/set-aside-<its run id>/ "
                                   "instead of refusing")
    seed: int = _opt(0, "random seed (weights, data order, augmentation, subnet sampling)")
    workers: int = _opt(0, "data-loading worker processes per training process (torchvision loader; DALI "
                           "threads); for CIFAR and ImageNet: the CPUs per process on the node, less one, at "
                           "most 8")
    max_steps: int | None = _opt(None, "stop after this many global steps, with a checkpoint (default: all epochs)")
    log_every: int = _opt(20, "steps between reads of the losses on the host (steps.csv, progress bar, checks)")
    max_bad_steps: int = _opt(5, "stop after this many consecutive steps with non-finite losses or gradients "
                                 "(each is skipped, as GradScaler does)")
    eval_subnets: int = _opt(3, "random subnets evaluated at the end besides max and min")
    calib_images: int = _opt(2000, "training images for BN re-calibration per evaluated subnet")
    progress: bool = _opt(True, "progress bar")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# what a checkpoint written before a setting existed was trained with
LEGACY_SETTINGS: dict[str, Any] = {"heldout_images": 0}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # built-in default: a few CPU minutes. The 8x8 scans are upscaled to 16 px (32 px adds no
    # information and costs 4x); T and W scaled down from the method's ~55% / 5 epochs
    "digits": dict(epochs=5, teacher_epochs=3, warmup_epochs=1, batch_size=64, lr=0.2, variant="cifar",
                   resolution=16),
    # method: E = 200 on the 32-px variant; T not given: the ImageNet fraction (150/270), W = 5
    "cifar10": dict(epochs=200, teacher_epochs=110, warmup_epochs=5, batch_size=128, variant="cifar", resolution=32,
                    workers=default_workers()),
    "cifar100": dict(epochs=200, teacher_epochs=110, warmup_epochs=5, batch_size=128, variant="cifar",
                     resolution=32, workers=default_workers()),
    # the reference launch: E 270, T 150, W 5, lr 0.1625/128 img/GPU, wd 3e-5, BN momentum 0.01,
    # kernel 7 fixed, AutoAugment, random erase 0.2
    "imagenet": dict(epochs=270, teacher_epochs=150, warmup_epochs=5, batch_size=128, variant="imagenet",
                     resolution=224, bn_momentum=0.01, kernel_sizes=[7], auto_augment=True, random_erase=0.2,
                     workers=default_workers()),
}

CHOICES = {"method": METHODS, "dataset": DATASETS, "sampler": ("random", "compound"),
           "variant": ("cifar", "imagenet"), "sandwich": ("sequential", "batched"),
           "backend": ("auto", "torch", "triton", "cuda"), "compile": ("auto", "off", "teacher", "blocks", "all")}
# total stride of each supernet variant: the last stage's feature map is resolution / this
TOTAL_STRIDE = {"cifar": 8, "imagenet": 32}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors (unknown flag, missing value) are BadInput, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see python -m engine.train --help)")


def _lenient(kind: type) -> Callable[[str], Any]:
    """`kind(text)`, or the text itself when it does not convert: validate then names the flag with the
    other problems instead of argparse stopping at the first."""
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text
    convert.__name__ = kind.__name__
    return convert


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m engine.train", epilog=EXIT_CODES,
                description="Once-for-all supernet training (DεpS and baselines). Defaults per dataset follow "
                            "the method (docs/method.md); where the datasets differ, each one's default is shown.")
    p.add_argument("--config", help="JSON or YAML file holding any of the options below (flags win)")
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        choices = f"; one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else ""
        own = "(default" in f.metadata["help"]          # the help says the default itself (out, max_steps)
        help_text = f"{f.metadata['help']}{choices}"
        if not own:
            help_text += f" ({_default_text(f.name, default, f.metadata)})"
        if f.type == "bool":
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.metadata.get("nargs"):
            p.add_argument(_flag(f.name), type=_lenient(int), nargs="+", default=None, help=help_text)
        elif f.name == "resume":
            p.add_argument(_flag(f.name), nargs="?", const="last", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            p.add_argument(_flag(f.name), type=_lenient(kind), default=None, help=help_text)
    return p


def _default_text(name: str, default: Any, metadata: Any) -> str:
    """'default: X', or the default per dataset where the datasets' defaults differ."""
    per = {d: values.get(name, default) for d, values in DATASET_DEFAULTS.items()}
    text = f"default: {default}"
    if len({repr(v) for v in per.values()}) > 1:
        groups: dict[str, list[str]] = {}
        for d, v in per.items():
            groups.setdefault(str(v), []).append(d)
        text = "default: " + ", ".join(f"{'/'.join(ds)} {v}" for v, ds in groups.items())
    if "torchrun_default" in metadata:
        text += f"; under torchrun {metadata['torchrun_default']}"
    return text


def _read_config_file(path: str) -> dict[str, Any]:
    """The options in a JSON or YAML file; BadInput naming the file (and the line of a syntax error)."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"config file {file} does not exist")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"config file {file} cannot be read as text ({err})") from err
    data = _parse_yaml(file, text) if file.suffix in (".yaml", ".yml") else _parse_json(file, text)
    if not isinstance(data, dict):
        raise BadInput(f"config file {file} must hold a mapping of option names to values, not "
                       f"{type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("run_id", None)                     # a run's config.json can be passed back as --config
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadInput(f"config file {file} has unknown options {unknown}")
    return data


def _parse_yaml(file: Path, text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise BadInput(f"config file {file}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") \
            from err


def _parse_json(file: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"config file {file} line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") \
            from err


def parse_config(argv: Sequence[str] | None = None, check_paths: bool = True) -> TrainConfig:
    """Build the run's TrainConfig from flags, an optional config file and the dataset's defaults, and
    validate it (BadInput listing every problem; `check_paths` False: not the data/out/resume paths)."""
    args = vars(_parser().parse_args(argv))
    file_values = _read_config_file(args.pop("config")) if args.get("config") else {}
    cli = {k: v for k, v in args.items() if v is not None}
    dataset = cli.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    defaults = DATASET_DEFAULTS.get(dataset, {}) if isinstance(dataset, str) else {}   # validate names a bad one
    cfg = TrainConfig(**{**defaults, **file_values, **cli})
    if cfg.resume is None and launched_by_torchrun():
        cfg.resume = "auto"
    if cfg.out is None:
        cfg.out = f"runs/{cfg.method}-{cfg.dataset}"
    validate(cfg, check_paths)
    return cfg


TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "str | None": "a string", "int | None": "an integer", "list[int]": "a list of integers"}


def _has_type(value: Any, type_name: str) -> bool:
    if value is None:
        return type_name.endswith("| None")
    if type_name == "list[int]":
        return isinstance(value, list) and all(_has_type(v, "int") for v in value)
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}[type_name.removesuffix(" | None")]
    return isinstance(value, kinds) and (type_name == "bool" or not isinstance(value, bool))


def _type_problems(cfg: TrainConfig) -> list[str]:
    """One problem per setting of the wrong type (a YAML string where a number belongs, 1 for true, ...)."""
    return [f"{_flag(f.name)} {getattr(cfg, f.name)!r}: must be {TYPE_NAMES[f.type]}" for f in fields(cfg)
            if not _has_type(getattr(cfg, f.name), f.type)]


def validate(cfg: TrainConfig, check_paths: bool = True) -> None:
    """Check every setting any phase of the run will need; BadInput naming each bad flag and value."""
    problems = _type_problems(cfg)
    mistyped = {p.split(" ", 1)[0] for p in problems}     # their other checks are skipped

    def need(ok: bool, name: str, what: str) -> None:
        if not ok and _flag(name) not in mistyped:
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
    if cfg.heldout_images is not None:
        need(isinstance(cfg.heldout_images, int) and cfg.heldout_images >= 0, "heldout_images",
             "must be an integer >= 0")
    if cfg.max_steps is not None:
        need(isinstance(cfg.max_steps, int) and cfg.max_steps >= 1, "max_steps", "must be an integer >= 1")
    need(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2 ** 32, "seed", "must be an integer in [0, 2^32)")
    need(cfg.out != "", "out", "must name a folder (an empty path would be the current folder)")
    for name, low, high, low_open, high_open in NUMBER_RANGES:
        number(name, low, high, low_open, high_open)
    try:
        parse_cadence(cfg.checkpoint_every)
    except ValueError as err:
        need(False, "checkpoint_every", str(err))
    _check_architecture(cfg, need, mistyped)
    _check_schedule(cfg, need, problems)
    if check_paths and not mistyped & {"--data", "--out", "--resume", "--tune"}:
        _check_paths(cfg, problems)
    if problems:
        raise BadInput("invalid settings: " + "; ".join(problems))


# (name, low, high, low bound open, high bound open)
NUMBER_RANGES = (("lr", 0, math.inf, True, False), ("momentum", 0, 1, False, True), ("weight_decay", 0, math.inf,
                 False, False), ("label_smoothing", 0, 1, False, True), ("dropout", 0, 1, False, True),
                 ("bn_momentum", 0, 1, False, False), ("temperature", 0, math.inf, True, False),
                 ("random_erase", 0, 1, False, False), ("width_mult", 0, math.inf, True, False),
                 ("max_multiplier", 0, math.inf, False, False), ("min_multiplier", 0, math.inf, False, False),
                 ("other_multiplier", 0, math.inf, False, False), ("teacher_epochs", 0, math.inf, False, False),
                 ("warmup_epochs", 0, math.inf, False, False))


def _check_architecture(cfg: TrainConfig, need: Callable[[bool, str, str], None], mistyped: set[str]) -> None:
    """Elastic choices, compound pairing, and the smallest image the supernet can train on."""
    for name, low, odd in (("kernel_sizes", 1, True), ("expand_ratios", 1, False), ("depths", 1, False)):
        values = getattr(cfg, name)
        if _flag(name) not in mistyped:
            need(bool(values) and all(v >= low and (v % 2 == 1 or not odd) for v in values),
                 name, f"must be integers >= {low}{', odd' if odd else ''}")
    if (cfg.sampler == "compound" or cfg.method == "compofa") and not {"--depths", "--expand-ratios"} & mistyped:
        need(len(set(cfg.depths)) == len(set(cfg.expand_ratios)), "depths",
             f"compound sampling pairs each depth with an expand ratio: needs as many as --expand-ratios "
             f"{cfg.expand_ratios}")
    if cfg.variant not in TOTAL_STRIDE or not isinstance(cfg.resolution, int) or cfg.resolution < 1:
        return
    stride = TOTAL_STRIDE[cfg.variant]
    # below the total stride a stride-2 layer sees a 1-pixel map and its padding dominates: no learning
    need(cfg.resolution >= stride, "resolution", f"the {cfg.variant} supernet halves the image "
         f"{stride.bit_length() - 1} times: it needs at least {stride} pixels")
    side = -(-cfg.resolution // stride)
    if cfg.resolution >= stride and isinstance(cfg.batch_size, int) and cfg.batch_size >= 1:
        need(cfg.batch_size * side * side >= 2, "batch_size",
             f"with --resolution {cfg.resolution} the last stage is {side}x{side}: batch norm needs at least 2 "
             "values per channel, so use a larger batch or resolution")


def _check_schedule(cfg: TrainConfig, need: Callable[[bool, str, str], None], problems: list[str]) -> None:
    """The method's phases fit the epochs, and a sandwich (if the schedule runs one) has max and min."""
    schedule = ("epochs", "teacher_epochs", "warmup_epochs")
    if cfg.method not in METHODS or any(p.startswith(tuple(_flag(n) + " " for n in schedule)) for p in problems):
        return
    try:
        plan = make_plan(cfg.method, cfg.epochs, cfg.teacher_epochs, cfg.warmup_epochs, cfg.sampler)
    except ValueError as err:
        problems.append(f"--epochs {cfg.epochs} / --teacher-epochs {cfg.teacher_epochs} / "
                        f"--warmup-epochs {cfg.warmup_epochs}: {err}")
        return
    # checked now, not when the sandwich starts (after the teacher phase, 145 epochs on ImageNet)
    if plan.shrink_start < cfg.epochs:
        need(isinstance(cfg.subnets, int) and cfg.subnets >= 2, "subnets", f"the {cfg.method} schedule runs a "
             f"sandwich (from epoch {plan.shrink_start:g}), which needs at least 2 subnets (max and min)")


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
    if cfg.resume not in (None, "auto", "last") and not Path(cfg.resume).is_file():
        problems.append(f"--resume {cfg.resume!r}: no such checkpoint file")
    if cfg.dali:
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            problems.append("--dali: nvidia-dali is not installed (pip install -e .[dali])")
