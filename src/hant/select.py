"""Phase 2: choose one candidate per layer with an integer program under a latency budget.

The stage `select(run, target, budget_ms | speedup, options=SelectOptions(...))`: reads
RUN/layers.json, RUN/scores.json and RUN/latency/<target>.json, builds the pool (frozen
layers and excluded families applied), solves it with `hant.solver` (the integer program
and its baselines, pure functions on arrays), and writes RUN/plans/<plan>.json (with
`sweep`, a range of budgets and the Pareto plot RUN/pareto_select.png).
`select_measured` checks the chosen plan against the hardware and tightens its budget.
"""

from __future__ import annotations

import fnmatch
import io
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hant.errors import HantError
from hant.solver import Constraint, InfeasibleError, Solution, layers_to_differ, plan_totals, solve, solve_diverse
from hant.speedup import OVERSHOOT, SPEEDUP_RULE, judge_speedup

__all__ = [
    "InfeasibleError", "Pool", "build_pool", "predicted_latency", "teacher_latency", "SelectOptions", "select",
    "accuracy_risk", "damage_limit",
    "select_measured", "OBJECTIVES",
]

# Objective name -> sign applied to the score so that lower is better.
# d_acc is the change of top-1 in points (negative when the candidate is worse), so the
# program minimises -d_acc; d_loss and kl are minimised as they are.
OBJECTIVES = {"d_loss": 1.0, "d_acc": -1.0, "kl": 1.0}

# ---------------------------------------------------------------------------------------------
# The stage: run folder in, plans out


@dataclass
class Pool:
    """The candidates selection may choose from, per layer, with aligned arrays.

    specs[l][o] is a spec string; cost[l][o] the objective (sign applied: lower is better);
    lat[l][o] its latency (ms) on the primary target, fixed_ms the rest of the network there.
    metrics holds per-candidate arrays `d_loss`, `d_acc`, `kl`, `params`, `flops` (NaN when
    unknown) and `lat:<target>` for each extra latency table. frozen: layers kept as the
    teacher; left_out: why candidates were dropped, with counts.
    """

    layers: list[str]
    specs: list[list[str]]
    cost: list[np.ndarray]
    lat: list[np.ndarray]
    fixed_ms: float
    metrics: dict[str, list[np.ndarray]] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)

    def plan_layers(self, choice: Sequence[int]) -> dict[str, str]:
        """{layer name: chosen spec} for a choice of indices."""
        return {n: s[o] for n, s, o in zip(self.layers, self.specs, choice)}

    def index(self, plan_layers: dict[str, str]) -> list[int]:
        """The choice of indices for {layer: spec}; HantError when a spec is not in the pool."""
        try:
            return [self.specs[l].index(plan_layers[n]) for l, n in enumerate(self.layers)]
        except (KeyError, ValueError):
            raise HantError("the plan uses a layer or candidate that is not in the pool; "
                            "check the layer names and specs against layers.json") from None


def _family(spec: str) -> str:
    from hant.ops import parse

    return parse(spec).family


def _entry_ms(table: dict) -> dict[tuple[str, str], float]:
    return {(e["layer"], e["spec"]): float(e["median_ms"]) for e in table.get("entries", [])
            if e.get("median_ms") is not None and math.isfinite(float(e["median_ms"]))}


def build_pool(layers: list[dict], scores: dict, tables: Sequence[dict], objective: str = "d_loss",
               freeze: Sequence[str] = (), exclude_families: Sequence[str] = ()) -> Pool:
    """The pool from the run folder's contents (already read): layers.json's `layers`, the
    scores.json object and one or more latency tables (the first is the target's).

    A candidate is kept when it is listed for its layer, has a finite value of `objective` in
    the scores (the `teacher` candidate scores 0 unless the scores give it a value, as
    scores in a plan's context do) and an entry in every table, its
    family is not in `exclude_families` (`teacher` may be excluded too, forcing a replacement
    everywhere), and its layer is not frozen (a layer matching a `freeze` glob keeps only
    `teacher`, whatever is excluded). Raises HantError for an unknown objective or family,
    a glob that matches no layer, or a layer left with no candidate.
    """
    if objective not in OBJECTIVES:
        raise HantError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    names = [d["name"] for d in layers]
    for g in freeze:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            raise HantError(f"--freeze {g!r} matches no layer; the layers are {', '.join(names[:6])}"
                            f"{', ...' if len(names) > 6 else ''}")
    if exclude_families:
        from hant.ops import families

        known = families()
        for f in exclude_families:
            if f not in known:
                raise HantError(f"unknown op family {f!r} in --exclude-family; known: {', '.join(known)}")
    excluded = set(exclude_families)
    by_key = {(e["layer"], e["spec"]): e for e in scores.get("entries", [])}
    table_ms = [_entry_ms(t) for t in tables]
    metric_keys = ["d_loss", "d_acc", "kl", "params", "flops"]

    pool = Pool([], [], [], [], float(tables[0].get("fixed_ms", 0.0)))
    pool.metrics = {k: [] for k in metric_keys + [f"lat:{t.get('target', i)}" for i, t in enumerate(tables[1:], 1)]}
    left = {"no score": 0, "no latency entry": 0, "excluded family": 0, "frozen layer": 0}
    for d in layers:
        name = d["name"]
        frozen = any(fnmatch.fnmatchcase(name, g) for g in freeze)
        if frozen:
            pool.frozen.append(name)
        specs, rows = [], []
        for spec in d.get("candidates") or ["teacher"]:
            if frozen and spec != "teacher":
                left["frozen layer"] += 1
                continue
            if not frozen and _family(spec) in excluded:
                left["excluded family"] += 1
                continue
            e = by_key.get((name, spec), {})
            value = e.get(objective, 0.0) if spec == "teacher" else e.get(objective)
            if value is None or not math.isfinite(float(value)):
                left["no score"] += 1
                continue
            if any((name, spec) not in ms for ms in table_ms):
                left["no latency entry"] += 1
                continue
            specs.append(spec)
            row = {k: (e.get(k, 0.0) if spec == "teacher" and k in ("d_loss", "d_acc", "kl") else e.get(k))
                   for k in metric_keys}
            if spec == "teacher":
                row["params"] = e.get("params", d.get("params"))
                row["flops"] = e.get("flops", d.get("flops"))
            rows.append(row)
        if not specs:
            why = "frozen, but its teacher candidate lacks a latency entry" if frozen else \
                "no candidate has both a score and a latency entry"
            raise HantError(f"layer {name}: {why}; run `hant score` and `hant latency` for this run")
        pool.layers.append(name)
        pool.specs.append(specs)
        pool.cost.append(OBJECTIVES[objective] * np.array(
            [float(by_key.get((name, s), {}).get(objective, 0.0)) if s == "teacher" else
             float(by_key[(name, s)][objective]) for s in specs]))
        pool.lat.append(np.array([table_ms[0][(name, s)] for s in specs]))
        for k in metric_keys:
            pool.metrics[k].append(np.array([np.nan if r[k] is None else float(r[k]) for r in rows]))
        for i, t in enumerate(tables[1:], 1):
            pool.metrics[f"lat:{t.get('target', i)}"].append(np.array([table_ms[i][(name, s)] for s in specs]))
    pool.left_out = {k: v for k, v in left.items() if v}
    return pool


