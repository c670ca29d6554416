"""Datasets and splits: Fashion-MNIST, an ImageFolder tree, or a synthetic set for tests.

A data spec string names the source:

    fashion-mnist        the idx files (Debian `dataset-fashion-mnist`, `data_dir`, or a download)
    imagefolder:/path    a torchvision ImageFolder tree (with train/ and test/ or val/ inside, or not)
    synthetic:N          N seeded, learnable images (class-dependent patterns); for tests
    tensors:/file        a safetensors file of image tensors (what `hant.accelerate` writes for
                         data given in memory): train_images/train_labels, and optionally
                         heldout_* and test_*; uint8 images are normalised with the train
                         statistics, float images are taken as already normalised

`load_data(cfg)` returns `Splits`: train, held-out (carved from the train pool, never
trained on by phase 1 or fine-tuning) and test, plus the normalisation and input size that
every later stage must reuse. Image tensors stay in memory as uint8 at their native size;
conversion to float, resizing and normalisation happen per batch, which on a 2-core CPU
costs far less than the forward pass of any network worth accelerating.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hant.config import DataConfig
from hant.errors import HantError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "hant" / "data"
FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
VALID_SPECS = "fashion-mnist, imagefolder:/path, tensors:/file.safetensors or synthetic:N"

# Synthetic content is fixed per (N, size, channels, classes); only the splits follow the seed,
# so that runs with different seeds still compare on the same images.
_SYNTHETIC_CONTENT_SEED = 1234
# A pad of at most this many pixels reaches the input size by zero-padding (28 -> 32, as
# in the LeNet tradition); larger gaps are bilinear upsampling.
_MAX_PAD = 4
# In-memory sets are resized once when the result fits in this many bytes (60000 images at
# 128x128x1 do), else per batch.
_PRECOMPUTE_BYTES = 1 << 30


@dataclass
class Splits:
    """The three splits of a dataset and what a model needs to know to consume them.

    `train_indices` and `heldout_indices` index the train pool (train + held-out), so a
    run can record and check exactly which images were held out.
    """

    train: Dataset
    heldout: Dataset
    test: Dataset
    in_chans: int
    num_classes: int
    mean: list[float]
    std: list[float]
    input_size: int
    spec: str
    classes: list[str]
    train_indices: torch.Tensor
    heldout_indices: torch.Tensor

    def record(self, cfg: DataConfig) -> DataConfig:
        """Return a copy of `cfg` with in_chans, num_classes, mean, std and input_size filled in."""
        return dataclasses.replace(cfg, spec=self.spec, input_size=self.input_size, in_chans=self.in_chans,
                                   num_classes=self.num_classes, mean=list(self.mean), std=list(self.std))


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 (or float) tensor N x C x h x w, with int64 labels.

    uint8 images are grey levels, normalised per batch with `mean` and `std` given on the
    0..1 scale; float images are normalised with `mean` and `std` as they are (0 and 1 for
    images that arrive normalised). Items are float C x S x S tensors, where S is `input_size`: the image is
    zero-padded when S exceeds h by at most 4 pixels (28 -> 32) and bilinearly resized
    otherwise. `get_batch` and `batches` transform whole batches at once; `__getitems__`
    lets a DataLoader use the same fast path.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], input_size: int, indices: torch.Tensor | None = None):
        if images.dim() != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise ValueError("images must be a uint8 or float tensor N x C x H x W")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.input_size = int(input_size)
        # Resizing once, to uint8, makes a batch cost one gather and one multiply-add; the
        # rounding (half a grey level) is below the information in the 8-bit source.
        resized_bytes = len(images) * images.shape[1] * self.input_size**2
        if images.is_floating_point():
            images = images.float()
            resized_bytes *= 4
        if images.shape[-2:] != (self.input_size, self.input_size) and resized_bytes <= _PRECOMPUTE_BYTES:
            images = self._resize(images)
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.indices = indices if indices is not None else torch.arange(len(images))
        std_t = torch.tensor(self.std).view(1, -1, 1, 1)
        self._scale = 1.0 / ((1.0 if images.is_floating_point() else 255.0) * std_t)
        self._shift = torch.tensor(self.mean).view(1, -1, 1, 1) / std_t

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i : i + 1])[0], int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.tolist()))

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float B x C x h x w -> float B x C x S x S, resized and normalised."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = self._resize(images)
        # A float batch may be a view of the stored images; never scale those in place.
        x = images.float() if images.dtype == torch.uint8 else images.clone()
        return x.mul_(self._scale).sub_(self._shift)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return resize_batch(images, self.input_size)
        return _resize_uint8(images, self.input_size)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed images and labels at `indices` (positions in this dataset)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.transform(self.images.index_select(0, idx)), self.labels.index_select(0, idx)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches; the order is a seeded permutation when `shuffle`."""
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.get_batch(order[start : start + batch_size])

    def subset(self, positions: Sequence[int] | torch.Tensor) -> "TensorImageDataset":
        """A dataset of the images at `positions`, remembering their source indices."""
        pos = torch.as_tensor(positions, dtype=torch.int64)
        # index_select copies whole rows; plain advanced indexing is several times slower here.
        return TensorImageDataset(self.images.index_select(0, pos), self.labels.index_select(0, pos), self.mean,
                                  self.std, self.input_size, indices=self.indices.index_select(0, pos))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bring a float batch B x C x h x w to B x C x size x size (zero pad when close, else bilinear)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h == w and 0 < size - h <= _MAX_PAD:
        before = (size - h) // 2
        after = size - h - before
        return F.pad(x, (before, after, before, after))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < min(h, w))


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h == w and 0 < size - h <= _MAX_PAD:
        return resize_batch(images, size)  # zero padding is exact in uint8
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        # torch's uint8 path (the one torchvision's Resize uses) is about twice as fast as float.
        out[start : start + chunk] = F.interpolate(images[start : start + chunk], size=(size, size),
                                                   mode="bilinear", align_corners=False, antialias=True)
    return out


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator, fill: Sequence[float] | None = None,
                     flip: bool = True) -> torch.Tensor:
    """Training augmentation on a batch: random crop of the `pad`-padded image, random horizontal flip.

    `fill` is the per-channel value of the padding (the normalised value of black, -mean/std,
    keeps padded borders looking like the background); default 0.
    """
    b, c, h, w = x.shape
    if pad > 0:
        xp = x.new_empty(b, c, h + 2 * pad, w + 2 * pad)
        xp[:] = torch.as_tensor(fill, dtype=x.dtype).view(1, c, 1, 1) if fill is not None else 0.0
        xp[:, :, pad : pad + h, pad : pad + w] = x
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # B x h x 1
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # B x 1 x w
        x = xp.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def batch_inputs(batches, max_batches: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """The inputs of up to `max_batches` of `batches` ((x, y) pairs or tensors) on `device`,
    images in channels_last (the fast layout for CPU convolutions)."""
    for i, batch in enumerate(batches):
        if i >= max_batches:
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.to(device)
        yield x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether `model` stores its first 4-D parameter channels-last, so that its input batches
    should be channels-last too."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding (x, y) batches; a seeded order when `shuffle`.

    In-memory datasets transform each batch in one call (`__getitems__`), so num_workers=0
    is the fast choice for them; workers only help image-file trees.
    """
    if batch_size < 1:
        raise HantError(f"batch size must be at least 1, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=False)


def parse_data_spec(spec: str) -> tuple[str, str | int | None]:
    """Split a data spec into (kind, argument). Raises HantError listing the valid forms."""
    s = (spec or "").strip()
    if s.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return "fashion-mnist", None
    kind, sep, arg = s.partition(":")
    if sep and kind.lower() == "imagefolder" and arg:
        return "imagefolder", arg
    if sep and kind.lower() == "tensors" and arg:
        return "tensors", arg
    if sep and kind.lower() == "synthetic":
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 1:
            raise HantError(f"synthetic:N needs a positive number of images, got '{spec}'")
        return "synthetic", n
    raise HantError(f"unknown data spec '{spec}'; use {VALID_SPECS}")


def load_data(cfg: DataConfig) -> Splits:
    """Load the dataset named by `cfg.spec` and split it.

    Train pool and test are the dataset's own splits (synthetic:N keeps its last N//5 images
    for test; an ImageFolder tree without train/ and test/ or val/ keeps a fixed tenth).
    `cfg.heldout` images are drawn from the train pool by a permutation seeded with
    `cfg.seed` (at most a fifth of the pool, so small sets still train). Mean and std come
    from `cfg.mean`/`cfg.std` when set (a rebuilt run), else from the whole train pool, so
    they do not depend on the seed. Raises HantError on an unknown spec, a missing or
    empty dataset, a single class, or a channel/class count that contradicts `cfg`.
    """
    kind, arg = parse_data_spec(cfg.spec)
    if cfg.input_size < 8:
        raise HantError(f"input size {cfg.input_size} is too small; use at least 8 (e.g. --input-size 32)")
    fixed_heldout = None
    if kind == "fashion-mnist":
        pool, test, classes = _fashion_mnist(cfg)
    elif kind == "synthetic":
        pool, test, classes = _synthetic(int(arg), cfg)
    elif kind == "tensors":
        pool, test, classes, fixed_heldout = _tensor_file(Path(str(arg)))
    else:
        pool, test, classes = _image_folder(Path(str(arg)), cfg)

    num_classes = len(classes)
    in_memory = isinstance(pool, tuple)
    if len(pool[0] if in_memory else pool) == 0 or len(test[0] if in_memory else test) == 0:
        raise HantError(f"data '{cfg.spec}' has an empty train or test split; check the dataset")
    if num_classes < 2:
        raise HantError(f"data '{cfg.spec}' has a single class; a classifier needs at least two")
    in_chans = pool[0].shape[1] if in_memory else pool.in_chans
    if cfg.in_chans is not None and cfg.in_chans != in_chans and kind != "synthetic":
        raise HantError(f"data '{cfg.spec}' has {in_chans} channels but the config says {cfg.in_chans}; "
                        "remove data.in_chans from the config")
    if cfg.num_classes is not None and cfg.num_classes != num_classes and kind != "synthetic":
        raise HantError(f"data '{cfg.spec}' has {num_classes} classes but the config says {cfg.num_classes}; "
                        "remove data.num_classes from the config")

    if in_memory and pool[0].is_floating_point():
        mean, std = [0.0] * int(in_chans), [1.0] * int(in_chans)  # arrives normalised
    elif cfg.mean is not None and cfg.std is not None:
        if len(cfg.mean) != in_chans or len(cfg.std) != in_chans:
            raise HantError(f"data.mean and data.std need {in_chans} values each; remove them to recompute")
        mean, std = [float(m) for m in cfg.mean], [float(s) for s in cfg.std]
    else:
        mean, std = _channel_stats(pool)

    n_pool = len(pool[0]) if in_memory else len(pool)
    if fixed_heldout is not None:
        # The caller named its held-out images: the last `fixed_heldout` of the pool.
        train_idx = torch.arange(n_pool - fixed_heldout)
        heldout_idx = torch.arange(n_pool - fixed_heldout, n_pool)
    else:
        n_held = min(max(cfg.heldout, 0), n_pool // 5)
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(cfg.seed))
        heldout_idx, _ = perm[:n_held].sort()
        train_idx, _ = perm[n_held:].sort()

    if in_memory:
        base = TensorImageDataset(pool[0], pool[1], mean, std, cfg.input_size)
        tbase = TensorImageDataset(test[0], test[1], mean, std, cfg.input_size)
        train, heldout = base.subset(train_idx), base.subset(heldout_idx)
    else:
        pool.set_normalisation(mean, std)
        test.set_normalisation(mean, std)
        train, heldout, tbase = pool.subset(train_idx), pool.subset(heldout_idx), test
    return Splits(train=train, heldout=heldout, test=tbase, in_chans=int(in_chans), num_classes=num_classes,
                  mean=mean, std=std, input_size=cfg.input_size, spec=cfg.spec, classes=classes,
                  train_indices=train_idx, heldout_indices=heldout_idx)


def _channel_stats(pool) -> tuple[list[float], list[float]]:
    if isinstance(pool, tuple):
        x = pool[0]
        # A histogram of the 256 grey levels gives exact sums without a float copy of the set.
        levels = torch.arange(256, dtype=torch.float64) / 255.0
        hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])])
        hist = hist.to(torch.float64)
        s, s2 = hist @ levels, hist @ levels**2
        n = x.shape[0] * x.shape[2] * x.shape[3]
    else:
        s, s2, n = pool.raw_stats()
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
    # A constant channel would divide by ~0; treat it as unit spread instead.
    std = torch.where(std < 1e-3, torch.ones_like(std), std)
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


# ---------------------------------------------------------------- Fashion-MNIST


def _fashion_mnist(cfg: DataConfig) -> tuple[tuple, tuple, list[str]]:
    folder = _find_fashion_mnist(cfg.data_dir)
    if folder is None:
        folder = _download_fashion_mnist(cfg.data_dir)
    xtr = _read_idx(_idx_file(folder, "train-images-idx3-ubyte"), images=True)
    ytr = _read_idx(_idx_file(folder, "train-labels-idx1-ubyte"), images=False)
    xte = _read_idx(_idx_file(folder, "t10k-images-idx3-ubyte"), images=True)
    yte = _read_idx(_idx_file(folder, "t10k-labels-idx1-ubyte"), images=False)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise HantError(f"Fashion-MNIST files in {folder} disagree on the number of images; reinstall them")
    return (xtr.unsqueeze(1), ytr), (xte.unsqueeze(1), yte), list(FASHION_MNIST_CLASSES)


def _fashion_mnist_dirs(data_dir: str | None) -> list[Path]:
    dirs = []
    if data_dir:
        d = Path(data_dir).expanduser()
        dirs += [d, d / "FashionMNIST" / "raw"]
    dirs += [DEBIAN_FASHION_MNIST, DEFAULT_DATA_ROOT / "FashionMNIST" / "raw"]
    return dirs


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_fashion_mnist(data_dir: str | None) -> Path | None:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for d in _fashion_mnist_dirs(data_dir):
        if all(_idx_file(d, s) is not None for s in stems):
            return d
    return None


def _download_fashion_mnist(data_dir: str | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_ROOT
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise HantError(f"Fashion-MNIST not found and the download failed ({e.__class__.__name__}); install "
                        "the Debian package dataset-fashion-mnist or pass --data-dir with the idx files") from e
    found = _find_fashion_mnist(str(root))
    if found is None:
        raise HantError(f"Fashion-MNIST download left no idx files in {root}; pass --data-dir with the idx files")
    return found


def _read_idx(path: Path | None, images: bool) -> torch.Tensor:
    """Read an idx1/idx3 ubyte file (optionally gzipped) into a uint8 tensor."""
    assert path is not None
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise HantError(f"cannot read {path} ({e}); reinstall the dataset files") from e
    ndim = 3 if images else 1
    if len(raw) < 4 + 4 * ndim:
        raise HantError(f"{path} is truncated; reinstall the dataset files")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise HantError(f"{path} is not an idx{ndim} ubyte file; reinstall the dataset files")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise HantError(f"{path} has {len(body)} bytes of data, expected {math.prod(shape)}; reinstall it")
    t = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)
    return t if images else t.to(torch.int64)


# ---------------------------------------------------------------- synthetic


def _synthetic(n: int, cfg: DataConfig) -> tuple[tuple, tuple, list[str]]:
    """n images of smooth class prototypes with per-image contrast, shift and noise.

    Channels and classes come from cfg.in_chans / cfg.num_classes (default 1 and 10, like
    Fashion-MNIST); the side is cfg.input_size, so no resizing happens.
    """
    c = cfg.in_chans or 1
    k = cfg.num_classes or 10
    s = cfg.input_size
    if n < 2 * k:
        raise HantError(f"synthetic:{n} is too small for {k} classes; use at least synthetic:{2 * k}")
    g = torch.Generator().manual_seed(_SYNTHETIC_CONTENT_SEED)
    protos = F.interpolate(torch.randn(k, c, 4, 4, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).view(k, 1, 1, 1)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    x = protos[labels] * contrast + 0.5 * torch.randn(n, c, s, s, generator=g)
    # Small shifts so that a network has to learn the pattern rather than single pixels.
    x = random_crop_flip(x, pad=max(1, s // 16), generator=g, flip=False)
    images = (128 + 40 * x).round().clamp(0, 255).to(torch.uint8)
    n_test = max(k, n // 5)
    pool = (images[: n - n_test], labels[: n - n_test])
    test = (images[n - n_test :], labels[n - n_test :])
    return pool, test, [f"class{i}" for i in range(k)]


# ---------------------------------------------------------------- tensors in a file

TENSOR_SPLITS = ("train", "heldout", "test")


def save_tensor_data(path: str | Path, train: tuple[torch.Tensor, torch.Tensor],
                     heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                     test: tuple[torch.Tensor, torch.Tensor] | None = None,
                     classes: Sequence[str] | None = None) -> str:
    """Write (images, labels) splits to a safetensors file that the `tensors:` spec reads.

    Images are N x C x H x W, uint8 grey levels or float values already normalised; labels
    are integer class indices. Returns the file's sha256. Raises HantError on mismatching
    shapes or dtypes.
    """
    from hant.workspace import save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    shape = None
    for name, part in zip(TENSOR_SPLITS, (train, heldout, test)):
        if part is None:
            continue
        images, labels = part
        images, labels = torch.as_tensor(images), torch.as_tensor(labels).reshape(-1)
        if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
            raise HantError(f"{name} data must be N x C x H x W images with N labels, got images "
                            f"{tuple(images.shape)} and {len(labels)} labels")
        if shape is not None and images.shape[1:] != shape:
            raise HantError(f"{name} images are {tuple(images.shape[1:])} but train images are {tuple(shape)}")
        shape = images.shape[1:]
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise HantError(f"{name} images must be uint8 or float, got {images.dtype}")
        if labels.is_floating_point() or labels.is_complex():
            raise HantError(f"{name} labels must be integer class indices, got {labels.dtype}")
        tensors[f"{name}_images"] = images.float().contiguous() if images.is_floating_point() else images.contiguous()
        tensors[f"{name}_labels"] = labels.to(torch.int64).contiguous()
    meta = {"classes": ",".join(classes)} if classes else None
    return save_safetensors(Path(path), tensors, metadata=meta)


def _tensor_file(path: Path) -> tuple[tuple, tuple, list[str], int | None]:
    from safetensors import safe_open

    if not path.is_file():
        raise HantError(f"data file {path} not found; write one with hant.data.save_tensor_data")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise HantError(f"{path} is not a readable safetensors file ({e}); write it with "
                        "hant.data.save_tensor_data") from e
    if "train_images" not in tensors or "train_labels" not in tensors:
        raise HantError(f"{path} lacks train_images/train_labels; write it with hant.data.save_tensor_data")
    parts = {n: (tensors[f"{n}_images"], tensors[f"{n}_labels"]) for n in TENSOR_SPLITS
             if f"{n}_images" in tensors and f"{n}_labels" in tensors}
    dtypes = {p[0].dtype for p in parts.values()}
    if len(dtypes) > 1:
        raise HantError(f"{path} mixes image dtypes {sorted(map(str, dtypes))}; give every split the same dtype")
    labels = torch.cat([p[1] for p in parts.values()])
    if int(labels.min()) < 0:
        raise HantError(f"{path} has negative labels; labels must be class indices 0..K-1")
    classes = [c for c in meta.get("classes", "").split(",") if c]
    k = max(len(classes), int(labels.max()) + 1)
    classes = classes + [f"class{i}" for i in range(len(classes), k)]
    train, held = parts["train"], parts.get("heldout")
    pool = (torch.cat([train[0], held[0]]), torch.cat([train[1], held[1]])) if held is not None else train
    if "test" not in parts and held is None:
        raise HantError(f"{path} has only train images; add heldout_* or test_* images so that accuracy is "
                        "measured on images nobody trained on")
    # Without a test split, accuracy is reported on the held-out images (never trained on).
    test = parts.get("test") or held
    return pool, test, classes, (len(held[0]) if held is not None else None)


# ---------------------------------------------------------------- ImageFolder


class _FolderDataset(Dataset):
    """Image files decoded per item: resize the short side, centre crop, normalise."""

    def __init__(self, samples: list[tuple[str, int]], in_chans: int, input_size: int,
                 positions: torch.Tensor | None = None):
        self.samples = samples
        self.in_chans = in_chans
        self.input_size = input_size
        self.indices = positions if positions is not None else torch.arange(len(samples))
        self.mean = [0.0] * in_chans
        self.std = [1.0] * in_chans

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __len__(self) -> int:
        return len(self.samples)

    def _raw(self, i: int) -> torch.Tensor:
        from PIL import Image
        import numpy as np

        path, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.in_chans == 1 else "RGB")
                w, h = im.size
                scale = self.input_size / min(w, h)
                im = im.resize((max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))),
                               Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.input_size) // 2, (h - self.input_size) // 2
                im = im.crop((left, top, left + self.input_size, top + self.input_size))
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise HantError(f"cannot read image {path} ({e}); remove or fix it") from e
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._raw(i).float().div_(255.0)
        m = torch.tensor(self.mean).view(-1, 1, 1)
        s = torch.tensor(self.std).view(-1, 1, 1)
        return (x - m) / s, self.samples[i][1]

    def raw_stats(self, max_images: int = 1000) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel sum, sum of squares and pixel count over a fixed sample of images."""
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:max_images]
        s = torch.zeros(self.in_chans, dtype=torch.float64)
        s2 = torch.zeros(self.in_chans, dtype=torch.float64)
        n = 0
        for i in pick.tolist():
            x = self._raw(i).to(torch.float64).div_(255.0)
            s += x.sum(dim=(1, 2))
            s2 += x.pow(2).sum(dim=(1, 2))
            n += x.shape[1] * x.shape[2]
        return s, s2, n

    def subset(self, positions: torch.Tensor) -> "_FolderDataset":
        pos = positions.tolist()
        d = _FolderDataset([self.samples[i] for i in pos], self.in_chans, self.input_size,
                           positions=self.indices[positions])
        d.set_normalisation(self.mean, self.std)
        return d


