"""The search's device handling on a faked CUDA device (FakeTensorMode, no GPU needed): its cost tables,
its accuracy set-up (held-out, calibration and val streams, BN re-calibration) and the export's CPU copy
make every tensor on the model's device. Before the fix, FlopTable probed a CUDA model with CPU tensors."""
import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.data.loader import load_data
from engine.elastic.backend import use_backend
from engine.search.accuracy import MeasuredAccuracy
from engine.search.costs import FlopTable, LatencyTable
from engine.search.evolution import SearchSpace
from engine.search.export import cpu_subnet
from engine.search.heldout import search_images
from engine.supernet import ofa_mobilenetv3


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode in which module.to("cuda") works (parameters replaced, not swapped in place), on the
    reference backend: "auto" asks the CUDA runtime about stream capture (engine/elastic/dispatch.py),
    which a machine without a GPU cannot answer; the search's own device handling is what is tested."""
    swap, overwrite = torch.__future__.get_swap_module_params_on_conversion(), \
        torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(False)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with use_backend("torch"), FakeTensorMode(allow_non_fake_inputs=True):
            yield torch.device("cuda:0")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


@pytest.fixture
def tiny():
    return ofa_mobilenetv3("cifar", num_classes=10, kernel_sizes=(3, 5), expand_ratios=(3, 4), depths=(2, 3))


def test_cost_tables_run_on_the_models_device(tiny):
    want = FlopTable(tiny, 8)
    space = SearchSpace(tiny.spec, tiny.n_stages)
    with fake_cuda() as cuda:
        model = tiny.to(cuda, memory_format=torch.channels_last)
        table = FlopTable(model, 8)                       # crashed here before the fix (CPU probe, CUDA model)
    assert table(space.smallest()) == want(space.smallest()) and table(space.largest()) == want(space.largest())
    rows = [[[k, e, 1.0] for k in (3, 5) for e in (3, 4)] for _ in want.blocks]
    spec = tiny.spec.to_dict()
    lut = LatencyTable({"spec": spec, "resolution": 8, "blocks": rows, "fixed_ms": 2.0}, spec, 8, tiny.spec.max_depth)
    assert lut(space.smallest()) == 2.0 + sum(space.smallest()["d"])


def test_accuracy_setup_and_export_copy_on_the_models_device(tiny):
    data = load_data("digits", None, 8, 0)
    cfg = SearchSpace(tiny.spec, tiny.n_stages).smallest()
    images = search_images(data, 16, 8, 8, 8, 0, 0, torch.device("cuda:0"))
    for stream in (images.heldout, images.calib, images.val):
        stream.loader = list(stream.loader)               # decoded before: a DataLoader seeds with a real .item()
    with fake_cuda() as cuda:
        model = tiny.to(cuda, memory_format=torch.channels_last)
        measured = MeasuredAccuracy(model, images.calib, images.heldout, cuda)
        batch, labels = next(iter(images.heldout))
        assert batch.device == labels.device == cuda and next(iter(images.val))[0].device == cuda
        with measured.calibrated(cfg) as net:             # BN re-calibrated on the calibration stream
            logits = net(batch)
            assert logits.device == cuda and logits.shape == (8, 10)
            sub, cpu_images, want = cpu_subnet(net, cfg, batch)
    assert cpu_images.device.type == "cpu" and want.shape == (8, 10) and not any(p.is_cuda for p in sub.parameters())
