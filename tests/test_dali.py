"""The DALI pipeline in CPU mode (device_id=None) on JPEGs made at test time from real photos."""
import numpy as np
import pytest
import torch

dali = pytest.importorskip("nvidia.dali")

from engine.data.dali import DaliLoader  # noqa: E402
from engine.data.datasets import ArrayDataset, ImageFolderDataset  # noqa: E402
from helpers import make_jpeg_tree  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 4 JPEGs whose label is the colour channel with the largest mean."""
    return make_jpeg_tree(tmp_path_factory.mktemp("jpegs"))


def _loader(data, **kw):
    args = dict(batch_size=4, train=True, kind="imagenet", resolution=32, seed=0)
    args.update(kw)
    return DaliLoader(data, **args)


@pytest.mark.parametrize("train", [True, False])
def test_file_pipeline_shapes_dtypes_and_labels(folder, train):
    loader = _loader(ImageFolderDataset(folder), train=train, batch_size=5)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        assert torch.equal(images.mean((2, 3)).argmax(1), labels)
        seen += len(labels)
    assert seen == (10 if train else 12)           # training drops the partial batch


def test_bfloat16_output_and_elastic_resolution(folder):
    sizes = {0: 24, 1: 40, 2: 16}
    loader = _loader(ImageFolderDataset(folder), dtype=torch.bfloat16, resolution_fn=lambda it: sizes[it % 3])
    shapes = [images.shape[-1] for images, _ in loader]
    assert shapes == [24, 40, 16]
    assert next(iter(loader))[0].dtype == torch.bfloat16


def test_fixed_seed_gives_the_same_order_and_pixels(folder):
    a = [(x, i) for x, _, i in _loader(ImageFolderDataset(folder), with_index=True)]
    b = [(x, i) for x, _, i in _loader(ImageFolderDataset(folder), with_index=True)]
    for (xa, ia), (xb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    c = [i for _, _, i in _loader(ImageFolderDataset(folder), with_index=True, seed=1)]
    assert any(not torch.equal(i, j) for (_, i), j in zip(a, c))


def test_shards_cover_every_sample_once_per_epoch(folder):
    loaders = [_loader(ImageFolderDataset(folder), batch_size=1, rank=r, world=2, with_index=True) for r in range(2)]
    for _ in range(2):                                                     # two epochs
        seen = [int(i) for loader in loaders for _, _, idx in loader for i in idx]
        assert sorted(seen) == list(range(12))


def test_array_pipeline_cifar_style(folder):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 32, 32, 3), dtype=np.uint8)
    data = ArrayDataset(images, np.arange(37) % 10, [str(c) for c in range(10)])
    train = DaliLoader(data, 8, True, "cifar", 32, seed=3, with_index=True)
    idx = torch.cat([i for _, _, i in train])
    assert len(idx) == 32 and len(set(idx.tolist())) == 32                # 4 full batches, no repeats
    val = DaliLoader(data, 8, False, "cifar", 32, with_index=True)
    batches = list(val)
    assert torch.equal(torch.cat([i for _, _, i in batches]), torch.arange(37))
    assert torch.equal(torch.cat([y for _, y, _ in batches]), torch.arange(37) % 10)
    x = batches[0][0][0]                                                   # val: exactly the normalised image
    expect = (torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]) / torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    torch.testing.assert_close(x, expect, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_clear_errors(folder, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        _loader(ImageFolderDataset(tmp_path / "missing"))
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(bad)
    (bad / "empty").rmdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "class1" / "not_a_jpeg.jpg", format="PNG")
    with pytest.raises(ValueError, match="not_a_jpeg.jpg"):
        _loader(ImageFolderDataset(bad))
    (bad / "class1" / "not_a_jpeg.jpg").rename(bad / "not_a_jpeg.jpg")
    (bad / "class2" / "truncated.jpg").write_bytes((folder / "class2" / "0.jpg").read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.jpg is a truncated JPEG"):        # named up front
        _loader(ImageFolderDataset(bad))
    (bad / "class2" / "truncated.jpg").rename(bad / "truncated.jpg")
    body = bytearray((folder / "class0" / "1.jpg").read_bytes())
    body[400:2400] = np.random.default_rng(0).bytes(2000)
    (bad / "class0" / "garbled.jpg").write_bytes(bytes(body))
    with pytest.raises(ValueError, match="garbled.jpg"):              # corrupt body: named at run time
        for _ in _loader(ImageFolderDataset(bad), train=False):
            pass
    for name, part in (("not_a_jpeg.jpg", "class1"), ("truncated.jpg", "class2")):
        (bad / name).rename(bad / part / name)
    loader = _loader(ImageFolderDataset(bad), skip_corrupt=True, train=False)
    assert loader.skipped == 3
    assert sum(len(y) for _, y in loader) == 12


@pytest.mark.parametrize("kind", ["imagenet", "cifar", "digits"])
def test_autoaugment_and_random_erasing_run_for_every_data_kind(folder, kind):
    """AutoAugment needs a pipeline with conditionals (it once failed to build: TypeError); with
    random_erase=1 every training image has an erased (all-zero after normalising) box."""
    if kind == "imagenet":
        data = ImageFolderDataset(folder)
    else:
        rng = np.random.default_rng(0)
        data = ArrayDataset(rng.integers(1, 255, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 10,
                            [str(c) for c in range(10)])
    loader = _loader(data, kind=kind, batch_size=4, auto_augment=True, random_erase=1.0)
    batches = list(loader)
    assert batches and all(x.shape[1:] == (3, 32, 32) for x, _ in batches)
    for x, _ in batches:
        erased = (x == 0).all(1).flatten(1).float().mean(1)                 # per image: share of zeroed pixels
        assert (erased >= 0.01).all(), erased
