"""Export: ONNX matches PyTorch, BN is folded, INT8 runs and is evaluated."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hant.errors import HantError
from hant.export import check_onnx, export, op_counts, ort_fusions
from hant.latency.onnxruntime_cpu import CALIBRATIONS, SCHEMES
from hant.onnx_io import OnnxExportError, export_onnx
from hant.finetune import finetune
from hant.student import load_student
from hant.workspace import RunDir, read_json, write_json
from student_run import layer_names, make_run, write_plan


# Two threads per process crawl on a shared 2-core machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = make_run(tmp_path_factory.mktemp("export") / "run", epochs=0.5)
    names = layer_names(run)
    write_plan(run, "p", {names[1]: "proj", names[3]: "mb_k3_e1_relu"})
    finetune(run, "p", log=lambda *_: None)
    torch.set_num_threads(before)
    return run


def _conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_onnx_export_folds_bn_has_dynamic_batch_and_matches_pytorch(tmp_path):
    model = _conv_bn()
    data = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == data
    ops = op_counts(data)
    assert ops.get("BatchNormalization", 0) == 0 and ops["Conv"] == 1
    proto = onnx.load_from_string(data)
    assert proto.opset_import[0].version == 17
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 1, 8, 8)
        assert check_onnx(data, model, x) < 1e-4
    # ONNX Runtime fuses conv + ReLU; the report lists it.
    fused = ort_fusions(data)
    assert any("FusedConv" in k for k in fused["fused_ops"]), fused
    assert fused["removed_ops"].get("Relu") == 1


def test_one_exporter_gives_the_table_a_fixed_batch_and_the_student_a_dynamic_one():
    model = _conv_bn()
    fixed, dynamic = export_onnx(model, (1, 8, 8), batch_size=3), export_onnx(model, (1, 8, 8))
    assert op_counts(fixed) == op_counts(dynamic)  # the same graph apart from the batch axis
    dims = lambda data: [d.dim_value or d.dim_param for d in onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim]  # noqa: E731
    assert dims(fixed) == [3, 1, 8, 8] and dims(dynamic) == ["batch", 1, 8, 8]
    assert model.training is False and check_onnx(fixed, model, torch.randn(3, 1, 8, 8)) < 1e-4
    trained = _conv_bn().train()
    export_onnx(trained, (1, 8, 8))
    assert trained.training  # the caller's module is left as it was


def test_a_module_no_exporter_can_express_fails_in_one_line():
    class Refuses(nn.Module):
        def forward(self, x):
            raise RuntimeError("no ONNX for this")

    with pytest.raises(OnnxExportError, match="ONNX export failed .* cannot express") as info:
        export_onnx(Refuses(), (1, 8, 8))
    assert isinstance(info.value, HantError) and "\n" not in str(info.value)


def test_check_onnx_refuses_a_graph_that_does_not_match():
    model = _conv_bn()
    data = export_onnx(model, (1, 8, 8))
    with torch.no_grad():
        model[5].bias.add_(1.0)
    with pytest.raises(HantError, match="differs from PyTorch"):
        check_onnx(data, model, torch.randn(2, 1, 8, 8))


def test_export_needs_a_finetuned_student(tmp_path):
    run = make_run(tmp_path / "run")
    write_plan(run, "p", {layer_names(run)[1]: "proj"})
    with pytest.raises(HantError, match="hant finetune"):
        export(run, "p")


def test_export_onnx_and_int8_into_eval_json(tuned, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tuned, run)
    logs = []
    res = export(run, "p", int8=True, calib_images=32, log=logs.append)
    out = RunDir(run).student_dir("p")
    assert (out / "model.onnx").exists() and (out / "model.int8.onnx").exists()
    ev = read_json(out / "eval.json")
    o, q = ev["onnx"], ev["int8"]
    assert o == res["onnx"] and q == res["int8"]
    assert o["max_abs_diff"] < 1e-3 and o["batchnorm_nodes"] == 0
    assert o["fused_ops"] and "FusedConv" in " ".join(o["fused_ops"])
    # fp32 ONNX classifies the test split as PyTorch does (tiny float differences may flip a tie).
    assert abs(o["top1"] - ev["student"]["top1"]) <= 100.0 / 24 + 1e-9
    assert 0.0 <= q["top1"] <= 100.0 and q["calibration_images"] == 32
    # The calibration kept is the one that agreed most with fp32 on held-out images.
    assert set(q["calibrations"]) == set(CALIBRATIONS) and q["calibration_check"]["split"] == "heldout"
    assert q["calibrations"][q["calibration"]]["agreement"] == max(r["agreement"] for r in q["calibrations"].values())
    # The scheme is the one measured for this machine (which one depends on the CPU).
    choice = read_json(run / q["scheme_file"])
    assert q["scheme"] == choice["scheme"] and q["scheme"]["name"] in SCHEMES
    assert q["scheme_reason"] == choice["reason"] and q["scheme_faster_than_fp32"] == choice["faster_than_fp32"]
    assert any(f"static INT8 in scheme {q['scheme']['name']}" in line for line in logs)
    for sec in (o, q):
        assert sec["latency_p10_ms"] <= sec["latency_ms"] <= sec["latency_p90_ms"] and sec["speedup"] > 0
    assert ev["student"]["top1"] is not None  # fine-tuning's fields are kept
    qops = op_counts(out / "model.int8.onnx")
    assert qops["QuantizeLinear"] > 0 and qops["DequantizeLinear"] > 0
    # The INT8 model computes roughly the same function on the images it was calibrated for.
    from hant.config import RunConfig
    from hant.data import load_data
    from hant.export import _session

    train = load_data(RunConfig.load(RunDir(run).config).data).train
    x = torch.stack([train[i][0] for i in range(16)])
    got = _session(out / "model.int8.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = load_student(out)(x).numpy()
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert corr > 0.9
    assert any("INT8 test top-1" in line for line in logs)


def _images(n: int, seed: int, hot: int | None = None) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if hot is not None:
        x[hot, 0, 4, 4] = 1e3  # one image with one extreme pixel
    return [(x[i], 0) for i in range(n)]


def test_int8_calibration_is_the_one_that_keeps_fp32_predictions(tmp_path):
    from hant.export import quantize_int8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    fp32 = tmp_path / "m.onnx"
    export_onnx(model, (1, 8, 8), fp32)
    check = _images(200, seed=1)
    # One calibration image of 256 with a pixel 1000 times the rest: MinMax stretches every
    # range over it and ordinary images quantise to nothing; the percentile clips it.
    cal = _images(256, seed=2, hot=100)
    q = quantize_int8(fp32, tmp_path / "q.onnx", cal, images=256, scheme="u8s8", check=check)
    tried = q["calibrations"]
    assert set(tried) == set(CALIBRATIONS) and q["check_images"] == 200
    assert tried["MinMax"]["agreement"] < 70.0 < tried["Percentile99.9"]["agreement"]
    kept = q["calibration"]
    assert kept != "MinMax" and tried[kept]["agreement"] == max(r["agreement"] for r in tried.values())
    assert q["file"].exists()
    # The kept file is that calibration's: it agrees with fp32 as measured.
    from hant.export import onnx_predictions
    ref, _ = onnx_predictions(fp32, check)
    assert len(set(ref.tolist())) == 4  # fp32 tells the images apart: agreement means something
    got, _ = onnx_predictions(q["file"], check)
    assert 100.0 * float(np.mean(got == ref)) == pytest.approx(tried[kept]["agreement"])
    # Without held-out images the scheme's own calibration is applied, nothing is compared.
    plain = quantize_int8(fp32, tmp_path / "p.onnx", cal, images=256, scheme="u8s8")
    assert plain["calibration"] == "MinMax" and plain["calibrations"] == {} and plain["check_images"] == 0


def test_export_flags_an_int8_model_that_loses_accuracy(tuned, tmp_path, monkeypatch):
    import hant.export as ex

    run = tmp_path / "run"
    shutil.copytree(tuned, run)
    real = ex.onnx_top1
    # The fp32 model is passed as bytes, the INT8 one as its file: make the INT8 one collapse.
    monkeypatch.setattr(ex, "onnx_top1", lambda m, *a, **k: 18.0 if isinstance(m, (str, Path)) else 92.0)
    logs = []
    res = export(run, "p", int8=True, calib_images=32, log=logs.append)
    assert res["int8"]["top1"] == 18.0 and res["int8"]["accuracy_kept"] is False
    (warn,) = [x for x in logs if x.startswith("warning: export p:")]
    assert "74.0 points below" in warn and "deploy model.onnx, not model.int8.onnx" in warn
    monkeypatch.setattr(ex, "onnx_top1", real)
    res = export(run, "p", int8=True, calib_images=32, log=logs.append)
    assert res["int8"]["accuracy_kept"] is (res["int8"]["top1"] >= res["onnx"]["top1"] - 1.0)


@pytest.mark.slow
def test_int8_export_and_int8_table_use_the_same_scheme(tuned, tmp_path):
    from hant.latency import measure_table

    # The flow of a run: an INT8 table, a plan selected on it, the plan exported in INT8.
    run = tmp_path / "run"
    shutil.copytree(tuned, run)
    table = measure_table(run, target="onnxruntime-cpu-int8", batch_size=1, progress=False, log=lambda *_: None)
    plan = read_json(RunDir(run).plan("p"))
    write_json(RunDir(run).plan("p"), {**plan, "target": "onnxruntime-cpu-int8"})
    logs = []
    q = export(run, "p", int8=True, calib_images=16, log=logs.append)["int8"]
    assert q["scheme"] == table["fingerprint"]["int8_scheme"]
    assert q["scheme_file"] == f"latency/int8_scheme-b1-t{table['fingerprint']['threads']}.json"
    assert not any("trying" in line for line in logs)  # the table's measurement was reused
