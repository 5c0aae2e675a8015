"""The one command to run when a GPU is available: verify the engine and measure it, in at most 8 minutes.

  python -m bench.gpu_suite --out bench/results/<device>-<date>     # then commit that folder

On an H100/H200 it takes at most 8 minutes wall from cold (empty Triton and inductor caches, CUDA
extension not built). Steps, each in its own subprocess under its own time budget (a step that ends
early passes its spare time on; one that overruns is killed, reported, and costs nothing after it):
  env         `python -m engine.info`, nvidia-smi, versions
  build       the CUDA extension (`setup.py build_ext` into a temporary folder), in the background from the start
  op_counts   bench/op_counts.py (host work and modelled HBM traffic: fake tensors, CPU only), in the
              background from the start; its figures go into suite.json
  tune        `python -m engine.tune ... --out <out>/tune.json` FIRST (the production dispatch table;
              "skipped: engine.tune not available" where this checkout has no tuner)
  tests       the GPU tier of the tests (`pytest -m gpu_tier`, TRITON_INTERPRET=0), <= 3 minutes
  throughput  bench/run_throughput.py: both nets, teacher and shrink, every variant, the engine's variants
              on the tune step's table
  layers      bench/layers.py (with the `cuda` variant when the build has finished)
  cuda_ext    tests/test_cuda_ext.py, once the build has finished
  grouped     bench/grouped.py
  loader      bench/loader_throughput.py, when nvidia-dali imports
It writes at most 8 files into --out: suite.json (device, versions, date, command, each step's status,
seconds and summary, the final table, the host-work and modelled-traffic figures), suite.log (everything
the steps printed), tests.json, throughput.json, layers.json, grouped.json, loader.json and tune.json (the
dispatch table every later step runs with). Nothing is written
into the source tree: without an install, `engine.kernels` (the top-level kernels/ folder) and the
freshly built `engine._C` are mapped by an import hook (a sitecustomize.py in a temporary folder on the
steps' PYTHONPATH); bytecode goes to that folder too.
The same command on a machine without a GPU is a CPU smoke test (reference paths, tiny sizes), labelled
CPU; CI runs it. It still runs what a GPU run would meet first: test collection and one test of the GPU
tier with its JUnit report parsed, and the build plumbing (with ENGINE_NO_CUDA=1: nothing compiled).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import environment, progress, write_json  # noqa: E402

# (step, nominal budget in seconds on a GPU); the order they run in. The build runs beside them.
GPU_STEPS = (("env", 10), ("tune", 90), ("tests", 140), ("throughput", 120), ("layers", 40), ("cuda_ext", 20),
             ("grouped", 20), ("loader", 25))
TOTAL_SECONDS = 455          # the 8 minutes, less start-up and the final table
STARTUP_SECONDS = 12         # a subprocess's Python, torch and triton imports before it measures anything


_SITECUSTOMIZE = """import importlib.abc, importlib.machinery, importlib.util, os, sys
_MAP = {{"engine.kernels": {kernels!r}}}
_LIB = {lib!r}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in _MAP and not any(os.path.isdir(os.path.join(p, "kernels")) for p in path or []):
            folder = _MAP[name]
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])
        if name == "engine._C" and os.path.isdir(os.path.join(_LIB, "engine")):
            return importlib.machinery.PathFinder.find_spec("_C", [os.path.join(_LIB, "engine")])
        return None


sys.meta_path.insert(0, _Finder())
"""


def import_shim(folder: Path) -> dict:
    """Environment variables that make `engine.kernels` (the top-level kernels/ folder, when this tree
    is not installed) and an `engine._C` built into folder/lib importable without writing into the
    source tree: a sitecustomize.py in `folder` on PYTHONPATH; bytecode goes under `folder` too."""
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(kernels=str(ROOT / "kernels"),
                                                                   lib=str(folder / "lib")))
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "PYTHONPYCACHEPREFIX": str(folder / "pycache")}


class Suite:
    def __init__(self, out: Path, gpu: bool, total: float, scratch: Path) -> None:
        self.out, self.gpu, self.scratch = out, gpu, scratch
        self.deadline = time.monotonic() + total
        self.log = open(out / "suite.log", "w")
        self.steps: dict[str, dict] = {}
        self.tests: dict[str, dict] = {}              # pytest reports per test step (tests.json)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", ENGINE_CACHE_DIR=str(scratch / "cache"),
                        **import_shim(scratch))
        if gpu:
            self.env["TRITON_INTERPRET"] = "0"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def budget(self, name: str) -> float:
        """This step's seconds: what is left, less the nominal budgets of the steps after it."""
        later = [b for s, b in GPU_STEPS[[s for s, _ in GPU_STEPS].index(name) + 1:]]
        return max(5.0, self.deadline - time.monotonic() - sum(later))

    def run(self, name: str, cmd: list[str], budget: float, env: dict | None = None) -> dict:
        """Run `cmd` in the repo root under `budget` seconds (extra `env` variables); its output goes to
        suite.log."""
        progress(f"{name}: {' '.join(cmd[1:])} (budget {budget:.0f} s)")
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=self.log,
                                  stderr=subprocess.STDOUT, timeout=budget)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {budget:.0f} s"
        step = {"status": status, "seconds": round(time.monotonic() - t0, 1), "command": " ".join(cmd[1:])}
        self.steps[name] = step
        progress(f"{name}: {status} in {step['seconds']} s")
        return step

    def skip(self, name: str, why: str) -> None:
        self.steps[name] = {"status": f"skipped: {why}", "seconds": 0.0}
        progress(f"{name}: skipped ({why})")


