"""The report is built from artifacts alone: fabricate a finished run folder and check it."""

import pytest

from hant.errors import HantError
from hant.report import collect, results_rows, stage_of, timing_disagreements, write_report
from hant.workspace import read_json, write_json, write_yaml


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
    assert rows[2]["speedup"] == pytest.approx(4.0)  # no speedup of its own: over the measured teacher


def test_int8_speedup_is_its_own_timing_runs_ratio(tmp_path):
    # Export times the INT8 model against the teacher in its own run; when the machine was
    # slower then (teacher 3.0 ms there, 2.0 ms at the fp32 measurement) the row must say
    # that run's 2.0x, not 2.0 / 1.5 = 1.33x.
    _fake_run(tmp_path)
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["int8"].update(latency_ms=1.5, teacher_latency_ms=3.0, speedup=2.0)
    write_json(path, ev)
    rows = results_rows(collect(tmp_path))
    assert rows[2]["precision"] == "int8" and rows[2]["speedup"] == pytest.approx(2.0)
    assert "timed against the teacher in its export's own interleaved run" in write_report(tmp_path).read_text()


def test_report_needs_init(tmp_path):
    with pytest.raises(HantError, match="hant init"):
        write_report(tmp_path)


def test_stage_labels():
    assert stage_of("blocks.3.1") == "blocks.3"
    assert stage_of("layer2.0") == "layer2"
    assert stage_of("features") == "features"


def _check_and_eval(root, teacher_check, teacher_final, student_check=(1.0, 0.98, 1.02),
                    student_final=(1.0, 0.99, 1.01)):
    """A plan whose hardware check and final measurement give these (median, lo, hi) in ms."""
    _fake_run(root)
    (t, tl, th), (s, sl, sh) = teacher_check, student_check
    plan = read_json(root / "plans" / "p2.json")
    plan["latency_check"] = {"rounds": [{
        "budget_ms": 1.0, "predicted_ms": 0.9, "teacher_ms": t, "teacher_ci_lo_ms": tl, "teacher_ci_hi_ms": th,
        "student_ms": s, "student_ci_lo_ms": sl, "student_ci_hi_ms": sh, "speedup": t / s,
        "speedup_ci_lo": 0.97 * t / s, "speedup_ci_hi": 1.03 * t / s, "decision": "met"}], "met": True}
    write_json(root / "plans" / "p2.json", plan)
    ev = read_json(root / "students" / "p2" / "eval.json")
    for who, (m, lo, hi) in (("teacher", teacher_final), ("student", student_final)):
        ev[who].update(latency_ms=m, latency_ci_lo_ms=lo, latency_ci_hi_ms=hi)
    ev.update(speedup=teacher_final[0] / student_final[0], speedup_ci_lo=1.9, speedup_ci_hi=2.1,
              timing={"threads": 1, "clock": "thread-cpu", "protocol": {"confidence": 0.95}})
    write_json(root / "students" / "p2" / "eval.json", ev)


def test_report_flags_timings_that_disagree_beyond_their_intervals(tmp_path):
    # The teacher's two timings do not overlap; the student's do.
    _check_and_eval(tmp_path, teacher_check=(2.2, 2.15, 2.25), teacher_final=(2.0, 1.98, 2.02))
    lines = timing_disagreements(collect(tmp_path))
    assert len(lines) == 1 and "p2, teacher" in lines[0] and "2.200 [2.150, 2.250]" in lines[0]
    text = write_report(tmp_path).read_text()
    assert lines[0] in text
    assert "2.000 ±1.0%" in text  # the final teacher median with its interval
    assert "95% bootstrap" in text and "| met |" in text


def test_report_does_not_flag_timings_whose_intervals_overlap(tmp_path):
    _check_and_eval(tmp_path, teacher_check=(2.05, 2.01, 2.09), teacher_final=(2.0, 1.98, 2.02))
    assert timing_disagreements(collect(tmp_path)) == []
    assert "disagree" not in write_report(tmp_path).read_text()
    # Timings without intervals (artifacts from before they were recorded) are not compared.
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["teacher"] = {"top1": 90.0, "latency_ms": 3.0}
    write_json(path, ev)
    assert timing_disagreements(collect(tmp_path)) == []


