"""Every stage in order, each skipped when its artifacts are complete.

The stages themselves are resumable (phase 1 trains only unfinished candidates, the
latency table measures only missing entries, ...); this module only decides the order,
records how long each stage took, and names the plans. The Python API on top of it is
`hant.api`, the embedded demo `hant.demo`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hant.errors import HantError
from hant.workspace import RunDir, read_json, sha256_file, write_json


@dataclass
class AccelerateOptions:
    """What `hant accelerate` does after phase 1: the target, the budgets and the export."""

    target: str = "onnxruntime-cpu"
    batch_size: int = 1
    speedups: list[float] = field(default_factory=lambda: [2.0, 3.0])
    validate: int = 10
    int8: bool = True
    finetune_epochs: float | None = None
    # Time each chosen plan against the teacher and tighten its budget up to this many times
    # until the measured speedup is met (0: trust the latency table).
    check_rounds: int = 3
    # Plans selected per speedup: the best and K - 1 alternatives at its budget, each given a
    # short distillation (`hant.pick.pick_plan`); the best on held-out images is fine-tuned.
    # 1: the best plan of the selection, as it is.
    candidates: int = 1
    # Re-distil each plan's chosen candidates on the student's own inputs before fine-tuning
    # (`hant.redistill`). On the demo run it lifted the assembled 3x student from 70.2% to
    # 83.7% and the 4x from 48.2% to 79.6%, and after a quarter epoch of fine-tuning 3x from
    # 86.4% to 88.5% and 4x from 77.8% to 86.3%, for ~1 minute per plan
    # (bench/results/recovery.json).
    redistill: bool = True
    # Rounds of `refine_plan` after each selection: the candidates re-scored around the chosen
    # plan and the program solved again, the plan with the lowest held-out loss kept (0: off).
    # Off by default: on RegNetX-200MF it cut the assembled 2x plan's held-out loss increase
    # from 0.39 to 0.17 nats, but after re-distillation the two plans assembled equally (90.82
    # vs 90.88%, 3x 87.40 vs 87.35%) and fine-tuned equally (92.01 vs 92.08%, 3x 91.96 vs
    # 91.90%) for one more pass of the scores per plan (bench/results/refine_finetuned.json).
    refine: int = 0

    def __post_init__(self):
        if isinstance(self.candidates, bool) or int(self.candidates) != self.candidates or self.candidates < 1:
            raise HantError(f"--candidates must be a whole number of plans, 1 or more; got {self.candidates}")
        if isinstance(self.refine, bool) or int(self.refine) != self.refine or self.refine < 0:
            raise HantError(f"--refine must be a whole number of rounds, 0 or more; got {self.refine}")


def refine_plan(run: str | Path, name: str, rounds: int, *, timer: Callable[[str | Path, str], dict] | None = None,
                check_rounds: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Re-score plan `name`'s candidates around the plan itself and select again, `rounds` times
    at most; the plan with the lowest held-out loss becomes RUN/plans/<name>.json.

    The integer program adds up replace-one-layer scores taken around the teacher; with many
    layers replaced their damage compounds (bench/results/additivity.json). Each round scores
    every candidate with the rest of the current plan in place (`hant score --plan`), solves
    the program on those scores under the same budget (`SelectOptions.context`; with `timer`
    and `check_rounds` > 0 the new plan is timed against the teacher and its budget tightened
    as `select_measured` does, never looser than the first plan's), and stops when the plan no
    longer changes. Every plan's held-out loss is measured on the whole held-out split, not
    predicted; the lowest wins (the first plan on a tie), among the plans whose hardware check
    met the speedup (the first plan always takes part). The first plan is kept as <name>-r0,
    round k's as <name>-rk; RUN/refine/<name>.json records the rounds and <name>.json gets a
    "refined" record.
    A finished refinement of the plan as it stands is read back, and an interrupted one resumes
    from <name>-r0 with the context scores already on disk.

    Returns the record {"version", "plan", "rounds": [{"name", "layers", "changed",
    "heldout"}], "winner", "complete"}. Raises HantError as `score` and `select` do.
    """
    from hant import score, select

    run = Path(run)
    rd = RunDir(run)
    if rounds < 1:
        raise HantError(f"--refine is a number of rounds, 1 or more; got {rounds}")
    path = rd.refine_record(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = read_json(rd.plan(name))
    old = read_json(path) if path.exists() else {}
    if old.get("complete") and old.get("winner_layers") == current["layers"] and old.get("rounds_asked") == rounds:
        log(f"refine {name}: done before ({old['winner']} kept of {len(old['rounds'])} plans)")
        return old
    first = f"{name}-r0"
    resume = (old and not old.get("complete") and rd.plan(first).exists()
              and read_json(rd.plan(first))["layers"] == old.get("plan_layers"))
    if not resume:  # the plan as it stands (a fresh selection) is the first plan
        original = {k: v for k, v in current.items() if k not in ("refined", "alternatives")}
        write_json(rd.plan(first), {**original, "name": first, "refined_as": name})
    original = read_json(rd.plan(first))
    record: dict[str, Any] = {"version": 1, "plan": name, "plan_layers": original["layers"], "rounds_asked": rounds,
                              "rounds": [], "complete": False}
    write_json(path, record)
    budget, target = float(original["budget_ms"]), original["target"]
    layers_of = {first: original["layers"]}

    def judge(layers: dict[str, str]) -> dict[str, float]:
        # On the whole held-out split, not only the scored images: on ResNet-18 the 1024 scored
        # images ranked two plans one way and the 5000 of the split (and the test split) the other.
        return _heldout_row(score.plan_heldout(run, layers, every_image=True))

    def quiet(msg: str) -> None:  # each round's plan is interim: the accuracy warning is the final plan's
        if not msg.startswith("warning: "):
            log(msg)

    prev = first
    for r in range(1, rounds + 1):
        score.score(run, plan=prev, log=log)
        record["rounds"].append({"name": prev, "layers": layers_of[prev], "heldout": judge(layers_of[prev])})
        write_json(path, record)
        nxt = f"{name}-r{r}"
        opts = select.SelectOptions(context=prev)
        if timer is not None and check_rounds > 0 and original.get("speedup"):
            plan = select.select_measured(run, target, speedup=float(original["speedup"]), name=nxt, timer=timer,
                                          rounds=check_rounds, max_budget_ms=budget, options=opts, log=quiet)
        else:
            plan = select.select(run, target=target, budget_ms=budget, name=nxt, options=opts, log=quiet)
        if plan["layers"] == layers_of[prev]:
            log(f"refine {name}: round {r} keeps the plan")
            rd.plan(nxt).unlink(missing_ok=True)
            break
        write_json(rd.plan(nxt), {**read_json(rd.plan(nxt)), "refinement_of": name, "round": r})
        changed = [k for k, v in plan["layers"].items() if v != layers_of[prev].get(k)]
        log(f"refine {name}: round {r} changes {len(changed)} layers ({', '.join(changed[:6])}"
            f"{', ...' if len(changed) > 6 else ''}); predicted held-out loss change from the teacher's "
            f"{plan['predicted']['d_loss']:+.4g}")
        layers_of[nxt] = plan["layers"]
        prev = nxt
    else:  # the last round's plan was not scored in its context
        record["rounds"].append({"name": prev, "layers": layers_of[prev], "heldout": judge(layers_of[prev])})
    final = _keep_best(run, name, record["rounds"], original, current, log)
    record.update(winner=final["refined"]["winner"], winner_layers=final["layers"], complete=True)
    write_json(path, record)
    return record


def _keep_best(run: Path, name: str, rows: list[dict[str, Any]], original: dict[str, Any],
               current: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Of refinement's plans (`rows`, the first plan's first), the one with the lowest measured
    held-out loss among those whose hardware check met the speedup, written as RUN/plans/<name>.json
    with a "refined" record; rows gain "changed" (layers differing from the first plan) and
    "ineligible" where left out. Returns the plan written."""
    rd = RunDir(run)
    first = rows[0]["name"]
    for row in rows:
        row["changed"] = sum(v != original["layers"].get(k) for k, v in row["layers"].items())
    for row in rows[1:]:
        check = read_json(rd.plan(row["name"])).get("latency_check") or {}
        if check.get("met") is False:
            row["ineligible"] = "its hardware check fell short of the speedup"
    winner = min((row for row in rows if "ineligible" not in row),
                 key=lambda row: row["heldout"]["d_loss"])  # the earliest on a tie
    for row in rows:
        log(f"refine {name}: {row['name']} held-out loss {row['heldout']['loss']:.4f} "
            f"({row['heldout']['d_loss']:+.4f} from the teacher's), top-1 {row['heldout']['top1']:.2f}%"
            + (" <- kept" if row is winner else f" (left out: {row['ineligible']})" if "ineligible" in row else ""))
    chosen = read_json(rd.plan(winner["name"]))
    final = {**chosen, **{k: current[k] for k in ("alternatives",) if k in current}, "name": name,
             "speedup": original.get("speedup", chosen.get("speedup")),
             "refined": {"from": first, "winner": winner["name"],
                         "heldout_d_loss": {row["name"]: row["heldout"]["d_loss"] for row in rows}}}
    for key in ("refined_as", "refinement_of", "round"):
        final.pop(key, None)
    if winner["name"] != first and original.get("accuracy_risk"):
        final["accuracy_risk"] = _risk_on_teacher_scores(run, final, original["accuracy_risk"])
        if final["accuracy_risk"]["large"]:
            log(f"warning: {final['accuracy_risk']['message']}")
    write_json(rd.plan(name), final)
    return final


def _risk_on_teacher_scores(run: Path, plan: dict[str, Any], first_risk: dict[str, Any]) -> dict[str, Any]:
    """The refined plan's accuracy risk on the scale the warning's threshold was set on: its
    layers' replace-one-layer scores around the teacher (scores.json) summed, as for any plan."""
    from hant.run import Run
    from hant.select import accuracy_risk

    scores = {(e["layer"], e["spec"]): e.get("d_loss") for e in Run(run).scores()["entries"]}
    summed = sum(scores.get((n, s)) or 0.0 for n, s in plan["layers"].items())
    rounds = (plan.get("latency_check") or {}).get("rounds") or []
    ratio = rounds[-1]["speedup"] / plan["predicted_speedup"] if rounds and plan.get("predicted_speedup") else None
    return accuracy_risk({**plan, "predicted": {**plan["predicted"], "d_loss": summed}, "score_method": "eval"},
                         first_risk["teacher_loss"], first_risk["safe_speedup"], measured_ratio=ratio)


def _heldout_row(d: dict[str, Any]) -> dict[str, float]:
    return {k: d[k] for k in ("loss", "top1", "d_loss", "d_acc", "kl", "images")}


def plan_name(target: str, batch_size: int, speedup: float) -> str:
    """The plan name used for one speedup: `onnxruntime-cpu-b1-x2`."""
    return f"{target}-b{batch_size}-x{speedup:g}"


class _Timer:
    """Records wall time per stage into RUN/timings.json (merged across restarts)."""

    def __init__(self, run: Path, log: Callable[[str], None]):
        self.path = RunDir(run).root / "timings.json"
        self.log = log
        self.timings: dict[str, float] = read_json(self.path).get("stages", {}) if self.path.exists() else {}

    def run(self, stage: str, fn: Callable[[], Any], skip: bool = False) -> Any:
        if skip:
            self.log(f"[hant] {stage}: complete, skipped")
            return None
        self.log(f"[hant] {stage} ...")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.timings[stage] = round(self.timings.get(stage, 0.0) + dt, 1)
        write_json(self.path, {"stages": self.timings})
        self.log(f"[hant] {stage}: done in {dt:.0f} s")
        return out


def _readable(path: Path) -> bool:
    """Whether a JSON artifact exists and reads back (a damaged one is redone, not skipped)."""
    try:
        read_json(path)
        return True
    except (HantError, OSError, ValueError):
        return False


def _student_intact(run: Path, plan: str) -> bool:
    """Whether the plan's fine-tuned student exists with the checksum its arch.json records and
    the specs the plan (as it is now) chooses."""
    rd = RunDir(run)
    out = rd.student_dir(plan)
    weights = out / "student.safetensors"
    if not weights.exists() or not _readable(out / "arch.json") or not _readable(rd.plan(plan)):
        return False
    from hant.ops import parse

    arch = read_json(out / "arch.json")
    built = {n: e.get("spec") for n, e in (arch.get("layers") or {}).items() if e.get("spec") != "teacher"}
    try:
        planned = {n: parse(s).encode() for n, s in (read_json(rd.plan(plan)).get("layers") or {}).items()}
    except ValueError:
        return False
    planned = {n: s for n, s in planned.items() if s != "teacher"}
    return built == planned and sha256_file(weights) == arch.get("sha256")


def _student_outdated(run: Path, plan: str, opts: AccelerateOptions, log: Callable[[str], None]) -> bool:
    """Whether a finished student was made with other re-distillation or fine-tuning settings
    than the run's config and `opts` now give (then it is made again, and the log says why)."""
    from hant import finetune as finetune_mod
    from hant import redistill as redistill_mod

    if opts.redistill and not redistill_mod.is_current(run, plan):
        why = "re-distillation settings or phase-1 weights"
    else:
        why = finetune_mod.outdated(run, plan, epochs=opts.finetune_epochs)
    if why:
        log(f"{plan}: its fine-tuned student was made with other settings ({why}) than the run gives now; "
            "making it again")
    return bool(why)


def _plan_settled(run: Path, plan: str, check_rounds: int, candidates: int = 1) -> bool:
    """Whether the plan exists (and, when plans are checked on the hardware, was checked; when
    alternatives are asked for, was selected with them)."""
    path = RunDir(run).plan(plan)
    if not _readable(path):
        return False
    d = read_json(path)
    return (check_rounds <= 0 or "latency_check" in d) and (candidates <= 1 or "alternatives" in d)


def _eval_complete(run: Path, plan: str, int8: bool) -> bool:
    path = RunDir(run).student_dir(plan) / "eval.json"
    if not _readable(path):
        return False
    ev = read_json(path)
    ok = ev.get("student", {}).get("top1") is not None and ev.get("student", {}).get("latency_ms") is not None
    if int8:
        ok = ok and (ev.get("int8") or {}).get("top1") is not None
    return ok


def accelerate_run(run: str | Path, opts: AccelerateOptions, *, init_kwargs: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run init (when `init_kwargs` is given and the run is new), distill, latency, score, select,
    redistill (unless `opts.redistill` is off), finetune, measure, export and report. Each
    finished stage is skipped on a rerun.

    With `opts.candidates` K > 1, each speedup's selection also writes K - 1 alternatives at
    its budget; each alternative is timed against the teacher (with `check_rounds` > 0) and
    left out when it falls short of the speedup, and `hant.pick.pick_plan` gives every
    remaining plan a short distillation and makes the best on held-out images the plan that
    is fine-tuned.

    Returns {"plans": [names], "report": path, "timings": {...}}. Raises HantError from any stage.
    """
    from hant import distill as distill_mod
    from hant import export as export_mod
    from hant import finetune as finetune_mod
    from hant import latency, report, score, select
    from hant import measure as measure_mod
    from hant import pick as pick_mod
    from hant import redistill as redistill_mod

    run = Path(run)
    rd = RunDir(run)
    timer = _Timer(run, log)
    if init_kwargs is not None:
        from hant.run import init_run

        if rd.layers.exists():
            # Confirms that the run holds this configuration (refused otherwise), so finished
            # work is never mixed with another teacher, dataset or space.
            init_run(run, **init_kwargs)
        else:
            timer.run("init", lambda: init_run(run, **init_kwargs))
    elif not rd.layers.exists():
        raise HantError(f"{run} is not initialised; pass --model and --data (or run `hant init`) first")
    timer.run("distill", lambda: distill_mod.distill(run))
    tid = latency.table_id(opts.target, opts.batch_size)
    timer.run("latency", lambda: latency.measure_table(run, target=opts.target, batch_size=opts.batch_size,
                                                      validate=opts.validate))
    timer.run("score", lambda: score.score(run))
    plans = []

    def check_plan(r, n):  # the hardware check of select_measured
        return measure_mod.time_plan(r, n, log=log)

    # Ascending, each capped by the budget the previous one ended with: a check that tightens
    # a small speedup's budget must not leave a larger speedup with a looser one.
    cap = None
    # Only with alternatives asked for: with one plan, selection is called exactly as before.
    diverse = {"candidates": opts.candidates} if opts.candidates > 1 else {}
    for s in sorted(opts.speedups):
        name = plan_name(opts.target, opts.batch_size, s)
        plans.append(name)
        if opts.check_rounds > 0:
            def choose():
                return select.select_measured(run, tid, speedup=s, name=name, timer=check_plan,
                                              rounds=opts.check_rounds, max_budget_ms=cap, log=log, **diverse)
        else:
            def choose():
                return select.select(run, target=tid, speedup=s, name=name, log=log, **diverse)
        timer.run(f"select {name}", choose, skip=_plan_settled(run, name, opts.check_rounds, opts.candidates))
        if opts.refine > 0:
            # Resumable on its own: a finished refinement of the plan as it stands is read back.
            # A student fine-tuned before refinement existed keeps its plan: finished work is reused.
            timer.run(f"refine {name}", lambda: refine_plan(run, name, opts.refine, timer=check_plan,
                                                            check_rounds=opts.check_rounds, log=log),
                      skip=_student_intact(run, name) and not rd.refine_record(name).exists())
        if opts.candidates > 1:
            def pick():
                if opts.check_rounds > 0:
                    pick_mod.check_alternatives(run, name, timer=check_plan, speedup=s, log=log)
                return pick_mod.pick_plan(run, name, log=log)
            # Resumable on its own: a finished pick is read back, not trained again.
            timer.run(f"pick {name}", pick)
        budget = read_json(rd.plan(name)).get("budget_ms")
        if budget is not None:
            cap = budget if cap is None else min(cap, budget)
    for name in plans:
        intact = _student_intact(run, name) and not _student_outdated(run, name, opts, log)
        done = intact and _eval_complete(run, name, opts.int8)
        # Re-distilled weights already on disk are used by fine-tuning whatever opts.redistill says.
        timer.run(f"redistill {name}", lambda: redistill_mod.redistill(run, name, log=log),
                  skip=intact or not opts.redistill)
        timer.run(f"finetune {name}", lambda: finetune_mod.finetune(run, name, epochs=opts.finetune_epochs, log=log),
                  skip=intact)
        timer.run(f"measure {name}", lambda: measure_mod.measure(run, name, log=log), skip=done)
        timer.run(f"export {name}", lambda: export_mod.export(run, name, int8=opts.int8), skip=done)
    path = timer.run("report", lambda: report.write_report(run))
    return {"plans": plans, "report": str(path), "timings": timer.timings}
