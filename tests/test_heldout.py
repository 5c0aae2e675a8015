"""Training images held out of training (engine.data.heldout): seeded, exact in count, disjoint from what
training reads, independent of listing order, and recorded in the run for the search."""
import random

import numpy as np
import pytest

from engine.data import heldout
from engine.data.datasets import ArrayDataset, ImageFolderDataset
from engine.data.loader import load_data
from engine.errors import BadInput
from helpers import make_jpeg_tree


def test_digits_split_is_seeded_exact_and_disjoint():
    full = load_data("digits", None, 8, 0)
    data = load_data("digits", None, 8, 0, heldout_images=None)           # the default: a tenth
    assert len(data.heldout) == 1438 // 10 and len(data.train) + len(data.heldout) == len(full.train) == 1438
    rows = {r.tobytes() for r in full.train.base.images}
    train_rows = [r.tobytes() for r in data.train.base.images]
    held_rows = [r.tobytes() for r in data.heldout.base.images]
    assert set(train_rows) | set(held_rows) <= rows
    # digits holds a few duplicate scans: compare as multisets of (image, label) rows
    pairs = sorted(zip([r.tobytes() for r in full.train.base.images], full.train.base.labels.tolist()))
    assert sorted(zip(train_rows + held_rows, data.train.base.labels.tolist() + data.heldout.base.labels.tolist())) \
        == pairs
    again = load_data("digits", None, 8, 0, heldout_images=None)
    assert np.array_equal(again.heldout.base.images, data.heldout.base.images)
    other = load_data("digits", None, 8, 1, heldout_images=None)
    assert not np.array_equal(other.heldout.base.images, data.heldout.base.images)
    assert load_data("digits", None, 8, 0, heldout_images=0).heldout is None
    image, label = data.heldout[0]                                        # evaluation transform: deterministic
    assert image.shape == (3, 8, 8) and (image == data.heldout[0][0]).all() and 0 <= label < 10


def test_count_out_of_range_is_bad_input():
    base = ArrayDataset(np.zeros((5, 2, 2, 3), np.uint8), np.arange(5), ["a"])
    for count in (5, 6, -1):
        with pytest.raises(BadInput, match=f"--heldout-images {count} must be in"):
            heldout.split(base, count, 0)
    assert len(heldout.split(base, 4, 0)[0]) == 1


def test_imagefolder_set_ignores_listing_order_and_a_dropped_file(tmp_path):
    make_jpeg_tree(tmp_path, classes=3, per_class=20)
    tree = ImageFolderDataset(tmp_path)
    held = {p for p, _ in heldout.split(tree, 12, 7)[1].samples}
    shuffled = tree.subset(random.Random(0).sample(range(len(tree)), len(tree)))
    assert {p for p, _ in heldout.split(shuffled, 12, 7)[1].samples} == held
    gone = sorted(held)[0]
    dropped = tree.subset([i for i, (p, _) in enumerate(tree.samples) if p != gone])
    assert {p for p, _ in heldout.split(dropped, 12, 7, left_out=[gone])[1].samples} == held - {gone}
    kept, out = heldout.split(tree, 12, 7)
    assert {p for p, _ in kept.samples}.isdisjoint(held) and len(kept) + len(out) == len(tree)
    assert type(kept) is ImageFolderDataset and kept.root == tree.root


def test_a_file_check_never_changes_the_set(tmp_path):
    """Training without the JPEG-only check and a search through DALI (JPEG-only, --skip-corrupt) hold out
    the same images: a held-out file the check drops leaves the set, no trained-on file takes its place."""
    from PIL import Image

    for part in ("train", "val"):
        make_jpeg_tree(tmp_path / part, classes=3, per_class=10)
    plain = load_data("imagenet", str(tmp_path), 8, 0, heldout_images=6)
    png = plain.heldout.base.samples[0][0]
    Image.open(png).convert("RGB").save(png, format="PNG")                   # a held-out file, not a JPEG
    plain = load_data("imagenet", str(tmp_path), 8, 0, heldout_images=6)
    checked = load_data("imagenet", str(tmp_path), 8, 0, heldout_images=6, jpeg_only=True, skip_corrupt=True)
    assert checked.skipped == [png]
    assert {p for p, _ in checked.heldout.base.samples} == {p for p, _ in plain.heldout.base.samples} - {png}
    assert checked.train.base.samples == plain.train.base.samples
    assert len(load_data("imagenet", str(tmp_path), 8, 0, heldout_images=None).heldout) == 30 // 10   # small tree