def test_report_says_when_the_final_measurement_was_timed_again(tmp_path):
    _check_and_eval(tmp_path, teacher_check=(2.05, 2.01, 2.09), teacher_final=(2.0, 1.98, 2.02))
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["timing_attempts"] = [{"teacher_ms": 3.4, "student_ms": 1.0, "speedup": 3.4},
                             {"teacher_ms": 2.0, "student_ms": 1.0, "speedup": 2.0}]
    write_json(path, ev)
    (line,) = timing_disagreements(collect(tmp_path))
    assert "p2:" in line and "timed 2 times (teacher 3.400, 2.000 ms)" in line and "kept (2.000 ms)" in line
    assert line in write_report(tmp_path).read_text()
    ev["timing_attempts"] = ev["timing_attempts"][1:]  # timed once: nothing to say
    write_json(path, ev)
    assert timing_disagreements(collect(tmp_path)) == []


def test_report_flags_an_int8_model_that_loses_accuracy(tmp_path):
    _fake_run(tmp_path)
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["onnx"] = {"top1": 92.0}
    ev["int8"] = {"top1": 18.0, "accuracy_kept": False}
    write_json(path, ev)
    assert ("The INT8 model of p2 does not keep accuracy:** test top-1 18.00% against fp32's 92.00%"
            in write_report(tmp_path).read_text())
    ev["int8"] = {"top1": 91.5, "accuracy_kept": True, "calibration": "Percentile99.9",
                  "calibrations": {"MinMax": {"agreement": 17.0, "top1": 17.0},
                                   "Percentile99.9": {"agreement": 96.0, "top1": 91.0}},
                  "calibration_check": {"images": 500, "split": "heldout"}}
    write_json(path, ev)
    text = write_report(tmp_path).read_text()
    assert "does not keep accuracy" not in text
    assert ("INT8 calibration of p2: Percentile99.9, the one that agrees most with fp32 on 500 heldout images "
            "(MinMax 17.0%, Percentile99.9 96.0%)") in text


def test_report_flags_plans_with_large_predicted_damage(tmp_path):
    _fake_run(tmp_path)
    assert "predicted damage is large" not in write_report(tmp_path).read_text()
    plan = read_json(tmp_path / "plans" / "p2.json")
    plan["accuracy_risk"] = {"predicted_d_loss": 16.0, "teacher_loss": 0.02, "share": 800.0, "limit": 0.02,
                             "large": True, "safe_speedup": 1.41, "message": "..."}
    write_json(tmp_path / "plans" / "p2.json", plan)
    text = write_report(tmp_path).read_text()
    assert "predicted damage is large" in text
    assert "- p2: predicted loss increase 16 against the teacher's 0.02; up to 1.41x (predicted)" in text
    plan["accuracy_risk"]["safe_speedup_measured"] = 1.05  # checked on the hardware: the measured scale first
    write_json(tmp_path / "plans" / "p2.json", plan)
    assert ("- p2: predicted loss increase 16 against the teacher's 0.02; up to about 1.05x as measured "
            "(1.41x as the table predicts) the damage is small.") in write_report(tmp_path).read_text()


def test_report_gives_embedding_compatibility(tmp_path):
    _fake_run(tmp_path)
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["embedding"] = {"images": 100, "cosine": 0.8123, "retrieval_top1": {"student_to_teacher": 85.0,
                                                                          "teacher_to_teacher": 88.5}}
    write_json(path, ev)
    assert "| p2 | 0.812 | 85.00% | 88.50% |" in write_report(tmp_path).read_text()


def test_report_gives_the_drop_interval(tmp_path):
    _fake_run(tmp_path)
    path = tmp_path / "students" / "p2" / "eval.json"
    ev = read_json(path)
    ev["paired"] = {"images": 10000, "drop": 0.5, "drop_ci95": [0.3, 0.7]}
    write_json(path, ev)
    row = [line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("| p2 | fp32")][0]
    assert row.endswith(" -0.50 [-0.70, -0.30] |")  # Δ top-1 is minus the drop, its interval turned round