def _environment(suite: Suite) -> dict:
    info = subprocess.run([sys.executable, "-m", "engine.info"], cwd=ROOT, env=suite.env, capture_output=True,
                          text=True, timeout=60)
    env = environment(torch.device("cuda" if suite.gpu else "cpu"))
    env["engine_info"] = (info.stdout + info.stderr).strip().splitlines()
    if suite.gpu and shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip()
    suite.steps["env"] = {"status": "ok", "seconds": 0.0, "summary": f"{env['device']}, torch {env['torch']}, "
                                                                   f"triton {env['triton']}"}
    return env


def _start_build(suite: Suite) -> subprocess.Popen:
    """The CUDA extension build for this GPU's architecture into the scratch folder (lib/engine/_C*.so,
    mapped by the import shim), in the background. Without a GPU the same plumbing runs with
    ENGINE_NO_CUDA=1 (nothing is compiled; the step reports itself skipped)."""
    env = dict(suite.env, MAX_JOBS=str(max(1, (os.cpu_count() or 2) - 2)))
    if suite.gpu:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        env["ENGINE_NO_CUDA"] = "1"
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    log = open(suite.scratch / "build.log", "w")
    suite.build_started = time.monotonic()
    cmd = [sys.executable, "setup.py", "-q", "build", "--build-base", str(suite.scratch / "build"), "build_ext",
           "--build-lib", str(suite.scratch / "lib")]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish_build(suite: Suite, build: subprocess.Popen | None, wait: float) -> bool:
    """Wait up to `wait` seconds for the build; True when engine._C was built. Its log joins suite.log."""
    if build is None:
        return False
    try:
        build.wait(timeout=max(wait, 0.1))
    except subprocess.TimeoutExpired:
        suite.steps["build"] = {"status": "still running", "seconds": round(time.monotonic() - suite.build_started, 1)}
        return False
    suite.log.write("\n===== build (background)\n" + (suite.scratch / "build.log").read_text())
    built = build.returncode == 0 and any((suite.scratch / "lib" / "engine").glob("_C*.so"))
    status = "ok" if built else f"failed (exit {build.returncode})"
    if not suite.gpu and build.returncode == 0:
        status = "skipped: no CUDA device (build plumbing ran with ENGINE_NO_CUDA=1)"
    suite.steps["build"] = {"status": status, "seconds": round(time.monotonic() - suite.build_started, 1)}
    return built


def _start_op_counts(suite: Suite) -> subprocess.Popen | None:
    """bench/op_counts.py in the background (fake tensors on the host's CPU cores; no GPU time). Not in
    the CPU smoke run: it takes minutes on two cores, and tests/test_host_work.py runs it in CI."""
    if not suite.gpu:
        suite.skip("op_counts", "CPU smoke run (tests/test_host_work.py covers it)")
        return None
    cmd = [sys.executable, "bench/op_counts.py", "--json", str(suite.scratch / "op_counts.json")]
    suite.op_counts_started = time.monotonic()
    return subprocess.Popen(cmd, cwd=ROOT, env=suite.env, stdout=open(suite.scratch / "op_counts.log", "w"),
                            stderr=subprocess.STDOUT)


def _finish_op_counts(suite: Suite, counts: subprocess.Popen | None) -> dict:
    """The op_counts figures (waiting at most 30 s more for them), its output added to suite.log."""
    if counts is None:
        return {}
    try:
        counts.wait(timeout=30)
    except subprocess.TimeoutExpired:
        counts.kill()
        counts.wait()
    suite.log.write("\n===== op_counts (background)\n" + (suite.scratch / "op_counts.log").read_text())
    path = suite.scratch / "op_counts.json"
    ok = counts.returncode == 0 and path.exists()
    seconds = round(time.monotonic() - suite.op_counts_started, 1)
    suite.steps["op_counts"] = {"status": "ok" if ok else f"failed (exit {counts.returncode})", "seconds": seconds}
    return json.loads(path.read_text()) if ok else {}


