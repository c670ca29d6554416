import numpy as np
import pytest

from hant.errors import HantError
from hant.solver import (Constraint, InfeasibleError, exhaustive, greedy, plan_totals, random_feasible,
                         solve)


def _instance(rng, layers, cands, extra_kinds=0):
    costs = [rng.normal(size=rng.integers(1, cands + 1)) for _ in range(layers)]
    lat = [rng.uniform(0.1, 1.0, size=c.size) for c in costs]
    fixed = float(rng.uniform(0, 1))
    lo = fixed + sum(t.min() for t in lat)
    hi = fixed + sum(t.max() for t in lat)
    budget = float(rng.uniform(lo, hi))
    extra = []
    for k in range(extra_kinds):
        coeffs = [rng.uniform(0, 10, size=c.size) for c in costs]
        lo_k = sum(a.min() for a in coeffs)
        hi_k = sum(a.max() for a in coeffs)
        extra.append(Constraint(f"res{k}", coeffs, float(rng.uniform(lo_k, hi_k)) + 5.0, offset=5.0))
    return costs, lat, fixed, budget, extra


def _feasible(sol, lat, fixed, budget, extra):
    if plan_totals(sol.choice, lat, fixed) > budget + 1e-9:
        return False
    return all(plan_totals(sol.choice, k.coeffs, k.offset) <= k.bound + 1e-9 for k in extra)


@pytest.mark.parametrize("extra_kinds", [0, 2])
def test_solve_equals_exhaustive_optimum(extra_kinds):
    rng = np.random.default_rng(extra_kinds)
    solved = 0
    for _ in range(60):
        costs, lat, fixed, budget, extra = _instance(rng, int(rng.integers(1, 6)), 5, extra_kinds)
        try:
            best = exhaustive(costs, lat, budget, fixed=fixed, extra=extra)
        except InfeasibleError:
            with pytest.raises(InfeasibleError):
                solve(costs, lat, budget, fixed=fixed, extra=extra)
            continue
        sol = solve(costs, lat, budget, fixed=fixed, extra=extra)
        assert sol.status == "optimal"
        assert _feasible(sol, lat, fixed, budget, extra)
        assert sol.objective == pytest.approx(best.objective, abs=1e-9)
        assert sol.objective == pytest.approx(plan_totals(sol.choice, costs))
        solved += 1
    assert solved >= 30  # most random instances are feasible; the comparison really ran


def test_bound_fixing_keeps_the_optimum():
    from hant.solver import _all_constraints, _fix_by_bound

    rng = np.random.default_rng(11)
    kept = total = 0
    for _ in range(15):
        lat = [rng.uniform(0.1, 1.0, 6) for _ in range(8)]
        costs = [np.clip(1.0 - t + rng.normal(0, 0.05, 6), 0, None) for t in lat]
        budget = 0.7 * sum(t.min() for t in lat) + 0.3 * sum(t.max() for t in lat)
        best = exhaustive(costs, lat, budget)
        keep = _fix_by_bound(costs, _all_constraints(lat, budget, 0.0, []))
        assert all(o in k for o, k in zip(best.choice, keep))
        kept += sum(k.size for k in keep)
        total += 8 * 6
    assert kept < 0.8 * total  # the bound really removes candidates


def test_budget_binds():
    # The best-scoring candidate is the slow one; the budget forces the fast one in layer 1 only.
    costs = [np.array([0.0, 1.0]), np.array([0.0, 3.0])]
    lat = [np.array([2.0, 1.0]), np.array([2.0, 1.0])]
    assert solve(costs, lat, 4.0).choice == [0, 0]
    assert solve(costs, lat, 3.0).choice == [1, 0]
    assert solve(costs, lat, 2.0).choice == [1, 1]


def test_infeasible_budget_gives_fastest_latency():
    costs = [np.array([0.0, 1.0]), np.array([0.0, 2.0, 5.0])]
    lat = [np.array([2.0, 0.75]), np.array([3.0, 1.0, 0.5])]
    with pytest.raises(InfeasibleError) as e:
        solve(costs, lat, 1.5, fixed=0.5)
    msg = str(e.value)
    assert "1.75 ms" in msg and "\n" not in msg  # 0.5 fixed + 0.75 + 0.5
    assert e.value.fastest == pytest.approx(1.75)
    assert isinstance(e.value, HantError)
    for baseline in (greedy, random_feasible):
        with pytest.raises(InfeasibleError, match="1.75 ms"):
            baseline(costs, lat, 1.5, fixed=0.5)


def test_jointly_infeasible_constraints_say_so():
    # Fast candidates are big: latency and params can each be met, not both.
    costs = [np.array([0.0, 0.0])]
    lat = [np.array([1.0, 2.0])]
    params = Constraint("params", [np.array([10.0, 1.0])], bound=5.0)
    with pytest.raises(InfeasibleError, match="together"):
        solve(costs, lat, 1.5, extra=[params])
    with pytest.raises(InfeasibleError, match="params limit 0.5 cannot be met"):
        solve(costs, lat, 5.0, extra=[Constraint("params", [np.array([10.0, 1.0])], bound=0.5)])


@pytest.mark.parametrize("name", ["params", "flops", "latency on second-target"])
def test_extra_constraint_holds(name):
    rng = np.random.default_rng(7)
    L, n = 6, 8
    costs = [rng.uniform(0, 1, n) for _ in range(L)]
    lat = [rng.uniform(0.1, 1, n) for _ in range(L)]
    # The resource grows as the cost falls, so the unconstrained optimum uses a lot of it.
    res = [(1.0 - c) * 100 + rng.uniform(0, 5, n) for c in costs]
    free = solve(costs, lat, 1e9)
    used = plan_totals(free.choice, res, 20.0)
    bound = 20.0 + 0.6 * (used - 20.0)
    k = Constraint(name, res, bound, offset=20.0)
    sol = solve(costs, lat, 1e9, extra=[k])
    assert plan_totals(sol.choice, res, 20.0) <= bound
    assert sol.objective > free.objective  # the constraint really bound
    assert sol.objective == pytest.approx(exhaustive(costs, lat, 1e9, extra=[k]).objective)


