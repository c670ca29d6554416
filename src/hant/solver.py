"""The integer program and its baselines, as pure functions on arrays (no run folder, no torch).

Layer l has candidates o = 0..n_l-1 with a cost `costs[l][o]` (the score: lower is better)
and a latency `lat[l][o]`; a plan picks one candidate per layer and must satisfy
`fixed + sum_l lat[l][o_l] <= budget` plus any extra `Constraint`s (parameters, FLOPs, a
second target's latency).

- `solve`: the integer program, solved by HiGHS through `scipy.optimize.milp`;
- `solve_diverse`: the best plan and the next best ones that differ from the earlier ones
  in a share of the layers;
- the baselines `greedy` and `random_feasible`, and `exhaustive` (enumeration, for checks on
  tiny instances).

`hant.select` builds these arrays from a run folder and writes plans.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from hant.errors import HantError

__all__ = ["Constraint", "Solution", "InfeasibleError", "solve", "solve_diverse", "greedy", "random_feasible",
           "exhaustive", "plan_totals", "layers_to_differ"]

# Relative slack when checking a solver's answer against the constraints: HiGHS works to a
# primal feasibility tolerance of about 1e-7, and a plan over budget by less than that is not
# meaningfully over it.
_FEAS_RTOL = 1e-9
_EXHAUSTIVE_MAX = 4_000_000
# The smallest relative fall of the overshoot that the baselines count as progress.
_GAIN_EPS = 1e-12


class InfeasibleError(HantError):
    """No plan satisfies the budget and constraints. `fastest` is the lowest latency reachable."""

    def __init__(self, message: str, fastest: float | None = None, constraint: str | None = None):
        super().__init__(message)
        self.fastest = fastest
        self.constraint = constraint


@dataclass
class Constraint:
    """An extra resource limit: `offset + sum_l coeffs[l][o_l] <= bound`.

    name: what it limits, used in messages (`params`, `flops`, `latency on <target>`).
    coeffs: one array per layer, aligned with the layer's candidates.
    offset: the part of the network that is not replaced (e.g. stem and head parameters).
    unit: appended to numbers in messages (`ms`, or empty).
    """

    name: str
    coeffs: list[np.ndarray]
    bound: float
    offset: float = 0.0
    unit: str = ""


class Solution(NamedTuple):
    """A plan: `choice[l]` is the index of the chosen candidate of layer l.

    objective: sum of the chosen costs. status: `optimal`, or `time_limit` when the solver
    stopped at its time limit with a feasible but unproven plan (or for the baselines,
    `greedy` / `random`). solve_time_s: wall-clock seconds spent.
    """

    choice: list[int]
    objective: float
    status: str
    solve_time_s: float


def _check_arrays(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], extra: Sequence[Constraint]):
    costs = [np.asarray(c, dtype=float) for c in costs]
    lat = [np.asarray(t, dtype=float) for t in lat]
    if not costs or len(costs) != len(lat):
        raise ValueError(f"costs and lat need one array per layer (got {len(costs)} and {len(lat)})")
    for l, (c, t) in enumerate(zip(costs, lat)):
        if c.ndim != 1 or c.shape != t.shape or c.size == 0:
            raise ValueError(f"layer {l}: costs and lat must be non-empty 1-d arrays of equal length")
        if not (np.isfinite(c).all() and np.isfinite(t).all()):
            raise ValueError(f"layer {l}: costs and lat must be finite (drop candidates without a value)")
    for k in extra:
        if len(k.coeffs) != len(costs) or any(np.shape(a) != c.shape for a, c in zip(k.coeffs, costs)):
            raise ValueError(f"constraint {k.name!r}: coeffs must have one array per layer, aligned with costs")
    return costs, lat


def _fmt(x: float, unit: str) -> str:
    if unit == "ms":
        return f"{x:.4g} ms"
    return f"{x:.4g}{(' ' + unit) if unit else ''}"


def _all_constraints(lat, budget, fixed, extra) -> list[Constraint]:
    return [Constraint("latency", lat, float(budget), float(fixed), "ms"), *extra]


def _check_reachable(constraints: list[Constraint]) -> float:
    """Each constraint alone: is its own minimum within its bound? Raise naming the first that is
    not; else return the fastest latency the pool can reach (`constraints[0]` is the latency's,
    as `_all_constraints` puts it)."""
    lat = constraints[0]
    fastest = lat.offset + sum(float(a.min()) for a in lat.coeffs)
    for k in constraints:
        lowest = k.offset + sum(float(a.min()) for a in k.coeffs)
        if lowest > k.bound * (1 + _FEAS_RTOL) + _FEAS_RTOL:
            if k.name == "latency":
                raise InfeasibleError(
                    f"latency budget {_fmt(k.bound, 'ms')} cannot be met: the fastest plan this pool can reach "
                    f"takes {_fmt(lowest, 'ms')} (fixed part {_fmt(k.offset, 'ms')}); "
                    f"raise the budget to at least {_fmt(lowest, 'ms')}",
                    fastest=lowest, constraint="latency")
            raise InfeasibleError(
                f"{k.name} limit {_fmt(k.bound, k.unit)} cannot be met: the smallest plan this pool can reach "
                f"has {_fmt(lowest, k.unit)}; raise the limit to at least that",
                fastest=fastest, constraint=k.name)
    return fastest


def plan_totals(choice: Sequence[int], arrays: Sequence[np.ndarray], offset: float = 0.0) -> float:
    """`offset + sum_l arrays[l][choice[l]]`: a plan's total cost, latency, parameters..."""
    return float(offset + sum(float(a[o]) for a, o in zip(arrays, choice)))


