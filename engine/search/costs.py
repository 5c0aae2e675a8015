"""Costs of a subnet for the search's constraint: FLOPs (torch.utils.flop_counter) and latency (timed).

FLOPs add up per block: a block's FLOPs depend only on its own (kernel size, expand ratio) at a given
resolution, so `FlopTable` counts each block variant once with FlopCounterMode and a subnet's FLOPs are
the fixed part (stem, first block, head) plus its active blocks' entries: microseconds per config
instead of a forward pass (equal to `OFAMobileNetV3.flops`, tested). `LatencyMeter` times the exported
plain-torch subnet on a device (median after a warm-up), cached per config.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.search.accuracy import config_key
from engine.supernet.mobilenetv3 import OFAMobileNetV3
from engine.timing import median_ms


class FlopTable:
    """FLOPs of one image through any subnet of `model` at `resolution` px (2 x multiply-accumulates)."""

    def __init__(self, model: OFAMobileNetV3, resolution: int) -> None:
        self.depth, spec = model.spec.max_depth, model.spec
        active = model.active_config()
        inputs: dict[int, torch.Size] = {}
        def record(i: int):
            def hook(module, args) -> None:
                inputs[i] = args[0].shape[1:]
            return hook

        hooks = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(model.blocks)]
        was_training = model.training
        try:
            model.set_max_net()
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, resolution, resolution))   # records every block's input
            total = model.flops(resolution)
            self.blocks: list[dict[tuple[int, int], int]] = []
            with torch.no_grad():
                for i, block in enumerate(model.blocks):
                    costs = {}
                    for k in spec.kernel_sizes:
                        for e in spec.expand_ratios:
                            block.set_active(k, e)
                            costs[(k, e)] = _count(block.export(block.max_in).eval(), inputs[i])
                    self.blocks.append(costs)
        finally:
            for h in hooks:
                h.remove()
            model.set_active_subnet(active)
            model.train(was_training)
        k_max, e_max = spec.kernel_sizes[-1], spec.expand_ratios[-1]
        self.fixed = total - sum(costs[(k_max, e_max)] for costs in self.blocks)

    def __call__(self, cfg: dict) -> int:
        """FLOPs of the subnet `cfg` (a valid config of the model)."""
        flops = self.fixed
        for s, d in enumerate(cfg["d"]):
            for b in range(s * self.depth, s * self.depth + d):
                flops += self.blocks[b][(cfg["ks"][b], cfg["e"][b])]
        return flops


def _count(module: torch.nn.Module, shape: torch.Size) -> int:
    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *shape))
    return int(counter.get_total_flops())


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
            net = self.model.export_active_subnet().eval().to(self.device, memory_format=torch.channels_last)
            self.model.set_active_subnet(active)
            self.cache[key] = self._time(net)
        return self.cache[key]

    @torch.inference_mode()
    def _time(self, net: torch.nn.Module) -> float:
        return median_ms(lambda: net(self.x), self.device, self.warmup, self.reps)
