"""K candidate plans, each briefly distilled; the best on held-out images is fine-tuned (hant.pick)."""

import math
import shutil

import pytest

from hant import pick as pick_mod
from hant.errors import HantError
from hant.pick import check_alternatives, original_name, pick_plan, ranking_path
from hant.run import Run
from hant.workspace import RunDir, read_json, write_json
from student_run import layer_names, make_run, write_plan

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pick") / "run")


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    _three_plans(dst)
    return dst


def _check(speedup=2.0, met=True):
    """A plan's hardware check as `select_measured` records it (one round)."""
    return {"rounds": [{"speedup": speedup, "speedup_ci_lo": speedup, "speedup_ci_hi": speedup,
                        "decision": "met" if met else "short"}],
            "tolerance": 0.02, "goal_speedup": 1.96, "met": met}


def _three_plans(run):
    """Plan "p" as `select --candidates 3` leaves it (checked on the hardware), with two alternatives."""
    names = layer_names(run)
    layers = {"p": {n: "proj" for n in names},
              "p-alt1": {n: "mb_k3_e1_relu" if i % 2 else "proj" for i, n in enumerate(names)},
              "p-alt2": {n: "teacher" if i < 3 else "proj" for i, n in enumerate(names)}}
    for i, (name, plan_layers) in enumerate(layers.items()):
        write_plan(run, name, plan_layers)
        plan = {**read_json(RunDir(run).plan(name)), "name": name, "predicted_ms": 0.5 + 0.01 * i}
        if i == 0:
            plan.update(speedup=2.0, alternatives=["p-alt1", "p-alt2"], latency_check=_check(2.1))
        else:
            plan.update(rank=i, alternative_of="p", differs_from_best=3)
        write_json(RunDir(run).plan(name), plan)
    return layers


def _quiet(*a):
    pass


def _fake_scores(losses):
    """A stand-in for the short distillation: held-out loss by plan name, no training."""
    calls = []

    def fake(run, plan, images, cfg, splits, teacher, held, log):
        calls.append(plan["name"])
        loss = losses[plan["name"]]
        return {"heldout_loss": loss, "heldout_kl": loss / 2, "heldout_top1": 50.0,
                "assembled": {"heldout_loss": 2 * loss, "heldout_kl": loss, "heldout_top1": 40.0},
                "steps": 1, "batch_size": images, "train_images": images, "final_train_loss": loss, "time_s": 0.0}

    fake.calls = calls
    return fake


# ----------------------------------------------------------------------------- the pick itself