def _feasible(choice, constraints: list[Constraint]) -> bool:
    return all(plan_totals(choice, k.coeffs, k.offset) <= k.bound + _FEAS_RTOL * max(1.0, abs(k.bound))
               for k in constraints)


def _undominated(cost: np.ndarray, uses: list[np.ndarray], depth: int = 1) -> np.ndarray:
    """Indices of one layer's candidates that fewer than `depth` other candidates dominate.

    o' dominates o when it is no worse in cost and in every resource and better in one (or
    equal in all and listed first). A plan that uses a dominated candidate can swap it for its
    dominator without breaking a constraint or raising the cost, so dropping dominated
    candidates (depth 1) leaves the optimum unchanged; it typically removes most of a pool.
    Larger depths keep more, for `solve_diverse`.
    """
    m = np.vstack([cost, *uses])  # (1 + K, n)
    le = (m[:, :, None] <= m[:, None, :]).all(axis=0)  # le[a, b]: a no worse than b everywhere
    lt = (m[:, :, None] < m[:, None, :]).any(axis=0)
    first = np.arange(cost.size)[:, None] < np.arange(cost.size)[None, :]
    dominators = (le & (lt | first)).sum(axis=0)
    return np.flatnonzero(dominators < depth)


def solve(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], budget: float, *, fixed: float = 0.0,
          extra: Sequence[Constraint] = (), time_limit_s: float = 60.0) -> Solution:
    """Minimise the total cost of one candidate per layer under a latency budget (an ILP).

    Binary z[l,o]; minimise sum costs[l][o] z[l,o] subject to sum_o z[l,o] = 1 for every l,
    fixed + sum lat[l][o] z[l,o] <= budget and, for each extra constraint k,
    k.offset + sum k.coeffs[l][o] z[l,o] <= k.bound. Solved by HiGHS (scipy.optimize.milp)
    to a proven optimum, unless `time_limit_s` runs out first (status `time_limit`).

    Takes per-layer arrays (frozen layers and excluded candidates are removed by the caller,
    see `build_pool`). Returns a `Solution`. Raises `InfeasibleError` (a HantError) whose one
    line gives the fastest latency the pool can reach, or names the extra constraint that
    cannot be met; ValueError for malformed arrays.
    """
    full_costs, lat = _check_arrays(costs, lat, extra)
    t0 = time.perf_counter()
    full = _all_constraints(lat, budget, fixed, extra)
    fastest = _check_reachable(full)

    keep = [_undominated(c, [k.coeffs[l] for k in full]) for l, c in enumerate(full_costs)]
    costs, cons = _normalised(_take(full_costs, keep)), _take_cons(full, keep)
    keep2 = _fix_by_bound(costs, cons)
    costs, cons = _take(costs, keep2), _take_cons(cons, keep2)
    keep = [k1[k2] for k1, k2 in zip(keep, keep2)]

    res, choice = _milp(costs, cons, time_limit_s)
    elapsed = time.perf_counter() - t0
    if choice is None:
        if res.status == 1:
            raise HantError(f"the solver found no plan within {time_limit_s:g} s; allow more time or loosen the budget")
        names = ", ".join(k.name for k in cons)
        raise InfeasibleError(
            f"no plan meets all of these together: {names} (each alone can be met); loosen one of them",
            fastest=fastest, constraint=None)
    status = "optimal" if res.status == 0 else "time_limit"
    choice = [int(i[o]) for i, o in zip(keep, choice)]
    return Solution(choice, plan_totals(choice, full_costs), status, elapsed)


