"""The Python API: `hant.accelerate(model, train_data, heldout_data, ...)` and the `tensors:` data spec."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import hant
from hant import teacher as teacher_mod
from hant.config import DataConfig
from hant.data import load_data, save_tensor_data
from hant.errors import HantError

# Small enough to run every stage in seconds.
FAST = {"space": "tiny", "distill": {"images": 256, "batch_size": 32, "redistill_images": 64},
        "finetune": {"epochs": 0.5, "min_steps": 0, "batch_size": 32, "bn_batches": 2},
        "latency": {"threads": 1, "warmup": 1, "min_repeats": 3, "max_repeats": 5, "min_time_s": 0.0}, "data": {"batch_size": 32}}


@pytest.fixture(scope="module")
def splits():
    s = load_data(DataConfig(spec="synthetic:480", input_size=32, heldout=80))

    def pair(ds):
        return ds.get_batch(torch.arange(len(ds)))

    return pair(s.train), pair(s.heldout), pair(s.test)


def _fit(model: nn.Module, data, epochs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    x, y = data
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "fast.yaml"
    p.write_text(yaml.safe_dump(FAST))
    return p


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TinyNet(nn.Module):
    """An architecture only its author can build: no source string names it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1)
        self.features = nn.Sequential(Block(16, 16), Block(16, 32, 2), Block(32, 32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(self.stem(x)).mean((2, 3)))


def test_accelerate_timm_model_in_memory_data(tmp_path, splits):
    import timm

    train, held, test = splits
    torch.manual_seed(0)
    model = _fit(timm.create_model("test_efficientnet", in_chans=1, num_classes=10), train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = hant.accelerate(model, train, held, test_data=test, speedup=1.5, run=tmp_path / "run",
                        config=_config(tmp_path), log=lambda *_: None)
    assert r.source == "timm:test_efficientnet"  # rebuilt from timm, so the run resumes in any process
    assert r.plans == ["onnxruntime-cpu-b1-x1.5"]
    ev = r.evals[r.plans[0]]
    assert ev["speedup"] > 0 and 0.0 <= ev["student"]["top1"] <= 100.0  # no timed assertion: a shared machine
    assert ev["speedup"] == pytest.approx(ev["teacher"]["latency_ms"] / ev["student"]["latency_ms"])
    with torch.no_grad():
        out = r.student(test[0][:4])
    assert out.shape == (4, 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert (r.run / "report.md").exists()

    # The same call again resumes: nothing is retrained, the same student comes back.
    w1 = dict(r.student.state_dict())
    lines: list[str] = []
    r2 = hant.accelerate(model, train, held, test_data=test, speedup=1.5, run=tmp_path / "run",
                         config=_config(tmp_path), log=lines.append)
    assert any("finetune onnxruntime-cpu-b1-x1.5: complete, skipped" in ln for ln in lines)
    assert all(torch.equal(v, r2.student.state_dict()[k]) for k, v in w1.items())
    assert len(list((tmp_path / "run").glob("data-*.safetensors"))) == 1

    # Damaged student weights and plan are redone by the same call, not skipped as finished.
    student_file = tmp_path / "run" / "students" / r.plans[0] / "student.safetensors"
    student_file.write_bytes(student_file.read_bytes()[:-64])
    (tmp_path / "run" / "plans" / f"{r.plans[0]}.json").write_text("{not json")
    lines.clear()
    r3 = hant.accelerate(model, train, held, test_data=test, speedup=1.5, run=tmp_path / "run",
                         config=_config(tmp_path), log=lines.append)
    assert not any("complete, skipped" in ln and ("finetune" in ln or "select" in ln) for ln in lines)
    assert r3.evals[r3.plans[0]]["speedup"] > 1.0
    with torch.no_grad():
        assert r3.student(test[0][:2]).shape == (2, 10)

    # Other data in the same run folder is refused instead of mixed with the finished work.
    other = (train[0][:-8], train[1][:-8])
    with pytest.raises(HantError, match="already initialised with another configuration"):
        hant.accelerate(model, other, held, test_data=test, speedup=1.5, run=tmp_path / "run",
                        config=_config(tmp_path), log=lambda *_: None)


def test_accelerate_custom_module_is_kept_in_memory(tmp_path, splits, monkeypatch):
    train, held, _ = splits
    torch.manual_seed(0)
    model = _fit(TinyNet(), train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = hant.accelerate(model, train, held, speedup=1.2, run=tmp_path / "run", config=_config(tmp_path),
                            log=lambda *_: None)
    assert r.source.startswith("memory:TinyNet-")
    # Every plan the selection judged likely to lose accuracy is named, as a warning and on the result.
    from hant.api import AccuracyRiskWarning

    risks = {p: json.loads((r.run / "plans" / f"{p}.json").read_text())["accuracy_risk"] for p in r.plans}
    assert set(r.warnings) == {p for p, risk in risks.items() if risk["large"]}
    assert sorted(str(w.message) for w in caught if w.category is AccuracyRiskWarning) == sorted(r.warnings.values())
    ev = r.evals[r.plans[0]]
    assert ev["speedup"] > 1.0
    with torch.no_grad():
        assert r.student(held[0][:2]).shape == (2, 10)
    # A process that does not hold the model cannot rebuild the run's teacher, and says what to do.
    monkeypatch.setattr(teacher_mod, "_IN_MEMORY", {})
    with pytest.raises(HantError, match=r"call hant.accelerate\(model, ...\) again"):
        hant.load_student(r.run / "students" / r.plans[0])


def test_accelerate_rejects_bad_input(tmp_path, splits):
    train, held, _ = splits
    with pytest.raises(HantError, match="heldout_data is required"):
        hant.accelerate(TinyNet(), train, None, run=tmp_path / "r1", log=lambda *_: None)
    with pytest.raises(HantError, match="square inputs"):
        hant.accelerate(TinyNet(), (train[0][..., :24], train[1]), held, run=tmp_path / "r2", log=lambda *_: None)
    with pytest.raises(HantError, match="must be a \\(images, labels\\) pair"):
        hant.accelerate(TinyNet(), 42, held, run=tmp_path / "r3", log=lambda *_: None)


def test_tensor_file_spec(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    f = tmp_path / "d.safetensors"
    save_tensor_data(f, (x[:40], y[:40]), (x[40:50], y[40:50]), (x[50:], y[50:]), classes=["a", "b", "c"])
    s = load_data(DataConfig(spec=f"tensors:{f}", input_size=12))
    assert (len(s.train), len(s.heldout), len(s.test)) == (40, 10, 10)
    assert s.classes == ["a", "b", "c"] and s.in_chans == 3
    # uint8 images are normalised with the train pool's statistics, as for Fashion-MNIST.
    xb, yb = s.heldout.get_batch(torch.arange(10))
    expect = (x[40:50].float() / 255 - torch.tensor(s.mean).view(1, 3, 1, 1)) / torch.tensor(s.std).view(1, 3, 1, 1)
    assert torch.allclose(xb, expect, atol=1e-5) and torch.equal(yb, y[40:50])

    # Float images are taken as normalised; without a test split the held-out images are the test.
    xf = torch.randn(30, 1, 16, 16, generator=g)
    save_tensor_data(f, (xf[:20], y[:20]), (xf[20:], y[20:30]))
    s = load_data(DataConfig(spec=f"tensors:{f}", input_size=16))
    assert s.mean == [0.0] and s.std == [1.0]
    assert torch.equal(s.test.get_batch([0])[0], xf[20:21])
    assert torch.equal(s.train.get_batch([3])[0], xf[3:4])  # reading twice leaves the stored images intact
    assert torch.equal(s.train.get_batch([3])[0], xf[3:4])

    save_tensor_data(f, (xf[:20], y[:20]))
    with pytest.raises(HantError, match="only train images"):
        load_data(DataConfig(spec=f"tensors:{f}", input_size=16))
    with pytest.raises(HantError, match="not found"):
        load_data(DataConfig(spec=f"tensors:{tmp_path / 'missing.safetensors'}", input_size=16))
    with pytest.raises(HantError, match="labels must be integer"):
        save_tensor_data(f, (xf, torch.rand(30)))


def test_a_source_beside_a_model_string_is_refused_before_anything_is_written(tmp_path, splits):
    train, held, _ = splits
    run = tmp_path / "run"
    with pytest.raises(HantError, match="model given as a string is its own source"):
        hant.accelerate("timm:test_efficientnet", train, held, source="timm:resnet18", run=run, log=lambda _: None)
    assert not run.exists()
    with pytest.raises(HantError, match="model is None"):
        hant.accelerate(None, train, held, run=run, log=lambda _: None)
    assert not run.exists()