def teacher_latency(table: dict, layers: list[dict], log: Callable[[str], None] | None = None
                    ) -> tuple[float, str]:
    """The teacher's end-to-end latency on the table's target, in ms, and where it came from.

    Measured values are preferred (`measured`): the teacher's point in the table's validation
    (timed interleaved with other networks), else the table's `teacher_ms`. Otherwise the
    table's prediction for the all-`teacher` plan (`table`). When a measurement and the
    prediction differ by more than a quarter, `log` gets a line saying so (a measurement
    taken on a busy machine is the usual cause). Raises HantError when neither is available.
    """
    from hant.latency import predict_ms

    try:
        predicted = float(predict_ms(table, {d["name"]: "teacher" for d in layers}))
    except (KeyError, HantError):
        predicted = None
    validation = table.get("validation") or {}
    measured = [p.get("measured_ms") for p in validation.get("points") or [] if p.get("kind") == "teacher"]
    measured += [table.get("teacher_ms"), validation.get("teacher_ms")]
    measured = [float(m) for m in measured if isinstance(m, (int, float)) and m > 0]
    if measured:
        if predicted and log is not None and abs(measured[0] / predicted - 1) > 0.25:
            log(f"note: the teacher measured {measured[0]:.4g} ms end to end on {table.get('target')} but the table "
                f"predicts {predicted:.4g} ms for it; budgets use the measurement (re-measure the table on a "
                "quiet machine if it is off)")
        return measured[0], "measured"
    if predicted is None:
        raise HantError(f"the latency table for {table.get('target')} has no teacher entries and no measured "
                        "teacher latency; rerun `hant latency` for this target, or give --budget-ms")
    return predicted, "table"


def _affine_latency(table: dict, layer_names: list[str], lat: list[np.ndarray], specs: list[list[str]]
                    ) -> tuple[float, float]:
    """(a, b) with predict_ms(table, plan) = a * (fixed_ms + sum of entries) + b.

    The table's calibration (when it has one) is an affine map of the raw sum; it is read
    off `predict_ms` at the fastest and the slowest plan, so the program's latency row is
    exactly the prediction. Raises HantError when the map is not increasing.
    """
    from hant.latency import predict_ms

    plans = [{n: s[int(np.argmin(t))] for n, s, t in zip(layer_names, specs, lat)},
             {n: s[int(np.argmax(t))] for n, s, t in zip(layer_names, specs, lat)}]
    raw = [predict_ms(table, p, calibrated=False) for p in plans]
    cal = [predict_ms(table, p) for p in plans]
    a = (cal[1] - cal[0]) / (raw[1] - raw[0]) if raw[1] - raw[0] > 1e-9 * max(1.0, raw[1]) else 1.0
    if not a > 0:
        raise HantError(f"the latency table for {table.get('target')} has a calibration that does not grow with "
                        "latency; re-measure it with `hant latency --validate K`")
    return float(a), float(cal[0] - a * raw[0])


def predicted_latency(table: dict, pool: Pool, key: str | None = None) -> tuple[list[np.ndarray], float]:
    """Per-candidate latencies and the fixed part of `pool` in the table's predicted ms.

    With the table's calibration applied, so that fixed + sum of the chosen entries equals
    `hant.latency.predict_ms(table, plan)`. `key` picks an extra table's arrays in
    `pool.metrics` (`lat:<target>`); None the primary table's. Raises HantError for a
    calibration that does not grow with latency.
    """
    raw = pool.lat if key is None else pool.metrics[key]
    a, b = _affine_latency(table, pool.layers, raw, pool.specs)
    return [a * t for t in raw], a * float(table["fixed_ms"]) + b


def _resource(pool: Pool, key: str, offset: float, bound: float, what: str, unit: str = "") -> Constraint:
    arrays = pool.metrics[key]
    if any(np.isnan(a).any() for a in arrays):
        raise HantError(f"scores.json lacks {key} for some candidates, needed by --max-{key}; rerun `hant score`")
    return Constraint(what, arrays, float(bound), float(offset), unit)


