import os

import pytest
import torch

# Triton kernels run on the CPU in the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    from engine.elastic import backend

    torch.manual_seed(0)
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
