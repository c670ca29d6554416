"""The INT8 scheme is chosen by measurement on the machine at hand, recorded, and reused.

No test asserts which scheme wins: that depends on the CPU. They check that every scheme
is measured, that the choice follows the rule (fastest among those that keep accuracy),
that the record is reused while the machine is the same and redone when it is not, and
that a scheme that loses accuracy is never chosen.
"""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch
from torch import nn

from hant.errors import HantError
from hant.latency import int8 as I
from hant.latency import onnxruntime_cpu as ORT
from hant.latency.onnxruntime_cpu import SCHEMES
from hant.latency.protocol import Protocol
from hant.workspace import RunDir, read_json, write_json
from student_run import make_run

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = Protocol(warmup=1, min_repeats=3, max_repeats=5, time_cap_s=20.0)


def _row(ms, top1, keeps, agreement=100.0):
    return {"median_ms": ms, "top1": top1, "agreement": agreement, "keeps_accuracy": keeps}


def test_choice_is_the_fastest_scheme_that_keeps_accuracy():
    fp32 = {"median_ms": 1.0, "top1": 80.0}
    rows = {"a": _row(0.3, 60.0, False), "b": _row(0.5, 79.5, True), "c": _row(0.4, 79.8, True),
            "d": {"error": "RuntimeError: no kernel"}}
    name, reason = I.choose_scheme(fp32, rows)
    assert name == "c" and "keep accuracy" in reason and "\n" not in reason
    # None keeps accuracy: the fastest of those near the most accurate, however slow.
    name, reason = I.choose_scheme(fp32, {"a": _row(0.3, 60.0, False), "b": _row(2.0, 70.0, False)})
    assert name == "b" and "no scheme keeps" in reason
    rows = {"a": _row(0.3, 69.5, False), "b": _row(2.0, 70.0, False), "c": _row(0.1, 50.0, False)}
    assert I.choose_scheme(fp32, rows)[0] == "a"
    with pytest.raises(HantError, match="no INT8 scheme"):
        I.choose_scheme(fp32, {"d": {"error": "RuntimeError: no kernel"}})


def test_int8_scheme_names_and_guess():
    for name in SCHEMES:
        s = ORT.int8_scheme(name)
        assert s["name"] == name and s["format"] == "QDQ" and s["activations"] in ("uint8", "int8")
    assert ORT.int8_scheme()["name"] in SCHEMES
    with pytest.raises(HantError, match="unknown INT8 scheme"):
        ORT.int8_scheme("u4s4")


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _negate_output(model: bytes) -> bytes:
    """The same graph with its output negated: top-1 becomes the least likely class."""
    proto = onnx.load_from_string(model)
    out = proto.graph.output[0]
    proto.graph.node.append(onnx.helper.make_node("Neg", [out.name], ["negated"]))
    out.name = "negated"
    return proto.SerializeToString()


@pytest.mark.parametrize("good", list(SCHEMES))
def test_a_scheme_that_loses_accuracy_is_not_chosen(monkeypatch, good):
    model = _classifier()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    # Images the fp32 model classifies with a clear margin, so that an intact INT8 model
    # agrees on all of them and the labels (fp32's own predictions) are a fair test.
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * (logits.max() - logits.min())
    images = x[clear][:200].numpy()
    labels = logits[clear][:200].argmax(1).numpy()
    assert len(images) >= 100

    real = ORT.quantize_onnx

    def quantize(model_bytes, examples, scheme=None, batch_size=1, batches=8):
        q = real(model_bytes, examples, scheme, batch_size, batches)
        return q if scheme["name"] == good else _negate_output(q)

    monkeypatch.setattr(ORT, "quantize_onnx", quantize)
    found = I.compare_schemes(model, (3, 8, 8), x[:32].numpy(), images, labels, batch_size=1, threads=1,
                              protocol=FAST)
    assert found["fp32"]["top1"] == 100.0
    assert set(found["schemes"]) == set(SCHEMES)
    for name, r in found["schemes"].items():
        assert r["keeps_accuracy"] is (name == good), (name, r)
    assert found["chosen"] == good and found["scheme"]["name"] == good


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("int8") / "run")