def test_three_plans_are_distilled_scored_and_the_best_becomes_the_plan(run, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    original = read_json(RunDir(run).plan("p"))
    doc = pick_plan(run, "p", images=32, log=_quiet)

    on_disk = read_json(ranking_path(run, "p"))
    assert doc["path"] == str(ranking_path(run, "p")) and on_disk["complete"] and on_disk["settings"]["images"] == 32
    ranking = on_disk["ranking"]
    assert sorted(e["name"] for e in ranking) == ["p-alt0", "p-alt1", "p-alt2"]
    for e in ranking:
        assert math.isfinite(e["heldout_loss"]) and e["heldout_kl"] >= 0 and 0 <= e["heldout_top1"] <= 100
        assert math.isfinite(e["assembled"]["heldout_loss"]) and e["train_images"] == 32 and e["steps"] == 2
        source = original if e["name"] == "p-alt0" else read_json(RunDir(run).plan(e["name"]))
        assert e["layers"] == source["layers"]
    losses = [e["heldout_loss"] for e in ranking]
    assert losses == sorted(losses) and [e["rank"] for e in ranking] == [1, 2, 3]
    assert on_disk["teacher"]["heldout_kl"] == 0.0 and on_disk["teacher"]["heldout_images"] == 16

    # The winner is the plan fine-tuning reads under the name "p"; the original best is kept.
    winner = ranking[0]
    assert on_disk["winner"] == winner["name"]
    plan = Run(run).plan("p")
    assert plan["layers"] == winner["layers"] and plan["picked_from"]["plan"] == winner["name"]
    assert plan["picked_from"]["ranking"] == "plans/p.pick.json" and plan["alternatives"] == ["p-alt1", "p-alt2"]
    kept = read_json(RunDir(run).plan(original_name("p")))
    assert kept["layers"] == original["layers"] and kept["latency_check"] == original["latency_check"]

    # Deterministic given the seed: the same run picked again from scratch gives the same numbers.
    again = pick_plan(twin, "p", images=32, log=_quiet)
    assert [(e["name"], e["heldout_loss"], e["heldout_top1"]) for e in again["ranking"]] == \
           [(e["name"], e["heldout_loss"], e["heldout_top1"]) for e in ranking]


def test_a_rerun_reuses_the_ranking_and_new_settings_rank_again(run, monkeypatch):
    first = pick_plan(run, "p", images=32, log=_quiet)
    plan = read_json(RunDir(run).plan("p"))

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(pick_mod, "_short_distillation", no_training)
    lines = []
    again = pick_plan(run, "p", images=32, log=lines.append)
    assert again["ranking"] == first["ranking"] and again["winner"] == first["winner"]
    assert read_json(RunDir(run).plan("p")) == plan and any("reused" in line for line in lines)
    with pytest.raises(AssertionError, match="trained again"):
        pick_plan(run, "p", images=48, log=_quiet)


def test_a_winning_alternative_keeps_its_own_hardware_check(run, monkeypatch):
    rd = RunDir(run)
    original = read_json(rd.plan("p"))
    alt1 = {**read_json(rd.plan("p-alt1")), "latency_check": _check(2.05)}
    write_json(rd.plan("p-alt1"), alt1)
    fake = _fake_scores({"p-alt0": 0.5, "p-alt1": 0.3, "p-alt2": 0.4})
    monkeypatch.setattr(pick_mod, "_short_distillation", fake)
    doc = pick_plan(run, "p", images=8, log=_quiet)
    assert fake.calls == ["p-alt0", "p-alt1", "p-alt2"] and doc["winner"] == "p-alt1"
    assert [e["name"] for e in doc["ranking"]] == ["p-alt1", "p-alt2", "p-alt0"]
    assert [e["rank_assembled"] for e in doc["ranking"]] == [1, 2, 3]

    plan = read_json(rd.plan("p"))
    assert plan["layers"] == alt1["layers"] and plan["name"] == "p"
    assert plan["latency_check"] == alt1["latency_check"] and plan["predicted_ms"] == alt1["predicted_ms"]
    assert plan["speedup"] == 2.0 and plan["alternatives"] == ["p-alt1", "p-alt2"]
    assert not {"rank", "alternative_of", "differs_from_best"} & set(plan)
    assert plan["picked_from"] == {"plan": "p-alt1", "ranking": "plans/p.pick.json", "heldout_loss": 0.3,
                                   "heldout_top1": 50.0}
    from hant.pipeline import _plan_settled

    assert _plan_settled(run, "p", check_rounds=3, candidates=3)  # a rerun of accelerate keeps the pick

    # Ranked again with other settings, the original best wins and comes back under "p".
    monkeypatch.setattr(pick_mod, "_short_distillation", _fake_scores({"p-alt0": 0.1, "p-alt1": 0.3, "p-alt2": 0.4}))
    doc = pick_plan(run, "p", images=16, log=_quiet)
    plan = read_json(rd.plan("p"))
    assert doc["winner"] == "p-alt0" and plan["layers"] == original["layers"]
    assert plan["latency_check"] == original["latency_check"] and plan["picked_from"]["plan"] == "p-alt0"


def test_a_plan_without_alternatives_has_nothing_to_pick(run, monkeypatch):
    write_plan(run, "solo", read_json(RunDir(run).plan("p"))["layers"])
    monkeypatch.setattr(pick_mod, "_short_distillation", _fake_scores({}))
    out = pick_plan(run, "solo", log=_quiet)
    assert out["winner"] == "solo" and out["ranking"] == [] and not ranking_path(run, "solo").exists()
    with pytest.raises(HantError, match="no plan 'nope'"):
        pick_plan(run, "nope", log=_quiet)
    with pytest.raises(HantError, match="--images"):
        pick_plan(run, "p", images=0, log=_quiet)


# ----------------------------------------------------------------------------- eligibility


def _timer(speedups, half_width=0.0, teacher_ms=4.0):
    """A hardware on which plan `name` runs `speedups[name]` times faster than the teacher."""
    timed = []

    def timer(r, name, log=None):
        timed.append(name)
        sp = speedups[name]
        s_ms = teacher_ms / sp
        return {"teacher_ms": teacher_ms, "student_ms": s_ms, "student_ci_lo_ms": s_ms, "student_ci_hi_ms": s_ms,
                "speedup": sp, "speedup_ci_lo": sp * (1 - half_width), "speedup_ci_hi": sp * (1 + half_width),
                "timing": {"threads": 1, "clock": "thread-cpu"}}

    timer.timed = timed
    return timer


def test_a_too_slow_alternative_is_left_out(run, monkeypatch):
    rd = RunDir(run)
    # alt1 is 3% short of 2x, within its interval: met as `select_measured` would judge it.
    timer = _timer({"p-alt1": 1.94, "p-alt2": 1.6}, half_width=0.05)
    checks = check_alternatives(run, "p", timer=timer, speedup=2.0, log=_quiet)
    assert [(c["name"], c["decision"], c["met"]) for c in checks] == [
        ("p-alt1", "met within the interval", True), ("p-alt2", "short", False)]
    alt2 = read_json(rd.plan("p-alt2"))["latency_check"]
    assert not alt2["met"] and alt2["rounds"][0]["speedup"] == pytest.approx(1.6)
    assert alt2["goal_speedup"] == pytest.approx(1.96) and alt2["timing"]["threads"] == 1
    # Checked once: a rerun for the same speedup reads the checks back.
    assert check_alternatives(run, "p", timer=_timer({}), speedup=2.0, log=_quiet) == checks

    # alt2 would win on held-out loss, but it is not fast enough.
    fake = _fake_scores({"p-alt0": 0.5, "p-alt1": 0.4, "p-alt2": 0.1})
    monkeypatch.setattr(pick_mod, "_short_distillation", fake)
    doc = pick_plan(run, "p", images=8, log=_quiet)
    assert fake.calls == ["p-alt0", "p-alt1"] and [e["name"] for e in doc["ranking"]] == ["p-alt1", "p-alt0"]
    assert [s["name"] for s in doc["skipped"]] == ["p-alt2"] and "1.60x" in doc["skipped"][0]["reason"]
    assert doc["winner"] == "p-alt1" and read_json(rd.plan("p"))["layers"] == read_json(rd.plan("p-alt1"))["layers"]


# ----------------------------------------------------------------------------- pipeline and CLI


def _stub_stages(monkeypatch, events):
    from hant import distill, export, finetune, latency, measure, redistill, report, score

    for mod, attr in ((distill, "distill"), (latency, "measure_table"), (score, "score"), (measure, "measure"),
                      (export, "export")):
        monkeypatch.setattr(mod, attr, lambda *a, **k: None)
    monkeypatch.setattr(redistill, "redistill", lambda r, name, **k: events.append(("redistill", name)))
    monkeypatch.setattr(finetune, "finetune", lambda r, name, **k: events.append(("finetune", name)))
    monkeypatch.setattr(report, "write_report", lambda r: RunDir(r).report)
    monkeypatch.setattr("hant.pipeline.refine_plan", lambda r, name, rounds, **k: events.append(("refine", name)))


def test_accelerate_with_candidates_checks_the_alternatives_then_picks_before_finetuning(tmp_path, monkeypatch):
    from hant import measure
    from hant.pipeline import AccelerateOptions, accelerate_run, plan_name
    from test_select import _fake_run

    run, _ = _fake_run(tmp_path, layers=6)
    events = []
    _stub_stages(monkeypatch, events)

    def timer(r, name, log=None):
        # Every plan as predicted, the second alternative 30% slower.
        p = read_json(RunDir(r).plan(name))
        return {"teacher_ms": 4.5, "student_ms": p["predicted_ms"] * (1.3 if name.endswith("-alt2") else 1.0)}

    def pick(r, name, images=None, log=print):
        alts = read_json(RunDir(r).plan(name))["alternatives"]
        events.append(("pick", name, {a: read_json(RunDir(r).plan(a))["latency_check"]["met"] for a in alts}))
        return {}

    monkeypatch.setattr(measure, "time_plan", timer)
    monkeypatch.setattr(pick_mod, "pick_plan", pick)
    opts = AccelerateOptions(target="t1", speedups=[1.2], int8=False, candidates=3, refine=1)
    accelerate_run(run, opts, log=_quiet)
    name = plan_name("t1", 1, 1.2)
    # Refinement first (its plan keeps the alternatives), then the pick; the picked plan is
    # re-distilled, then fine-tuned.
    assert events == [("refine", name), ("pick", name, {f"{name}-alt1": True, f"{name}-alt2": False}), ("redistill", name),
                      ("finetune", name)]
    plan = read_json(RunDir(run).plan(name))
    # The checked plan file names its alternatives, as `select` writes them.
    assert "latency_check" in plan and plan["alternatives"] == [f"{name}-alt1", f"{name}-alt2"]
    with pytest.raises(HantError, match="--candidates"):
        AccelerateOptions(candidates=0)


def test_accelerate_with_one_candidate_selects_as_before_and_never_picks(tmp_path, monkeypatch):
    from hant import select as select_mod
    from hant.pipeline import AccelerateOptions, accelerate_run, plan_name
    from test_select import _fake_run, _timer as exact_timer

    run, _ = _fake_run(tmp_path)
    events, kwargs = [], []
    _stub_stages(monkeypatch, events)
    real = select_mod.select_measured

    def checked(*a, **k):
        kwargs.append(sorted(k))
        return real(*a, **{**k, "timer": exact_timer()})

    def never(*a, **k):
        raise AssertionError("picked with one candidate")

    monkeypatch.setattr(select_mod, "select_measured", checked)
    monkeypatch.setattr(pick_mod, "pick_plan", never)
    monkeypatch.setattr(pick_mod, "check_alternatives", never)
    accelerate_run(run, AccelerateOptions(target="t1", speedups=[1.2], int8=False), log=_quiet)
    name = plan_name("t1", 1, 1.2)
    assert kwargs == [["log", "max_budget_ms", "name", "rounds", "speedup", "timer"]]
    assert events == [("redistill", name), ("finetune", name)]
    assert "alternatives" not in read_json(RunDir(run).plan(name))
    assert not RunDir(run).plan(f"{name}-alt1").exists()


def test_accelerate_without_redistill_fine_tunes_the_phase1_weights(tmp_path, monkeypatch):
    from hant.cli import build_parser
    from hant.pipeline import AccelerateOptions, accelerate_run, plan_name
    from test_select import _fake_run, _timer as exact_timer

    run, _ = _fake_run(tmp_path)
    events = []
    _stub_stages(monkeypatch, events)
    monkeypatch.setattr("hant.measure.time_plan", lambda r, n, log=None: exact_timer()(r, n))
    accelerate_run(run, AccelerateOptions(target="t1", speedups=[1.2], int8=False, redistill=False), log=_quiet)
    assert events == [("finetune", plan_name("t1", 1, 1.2))]
    events.clear()  # with refinement: after selection, before re-distillation and the pick
    shutil.rmtree(RunDir(run).root / "plans")
    accelerate_run(run, AccelerateOptions(target="t1", speedups=[1.2], int8=False, refine=1), log=_quiet)
    assert events == [("refine", plan_name("t1", 1, 1.2)), ("redistill", plan_name("t1", 1, 1.2)),
                      ("finetune", plan_name("t1", 1, 1.2))]
    assert build_parser().parse_args(["accelerate", "--run", "r", "--no-redistill"]).no_redistill
    assert not build_parser().parse_args(["accelerate", "--run", "r"]).no_redistill


def test_cli_pick_and_accelerate_candidates(run, monkeypatch, capsys):
    from hant.cli import build_parser, main

    monkeypatch.setattr(pick_mod, "_short_distillation", _fake_scores({"p-alt0": 0.5, "p-alt1": 0.2, "p-alt2": 0.4}))
    assert main(["pick", "--run", str(run), "--plan", "p", "--images", "16"]) == 0
    assert read_json(ranking_path(run, "p"))["settings"]["images"] == 16
    assert read_json(RunDir(run).plan("p"))["picked_from"]["plan"] == "p-alt1"
    capsys.readouterr()
    assert main(["pick", "--run", str(run), "--plan", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no plan 'nope'" in err[0]
    assert build_parser().parse_args(["accelerate", "--run", "r", "--candidates", "3"]).candidates == 3
    assert build_parser().parse_args(["accelerate", "--run", "r"]).candidates == 1


def test_accelerate_makes_a_finished_student_again_only_when_its_settings_changed(tmp_path, monkeypatch):
    from hant import finetune, pipeline, redistill
    from hant.pipeline import AccelerateOptions, accelerate_run, plan_name
    from test_select import _fake_run, _timer as exact_timer

    run, _ = _fake_run(tmp_path)
    events = []
    _stub_stages(monkeypatch, events)
    monkeypatch.setattr("hant.measure.time_plan", lambda r, n, log=None: exact_timer()(r, n))
    monkeypatch.setattr(pipeline, "_student_intact", lambda r, n: True)
    monkeypatch.setattr(pipeline, "_eval_complete", lambda r, n, int8: True)
    name, opts = plan_name("t1", 1, 1.2), AccelerateOptions(target="t1", speedups=[1.2], int8=False, refine=1)
    state = {"current": True, "outdated": None}
    monkeypatch.setattr(redistill, "is_current", lambda r, n: state["current"])
    monkeypatch.setattr(finetune, "outdated", lambda r, n, epochs=None: state["outdated"])
    lines = []
    accelerate_run(run, opts, log=lines.append)
    assert events == [] and f"[hant] finetune {name}: complete, skipped" in lines
    # A student made before refinement existed keeps its plan.
    assert f"[hant] refine {name}: complete, skipped" in lines
    state["outdated"] = "lr"
    lines.clear()
    accelerate_run(run, opts, log=lines.append)
    assert events == [("redistill", name), ("finetune", name)]
    assert any("other settings (lr)" in ln and "making it again" in ln for ln in lines)
    state.update(current=False, outdated=None)
    events.clear()
    accelerate_run(run, opts, log=lines.append)
    assert events == [("redistill", name), ("finetune", name)]
