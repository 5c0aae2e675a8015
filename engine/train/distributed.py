"""torch.distributed set-up for runs launched by torchrun (env:// rendezvous)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when WORLD_SIZE > 1
    (NCCL with CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def ranks_agree(module: torch.nn.Module) -> dict:
    """All-gather a per-parameter float64 checksum and compare ranks. (BN running statistics are
    not compared: each rank updates them from its own batch; DDP re-broadcasts rank 0's at each
    forward, rank 0's are the ones checkpointed, and evaluation re-calibrates them.)"""
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
    if not dist.is_initialized():
        return {"ranks": 1, "identical": True, "max_abs_diff": 0.0}
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    return {"ranks": len(gathered), "identical": diff == 0.0, "max_abs_diff": diff}