def test_search_scores_on_what_the_run_held_out():
    """The search's held-out stream is the run's held-out set (fewer: a seeded sample over it, not its first
    rows), and asking for more than the run held out is bad input."""
    import torch

    from engine.search.heldout import search_images

    data = load_data("digits", None, 8, 0, heldout_images=None)
    cpu = torch.device("cpu")
    every = search_images(data, None, 16, 10, 500, 0, 0, cpu)
    assert every.sizes["heldout_images"] == len(data.heldout) and not every.sizes["heldout_seen_in_training"]
    images, labels = next(iter(every.heldout))
    assert torch.equal(labels, torch.tensor(data.heldout.base.labels))
    few = search_images(data, 30, 16, 10, 500, 0, 3, cpu)
    _, few_labels = next(iter(few.heldout))
    assert len(few_labels) == 30 and len(set(few_labels.tolist())) >= 5       # spread over the classes
    assert few_labels.tolist() != data.heldout.base.labels[:30].tolist()
    with pytest.raises(BadInput, match="exceeds the 143 training images the run held out"):
        search_images(data, 144, 16, 10, 500, 0, 0, cpu)
    seen = search_images(load_data("digits", None, 8, 0), None, 16, 10, 500, 0, 0, cpu)
    assert seen.sizes["heldout_seen_in_training"] and seen.sizes["heldout_images"] == 1438 // 10


def test_dali_streams_match_the_torchvision_ones_and_each_pass_is_whole():
    """With the run's DALI loader the search reads the same held-out and val images in the same order as
    with torchvision's (the digits are stored at the resolution: resizing is the identity; the normalised
    values, at most 1 in size here, differ by 1 float32 ulp at most as the loaders compute them in
    different orders: the bound is 8 ulps), and a
    pass cut short (the export check takes one batch) leaves the next pass whole."""
    pytest.importorskip("nvidia.dali")
    import torch

    from engine.search.heldout import search_images

    data = load_data("digits", None, 8, 0, heldout_images=None)
    cpu = torch.device("cpu")
    ref, dali = (search_images(data, None, 16, 40, 32, 1, 0, cpu, dali=d) for d in (False, True))
    assert dali.sizes == {**ref.sizes, "loader": "dali"} and len(dali.heldout) == len(ref.heldout) == 5
    for a, b in ((ref.heldout, dali.heldout), (ref.val, dali.val)):
        (xa, ya), (xb, yb) = (tuple(torch.cat(t) for t in zip(*s)) for s in (a, b))
        assert torch.equal(ya, yb) and xb.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xb, xa, rtol=0, atol=8 * torch.finfo(torch.float32).eps * xa.abs().max().item())
    next(iter(dali.heldout))                                              # a pass cut short
    assert sum(len(y) for _, y in dali.heldout) == len(data.heldout)
    calib = torch.cat(list(dali.calib))
    assert calib.shape == (16, 3, 8, 8) and torch.equal(calib, torch.cat(list(dali.calib)))   # the same each pass


def test_resuming_a_checkpoint_from_before_the_setting_keeps_its_training_set():
    """A checkpoint written before --heldout-images existed trained on every image: resuming it with the
    new default (a tenth held out) is refused naming the setting; with --heldout-images 0 it resumes."""
    from pathlib import Path

    from engine.train import checkpoint
    from engine.train.config import TrainConfig
    from engine.train.trainer import _check_same_settings

    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "heldout_images"}
    with pytest.raises(checkpoint.CheckpointError, match="heldout_images=0"):
        _check_same_settings(TrainConfig(), {"config": old}, Path("old.pt"))
    _check_same_settings(TrainConfig(heldout_images=0), {"config": old}, Path("old.pt"))
