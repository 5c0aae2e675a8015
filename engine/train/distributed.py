"""torch.distributed for runs launched by torchrun (env:// rendezvous, one or more nodes).

Every rank must agree on what shapes a step and must fail together: `from_rank0` runs one piece of work
(listing and checking the data) on rank 0 and gives all ranks its result or its error, and `together`
runs a piece each rank does (writing a checkpoint) and raises the same error on every rank when any
rank's part failed, so no rank is left waiting in a collective for one that has already given up.
"""
from __future__ import annotations

import datetime
import os
import signal
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# a collective that waits longer than this ends the run with an error instead of hanging
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("ENGINE_DIST_TIMEOUT_MIN", "30")))


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


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
        store, rank, world = next(dist.rendezvous("env://", timeout=TIMEOUT))
        # torchrun keeps its store across restarts: a restarted job's ranks must not read the previous
        # attempt's addresses (they would try to connect to the dead processes)
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank,
                                world_size=world, timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _raise_first(errors: list) -> None:
    """Re-raise the first rank's error (type, message) on this rank."""
    for failed in errors:
        if failed is not None:
            kind, message = failed
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - an error type that takes other arguments
                error = RuntimeError(message)
            raise error


def from_rank0(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only; every rank returns its result, or raises its error (same type and message)."""
    if not _active():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every rank, then raised there
            error = (type(err), str(err))
    box = [result, error]
    dist.broadcast_object_list(box, src=0)
    _raise_first([box[1]])
    return box[0]


def together(fn: Callable[[], T]) -> T:
    """fn() run on every rank; when it fails on any rank, every rank raises that rank's error (the
    lowest failing rank's type and message)."""
    if not _active():
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - shared with every rank, then raised there
        error = (type(err), str(err))
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    _raise_first(errors)
    return result


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on any rank (one tiny all-reduce on `device`): decisions such as "stop" (a signal
    that reached the ranks at different steps) or "checkpoint now" (by the clock) taken at the same
    step on every rank."""
    if not _active():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def kill_for_test(rank: int, step: int) -> None:
    """Test hook: ENGINE_TEST_KILL="RANK:STEP" SIGKILLs that rank after that step, in a torchrun job's
    first attempt only (TORCHELASTIC_RESTART_COUNT 0), as a failing node would die."""
    if os.environ.get("ENGINE_TEST_KILL") == f"{rank}:{step}" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


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
