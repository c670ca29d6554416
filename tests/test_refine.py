"""Scores in a plan's context and the refinement rounds (`hant score --plan`, `hant refine`)."""

from __future__ import annotations

import shutil

import pytest

from hant.errors import HantError
from hant.workspace import RunDir, read_json, write_json

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _quiet(*a):
    pass


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny scored run with an analytic latency table and a plan at 1.5x."""
    from student_run import make_run

    from hant.latency import measure_table
    from hant.score import score
    from hant.select import select

    run = make_run(tmp_path_factory.mktemp("refine") / "run", images=120)
    rd = RunDir(run)
    lj = read_json(rd.layers)
    index = read_json(rd.candidates_index)["candidates"]
    for d in lj["layers"]:
        d["candidates"] = ["teacher"] + [e["spec"] for e in index if e["layer"] == d["name"]]
    write_json(rd.layers, lj)
    score(run, log=_quiet)
    measure_table(run, target="analytic", batch_size=1)
    select(run, target="analytic", speedup=1.5, name="p", log=_quiet)
    return run


@pytest.fixture
def run(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def test_context_scores_are_exact_for_one_change_and_the_plan_loss_is_measured(run):
    from hant.score import plan_heldout, score

    rd = RunDir(run)
    plan = read_json(rd.plan("p"))
    replaced = [n for n, s in plan["layers"].items() if s != "teacher"]
    assert replaced, "the 1.5x plan replaces some layer"
    doc = score(run, plan="p", log=_quiet)
    assert doc["complete"] and rd.context_scores("p").exists() and not (rd.root / "plans" / "p.scores.json").exists()
    base = plan_heldout(run, plan["layers"])
    assert doc["plan"]["layers"] == plan["layers"]
    assert doc["plan"]["d_loss"] == pytest.approx(base["d_loss"], abs=1e-5)
    assert doc["teacher"]["loss"] == pytest.approx(base["loss"] - base["d_loss"], abs=1e-5)
    got = {(e["layer"], e["spec"]): e for e in doc["entries"]}
    # Every layer's candidates, the teacher's own layer among them; the plan's own choice changes nothing.
    for name, spec in plan["layers"].items():
        assert got[(name, spec)]["d_loss"] == pytest.approx(0.0, abs=1e-5)
        assert (name, "teacher") in got
    # A score in the plan's context is exactly the loss change of that one change to the plan.
    name = replaced[0]
    for spec in ("teacher", next(s for (n, s) in got if n == name and s not in ("teacher", plan["layers"][name]))):
        changed = plan_heldout(run, {**plan["layers"], name: spec})
        assert got[(name, spec)]["d_loss"] == pytest.approx(changed["d_loss"] - base["d_loss"], abs=1e-5)
    assert got[(name, "teacher")]["d_loss"] != pytest.approx(0.0, abs=1e-6)


def test_select_in_context_predicts_from_the_plans_own_loss(run):
    from hant.score import score
    from hant.select import SelectOptions, select

    rd = RunDir(run)
    plan = read_json(rd.plan("p"))
    doc = score(run, plan="p", log=_quiet)
    again = select(run, target="analytic", budget_ms=plan["budget_ms"], name="q", options=SelectOptions(context="p"),
                   log=_quiet)
    ctx = {(e["layer"], e["spec"]): e["d_loss"] for e in doc["entries"]}
    want = doc["plan"]["d_loss"] + sum(ctx[(n, s)] for n, s in again["layers"].items())
    assert again["predicted"]["d_loss"] == pytest.approx(want, abs=1e-9)
    assert again["context"] == {"plan": "p", "d_loss": doc["plan"]["d_loss"]}
    # Keeping plan p costs nothing in its own context, so the program never predicts worse than p.
    assert again["predicted"]["d_loss"] <= doc["plan"]["d_loss"] + 1e-9
    assert again["predicted_ms"] <= plan["budget_ms"] + 1e-9
    # Scores of another plan, or of a plan changed since, are refused in one line.
    with pytest.raises(HantError, match="hant score --run .* --plan q"):
        select(run, target="analytic", budget_ms=plan["budget_ms"], name="r", options=SelectOptions(context="q"),
               log=_quiet)


def test_refine_keeps_the_plan_with_the_lowest_measured_loss_and_a_rerun_reads_it_back(run, monkeypatch):
    import hant.score as score_mod
    from hant.pipeline import refine_plan

    rd = RunDir(run)
    first = read_json(rd.plan("p"))
    logs = []
    record = refine_plan(run, "p", 2, log=logs.append)
    assert record["complete"] and read_json(rd.refine_record("p")) == record
    rows = record["rounds"]
    assert rows[0]["name"] == "p-r0" and rows[0]["layers"] == first["layers"] and rows[0]["changed"] == 0
    assert read_json(rd.plan("p-r0"))["layers"] == first["layers"]
    winner = min(rows, key=lambda r: r["heldout"]["d_loss"])
    assert record["winner"] == winner["name"]
    final = read_json(rd.plan("p"))
    assert final["layers"] == winner["layers"] and final["name"] == "p"
    assert final["refined"]["winner"] == winner["name"] and final["predicted_ms"] <= first["budget_ms"] + 1e-9
    for row in rows:  # each loss is measured on the plan itself
        assert row["heldout"]["d_loss"] == pytest.approx(
            score_mod.plan_heldout(run, row["layers"], every_image=True)["d_loss"], abs=1e-5)
    assert any("<- kept" in m for m in logs)
    # Interim plans warn about nothing; the kept plan's accuracy risk sums the teacher-context scores
    # of its own layers, the scale the warning's threshold was set on.
    assert not any(m.startswith("warning: plan p-r") for m in logs)
    if record["winner"] != "p-r0" and first.get("accuracy_risk"):
        summed = sum(e["d_loss"] for e in read_json(rd.scores)["entries"]
                     if final["layers"].get(e["layer"]) == e["spec"])
        assert final["accuracy_risk"]["predicted_d_loss"] == pytest.approx(summed)
        assert final["accuracy_risk"]["message"] is None or final["accuracy_risk"]["message"].startswith("plan p ")

    # Each round's plan says what it is; the report lists the rounds and no interim plan's warning.
    from hant.report import accuracy_risk_lines, collect, refine_lines

    for row in rows[1:]:
        assert read_json(rd.plan(row["name"]))["refinement_of"] == "p"
    assert "refined_as" not in final and "refinement_of" not in final
    info = collect(run)
    lines = refine_lines(info)
    assert len(lines) == 1 and lines[0].startswith("- p: r0 ") and lines[0].endswith(f"kept {winner['name'][2:]}.")
    assert not any(ln.startswith("- p-r") for ln in accuracy_risk_lines(info))

    # A rerun of the same request reads the record back and scores nothing.
    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(score_mod, "score", no_scoring)
    monkeypatch.setattr(score_mod, "plan_heldout", no_scoring)
    assert refine_plan(run, "p", 2, log=_quiet) == record


def test_an_interrupted_refinement_resumes_from_the_first_plan_with_its_scores(run, monkeypatch):
    import hant.score as score_mod
    from hant.pipeline import refine_plan

    rd = RunDir(run)
    first = read_json(rd.plan("p"))
    real = score_mod.score
    calls = []

    def crash_after_scoring(r, plan=None, log=print, **k):
        calls.append(plan)
        real(r, plan=plan, log=log, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(score_mod, "score", crash_after_scoring)
    with pytest.raises(KeyboardInterrupt):
        refine_plan(run, "p", 1, log=_quiet)
    assert not read_json(rd.refine_record("p"))["complete"] and calls == ["p-r0"]
    # The plan under the name may have been rewritten by then; the rerun starts from p-r0.
    write_json(rd.plan("p"), {**first, "layers": {n: "teacher" for n in first["layers"]}})
    logs = []
    monkeypatch.setattr(score_mod, "score", real)
    record = refine_plan(run, "p", 1, log=logs.append)
    assert record["complete"] and record["rounds"][0]["layers"] == first["layers"]
    assert any("already scored" in m for m in logs)  # the context scores on disk were reused


def test_refine_refuses_zero_rounds_and_accelerate_options_check_it(run):
    from hant.pipeline import AccelerateOptions, refine_plan

    with pytest.raises(HantError, match="--refine"):
        refine_plan(run, "p", 0, log=_quiet)
    with pytest.raises(HantError, match="--refine"):
        AccelerateOptions(refine=-1)
    with pytest.raises(HantError, match="method eval"):
        from hant.score import score

        score(run, method="distill", plan="p", log=_quiet)


def test_a_round_plan_that_falls_short_on_the_hardware_is_never_kept(run):
    from hant.pipeline import refine_plan

    rd = RunDir(run)
    first = read_json(rd.plan("p"))
    teacher_ms = first["teacher_ms"]

    def timer(r, name):
        # The first plan meets its speedup; every round's plan runs at the teacher's speed.
        ms = teacher_ms if "-r" in name and not name.endswith("-r0") else first["predicted_ms"]
        sp = teacher_ms / ms
        return {"teacher_ms": teacher_ms, "student_ms": ms, "speedup": sp, "speedup_ci_lo": sp, "speedup_ci_hi": sp}

    logs = []
    record = refine_plan(run, "p", 1, timer=timer, check_rounds=1, log=logs.append)
    rows = record["rounds"]
    assert len(rows) == 2  # the round changed the plan: it was timed, fell short, and was left out
    assert read_json(rd.plan(rows[1]["name"]))["latency_check"]["met"] is False
    assert "ineligible" in rows[1] and any("left out" in m for m in logs)
    assert record["winner"] == "p-r0" and read_json(rd.plan("p"))["layers"] == first["layers"]


def test_cli_score_plan_select_context_refine_and_accelerate_flag(run, capsys):
    from hant.cli import build_parser, main

    # Selecting around a plan that has no scores in its context is refused in one line.
    assert main(["select", "--run", str(run), "--target", "analytic", "--budget-ms", "1", "--context", "p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hant score --run" in err[0] and "--plan p" in err[0]
    assert main(["score", "--run", str(run), "--plan", "p"]) == 0
    assert RunDir(run).context_scores("p").exists()
    assert main(["refine", "--run", str(run), "--plan", "p", "--check-rounds", "0"]) == 0
    assert read_json(RunDir(run).refine_record("p"))["complete"]
    assert build_parser().parse_args(["accelerate", "--run", "r", "--refine", "2"]).refine == 2
    assert build_parser().parse_args(["accelerate", "--run", "r"]).refine is None
