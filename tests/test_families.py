"""End to end on other CNN families: `hant.accelerate` on a ResNet, a RegNet, a ConvNeXt and a
MobileNetV3 teacher, and on a user's plain Conv-BN-ReLU network, with tiny budgets.

The budgets are far too small for accuracy; these check that every stage runs on each
family's blocks, that the pool offers the candidates derived from the teacher's own layers,
and that the student comes back whole and loadable.
"""

from __future__ import annotations

import pytest
import timm
import torch
import yaml
from torch import nn

import hant
from hant import ops
from hant.config import DataConfig
from hant.data import load_data
from hant.workspace import read_json

# A small pool with the derived families: the default space would train and time ~35
# candidates per layer, four times the suite's budget for these tests.
SPACE = {"name": "families", "candidates": ["teacher", "proj", "skip", "mb_k3_e1_relu", "self_w50", "self_w100_k3",
                                             "sep", "lr_r50", "grp_g2"]}
FAST = {"distill": {"images": 32, "batch_size": 16, "heldout_images": 16, "redistill_images": 32},
        "score": {"images": 16},
        "finetune": {"epochs": 0.05, "min_steps": 0, "batch_size": 16, "bn_batches": 1},
        "latency": {"threads": 1, "warmup": 1, "min_repeats": 3, "max_repeats": 5, "min_time_s": 0.0},
        "data": {"batch_size": 16}}


@pytest.fixture(scope="module")
def splits():
    s = load_data(DataConfig(spec="synthetic:96", input_size=32, heldout=16))

    def pair(ds):
        return ds.get_batch(torch.arange(len(ds)))

    return pair(s.train), pair(s.heldout), pair(s.test)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "families.yaml").write_text(yaml.safe_dump(SPACE))
    p = folder / "fast.yaml"
    p.write_text(yaml.safe_dump({**FAST, "space": str(folder / "families.yaml")}))
    return p


class ConvBnRelu(nn.Module):
    """A user's plain CNN: five Conv-BN-ReLU stages, its own classes, no library blocks."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        chs = [1, 16, 32, 32, 64, 64]
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(a, b, 3, 2 if i % 2 == 0 else 1, 1, bias=False),
                                                    nn.BatchNorm2d(b), nn.ReLU())
                                      for i, (a, b) in enumerate(zip(chs, chs[1:]))])
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


def _check(r, model_layers: int | None = None) -> dict:
    plan = read_json(r.run / "plans" / f"{r.plans[0]}.json")
    layers = read_json(r.run / "layers.json")["layers"]
    if model_layers is not None:
        assert len(layers) == model_layers
    offered = {s.split("_", 1)[0] for d in layers for s in d["candidates"]}
    assert offered & set(ops.derived_families()), "the pool offers no candidate derived from the teacher's layers"
    ev = r.evals[r.plans[0]]
    assert ev["speedup"] == pytest.approx(ev["teacher"]["latency_ms"] / ev["student"]["latency_ms"])
    assert 0.0 <= ev["student"]["top1"] <= 100.0
    with torch.no_grad():
        assert r.student(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert set(plan["layers"]) == {d["name"] for d in layers}
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("name,layers", [("resnet18", 8), ("regnetx_002", 13), ("convnext_atto", 15),
                                         ("mobilenetv3_small_050", 12)])
def test_accelerate_timm_family(name, layers, splits, config, tmp_path):
    train, held, test = splits
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, num_classes=10).eval()
    r = hant.accelerate(model, train, held, test_data=test, speedup=1.3, run=tmp_path / "run", config=config,
                        log=lambda *_: None)
    assert r.source == f"timm:{name}"
    _check(r, layers)


def test_accelerate_plain_conv_bn_relu_network(splits, config, tmp_path):
    train, held, _ = splits
    torch.manual_seed(0)
    r = hant.accelerate(ConvBnRelu().eval(), train, held, speedup=1.3, run=tmp_path / "run", config=config,
                        log=lambda *_: None)
    plan = _check(r)
    layers = read_json(r.run / "layers.json")["layers"]
    # Each stage's convolution is a layer; its pool holds more than itself, proj and skip.
    for d in layers:
        assert {s.split("_", 1)[0] for s in d["candidates"]} & {"sep", "lr", "grp"}, d["name"]
    assert plan["layers"]
