"""Every Triton kernel variant the launchers use compiles to Hopper and Ampere machine code (cubin).

The interpreter (TRITON_INTERPRET=1, how the numerics are tested on CPU) accepts programs the real
compiler rejects, and no GPU is needed to compile: the ops run once in the interpreter while their
launches (argument types and compile-time constants, with the default autotuning config that the
interpreter runs) are recorded, then a subprocess without the interpreter compiles each distinct
launch with triton.compile: fp32 for sm_90, and the fp16 launches as bf16 (the interpreter has no
bf16; the kernels treat both alike) for sm_90 and sm_80. There, autotuning is on, so each autotuned
kernel also compiles every config of its space (for its first recorded launch, sm_90), and each kernel
with int64 indexing compiles that form too (WIDE=True, first launch, sm_90).
Each cubin's per-thread stack (register spills) is read with Triton's bundled cuobjdump and bounded.
On a machine with a GPU the GPU tests compile and run the kernels themselves, so this is skipped.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

TARGETS = {"fp32": (90,), "bf16": (90, 80)}
MAX_STACK_BYTES = 64


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                      torch.int32: "i32", torch.int64: "i64"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def _jit(kernel):
    """The JITFunction under a kernel (an autotuner wraps it)."""
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs"):
        kernel = kernel.fn
    return kernel


class _Recorder:
    """Stands in for an interpreted kernel's `run`: notes the launch, then runs it."""

    def __init__(self, module: str, name: str, kernel, launches: list) -> None:
        self.module, self.name, self.kernel, self.launches = module, name, kernel, launches
        self.params = inspect.signature(_jit(kernel).fn).parameters
        self.tuned = dict(kernel.configs[0].all_kwargs()) if hasattr(kernel, "configs") else {}
        self.run = kernel.run

    def __call__(self, *args, **kwargs):
        given = {**self.tuned, **kwargs}           # the one config the interpreter runs supplies the blocks
        bound = dict(zip(self.params, args), **{k: v for k, v in given.items() if k in self.params})
        constexprs = {k: v for k, v in bound.items() if "constexpr" in str(self.params[k].annotation)}
        signature = {k: "constexpr" if k in constexprs else _arg_type(v) for k, v in bound.items()}
        self.launches.append({"module": self.module, "kernel": self.name, "signature": signature,
                              "constexprs": constexprs, "num_warps": given.get("num_warps", 4)})
        return self.run(*args, **kwargs)


def _record_launches() -> list[dict]:
    """Run each op (forward and backward, fp32 and fp16) in the interpreter; the distinct launches."""
    import engine.kernels.batchnorm as kbn
    import engine.kernels.depthwise as kdw
    import engine.kernels.pointwise as kpw

    launches: list[dict] = []
    recorders = [_Recorder(mod.__name__, name, kernel, launches) for mod in (kpw, kdw, kbn)
                 for name, kernel in vars(mod).items() if name.endswith("_kernel")]
    for r in recorders:
        r.kernel.run = r
    try:
        for dtype in (torch.float32, torch.float16):
            _exercise(kpw, kdw, kbn, dtype)
    finally:
        for r in recorders:
            del r.kernel.run
    return [json.loads(u) for u in sorted({json.dumps(launch, sort_keys=True) for launch in launches})]


def _exercise(kpw, kdw, kbn, dtype: torch.dtype) -> None:
    """One forward + backward of every op variant the layers and the batched step launch."""
    def chw(*shape):
        return torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()

    def back(y):
        y.backward(torch.randn_like(y))

    w = torch.randn(9, 8, 1, 1, dtype=dtype, requires_grad=True)
    back(kpw.pointwise_conv(chw(2, 8, 3, 3), w, torch.randn(9, dtype=dtype, requires_grad=True), 7))
    widths = torch.tensor([[9, 8], [4, 3]], dtype=torch.int32)
    back(kpw.grouped_pointwise_conv(chw(2, 16, 3, 3), w, widths, 9))
    for k in (3, 7):
        for stride in (1, 2):
            back(kdw.depthwise_conv(chw(1, 8, 5, 5), torch.randn(8, k, k, dtype=dtype, requires_grad=True), stride))
            limits = torch.tensor([[7, 4], [k, 3]], dtype=torch.int32)
            f = torch.randn(8, 7, 7, dtype=dtype, requires_grad=True)
            back(kdw.grouped_depthwise_conv(chw(1, 8, 5, 5), f, stride, limits))
    g, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    for act in kbn.ACT_CODE:
        for training in (True, False):
            back(kbn.batchnorm_act(chw(2, 8, 3, 3), g, b, torch.zeros(8), torch.ones(8), training, 1e-5, act)[0])
    kbn.running_update(torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype), torch.rand(2, 6), 18, 0.1)
    for residual in (None, chw(2, 7, 3, 3)):
        h, stats = kpw.pointwise_conv_stats(chw(2, 8, 3, 3), w, 7)
        back(kbn.bn_apply(h, stats, g, b, residual, 1e-5, "h_swish"))


