"""Which samples each rank trains on: one rule for the torchvision and the DALI loaders.

Epoch e is a permutation of the training set drawn from (seed, e), the same on every rank. It is cut
into steps of world x batch_size samples (steps = n // (world x batch_size)); rank r takes the r-th
batch of each step. So every rank runs the same number of full batches, no sample is seen twice in an
epoch, and the fewer than world x batch_size samples left over (drop-last) change from epoch to epoch.
The order depends on the world size: a run resumes on as many processes as it started with.
"""
from __future__ import annotations

import numpy as np


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one epoch of `n` training samples."""
    return n // (world * batch_size)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Rank `rank`'s batches of epoch `epoch`: steps_per_epoch lists of `batch_size` sample indices."""
    steps = steps_per_epoch(n, batch_size, world)
    order = np.random.default_rng((seed, epoch)).permutation(n)[:steps * world * batch_size]
    return order.reshape(steps, world, batch_size)[:, rank].tolist()


def eval_shard(n: int, rank: int = 0, world: int = 1) -> list[int]:
    """Rank `rank`'s evaluation samples, in order (rank, rank + world, ...): every sample once overall."""
    return list(range(rank, n, world))