def _tune(suite: Suite, budget: float) -> None:
    """The production dispatch table, measured first so every later step uses it."""
    if importlib.util.find_spec("engine.tune") is None:
        suite.skip("tune", "engine.tune not available")
    elif not suite.gpu:
        suite.skip("tune", "no CUDA device")
    else:
        suite.run("tune", [sys.executable, "-m", "engine.tune", "--dataset", "imagenet", "--batch-size", "128",
                           "--resolution", "224", "--amp", "--channels-last", "--out", str(suite.out / "tune.json")],
                  budget)


def _tests(suite: Suite, budget: float, paths: list[str], name: str) -> None:
    """pytest -m gpu_tier on `paths`, its JUnit report parsed into suite.tests[name]. Without a GPU:
    one test of the tier, from one file (the command, its selection, the run and the report's parsing
    still happen; CI collects the whole suite anyway)."""
    xml = suite.scratch / f"{name}.xml"
    if not suite.gpu:
        paths = ["-k", "test_ops_pass_opcheck", "tests/test_kernels.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu_tier", f"--junitxml={xml}",
           "--durations=10", *paths]
    # one config per kernel (tests/test_kernel_configs.py runs every config once): autotuning would
    # compile and time the whole space for every test shape
    step = suite.run(name, cmd, budget, env={"ENGINE_AUTOTUNE": "0"})
    if xml.exists():
        report = _junit(xml)
        step["summary"] = f"{report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped"
        suite.tests[name] = report


def _junit(path: Path) -> dict:
    """Counts, failures (with the first lines of their messages) and the slowest tests of a JUnit XML report."""
    cases = ElementTree.parse(path).getroot().iter("testcase")
    report: dict = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "slowest": []}
    timed = []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        timed.append((float(case.get("time", 0)), name))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            report["failed"] += 1
            report["failures"].append({"test": name, "message": (bad.get("message") or "")[:2000]})
        elif case.find("skipped") is not None:
            report["skipped"] += 1
        else:
            report["passed"] += 1
    report["slowest"] = [{"test": n, "seconds": t} for t, n in sorted(timed, reverse=True)[:10]]
    return report


def _bench(suite: Suite, name: str, script: str, args: list[str], budget: float) -> None:
    cmd = [sys.executable, f"bench/{script}", "--out", str(suite.out), "--max-seconds",
           str(max(1, int(budget - STARTUP_SECONDS))), *args]
    suite.run(name, cmd, budget)


def _summaries(suite: Suite) -> list[str]:
    """One line per result file, read back from the JSON the steps wrote."""
    lines = []

    def load(name: str) -> dict | None:
        path = suite.out / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    throughput = load("throughput")
    if throughput:
        teacher_224 = None
        for r in throughput["rows"]:
            best = {v: m for v, m in r.items() if isinstance(m, dict) and "ms_per_step" in m}
            cells = ", ".join(f"{v} {m['ms_per_step']:.1f} ms ({m.get('speedup_vs_ofa', float('nan')):.2f}x)"
                              for v, m in best.items())
            lines.append(f"throughput {r['net']} {r['phase']}: {cells}")
            if r["net"] == "imagenet" and r["phase"] == "teacher" and "ours" in best:
                teacher_224 = best["ours"]["images_per_s"]
        suite.steps["throughput"]["summary"] = f"{len(throughput['rows'])} rows"
    else:
        teacher_224 = None
    for name in ("layers", "grouped"):
        data = load(name)
        if data:
            done = [r for r in data["rows"] if "skipped" not in r]
            suite.steps[name]["summary"] = f"{len(done)} of {len(data['rows'])} rows measured"
            for r in done:
                cells = [f"{v} {m['fwd_bwd_ms']:.3f} ms" for v, m in r.items() if isinstance(m, dict) and "fwd_bwd_ms" in m]
                lines.append(f"{name} {r['layer']} {r.get('dtype', '')} fwd+bwd: " + ", ".join(cells))
    loader = load("loader")
    if loader:
        for r in loader["rows"]:
            if "skipped" in r:
                continue
            extra = ""
            if r["resolution"] == 224 and teacher_224:
                extra = f"; DALI / 224-px teacher step (ours) = {r['dali_img_s'] / teacher_224:.2f}x (target >= 1.5x)"
            lines.append(f"loader {r['data']}: DALI {r['dali_img_s']:.0f} img/s ({r['dali_cpu_cores']:.1f} cores) vs "
                         f"torchvision {r['torchvision_img_s']:.0f} img/s ({r['torchvision_cpu_cores']:.1f} cores)"
                         + extra)
        suite.steps["loader"]["summary"] = f"{len(loader['rows'])} rows"
    return lines


