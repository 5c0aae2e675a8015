import os
import shutil
import tempfile

import pytest
import torch

# With a GPU the Triton kernels run on it; without one they run on the CPU in Triton's interpreter.
# The choice must be made before triton is imported (torch.cuda.is_available() does not import it).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# Tests never read or write the user's caches (~/.cache/engine: the dispatch table, inductor's code):
# one temporary folder per test session, set before the engine is imported, removed at the end.
_CACHE = tempfile.mkdtemp(prefix="engine-test-cache-")
os.environ["ENGINE_CACHE_DIR"] = _CACHE
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE, "inductor")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: a CPU smoke test that a GPU host would run at full size "
                                       "(skipped, and reported as skipped, with a GPU)")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    from engine.elastic import backend

    torch.manual_seed(0)
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    needs_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    cpu_only = pytest.mark.skip(reason="CPU-only smoke test: on a GPU it would run the full-size work")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.gpu_tier)       # every GPU-only test is in the GPU suite's tier
            if not gpu:
                item.add_marker(needs_gpu)
        if "cpu_only" in item.keywords and gpu:
            item.add_marker(cpu_only)
