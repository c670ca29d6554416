"""Phase 3, measurement: a plan's student timed end to end against the teacher.

- `time_plan(run, plan)`: the plan assembled from its phase-1 candidates, timed before any
  fine-tuning; writes nothing. The hardware check of `hant.select.select_measured`, which
  gets it from its caller (the pipeline, the CLI).
- `measure(run, plan)`: the fine-tuned student (else the assembled plan) timed the same
  way; merged into RUN/students/<plan>/eval.json.

Both time on the plan's target, in one process, interleaved, with the latency protocol of
the run's config (`hant.latency.compare.time_against_teacher`), so that the check and the
final number can be compared.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from hant.run import Run
from hant.student import ARCH_FILE, STUDENT_FILE, assemble, count_params_flops, load_student, read_plan, update_eval
from hant.workspace import RunDir

__all__ = ["measure", "time_plan"]

# `measure` times again when its teacher median differs from the same run's earlier teacher
# timings (same target, batch, threads) by more than this factor either way: the machine's
# speed changed during the timing, which interleaving does not always cancel (a teacher once
# timed at 6.2 ms against 3.5 ms minutes before, turning a 1.95x plan into "3.32x").
TEACHER_DRIFT = 1.3
RETIMES = 2




def _time_against_teacher(run, cfg, plan_d: Mapping[str, Any], teacher: nn.Module, student: nn.Module,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """Time `teacher` and `student` on the plan's target, interleaved in this process.

    The one protocol behind both `time_plan` and `measure`. Returns {"teacher": Stats,
    "student": Stats, "speedup", "speedup_ci_lo", "speedup_ci_hi" (None without a positive
    student median), "target": Target, "timing": {target_id, batch_size, threads, clock,
    protocol}, "other_load"} (timing is what both outputs record; other_load, other processes'
    share of the machine's CPU time meanwhile, is warned about above `BUSY_SHARE`).
    """
    from hant.data import load_data
    from hant.latency import get_target
    from hant.latency.base import BUSY_SHARE, OtherLoad
    from hant.latency.compare import resolve_target, time_against_teacher
    from hant.latency.protocol import Protocol

    target_id, batch_size, threads = resolve_target(run, plan_d)
    in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    # The table's thread count when there is a table, else the config's: never a silent "all cores".
    target = get_target(target_id, batch_size=batch_size, threads=threads or cfg.latency.threads)
    examples = None
    if getattr(target, "precision", "fp32") != "fp32":
        # Calibrating targets (INT8) want real inputs, not noise.
        train = load_data(cfg.data).train
        n = min(len(train), max(64, batch_size * 8))
        examples = torch.stack([train[i][0] for i in range(n)])
    log(f"measure {plan_d.get('name')}: timing teacher and student on {target_id} (batch {batch_size}, "
        f"{target.threads} threads), interleaved")
    load = OtherLoad().start()
    cmp = time_against_teacher(teacher, {"student": student}, target, in_shape, Protocol.from_config(cfg.latency),
                               examples)
    others = load.share()
    if others is not None and others > BUSY_SHARE:
        log(f"warning: measure {plan_d.get('name')}: other processes used {others:.0%} of the machine's CPU time "
            "while it was timed; they slow the teacher and the student unequally, so this speedup may be off "
            f"(time it again on an idle machine: `hant measure --run {run} --plan {plan_d.get('name')}`)")
    sp = cmp.speedups["student"]
    timing = {"target_id": target_id, "batch_size": batch_size, "threads": target.threads, "clock": target.clock,
              "protocol": cmp.protocol.to_dict()}
    ratio, lo, hi = sp if sp is not None else (None, None, None)
    return {"teacher": cmp.teacher, "student": cmp.stats["student"], "speedup": ratio, "speedup_ci_lo": lo,
            "speedup_ci_hi": hi, "target": target, "timing": timing,
            "other_load": None if others is None else round(others, 3)}


def time_plan(run: str | os.PathLike, plan: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The plan assembled from its phase-1 candidates, timed end to end against the teacher on
    the plan's target with the same protocol as `measure`, before any fine-tuning; writes nothing.

    Returns {"teacher_ms", "teacher_ci_lo_ms", "teacher_ci_hi_ms", "student_ms",
    "student_ci_lo_ms", "student_ci_hi_ms", "speedup", "speedup_ci_lo", "speedup_ci_hi",
    "predicted_ms", "timing", "other_load"} (medians with their confidence intervals; timing as in
    eval.json). Used to check that a plan chosen from the latency table really gives the
    requested speedup (the `timer` of `hant.select.select_measured`). Raises HantError for a
    missing plan or an unknown target.
    """
    cfg = Run(run).config
    plan_d = read_plan(run, plan)
    student = assemble(run, plan, bn_recalibrate=False)
    timed = _time_against_teacher(run, cfg, plan_d, Run(run).teacher(), student, log)
    t, s = timed["teacher"], timed["student"]
    if timed["speedup"] is None:  # a zero median: the student is below the clock's resolution
        timed.update(speedup=math.inf, speedup_ci_lo=math.inf, speedup_ci_hi=math.inf)
    return {"teacher_ms": t.median_ms, "teacher_ci_lo_ms": t.ci_lo_ms, "teacher_ci_hi_ms": t.ci_hi_ms,
            "student_ms": s.median_ms, "student_ci_lo_ms": s.ci_lo_ms, "student_ci_hi_ms": s.ci_hi_ms,
            "speedup": timed["speedup"], "speedup_ci_lo": timed["speedup_ci_lo"],
            "speedup_ci_hi": timed["speedup_ci_hi"], "predicted_ms": plan_d.get("predicted_ms"),
            "timing": timed["timing"], "other_load": timed.get("other_load")}


def measure(run: str | os.PathLike, plan: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """End-to-end latency of teacher and student on the plan's target (one process, interleaved).

    Uses the latency stage's target (deployed form: e.g. ONNX Runtime with BN folded) and
    timing protocol (`latency` section of the config). The student is the fine-tuned one
    (RUN/students/<plan>/), else the plan assembled without fine-tuning (latency does not
    depend on the weights). Merges into eval.json: teacher/student latency_ms (median),
    latency_p10_ms, latency_p90_ms, speedup, predicted_ms, target, batch_size, params,
    flops. When the teacher's median differs from the run's earlier teacher timings on the
    same target (hardware checks, other students) by more than TEACHER_DRIFT, the pair is
    timed again, up to RETIMES times, and the timing nearest the earlier ones is kept; every
    attempt is in eval.json's `timing_attempts`. Returns that dict ({} on ranks other than 0
    under torchrun). Raises HantError for a missing plan or an unknown target.
    """
    from hant.workspace import run_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under torchrun only rank 0 times; the other ranks must not load the cores meanwhile
    with run_lock(RunDir(run).root, log=log):
        return _measure(run, plan, log)


def _earlier_teacher_ms(run, plan: str, timing: Mapping[str, Any]) -> list[float]:
    """The teacher medians of the run's earlier timings with the same target, batch size,
    threads and clock: every plan's hardware-check rounds and the other students' eval.json."""
    from hant.errors import HantError
    from hant.workspace import read_json

    def read(path):
        try:
            return read_json(path)
        except HantError:  # a file being rewritten or corrupt: not an earlier timing
            return {}

    def same(t: Mapping[str, Any] | None) -> bool:
        return all((t or {}).get(k) == timing.get(k) for k in ("target_id", "batch_size", "threads", "clock"))

    rd = RunDir(run)
    out: list[float] = []
    for path in sorted((rd.root / "plans").glob("*.json")):
        check = read(path).get("latency_check") or {}
        if same(check.get("timing")):
            out += [r["teacher_ms"] for r in check.get("rounds") or [] if r.get("teacher_ms")]
    for path in sorted((rd.root / "students").glob("*/eval.json")):
        ev = read(path) if path.parent.name != plan else {}
        if same(ev.get("timing")) and (ev.get("teacher") or {}).get("latency_ms"):
            out.append(ev["teacher"]["latency_ms"])
    return out


def _measure(run, plan: str, log) -> dict[str, Any]:
    """`measure` under the run lock. Besides the medians, eval.json gets each one's confidence
    interval (teacher/student latency_ci_lo_ms, latency_ci_hi_ms, latency_converged;
    speedup_ci_lo, speedup_ci_hi) and `timing` (threads, clock and protocol, the same record
    as the plan's hardware check)."""
    cfg = Run(run).config
    plan_d = read_plan(run, plan)
    out = RunDir(run).student_dir(plan)
    if (out / ARCH_FILE).exists() and (out / STUDENT_FILE).exists():
        student = load_student(out)
    else:
        log(f"measure {plan}: no fine-tuned student yet; timing the assembled plan")
        student = assemble(run, plan, bn_recalibrate=False)
    teacher = Run(run).teacher()
    in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    timed = _time_against_teacher(run, cfg, plan_d, teacher, student, log)
    earlier = _earlier_teacher_ms(run, plan, timed["timing"])
    attempts = [timed]
    if earlier:
        ref = sorted(earlier)[len(earlier) // 2]

        def off(t):  # how far a timing's teacher median is from the run's earlier ones, as a factor
            return max(t["teacher"].median_ms / ref, ref / t["teacher"].median_ms)

        while off(attempts[-1]) > TEACHER_DRIFT and len(attempts) <= RETIMES:
            log(f"measure {plan}: the teacher timed {attempts[-1]['teacher'].median_ms:.3f} ms here against "
                f"{ref:.3f} ms in this run's {len(earlier)} earlier timing(s): the machine's speed changed; "
                f"timing again")
            attempts.append(_time_against_teacher(run, cfg, plan_d, teacher, student, log))
        timed = min(attempts, key=off)
    target = timed["target"]
    params, flops = count_params_flops(student, in_shape)
    t_params, t_flops = count_params_flops(teacher, in_shape)

    def section(s, p, f):
        return {"latency_ms": s.median_ms, "latency_ci_lo_ms": s.ci_lo_ms, "latency_ci_hi_ms": s.ci_hi_ms,
                "latency_converged": s.converged, "latency_p10_ms": s.p10_ms, "latency_p90_ms": s.p90_ms,
                "latency_n": s.n, "params": p, "flops": f}

    t, s = timed["teacher"], timed["student"]
    pred = plan_d.get("predicted_ms")
    patch = {
        "plan": plan,
        "teacher": section(t, t_params, t_flops),
        "student": section(s, params, flops),
        "speedup": timed["speedup"], "speedup_ci_lo": timed["speedup_ci_lo"], "speedup_ci_hi": timed["speedup_ci_hi"],
        "predicted_ms": pred,
        "prediction_error_pct": (100.0 * (pred - s.median_ms) / s.median_ms) if pred and s.median_ms else None,
        "target": plan_d.get("target"), "target_id": timed["timing"]["target_id"],
        "batch_size": timed["timing"]["batch_size"], "threads": target.threads, "params": params, "flops": flops,
        "latency_fingerprint": target.fingerprint(), "timing": timed["timing"],
        # Other processes' share of the machine's CPU time while it was timed (OtherLoad).
        "other_load": timed.get("other_load"),
        # Every timing of this call; more than one when the teacher's latency drifted from the
        # run's earlier timings, and the one kept is the nearest to them.
        "timing_attempts": [{"teacher_ms": a["teacher"].median_ms, "student_ms": a["student"].median_ms,
                             "speedup": a["speedup"]} for a in attempts],
    }
    merged = update_eval(out, patch)
    speedup = (f"{patch['speedup']:.2f}x [{patch['speedup_ci_lo']:.2f}, {patch['speedup_ci_hi']:.2f}]"
               if patch["speedup"] is not None else "n/a")
    log(f"measure {plan}: teacher {t.median_ms:.3f} ms, student {s.median_ms:.3f} ms, speedup {speedup}"
        + (f", predicted {pred:.3f} ms" if pred else ""))
    return merged