def _step(suite: Suite, name: str, build: subprocess.Popen | None, built: bool) -> bool:
    """Run step `name` of GPU_STEPS (after env); returns whether the CUDA extension is built."""
    budget = suite.budget(name)
    gpu = suite.gpu
    if name == "tune":
        _tune(suite, budget)
    elif name == "tests":
        _tests(suite, budget, ["--ignore=tests/test_cuda_ext.py", "tests"], "tests")
    elif name == "throughput":
        _bench(suite, name, "run_throughput.py", ["--nets", "imagenet", "cifar", "--steps", "10", "--warmup", "3",
                                                  "--no-op-counts", "--tune", str(suite.out / "tune.json")]
               if gpu else
               ["--device", "cpu", "--nets", "cifar", "--batch", "2", "--steps", "1", "--warmup", "0",
                "--subnets", "2", "--variants", "ofa_cl", "ours", "--no-op-counts"], budget)
    elif name == "layers":
        built = _finish_build(suite, build, wait=0 if not gpu else min(30.0, budget / 3))
        _bench(suite, name, "layers.py", [] if gpu else ["--device", "cpu", "--batch", "1"],
               suite.budget(name))
    elif name == "cuda_ext":
        built = built or _finish_build(suite, build, wait=0)
        if built:
            _tests(suite, budget, ["tests/test_cuda_ext.py"], "cuda_ext")
        else:
            suite.skip("cuda_ext", "the CUDA extension is not built" if gpu else "no CUDA device")
    elif name == "grouped":
        _bench(suite, name, "grouped.py", [] if gpu else ["--device", "cpu", "--batch", "1"], budget)
    elif name == "loader":
        if importlib.util.find_spec("nvidia.dali") is None:
            suite.skip("loader", "nvidia-dali does not import")
        else:
            _bench(suite, name, "loader_throughput.py", [] if gpu else
                   ["--images", "16", "--batch", "8", "--epochs", "1", "--workers", "1"], budget)
    return built


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the (at most 9) result files; created if missing")
    p.add_argument("--total-seconds", type=float, default=TOTAL_SECONDS, help="wall-clock budget of the whole suite")
    p.add_argument("--skip", nargs="+", default=[], choices=[s for s, _ in GPU_STEPS if s != "env"] + ["build"],
                   help="steps not to run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        return _run(Suite(out, gpu, args.total_seconds, Path(scratch)), args)


def _run(suite: Suite, args: argparse.Namespace) -> int:
    out, gpu = suite.out, suite.gpu
    env = _environment(suite)
    label = "GPU" if gpu else "CPU smoke (reference paths, tiny sizes; not comparable with GPU figures)"
    progress(f"GPU suite on {env['device']} [{label}] -> {out}")
    build = None if "build" in args.skip else _start_build(suite)
    counts = _start_op_counts(suite)
    if build is None and "build" in args.skip:
        suite.skip("build", "--skip")
    steps = [s for s, _ in GPU_STEPS[1:] if s not in args.skip]
    for skipped in (s for s, _ in GPU_STEPS[1:] if s in args.skip):
        suite.skip(skipped, "--skip")
    built = False
    for name in steps:
        built = _step(suite, name, build, built)
    if build is not None and build.poll() is None:
        build.kill()
        _finish_build(suite, build, wait=5)
    host_work = _finish_op_counts(suite, counts)
    if suite.tests:
        (out / "tests.json").write_text(json.dumps(suite.tests, indent=2))
    lines = _summaries(suite)
    if host_work.get("targets"):
        lines.append("host work and modelled traffic (bench/op_counts.py): " + json.dumps(host_work["targets"]))
    table = [f"{'step':11s} {'status':40s} {'seconds':>8s}  summary"]
    table += [f"{name:11s} {s['status'][:40]:40s} {s['seconds']:8.1f}  {s.get('summary', '')}"
              for name, s in suite.steps.items()]
    suite.log.close()
    payload = {"env": env, "label": label, "steps": suite.steps, "table": table, "results": lines,
               "host_work_and_traffic": host_work, "files": sorted(p.name for p in out.iterdir())}
    write_json("suite", payload, out)
    print("\n".join(table + [""] + lines), flush=True)
    failed = [n for n, s in suite.steps.items() if s["status"].startswith(("failed", "timeout"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
