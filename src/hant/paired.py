"""Paired accuracy comparisons: whether one network's top-1 differs from another's beyond noise.

Two networks scored on the same test images are compared image by image: what matters is
the images only one of them gets right. On 10,000 images a drop of 0.3 points is 30 images,
and the sampling error of a difference of two accuracies measured on the same images is
set by how often the two disagree, not by the accuracies themselves. `compare` gives the
difference with its 95% interval (the Wald interval for paired proportions, McNemar's
setting), so that "drop <= 0.4" can be read against the noise of the test split.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from hant.errors import HantError

__all__ = ["Scored", "predictions", "same_images", "compare", "compare_loss", "pack", "unpack", "Z95"]

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


@dataclasses.dataclass(frozen=True)
class Scored:
    """One network's answers on a split, image by image, in loader order (int64/float32, CPU)."""
    pred: torch.Tensor  # arg-max class
    loss: torch.Tensor  # cross-entropy against the label
    labels: torch.Tensor

    @property
    def right(self) -> torch.Tensor:
        return self.pred == self.labels


@torch.no_grad()
def predictions(model: nn.Module, loader: Iterable) -> Scored:
    """The arg-max class and cross-entropy of `model`, and the label, for every image of
    `loader` (x, y batches). The model runs in eval mode on its own device and memory format;
    its train/eval mode is restored."""
    from hant.data import is_channels_last

    was = model.training
    device = next(model.parameters()).device
    cl = is_channels_last(model)
    preds: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        model.eval()
        for x, y in loader:
            x = x.to(device, memory_format=torch.channels_last) if cl else x.to(device)
            out = model(x).float()
            preds.append(out.argmax(1).cpu())
            losses.append(nn.functional.cross_entropy(out, y.to(device), reduction="none").cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    return Scored(torch.cat(preds).long(), torch.cat(losses), torch.cat(labels).long())


def same_images(a: Scored, b: Scored) -> None:
    """Raise HantError unless `a` and `b` scored the same labels in the same order."""
    if not torch.equal(a.labels, b.labels):
        raise HantError("the two networks were scored on different images; use the same unshuffled loader")


def compare(reference_right: torch.Tensor, right: torch.Tensor) -> dict[str, Any]:
    """Top-1 of a network against a reference on the same images.

    Takes two boolean vectors, one entry per image (True: that network got the image right).
    Returns {"images", "reference_top1", "top1", "drop" (reference minus network, points),
    "drop_ci95" [lo, hi] (points), "reference_only", "network_only" (images only that one
    gets right)}. Raises ValueError when the vectors differ in length or are empty.
    """
    a, b = reference_right.bool().flatten(), right.bool().flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"need two equally long, non-empty correctness vectors (got {a.numel()} and {b.numel()})")
    n = a.numel()
    only_ref, only_net = int((a & ~b).sum()), int((b & ~a).sum())
    d = (only_ref - only_net) / n
    # Per-image difference a_i - b_i takes values in {-1, 0, 1}; its sample variance over n is
    # ((only_ref + only_net) / n - d^2), the standard error of the mean d that over n.
    se = math.sqrt(max((only_ref + only_net) / n - d * d, 0.0) / n)
    return {"images": n, "reference_top1": 100.0 * int(a.sum()) / n, "top1": 100.0 * int(b.sum()) / n,
            "drop": 100.0 * d, "drop_ci95": [100.0 * (d - Z95 * se), 100.0 * (d + Z95 * se)],
            "reference_only": only_ref, "network_only": only_net}


def compare_loss(reference_loss: torch.Tensor, loss: torch.Tensor) -> dict[str, Any]:
    """Mean per-image loss of a network against a reference's on the same images.

    Returns {"images", "reference_loss", "loss", "increase" (network minus reference, mean),
    "increase_ci95" [lo, hi]} (normal interval of the mean paired difference). Raises
    ValueError when the vectors differ in length or are empty.
    """
    a, b = reference_loss.double().flatten(), loss.double().flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"need two equally long, non-empty loss vectors (got {a.numel()} and {b.numel()})")
    d = b - a
    mean = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
    return {"images": d.numel(), "reference_loss": float(a.mean()), "loss": float(b.mean()), "increase": mean,
            "increase_ci95": [mean - Z95 * se, mean + Z95 * se]}


def pack(right: torch.Tensor) -> dict[str, Any]:
    """A correctness vector as JSON: {"n", "bits"} (bit-packed, base64), 1,700 characters for
    10,000 images, so that a benchmark's saved result can be compared image by image later."""
    import numpy as np

    r = right.bool().flatten().cpu().numpy()
    return {"n": int(r.size), "bits": base64.b64encode(np.packbits(r)).decode()}


def unpack(d: Mapping[str, Any]) -> torch.Tensor:
    """The boolean vector that `pack` gave `d`."""
    import numpy as np

    bits = np.frombuffer(base64.b64decode(d["bits"]), dtype=np.uint8)
    return torch.from_numpy(np.unpackbits(bits)[: int(d["n"])].astype(bool))
