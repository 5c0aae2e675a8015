"""Host work of a sandwich step (issue: a sync-free, lean default path): the ops a 4-subnet step sends to
the dispatcher and the host syncs it makes, counted on the CPU (bench/op_counts.py)."""
import pytest

from bench.op_counts import ANCHORS, step_counts


@pytest.mark.parametrize("path,bound", [("reference", ANCHORS["public_ofa_code"]),
                                        ("fast", ANCHORS["exported_static_subnets"])])
def test_dispatched_ops_per_step_within_the_anchors(path, bound):
    """reference path <= the public OFA code's count; the GPU fast path (fake tensors through the
    kernels' fake implementations) <= the same configs run as exported static subnets."""
    counts = step_counts(path)
    assert counts["ops"] <= bound, counts["by_op"].most_common(12)


@pytest.mark.parametrize("path,step", [("reference", "sequential"), ("fast", "sequential"),
                                       ("reference", "batched"), ("fast", "batched")])
def test_a_step_makes_no_host_sync(path, step):
    """No .item(), .cpu(), .tolist() or .nonzero() inside a step: losses stay on the device."""
    assert step_counts(path, step)["syncs"] == 0
