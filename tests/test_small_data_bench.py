"""bench/small_data.py --quick end to end: the ImageFolder tree, `hant train-teacher`, `hant
accelerate` on it; then a rerun that reuses all of it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "small_data.py"


def _run(*args: str, timeout: int = 280) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_mode_writes_sane_results_and_resumes(tmp_path):
    out, cache = tmp_path / "small_data.json", tmp_path / "cache"
    _run("--out", str(out), "--cache", str(cache), "--control")
    d = json.loads(out.read_text())
    assert set(d) >= {"small_data", "dataset", "teacher_recipe", "command", "fingerprint", "notes", "goal"}
    assert d["command"].startswith("bench/small_data.py") and "--quick" in d["command"]
    assert {"cpu", "flags", "cores", "torch", "onnxruntime"} <= set(d["fingerprint"])

    # The ImageFolder tree: class-balanced, as many files as dataset.json lists.
    folder = Path(d["dataset"]["folder"])
    assert d["dataset"]["images"] == {"train": 200, "test": 100}
    for split, n in (("train", 20), ("test", 10)):
        classes = sorted(x.name for x in (folder / split).iterdir())
        assert classes == d["dataset"]["classes"] and len(classes) == 10
        assert all(len(list((folder / split / c).glob("*.png"))) == n for c in classes)
    assert d["dataset"]["hant_train_images"] + d["dataset"]["hant_heldout_images"] == 200

    sd = d["small_data"]
    assert 0.0 <= sd["teacher_top1"] <= 100.0
    assert d["teacher_recipe"]["epochs"] == 2.0 and d["teacher_recipe"]["test_top1"] == sd["teacher_top1"]
    (row,) = sd["rows"]  # --quick asks one speedup
    assert row["variant"] == "defaults" and row["distill_images"] is None and row["speedup_asked"] == 2.0
    assert isinstance(row["measured_speedup"], float) and math.isfinite(row["measured_speedup"])
    assert row["measured_speedup"] > 0
    assert 0.0 <= row["top1"] <= 100.0
    # The drop is taken from the better of the teacher and the control (the teacher fine-tuned as
    # the student was, for the same epochs).
    assert 0.0 <= row["control_top1"] <= 100.0 and row["control_epochs"] > 0
    ref = max(row["teacher_top1"], row["control_top1"])
    assert row["reference_top1"] == ref and row["drop"] == pytest.approx(ref - row["top1"])
    assert row["drop_vs_teacher"] == pytest.approx(row["teacher_top1"] - row["top1"])
    assert row["wall_s"] > 0 and row["accelerate_calls"] == 1
    assert {"distill", "latency", "score", "select", "finetune", "measure"} <= set(row["stages"])
    assert row["images_per_candidate"] == 32 and row["phase1_images_trained"] == 32
    assert d["status"] == {"defaults": "done"}

    # The same command again: dataset, teacher and run are read back, nothing is run.
    p = _run("--out", str(out), "--cache", str(cache), "--control")
    assert "control, the teacher" not in p.stdout
    assert "dataset: cached" in p.stdout and "teacher: cached" in p.stdout and "accelerate skipped" in p.stdout
    (row2,) = json.loads(out.read_text())["small_data"]["rows"]
    assert row2["top1"] == row["top1"] and row2["measured_speedup"] == row["measured_speedup"]
    assert row2["wall_s"] == row["wall_s"] and row2["control_top1"] == row["control_top1"]