def _normalised(costs: list[np.ndarray]) -> list[np.ndarray]:
    # One candidate per layer, so subtracting each layer's minimum changes every plan's cost by
    # the same constant; dividing by a common scale keeps HiGHS's absolute gap tolerance
    # (1e-6) meaningful whether scores are 1e-4 or 1e2.
    base = [float(c.min()) for c in costs]
    scale = max(float((c - b).max()) for c, b in zip(costs, base)) or 1.0
    return [(c - b) / scale for c, b in zip(costs, base)]


def _milp(costs: list[np.ndarray], cons: list[Constraint], time_limit_s: float,
          avoid: Sequence[Sequence[int]] = (), max_same: int = 0):
    """The integer program of `solve` on prepared arrays: (the milp result, the choice or None).

    `avoid` lists earlier choices (indices into these arrays); the plan must share at most
    `max_same` layers with each of them. The choice is None when there is no solution, or
    when the rounded solution stays over a bound after two retries.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    sizes = np.array([c.size for c in costs])
    n, L = int(sizes.sum()), len(costs)
    c = np.concatenate(costs)
    layer_of = np.repeat(np.arange(L), sizes)
    one_hot = csr_array((np.ones(n), (layer_of, np.arange(n))), shape=(L, n))
    rows = np.vstack([np.concatenate(k.coeffs) for k in cons])
    rhs = np.array([k.bound - k.offset for k in cons])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    diverse = []
    if avoid:
        # sum_l z[l, o_l] <= max_same for each earlier choice o: it shares at most max_same layers.
        cols = np.concatenate([offsets + np.asarray(o) for o in avoid])
        owner = np.repeat(np.arange(len(avoid)), L)
        same = csr_array((np.ones(cols.size), (owner, cols)), shape=(len(avoid), n))
        diverse = [LinearConstraint(same, -np.inf, float(max_same))]
    choice = None
    for _ in range(3):
        res = milp(
            c, integrality=np.ones(n), bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(rows, -np.inf, rhs), *diverse],
            options={"time_limit": float(time_limit_s), "mip_rel_gap": 0.0},
        )
        if res.x is None:
            return res, None
        choice = [int(np.argmax(res.x[s:s + m])) for s, m in zip(offsets, sizes)]
        if _feasible(choice, cons):
            return res, choice
        # The rounded plan overshoots by more than the tolerance (HiGHS accepted a tiny
        # violation): tighten the violated rows by the overshoot and solve again.
        used = np.array([plan_totals(choice, k.coeffs) for k in cons])
        rhs = rhs - np.maximum(used - rhs, 0) * 1.001
    return res, None


def layers_to_differ(n_layers: int, min_diff: float) -> int:
    """ceil(min_diff * n_layers), at least 1: how many layers `solve_diverse` plans differ in."""
    # The small margin keeps 0.1 * 30 = 3.0000000000000004 at 3.
    return max(1, math.ceil(min_diff * n_layers - 1e-9))


def solve_diverse(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], budget: float, k: int,
                  min_diff: float = 0.2, *, fixed: float = 0.0, extra: Sequence[Constraint] = (),
                  time_limit_s: float = 60.0) -> list[Solution]:
    """Up to `k` plans at one budget that differ from each other: the best, then alternatives.

    The first is exactly what `solve` returns. Each later one is the best plan that differs
    from every earlier one in at least d = ceil(min_diff * L) (at least 1) of the L
    layers: for each earlier plan o, the program of `solve` gets the row
    sum_l z[l, o_l] <= L - d. Every pair of plans returned then differs in at least d
    layers, and objectives do not decrease (to the solver's tolerance). Layers with a single
    candidate (frozen) count in L but can never differ.

    Returns a list of `Solution`s, shorter than `k` when no further plan differs enough (or
    the solver finds none within `time_limit_s`, which applies to each plan). Raises
    `InfeasibleError` like `solve` when the budget cannot be met; ValueError for malformed
    arrays, `k` < 1 or `min_diff` outside [0, 1].
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not 0.0 <= min_diff <= 1.0:
        raise ValueError(f"min_diff must be a fraction of the layers in [0, 1], got {min_diff}")
    found = [solve(costs, lat, budget, fixed=fixed, extra=extra, time_limit_s=time_limit_s)]
    if k == 1:
        return found
    full_costs, lat = _check_arrays(costs, lat, extra)
    full = _all_constraints(lat, budget, fixed, extra)
    L = len(full_costs)
    max_same = L - layers_to_differ(L, min_diff)
    # Pruning has to respect the diversity rows. Dropping a candidate that k or more others
    # dominate stays exact: at most k - 1 earlier plans exist, all built from kept candidates
    # (the first from `solve`'s undominated ones), so a plan using a dropped candidate can swap
    # it for a dominator no earlier plan uses in that layer. That layer still differs from
    # every earlier plan, no bound or cost gets worse, and repeating ends on a kept candidate
    # since dominance has no cycles. Plain dominance (depth 1) would not be exact: the only
    # dominator may be the earlier plan's own choice. `_fix_by_bound` is skipped: its bound
    # is the best plan's cost, which the alternatives are allowed to exceed.
    keep = [_undominated(c, [kk.coeffs[l] for kk in full], depth=int(k)) for l, c in enumerate(full_costs)]
    costs_k, cons = _normalised(_take(full_costs, keep)), _take_cons(full, keep)
    where = [{int(o): j for j, o in enumerate(ix)} for ix in keep]
    while len(found) < k:
        t0 = time.perf_counter()
        avoid = [[w[o] for w, o in zip(where, s.choice)] for s in found]
        res, choice = _milp(costs_k, cons, time_limit_s, avoid, max_same)
        if choice is None:
            break
        choice = [int(ix[o]) for ix, o in zip(keep, choice)]
        status = "optimal" if res.status == 0 else "time_limit"
        found.append(Solution(choice, plan_totals(choice, full_costs), status, time.perf_counter() - t0))
    return found


def _take(arrays: list[np.ndarray], keep: list[np.ndarray]) -> list[np.ndarray]:
    return [a[i] for a, i in zip(arrays, keep)]


def _take_cons(cons: list[Constraint], keep: list[np.ndarray]) -> list[Constraint]:
    return [Constraint(k.name, _take(k.coeffs, keep), k.bound, k.offset, k.unit) for k in cons]


def _fix_by_bound(costs: list[np.ndarray], cons: list[Constraint]) -> list[np.ndarray]:
    """Per layer, the candidates that can still be in an optimal plan (reduced-cost fixing).

    Standard MIP preprocessing, done here because scipy's milp takes no starting plan: the
    greedy plan gives an upper bound U on the optimum; the LP relaxation's duals y give, for
    any plan x, cost(x) >= y_eq.1 + y_ub.b + sum_l d[l, x_l] with reduced costs
    d = c - A^T y (valid for any y with y_ub <= 0, so an inexact LP cannot make it wrong).
    A candidate whose bound with it forced in exceeds U cannot be optimal and is dropped.
    On pools with strongly correlated score and latency this removes most of the candidates
    that dominance left (1595 -> 216 on a 100 x 200 instance) and about halves the solve time.
    """
    from scipy.optimize import linprog
    from scipy.sparse import csr_array

    everything = [np.arange(c.size) for c in costs]
    greedy_choice = _greedy_core(costs, cons)
    if greedy_choice is None:
        return everything
    upper = plan_totals(greedy_choice, costs)
    sizes = np.array([c.size for c in costs])
    n, L = int(sizes.sum()), len(costs)
    layer_of = np.repeat(np.arange(L), sizes)
    rows = np.vstack([np.concatenate(k.coeffs) for k in cons])
    rhs = np.array([k.bound - k.offset for k in cons])
    finite = np.isfinite(rhs)
    if not finite.any():
        return everything
    rows, rhs = rows[finite], rhs[finite]
    lp = linprog(np.concatenate(costs), A_ub=rows, b_ub=rhs,
                 A_eq=csr_array((np.ones(n), (layer_of, np.arange(n))), shape=(L, n)), b_eq=np.ones(L),
                 bounds=(0, 1), method="highs")
    if lp.status != 0:
        return everything
    y_eq = np.asarray(lp.eqlin.marginals)
    y_ub = np.minimum(np.asarray(lp.ineqlin.marginals), 0.0)
    d = np.concatenate(costs) - y_eq[layer_of] - rows.T @ y_ub
    d_layers = np.split(d, np.cumsum(sizes)[:-1])
    mins = np.array([float(x.min()) for x in d_layers])
    lower = float(y_eq.sum() + y_ub @ rhs + mins.sum())
    slack = 1e-7 * max(1.0, abs(upper))  # keep ties and anything within rounding of the bound
    keep = [np.flatnonzero(lower - mins[l] + d_layers[l] <= upper + slack) for l in range(L)]
    # The greedy plan satisfies its own bound; keep it explicitly against rounding anyway.
    return [np.union1d(k, [g]).astype(int) for k, g in zip(keep, greedy_choice)]


def exhaustive(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], budget: float, *, fixed: float = 0.0,
               extra: Sequence[Constraint] = ()) -> Solution:
    """The exact optimum by enumerating every plan (for checks on tiny instances).

    Same problem and return value as `solve`. Raises ValueError when there are more than
    4 million plans, InfeasibleError when none is feasible.
    """
    costs, lat = _check_arrays(costs, lat, extra)
    t0 = time.perf_counter()
    shape = tuple(c.size for c in costs)
    if math.prod(shape) > _EXHAUSTIVE_MAX:
        raise ValueError(f"{math.prod(shape)} plans are too many to enumerate")
    cons = _all_constraints(lat, budget, fixed, extra)

    def table(arrays):
        # Total over all plans as an array of `shape`, built by broadcasting one layer at a time.
        total = np.zeros(())
        for a in arrays:
            total = np.add.outer(total, a)
        return total

    ok = np.ones(shape, dtype=bool)
    for k in cons:
        ok &= table(k.coeffs) + k.offset <= k.bound + _FEAS_RTOL * max(1.0, abs(k.bound))
    if not ok.any():
        fastest = _check_reachable(cons)
        raise InfeasibleError("no plan meets all constraints together; loosen one of them", fastest=fastest)
    total = np.where(ok, table(costs), np.inf)
    choice = [int(i) for i in np.unravel_index(int(np.argmin(total)), shape)]
    return Solution(choice, plan_totals(choice, costs), "optimal", time.perf_counter() - t0)


