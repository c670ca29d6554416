"""Embedding compatibility: cosine similarity and cross-model retrieval of student features."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hant.embedding import compatibility, penultimate_features, retrieval_top1
from hant.errors import HantError


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _loader(n: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    # Each class is a brightness level, so features cluster by class.
    x = y.view(-1, 1, 1, 1).float() + 0.05 * torch.randn(n, 1, 8, 8, generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_retrieval_is_leave_one_out_and_counts_class_hits():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    assert retrieval_top1(emb, emb, labels) == 100.0  # without leave-one-out each image would find itself
    assert retrieval_top1(emb, emb, torch.tensor([0, 1, 0, 1])) == 0.0
    with pytest.raises(ValueError):
        retrieval_top1(emb, emb[:3], labels)


def test_a_copy_is_fully_compatible_and_a_stranger_is_not():
    torch.manual_seed(0)
    teacher = Net()
    same = compatibility(copy.deepcopy(teacher), teacher, _loader())
    assert same["images"] == 60 and same["feature"] == "input of head"
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5)
    r = same["retrieval_top1"]
    assert r["student_to_teacher"] == r["teacher_to_teacher"] == 100.0
    # A network of the same shape with other weights: its features are another space.
    torch.manual_seed(1)
    other = Net()
    with torch.no_grad():
        other.features[0].weight.neg_()  # ReLU features of negated filters: disjoint supports
    far = compatibility(other, teacher, _loader())
    assert far["cosine"] < 0.5
    assert far["retrieval_top1"]["teacher_to_teacher"] == 100.0


def test_features_of_another_size_are_reported_not_compared():
    out = compatibility(Net(width=8), Net(width=16), _loader())
    assert "cosine" not in out and "8 dimensions" in out["error"]


def test_features_restore_mode_and_need_a_classifier():
    net = Net().train()
    feats, labels = penultimate_features(net, _loader(20))
    assert feats.shape == (20, 16) and labels.shape == (20,) and net.training
    with pytest.raises(HantError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.Conv2d(1, 2, 3)), _loader(20))