def test_scheme_file_is_written_reused_and_redone_on_another_machine(run_folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    logs: list[str] = []
    rec = I.run_int8_scheme(run, batch_size=1, threads=1, log=logs.append)
    path = RunDir(run).int8_scheme(1, 1)
    assert path.name == "int8_scheme-b1-t1.json" and read_json(path) == rec
    fp = rec["fingerprint"]
    assert fp == I.scheme_fingerprint(1, 1) and fp["batch_size"] == 1 and fp["threads"] == 1
    assert set(fp) >= {"cpu", "vnni", "onnxruntime"}
    assert set(rec["schemes"]) == set(SCHEMES)
    for name, r in rec["schemes"].items():
        assert r["scheme"]["name"] == name
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert 0.0 <= r["top1"] <= 100.0 and 0.0 <= r["agreement"] <= 100.0
        assert r["keeps_accuracy"] == (r["top1_drop"] <= I.MAX_TOP1_DROP)
    assert 0 < rec["fp32"]["p10_ms"] <= rec["fp32"]["median_ms"] <= rec["fp32"]["p90_ms"]
    assert rec["chosen"] in SCHEMES and rec["scheme"] == rec["schemes"][rec["chosen"]]["scheme"]
    assert rec["reason"] and "\n" not in rec["reason"]
    assert rec["faster_than_fp32"] == (rec["schemes"][rec["chosen"]]["median_ms"] < rec["fp32"]["median_ms"])
    assert rec["accuracy"]["split"] == "heldout" and rec["accuracy"]["images"] > 0

    # Same machine: the record is reused, nothing is measured.
    def refuse(*a, **k):
        raise AssertionError("measured again on the same machine")

    monkeypatch.setattr(I, "compare_schemes", refuse)
    assert I.run_int8_scheme(run, batch_size=1, threads=1, log=logs.append) == rec
    monkeypatch.undo()

    # Another machine (here: another CPU model in the record): measured again, rewritten.
    write_json(path, {**rec, "fingerprint": {**fp, "cpu": "Another CPU", "vnni": not fp["vnni"]}})
    again = I.run_int8_scheme(run, batch_size=1, threads=1, log=logs.append)
    assert again["fingerprint"] == fp and read_json(path)["fingerprint"] == fp
    assert any("measuring again" in line and "cpu" in line for line in logs)
    # Another batch size is another record, beside the first.
    other = I.run_int8_scheme(run, batch_size=2, threads=1, log=logs.append)
    assert other["fingerprint"]["batch_size"] == 2 and read_json(RunDir(run).int8_scheme(2, 1)) == other
    assert read_json(path)["fingerprint"] == fp


def test_report_prints_the_scheme_and_its_reason(tmp_path):
    from hant.report import write_report
    from hant.workspace import write_yaml

    layers = [{"name": "blocks.0.0", "in_shape": [8, 8, 8], "out_shape": [8, 8, 8], "stride": 1}]
    write_json(tmp_path / "layers.json", {"layers": layers})
    write_yaml(tmp_path / "config.yaml", {"model": {"source": "timm:test_efficientnet"},
                                          "data": {"spec": "synthetic:64", "input_size": 32}})
    write_json(tmp_path / "plans" / "p.json", {"target": "onnxruntime-cpu", "layers": {"blocks.0.0": "skip"}})
    reason = "fastest of 2 scheme(s) that keep accuracy: 0.400 ms against fp32 0.500 ms"
    write_json(tmp_path / "students" / "p" / "eval.json", {
        "target": "onnxruntime-cpu", "batch_size": 1, "teacher": {"top1": 90.0, "latency_ms": 2.0},
        "student": {"top1": 89.5, "latency_ms": 1.0},
        "int8": {"top1": 89.0, "latency_ms": 0.9, "scheme": ORT.int8_scheme("u8s8"), "scheme_reason": reason,
                 "scheme_faster_than_fp32": False}})
    text = write_report(tmp_path).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("INT8 scheme"))
    assert "`u8s8`" in line and "full range" in line and reason in line and "slower than fp32" in line