class _Moves:
    """All single-layer swaps from a current plan, evaluated at once (for the baselines)."""

    def __init__(self, costs, cons):
        self.sizes = np.array([c.size for c in costs])
        self.layer_of = np.repeat(np.arange(len(costs)), self.sizes)
        self.cost = np.concatenate(costs)
        self.use = np.vstack([np.concatenate(k.coeffs) for k in cons])  # (K, n)
        self.bound = np.array([k.bound - k.offset for k in cons])
        # Overshoot is measured relative to each bound so that ms, parameters and FLOPs add up.
        self.norm = np.maximum(np.abs(self.bound), 1e-12)
        self.start = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def flat(self, choice):
        return self.start + np.asarray(choice)

    def after_swap(self, choice):
        """Current totals (K,), totals if layer_of[j] were switched to j (K, n), and the
        cost change of that switch (n,).

        The cost change is one subtraction of two candidates' costs, not a difference of
        large sums, so its sign is exact: improvement loops cannot cycle on rounding noise.
        """
        cur = self.flat(choice)
        tot = self.use[:, cur].sum(axis=1)
        use = tot[:, None] - self.use[:, cur][:, self.layer_of] + self.use
        dcost = self.cost - self.cost[cur][self.layer_of]
        return tot, use, dcost

    def overshoot(self, use):
        """Summed relative excess over the bounds, per column of `use` (K, m)."""
        tol = _FEAS_RTOL * np.maximum(1.0, np.abs(self.bound))
        over = np.maximum(use - (self.bound + tol)[:, None], 0)
        return (over / self.norm[:, None]).sum(axis=0)


