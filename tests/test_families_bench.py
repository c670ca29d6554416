"""bench/families.py --quick end to end: a teacher, `hant accelerate --speedup 2`, the control
and the ablation on a tiny synthetic run; then a rerun that reuses all of it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "families.py"


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _check_row(row: dict) -> None:
    assert row["model"] == "test_efficientnet" and row["status"] == "complete"
    for key in ("teacher_top1", "control_top1", "top1"):
        assert 0.0 <= row[key] <= 100.0, (key, row[key])
    assert row["drop"] == pytest.approx(max(row["teacher_top1"], row["control_top1"]) - row["top1"])
    assert row["speedup"] > 0 and row["speedup_ci_lo"] <= row["speedup"] <= row["speedup_ci_hi"]
    assert row["layers"] >= 1 and sum(row["families"].values()) == row["layers"]
    assert row["pool_size"] >= 1 and row["pool_total"] == pytest.approx(row["pool_size"] * row["layers"])
    assert row["finetune_epochs"] == 0.1 and row["control"]["epochs"] == 0.1


def _check_additivity(run: Path, plans: list[str], out: Path) -> None:
    """bench/additivity.py on the finished run: one-at-a-time and cumulative loss changes, and a
    plan per objective, written outside the run folder."""
    before = sorted(p.name for p in (run / "plans").iterdir())
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "additivity.py"), "--run", str(run),
                        *(a for plan in plans for a in ("--plan", plan)), "--speedups", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    (taken,) = d["plans"]
    assert taken["layers"], taken
    first = taken["layers"][0]
    assert first["cumulative"] == pytest.approx(first["single"], abs=1e-6)  # one layer: the same network
    assert taken["sum_single"] == pytest.approx(sum(r["single"] for r in taken["layers"]))
    assert taken["cumulative"] == taken["layers"][-1]["cumulative"]
    assert {o["objective"] for o in d["objectives"]} == {"d_loss", "kl", "nmse"}
    for o in d["objectives"]:
        assert math.isfinite(o["test_loss"]) and 0.0 <= o["test_top1"] <= 100.0
    assert sorted(p.name for p in (run / "plans").iterdir()) == before  # the run is left as it was


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_quick_mode_writes_sane_results_and_resumes(tmp_path):
    from hant import ops

    out, cache = tmp_path / "families.json", tmp_path / "cache"
    _run("--out", str(out), "--cache", str(cache))
    d = json.loads(out.read_text())
    assert set(d) >= {"rows", "recipe", "command", "fingerprint", "note"}
    assert d["command"].startswith("bench/families.py") and "--quick" in d["command"]
    assert d["recipe"]["teacher"]["epochs"] == 1.0 and d["recipe"]["accelerate"]["speedup"] == 2.0
    assert {"cpu", "flags", "torch", "onnxruntime", "torch_threads"} <= set(d["fingerprint"])
    assert {"avx2", "avx512f", "vnni"} <= set(d["fingerprint"]["flags"])
    (row,) = d["rows"]
    _check_row(row)
    ab = row["ablation_no_self"]
    if "self" not in ops.families():
        assert ab["applicable"] is False and "not registered" in ab["reason"]
    elif not ab["applicable"]:
        assert "no `self` candidate" in ab["reason"]
    assert (cache / "test_efficientnet" / "students" / row["plan"] / "eval.json").exists()

    assert row["command"] == d["command"] and row["fingerprint"] == d["fingerprint"]

    # A complete row of another model, left by an earlier run of the same recipe, is kept.
    earlier = {**row, "model": "resnet18", "top1": 12.5}
    out.write_text(json.dumps({**d, "rows": [earlier, row]}))

    # The same command with another family left out: teacher, run and control are reused,
    # only the ablation is new.
    p = _run("--out", str(out), "--cache", str(cache), "--ablate-family", "mb")
    assert "accelerate skipped" in p.stdout and "control-" not in p.stdout
    d2 = json.loads(out.read_text())
    kept, row2 = d2["rows"]
    assert kept == earlier and d2["rows_kept_from_earlier_runs"] == ["resnet18"]
    _check_row(row2)
    assert row2["top1"] == row["top1"] and row2["control_top1"] == row["control_top1"]
    ab = row2["ablation_no_mb"]
    assert ab["applicable"] is True
    _check_additivity(cache / "test_efficientnet", [row2["plan"]], tmp_path / "additivity.json")
    assert math.isfinite(ab["with"]["heldout_loss"]) and ab["with"]["heldout_loss"] > 0
    if ab.get("same_plan") and "without" in ab and ab["with"]["uses"] == 0:
        return  # the 2x plan uses no mb layer: nothing else to compare
    w = ab["without"]
    if "error" in w:  # 2x out of reach without the family: said, not raised
        assert w["error"]
        return
    assert "mb" not in w["families"] and sum(w["families"].values()) == row2["layers"]
    assert math.isfinite(w["heldout_loss"]) and w["heldout_loss"] > 0 and 0.0 <= w["top1"] <= 100.0
    assert ab["delta_heldout_loss"] == pytest.approx(w["heldout_loss"] - ab["with"]["heldout_loss"])
    # Both plans start fine-tuning from the same kind of weights: re-distilled when the main one was.
    main_ev = json.loads((cache / "test_efficientnet" / "students" / row2["plan"] / "eval.json").read_text())
    no_ev = json.loads((cache / "test_efficientnet" / "students" / w["plan"] / "eval.json").read_text())
    start = main_ev["start"]["candidate_weights"]
    assert ab["with"]["start"] == w["start"] == no_ev["start"]["candidate_weights"] == start
    if start == "redistilled":
        for side in (ab["with"], w):
            assert math.isfinite(side["heldout_loss_redistilled"]) and side["heldout_loss_redistilled"] > 0
    # The same comparison image by image: the differences of the means, each inside its interval.
    pt, pl = ab["paired"]["test_top1_without_minus_with"], ab["paired"]["heldout_loss_without_minus_with"]
    assert pt["value"] == pytest.approx(w["top1"] - ab["with"]["top1"], abs=1e-6)
    assert pt["ci95"][0] <= pt["value"] <= pt["ci95"][1]
    key = "heldout_loss_redistilled" if start == "redistilled" else "heldout_loss"
    assert pl["value"] == pytest.approx(w[key] - ab["with"][key], rel=1e-3, abs=1e-5)
    assert pl["ci95"][0] <= pl["value"] <= pl["ci95"][1]
