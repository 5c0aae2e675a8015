"""elastic: a fused-kernel once-for-all training engine.

The top-level `kernels/` folder (Triton kernels) is installed as the sub-package `engine.kernels`:
the name `kernels` is taken on the package registry, so it is never installed top-level.

The CUDA C++ extension `engine._C` (csrc/) is built with ninja when torch is importable at build time
(`pip install -e . --no-build-isolation`) and CUDA_HOME has nvcc for torch's CUDA version; it targets
sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise. ENGINE_NO_CUDA=1 skips it, and a failed
build is reported and skipped: the package works without it (the "cuda" backend is then unavailable).
"""
import os

from setuptools import find_packages, setup


def _extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for engine._C, or nothing with a printed reason."""
    def skip(why: str) -> tuple[list, dict]:
        print(f"engine._C (CUDA extension) not built: {why}")
        return [], {}

    if os.environ.get("ENGINE_NO_CUDA") == "1":
        return skip("ENGINE_NO_CUDA=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time (install with --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip("no nvcc under CUDA_HOME (set CUDA_HOME=/usr/local/cuda)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    class OptionalBuild(BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure: ship without the extension
                print(f"engine._C (CUDA extension) build failed, continuing without it: {err}")

    ext = CUDAExtension("engine._C", ["csrc/ops.cpp", "csrc/kernels.cu"], define_macros=[("WITH_CUDA", None)],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()

engine_packages = find_packages(include=["engine", "engine.*"])
kernel_packages = ["engine.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]

setup(
    name="elastic-ofa-engine",
    version="0.1.0",
    description="Fused-kernel once-for-all (OFA / DεpS) supernet training engine",
    python_requires=">=3.10",
    packages=engine_packages + kernel_packages,
    package_dir={"engine.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "triton",
        "numpy",
        "tqdm",
        "pybind11",
        "ninja",
        "scikit-learn",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "pytest-timeout", "onnx", "onnxscript", "onnxruntime"],
    },
)
