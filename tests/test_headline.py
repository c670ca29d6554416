"""The headline benchmark (bench/headline.py): its latency matching, with FLOPs standing in for
latency; the caps and names of hant's hardware-checked plans; and a --quick run end to end."""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")

from hant.speedup import OVERSHOOT  # noqa: E402
from hant.student import count_params_flops  # noqa: E402
from hant.teacher import create_model  # noqa: E402

SHAPE = (1, 32, 32)
ROOT = Path(__file__).resolve().parents[1]


def _headline():
    path = Path(__file__).resolve().parents[1] / "bench" / "headline.py"
    spec = importlib.util.spec_from_file_location("headline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_match_latency_finds_the_parameter_on_a_smooth_curve():
    hl = _headline()
    calls = []

    def ratio(p):  # latency falls as (1 - p)^2, the reference sits at p = 0.37
        calls.append(p)
        return ((1 - p) / (1 - 0.37)) ** 2

    m = hl.match_latency(ratio, 0.0, 0.6, tol=0.01, steps=8)
    assert m["reached"] and abs(m["ratio"] - 1) <= 0.01 and abs(m["param"] - 0.37) < 0.01
    assert len(m["probes"]) == len(calls) <= 8
    # Out of reach even after growing the bound: the closest probe, flagged.
    far = hl.match_latency(lambda p: 5.0 - p, 0.0, 0.6, steps=5, grow=lambda h: None if h >= 0.95 else 0.95)
    assert not far["reached"] and far["param"] == 0.95 and [q["param"] for q in far["probes"]] == [0.0, 0.6, 0.95]


def test_pruning_ratio_search_hits_a_flops_target():
    hl = _headline()
    teacher = create_model("timm:test_efficientnet", 1, 10).eval()
    _, t_flops = count_params_flops(teacher, SHAPE)
    goal = t_flops / 2.5  # "latency" = FLOPs; the reference network is 2.5x cheaper than the teacher

    def ratio(p):
        return count_params_flops(hl.prune(teacher, p, SHAPE, 10, round_to=None), SHAPE)[1] / goal

    m = hl.match_latency(ratio, 0.0, 0.6, tol=0.03, steps=8,
                         grow=lambda h: None if h >= 0.95 else min(0.95, h + 0.2))
    assert m["reached"], m
    pruned = hl.prune(teacher, m["param"], SHAPE, 10, round_to=None)
    # Pruned, not rebuilt: the classifier still has 10 outputs and the network runs and learns.
    x = torch.randn(4, *SHAPE)
    assert pruned(x).shape == (4, 10)
    pruned.train()
    pruned(x).sum().backward()
    assert math.isclose(count_params_flops(pruned, SHAPE)[1] / goal, m["ratio"])
    # Deterministic: the same ratio prunes the same channels, so saved weights load into a rebuild.
    again = hl.prune(teacher, m["param"], SHAPE, 10, round_to=None)
    again.load_state_dict(pruned.state_dict(), strict=True)


def test_smaller_efficientnet_search_hits_a_flops_target():
    hl = _headline()
    _, t_flops = count_params_flops(hl.scaled_model("timm:test_efficientnet", 0.0, 1, 10), SHAPE)
    goal = t_flops / 3

    def ratio(p):
        return count_params_flops(hl.scaled_model("timm:test_efficientnet", -p, 1, 10), SHAPE)[1] / goal

    m = hl.match_latency(ratio, 0.0, 4.0, tol=0.1, steps=10, grow=lambda h: None if h >= 24 else h * 1.6)
    # Channel counts are rounded to multiples of 8, so FLOPs move in steps: the closest is within a step.
    assert abs(math.log(m["ratio"])) < math.log(1.25), m
    small = hl.scaled_model("timm:test_efficientnet", -m["param"], 1, 10)
    assert small(torch.randn(2, *SHAPE)).shape == (2, 10)
    with pytest.raises(Exception, match="EfficientNet"):
        hl.scaled_model("timm:resnet18", -1.0, 1, 10)


def test_alternatives_timed_at_another_batch_are_not_matched_comparisons():
    hl = _headline()
    hant = {"unit": "hant-b1-x2", "method": "hant", "batch_size": 1}
    alt64 = [{"unit": "hant-b64-x2", "method": "hant", "batch_size": 64},
             {"unit": "pruned-b64-x2", "method": "pruned", "batch_size": 64, "matched_to": "hant-b64-x2",
              "match": {"reached": False}},
             {"unit": "hant-int8-b64-x2", "method": "hant-int8", "batch_size": 64}]
    extra = hl.timed_only(alt64)
    # Only the alternatives travel, keeping where they were matched and losing what they were matched to.
    assert [u["unit"] for u in extra] == ["pruned-b64-x2"]
    assert extra[0]["matched_to"] is None and extra[0]["matched_at_batch"] == 64
    assert alt64[1]["matched_to"] == "hant-b64-x2"  # the batch-64 unit itself is untouched

    def row(u, b, top1, ms):
        return {**u, "batch_size": b, "top1": top1, "latency_ms": ms, "speedup_target": 2.0}

    rows = [row(alt64[0], 64, 90.0, 10.0), row(alt64[1], 64, 88.5, 10.2),
            row(hant, 1, 89.0, 1.0), row(extra[0], 1, 88.5, 1.3)]
    comps = hl.comparisons(rows)
    assert len(comps) == 1 and comps[0]["batch_size"] == 64
    assert math.isclose(comps[0]["hant_minus_method"], 1.5) and comps[0]["hant_leads_by_1_point"]


def test_a_speedup_is_capped_by_the_tightest_smaller_one_at_its_batch():
    hl = _headline()
    assert hl.budget_cap({}, 2.0) is None
    # 2x's hardware check tightened its budget to 9.0 ms; 3x then ended at 6.5 ms.
    budgets = {2.0: 9.0, 3.0: 6.5}
    assert hl.budget_cap(budgets, 2.0) is None  # nothing smaller
    assert hl.budget_cap(budgets, 3.0) == 9.0
    assert hl.budget_cap(budgets, 4.0) == 6.5
    # The bisection tries 2.5x between them: capped by 2x, never by the larger 3x.
    assert hl.budget_cap(budgets, 2.5) == 9.0
    # Had 2.5x's check ended tighter than 3x's, a later 3.5x is capped by the tightest smaller one.
    budgets[2.5] = 6.0
    assert hl.budget_cap(budgets, 3.5) == 6.0


def test_names_say_the_recipe_and_alternatives_are_named_after_their_hant_student():
    hl = _headline()
    assert hl.recipe_tag({"check_rounds": 3, "redistill": True}) == "hw"
    assert hl.recipe_tag({"check_rounds": 1, "redistill": False}) == "hw-nord"
    assert hl.recipe_tag({"check_rounds": 0, "redistill": True}) == "rd"
    # The recipe before hardware checks keeps the names its cached units have.
    assert hl.recipe_tag(hl.LEGACY_RECIPE) == ""
    assert hl.Bench.alt_name("pruned", {"unit": "hant-hw-b64-x2"}) == "pruned-hw-b64-x2"
    assert hl.Bench.alt_name("hant-int8", {"unit": "hant-b1-x3"}) == "hant-int8-b1-x3"
    check = hl.Bench.same_ref({"unit": "hant-hw-b64-x2", "sha256": "aa"})
    assert check({"ref_sha256": "aa"}) is None and "hant-hw-b64-x2" in check({"ref_sha256": "bb"})


def test_hardware_check_summary_reports_the_plan_that_was_kept():
    hl = _headline()
    check = {"met": True, "goal_speedup": 1.96, "budget_cap_ms": None, "rounds": [
        {"budget_ms": 10.0, "speedup": 1.80, "speedup_ci_lo": 1.78, "speedup_ci_hi": 1.82,
         "decision": "short; budget tightened"},
        {"budget_ms": 9.0, "speedup": 2.30, "speedup_ci_lo": 2.25, "speedup_ci_hi": 2.35,
         "decision": "met; faster than asked, budget loosened"},
        {"budget_ms": 9.6, "speedup": 1.90, "speedup_ci_lo": 1.88, "speedup_ci_hi": 1.92,
         "decision": "short; back to the plan before"}]}
    hc = hl.hardware_check(check, 9.0)
    assert hc["timings"] == 3 and hc["met"] and hc["speedup"] == 2.30 and hc["speedup_ci"] == [2.25, 2.35]
    assert hc["decisions"][0].startswith("short")


def _quick(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--quick", "--out", str(out), "--batch-sizes", "64", "--speedups", "2,1.5", "--sweep-steps", "0",
            "--methods", "random,int8", "--finetune-epochs", "0.25", "--validate", "0", *extra]
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "headline.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_run_checks_plans_on_the_hardware_and_redistils_them(tmp_path, quick_root):
    out = tmp_path / "hl"
    shutil.copytree(quick_root, out / "quick")  # the session's quick run, which --quick then reuses
    _quick(out)
    d = json.loads((out / "headline.json").read_text())
    assert d["hant_recipe"]["check_rounds"] == 3 and d["hant_recipe"]["redistill"] is True
    rows = {r["unit"]: r for r in d["rows"]}
    assert {"teacher", "teacher-ft", "teacher-int8", "hant-hw-b64-x1.5", "hant-int8-hw-b64-x1.5",
            "random-hw-b64-x1.5"} <= set(rows)
    hant = rows["hant-hw-b64-x1.5"]
    assert hant["plan"] == "headline-hw-b64-x1.5"
    assert hant["recipe"] == {"check_rounds": 3, "redistill": True, "overshoot": OVERSHOOT}
    # The hardware check: at least one timing against the teacher, at most one more per round
    # (--check-rounds 3); its speedup is a measured ratio with an interval around it.
    hc = hant["hardware_check"]
    assert 1 <= hc["timings"] <= 4 and isinstance(hc["met"], bool) and len(hc["decisions"]) == hc["timings"]
    lo, hi = hc["speedup_ci"]
    assert 0 < lo <= hc["speedup"] <= hi and math.isfinite(hi)
    assert hc["budget_ms"] == hant["budget_ms"] and hc["budget_cap_ms"] is None  # the smallest speedup
    # Selected after 1.5x (ascending, whatever the order asked), 2x is capped by 1.5x's final budget.
    two = rows["hant-hw-b64-x2"]
    assert two["hardware_check"]["budget_cap_ms"] == hant["budget_ms"] and two["budget_ms"] <= hant["budget_ms"]
    unit = json.loads((out / "headline_rows" / "hant-hw-b64-x1.5.json").read_text())
    plan = json.loads((out / "quick" / "run" / "plans" / "headline-hw-b64-x1.5.json").read_text())
    assert unit["latency_check"] == plan["latency_check"] and plan["budget_ms"] == unit["budget_ms"]
    assert plan["headline_recipe"] == unit["recipe"]
    # Re-distilled before fine-tuning, and fine-tuning started from the re-distilled weights.
    for r in (hant, rows["random-hw-b64-x1.5"]):
        rd = r["redistill"]
        assert rd["done"] and rd["layers"] >= 1 and Path(rd["index"]).exists()
        assert rd["mean_heldout_nmse_before"] >= 0 and math.isfinite(rd["mean_heldout_nmse_before"])
        assert rd["mean_heldout_nmse_after"] >= 0 and math.isfinite(rd["mean_heldout_nmse_after"])
        assert r["init"] == "re-distilled candidates"
    assert rows["teacher-ft"].get("redistill") is None
    # The alternatives are named after, and tied to, the student they were matched to.
    rnd = json.loads((out / "headline_rows" / "random-hw-b64-x1.5.json").read_text())
    assert rnd["matched_to"] == "hant-hw-b64-x1.5" and rnd["ref_sha256"] == unit["sha256"] is not None
    assert rnd["plan"] == "headline-hw-b64-x1.5-random" and rnd["budget_ms"] == unit["budget_ms"]
    assert any("timed against the teacher" in n and "re-distilled" in n for n in d["notes"])
    md = (out / "headline.md").read_text()
    assert "plan checked" in md and "re-distilled" in md
    # Every drop is from the better of the teacher and the control, and comes with its paired
    # interval on the test images; the reference itself has none.
    ref = max(rows["teacher"]["top1"], rows["teacher-ft"]["top1"])
    assert d["reference"]["top1"] == ref
    for r in d["rows"]:
        assert r["top1_drop"] == pytest.approx(ref - r["top1"])
        assert r["top1_drop_from_teacher"] == pytest.approx(rows["teacher"]["top1"] - r["top1"])
        paired = r["top1_drop_paired"]
        assert paired["reference"] == d["reference"]["unit"] and paired["images"] == d["test_images"]
        assert paired["drop"] == pytest.approx(r["top1_drop"], abs=1e-3)  # top-1s summed in float32
        lo, hi = paired["ci95"]
        assert lo <= paired["drop"] <= hi and (hi > lo or r["unit"] == d["reference"]["unit"])

    # Again: every network is read back, none is made or selected again.
    p = _quick(out)
    assert "[headline] hant-hw-b64-x1.5 ..." not in p.stdout and "[headline] hant-hw-b64-x2 ..." not in p.stdout
    assert "redoing" not in p.stdout
    assert "measure headline-hw" not in p.stdout  # no hardware check ran
    assert json.loads((out / "headline_rows" / "hant-hw-b64-x1.5.json").read_text())["cost_s"] == unit["cost_s"]
    # Every network records the teacher it came from: another teacher's cached rows are not reused.
    assert rows["teacher"]["unit"] == "teacher" and len(unit["settings"]["teacher_sha256"]) == 64
