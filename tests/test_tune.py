"""engine.tune on CPU with injected timers: the enumerated signatures are exactly those a real run
requests; keys tell apart what runs differently; failures and interruptions; ranks share rank 0's
table; no timing inside training; the CLI and engine.info."""
import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from engine import tune
from engine.elastic import ElasticBatchNorm2d, backend, dispatch, grouped
from engine.supernet import OFAMobileNetV3, SupernetSpec
from engine.train import trainer
from engine.train.config import parse_config
from engine.tune import runner, table as tables
from engine.tune.signatures import Settings, enumerate_signatures

import tune_helpers
from tune_helpers import CALLS, torch_wins

# a tiny space whose max and min nets (always in the sandwich) meet every signature: one kernel
# size, fixed depth, two expand ratios
RUN = ["--resolution", "8", "--batch-size", "128", "--width-mult", "0.5", "--kernel-sizes", "3", "--expand-ratios",
       "3", "4", "--depths", "2", "--epochs", "1", "--teacher-epochs", "0.5", "--warmup-epochs", "0.25",
       "--subnets", "2", "--eval-subnets", "0", "--calib-images", "128", "--no-progress", "--amp", "--channels-last"]
TINY = Settings(SupernetSpec(variant="cifar", width_mult=0.25, kernel_sizes=(3,), expand_ratios=(3, 4), depths=(1,)),
                batch_size=2, resolution=8, amp=None, channels_last=False, sandwich="sequential", subnets=2,
                teacher=True, shrink=True)
