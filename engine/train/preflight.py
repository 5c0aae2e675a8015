"""Checks of the loaded data against the run's settings, before any step: what would otherwise train
nothing, crash mid-run, or report a meaningless accuracy."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.errors import BadInput

log = logging.getLogger("engine.train")


def labels_of(dataset) -> np.ndarray | None:
    """The class indices of a dataset (array-backed or ImageFolder-style), None when it keeps none."""
    base = getattr(dataset, "base", dataset)
    if getattr(base, "labels", None) is not None:
        return np.asarray(base.labels)
    if getattr(base, "samples", None) is not None:
        return np.asarray([label for _, label in base.samples], dtype=np.int64)
    return None


def check_data(data, steps_per_epoch: int, batch_size: int, world: int, data_path: str | None) -> None:
    """BadInput when the run cannot train meaningfully on `data`; a warning for val classes that the
    training split lacks (they are left out of the evaluation)."""
    problems = []
    if data.num_classes < 2:
        problems.append(f"the training data has {data.num_classes} class: a classifier needs at least 2 "
                        "(its accuracy would be 100% whatever it learns)")
    if steps_per_epoch < 1:
        problems.append(f"--batch-size {batch_size} x {world} process(es) exceeds the {len(data.train)} training "
                        "images: an epoch has no full batch (the last partial batch is dropped); lower --batch-size")
    for split, dataset in (("training", data.train), ("validation", data.val)):
        labels = labels_of(dataset)
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= data.num_classes):
            bad = labels[(labels < 0) | (labels >= data.num_classes)]
            problems.append(f"the {split} labels hold {len(bad)} values outside [0, {data.num_classes - 1}] "
                            f"(e.g. {int(bad[0])}): the data's labels and class list disagree")
    _warn_extra_val_classes(data, data_path)
    if problems:
        raise BadInput("; ".join(problems))


def _warn_extra_val_classes(data, data_path: str | None) -> None:
    """ImageFolder trees: val/ class folders without a train/ twin are not evaluated; say which."""
    if data.kind != "imagenet" or not data_path:
        return
    val = Path(data_path) / "val"
    train_classes = set(getattr(getattr(data.train, "base", None), "classes", None) or ())
    extra = sorted(d.name for d in val.iterdir() if d.is_dir() and d.name not in train_classes)
    if extra:
        log.warning("val/ has %d class folders that train/ lacks, left out of the evaluation: %s%s", len(extra),
                    ", ".join(extra[:10]), " ..." if len(extra) > 10 else "")
