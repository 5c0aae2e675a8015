"""The benchmarks run end to end on a CPU (smoke: timings are labelled CPU and never asserted)."""
import json

from bench import grouped, layers, run_throughput


def test_throughput_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bench.common.RESULTS", tmp_path)
    assert run_throughput.main(["--device", "cpu", "--steps", "1", "--warmup", "0", "--nets", "cifar",
                                "--batch", "4", "--subnets", "3"]) == 0
    out = capsys.readouterr().out
    assert "CPU (not comparable with GPU figures)" in out
    (path,) = tmp_path.glob("throughput-cpu-*.json")
    payload = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "command"} <= set(payload["env"])
    phases = {r["phase"]: r for r in payload["rows"]}
    assert set(phases) == {"teacher", "shrink"} and phases["shrink"]["subnets"] == 3
    for row in payload["rows"]:
        for variant in ("reference", "ours", "batched"):
            assert row[variant]["images_per_s"] > 0
    assert payload["projected_hours"]["cifar10"]["ours"] > 0


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