def test_greedy_and_random_are_feasible_and_no_better_than_optimum():
    rng = np.random.default_rng(3)
    for _ in range(40):
        costs, lat, fixed, budget, extra = _instance(rng, 5, 5, int(rng.integers(0, 2)))
        try:
            best = solve(costs, lat, budget, fixed=fixed, extra=extra)
        except InfeasibleError:
            continue
        for sol in (greedy(costs, lat, budget, fixed=fixed, extra=extra),
                    random_feasible(costs, lat, budget, fixed=fixed, extra=extra, rng=1)):
            assert _feasible(sol, lat, fixed, budget, extra)
            assert sol.objective >= best.objective - 1e-9


def test_random_feasible_repairs_a_tight_budget():
    # 20 layers, budget reachable only by the fastest plan: uniform draws never hit it.
    costs = [np.arange(5.0)[::-1] for _ in range(20)]
    lat = [np.arange(1.0, 6.0) for _ in range(20)]
    sol = random_feasible(costs, lat, 20.0, rng=0, tries=50)
    assert sol.choice == [0] * 20


def test_greedy_spends_slack():
    # Ratio order takes layer 0's cheap small saving first, then layer 1's big one, which
    # leaves enough slack to undo the first: the improvement pass must do that.
    costs = [np.array([0.0, 0.1]), np.array([0.0, 1.0])]
    lat = [np.array([2.0, 1.0]), np.array([6.0, 1.0])]
    sol = greedy(costs, lat, 3.0)
    assert sol.choice == [0, 1] and sol.objective == pytest.approx(1.0)


@pytest.mark.timeout(60)
def test_greedy_terminates_on_large_correlated_instance():
    # Sums of ~100 costs carry rounding noise larger than tiny improvements; an improvement
    # loop that compares sums once cycled forever on exactly this instance.
    rng = np.random.default_rng(2)
    lat = [rng.uniform(0.05, 1.0, 200) for _ in range(100)]
    costs = [np.clip((1.0 - t) * rng.uniform(0.5, 1.5, 200) + rng.normal(0, 0.05, 200), 0, None) for t in lat]
    budget = 0.9 * sum(t.min() for t in lat) + 0.1 * sum(t.max() for t in lat)
    g = greedy(costs, lat, budget)
    s = solve(costs, lat, budget)
    assert plan_totals(g.choice, lat) <= budget and s.objective <= g.objective + 1e-12


def test_malformed_arrays_are_refused():
    with pytest.raises(ValueError):
        solve([np.array([0.0, 1.0])], [np.array([1.0])], 2.0)
    with pytest.raises(ValueError):
        solve([np.array([0.0, np.nan])], [np.array([1.0, 1.0])], 2.0)


# ---------------------------------------------------------------------------------------------
# The stage, on a synthetic run folder (no torch passes)

from hant.config import RunConfig  # noqa: E402
from hant.speedup import OVERSHOOT  # noqa: E402
from hant.select import SelectOptions, select, select_measured  # noqa: E402
from hant.workspace import RunDir, read_json, write_json  # noqa: E402

SPECS = ["teacher", "proj", "mb_k3_e1_relu", "mb_k3_e3_silu", "fmb_k3_e1_relu"]


def _fake_run(tmp_path, layers=4, seed=0, teacher_ms=None, calibration=None, second=False):
    """layers.json, scores.json and latency tables with consistent made-up numbers.

    Slower candidates score better; the teacher is the slowest, largest and best (score 0).
    """
    rng = np.random.default_rng(seed)
    run = tmp_path / "run"
    RunConfig().save(RunDir(run).config)
    names = [f"blocks.{i}.0" for i in range(layers)]
    lj = {"layers": [], "total_params": 0, "total_flops": 0}
    scores, tables = [], {"t1": [], "t2": []}
    for n in names:
        lj["layers"].append({"name": n, "in_shape": [8, 8, 8], "out_shape": [8, 8, 8], "stride": 1, "in_chs": 8,
                             "out_chs": 8, "params": 3000, "flops": 300000, "candidates": SPECS})
        for j, s in enumerate(SPECS):
            speed = 1.0 - j / len(SPECS) if s != "teacher" else 1.0
            ms = 1.0 if s == "teacher" else float(rng.uniform(0.1, 0.9))
            d = 0.0 if s == "teacher" else float((1.0 - ms) * rng.uniform(0.5, 1.5))
            params = 3000 if s == "teacher" else int(rng.integers(100, 2000))
            scores.append({"layer": n, "spec": s, "d_loss": d, "d_acc": -10 * d, "kl": d / 2,
                           "params": params, "flops": params * 100})
            tables["t1"].append({"layer": n, "spec": s, "median_ms": ms, "p10_ms": ms, "p90_ms": ms, "n": 10})
            # On the second target the ranking of candidates differs.
            ms2 = 2.0 if s == "teacher" else float(rng.uniform(0.2, 1.8)) * speed
            tables["t2"].append({"layer": n, "spec": s, "median_ms": ms2, "p10_ms": ms2, "p90_ms": ms2, "n": 10})
    lj["total_params"] = 5000 + 3000 * layers
    lj["total_flops"] = 500000 + 300000 * layers
    write_json(RunDir(run).layers, lj)
    write_json(RunDir(run).scores, {"method": "eval", "entries": scores})
    for tid, entries in tables.items():
        if tid == "t2" and not second:
            continue
        t = {"target": tid, "batch_size": 1, "fingerprint": {}, "fixed_ms": 0.5, "entries": entries,
             "validation": None, "calibration": calibration if tid == "t1" else None, "layers": names}
        if teacher_ms is not None:
            t["teacher_ms"] = teacher_ms
        write_json(RunDir(run).latency_table(tid), t)
    return run, names


