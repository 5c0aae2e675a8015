"""engine.search: FLOPs table, evolution, predictor, export, the CLI end to end on a small digits run."""
import json
import logging
import random

import pytest
import torch

from engine.search.__main__ import main
from engine.search.accuracy import RidgePredictor, features, fit_report
from engine.search.costs import FlopTable
from engine.search.evolution import SearchSpace, evolve
from engine.search.export import load_subnet
from engine.supernet import arch, ofa_mobilenetv3
from engine.train.__main__ import main as train_main

SMALL = ["--population", "6", "--generations", "3", "--calib-images", "64", "--eval-images", "128",
         "--compare-random", "6", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits supernet trained for one epoch at 8 px (the shapes of the default run, small)."""
    out = tmp_path_factory.mktemp("digits")
    assert train_main(["--resolution", "8", "--batch-size", "128", "--kernel-sizes", "3", "5", "--expand-ratios",
                       "3", "4", "--depths", "2", "3", "--epochs", "2", "--teacher-epochs", "1",
                       "--warmup-epochs", "0.5", "--subnets", "3", "--max-steps", "11", "--no-progress",
                       "--out", str(out)]) == 0
    return out


def _halfway(run) -> float:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    from engine.supernet import SupernetSpec
    from engine.supernet.mobilenetv3 import OFAMobileNetV3

    model = OFAMobileNetV3(SupernetSpec(**state["arch"]))
    table = FlopTable(model, state["config"]["resolution"])
    space = SearchSpace(model.spec, model.n_stages)
    return (table(space.smallest()) + table(space.largest())) / 2e6


@pytest.mark.parametrize("variant,res", [("cifar", 16), ("imagenet", 64)])
def test_flop_table_equals_the_flop_counter(variant, res):
    model = ofa_mobilenetv3(variant, num_classes=10)
    table = FlopTable(model, res)
    g = torch.Generator().manual_seed(0)
    for cfg in [arch.min_config(model.spec, model.n_stages), arch.max_config(model.spec, model.n_stages)] + \
            [arch.random_config(model.spec, model.n_stages, g) for _ in range(4)]:
        model.set_active_subnet(cfg)
        assert table(cfg) == model.flops(res)


def test_evolution_is_seeded_and_respects_the_budget():
    model = ofa_mobilenetv3("cifar", num_classes=10)
    table = FlopTable(model, 16)
    space = SearchSpace(model.spec, model.n_stages)
    budget = (table(space.smallest()) + table(space.largest())) / 2
    fitness = lambda cfg: sum(cfg["ks"]) + 2 * sum(cfg["d"])          # noqa: E731 - rewards larger subnets
    results = [evolve(space, fitness, table, budget, 8, 5, seed=3) for _ in range(2)]
    assert results[0].best == results[1].best and results[0].history == results[1].history
    assert all(table(m) <= budget for m in results[0].members)
    assert [h["best_fitness"] for h in results[0].history] == sorted(h["best_fitness"] for h in results[0].history)
    assert evolve(space, fitness, table, budget, 8, 5, seed=4).members != results[0].members


def test_predictor_fits_a_linear_truth():
    model = ofa_mobilenetv3("cifar", num_classes=10)
    space = SearchSpace(model.spec, model.n_stages)
    encode = lambda c: features(c, model.spec.kernel_sizes, model.spec.expand_ratios, model.spec.depths)  # noqa: E731
    rng = random.Random(0)
    cfgs = [space.random(rng) for _ in range(200)]
    truth = torch.randn(len(encode(cfgs[0])), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    accs = [float(torch.tensor(encode(c), dtype=torch.float64) @ truth) for c in cfgs]
    report = fit_report(RidgePredictor(encode, alpha=1e-6), cfgs, accs)
    assert report["rmse_top1"] < 1e-3 and report["kendall_tau"] > 0.99


def test_search_end_to_end_exports_and_compares_with_random_subnets(run):
    budget = _halfway(run)
    out = run / "search"
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--max-mflops", f"{budget:.4f}", "--out", str(out),
                 *SMALL]) == 0
    summary = json.loads((out / "search.json").read_text())
    chosen = summary["chosen"]
    assert chosen["cost"] <= budget
    base = summary["random_baseline"]
    # one epoch at 8 px: accuracies are noisy, so the test holds the search to the random subnets'
    # mean; the target (>= the best of 50 random subnets) is measured on the default run (README)
    print(f"searched subnet top-1 {chosen['top1']:.2f}% vs {base['subnets']} random subnets within "
          f"{budget:.2f} MFLOPs: best {base['best_top1']:.2f}%, mean {base['mean_top1']:.2f}%")
    assert chosen["top1"] >= base["mean_top1"]
    for name in ("front.csv", "front.png", "chosen.json", "subnet.pt", "subnet.pt2", "subnet.onnx"):
        assert (out / name).is_file(), name
    export = summary["export"]
    for artifact in ("state_dict", "torch_export", "onnx"):
        assert export[artifact]["max_abs_diff"] <= 1e-4, artifact
    rows = (out / "front.csv").read_text().splitlines()[1:]
    assert all(float(r.split(",")[2]) <= budget for r in rows if r.startswith(("searched", "random")))
    net = load_subnet(out / "subnet.pt")
    program = torch.export.load(out / "subnet.pt2").module()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(program(x), net(x))                    # a batch size it was not exported with
    assert json.loads((out / "chosen.json").read_text())["config"] == chosen["config"]


def test_search_is_deterministic_with_the_predictor(run):
    budget = _halfway(run)
    chosen = []
    for i in range(2):
        out = run / f"pred{i}"
        assert main(["--checkpoint", str(run / "checkpoint.pt"), "--max-mflops", f"{budget:.4f}", "--out", str(out),
                     "--predictor", "--predictor-samples", "10", *SMALL, "--compare-random", "0"]) == 0
        summary = json.loads((out / "search.json").read_text())
        assert {"rmse_top1", "kendall_tau"} <= set(summary["predictor"])
        chosen.append(summary["chosen"])
    assert chosen[0] == chosen[1]


@pytest.mark.parametrize("what", ["below", "above", "arch", "data", "settings"])
def test_bad_input_is_a_one_line_error_before_any_work(run, tmp_path, caplog, what):
    ckpt = run / "checkpoint.pt"
    budget = {"below": "0.001", "above": "1e6"}.get(what, "5")
    argv = ["--checkpoint", str(ckpt), "--max-mflops", budget, "--out", str(tmp_path / "out"), *SMALL]
    if what in ("arch", "data"):                     # a valid checkpoint file of another net, or data moved away
        from engine.train.checkpoint import read, save_atomic

        state = read(ckpt)
        if what == "arch":
            state["model"] = {"weight": torch.zeros(3)}
        else:
            state["config"] = {**state["config"], "dataset": "cifar10", "data": str(tmp_path / "moved")}
        save_atomic(state, tmp_path / "other.pt")
        argv[1] = str(tmp_path / "other.pt")
    if what == "settings":
        argv += ["--population", "1"]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    message = {"below": "below the min net", "above": "above the max net", "arch": "not an OFA-MobileNetV3",
               "data": "moved holds no CIFAR", "settings": "--population 1"}[what]
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_latency_budget(run):
    """--max-latency-ms: latencies of the exported subnets timed on the CPU, cached per config."""
    from engine.search.costs import LatencyMeter
    from engine.supernet import SupernetSpec
    from engine.supernet.mobilenetv3 import OFAMobileNetV3

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model = OFAMobileNetV3(SupernetSpec(**state["arch"]))
    meter = LatencyMeter(model, 8, torch.device("cpu"))
    space = SearchSpace(model.spec, model.n_stages)
    low, high = meter(space.smallest()), meter(space.largest())
    assert 0 < low < high and meter(space.smallest()) == low                  # cached
    out = run / "latency"
    assert main(["--checkpoint", str(run / "checkpoint.pt"), "--max-latency-ms", f"{(low + high) / 2:.4f}",
                 "--out", str(out), *SMALL, "--population", "4", "--generations", "2", "--compare-random", "2"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["unit"].startswith("ms (cpu, batch 1)") and summary["chosen"]["cost"] <= summary["budget"]