def greedy(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], budget: float, *, fixed: float = 0.0,
           extra: Sequence[Constraint] = ()) -> Solution:
    """Baseline: the classic ratio greedy for a multiple-choice knapsack.

    Start from the best-scoring candidate of every layer (ties: the faster). While the plan is
    over budget, make the single-layer swap with the smallest cost increase per unit of
    overshoot removed (overshoot: the excess over each bound, relative to the bound, summed
    over latency and the extra constraints), i.e. the best score-per-latency trade. Then spend
    any slack left: while some swap lowers the cost and keeps the plan feasible, make the one
    that lowers it most. Returns a `Solution` with status `greedy`; raises InfeasibleError when
    it cannot reach a feasible plan.
    """
    costs, lat = _check_arrays(costs, lat, extra)
    t0 = time.perf_counter()
    cons = _all_constraints(lat, budget, fixed, extra)
    fastest = _check_reachable(cons)
    # Dominated candidates never give a better trade (see `_undominated`); dropping them only
    # makes the search faster.
    keep = [_undominated(c, [k.coeffs[l] for k in cons]) for l, c in enumerate(costs)]
    full_costs, costs, cons = costs, _take(costs, keep), _take_cons(cons, keep)
    choice = _greedy_core(costs, cons)
    if choice is None:
        raise InfeasibleError("greedy found no feasible plan (the integer program may still find one)",
                              fastest=fastest)
    choice = [int(i[o]) for i, o in zip(keep, choice)]
    return Solution(choice, plan_totals(choice, full_costs), "greedy", time.perf_counter() - t0)