def _quiet(*a):
    pass


def test_select_writes_plan_within_budget(tmp_path):
    run, names = _fake_run(tmp_path)
    out = select(run, target="t1", budget_ms=3.0, log=_quiet)
    plan = read_json(RunDir(run).plan("t1-3ms"))
    assert out["path"] == str(RunDir(run).plan("t1-3ms"))
    for key in ("version", "target", "batch_size", "budget_ms", "layers", "predicted_ms", "predicted_score",
                "objective", "constraints", "solve_time_s", "status"):
        assert key in plan
    assert set(plan["layers"]) == set(names) and plan["status"] == "optimal"
    assert plan["predicted_ms"] <= 3.0 and plan["budget_ms"] == 3.0
    # The teacher plan takes 4.5 ms: the budget forced replacements, each with a positive score.
    assert any(s != "teacher" for s in plan["layers"].values()) and plan["predicted_score"] > 0
    entries = {(e["layer"], e["spec"]): e["median_ms"] for e in read_json(RunDir(run).latency_table("t1"))["entries"]}
    assert plan["predicted_ms"] == pytest.approx(0.5 + sum(entries[(n, s)] for n, s in plan["layers"].items()))


def test_speedup_prefers_measured_teacher_latency(tmp_path):
    run, _ = _fake_run(tmp_path)
    p = select(run, target="t1", speedup=1.5, log=_quiet)
    assert p["name"] == "t1-x1.5" and p["teacher_ms_source"] == "table"
    assert p["budget_ms"] == pytest.approx(4.5 / 1.5)  # fixed 0.5 + 4 teacher entries of 1 ms
    run2, _ = _fake_run(tmp_path / "b", teacher_ms=6.0)
    lines = []
    p2 = select(run2, target="t1", speedup=1.5, log=lines.append)
    assert p2["teacher_ms_source"] == "measured" and p2["budget_ms"] == pytest.approx(4.0)
    assert any("teacher measured 6 ms" in line and "predicts 4.5 ms" in line for line in lines)
    # The validation's own teacher point wins over the table's teacher_ms.
    rd = RunDir(run2)
    t = read_json(rd.latency_table("t1"))
    t["validation"] = {"points": [{"kind": "random", "measured_ms": 9.0}, {"kind": "teacher", "measured_ms": 4.8}]}
    write_json(rd.latency_table("t1"), t)
    p3 = select(run2, target="t1", speedup=1.5, name="v", log=_quiet)
    assert p3["teacher_ms"] == pytest.approx(4.8) and p3["budget_ms"] == pytest.approx(3.2)


def test_infeasible_speedup_names_fastest_latency(tmp_path):
    run, names = _fake_run(tmp_path)
    entries = read_json(RunDir(run).latency_table("t1"))["entries"]
    fastest = 0.5 + sum(min(e["median_ms"] for e in entries if e["layer"] == n) for n in names)
    with pytest.raises(HantError) as e:
        select(run, target="t1", speedup=100, log=_quiet)
    assert f"{fastest:.4g} ms" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HantError, match=f"{fastest:.4g} ms"):
        select(run, target="t1", budget_ms=0.6, log=_quiet)
    assert not (RunDir(run).root / "plans").exists()


def test_frozen_layer_keeps_teacher_and_excluded_family_never_chosen(tmp_path):
    run, names = _fake_run(tmp_path)
    free = select(run, target="t1", budget_ms=2.5, log=_quiet)
    assert free["layers"][names[0]] != "teacher"  # so that freezing it changes something
    used = {s.split("_")[0] for s in free["layers"].values()}
    family = "mb" if "mb" in used else sorted(used - {"teacher"})[0]
    p = select(run, target="t1", budget_ms=2.5, freeze=[names[0]], exclude_families=[family], name="fx", log=_quiet)
    assert p["layers"][names[0]] == "teacher"
    assert all(s.split("_")[0] != family for s in p["layers"].values())
    assert p["constraints"]["frozen"] == [names[0]] and p["constraints"]["excluded_families"] == [family]
    assert p["predicted_ms"] <= 2.5
    everywhere = select(run, target="t1", budget_ms=4.4, exclude_families=["teacher"], freeze=[names[1]],
                        name="noteacher", log=_quiet)
    assert [s == "teacher" for s in everywhere["layers"].values()] == [n == names[1] for n in names]
    with pytest.raises(HantError, match="matches no layer"):
        select(run, target="t1", budget_ms=2.5, freeze=["nope.*"], log=_quiet)
    with pytest.raises(HantError, match="unknown op family"):
        select(run, target="t1", budget_ms=2.5, exclude_families=["bogus"], log=_quiet)


def test_select_options_as_a_value_or_as_keywords_give_the_same_plan(tmp_path):
    run, names = _fake_run(tmp_path)
    opts = SelectOptions(freeze=[names[0]], max_params=1e9, time_limit_s=10.0)
    assert opts.freeze == (names[0],)  # a list from the CLI becomes a tuple: the options are a value
    by_value = select(run, target="t1", budget_ms=3.0, options=opts, name="v", log=_quiet)
    by_keyword = select(run, target="t1", budget_ms=3.0, freeze=[names[0]], max_params=1e9, time_limit_s=10.0,
                        name="k", log=_quiet)
    assert by_value["layers"] == by_keyword["layers"] and by_value["layers"][names[0]] == "teacher"
    assert by_value["constraints"] == by_keyword["constraints"]
    # A keyword replaces that field of `options` and keeps the others.
    both = select(run, target="t1", budget_ms=3.0, options=opts, freeze=[], name="b", log=_quiet)
    assert "frozen" not in both["constraints"] and both["constraints"]["max_params"] == 1e9
    with pytest.raises(TypeError, match=r"unknown selection option.*max_param\b"):
        select(run, target="t1", budget_ms=3.0, max_param=1e6, log=_quiet)


