"""`hant demo --quick` end to end: teacher training, every stage, report."""

import json
import os
import subprocess
import sys
from pathlib import Path

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_demo_quick_end_to_end(tmp_path):
    run = tmp_path / "demo"
    env = {**os.environ, "HANT_CACHE": str(tmp_path / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "hant.cli", "demo", "--quick", "--run", str(run)]
    if not FMNIST.exists():  # no Debian package and no network: the same pipeline on synthetic images
        cmd += ["--data", "synthetic:4000"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| teacher |" in proc.stdout  # the report's table is printed

    assert (run / "report.md").exists() and (run / "pareto.png").stat().st_size > 1000
    evals = list(run.glob("students/*/eval.json"))
    assert len(evals) == 1
    ev = json.loads(evals[0].read_text())
    # Timings on a shared machine are not asserted; that the speedup is the ratio of the
    # recorded latencies is.
    assert ev["speedup"] > 0 and abs(ev["speedup"] - ev["teacher"]["latency_ms"] / ev["student"]["latency_ms"]) < 1e-6
    assert ev["student"]["top1"] is not None and ev["teacher"]["top1"] > 20.0
    assert ev["int8"]["top1"] is not None
    assert (evals[0].parent / "model.onnx").exists()
    # The plan was timed against the teacher before fine-tuning (and tightened if it fell short).
    plan = json.loads((run / "plans" / "onnxruntime-cpu-b1-x2.json").read_text())
    rounds = plan["latency_check"]["rounds"]
    assert 1 <= len(rounds) <= 4 and all(r["teacher_ms"] > 0 and r["student_ms"] > 0 for r in rounds)
    assert "measured" in proc.stdout and "against the teacher's" in proc.stdout
    assert "## Budgets checked on the hardware" in (run / "report.md").read_text()

    # A rerun reuses the cached teacher and every finished stage.
    proc2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "teacher: cached" in proc2.stdout
    assert "finetune onnxruntime-cpu-b1-x2: complete, skipped" in proc2.stdout
    assert "select onnxruntime-cpu-b1-x2: complete, skipped" in proc2.stdout