def _greedy_core(costs: list[np.ndarray], cons: list[Constraint]) -> list[int] | None:
    """The greedy of `greedy` on prepared arrays; None when it gets stuck infeasible."""
    mv = _Moves(costs, cons)
    choice = [int(np.lexsort((t, c))[0]) for c, t in zip(costs, cons[0].coeffs)]
    while True:
        tot, use, dcost = mv.after_swap(choice)
        now = float(mv.overshoot(tot[:, None])[0])
        if now == 0:
            break
        gain = now - mv.overshoot(use)
        # Gains are differences of sums: only those clearly above rounding count, so the
        # overshoot falls at every step and the loop ends.
        ok = gain > _GAIN_EPS * max(1.0, now)
        if not ok.any():
            return None
        ratio = np.where(ok, dcost / np.where(ok, gain, 1), np.inf)
        j = int(np.lexsort((-gain, ratio))[0])
        choice[mv.layer_of[j]] = j - int(mv.start[mv.layer_of[j]])
    while True:
        tot, use, dcost = mv.after_swap(choice)
        better = (mv.overshoot(use) == 0) & (dcost < 0)
        if not better.any():
            break
        j = int(np.argmin(np.where(better, dcost, np.inf)))
        choice[mv.layer_of[j]] = j - int(mv.start[mv.layer_of[j]])
    return choice


def random_feasible(costs: Sequence[np.ndarray], lat: Sequence[np.ndarray], budget: float, *,
                    fixed: float = 0.0, extra: Sequence[Constraint] = (),
                    rng: np.random.Generator | int | None = None, tries: int = 1000) -> Solution:
    """Baseline: a random plan that meets the budget and constraints.

    Draws plans uniformly (one candidate per layer) until one is feasible, up to `tries`.
    When the budget is so tight that none of them is, the last draw is repaired: random
    single-layer swaps that reduce the overshoot until it is feasible (a plan near the budget,
    so no longer uniform). Returns a `Solution` with status `random`; raises InfeasibleError
    when no feasible plan is reached.
    """
    costs, lat = _check_arrays(costs, lat, extra)
    t0 = time.perf_counter()
    rng = np.random.default_rng(rng)
    cons = _all_constraints(lat, budget, fixed, extra)
    fastest = _check_reachable(cons)
    choice: list[int] = []
    for _ in range(max(1, tries)):
        choice = [int(rng.integers(c.size)) for c in costs]
        if _feasible(choice, cons):
            return Solution(choice, plan_totals(choice, costs), "random", time.perf_counter() - t0)
    mv = _Moves(costs, cons)
    while True:
        tot, use, _ = mv.after_swap(choice)
        now = float(mv.overshoot(tot[:, None])[0])
        if now == 0:
            break
        ok = np.flatnonzero(now - mv.overshoot(use) > _GAIN_EPS * max(1.0, now))
        if ok.size == 0:
            raise InfeasibleError("no random feasible plan was found (the integer program may still find one)",
                                  fastest=fastest)
        j = int(rng.choice(ok))
        choice[mv.layer_of[j]] = j - int(mv.start[mv.layer_of[j]])
    return Solution(choice, plan_totals(choice, costs), "random", time.perf_counter() - t0)