@pytest.mark.parametrize("fields,flag", [
    ({"max_params": -1.0}, "--max-params"), ({"max_flops": float("nan")}, "--max-flops"),
    ({"second_target": "t2"}, "--second-target"), ({"candidates": 0}, "--candidates"),
    ({"candidates": 1.5}, "--candidates"), ({"min_diff": 0.0}, "--min-diff")])
def test_select_options_refuse_values_out_of_range(fields, flag):
    with pytest.raises(HantError, match=flag):
        SelectOptions(**fields)
    assert SelectOptions().candidates == 1 and SelectOptions().min_diff == 0.2


def test_params_flops_and_second_target_limits_hold(tmp_path):
    run, names = _fake_run(tmp_path, second=True)
    free = select(run, target="t1", budget_ms=3.0, log=_quiet)
    params_free = free["constraints"]["params"]
    p = select(run, target="t1", budget_ms=3.0, max_params=params_free - 500, name="p", log=_quiet)
    assert p["constraints"]["params"] <= params_free - 500 and p["constraints"]["max_params"] == params_free - 500
    assert p["predicted_score"] > free["predicted_score"]  # the limit really bound
    f = select(run, target="t1", budget_ms=3.0, max_flops=(params_free - 500) * 100, name="f", log=_quiet)
    assert f["constraints"]["flops"] <= (params_free - 500) * 100
    assert f["predicted_score"] > free["predicted_score"]
    from hant.latency import load_table, predict_ms

    t2 = load_table(run, "t2")
    free2 = predict_ms(t2, free["layers"])
    s = select(run, target="t1", budget_ms=3.0, second_target="t2", second_budget_ms=free2 * 0.9, name="s",
               log=_quiet)
    assert predict_ms(t2, s["layers"]) <= free2 * 0.9
    assert s["predicted_score"] > free["predicted_score"]
    assert s["constraints"]["second_target"]["predicted_ms"] <= free2 * 0.9
    with pytest.raises(HantError, match="go together"):
        select(run, target="t1", budget_ms=3.0, second_target="t2", log=_quiet)


def test_calibrated_table_budget_is_in_predicted_ms(tmp_path):
    run, _ = _fake_run(tmp_path, calibration={"kind": "linear", "a": 1.5, "b": 0.2})
    p = select(run, target="t1", budget_ms=4.0, log=_quiet)
    from hant.latency import load_table, predict_ms

    assert p["predicted_ms"] == pytest.approx(predict_ms(load_table(run, "t1"), p["layers"]))
    assert p["predicted_ms"] <= 4.0 and p["predicted_ms"] > 3.0  # the budget binds in calibrated ms


def test_objective_d_acc_and_missing_scores(tmp_path):
    run, names = _fake_run(tmp_path)
    p = select(run, target="t1", budget_ms=3.0, objective="d_acc", name="acc", log=_quiet)
    loss = select(run, target="t1", budget_ms=3.0, name="loss", log=_quiet)
    # d_acc = -10 d_loss here, so the same plan is optimal and the score is in accuracy points.
    assert p["layers"] == loss["layers"] and p["predicted_score"] == pytest.approx(-10 * loss["predicted_score"])
    sc = read_json(RunDir(run).scores)
    for e in sc["entries"]:
        e["d_acc"] = e["kl"] = None
    write_json(RunDir(run).scores, sc)
    with pytest.raises(HantError, match="no d_acc"):
        select(run, target="t1", budget_ms=3.0, objective="d_acc", log=_quiet)


def test_sweep_writes_plans_and_front(tmp_path):
    run, _ = _fake_run(tmp_path)
    out = select(run, target="t1", sweep=True, sweep_points=6, log=_quiet)
    pts = out["sweep"]
    assert len(pts) == 6 and (RunDir(run).root / "pareto_select.png").stat().st_size > 1000
    for pt in pts:
        assert pt["predicted_ms"] <= pt["budget_ms"] + 1e-9
        # The front is written; budgets that only repeat a faster plan are not.
        assert RunDir(run).plan(pt["name"]).exists() == pt["pareto"]
        if pt["pareto"]:
            assert read_json(RunDir(run).plan(pt["name"]))["predicted_ms"] == pt["predicted_ms"]
    # Budgets rise, so optimal scores never get worse; the largest budget allows the teacher.
    scores = [pt["predicted_score"] for pt in sorted(pts, key=lambda p: p["budget_ms"])]
    assert all(b <= a + 1e-12 for a, b in zip(scores, scores[1:])) and scores[-1] == pytest.approx(0.0)
    assert pts[0]["pareto"] and sum(p["pareto"] for p in pts) >= 2


def test_select_measured_tightens_the_budget_until_the_measured_speedup_is_met(tmp_path):
    run, _ = _fake_run(tmp_path)
    timed = []

    def slow_timer(r, name):
        # The hardware runs every plan 15% slower than the table predicts; the teacher as predicted.
        p = read_json(RunDir(r).plan(name))
        timed.append(p["predicted_ms"])
        return {"teacher_ms": 4.5, "student_ms": 1.15 * p["predicted_ms"]}

    p = select_measured(run, "t1", speedup=1.5, name="x1.5", timer=slow_timer, log=_quiet)
    check = p["latency_check"]
    assert len(check["rounds"]) == len(timed) >= 2 and check["met"]
    assert check["rounds"][0]["speedup"] < 1.5 * 0.98 <= check["rounds"][-1]["speedup"]
    assert check["rounds"][1]["budget_ms"] == pytest.approx(3.0 / 1.15)
    on_disk = read_json(RunDir(run).plan("x1.5"))
    assert on_disk["speedup"] == 1.5 and on_disk["latency_check"] == check
    assert on_disk["predicted_ms"] <= 3.0 / 1.15 + 1e-9


