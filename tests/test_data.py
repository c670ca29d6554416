from pathlib import Path

import pytest
import torch

from hant.config import DataConfig
from hant.data import (DEBIAN_FASHION_MNIST, TensorImageDataset, load_data, make_loader, parse_data_spec,
                       random_crop_flip, resize_batch)
from hant.errors import HantError


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and on a busy shared machine the
    # thread barriers of every small op make them many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic(n=300, seed=0, **kw):
    return load_data(DataConfig(spec=f"synthetic:{n}", input_size=kw.pop("input_size", 16), heldout=40, seed=seed, **kw))


def test_synthetic_splits_disjoint_and_deterministic():
    a, b, c = _synthetic(seed=0), _synthetic(seed=0), _synthetic(seed=1)
    tr, ho = set(a.train_indices.tolist()), set(a.heldout_indices.tolist())
    assert len(ho) == 40 and not tr & ho
    assert tr | ho == set(range(len(a.train) + len(a.heldout)))
    assert torch.equal(a.heldout_indices, b.heldout_indices)
    assert not torch.equal(a.heldout_indices, c.heldout_indices)
    # The datasets hold exactly the images the indices name.
    assert torch.equal(a.heldout.indices, a.heldout_indices)
    assert torch.equal(a.heldout.get_batch(range(5))[0], b.heldout.get_batch(range(5))[0])
    # Content does not follow the split seed: the test split is the same images.
    assert torch.equal(a.test.images, c.test.images)
    assert len(a.test) == 60


