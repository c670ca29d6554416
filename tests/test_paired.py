"""Paired top-1 comparisons (hant.paired): the drop and its 95% interval from disagreeing images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hant.errors import HantError
from hant.paired import Z95, compare, compare_loss, pack, predictions, same_images, unpack


def _right(pattern: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in pattern])


def test_compare_counts_only_the_images_one_network_gets_right():
    # 10 images: both right on 6, the reference alone on 3, the network alone on 1.
    ref, net = _right("1111111110"), _right("1111110001")
    r = compare(ref, net)
    assert (r["images"], r["reference_only"], r["network_only"]) == (10, 3, 1)
    assert r["reference_top1"] == pytest.approx(90.0) and r["top1"] == pytest.approx(70.0)
    assert r["drop"] == pytest.approx(20.0)
    # Per-image differences: three 1s, one -1, six 0s: variance 4/10 - 0.2^2 = 0.36 over 10 images.
    half = 100.0 * Z95 * (0.36 / 10) ** 0.5
    assert r["drop_ci95"] == pytest.approx([20.0 - half, 20.0 + half])


def test_the_same_answers_give_no_drop_and_no_width():
    right = _right("1101")
    assert compare(right, right)["drop_ci95"] == [0.0, 0.0]


def test_compare_refuses_vectors_of_other_images():
    with pytest.raises(ValueError, match="equally long"):
        compare(_right("11"), _right("111"))
    with pytest.raises(ValueError, match="non-empty"):
        compare(_right(""), _right(""))


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    # Two correlated networks on 2000 images: agree on 90%, the reference alone right on 6%,
    # the network alone on 4%: the true drop is 2 points.
    g = torch.Generator().manual_seed(0)
    covered, draws = 0, 400
    for _ in range(draws):
        u = torch.rand(2000, generator=g)
        both = u < 0.85
        ref = both | ((u >= 0.90) & (u < 0.96))
        net = both | (u >= 0.96)
        lo, hi = compare(ref, net)["drop_ci95"]
        covered += lo <= 2.0 <= hi
    assert 0.92 <= covered / draws <= 0.98


def test_predictions_keep_loader_order_and_the_models_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    x = torch.randn(10, 4)
    loader = [(x[:4], torch.arange(4) % 3), (x[4:], torch.arange(4, 10) % 3)]
    scored = predictions(model, loader)
    assert model.training
    assert torch.equal(scored.labels, torch.arange(10) % 3)
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.equal(scored.pred, out.argmax(1))
    assert torch.allclose(scored.loss, nn.functional.cross_entropy(out, scored.labels, reduction="none"))
    assert torch.equal(scored.right, out.argmax(1) == scored.labels)
    same_images(scored, scored)
    with pytest.raises(HantError, match="different images"):
        same_images(scored, predictions(model, loader[::-1]))


def test_compare_loss_gives_the_mean_paired_increase():
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    r = compare_loss(ref, ref + torch.tensor([0.1, 0.3, 0.1, 0.3]))
    assert r["increase"] == pytest.approx(0.2) and r["loss"] == pytest.approx(0.45)
    # Differences 0.1, 0.3, 0.1, 0.3: sample standard deviation 0.1155, over 2 (sqrt 4).
    half = Z95 * 0.11547005 / 2
    assert r["increase_ci95"] == pytest.approx([0.2 - half, 0.2 + half])
    with pytest.raises(ValueError, match="equally long"):
        compare_loss(ref, ref[:2])


def test_pack_keeps_every_image():
    right = torch.rand(10001, generator=torch.Generator().manual_seed(1)) < 0.9
    packed = pack(right)
    assert packed["n"] == 10001 and len(packed["bits"]) < 1800  # JSON-sized: 8 images a byte, base64
    assert torch.equal(unpack(packed), right)