def test_select_measured_keeps_a_plan_that_meets_the_speedup_and_stops_when_out_of_reach(tmp_path):
    run, _ = _fake_run(tmp_path)
    exact = select_measured(run, "t1", speedup=1.5, name="a", log=_quiet,
                            timer=lambda r, n: {"teacher_ms": 4.5,
                                                "student_ms": read_json(RunDir(r).plan(n))["predicted_ms"]})
    assert len(exact["latency_check"]["rounds"]) == 1 and exact["latency_check"]["met"]
    lines = []
    # Ten times slower than predicted: no plan of the pool can make up for it.
    far = select_measured(run, "t1", speedup=1.5, name="b", log=lines.append,
                          timer=lambda r, n: {"teacher_ms": 4.5,
                                              "student_ms": 10 * read_json(RunDir(r).plan(n))["predicted_ms"]})
    assert not far["latency_check"]["met"] and any("out of reach" in line for line in lines)
    assert read_json(RunDir(run).plan("b"))["layers"] == far["layers"]


def test_cli_check_rounds_needs_a_speedup(tmp_path, capsys):
    from hant.cli import main

    run, _ = _fake_run(tmp_path)
    assert main(["select", "--run", str(run), "--target", "t1", "--budget-ms", "3", "--check-rounds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--check-rounds" in err[0] and "--speedup" in err[0]
    assert not RunDir(run).plan("t1-3ms").exists()
    assert main(["select", "--run", str(run), "--target", "t1", "--speedup", "1.5"]) == 0
    assert "latency_check" not in read_json(RunDir(run).plan("t1-x1.5"))


def _timer(slowdown=1.0, half_width=0.0, teacher_ms=4.5):
    """A hardware that runs every plan `slowdown` times slower than predicted and the teacher as
    given, with intervals of relative half-width `half_width` around every median."""
    def timer(r, name):
        s_ms = slowdown * read_json(RunDir(r).plan(name))["predicted_ms"]
        sp = teacher_ms / s_ms
        lo, hi = 1.0 - half_width, 1.0 + half_width
        return {"teacher_ms": teacher_ms, "teacher_ci_lo_ms": teacher_ms * lo, "teacher_ci_hi_ms": teacher_ms * hi,
                "student_ms": s_ms, "student_ci_lo_ms": s_ms * lo, "student_ci_hi_ms": s_ms * hi,
                "speedup": sp, "speedup_ci_lo": sp * lo, "speedup_ci_hi": sp * hi,
                "timing": {"threads": 1, "clock": "thread-cpu", "protocol": {"confidence": 0.95, "rel_tol": 0.02}}}
    return timer


def test_select_measured_keeps_the_budget_when_the_shortfall_is_inside_the_interval(tmp_path):
    run, _ = _fake_run(tmp_path)
    # 15% slower than predicted, as in the test above, but timed only to +-15%: the 2x check
    # cannot tell the shortfall from noise, so the budget stays.
    p = select_measured(run, "t1", speedup=1.5, name="wide", timer=_timer(1.15, 0.15), log=_quiet)
    check = p["latency_check"]
    assert len(check["rounds"]) == 1 and check["met"]
    r = check["rounds"][0]
    assert r["speedup"] < 1.5 * 0.98 <= r["speedup_ci_hi"] and r["decision"] == "met within the interval"
    assert p["budget_ms"] == pytest.approx(3.0)
    assert r["teacher_ci_lo_ms"] < r["teacher_ms"] < r["teacher_ci_hi_ms"]
    assert check["timing"]["threads"] == 1 and check["timing"]["clock"] == "thread-cpu"


def test_select_measured_tightens_when_the_shortfall_is_beyond_the_interval(tmp_path):
    run, _ = _fake_run(tmp_path)
    p = select_measured(run, "t1", speedup=1.5, name="narrow", timer=_timer(1.15, 0.01), log=_quiet)
    rounds = p["latency_check"]["rounds"]
    assert len(rounds) >= 2 and p["latency_check"]["met"]
    assert rounds[0]["speedup_ci_hi"] < 1.5 * 0.98 and rounds[0]["decision"] == "short; budget tightened"
    assert rounds[0]["next_budget_ms"] == pytest.approx(3.0 / 1.15) == rounds[1]["budget_ms"]
    assert rounds[-1]["decision"].startswith("met") and p["budget_ms"] < 3.0


def test_select_measured_caps_the_budget(tmp_path):
    run, _ = _fake_run(tmp_path)
    # A larger speedup checked on its own ends with a looser budget than a smaller speedup
    # whose plans ran slow: the inversion the cap exists for.
    small = select_measured(run, "t1", speedup=1.2, name="small", timer=_timer(1.3), log=_quiet)
    free = select_measured(run, "t1", speedup=1.3, name="free", timer=_timer(), log=_quiet)
    assert small["budget_ms"] < 4.5 / 1.2 and free["budget_ms"] > small["budget_ms"]
    capped = select_measured(run, "t1", speedup=1.3, name="capped", timer=_timer(),
                             max_budget_ms=small["budget_ms"], log=_quiet)
    assert capped["budget_ms"] == pytest.approx(small["budget_ms"])
    assert capped["predicted_ms"] <= small["budget_ms"] + 1e-9 and capped["speedup"] == 1.3
    assert capped["latency_check"]["budget_cap_ms"] == small["budget_ms"]
    # Tightened budgets stay under the cap too.
    slow = select_measured(run, "t1", speedup=1.3, name="slow", timer=_timer(1.3), max_budget_ms=3.0, log=_quiet)
    assert all(r["budget_ms"] <= 3.0 for r in slow["latency_check"]["rounds"])
    with pytest.raises(HantError, match="max_budget_ms"):
        select_measured(run, "t1", speedup=1.3, name="bad", timer=_timer(), max_budget_ms=-1.0, log=_quiet)


def test_accelerate_checks_speedups_in_ascending_order_under_the_previous_budget(tmp_path, monkeypatch):

    from hant import distill, export, finetune, latency, measure, redistill, report, score
    from hant import select as select_mod
    from hant.pipeline import AccelerateOptions, accelerate_run, plan_name

    run, _ = _fake_run(tmp_path)
    order = []
    slow, exact = _timer(1.3), _timer()

    def timer(r, name):
        # The smaller speedup's plans run slow, so its check tightens its budget below what
        # the larger speedup asks of the table.
        return slow(r, name) if name.endswith("x1.2") else exact(r, name)

    real = select_mod.select_measured

    def checked(*a, **k):
        order.append(k["speedup"])
        return real(*a, **{**k, "timer": timer})

    for mod, attr in ((distill, "distill"), (latency, "measure_table"), (score, "score"), (finetune, "finetune"),
                      (measure, "measure"), (export, "export"), (redistill, "redistill")):
        monkeypatch.setattr(mod, attr, lambda *a, **k: None)
    monkeypatch.setattr(report, "write_report", lambda r: RunDir(r).report)
    monkeypatch.setattr(select_mod, "select_measured", checked)
    out = accelerate_run(run, AccelerateOptions(target="t1", speedups=[1.3, 1.2], int8=False, refine=0), log=_quiet)
    assert order == [1.2, 1.3]
    low, high = (read_json(RunDir(run).plan(plan_name("t1", 1, s))) for s in (1.2, 1.3))
    assert low["budget_ms"] < 4.5 / 1.3  # without the cap the 1.3x plan would get the looser 4.5 / 1.3
    assert high["budget_ms"] <= low["budget_ms"] and out["plans"] == [plan_name("t1", 1, s) for s in (1.2, 1.3)]


# ---------------------------------------------------------------------------------------------
# Top-K diverse plans

import itertools  # noqa: E402
import math  # noqa: E402

from hant.solver import solve_diverse  # noqa: E402


def _differ(a, b):
    return sum(x != y for x, y in zip(a, b))


def _feasible_plans(costs, lat, fixed, budget, extra):
    """Every feasible plan with its objective, by enumeration."""
    out = []
    for p in itertools.product(*[range(c.size) for c in costs]):
        if plan_totals(p, lat, fixed) <= budget + 1e-9 and \
                all(plan_totals(p, k.coeffs, k.offset) <= k.bound + 1e-9 for k in extra):
            out.append((plan_totals(p, costs), p))
    return out


def test_diverse_first_plan_is_solves():
    rng = np.random.default_rng(21)
    for _ in range(20):
        costs, lat, fixed, budget, extra = _instance(rng, int(rng.integers(2, 7)), 6, int(rng.integers(0, 2)))
        try:
            best = solve(costs, lat, budget, fixed=fixed, extra=extra)
        except InfeasibleError:
            with pytest.raises(InfeasibleError):
                solve_diverse(costs, lat, budget, 3, fixed=fixed, extra=extra)
            continue
        for k in (1, 3):
            sols = solve_diverse(costs, lat, budget, k, fixed=fixed, extra=extra)
            assert sols[0].choice == best.choice and sols[0].objective == best.objective
            assert len(sols) <= k
        assert len(solve_diverse(costs, lat, budget, 1, fixed=fixed, extra=extra)) == 1


def test_diverse_plans_differ_pairwise_and_get_no_better():
    rng = np.random.default_rng(5)
    L, n, min_diff = 10, 6, 0.25
    lat = [rng.uniform(0.1, 1.0, n) for _ in range(L)]
    costs = [np.clip(1.0 - t + rng.normal(0, 0.1, n), 0, None) for t in lat]
    budget = 0.6 * sum(t.min() for t in lat) + 0.4 * sum(t.max() for t in lat)
    sols = solve_diverse(costs, lat, budget, 3, min_diff)
    need = math.ceil(min_diff * L)  # 3 of 10 layers
    assert len(sols) == 3 and all(s.status == "optimal" for s in sols)
    for a, b in itertools.combinations(sols, 2):
        assert _differ(a.choice, b.choice) >= need
    assert all(a.objective <= b.objective + 1e-9 for a, b in zip(sols, sols[1:]))
    assert all(plan_totals(s.choice, lat) <= budget + 1e-9 for s in sols)
    assert all(s.objective == pytest.approx(plan_totals(s.choice, costs)) for s in sols)


@pytest.mark.parametrize("extra_kinds", [0, 1])
def test_second_plan_is_the_best_that_differs_enough(extra_kinds):
    rng = np.random.default_rng(40 + extra_kinds)
    checked = 0
    for _ in range(40):
        L = int(rng.integers(2, 6))
        costs, lat, fixed, budget, extra = _instance(rng, L, 4, extra_kinds)
        min_diff = float(rng.choice([0.2, 0.5, 0.7]))
        need = max(1, math.ceil(min_diff * L - 1e-9))
        try:
            sols = solve_diverse(costs, lat, budget, 2, min_diff, fixed=fixed, extra=extra)
        except InfeasibleError:
            continue
        assert sols[0].objective == pytest.approx(exhaustive(costs, lat, budget, fixed=fixed, extra=extra).objective)
        rest = [obj for obj, p in _feasible_plans(costs, lat, fixed, budget, extra)
                if _differ(p, sols[0].choice) >= need]
        if not rest:
            assert len(sols) == 1
            continue
        assert len(sols) == 2 and _differ(sols[1].choice, sols[0].choice) >= need
        assert sols[1].objective == pytest.approx(min(rest), abs=1e-9)
        checked += 1
    assert checked >= 15  # the comparison really ran on most instances


def test_alternatives_may_use_dominated_candidates():
    # Candidate 1 is worse and slower than candidate 0 in both layers, so pruning for the best
    # plan drops it; yet it is the only way for a second plan to differ.
    costs = [np.array([0.0, 1.0]), np.array([0.0, 3.0])]
    lat = [np.array([1.0, 2.0]), np.array([1.0, 2.0])]
    sols = solve_diverse(costs, lat, 10.0, 4, min_diff=0.5)
    assert [s.choice for s in sols] == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert [s.objective for s in sols] == [0.0, 1.0, 3.0, 4.0]


def test_fewer_plans_than_asked_when_too_few_differ_enough():
    costs = [np.array([0.0, 1.0]), np.array([0.0, 2.0])]
    lat = [np.array([1.0, 1.0]), np.array([1.0, 1.0])]
    # Every pair must differ in both layers: at most two such plans exist among the four.
    sols = solve_diverse(costs, lat, 10.0, 5, min_diff=1.0)
    assert [s.choice for s in sols] == [[0, 0], [1, 1]]
    # A layer with one candidate (frozen) can never differ.
    sols = solve_diverse([np.array([0.0]), np.array([0.0, 1.0])], [np.array([1.0]), np.array([1.0, 1.0])], 10.0, 3,
                         min_diff=1.0)
    assert len(sols) == 1
    # The budget leaves room for the fast candidate only: one plan.
    lat = [np.array([1.0, 3.0]), np.array([1.0, 3.0])]
    assert len(solve_diverse(costs, lat, 2.5, 3)) == 1


def test_diverse_refuses_bad_arguments_and_infeasible_budgets():
    costs, lat = [np.array([0.0, 1.0])], [np.array([2.0, 1.0])]
    with pytest.raises(InfeasibleError, match="0.5 ms"):
        solve_diverse(costs, lat, 0.5, 3)
    with pytest.raises(ValueError):
        solve_diverse(costs, lat, 5.0, 0)
    with pytest.raises(ValueError):
        solve_diverse(costs, lat, 5.0, 2, min_diff=1.5)


def test_select_candidates_writes_alternatives_and_keeps_the_best_plan(tmp_path):
    run, names = _fake_run(tmp_path, layers=6)
    rd = RunDir(run)
    one = select(run, target="t1", budget_ms=4.0, log=_quiet)
    single = read_json(rd.plan("t1-4ms"))
    assert "alternatives" not in one and "alternatives" not in single
    out = select(run, target="t1", budget_ms=4.0, candidates=3, min_diff=0.5, log=_quiet)
    best = read_json(rd.plan("t1-4ms"))
    assert best["alternatives"] == ["t1-4ms-alt1", "t1-4ms-alt2"]
    skip = {"solve_time_s", "alternatives"}
    assert {k: v for k, v in best.items() if k not in skip} == {k: v for k, v in single.items() if k not in skip}
    assert [a["name"] for a in out["alternatives"]] == best["alternatives"]
    plans = [best]
    for rank, alt_name in enumerate(best["alternatives"], 1):
        alt = read_json(rd.plan(alt_name))
        assert alt["rank"] == rank and alt["alternative_of"] == "t1-4ms" and alt["budget_ms"] == 4.0
        assert alt["predicted_ms"] <= 4.0 + 1e-9 and set(alt["layers"]) == set(names)
        assert alt["differs_from_best"] == _differ([best["layers"][n] for n in names], [alt["layers"][n] for n in names])
        assert alt["predicted_score"] >= best["predicted_score"] - 1e-12
        assert out["alternatives"][rank - 1]["path"] == str(rd.plan(alt_name))
        plans.append(alt)
    for a, b in itertools.combinations(plans, 2):
        assert _differ([a["layers"][n] for n in names], [b["layers"][n] for n in names]) >= 3  # half of 6


def test_select_candidates_logs_when_fewer_alternatives_exist(tmp_path):
    run, _ = _fake_run(tmp_path, layers=3)
    lines = []
    # All 3 layers frozen but one: plans can differ in one layer only, never in all three.
    out = select(run, target="t1", budget_ms=10.0, candidates=3, min_diff=1.0, freeze=["blocks.0.*", "blocks.1.*"],
                 log=lines.append)
    assert out["alternatives"] == [] and read_json(RunDir(run).plan("t1-10ms"))["alternatives"] == []
    assert any("only 0 of 2 alternatives" in line for line in lines)
    assert not RunDir(run).plan("t1-10ms-alt1").exists()


def test_cli_candidates(tmp_path, capsys):
    from hant.cli import main

    run, _ = _fake_run(tmp_path)
    assert main(["select", "--run", str(run), "--target", "t1", "--sweep", "--candidates", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--candidates" in err[0] and "--sweep" in err[0]
    assert main(["select", "--run", str(run), "--target", "t1", "--budget-ms", "3", "--candidates", "2",
                 "--min-diff", "0.5"]) == 0
    alt = read_json(RunDir(run).plan("t1-3ms-alt1"))
    assert alt["rank"] == 1 and alt["differs_from_best"] >= 2
    assert main(["select", "--run", str(run), "--target", "t1", "--budget-ms", "3", "--candidates", "0"]) == 2


def _with_teacher_loss(run, loss):
    s = read_json(RunDir(run).scores)
    s["teacher"] = {"loss": loss, "top1": 90.0}
    write_json(RunDir(run).scores, s)


def test_plan_with_large_predicted_damage_is_flagged_with_the_largest_safe_speedup(tmp_path):
    from hant.select import damage_limit

    run, _ = _fake_run(tmp_path)
    _with_teacher_loss(run, 0.4)  # small damage: summed d_loss up to 0.1
    lines = []
    fast = select(run, target="t1", speedup=3.0, log=lines.append)
    risk = fast["accuracy_risk"]
    assert risk["limit"] == pytest.approx(damage_limit(0.4)) == pytest.approx(0.1)
    assert risk["predicted_d_loss"] == pytest.approx(fast["predicted"]["d_loss"])
    assert risk["predicted_d_loss"] > 0.1 and risk["large"]
    warnings = [line for line in lines if line.startswith("warning: plan t1-x3")]
    assert len(warnings) == 1 and "0.4" in warnings[0]
    # The speedup named as safe is one whose plan does keep the damage small, and no larger one does.
    safe = risk["safe_speedup"]
    assert 1.0 <= safe < 3.0 and f"{safe:.2f}x" in warnings[0]
    at_safe = select(run, target="t1", speedup=safe * 0.999, name="safe", log=_quiet)
    assert at_safe["predicted"]["d_loss"] <= 0.1 + 1e-9 and not at_safe["accuracy_risk"]["large"]
    beyond = select(run, target="t1", speedup=safe * 1.05, name="beyond", log=_quiet)
    assert beyond["accuracy_risk"]["large"]


def test_small_damage_and_non_loss_scores_give_no_warning(tmp_path):
    run, _ = _fake_run(tmp_path)
    _with_teacher_loss(run, 100.0)
    lines = []
    p = select(run, target="t1", speedup=3.0, log=lines.append)
    assert not p["accuracy_risk"]["large"] and not any(line.startswith("warning") for line in lines)
    s = read_json(RunDir(run).scores)
    s["method"] = "distill"  # NMSE, not a loss change: nothing to compare with the teacher's loss
    write_json(RunDir(run).scores, s)
    assert "accuracy_risk" not in select(run, target="t1", speedup=3.0, name="d", log=_quiet)


def test_select_measured_warns_once_about_the_kept_plan(tmp_path):
    run, _ = _fake_run(tmp_path)
    _with_teacher_loss(run, 0.4)

    def slow_timer(r, name):
        p = read_json(RunDir(r).plan(name))
        return {"teacher_ms": 4.5, "student_ms": 1.15 * p["predicted_ms"]}

    lines = []
    p = select_measured(run, "t1", speedup=2.5, name="x2.5", timer=slow_timer, log=lines.append)
    assert len(p["latency_check"]["rounds"]) >= 2
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "x2.5 (2.5x)" in warnings[0]
    risk = read_json(RunDir(run).plan("x2.5"))["accuracy_risk"]
    assert risk["large"]
    # The safe speedup is put on the measured scale by how the kept plan's timing compared
    # with its prediction, so that it reads on the same scale as the speedup asked.
    last = p["latency_check"]["rounds"][-1]
    ratio = last["speedup"] / p["predicted_speedup"]
    assert ratio < 1.0 and risk["safe_speedup_measured"] == pytest.approx(risk["safe_speedup"] * ratio)
    assert f"about {risk['safe_speedup_measured']:.2f}x as measured here" in warnings[0]


def test_select_measured_loosens_a_plan_much_faster_than_asked_and_keeps_it_when_it_meets(tmp_path):
    run, _ = _fake_run(tmp_path)

    def fast_timer(r, name):
        # The hardware runs every plan 30% faster than the table predicts; the teacher as predicted.
        p = read_json(RunDir(r).plan(name))
        return {"teacher_ms": 4.5, "student_ms": 0.7 * p["predicted_ms"]}

    p = select_measured(run, "t1", speedup=1.5, name="x1.5", timer=fast_timer, log=_quiet)
    rounds = p["latency_check"]["rounds"]
    assert rounds[0]["speedup"] > 1.5 * OVERSHOOT and "budget loosened" in rounds[0]["decision"]
    assert rounds[0]["budget_ms"] == pytest.approx(3.0)
    # (teacher / (speedup * (1 + tolerance))) * (predicted / measured)
    assert rounds[1]["budget_ms"] == pytest.approx(3.0 / 1.02 / 0.7)
    assert rounds[-1]["decision"].startswith("met") and p["latency_check"]["met"]
    # Closer to what was asked, and so a better score than the first plan.
    assert rounds[-1]["speedup"] < rounds[0]["speedup"]
    assert read_json(RunDir(run).plan("x1.5"))["layers"] == p["layers"]


def test_select_measured_restores_the_plan_before_when_the_looser_one_falls_short(tmp_path):
    run, _ = _fake_run(tmp_path)
    first: dict = {}

    def timer(r, name):
        # The first plan runs 30% faster than predicted, any other one 30% slower.
        p = read_json(RunDir(r).plan(name))
        first.setdefault("layers", p["layers"])
        factor = 0.7 if p["layers"] == first["layers"] else 1.3
        return {"teacher_ms": 4.5, "student_ms": factor * p["predicted_ms"]}

    p = select_measured(run, "t1", speedup=1.5, name="x1.5", timer=timer, log=_quiet)
    rounds = p["latency_check"]["rounds"]
    assert [r["decision"] for r in rounds] == ["met; faster than asked, budget loosened",
                                               "short; back to the plan before"]
    assert p["layers"] == first["layers"] and p["latency_check"]["met"]
    assert read_json(RunDir(run).plan("x1.5"))["layers"] == first["layers"]  # the file too
