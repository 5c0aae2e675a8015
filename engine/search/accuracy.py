"""Accuracy of a subnet for the search: measured (BN re-calibrated, top-1 on held-out images), cached per
config, or predicted by a ridge regression fitted on measured (config, accuracy) pairs.

The held-out images are training images the run held out of training, and BN statistics are
re-estimated on other training images (engine/search/heldout.py); the validation split is kept for the
chosen subnets.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Iterable, Sequence

import torch

from engine.eval.bn_calibration import calibrated
from engine.eval.evaluate import top1
from engine.supernet.mobilenetv3 import OFAMobileNetV3


def config_key(cfg: dict) -> str:
    """A hashable, canonical form of a config."""
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


class MeasuredAccuracy:
    """top-1 (%) of a config on `batches` (re-iterable (images, labels) on `device`, streamed) after BN
    re-calibration on `calib` (re-iterable images on `device`); the supernet's own running statistics are
    restored after each measurement. Cached per config."""

    def __init__(self, model: OFAMobileNetV3, calib: Iterable[torch.Tensor],
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.model, self.calib, self.batches, self.device = model, calib, batches, device
        self.cache: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.cache)

    def __call__(self, cfg: dict) -> float:
        key = config_key(cfg)
        if key not in self.cache:
            with self.calibrated(cfg) as model:
                self.cache[key] = top1(model, self.batches, self.device, channels_last=True)
        return self.cache[key]

    def calibrated(self, cfg: dict):
        """Context: the model set to `cfg` with BN re-calibrated, in eval mode; restored on exit."""
        return calibrated(self.model, cfg, self.calib)


def features(cfg: dict, kernel_sizes: Sequence[int], expand_ratios: Sequence[int], depths: Sequence[int]) -> list[float]:
    """One-hot encoding of a config: per block its kernel size and expand ratio (all zero when the
    block is skipped), per stage its depth, and a constant 1."""
    max_depth = max(depths)
    out: list[float] = []
    for s, d in enumerate(cfg["d"]):
        out += [float(d == v) for v in depths]
        for i in range(max_depth):
            b = s * max_depth + i
            on = i < d
            out += [float(on and cfg["ks"][b] == k) for k in kernel_sizes]
            out += [float(on and cfg["e"][b] == e) for e in expand_ratios]
    return out + [1.0]


class RidgePredictor:
    """top-1 (%) predicted from `features` by ridge regression (closed form, float64)."""

    def __init__(self, encode: Callable[[dict], list[float]], alpha: float = 1.0) -> None:
        self.encode, self.alpha, self.weights = encode, alpha, None

    def fit(self, cfgs: Sequence[dict], accuracies: Sequence[float]) -> "RidgePredictor":
        x = torch.tensor([self.encode(c) for c in cfgs], dtype=torch.float64)
        y = torch.tensor(list(accuracies), dtype=torch.float64)
        eye = torch.eye(x.shape[1], dtype=torch.float64)
        eye[-1, -1] = 0.0                                             # the intercept is not shrunk
        self.weights = torch.linalg.solve(x.T @ x + self.alpha * eye, x.T @ y)
        return self

    def __call__(self, cfg: dict) -> float:
        return float(torch.tensor(self.encode(cfg), dtype=torch.float64) @ self.weights)


def fit_report(predictor: RidgePredictor, cfgs: Sequence[dict], accuracies: Sequence[float],
               holdout: float = 0.2) -> dict:
    """Fit on the first (1 - holdout) of the pairs, report the error on the rest (RMSE in points of
    top-1, Kendall's tau of the ranking), then refit on all of them."""
    n_test = max(2, int(round(len(cfgs) * holdout)))
    if len(cfgs) - n_test < 2:
        raise ValueError(f"{len(cfgs)} measured subnets are too few to fit and test a predictor")
    predictor.fit(cfgs[:-n_test], accuracies[:-n_test])
    pred = [predictor(c) for c in cfgs[-n_test:]]
    true = list(accuracies[-n_test:])
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(pred, true)) / n_test)
    pairs = [(i, j) for i in range(n_test) for j in range(i + 1, n_test)]
    concordant = sum((pred[i] - pred[j]) * (true[i] - true[j]) > 0 for i, j in pairs)
    discordant = sum((pred[i] - pred[j]) * (true[i] - true[j]) < 0 for i, j in pairs)
    predictor.fit(cfgs, accuracies)
    return {"pairs": len(cfgs), "test_pairs": n_test, "rmse_top1": rmse,
            "kendall_tau": (concordant - discordant) / max(len(pairs), 1)}