@pytest.fixture
def injected(monkeypatch, tmp_path):
    """A cache in tmp_path, in-process timing, CALLS cleared; no table installed afterwards."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tune, "isolate", False)
    CALLS.clear()
    yield tmp_path
    tune.set_timer(None)
    dispatch.install(None)


def test_enumeration_equals_what_a_real_run_requests(injected, monkeypatch):
    """Teacher + shrink + BN calibration + evaluation (engine.train) and a search generation, recorded
    after the table is ready; the tuner timed before step 0 and never after."""
    from engine.data.loader import load_data
    from engine.search.__main__ import load_supernet
    from engine.search.accuracy import MeasuredAccuracy
    from engine.search.heldout import search_images
    from engine.search.evolution import SearchSpace, evolve
    from engine.train.__main__ import main

    tune.set_timer("tune_helpers:torch_wins")
    seen, state = set(), {}
    prepare = tune.prepare_for_training

    def prepared(*args):
        table = prepare(*args)
        state["calls_before_step_0"] = len(CALLS)
        state["recording"] = True
        return table

    monkeypatch.setattr(trainer.tune, "prepare_for_training", prepared)
    out = injected / "run"
    with backend.observe(lambda sig, *_: seen.add(sig) if state.get("recording") else None):
        assert main(RUN + ["--out", str(out)]) == 0
        model, run_cfg = load_supernet(str(out / "checkpoint.pt"))
        model = model.to(memory_format=torch.channels_last)
        data = load_data(run_cfg["dataset"], None, run_cfg["resolution"], run_cfg["seed"])
        cpu = torch.device("cpu")
        images = search_images(data, 128, 256, 64, 64, 0, 0, cpu)
        measured = MeasuredAccuracy(model, images.calib, images.heldout, cpu)
        space = SearchSpace(model.spec, model.n_stages)
        measured(space.smallest())
        measured(space.largest())
        evolve(space, measured, lambda cfg: 0.0, 1.0, population=2, generations=1)
    assert state["calls_before_step_0"] > 0 and len(CALLS) == state["calls_before_step_0"]   # none in steps
    cfg = parse_config(RUN + ["--out", str(injected / "other")])
    want = enumerate_signatures(tune.settings_from_config(cfg, model.spec, cpu))
    assert sorted(seen - set(want)) == [] and sorted(set(want) - seen) == []


def test_batched_sandwich_requests_the_enumerated_grouped_signatures():
    from engine.supernet import arch
    from engine.train.batched import batched_forward

    settings = Settings(**{**TINY.__dict__, "sandwich": "batched"})
    model = OFAMobileNetV3(settings.spec)
    big, small = arch.max_config(model.spec, model.n_stages), arch.min_config(model.spec, model.n_stages)
    seen = set()
    with backend.observe(lambda sig, *_: seen.add(sig)):
        for cfgs in ([big], [big, small]):
            batched_forward(model, torch.randn(2, 3, 8, 8), cfgs).sum().backward()
    want = {t for t, s in enumerate_signatures(settings).items() if s.grad}
    assert seen == want


def test_keys_tell_apart_what_runs_differently():
    seen = []
    bn = ElasticBatchNorm2d(8, act="relu")
    x = torch.randn(2, 8, 4, 4)
    with backend.observe(lambda sig, *_: seen.append(sig)):
        bn(x)                                                                   # plain, grad, NCHW, fp32
        grouped.grouped_batchnorm_act(x, bn.weight, bn.bias, 1, None, 1e-5, "relu")
        with torch.no_grad():
            bn(x)
        bn(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bn(x.bfloat16())
        bn(x.bfloat16())
    assert len(seen) == len(set(seen)) == 6, seen


def test_a_forced_backend_tunes_nothing_and_installs_no_table(injected, monkeypatch):
    """--backend torch|triton|cuda uses no table: no tuning (no child, no timing) before such a run."""
    monkeypatch.setattr(tune, "can_tune", lambda device: True)          # as on a GPU
    tune.set_timer("tune_helpers:torch_wins")
    dispatch.install({"x": "triton"})
    cfg = parse_config(RUN + ["--out", str(injected / "run"), "--backend", "torch"])
    assert tune.prepare_for_training(cfg, OFAMobileNetV3(TINY.spec), torch.device("cpu")) is None
    assert CALLS == [] and dispatch.installed() is None


def test_a_winner_must_beat_the_reference_by_the_margin():
    assert tune.choose_entry({"torch": 1.0, "triton": 0.98}) == "torch"            # 2 % faster: not enough
    assert tune.choose_entry({"torch": 1.0, "triton": 0.96, "cuda": 0.9}) == "cuda"
    assert tune.choose_entry({"triton": 0.1}) == "torch"                           # no reference time: keep it


def test_every_op_family_builds_runs_and_offers_its_kernels():
    """One signature per op family (sequential and batched): the layer requests it, the reference and
    the Triton kernel (interpreted on CPU) run forward and backward."""
    cpu = torch.device("cpu")
    sigs = {**enumerate_signatures(TINY), **enumerate_signatures(Settings(**{**TINY.__dict__, "sandwich": "batched"}))}
    first = {}
    for s in sigs.values():
        if s.grad:
            first.setdefault(s.op, s)
    assert len(first) == 7
    for sig in first.values():
        impls, grad_inputs = runner.candidates(sig, cpu, kernels_here=True)
        assert "torch" in impls and ("triton" in impls) == (os.environ.get("TRITON_INTERPRET") == "1"), sig.text
        for fn in impls.values():
            runner.forward_backward(sig, cpu, fn, grad_inputs)()


def test_a_failing_candidate_is_left_out_and_named(injected):
    tune.set_timer("tune_helpers:triton_fails")
    out = injected / "t.json"
    table = tune.tune([TINY], torch.device("cpu"), out, progress=False)
    entries = json.loads(out.read_text())["entries"]
    assert entries and all(e["choice"] == "torch" and "triton" not in e["ms"] for e in entries.values())
    assert any("triton failed (RuntimeError: kernel exploded)" in n for n in table.notes)


def test_an_interrupted_tune_continues_where_it_stopped(injected):
    tune.set_timer("tune_helpers:torch_wins")
    out = injected / "t.json"
    sigs = list(enumerate_signatures(TINY).values())
    journal = runner.Journal(out.with_name(out.name + ".partial"))
    runner.measure_family(sigs[:5], torch.device("cpu"), torch_wins, journal, True)      # then "killed"
    before = len(CALLS)
    tune.tune([TINY], torch.device("cpu"), out, progress=False)
    assert before > 0 and not journal.path.exists()
    assert len(CALLS) - before == 2 * (len(sigs) - 5) < 2 * len(sigs)           # the first five not again


def test_a_dying_child_names_the_candidate_and_the_rest_is_tuned(injected, monkeypatch):
    sigs = [s for s in enumerate_signatures(TINY).values() if s.op == "depthwise_conv" and s.grad][:2]
    monkeypatch.setenv("KILL_MARKER", str(injected / "died"))
    journal = runner.Journal(injected / "j.partial")
    runner.measure_isolated(sigs, torch.device("cpu"), "tune_helpers:triton_dies_once", journal, True, lambda: None)
    ms, errors, done = journal.state()
    assert done == {s.text for s in sigs}
    assert "died" in errors[sigs[0].text]["triton"] and set(ms[sigs[1].text]) == {"torch", "triton"}


@pytest.mark.parametrize("content", ["{not json", "device", "versions"])
def test_a_corrupt_or_foreign_table_is_one_warning_and_the_reference(injected, caplog, content):
    path = injected / "t.json"
    foreign = tables.Table("NVIDIA H200" if content == "device" else "cpu",
                           {**tables.versions(), "torch": "0"}, entries={"x": {"choice": "triton", "ms": {}}})
    path.write_text(content if content.startswith("{") else json.dumps(foreign.to_json()))
    cfg = SimpleNamespace(tune=str(path), backend="auto")
    with caplog.at_level(logging.WARNING, logger="engine.tune"):
        assert tune.prepare_for_training(cfg, None, torch.device("cpu")) is None
    assert len(caplog.records) == 1 and "reference" in caplog.text and dispatch.installed() is None
    with pytest.raises(ValueError, match="--tune .*no such dispatch table file"):         # before any data is read
        parse_config(["--tune", str(injected / "missing.json")])
    with pytest.raises(ValueError, match="not a readable file"):
        tune.prepare_for_training(SimpleNamespace(tune=str(injected / "missing.json"), backend="auto"), None,
                                  torch.device("cpu"))


def test_cli_on_cpu_writes_a_reference_table_and_info_reads_it(injected, capsys):
    from engine import info
    from engine.tune.__main__ import main

    out = injected / "tune.json"
    assert main(["--dataset", "imagenet", "--batch-size", "128", "--resolution", "224", "--amp", "--channels-last",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and len(data["entries"]) > 300
    assert {e["choice"] for e in data["entries"].values()} == {"torch"} and data["settings"][0]["amp"] == "bfloat16"
    assert main(["--dataset", "imagenet", "--batch-size", "0", "--out", str(out)]) == 2
    assert main(["--out", str(injected)]) == 2                                          # a folder
    entries = {"a": {"choice": "triton", "ms": {"torch": 2.0, "triton": 1.0}}, "b": {"choice": "torch", "ms": {}}}
    tables.write(tables.Table("cpu", tables.versions(), entries=entries), out)
    text = info.report(out)
    assert "torch 1, triton 1" in text and "chosen 1.000 vs all-reference 2.000" in text


def test_two_ranks_with_different_timers_use_rank_0s_table(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    args = (f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "cache"), str(tmp_path / "choices"))
    procs = [ctx.Process(target=tune_helpers.tune_on_rank, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    first, second = (json.loads((tmp_path / f"choices{r}").read_text()) for r in range(2))
    assert first == second and "triton" in first.values()
    assert not (tmp_path / "cache1").exists()                                   # rank 1 never tuned


def test_two_tunes_into_one_folder_take_turns(injected):
    import fcntl
    import threading

    folder = injected / "cache"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)                                      # another tune holds the folder
    other = threading.Thread(target=tune.tune, args=([TINY], torch.device("cpu"), folder / "t.json", False))
    other.start()
    other.join(1.0)
    assert other.is_alive() and not (folder / "t.json").exists()
    os.close(fd)
    other.join(60)
    assert (folder / "t.json").exists()
