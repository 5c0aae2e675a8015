"""--compile: torch.compile for the parts of training whose graph is static.

  teacher  the teacher phase (max net only, 145 of 270 epochs on ImageNet) runs the whole supernet as
           one compiled graph: its parameters are the supernet's own tensors (gradients land in their
           .grad), forward and backward compiled; one compilation for the phase (the max config never
           changes; `--cuda-graphs` adds CUDA-graph capture, torch.compile's "reduce-overhead")
  blocks   every MBConv block is compiled on its own; a block has len(kernel sizes) x len(expand ratios)
           variants (9 in OFA), each compiled once, so the shrink phase (a new subnet every step) meets
           a bounded number of graphs; the recompile limit is raised so none is evicted
  all      teacher, then blocks for the shrinking phase
  off      eager everywhere (the default on CPU; "auto" is teacher on CUDA, off on CPU)
Inside compiled code backend "auto" uses the reference ops, which inductor generates and fuses (BN,
activation, SE, residual glue); a forced backend (--backend triton) puts the custom kernels there
(they have fake kernels). Inductor's on-disk caches (~/.cache/engine/inductor unless
TORCHINDUCTOR_CACHE_DIR is set) are reused across runs and resumes. Where this torch cannot compile
(no C++ compiler for inductor on CPU, no Triton on a GPU), a probe at start-up says so in one log
line and training runs eager. The seconds spent in steps that compiled a graph are counted apart
(`compile_seconds`, in gpu_hours.json or cpu_hours.json).
"""
from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch
from torch import nn

from engine.supernet.mobilenetv3 import OFAMobileNetV3

log = logging.getLogger("engine.train")
MODES = ("auto", "off", "teacher", "blocks", "all")


def resolve(mode: str, device: torch.device) -> str:
    """"auto" -> "teacher" on CUDA, "off" elsewhere."""
    if mode == "auto":
        return "teacher" if device.type == "cuda" else "off"
    return mode


def probe(backend: str, device: torch.device) -> str | None:
    """None when torch.compile with `backend` works here (a tiny forward and backward), else why not."""
    try:
        fn = torch.compile(lambda t: torch.nn.functional.relu(t * 2.0).sum(), backend=backend, fullgraph=True)
        x = torch.randn(8, device=device, requires_grad=True)
        fn(x).backward()
        return None
    except Exception as err:  # noqa: BLE001 - any failure of the toolchain means: run eager
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def eager():
    """A context in which compiled code runs eager (evaluation, BN calibration: their train/eval and
    grad modes would each compile every block variant once more)."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    from torch import _dynamo

    return _dynamo.config.patch(disable=True)


def unwrap(net: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (a DDP wrapper stays)."""
    return getattr(net, "_orig_mod", net)


def _own_code(block: nn.Module, index: int) -> None:
    """Give `block` a forward with a code object of its own: dynamo keeps compiled variants (and
    counts them against its recompile limit) per code object, and all blocks share MBConvBlock.forward;
    so each block keeps its own few variants, and a call checks only its own block's guards."""
    fn = type(block).forward
    code = fn.__code__.replace(co_name=f"forward_block{index}")
    block.forward = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                                        fn.__closure__), block)


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Compiler:
    """Which net a step runs, per phase, under the --compile mode; keeps the compile time apart."""

    def __init__(self, model: OFAMobileNetV3, mode: str, device: torch.device, backend: str = "inductor",
                 cuda_graphs: bool = False) -> None:
        self.model, self.backend = model, backend
        self.mode = resolve(mode, device)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.compile_seconds, self._teacher, self._blocks_done = 0.0, None, False
        if self.mode == "off":
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "engine" / "inductor"))
        why = probe(backend, device)
        if why is not None:
            log.warning("--compile %s: torch.compile(backend=%r) does not work here (%s); training runs eager",
                        self.mode, backend, why)
            self.mode = "off"
            return
        from torch import _dynamo

        spec = model.spec
        variants = len(spec.kernel_sizes) * len(spec.expand_ratios)
        cfg = _dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):      # per code object: one block's variants (_own_code)
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), variants + 4))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit,
                                                  (len(model.blocks) + 2) * (variants + 4))

    def net(self, phase: str, net: nn.Module) -> nn.Module:
        """The module to run for `phase` ("teacher" or a shrinking phase); `net` is the eager one (the
        supernet or its DDP wrapper)."""
        if phase == "teacher" and self.mode in ("teacher", "all"):
            if self._teacher is None:
                self._teacher = torch.compile(net, backend=self.backend,
                                              mode="reduce-overhead" if self.cuda_graphs else None)
            return self._teacher
        if self.mode in ("blocks", "all") and not self._blocks_done:
            for i, block in enumerate(self.model.blocks):
                _own_code(block, i)
                block.compile(backend=self.backend)
            self._blocks_done = True
        return net

    def timed_step(self, run):
        """Run one step; when it compiled new graphs, its wall time counts as compile time. Returns
        (result, compiled_anything)."""
        if self.mode == "off":
            return run(), False
        before, t0 = graphs_compiled(), time.perf_counter()
        result = run()
        compiled = graphs_compiled() > before
        if compiled:
            self.compile_seconds += time.perf_counter() - t0
        return result, compiled
