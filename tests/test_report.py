"""The report is built from artifacts alone: fabricate a finished run folder and check it."""

import pytest

from hant.errors import HantError
from hant.report import collect, results_rows, stage_of, write_report
from hant.workspace import write_json, write_yaml


def _fake_run(root):
    layers = [{"name": f"blocks.{i}.0", "in_shape": [16, 8, 8], "out_shape": [16, 8, 8], "stride": 1,
               "params": 100, "flops": 1000} for i in range(3)]
    write_json(root / "layers.json", {"layers": layers})
    write_yaml(root / "config.yaml", {"model": {"source": "timm:efficientnet_b0"},
                                      "data": {"spec": "synthetic:64", "input_size": 32}, "space": "tiny"})
    write_json(root / "plans" / "p2.json", {"target": "onnxruntime-cpu", "budget_ms": 1.0, "predicted_ms": 0.9,
                                           "layers": {"blocks.0.0": "fmb_k3_e1_relu", "blocks.1.0": "teacher",
                                                      "blocks.2.0": "skip"}})
    write_json(root / "students" / "p2" / "eval.json", {
        "target": "onnxruntime-cpu", "batch_size": 1, "predicted_ms": 0.9, "speedup": 2.0,
        "teacher": {"top1": 90.0, "latency_ms": 2.0}, "student": {"top1": 89.5, "latency_ms": 1.0},
        "int8": {"top1": 89.0, "latency_ms": 0.5}, "onnx": {"batchnorm_nodes": 0, "fusions": ["FusedConv"]}})
    write_json(root / "timings.json", {"stages": {"distill": 12.0}})


def test_report_from_artifacts(tmp_path):
    _fake_run(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text()
    assert "| p2 | fp32 |" in text and "| p2 | int8 |" in text
    assert "-10.0%" in text  # predicted vs measured error is shown
    assert "-0.50" in text  # accuracy change of the fp32 student
    assert "1 of 3 layers kept as the teacher, 1 removed (`skip`)" in text
    assert "FusedConv" in text and "| distill | 12 |" in text
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "architecture.png").stat().st_size > 1000
    rows = results_rows(collect(tmp_path))
    assert [r["name"] for r in rows] == ["teacher", "p2", "p2"]
    assert rows[2]["speedup"] == pytest.approx(4.0)


def test_report_needs_init(tmp_path):
    with pytest.raises(HantError, match="hant init"):
        write_report(tmp_path)


def test_stage_labels():
    assert stage_of("blocks.3.1") == "blocks.3"
    assert stage_of("layer2.0") == "layer2"
    assert stage_of("features") == "features"
