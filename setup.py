"""elastic: a fused-kernel once-for-all training engine.

The top-level `kernels/` folder (Triton kernels) is installed as the sub-package `engine.kernels`:
the name `kernels` is taken on the package registry, so it is never installed top-level.
"""
from setuptools import find_packages, setup

engine_packages = find_packages(include=["engine", "engine.*"])
kernel_packages = ["engine.kernels" + p[len("kernels"):] for p in find_packages(include=["kernels", "kernels.*"])]

setup(
    name="elastic-ofa-engine",
    version="0.1.0",
    description="Fused-kernel once-for-all (OFA / DεpS) supernet training engine",
    python_requires=">=3.10",
    packages=engine_packages + kernel_packages,
    package_dir={"engine.kernels": "kernels"},
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
        "test": ["pytest"],
    },
)
