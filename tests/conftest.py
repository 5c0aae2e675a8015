import os

import pytest
import torch

# With a GPU the Triton kernels run on it; without one they run on the CPU in Triton's interpreter.
# The choice must be made before triton is imported (torch.cuda.is_available() does not import it).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    from engine.elastic import backend

    torch.manual_seed(0)
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.gpu_tier)       # every GPU-only test is in the GPU suite's tier
            if not torch.cuda.is_available():
                item.add_marker(skip)
