"""Helpers shared by the test modules."""
import os

import pytest
import torch


def kernel_device() -> str:
    """Where the Triton kernel tests run: "cuda" with a GPU, "cpu" under the interpreter; a test that
    would otherwise silently run the reference is skipped instead."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                allow_module_level=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (Frobenius norms); a must hold no NaN (an unwritten, NaN-poisoned
    output or a NaN result fails here)."""
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rel_max(got: torch.Tensor, truth: torch.Tensor) -> float:
    """max |got - truth| / max |truth| in float64: the error relative to the tensor's scale."""
    return ((got.double() - truth.double()).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def make_jpeg_tree(root, classes: int = 3, per_class: int = 4, seed: int = 0):
    """`root/class<c>/<i>.jpg`: crops of the real photos scikit-learn ships; class c keeps only colour
    channel c (at least 40), so the label is recoverable from any crop: the channel with the largest mean."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(im) for im in load_sample_images().images]          # china.jpg, flower.jpg
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[(c + i) % 2]
            y, x = rng.integers(0, 100, 2)
            crop = photo[y:y + 200, x:x + 260].copy()
            keep = crop[..., c % 3].copy()
            crop[:] = 0
            crop[..., c % 3] = np.maximum(keep, 40)
            Image.fromarray(crop).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def ranks_env(nproc: int, env: dict | None = None) -> dict:
    """The environment for a `torchrun --nproc_per_node=nproc` test: with fewer GPUs than ranks the
    GPUs are hidden (each rank would otherwise call set_device(local_rank) on a device that does not
    exist) and the ranks run on the CPU with gloo; with enough GPUs each rank gets its own."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    if torch.cuda.device_count() < nproc:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    return env