def _rest_of_network(layers_json: dict, scores: dict, key: str) -> float:
    """params or FLOPs of the part of the teacher that is not replaced (stem, head...)."""
    total = layers_json.get(f"total_{key}", (scores.get("teacher") or {}).get(key))
    if total is None:
        raise HantError(f"neither layers.json nor scores.json records the teacher's total {key}; rerun `hant score`")
    return float(total) - sum(float(d[key]) for d in layers_json["layers"])


def _plot_front(path: Path, points: list[dict], teacher_ms: float, objective: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hant.workspace import atomic_write_bytes

    # A Figure with its own canvas: no pyplot global state, no display backend.
    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p["predicted_ms"] for p in points]
    ys = [p["predicted_score"] for p in points]
    ax.scatter(xs, ys, s=18, color="0.6", label="plans")
    front = [p for p in points if p["pareto"]]
    ax.plot([p["predicted_ms"] for p in front], [p["predicted_score"] for p in front], "o-",
            color="tab:blue", label="Pareto front")
    ax.scatter([teacher_ms], [0.0], marker="*", s=120, color="tab:red", label="teacher", zorder=3)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(f"predicted score (sum of {objective})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _pareto(points: list[dict], sign: float = 1.0) -> None:
    """Mark each point whether no other point is at least as fast and strictly better.

    `sign` turns the score into lower-is-better (-1 for d_acc, where higher is better).
    """
    best = math.inf
    for p in sorted(points, key=lambda p: (p["predicted_ms"], sign * p["predicted_score"])):
        p["pareto"] = sign * p["predicted_score"] < best - 1e-12
        best = min(best, sign * p["predicted_score"])


@dataclass(frozen=True)
class SelectOptions:
    """How `select` chooses, beside the budget: extra limits, what is optimised, the solver's
    settings; the defaults are those of `hant select`. Raises HantError for a value out of range
    (the line names the flag); objectives, globs and families are checked against the run
    when the pool is built."""

    max_params: float | None = None
    """At most this many parameters in the whole student (None: no limit)."""
    max_flops: float | None = None
    """At most this many FLOPs per image in the whole student (None: no limit)."""
    second_target: str | None = None
    """Another latency table of the run (a table id) the plan must also fit; with `second_budget_ms`."""
    second_budget_ms: float | None = None
    """The budget in ms on `second_target`; given together with it."""
    freeze: tuple[str, ...] = ()
    """Layer globs that keep the teacher's own layer."""
    exclude_families: tuple[str, ...] = ()
    """Op families never chosen (`teacher` too: a replacement everywhere not frozen)."""
    objective: str | None = None
    """d_loss | d_acc | kl: what is minimised (d_acc: maximised); None: the run's config (score.objective)."""
    sweep_points: int = 10
    """Budgets solved with `sweep`, from the fastest reachable plan to the teacher's latency."""
    time_limit_s: float = 60.0
    """The integer program's time limit per solve, in seconds."""
    candidates: int = 1
    """Plans written at one budget: the best and up to K - 1 alternatives (not with `sweep`)."""
    min_diff: float = 0.2
    """Share of the layers, in (0, 1], in which every two of the `candidates` plans differ."""
    context: str | None = None
    """A plan whose in-context scores (`hant score --plan`) replace scores.json: the plan chosen
    minimises the predicted change from that plan's own loss (`hant refine`)."""

    def __post_init__(self):
        # Lists (from the CLI's repeated flags) become tuples, so the options stay a value;
        # a lone string is one glob or family, not a sequence of letters.
        for key in ("freeze", "exclude_families"):
            v = getattr(self, key)
            object.__setattr__(self, key, (v,) if isinstance(v, str) else tuple(v))
        for flag, v in (("--max-params", self.max_params), ("--max-flops", self.max_flops),
                        ("--second-budget-ms", self.second_budget_ms)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise HantError(f"{flag} must be a positive number, got {v}")
        if (self.second_target is None) != (self.second_budget_ms is None):
            raise HantError("--second-target and --second-budget-ms go together; give both or neither")
        if isinstance(self.candidates, bool) or int(self.candidates) != self.candidates or self.candidates < 1:
            raise HantError(f"--candidates must be a whole number of plans, 1 or more; got {self.candidates}")
        if not 0.0 < self.min_diff <= 1.0:
            raise HantError(f"--min-diff is the share of layers alternatives differ in, in (0, 1]; got {self.min_diff}")

    def updated(self, overrides: dict[str, Any]) -> SelectOptions:
        """These options with some fields replaced. Raises TypeError for a name that is no field."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown selection option(s) {', '.join(unknown)}; SelectOptions has "
                            f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **overrides) if overrides else self


# A plan's predicted damage is "small" while its summed replace-one-layer loss increase stays
# within this share of the teacher's held-out loss (with a floor in nats, for teachers whose
# loss is near zero). On the demo run the 2x plan predicted 4% (its student lost 0.2 points
# after fine-tuning) and the 3x plan 72% (it lost 2.5); a plain CNN's plan that predicted
# 16 nats against a teacher loss of 0.02 lost 48 points.
DAMAGE_SHARE = 0.25
DAMAGE_FLOOR = 0.02


def damage_limit(teacher_loss: float) -> float:
    """The predicted loss increase (nats) up to which a plan's damage counts as small."""
    return max(DAMAGE_SHARE * float(teacher_loss), DAMAGE_FLOOR)


def _largest_safe_speedup(pool: Pool, lat: list[np.ndarray], fixed: float, extra: list[Constraint],
                          limit: float, teacher_ms: float, time_limit_s: float) -> float | None:
    """The largest predicted speedup of a plan whose summed d_loss stays within `limit`:
    the fastest plan under that loss (the program with the roles of cost and latency swapped).
    None when even keeping the teacher breaks another constraint."""
    d_loss = [np.nan_to_num(np.asarray(a, dtype=float), nan=1e6) for a in pool.metrics["d_loss"]]
    try:
        sol = solve(lat, d_loss, limit, extra=extra, time_limit_s=time_limit_s)
    except HantError:
        return None
    ms = plan_totals(sol.choice, lat, fixed)
    return teacher_ms / ms if ms > 0 else None


def accuracy_risk(plan: dict[str, Any], teacher_loss: float | None, safe_speedup: float | None,
                  measured_ratio: float | None = None) -> dict[str, Any] | None:
    """How much a plan's predicted loss increase is against the teacher's held-out loss.

    Takes a plan (its `predicted.d_loss` from replace-one-layer scores), the teacher's
    held-out loss and the largest predicted speedup whose damage is small. `measured_ratio`
    (measured / predicted speedup of a plan timed on the hardware) puts that speedup on the
    scale the user asked on: a 3x request whose plan the table predicted at 4.2x must not
    read "small damage up to 3.5x". Returns {"predicted_d_loss", "teacher_loss", "share",
    "limit", "large", "safe_speedup", "safe_speedup_measured" (None without a ratio),
    "message"} (`message` the one-line warning when `large`, else None), or None when the
    scores are not loss changes (score method other than `eval`) or lack the teacher's loss.
    """
    d = (plan.get("predicted") or {}).get("d_loss")
    if plan.get("score_method") != "eval" or d is None or teacher_loss is None or not teacher_loss >= 0:
        return None
    limit = damage_limit(teacher_loss)
    large = d > limit
    message = None
    if large:
        speedup = plan.get("speedup") or plan.get("predicted_speedup")
        if not safe_speedup:
            safe = "no faster plan keeps the predicted damage small"
        elif measured_ratio:
            safe = (f"the largest speedup whose predicted damage is small is about "
                    f"{safe_speedup * measured_ratio:.2f}x as measured here ({safe_speedup:.2f}x as the table predicts)")
        else:
            safe = f"the largest speedup whose predicted damage is small is {safe_speedup:.2f}x (predicted)"
        message = (f"plan {plan['name']}"
                   + (f" ({speedup:g}x)" if speedup else "")
                   + f" will likely lose accuracy: its predicted loss increase {d:.3g} is "
                   f"{d / teacher_loss if teacher_loss > 0 else math.inf:.0%} of the teacher's held-out loss "
                   f"{teacher_loss:.3g} (small: up to {limit:.3g}); {safe}")
    return {"predicted_d_loss": float(d), "teacher_loss": float(teacher_loss),
            "share": float(d / teacher_loss) if teacher_loss > 0 else None, "limit": limit, "large": bool(large),
            "safe_speedup": safe_speedup,
            "safe_speedup_measured": safe_speedup * measured_ratio if safe_speedup and measured_ratio else None,
            "message": message}


def _constraints(opts: SelectOptions, pool: Pool, layers_json: dict, scores: dict,
                 tables: list[dict]) -> tuple[list[Constraint], dict[str, Any]]:
    """The integer program's constraints besides the latency budget (parameters, FLOPs, the
    latency on a second target), and how a plan records them."""
    extra: list[Constraint] = []
    constraints: dict[str, Any] = {}
    for key, limit in (("params", opts.max_params), ("flops", opts.max_flops)):
        if limit is not None:
            extra.append(_resource(pool, key, _rest_of_network(layers_json, scores, key), limit, key))
            constraints[f"max_{key}"] = limit
    if opts.second_target is not None:
        key = f"lat:{tables[1].get('target', 1)}"
        lat2, fixed2 = predicted_latency(tables[1], pool, key)
        extra.append(Constraint(f"latency on {opts.second_target}", lat2, float(opts.second_budget_ms), fixed2, "ms"))
        constraints["second_target"] = {"target": opts.second_target, "budget_ms": opts.second_budget_ms}
    if pool.frozen:
        constraints["frozen"] = pool.frozen
    if opts.exclude_families:
        constraints["excluded_families"] = list(opts.exclude_families)
    return extra, constraints


def _sweep(rd, target: str, objective: str, n_points: int, lat, fixed: float, extra: list[Constraint],
           teacher_ms: float, time_limit_s: float | None, run_solver: Callable[[float], Solution],
           make_plan: Callable[..., dict], log: Callable[[str], None]) -> dict[str, Any]:
    """`select`'s sweep: plans at budgets from the fastest reachable to the teacher's latency;
    the ones on the Pareto front are written, with the plot. Returns {"sweep", "plot"}."""
    from hant.workspace import write_json

    # The fastest plan that meets the other constraints: minimise latency itself.
    fastest = solve(lat, lat, math.inf, fixed=fixed, extra=extra, time_limit_s=time_limit_s)
    lo = plan_totals(fastest.choice, lat, fixed)
    hi = max(teacher_ms, lo)
    points, plans = [], {}
    for b in np.unique(np.linspace(lo, hi, max(2, int(n_points)))):
        b = float(b)
        plan_name = f"{target}-{b:.4g}ms"
        plans[plan_name] = make_plan(b, plan_name, run_solver(b), {"sweep": True})
        points.append({"name": plan_name, "budget_ms": b, "predicted_ms": plans[plan_name]["predicted_ms"],
                       "predicted_score": plans[plan_name]["predicted_score"]})
    _pareto(points, OBJECTIVES[objective])
    # Only the front is written: a larger budget that yields the same plan adds nothing.
    for p in points:
        p["path"] = str(write_json(rd.plan(p["name"]), plans[p["name"]])) if p["pareto"] else None
    plot = rd.root / "pareto_select.png"
    front = sum(p["pareto"] for p in points)
    _plot_front(plot, points, teacher_ms, objective, f"{target}: {len(points)} budgets, {front} on the front")
    log(f"sweep: {len(points)} budgets from {lo:.4g} to {hi:.4g} ms, {front} plans on the Pareto front "
        f"written to {rd.root / 'plans'}; plot {plot}")
    return {"sweep": points, "plot": str(plot)}


def select(run: str | Path, target: str, budget_ms: float | None = None, speedup: float | None = None,
           name: str | None = None, options: SelectOptions = SelectOptions(), sweep: bool = False,
           log: Callable[[str], None] = print, **overrides: Any) -> dict[str, Any]:
    """Phase 2: choose one candidate per layer for `target` and write RUN/plans/<name>.json.

    The budget is `budget_ms`, or the teacher's latency on `target` divided by `speedup`
    (measured end to end when the table records it, else the table's prediction). `options`
    (`SelectOptions`; keyword `overrides` replace single fields, e.g. `max_params=1e6`) add
    limits (total parameters, total FLOPs per image, the latency on `second_target` within
    `second_budget_ms`), keep layers matching a `freeze` glob the teacher's, never choose
    candidates of `exclude_families`, and say what is minimised (`objective`).
    Default plan name: `<target>-x<speedup>` or `<target>-<budget>ms`.

    With `sweep`, also solves `sweep_points` budgets from the fastest reachable plan to the
    teacher's latency, writes the plans on the Pareto front (named `<target>-<budget>ms`) and
    the plot RUN/pareto_select.png (predicted latency vs predicted score).

    With `candidates` K > 1 (not with `sweep`), up to K - 1 alternatives at the same budget
    (see `solve_diverse`: each differs from the best and from each other in at least
    ceil(min_diff * layers) layers) are written as `<name>-alt1`, `<name>-alt2`, ... with
    `rank` and `differs_from_best` (layers that differ); the best plan, the same as with
    K = 1, lists their names under `alternatives`.

    Returns the plan written (with `name` and `path`), plus `sweep` (a list of
    {name, budget_ms, predicted_ms, predicted_score, pareto, path}) when sweeping, and with
    K > 1 `alternatives` (the alternative plans, each with `path`; fewer than K - 1 when no
    more plans differ enough, which is logged). Raises HantError for bad arguments, missing
    stages, or an infeasible budget (the line gives the fastest latency the pool can reach).
    """
    opts = options.updated(overrides)
    _check_request(opts, budget_ms, speedup, sweep)
    prob = _Problem.of(run, target, opts, log)
    result: dict[str, Any] = {}
    if budget_ms is not None or speedup is not None:
        result = _at_budget(prob, budget_ms, speedup, name, log)
    if sweep:
        result.update(_sweep(prob.rd, target, prob.objective, opts.sweep_points, prob.lat, prob.fixed, prob.extra,
                             prob.teacher_ms, opts.time_limit_s, prob.solve, prob.make_plan, log))
    return result


def _check_request(opts: SelectOptions, budget_ms: float | None, speedup: float | None, sweep: bool) -> None:
    """Raise HantError for a request `select` cannot answer, in one line that says what to give."""
    if budget_ms is not None and speedup is not None:
        raise HantError("give either a budget in ms or a speedup, not both")
    if budget_ms is None and speedup is None and not sweep:
        raise HantError("give a budget (--budget-ms X) or a speedup (--speedup S)")
    for flag, v in (("--budget-ms", budget_ms), ("--speedup", speedup)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise HantError(f"{flag} must be a positive number, got {v}")
    if opts.candidates > 1 and sweep:
        raise HantError("--candidates gives alternatives at one budget; drop --sweep or --candidates")


@dataclass
class _Problem:
    """One selection's integer program, read from a run folder: the pool, its latencies on the
    target (as the table predicts them, so budgets are in the plan's predicted ms), the other
    constraints and the teacher's latency; `make_plan` turns a solution into a plan file's content."""

    rd: Any  # the run's RunDir
    target: str
    opts: SelectOptions
    objective: str
    layers_json: dict
    scores: dict
    tables: list[dict]  # the target's table, then the second target's
    pool: Pool
    lat: list[np.ndarray]
    fixed: float
    extra: list[Constraint]
    constraints: dict[str, Any]
    teacher_ms: float
    teacher_src: str

    @classmethod
    def of(cls, run: str | Path, target: str, opts: SelectOptions, log: Callable[[str], None]) -> "_Problem":
        from hant.config import RunConfig
        from hant.run import Run

        the_run = Run(run)
        rd = the_run.dir
        # Selection needs no teacher; a run folder assembled by hand may lack config.yaml.
        cfg = the_run.config if rd.config.exists() else RunConfig()
        objective = opts.objective or cfg.score.objective
        layers_json = the_run.layers_doc
        scores = the_run.scores(opts.context)
        tables = [the_run.table(target)]
        if opts.second_target is not None:
            tables.append(the_run.table(opts.second_target))
        if objective in ("d_acc", "kl") and not any(e.get(objective) is not None for e in scores.get("entries", [])):
            raise HantError(f"scores.json has no {objective} (scored with method {scores.get('method', '?')}); "
                            "use --objective d_loss or rerun `hant score --method eval`")
        pool = build_pool(layers_json["layers"], scores, tables, objective, opts.freeze, opts.exclude_families)
        if pool.left_out:
            log("left out: " + ", ".join(f"{v} candidates ({k})" for k, v in pool.left_out.items()))
        lat, fixed = predicted_latency(tables[0], pool)
        extra, constraints = _constraints(opts, pool, layers_json, scores, tables)
        teacher_ms, teacher_src = teacher_latency(tables[0], layers_json["layers"], log)
        return cls(rd, target, opts, objective, layers_json, scores, tables, pool, lat, fixed, extra, constraints,
                   teacher_ms, teacher_src)

    def solve(self, budget: float) -> Solution:
        """The best plan under `budget` ms (and the other constraints)."""
        return solve(self.pool.cost, self.lat, budget, fixed=self.fixed, extra=self.extra,
                     time_limit_s=self.opts.time_limit_s)

    def make_plan(self, budget: float, plan_name: str, sol: Solution, requested: dict) -> dict:
        """The content of RUN/plans/<plan_name>.json for solution `sol` under `budget` ms."""
        from hant.latency import predict_ms

        pool, table = self.pool, self.tables[0]
        plan_layers = pool.plan_layers(sol.choice)
        predicted = float(predict_ms(table, plan_layers))
        # Scores in a plan's context are changes from that plan's own loss: add it back, so that
        # predictions stay changes from the teacher's.
        base = self.scores.get("plan") or {}
        totals = {k: plan_totals(sol.choice, pool.metrics[k], float(base.get(k) or 0.0))
                  for k in ("d_loss", "d_acc", "kl", "params", "flops")}
        out_constraints = dict(self.constraints)
        for key in ("params", "flops"):
            if math.isfinite(totals[key]):
                try:
                    out_constraints[key] = totals[key] + _rest_of_network(self.layers_json, self.scores, key)
                except HantError:
                    pass
        if self.opts.second_target is not None:
            out_constraints["second_target"] = {**self.constraints["second_target"],
                                                "predicted_ms": float(predict_ms(self.tables[1], plan_layers))}
        return {
            "version": 1, "name": plan_name, "target": self.target, "batch_size": table.get("batch_size"),
            "budget_ms": budget, **requested, "teacher_ms": self.teacher_ms, "teacher_ms_source": self.teacher_src,
            "layers": plan_layers, "predicted_ms": predicted,
            "predicted_speedup": self.teacher_ms / predicted if predicted > 0 else None,
            "predicted_score": float(OBJECTIVES[self.objective] * sol.objective + float(base.get(self.objective) or 0.0)),
            "objective": self.objective,
            **({"context": {"plan": base.get("name"), "d_loss": base.get("d_loss")}} if base else {}),
            "predicted": {k: (v if math.isfinite(v) else None) for k, v in totals.items()},
            "score_method": self.scores.get("method"), "constraints": out_constraints,
            "solver": "highs", "solve_time_s": sol.solve_time_s, "status": sol.status,
        }

    def judge(self, plan: dict, log: Callable[[str], None]) -> None:
        """Record the plan's accuracy risk in it; warn in one line when it is large."""
        teacher_loss = (self.scores.get("teacher") or {}).get("loss")
        if plan.get("score_method") != "eval" or teacher_loss is None:
            return
        offset = float((self.scores.get("plan") or {}).get("d_loss") or 0.0)
        safe = _largest_safe_speedup(self.pool, self.lat, self.fixed, self.extra, damage_limit(teacher_loss) - offset,
                                     self.teacher_ms, self.opts.time_limit_s)
        risk = accuracy_risk(plan, teacher_loss, safe)
        if risk is not None:
            plan["accuracy_risk"] = risk
            if risk["large"]:
                log(f"warning: {risk['message']}")


def _at_budget(prob: _Problem, budget_ms: float | None, speedup: float | None, name: str | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    """`select` at one budget: the best plan and, with `candidates` K > 1, its alternatives,
    written to RUN/plans/; returns the best plan with its `path` (and `alternatives`)."""
    from hant.workspace import write_json

    target, teacher_ms, objective = prob.target, prob.teacher_ms, prob.objective
    candidates, min_diff = int(prob.opts.candidates), prob.opts.min_diff
    budget = float(budget_ms) if budget_ms is not None else teacher_ms / float(speedup)
    try:
        # With one candidate this is `solve`'s plan, found the same way.
        sols = solve_diverse(prob.pool.cost, prob.lat, budget, candidates, min_diff, fixed=prob.fixed,
                             extra=prob.extra, time_limit_s=prob.opts.time_limit_s)
    except InfeasibleError as e:
        if speedup is not None and e.constraint == "latency" and e.fastest:
            raise InfeasibleError(
                f"speedup {speedup:g}x on {target} needs {budget:.4g} ms (teacher {teacher_ms:.4g} ms, "
                f"{prob.teacher_src}), but the fastest plan this pool can reach takes {e.fastest:.4g} ms "
                f"(at most {teacher_ms / e.fastest:.2f}x); ask for a smaller speedup",
                fastest=e.fastest, constraint="latency") from None
        raise
    requested = {"speedup": speedup} if speedup is not None else {}
    plan_name = name or (f"{target}-x{speedup:g}" if speedup is not None else f"{target}-{budget:.4g}ms")
    sol = sols[0]
    plan = prob.make_plan(budget, plan_name, sol, requested)
    prob.judge(plan, log)
    alternatives = []
    for rank, alt in enumerate(sols[1:], 1):
        alt_name = f"{plan_name}-alt{rank}"
        alt_plan = {**prob.make_plan(budget, alt_name, alt, requested), "rank": rank, "alternative_of": plan_name,
                    "differs_from_best": sum(a != b for a, b in zip(alt.choice, sol.choice))}
        alt_path = write_json(prob.rd.plan(alt_name), alt_plan)
        log(f"plan {alt_name}: predicted {alt_plan['predicted_ms']:.4g} ms, {objective} "
            f"{alt_plan['predicted_score']:+.4g}, differs from {plan_name} in {alt_plan['differs_from_best']} "
            f"of {len(prob.pool.layers)} layers -> {alt_path}")
        alternatives.append({**alt_plan, "path": str(alt_path)})
    if candidates > 1:
        plan["alternatives"] = [a["name"] for a in alternatives]
        if len(sols) < candidates:
            log(f"only {len(sols) - 1} of {candidates - 1} alternatives: no other plan within the budget "
                f"differs from the earlier ones in {layers_to_differ(len(prob.pool.layers), min_diff)} of "
                f"{len(prob.pool.layers)} layers; lower --min-diff for more")
    path = write_json(prob.rd.plan(plan_name), plan)
    log(f"plan {plan_name}: predicted {plan['predicted_ms']:.4g} ms (budget {budget:.4g} ms, teacher "
        f"{teacher_ms:.4g} ms), {objective} {plan['predicted_score']:+.4g}, {sol.status} in "
        f"{sol.solve_time_s:.2f} s -> {path}")
    result = {**plan, "path": str(path)}
    if candidates > 1:
        result["alternatives"] = alternatives
    return result


def select_measured(run: str | Path, target: str, speedup: float, name: str, *,
                    timer: Callable[[str | Path, str], dict], rounds: int = 3, tolerance: float = 0.02,
                    max_budget_ms: float | None = None, options: SelectOptions = SelectOptions(),
                    log: Callable[[str], None] = print, **overrides: Any) -> dict[str, Any]:
    """`select` for a speedup, checked against the hardware: the chosen plan is assembled and
    timed end to end against the teacher (interleaved); while its measured speedup falls
    short of `speedup` by more than `tolerance` and by more than the measurement's own
    interval, the budget is tightened by the shortfall and the program solved again, at
    most `rounds` times after the first.

    A table predicts each plan to a few per cent, and the teacher's latency it divides by
    `speedup` was measured at another moment; without this check a 2x request can give
    1.8x. But a timing is only known to its confidence interval, and a budget moved by
    noise is a plan made worse for nothing: the plan counts as meeting the request when the
    upper end of its speedup's interval reaches `speedup * (1 - tolerance)`. The new budget
    assumes the next plan errs like the last one: budget = (measured teacher / speedup) *
    (predicted / measured) of the plan that fell short. `max_budget_ms` caps the first
    budget and every tightened one (a larger speedup must never get a looser budget than a
    smaller one; see `hant.pipeline.accelerate`). A plan that is faster than asked beyond its
    interval (the interval's lower end above `OVERSHOOT` times `speedup`) gives up accuracy
    for nothing: its budget is loosened once by the same rule, aimed at `speedup * (1 +
    tolerance)`, and the looser plan is kept only if it still meets the request (else the
    plan before is restored).

    `timer(run, name)` times the plan file RUN/plans/<name>.json against the teacher and
    returns {"teacher_ms", "student_ms"} and, optionally, their intervals and the speedup's
    (the keys of `hant.measure.time_plan`, which the pipeline and the CLI pass; a missing
    interval counts as zero width) and "timing" (threads, clock, protocol).
    `options` (with keyword `overrides` of its fields) go to `select`. The plan file records
    every round under "latency_check" (medians with intervals, the decision taken, the
    budget), with the timing protocol; the last plan is kept, and a shortfall that remains (or a tighter budget the pool cannot
    meet) is logged, not raised. Returns the plan as `select` does. Raises HantError as
    `select` does for the first plan.
    """
    if max_budget_ms is not None and not (max_budget_ms > 0 and math.isfinite(max_budget_ms)):
        raise HantError(f"max_budget_ms must be a positive number, got {max_budget_ms}")
    check = _HardwareCheck(run, target, speedup, name, options.updated(overrides), tolerance, max_budget_ms, log)
    plan = check.first_plan()
    while True:
        m, round_ = check.measure(plan, timer)
        if check.loosened is not None:  # the loosened plan was timed: keep it if it meets
            if round_["decision"] == "short":
                round_["decision"] = "short; back to the plan before"
                plan = check.select_at(check.loosened["budget_ms"])
            break
        if round_["decision"] != "short":
            if len(check.timed) <= rounds and m["speedup_ci_lo"] > speedup * OVERSHOOT:
                looser = check.loosen(plan, m, round_)
                if looser is not None:
                    plan = looser
                    continue
            break
        if len(check.timed) > rounds:
            break
        tighter = check.tighten(plan, m, round_)
        if tighter is None:
            break
        plan = tighter
    return check.finish(plan)


class _HardwareCheck:
    """The state of one `select_measured` call: its request, the rounds timed so far, and the
    plan that met before its budget was loosened (None until then)."""

    def __init__(self, run: str | Path, target: str, speedup: float, name: str, options: SelectOptions,
                 tolerance: float, max_budget_ms: float | None, log: Callable[[str], None]):
        self.run, self.target, self.speedup, self.name = run, target, speedup, name
        self.options, self.tolerance, self.max_budget_ms = options, tolerance, max_budget_ms
        self.outer_log = log
        self.timed: list[dict[str, Any]] = []
        self.timing: dict | None = None
        self.loosened: dict[str, Any] | None = None

    def log(self, msg: str) -> None:
        # The accuracy warning is said once, of the plan that is kept, not of every round's plan.
        if not msg.startswith("warning: plan "):
            self.outer_log(msg)

    def select_at(self, budget_ms: float) -> dict[str, Any]:
        """`select` at `budget_ms` (which writes the plan file), labelled with the speedup asked."""
        plan = select(self.run, target=self.target, budget_ms=budget_ms, name=self.name, options=self.options,
                      log=self.log)
        return {**plan, "speedup": self.speedup}

    def capped(self, budget_ms: float) -> float:
        return budget_ms if self.max_budget_ms is None else min(budget_ms, self.max_budget_ms)

    def first_plan(self) -> dict[str, Any]:
        plan = select(self.run, target=self.target, speedup=self.speedup, name=self.name, options=self.options,
                      log=self.log)
        if self.max_budget_ms is not None and plan["budget_ms"] > self.max_budget_ms:
            self.log(f"plan {self.name}: budget {plan['budget_ms']:.4g} ms capped at {self.max_budget_ms:.4g} ms, "
                     "the budget of a plan asked for less speedup")
            plan = self.select_at(self.max_budget_ms)
        return plan

    def measure(self, plan: dict[str, Any], timer: Callable[[str | Path, str], dict]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Times the plan file against the teacher; returns the judged measurement and the
        round recorded for it (whose "decision" the caller may refine)."""
        raw = timer(self.run, self.name)
        self.timing = raw.get("timing", self.timing)
        m = judge_speedup(raw, self.speedup, self.tolerance)
        decision = m.pop("decision")
        round_ = {"budget_ms": plan["budget_ms"], "predicted_ms": plan["predicted_ms"], **m, "decision": decision}
        self.timed.append(round_)
        self.log(f"plan {self.name}: measured {m['student_ms']:.4g} ms against the teacher's {m['teacher_ms']:.4g} "
                 f"ms, {m['speedup']:.2f}x [{m['speedup_ci_lo']:.2f}, {m['speedup_ci_hi']:.2f}] (asked "
                 f"{self.speedup:g}x; predicted {plan['predicted_ms']:.4g} ms): {decision}")
        return m, round_

    def tighten(self, plan: dict[str, Any], m: dict[str, Any], round_: dict[str, Any]) -> dict[str, Any] | None:
        """The plan at a budget tightened by the shortfall, assuming the next plan errs like
        this one; None (said in the log) when the pool cannot meet that budget."""
        budget = self.capped((m["teacher_ms"] / self.speedup) * (plan["predicted_ms"] / m["student_ms"]))
        try:
            tighter = self.select_at(budget)
        except InfeasibleError as e:
            round_["decision"] = "short; tighter budget out of reach"
            self.log(f"plan {self.name}: a budget of {budget:.4g} ms to make up the shortfall is out of reach ({e}); "
                     "keeping the last plan")
            return None
        round_.update(decision="short; budget tightened", next_budget_ms=budget)
        return tighter

    def loosen(self, plan: dict[str, Any], m: dict[str, Any], round_: dict[str, Any]) -> dict[str, Any] | None:
        """A plan faster than asked beyond its interval gives up accuracy for nothing: the plan
        at a budget loosened by the rule that tightens, aimed at the tolerance above the
        request (so that the looser plan's own noise leaves it at the request). None when the
        budget barely moves or the looser budget gives the same layers (the plan file is then
        written back)."""
        budget = self.capped((m["teacher_ms"] / (self.speedup * (1.0 + self.tolerance)))
                             * (plan["predicted_ms"] / m["student_ms"]))
        if not budget > plan["budget_ms"] * 1.01:
            return None
        looser = self.select_at(budget)
        if looser["layers"] == plan["layers"]:
            self.select_at(plan["budget_ms"])
            return None
        round_.update(decision=f"{round_['decision']}; faster than asked, budget loosened", next_budget_ms=budget)
        self.loosened = plan
        return looser

    def finish(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Records the rounds in the plan (with the accuracy warning of the plan kept), writes
        the plan file and returns the plan as `select` does."""
        from hant.workspace import RunDir, write_json

        last = self.timed[-1]
        met = last["decision"].startswith("met") or self.loosened is not None
        if not met:
            self.log(f"plan {self.name}: measured {last['speedup']:.2f}x (at most {last['speedup_ci_hi']:.2f}x), "
                     f"short of {self.speedup:g}x after {len(self.timed)} timings")
        plan = {k: v for k, v in plan.items() if k != "path"}
        if plan.get("accuracy_risk"):
            # The table's speedups, put on the measured scale by how the last timed plan compared.
            ratio = last["speedup"] / plan["predicted_speedup"] if plan.get("predicted_speedup") else None
            plan["accuracy_risk"] = accuracy_risk(plan, plan["accuracy_risk"]["teacher_loss"],
                                                  plan["accuracy_risk"]["safe_speedup"], measured_ratio=ratio)
            if plan["accuracy_risk"]["large"]:
                self.outer_log(f"warning: {plan['accuracy_risk']['message']}")
        plan["latency_check"] = {"rounds": self.timed, "tolerance": self.tolerance,
                                 "goal_speedup": self.speedup * (1.0 - self.tolerance), "rule": SPEEDUP_RULE,
                                 "budget_cap_ms": self.max_budget_ms, "timing": self.timing, "met": met}
        # The file names the alternatives, as `select` writes it; the result carries them whole, as
        # `select` returns them.
        on_disk = plan
        if "alternatives" in plan:
            on_disk = {**plan, "alternatives": [a["name"] for a in plan["alternatives"]]}
        path = write_json(RunDir(self.run).plan(self.name), on_disk)
        return {**plan, "path": str(path)}
