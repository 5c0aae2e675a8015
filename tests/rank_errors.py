"""A worker for test_distributed, in a module of its own so that spawned processes import little."""
import json
import os

import torch.distributed as dist

from engine.train import distributed


def fail_on_rank1(rank: int, port: int, out: str) -> None:
    """Runs `together` and `from_rank0` over work that fails on rank 1; writes what each returned or raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    distributed.init_distributed()

    def work() -> int:
        if rank == 1:
            raise ValueError("disk full on rank 1")
        return rank

    outcome = []
    for fn in (distributed.together, distributed.from_rank0):
        try:
            outcome.append(fn(work))
        except ValueError as err:
            outcome.append(str(err))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()
