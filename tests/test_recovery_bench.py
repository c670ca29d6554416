"""bench/recovery.py: its recipe grammar (the one-change variants of `new` that --sweep asks for),
and a tiny run end to end."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recovery():
    spec = importlib.util.spec_from_file_location("recovery_bench", ROOT / "bench" / "recovery.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["recovery_bench"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_sweep_changes_one_setting_of_new(recovery):
    new = recovery.make_recipes("none", [])[1]
    assert new.name == "new" and new.redistill and new.feature_loss == "none"
    got = {r.name: r for r in recovery.sweep_recipes(new, ["ce=0", "lr=2e-3", "rd=8192", "fl=cosine"])}
    assert set(got) == {"ce0", "lr0.002", "rd8192", "fl-cosine"}
    assert all(r.sweep and r.plan == new.plan and r.redistill for r in got.values())
    assert got["ce0"].ce_weight == 0.0 and got["ce0"].feature_loss == "none"
    assert got["lr0.002"].lr == 0.002 and got["lr0.002"].ce_weight is None
    assert got["rd8192"].redistill_images == 8192 and isinstance(got["rd8192"].redistill_images, int)
    assert got["fl-cosine"].feature_loss == "cosine" and got["fl-cosine"].lr is None
    assert "cosine feature loss" in got["fl-cosine"].describe()


def test_sweep_of_the_fine_tuning_loop(recovery):
    new = recovery.make_recipes("none", [])[1]
    got = {r.name: r for r in recovery.sweep_recipes(new, ["aug=0", "bs=64", "t=1", "seed=1", "head=1", "sk=1"])}
    assert set(got) == {"aug0", "bs64", "t1", "seed1", "head1", "sk1"}
    assert got["sk1"].redistill_skips is True and got["sk1"].redistill_images is None
    assert "through the skips" in got["sk1"].describe()
    assert got["head1"].head_fit is True and got["head1"].augment is None
    assert "output layer fitted first" in got["head1"].describe()
    assert got["seed1"].seed == 1 and got["seed1"].lr is None
    assert got["aug0"].augment is False and got["aug0"].batch_size is None
    assert got["bs64"].batch_size == 64 and isinstance(got["bs64"].batch_size, int)
    assert got["t1"].temperature == 1.0 and got["t1"].augment is None
    assert "not augmented" in got["aug0"].describe() and "batch 64" in got["bs64"].describe()


@pytest.mark.parametrize("item", ["fl=none", "fl=l1", "rd=0", "rd=1.5", "lr=x", "wd=0.1",
                                  "aug=2", "bs=0", "bs=32.5", "t=0", "lr=-1", "seed=0.5", "head=2", "sk=2"])
def test_sweep_refuses_what_it_cannot_run(recovery, item):
    new = recovery.make_recipes("none", [])[1]
    with pytest.raises(ValueError, match="--sweep"):
        recovery.sweep_recipes(new, [item])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_run_gives_curves_with_drops_from_the_better_reference(tmp_path, quick_root):
    run = tmp_path / "run"
    shutil.copytree(quick_root / "run", run)
    out, cache = tmp_path / "recovery.json", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "bench" / "recovery.py"), "--run", str(run), "--speedups", "1.5",
           "--epochs", "0,0.25", "--ablations", "", "--sweep", "", "--validate", "0", "--time-cap", "5",
           "--max-repeats", "30", "--at-epochs", "0.25", "--cache", str(cache), "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    assert set(d["curves"]) == {"today", "new"} and (out.parent / "recovery.png").exists()
    controls = {label: {pt["epochs"]: pt["top1"] for pt in c["points"]} for label, c in d["controls"].items()}
    for recipe, curves in d["curves"].items():
        rows = curves["1.5"]
        assert [r["epochs"] for r in rows] == [0.0, 0.25]
        for r in rows:
            # The reference is the better of the teacher and the control of the same loss and epochs.
            label = next(lb for lb, c in d["controls"].items() if recipe in c["used_by"])
            expect = d["teacher_top1"] if r["epochs"] == 0 else max(d["teacher_top1"], controls[label][r["epochs"]])
            assert r["reference_top1"] == pytest.approx(expect)
            assert r["drop"] == pytest.approx(expect - r["top1"])
            # The same drop image by image, inside its 95% interval.
            assert r["drop_paired"]["drop"] == pytest.approx(r["drop"], abs=1e-6)
            lo, hi = r["drop_paired"]["ci95"]
            assert lo <= r["drop"] <= hi
            assert r["measured_speedup"] > 0
    # Again: every unit is read back from the cache.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert again.returncode == 0
    assert json.loads(out.read_text())["curves"] == d["curves"]