def _image_folder(root: Path, cfg: DataConfig) -> tuple[_FolderDataset, _FolderDataset, list[str]]:
    from torchvision.datasets import ImageFolder

    root = root.expanduser()
    if not root.is_dir():
        raise HantError(f"imagefolder path {root} is not a folder; give a folder with one subfolder per class")

    def scan(folder: Path) -> ImageFolder:
        try:
            return ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as e:
            raise HantError(f"{folder} holds no images in class subfolders ({e}); "
                            "lay it out as FOLDER/CLASS/IMAGE") from None

    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        tr, te = scan(root / "train"), scan(test_dir)
        if tr.classes != te.classes:
            raise HantError(f"{root / 'train'} and {test_dir} have different class folders; make them match")
        pool_samples, test_samples, classes = list(tr.samples), list(te.samples), list(tr.classes)
    else:
        full = scan(root)
        classes = list(full.classes)
        # A fixed tenth for test, independent of the seed, so every run tests on the same images.
        perm = torch.randperm(len(full.samples), generator=torch.Generator().manual_seed(0))
        n_test = max(1, len(full.samples) // 10) if len(full.samples) > 1 else 0
        test_pos = set(perm[:n_test].tolist())
        pool_samples = [s for i, s in enumerate(full.samples) if i not in test_pos]
        test_samples = [s for i, s in enumerate(full.samples) if i in test_pos]
    if not pool_samples:
        raise HantError(f"{root} holds no images; lay it out as FOLDER/CLASS/IMAGE")
    in_chans = _folder_channels(pool_samples[0][0]) if cfg.in_chans is None else cfg.in_chans
    return (_FolderDataset(pool_samples, in_chans, cfg.input_size),
            _FolderDataset(test_samples, in_chans, cfg.input_size), classes)


def _folder_channels(path: str) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
    except OSError as e:
        raise HantError(f"cannot read image {path} ({e}); remove or fix it") from e