def test_synthetic_shape_channels_classes_and_normalisation():
    s = _synthetic(n=200, input_size=24, in_chans=3, num_classes=4)
    x, y = s.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(y, int)
    assert (s.in_chans, s.num_classes, s.input_size) == (3, 4, 24)
    assert set(s.train.labels.tolist()) == {0, 1, 2, 3}
    xb, _ = s.train.get_batch(range(len(s.train)))
    # Mean/std are from the whole pool, so the train part is close to standardised.
    assert xb.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (xb.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    cfg = s.record(DataConfig(spec="synthetic:200", input_size=24))
    assert (cfg.in_chans, cfg.num_classes, cfg.mean, cfg.std) == (3, 4, s.mean, s.std)


def test_given_mean_std_are_used():
    s = load_data(DataConfig(spec="synthetic:100", input_size=16, mean=[0.5], std=[0.25]))
    assert s.mean == [0.5] and s.std == [0.25]
    raw = s.test.images[:1].float() / 255
    assert torch.allclose(s.test.get_batch([0])[0], (raw - 0.5) / 0.25, atol=1e-5)


def test_heldout_is_capped_to_a_fifth_of_small_pools():
    s = load_data(DataConfig(spec="synthetic:100", input_size=16, heldout=5000))
    assert len(s.heldout) == 16 and len(s.train) == 64


@pytest.mark.parametrize("spec", ["mnist", "imagefolder:", "synthetic:abc", "synthetic:0", "", "cifar10"])
def test_bad_data_spec(spec):
    with pytest.raises(HantError) as e:
        parse_data_spec(spec)
    assert "\n" not in str(e.value)


def test_unknown_spec_lists_valid_forms():
    with pytest.raises(HantError, match="fashion-mnist, imagefolder:/path, tensors:/file.safetensors or synthetic:N"):
        load_data(DataConfig(spec="cifar10"))


def test_single_class_and_too_small_rejected():
    with pytest.raises(HantError, match="single class"):
        load_data(DataConfig(spec="synthetic:50", num_classes=1, input_size=16))
    with pytest.raises(HantError, match="too small"):
        load_data(DataConfig(spec="synthetic:5", input_size=16))


def test_make_loader_seeded_and_fast_path_agree():
    s = _synthetic()
    first = [y for _, y in make_loader(s.train, 32, shuffle=True, seed=3)]
    again = [y for _, y in make_loader(s.train, 32, shuffle=True, seed=3)]
    other = [y for _, y in make_loader(s.train, 32, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    x, y = next(iter(make_loader(s.train, 32)))
    xf, yf = next(s.train.batches(32))
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.int64
    assert torch.equal(x, xf) and torch.equal(y, yf)
    assert sum(len(y) for _, y in make_loader(s.train, 32, drop_last=True)) == len(s.train) // 32 * 32
    assert sum(len(y) for _, y in s.train.batches(32, drop_last=False)) == len(s.train)


def test_resize_pads_close_sizes_and_interpolates_far_ones():
    x = torch.ones(2, 1, 28, 28)
    p = resize_batch(x, 32)
    assert p.shape == (2, 1, 32, 32) and p[0, 0, 0, 0] == 0 and p[0, 0, 2, 2] == 1
    u = resize_batch(x, 64)
    assert u.shape == (2, 1, 64, 64) and torch.allclose(u, torch.ones_like(u))
    d = TensorImageDataset(torch.full((3, 1, 28, 28), 255, dtype=torch.uint8), torch.zeros(3), [0.5], [0.5], 64)
    assert d.images.shape == (3, 1, 64, 64)  # resized once, up front
    assert torch.allclose(d[0][0], torch.ones(1, 64, 64))


def test_random_crop_flip_moves_content_only():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    y = random_crop_flip(x, pad=2, generator=g, fill=[-1.0], flip=False)
    assert y.shape == x.shape
    for i in range(4):
        # Each result is a window of the padded image: rows step by 8, columns by 1, or padding.
        row = y[i, 0, 4]
        vals = row[row >= 0]
        assert len(vals) >= 6 and torch.all(vals.diff() == 1)
    x = x.repeat(4, 1, 1, 1)
    flipped = random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(1), flip=True)
    n_flipped = sum(torch.equal(flipped[i], x[i].flip(2)) for i in range(16))
    n_same = sum(torch.equal(flipped[i], x[i]) for i in range(16))
    assert n_flipped + n_same == 16 and n_flipped >= 2 and n_same >= 2


def _write_images(folder: Path, classes, n, mode):
    from PIL import Image

    for k, c in enumerate(classes):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, (20 + i, 18), color=(40 * k + i) if mode == "L" else (40 * k, i, 9)).save(
                folder / c / f"{i}.png")


def test_imagefolder_flat_and_split(tmp_path):
    _write_images(tmp_path / "flat", ["a", "b", "c"], 10, "RGB")
    s = load_data(DataConfig(spec=f"imagefolder:{tmp_path / 'flat'}", input_size=16, heldout=3))
    assert (s.in_chans, s.num_classes) == (3, 3) and s.classes == ["a", "b", "c"]
    assert len(s.test) == 3 and len(s.heldout) == 3 and len(s.train) == 24
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    xb, yb = next(iter(make_loader(s.train, 8)))
    assert xb.shape == (8, 3, 16, 16)

    _write_images(tmp_path / "split" / "train", ["x", "y"], 6, "L")
    _write_images(tmp_path / "split" / "val", ["x", "y"], 2, "L")
    s = load_data(DataConfig(spec=f"imagefolder:{tmp_path / 'split'}", input_size=12, heldout=2))
    assert (s.in_chans, s.num_classes, len(s.test), len(s.train) + len(s.heldout)) == (1, 2, 4, 12)
    assert s.test[0][0].shape == (1, 12, 12)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(HantError, match="not a folder"):
        load_data(DataConfig(spec=f"imagefolder:{tmp_path / 'missing'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HantError, match="no images"):
        load_data(DataConfig(spec=f"imagefolder:{tmp_path / 'empty'}"))
    _write_images(tmp_path / "one", ["only"], 5, "L")
    with pytest.raises(HantError, match="single class"):
        load_data(DataConfig(spec=f"imagefolder:{tmp_path / 'one'}"))


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_at_32_and_64():
    for size in (32, 64):
        s = load_data(DataConfig(spec="fashion-mnist", input_size=size))
        assert (len(s.train), len(s.heldout), len(s.test)) == (55000, 5000, 10000)
        assert (s.in_chans, s.num_classes, s.input_size) == (1, 10, size)
        assert abs(s.mean[0] - 0.286) < 1e-3 and abs(s.std[0] - 0.353) < 1e-3
        x, y = s.test[0]
        assert x.shape == (1, size, size) and y == 9  # the first test image is an ankle boot
        if size == 32:
            # 28 -> 32 is zero padding: the border is black after normalisation.
            assert torch.allclose(x[0, 0], torch.full((32,), -s.mean[0] / s.std[0]))
        assert torch.bincount(s.train.labels, minlength=10).min() > 5000
