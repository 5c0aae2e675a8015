"""Data sharding across ranks (both loaders) and errors shared by every rank, without torchrun."""
import json

import numpy as np
import pytest
import torch.multiprocessing as mp

from engine.data import sharding
from engine.data.datasets import ArrayDataset, SeededDataset
from engine.data.loader import Data, train_loader

N, BATCH = 23, 3                                     # 23 is split unevenly by 2 and by 3 ranks


def _torchvision_batches(world: int, epoch: int) -> list[list[list[int]]]:
    """Per rank, the index batches the torchvision loader reads in `epoch`."""
    images = np.zeros((N, 4, 4, 3), np.uint8)
    train = SeededDataset(ArrayDataset(images, np.arange(N) % 2, ["a", "b"]), lambda x: x)
    data = Data(train, train, 2, "digits", 4)
    return [list(train_loader(data, BATCH, epoch, seed=7, rank=r, world=world).batch_sampler) for r in range(world)]


def _check_exactly_once(per_rank: list[list[list[int]]], world: int) -> list[int]:
    steps = sharding.steps_per_epoch(N, BATCH, world)
    assert all(len(batches) == steps for batches in per_rank)             # same step count on every rank
    assert all(len(b) == BATCH for batches in per_rank for b in batches)
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == steps * world * BATCH            # no sample twice
    assert 0 <= N - len(seen) < world * BATCH                              # only the drop-last remainder
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
def test_torchvision_loader_reads_each_sample_once_per_epoch(world):
    epochs = [_check_exactly_once(_torchvision_batches(world, e), world) for e in range(2)]
    assert epochs[0] != epochs[1]                                          # reshuffled each epoch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dali_reads_the_same_samples_as_torchvision(world):
    pytest.importorskip("nvidia.dali")
    from engine.data.dali import DaliLoader

    images = np.random.default_rng(0).integers(0, 255, (N, 8, 8, 3), dtype=np.uint8)
    data = ArrayDataset(images, np.arange(N) % 2, ["a", "b"])
    loaders = [DaliLoader(data, BATCH, True, "cifar", 8, seed=7, rank=r, world=world, with_index=True)
               for r in range(world)]
    assert all(len(loader) == sharding.steps_per_epoch(N, BATCH, world) for loader in loaders)
    for epoch in range(2):
        dali = [[idx.tolist() for _, _, idx in loader] for loader in loaders]
        _check_exactly_once(dali, world)
        assert dali == _torchvision_batches(world, epoch)
    resumed = DaliLoader(data, BATCH, True, "cifar", 8, seed=7, rank=world - 1, world=world, with_index=True,
                         start_epoch=1, skip_batches=1)                    # exact mid-epoch resume
    assert [idx.tolist() for _, _, idx in resumed] == _torchvision_batches(world, 1)[world - 1][1:]


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    from torch.distributed.elastic.utils.distributed import get_free_port

    from rank_errors import fail_on_rank1

    # spawn (not fork: a process forked after other tests started threads can deadlock)
    mp.start_processes(fail_on_rank1, args=(get_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    # together: rank 1's error on both ranks; from_rank0: rank 0's result (rank 1 never runs the work)
    assert results[0] == results[1] == ["disk full on rank 1", 0]