def _compile(launches: list[dict]) -> list[dict]:
    """In a subprocess without the interpreter: compile each launch for TARGETS; per-launch results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))       # this checkout's kernels, not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)   # an installed copy
    done = subprocess.run([sys.executable, __file__], input=json.dumps(launches), capture_output=True,
                          text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels themselves")
def test_every_kernel_variant_compiles_for_sm90_and_sm80():
    launches = _record_launches()
    kernels = {launch["kernel"] for launch in launches}
    assert {"_matmul_kernel", "_dw_forward_kernel", "_dw_grad_input_kernel", "_dw_grad_filter_kernel",
            "_reduce_kernel", "_apply_kernel"} <= kernels
    results = _compile(launches)
    failures = [r for r in results if r["error"]]
    assert not failures, "\n".join(f"{r['kernel']} {r['target']} {r['config']}: {r['error']}" for r in failures)
    # spilling registers to the stack: the fully unrolled 7x7 depthwise taps once took 255 registers
    # and 1.2 KB of stack per thread on sm_90
    spills = [r for r in results if (r["stack_bytes"] or 0) > MAX_STACK_BYTES]
    assert not spills, "\n".join(f"{r['kernel']} {r['target']} {r['config']}: {r['stack_bytes']} B stack"
                                  for r in spills)


def _compile_one(job: tuple[dict, str, int]) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, dtype, arch = job
    kernel = _jit(getattr(importlib.import_module(launch["module"]), launch["kernel"]))
    signature = {k: t.replace("fp16", dtype) for k, t in launch["signature"].items()}
    entry = {"kernel": launch["kernel"], "target": f"sm_{arch} {dtype}", "error": None,
             "config": {k: launch["constexprs"][k] for k in launch.get("tuned", ())}}
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=launch["constexprs"]),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": launch["num_warps"]})
        entry["stack_bytes"] = _stack_bytes(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - reported per launch by the test
        entry["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return entry


def _stack_bytes(cubin: bytes) -> int | None:
    """Per-thread stack (register spills) of a cubin, read with Triton's bundled cuobjdump; None without it."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"STACK:(\d+)", usage)
    return int(found.group(1)) if found else None


def _compile_main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    import importlib

    jobs, spaced, wide = [], set(), set()
    for launch in json.load(sys.stdin):
        half = any(t == "*fp16" for t in launch["signature"].values())
        dtype = "bf16" if half else "fp32"
        jobs += [(launch, dtype, arch) for arch in TARGETS[dtype]]
        if launch["constexprs"].get("WIDE") is False and launch["kernel"] not in wide:   # its int64 form, once
            wide.add(launch["kernel"])
            jobs.append(({**launch, "constexprs": {**launch["constexprs"], "WIDE": True}}, dtype, 90))
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        if hasattr(kernel, "configs") and launch["kernel"] not in spaced:   # autotuned: its whole space, once
            spaced.add(launch["kernel"])
            for config in kernel.configs:
                tuned = dict(config.kwargs)
                jobs.append(({**launch, "constexprs": {**launch["constexprs"], **tuned}, "tuned": list(tuned),
                              "num_warps": config.num_warps}, dtype, 90))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        json.dump(list(pool.map(_compile_one, jobs)), sys.stdout)


if __name__ == "__main__":
    _compile_main()
