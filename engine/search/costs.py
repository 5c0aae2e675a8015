"""Costs of a subnet for the search's constraint: FLOPs (torch.utils.flop_counter), latency predicted
from a per-device table, or latency timed.

Costs add up per block: a block's cost depends only on its own (kernel size, expand ratio) at a given
resolution, so `block_costs` measures each block variant once, on its own input shape, and a subnet's
cost is a fixed part plus its active blocks' entries: microseconds per config instead of a forward pass.
`FlopTable` is exact (equal to `OFAMobileNetV3.flops`, tested); `LatencyTable` is OFA's latency lookup
table (engine/search/latency_table.py writes one on the deployment device), its error against timed
whole subnets stated in the table. `LatencyMeter` times the exported plain-torch subnet on a device
(median after a warm-up), cached per config. Every tensor is made on the model's device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.search.accuracy import config_key
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.timing import median_ms

Variant = tuple[int, int]                  # (kernel size, expand ratio)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def block_costs(model: OFAMobileNetV3, resolution: int, batch: int,
                measure: Callable[[torch.nn.Module, torch.Tensor], float],
                device: torch.device) -> tuple[list[dict[Variant, float]], float]:
    """([per stage block: {variant: measure(exported block, its input)}], measure(exported max net, images)):
    exported modules and their inputs (zeros, `batch` images at `resolution` px) on `device`; the block
    input shapes are recorded by a forward of the model on its own device. The model's active subnet
    and mode are restored."""
    spec = model.spec
    active, was_training = model.active_config(), model.training
    shapes: dict[int, torch.Size] = {}

    def record(i: int):
        def hook(module, args) -> None:
            shapes[i] = args[0].shape[1:]
        return hook

    hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(model.blocks)]
    images = torch.zeros(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    try:
        model.set_max_net()
        model.eval()(images.to(model_device(model)))              # records every block's input shape
        whole = measure(_on(model.export_active_subnet(), device), images)
        blocks = []
        for i, block in enumerate(model.blocks):
            x = torch.zeros(batch, *shapes[i], device=device).contiguous(memory_format=torch.channels_last)
            costs = {}
            for k in spec.kernel_sizes:
                for e in spec.expand_ratios:
                    block.set_active(k, e)
                    costs[(k, e)] = measure(_on(block.export(block.max_in), device), x)
            blocks.append(costs)
    finally:
        for h in hooks:
            h.remove()
        model.set_active_subnet(active)
        model.train(was_training)
    return blocks, whole


def _on(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An exported (CPU) module in eval mode on `device`, channels-last."""
    return net.eval().to(device, memory_format=torch.channels_last) if device.type != "cpu" else net.eval()


def add_up(fixed: float, blocks: list[dict[Variant, float]], depth: int, cfg: dict) -> float:
    """`fixed` plus the entries of the blocks `cfg` runs (`depth` blocks per stage)."""
    total = fixed
    for s, d in enumerate(cfg["d"]):
        for b in range(s * depth, s * depth + d):
            total += blocks[b][(cfg["ks"][b], cfg["e"][b])]
    return total


class FlopTable:
    """FLOPs of one image through any subnet of `model` (on any device) at `resolution` px (2 x
    multiply-accumulates), counted on CPU copies of the blocks: FLOPs do not depend on the device."""

    def __init__(self, model: OFAMobileNetV3, resolution: int) -> None:
        self.depth, spec = model.spec.max_depth, model.spec
        self.blocks, total = block_costs(model, resolution, 1, _count, torch.device("cpu"))
        k_max, e_max = spec.kernel_sizes[-1], spec.expand_ratios[-1]
        self.fixed = total - sum(costs[(k_max, e_max)] for costs in self.blocks)

    def __call__(self, cfg: dict) -> int:
        """FLOPs of the subnet `cfg` (a valid config of the model)."""
        return int(add_up(self.fixed, self.blocks, self.depth, cfg))


def _count(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


class LatencyTable:
    """Milliseconds per batch of a subnet predicted from a table written by engine.search.latency_table
    (JSON: "blocks": per block [[k, e, ms], ...], "fixed_ms", and the spec and resolution it was made for)."""

    def __init__(self, table: dict, spec: dict, resolution: int, depth: int) -> None:
        from engine.errors import BadInput

        if table.get("spec") != spec or table.get("resolution") != resolution:
            raise BadInput(f"--latency-table: made for {table.get('resolution')} px and spec {table.get('spec')}, "
                           f"not this run's {resolution} px and spec {spec}")
        self.fixed, self.depth = float(table["fixed_ms"]), depth
        self.blocks = [{(int(k), int(e)): float(ms) for k, e, ms in rows} for rows in table["blocks"]]

    def __call__(self, cfg: dict) -> float:
        return add_up(self.fixed, self.blocks, self.depth, cfg)


class LatencyMeter:
    """Milliseconds per batch of the exported subnet on `device`: median of `reps` timed runs after
    `warmup`, inference mode, channels-last; cached per config."""

    def __init__(self, model: OFAMobileNetV3, resolution: int, device: torch.device, batch: int = 1,
                 warmup: int = 3, reps: int = 10) -> None:
        self.model, self.device, self.warmup, self.reps = model, device, warmup, reps
        self.x = torch.randn(batch, 3, resolution, resolution, device=device).to(memory_format=torch.channels_last)
        self.cache: dict[str, float] = {}

    def __call__(self, cfg: dict) -> float:
        key = config_key(cfg)
        if key not in self.cache:
            active = self.model.active_config()
            self.model.set_active_subnet(cfg)
            net = _on(self.model.export_active_subnet(), self.device)
            self.model.set_active_subnet(active)
            self.cache[key] = time_ms(net, self.x, self.warmup, self.reps)
        return self.cache[key]


@torch.inference_mode()
def time_ms(net: torch.nn.Module, x: torch.Tensor, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of net(x) on x's device after `warmup` calls."""
    return median_ms(lambda: net(x), x.device, warmup, reps)
