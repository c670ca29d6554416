"""The output layer fitted to the teacher's logits before fine-tuning (hant.headfit)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hant.headfit import fit_output_layer


class _Net(nn.Module):
    """Features (a conv, pooled) then a linear classifier, optionally post-scaled."""

    def __init__(self, classes: int = 5, scale: float = 1.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, classes)
        self.scale = scale

    def forward(self, x):
        out = self.head(self.features(x))
        return out * self.scale if self.scale != 1.0 else out


def _batches(n_batches: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 1, 8, 8, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(n_batches)]


def _kl(model, teacher, batches) -> float:
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        return float(F.kl_div(F.log_softmax(model.eval()(x), 1), F.log_softmax(teacher.eval()(x), 1),
                              log_target=True, reduction="batchmean"))


def test_a_mis_scaled_head_is_refitted_to_the_teachers_logits():
    teacher = _Net().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the same features, logits 5x too large and shifted: KL far from 0
        student.head.weight.mul_(5.0)
        student.head.bias.add_(torch.arange(5.0))
    fresh = _batches(seed=7)
    before = _kl(student, teacher, fresh)
    res = fit_output_layer(student, teacher, _batches(), max_batches=4)
    assert res["applied"] and res["layer"] == "head" and res["images"] == 4 * 32
    assert res["kl_after"] < res["kl_before"]
    after = _kl(student, teacher, fresh)
    assert before > 0.05 and after < 0.01 * before  # on images it was not fitted on
    # Only the output layer changed.
    for (name, p), q in zip(student.features.state_dict().items(), teacher.features.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_teachers_own_head_is_kept_and_the_mode_restored():
    teacher = _Net().eval()
    model = copy.deepcopy(teacher).train()
    res = fit_output_layer(model, teacher, _batches(), max_batches=3)
    assert not res["applied"] and res["kl_before"] == 0.0  # nothing can lower a KL of 0
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))


def test_no_fit_without_a_linear_output_layer_of_the_teachers_shape():
    teacher = _Net()
    # Its output is the linear layer's output times 2: refitting the layer would not fit the output.
    res = fit_output_layer(_Net(scale=2.0, seed=3), teacher, _batches(), max_batches=2)
    assert not res["applied"] and "not the output of an nn.Linear" in res["reason"]
    conv_only = nn.Sequential(nn.Conv2d(1, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    res = fit_output_layer(conv_only, teacher, _batches(), max_batches=2)
    assert not res["applied"] and "no nn.Linear" in res["reason"]
    res = fit_output_layer(_Net(classes=3), teacher, _batches(), max_batches=2)
    assert not res["applied"] and "is not the teacher's" in res["reason"]
    res = fit_output_layer(_Net(seed=4), teacher, [(torch.randn(1, 1, 8, 8), torch.zeros(1))], max_batches=2)
    assert not res["applied"] and "1 image(s)" in res["reason"]
