"""bench/gpu.py end to end on the CPU (its smoke mode): prepare a tiny run, then run every part.

The GPU machine runs the same script with --device cuda; here the target is torch-cpu and
everything is tiny, so the test checks the plumbing (the prepared folder loads, the parts
run in order, the JSON holds what the GPU session is asked for), not any timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hant.workspace import read_json, write_json
from test_latency import make_run

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *args], env=env, capture_output=True,
                          text=True, timeout=240)


def _strict(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"{name} in the JSON")

    return json.loads(text, parse_constant=refuse)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    run = make_run(root)
    doc = read_json(run / "layers.json")
    cheap = {d["name"]: ("skip" if "skip" in d["candidates"] else "proj") for d in doc["layers"]}
    some = {d["name"]: ("mb_k3_e1_relu" if i % 2 and "mb_k3_e1_relu" in d["candidates"] else "teacher")
            for i, d in enumerate(doc["layers"])}
    check = {"rounds": [{"teacher_ms": 2.0, "student_ms": 1.0, "speedup": 2.0, "speedup_ci_lo": 1.9,
                         "speedup_ci_hi": 2.1}], "met": True,
             "timing": {"target_id": "onnxruntime-cpu", "batch_size": 2, "threads": 1, "clock": "thread-cpu"}}
    write_json(run / "plans" / "cheap-b2.json", {"target": "onnxruntime-cpu-b2", "batch_size": 2, "layers": cheap,
                                                 "speedup": 2.0, "predicted_speedup": 2.1, "latency_check": check})
    write_json(run / "plans" / "cheap-b2-alt0.json", {"target": "onnxruntime-cpu-b2", "batch_size": 2,
                                                      "layers": cheap})
    write_json(run / "plans" / "some-b1.json", {"target": "onnxruntime-cpu", "batch_size": 1, "layers": some})
    write_json(run / "plans" / "cheap-b2.pick.json", {"ranking": []})  # not a plan: left out

    prepared = root / ".gpu"
    p = _bench("--prepare", "--run", str(run), "--dest", str(prepared), "--budget-s", "30")
    assert p.returncode == 0, p.stderr[-3000:]
    out = root / "out" / "gpu.json"
    p = _bench("--run", str(prepared / "run"), "--out", str(out), "--budget-s", "40", "--device", "cpu",
               "--validate", "3", "--table-batches", "2,1", "--phase1-per-layer", "2", "--phase1-steps", "2",
               "--phase1-batch-size", "8", "--phase1-heldout", "16")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run, prepared, out, _strict(out.read_text()), p.stdout


def test_prepare_copies_what_the_gpu_run_needs(bench_run):
    run, prepared, _, _, _ = bench_run
    rec = read_json(prepared / "prepared.json")
    assert rec["teacher_sha256"] == read_json(run / "layers.json")["checkpoint_sha256"]
    assert sorted(rec["plans"]) == ["cheap-b2", "cheap-b2-alt0", "some-b1"]
    names = {f.name for f in (prepared / "run").iterdir()}
    assert names == {"config.yaml", "layers.json", "plans", "teacher.safetensors"}
    assert not (prepared / "run" / "plans" / "cheap-b2.pick.json").exists()
    # The GPU run works on a scratch copy: the prepared folder gains nothing.
    assert not (prepared / "run" / "latency").exists()


def test_every_part_runs_in_order_and_is_recorded(bench_run):
    _, _, out, res, stdout = bench_run
    assert res["parts_done"] == ["table-b2", "plans", "phase1", "table-b1"]
    assert res["errors"] == {} and res["skipped"] == {} and res["finished"] is True
    assert "bench/gpu.py" in res["command"] and "--device cpu" in res["command"]
    fp = res["fingerprint"]
    assert fp["torch"] and fp["python"] and "onnxruntime" in fp
    assert fp["git_at_prepare"] is None or len(fp["git_at_prepare"]["commit"]) == 40
    assert res["target"] == "torch-cpu" and res["run"]["plans"] == 3
    assert "done in" in stdout


def test_tables_record_their_validation(bench_run):
    _, _, out, res, _ = bench_run
    for b, table_id in (("b2", "torch-cpu-b2"), ("b1", "torch-cpu")):  # batch 1 tables carry no suffix
        t = res["latency_tables"][b]
        assert t["table_id"] == table_id and Path(t["file"]).is_file()
        assert t["entries"] > 0 and _positive(t["teacher_ms"]) and t["fixed_ms"] >= 0
        v = t["validation"]
        assert v["samples"] == len(v["points"]) >= 3
        for kind in ("uncalibrated", "heldout"):
            e = v["relative_error"][kind]
            assert e["n"] == v["samples"] and 0 <= e["median_abs_pct"] <= e["max_abs_pct"]
            assert math.isfinite(e["max_abs_pct"])
        assert all(_positive(p["measured_ms"]) and _positive(p["predicted_ms"]) for p in v["points"])


def test_plans_are_timed_against_the_teacher(bench_run):
    _, _, _, res, _ = bench_run
    rows = {r["plan"]: r for r in res["plans"]["rows"]}
    assert set(rows) == {"cheap-b2", "cheap-b2-alt0", "some-b1"}
    assert [g["batch_size"] for g in res["plans"]["groups"]] == [2, 1]  # the first table batch first
    for r in rows.values():
        assert _positive(r["teacher_ms"]) and _positive(r["student_ms"]) and _positive(r["speedup"])
        lo, hi = r["speedup_ci"]
        assert lo <= r["speedup"] <= hi
    # Plans with the same layers are one network, timed once.
    assert rows["cheap-b2-alt0"]["same_network_as"] == "cheap-b2"
    assert rows["cheap-b2-alt0"]["speedup"] == rows["cheap-b2"]["speedup"]
    assert rows["cheap-b2"]["cpu_check"]["speedup"] == 2.0 and rows["cheap-b2"]["requested_speedup"] == 2.0
    assert rows["some-b1"]["cpu_check"] is None and rows["some-b1"]["target_as_written"] == "onnxruntime-cpu"
    # Each plan gets its batch size's table prediction, whether that table came before the plans (b2) or after (b1).
    assert all(_positive(r["gpu_table_predicted_ms"]) for r in rows.values())
    assert rows["some-b1"]["layers"] and set(rows["some-b1"]["layers"].values()) <= {"teacher", "mb_k3_e1_relu"}


def test_phase1_throughput(bench_run):
    _, _, _, res, _ = bench_run
    p = res["phase1"]
    m = p["measured"]
    assert p["device"] == "cpu" and p["data"].startswith("synthetic:") and p["batch_size"] == 8
    assert _positive(p["candidate_images_per_s"]) and m["groups"] >= 1 and m["steps"] >= 2
    assert m["teacher_passes"] >= m["steps"] and m["failed"] == []
    assert m["candidate_images"] == m["steps"] * 8 * p["trainable"] > 0
    assert p["warmup"]["steps"] == 1 and _positive(p["warmup"]["candidate_images_per_s"])
