import numpy as np
import pytest

from hant.errors import HantError
from hant.select import (Constraint, InfeasibleError, exhaustive, greedy, plan_totals, random_feasible,
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


def test_malformed_arrays_are_refused():
    with pytest.raises(ValueError):
        solve([np.array([0.0, 1.0])], [np.array([1.0])], 2.0)
    with pytest.raises(ValueError):
        solve([np.array([0.0, np.nan])], [np.array([1.0, 1.0])], 2.0)
