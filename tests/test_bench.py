"""The benchmarks run end to end on a CPU (smoke: timings are labelled CPU and never asserted)."""
import json

import pytest

from bench import grouped, layers, run_throughput
from bench.gpu_suite import ROOT


def test_throughput_smoke(tmp_path, capsys):
    assert run_throughput.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--nets", "cifar",
                                "--batch", "4", "--subnets", "3", "--no-op-counts", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CPU (not comparable with GPU figures)" in out
    assert "cifar shrink ours: warm-up" in out                     # progress lines as it goes
    payload = json.loads((tmp_path / "throughput.json").read_text())
    assert {"device", "torch", "triton", "date", "command"} <= set(payload["env"])
    phases = {r["phase"]: r for r in payload["rows"]}
    assert set(phases) == {"teacher", "shrink"} and phases["shrink"]["subnets"] == 3
    for row in payload["rows"]:
        for variant in run_throughput.CPU_VARIANTS:
            assert row[variant]["images_per_s"] > 0
        assert row["ofa_cl"]["speedup_vs_ofa"] == 1.0                # the only OFA variant run on CPU
    assert payload["projected_hours"]["cifar10"]["ours"] > 0


def test_throughput_budget_skips_and_reports(tmp_path):
    """--max-seconds: what would start after the budget is spent is reported as skipped, not run."""
    assert run_throughput.main(["--device", "cpu", "--steps", "50", "--warmup", "0", "--nets", "cifar",
                                "--batch", "2", "--subnets", "2", "--variants", "ofa_cl", "ours",
                                "--max-seconds", "0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert "ms_per_step" in rows[0]["ofa_cl"]                      # started within the budget, stopped early
    assert rows[-1]["ours"] == {"skipped": "--max-seconds budget spent"}


def test_ofa_reference_matches_the_engine():
    """The benchmarks' `ofa` variant computes the same function as the supernet, for random configs."""
    import torch

    from bench.ofa_reference import ofa_forward
    from engine.supernet import ofa_mobilenetv3

    model = ofa_mobilenetv3("imagenet", num_classes=10, dropout=0.0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "transforms"):
                for p in m.transforms.values():
                    p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.sample_active_subnet(g)
        x = torch.randn(2, 3, 64, 64)       # 2x2 at the last stage: BN over 8 values is well conditioned
        torch.testing.assert_close(ofa_forward(model, x), model(x))


def test_layers_smoke(capsys):
    assert layers.main(["--device", "cpu", "--batch", "1", "--no-save"]) == 0
    assert "dw_k7_s1_96ch_56px" in capsys.readouterr().out


def test_grouped_smoke(capsys):
    assert grouped.main(["--device", "cpu", "--batch", "1", "--no-save"]) == 0
    assert "dw_k7533_672ch_14px" in capsys.readouterr().out


def test_loader_throughput_smoke(capsys):
    import pytest

    pytest.importorskip("nvidia.dali")
    from bench import loader_throughput

    assert loader_throughput.main(["--images", "16", "--batch", "8", "--epochs", "1", "--workers", "1",
                                   "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "imagefolder_224px" in out and "arrays_32px" in out


@pytest.mark.cpu_only
def test_gpu_suite_cpu_smoke(tmp_path):
    """The GPU suite's CPU path: every step runs or is skipped with a reason, at most 8 files, labelled CPU."""
    import time

    from bench import gpu_suite

    started = time.time()
    gpu_suite.main(["--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 9 and {"suite.json", "suite.log", "throughput.json", "layers.json", "grouped.json",
                                "tests.json"} <= set(files)
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["label"].startswith("CPU smoke")
    assert {"device", "torch", "triton", "date", "command"} <= set(suite["env"])
    assert set(suite["steps"]) >= {"env", "build", "tune", "tests", "throughput", "layers", "cuda_ext", "grouped"}
    for name, step in suite["steps"].items():
        assert step["status"] == "ok" or step["status"].startswith("skipped"), (name, step)
    assert any(line.startswith("throughput cifar shrink") for line in suite["results"])
    # what a GPU run meets first also ran here: collection, one GPU-tier test and its JUnit report, the build
    assert suite["steps"]["tests"]["summary"] == "1 passed, 0 failed, 0 skipped"
    assert json.loads((tmp_path / "tests.json").read_text())["tests"]["passed"] == 1
    assert "ENGINE_NO_CUDA=1" in suite["steps"]["build"]["status"]
    assert not [p for p in ROOT.glob("engine/*.so") if p.stat().st_mtime > started]   # nothing built into the tree
