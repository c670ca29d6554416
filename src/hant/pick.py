"""Between selection and fine-tuning: K candidate plans, each briefly distilled, the best goes on.

`hant.select.select(..., candidates=K)` writes the best plan of a budget, RUN/plans/<name>.json,
and up to K - 1 alternatives that differ from it in a share of the layers (<name>-alt1, ...).
The integer program ranks them by the sum of per-layer scores, each measured with one layer
replaced; a whole network of replaced layers, after a little end-to-end training, can rank
otherwise (Puzzle, Bercovich et al. 2024, gives its candidate architectures a short
distillation each before the final choice for this reason).

- `check_alternatives(run, name, timer, speedup)`: each alternative timed against the
  teacher, judged by `hant.speedup.judge_speedup` (the rule of `select_measured`), recorded
  in its plan file under "latency_check"; one that falls short is not eligible.
- `pick_plan(run, name)`: every eligible plan assembled (BatchNorm re-estimated), trained
  with the fine-tuning loop (`hant.kd.finetune_module`) on `finetune.pick_images`
  train images, and scored on the held-out split (never trained on) against the teacher.
  The ranking goes to RUN/plans/<name>.pick.json; the original best is kept as
  <name>-alt0 and RUN/plans/<name>.json becomes the winner (its own layers, predictions and
  hardware check) with a "picked_from" record, so that `hant finetune --plan <name>` trains it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hant.errors import HantError
from hant.run import Run
from hant.student import TEACHER_SPEC
from hant.workspace import RunDir, read_json, write_json

__all__ = ["pick_plan", "check_alternatives", "original_name", "ranking_path"]

# What an alternative's plan file has and the plan fine-tuned under the best plan's name does not.
_ALT_KEYS = ("rank", "alternative_of", "differs_from_best")
_CACHE_BYTES = 1 << 30  # held-out batches are kept in memory below this size


def original_name(name: str) -> str:
    """The name the best plan of `name` keeps once `pick_plan` has run: `<name>-alt0`."""
    return f"{name}-alt0"


def ranking_path(run: str | os.PathLike, name: str) -> Path:
    """RUN/plans/<name>.pick.json, the ranking `pick_plan` writes."""
    return RunDir(run).root / "plans" / f"{name}.pick.json"


def _alternative_names(plan: Mapping[str, Any]) -> list[str]:
    # Names, as `select` writes them; whole plans (with "name") are accepted too.
    return [a if isinstance(a, str) else a["name"] for a in plan.get("alternatives") or []]


def _candidates(the_run: Run, name: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """(the plan file under `name`, [(candidate name, plan)]): the original best first, as
    <name>-alt0, then the alternatives in their order. Before the first pick the original is
    the plan under `name` itself (a fresh selection), after it the file <name>-alt0."""
    current = the_run.plan(name)
    if "picked_from" in current:
        try:
            original = the_run.plan(original_name(name))
        except HantError:
            raise HantError(f"plan {name} was picked from {original_name(name)}, which is gone; "
                            f"re-run `hant select` for {name}") from None
    else:
        original = {k: v for k, v in current.items() if k not in ("alternatives", "picked_from")}
        original.update(name=original_name(name), rank=0, alternative_of=name, differs_from_best=0)
    out = [(original_name(name), original)]
    for alt in _alternative_names(current):
        out.append((alt, the_run.plan(alt)))
    return current, out


def check_alternatives(run: str | os.PathLike, name: str, timer: Callable[[str | os.PathLike, str], dict],
                       speedup: float, tolerance: float = 0.02,
                       log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time each alternative of plan `name` against the teacher and record whether it meets `speedup`.

    Alternatives share the best plan's budget and are predicted about as fast, but each is
    checked on the hardware as the best plan is: `timer(run, alt_name)` (the pipeline passes
    `hant.measure.time_plan`) and `hant.speedup.judge_speedup` with `tolerance` (met when the
    upper end of the measured speedup's interval reaches speedup * (1 - tolerance)). The
    check goes into the alternative's plan file under "latency_check" (the format of
    `select_measured`, one round); an alternative already checked for the same goal is not
    timed again. `pick_plan` leaves out alternatives whose check is not met.

    Returns [{"name", "speedup", "speedup_ci_lo", "speedup_ci_hi", "decision", "met"}], one per
    alternative. Raises HantError for a missing plan or a non-positive `speedup`.
    """
    from hant.speedup import SPEEDUP_RULE, judge_speedup

    if not (speedup > 0 and math.isfinite(speedup)):
        raise HantError(f"speedup must be a positive number, got {speedup}")
    the_run = Run(run)
    goal = speedup * (1.0 - tolerance)
    out = []
    for alt in _alternative_names(the_run.plan(name)):
        plan = the_run.plan(alt)
        check = plan.get("latency_check") or {}
        if check.get("rounds") and check.get("goal_speedup") == goal:
            m = check["rounds"][-1]
        else:
            raw = timer(run, alt)
            m = judge_speedup(raw, speedup, tolerance)
            m = {"budget_ms": plan.get("budget_ms"), "predicted_ms": plan.get("predicted_ms"), **m}
            check = {"rounds": [m], "tolerance": tolerance, "goal_speedup": goal, "rule": SPEEDUP_RULE,
                     "budget_cap_ms": None, "timing": raw.get("timing"), "met": m["decision"].startswith("met")}
            write_json(the_run.dir.plan(alt), {**plan, "latency_check": check})
            log(f"plan {alt}: measured {m['student_ms']:.4g} ms against the teacher's {m['teacher_ms']:.4g} ms, "
                f"{m['speedup']:.2f}x [{m['speedup_ci_lo']:.2f}, {m['speedup_ci_hi']:.2f}] (asked {speedup:g}x): "
                f"{m['decision']}{'' if check['met'] else '; not eligible for the pick'}")
        out.append({"name": alt, "speedup": m["speedup"], "speedup_ci_lo": m["speedup_ci_lo"],
                    "speedup_ci_hi": m["speedup_ci_hi"], "decision": m["decision"], "met": bool(check["met"])})
    return out


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Heldout:
    """The held-out images and the teacher's logits on them, computed once per pick."""

    batches: Any  # a list of (x, y) when small, else a loader in a fixed order
    teacher_logits: list[torch.Tensor]
    n: int
    device: torch.device


def _heldout(cfg, teacher: nn.Module, splits) -> _Heldout:
    from hant.data import make_loader

    held = splits.heldout
    if len(held) == 0:
        raise HantError("the held-out split is empty; raise data.heldout in the run's config")
    loader = make_loader(held, batch_size=cfg.data.batch_size, num_workers=cfg.data.workers)
    x0, _ = next(iter(loader))
    batches = list(loader) if x0[0].numel() * 4 * len(held) <= _CACHE_BYTES else loader
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    teacher.to(device).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        logits = [teacher(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
                  for x, _ in batches]
    teacher.to("cpu").to(memory_format=torch.contiguous_format)
    return _Heldout(batches, logits, len(held), device)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@torch.no_grad()
def _score(model: nn.Module, held: _Heldout, ft) -> dict[str, float | None]:
    """The model against the teacher on the held-out images: "heldout_loss" (the logits part
    of the fine-tuning loss, `kd_loss` with the run's weights and temperature), "heldout_kl"
    (KL(teacher || model) at temperature 1) and "heldout_top1" (percent, against the labels);
    per image means, None when not finite."""
    from hant.kd import kd_loss

    model.eval().to(held.device).to(memory_format=torch.channels_last)
    loss = kl = 0.0
    correct = n = 0
    for (x, y), t in zip(held.batches, held.teacher_logits):
        s = model(x.to(held.device).contiguous(memory_format=torch.channels_last)).float()
        t, y = t.to(held.device), y.to(held.device)
        loss += float(kd_loss(s, t, y, ft.kd_weight, ft.ce_weight, ft.temperature)) * len(y)
        kl += float(F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="sum"))
        correct += int((s.argmax(1) == y).sum())
        n += len(y)
    model.to("cpu").to(memory_format=torch.contiguous_format)
    return {"heldout_loss": _finite(loss / n), "heldout_kl": _finite(kl / n), "heldout_top1": 100.0 * correct / n}


def _short_distillation(run: Path, plan: Mapping[str, Any], images: int, cfg, splits, teacher: nn.Module,
                        held: _Heldout, log: Callable[[str], None]) -> dict[str, Any]:
    """One candidate plan: assembled from its phase-1 weights (BatchNorm re-estimated), scored,
    trained on `images` train images by `finetune_module`, scored again. Returns its ranking
    entry's numbers."""
    from hant.kd import finetune_module
    from hant.student import assemble

    t0 = time.perf_counter()
    # The layers alone, without the plan's name: every plan starts from its phase-1 weights,
    # never from weights re-distilled for one of them (`hant.redistill`), so the race is fair.
    model = assemble(run, {"layers": plan["layers"]}, bn_recalibrate=True, splits=splits)
    before = _score(model, held, cfg.finetune)
    # A share of an epoch: the first `images` of the epoch's seeded order, the same images
    # for every plan (and more than one epoch when the split is smaller).
    res = finetune_module(model, teacher, cfg, splits.train, epochs=images / len(splits.train),
                          key=f"pick {plan['name']}", log=log)
    after = _score(model, held, cfg.finetune)
    return {**after, "assembled": before, "steps": res["steps"], "batch_size": res["batch_size"],
            "train_images": res["steps"] * res["batch_size"], "final_train_loss": res["final_loss"],
            "time_s": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- the pick


def _settings(the_run: Run, images: int) -> dict[str, Any]:
    """Everything a ranking entry depends on besides its plan: reused only when all agree."""
    cfg = the_run.config
    ft, data = cfg.finetune, cfg.data
    return {"images": images, "seed": cfg.seed, "lr": ft.lr, "weight_decay": ft.weight_decay,
            "batch_size": ft.batch_size, "kd_weight": ft.kd_weight, "ce_weight": ft.ce_weight,
            "temperature": ft.temperature, "warmup": ft.warmup, "augment": ft.augment,
            "feature_loss": ft.feature_loss, "feature_weight": ft.feature_weight, "bn_batches": ft.bn_batches,
            "data": {"spec": data.spec, "input_size": data.input_size, "heldout": data.heldout, "seed": data.seed},
            "teacher_sha256": the_run.layers_doc.get("checkpoint_sha256"),
            **({"head_fit": True} if ft.head_fit else {})}  # only when on: earlier rankings keep their keys


def _entry_key(settings: Mapping[str, Any], layers: Mapping[str, str], index: Mapping) -> str:
    # The phase-1 weights too: a candidate trained again makes another student.
    weights = {n: (index.get((n, s)) or {}).get("sha256") for n, s in layers.items() if s != TEACHER_SPEC}
    blob = json.dumps({"settings": settings, "layers": dict(layers), "weights": weights}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sort_key(entry: Mapping[str, Any], scores: str | None = None) -> tuple[float, int]:
    """Held-out loss (after the short distillation, or in `entry[scores]`), a missing one last;
    ties to the earlier plan."""
    source = (entry.get(scores) or {}) if scores else entry
    loss = source.get("heldout_loss")
    return (loss if loss is not None else math.inf, entry["order"])


def _ineligible(plan: Mapping[str, Any]) -> str | None:
    """Why an alternative may not be picked (its hardware check fell short), or None."""
    check = plan.get("latency_check")
    if not check or check.get("met", True):
        return None
    last = (check.get("rounds") or [{}])[-1]
    return (f"measured {last.get('speedup', math.nan):.2f}x (at most {last.get('speedup_ci_hi', math.nan):.2f}x), "
            f"short of the goal {check.get('goal_speedup', math.nan):.2f}x")


def pick_plan(run: str | os.PathLike, name: str, images: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Give plan `name` and each of its alternatives a short distillation; the best on held-out
    images becomes the plan `name` that fine-tuning trains.

    The candidates are the best plan of the selection and its alternatives (`hant select
    --candidates K`). Each eligible one (an alternative whose hardware check, see
    `check_alternatives`, fell short is left out; the best plan always takes part) is
    assembled with its phase-1 weights and BatchNorm re-estimated, then trained end to end
    against the teacher with the fine-tuning recipe (`hant.kd.finetune_module`: loss,
    optimiser, schedule and augmentation of the run's `finetune` section) on `images` train
    images (default `finetune.pick_images`; the same images for every plan), and scored on
    the held-out split: "heldout_loss" (the logits part of the fine-tuning loss against the
    teacher; the ranking's key, lower is better, ties to the earlier plan), "heldout_kl" and
    "heldout_top1", before ("assembled") and after the short distillation. Deterministic
    given the run's seed.

    Writes RUN/plans/<name>.pick.json atomically after every plan ({"plan", "settings",
    "teacher", "ranking": [{"name", "layers", "predicted_ms", "measured_speedup", the scores,
    "assembled", "steps", "train_images", "time_s", "rank", ...}], "skipped": [{"name",
    "reason"}], "winner", "complete"}); a rerun reuses every entry made with the same settings,
    plan layers and phase-1 weights, so a finished pick is not trained again. Then the
    original best is kept as RUN/plans/<name>-alt0.json and RUN/plans/<name>.json becomes the
    winner (its layers, predictions and hardware check; the original's alternatives; and
    "picked_from": {"plan", "ranking", "heldout_loss", "heldout_top1"}).

    Returns the ranking document with "path". A plan without alternatives has nothing to
    pick from: it is returned as the winner and nothing is written. Raises HantError for a
    missing plan or phase-1 weights, `images` < 1, or an empty held-out split.
    """
    from hant.workspace import run_lock

    the_run = Run(run)
    cfg = the_run.config
    images = int(cfg.finetune.pick_images if images is None else images)
    if images < 1:
        raise HantError(f"--images must be a positive number of train images, got {images}")
    with run_lock(the_run.root, log=log):
        current, candidates = _candidates(the_run, name)
        if len(candidates) < 2:
            log(f"pick {name}: the plan has no alternatives (select with --candidates K); nothing to pick")
            return {"plan": name, "winner": name, "ranking": [], "skipped": [], "complete": True, "path": None}
        return _pick(the_run, name, images, current, candidates, log)


def _pick(the_run: Run, name: str, images: int, current: dict, candidates: list, log) -> dict[str, Any]:
    run, cfg = the_run.root, the_run.config
    path = ranking_path(run, name)
    settings = _settings(the_run, images)
    index = the_run.candidate_index()
    previous, teacher_scores = {}, None
    if path.exists():
        try:
            doc = read_json(path)
            previous = {e["key"]: e for e in doc.get("ranking", []) if e.get("key")}
            teacher_scores = doc.get("teacher")
        except (HantError, KeyError, TypeError, AttributeError):
            log(f"pick {name}: {path} is unreadable; ranking again")
    entries, skipped = [], []
    data = None  # (splits, teacher, held-out) loaded only when a plan is to be trained
    t_start = time.perf_counter()

    def write(complete: bool, winner: str | None) -> dict[str, Any]:
        ranked = sorted(entries, key=_sort_key)
        for r, e in enumerate(ranked, 1):
            e["rank"] = r
        doc = {"version": 1, "plan": name, "settings": settings, "rank_by": "heldout_loss", "teacher": teacher_scores,
               "ranking": [{k: v for k, v in e.items() if k != "order"} for e in ranked], "skipped": skipped,
               "winner": winner, "complete": complete}
        return {**doc, "path": str(write_json(path, doc))}

    for order, (cand, plan) in enumerate(candidates):
        why = _ineligible(plan) if order > 0 else None
        if why:
            skipped.append({"name": cand, "reason": why})
            log(f"pick {name}: {cand} left out, {why}")
            continue
        key = _entry_key(settings, plan["layers"], index)
        check = plan.get("latency_check") or {}
        entry = {"name": cand, "order": order, "key": key, "layers": plan["layers"],
                 "predicted_ms": plan.get("predicted_ms"), "predicted_score": plan.get("predicted_score"),
                 "measured_speedup": (check.get("rounds") or [{}])[-1].get("speedup"), "latency_met": check.get("met")}
        if key in previous:
            entries.append({**previous[key], **entry})
            continue
        if data is None:
            from hant.data import load_data

            splits = load_data(cfg.data)
            teacher = the_run.teacher()
            held = _heldout(cfg, teacher, splits)
            data = (splits, teacher, held)
            teacher_scores = {"heldout_images": held.n, **_score(teacher, held, cfg.finetune)}
            log(f"pick {name}: {len(candidates) - len(skipped)} plans, each distilled on {images} train images "
                f"and scored on {held.n} held-out images (teacher top-1 {teacher_scores['heldout_top1']:.2f}%)")
        log(f"pick {name}: short distillation of {cand}")
        scores = _short_distillation(run, {**plan, "name": cand}, images, cfg, *data, log)
        entries.append({**entry, **scores})
        a = scores["assembled"]
        log(f"pick {name}: {cand} held-out loss {_fmt(a['heldout_loss'])} -> {_fmt(scores['heldout_loss'])}, "
            f"top-1 {a['heldout_top1']:.2f}% -> {scores['heldout_top1']:.2f}% in {scores['time_s']:.0f} s")
        write(complete=False, winner=None)
    # The order before training too, to see how often a short distillation changes the pick.
    before = sorted(entries, key=lambda e: _sort_key(e, "assembled"))
    for r, e in enumerate(before, 1):
        e["rank_assembled"] = r
    best = min(entries, key=_sort_key)
    doc = write(complete=True, winner=best["name"])
    if data is None:
        log(f"pick {name}: ranking of {len(entries)} plans reused from {doc['path']}")
    else:
        log(f"pick {name}: " + ", ".join(f"{e['rank']}. {e['name']} ({_fmt(e['heldout_loss'])})"
                                        for e in doc["ranking"]) + f" in {time.perf_counter() - t_start:.0f} s")
    _install(the_run, name, current, dict(candidates), best, doc["path"], log)
    return doc


def _fmt(v: float | None) -> str:
    return f"{v:.4g}" if v is not None else "n/a"


def _install(the_run: Run, name: str, current: dict, plans: dict[str, dict], best: Mapping[str, Any],
             ranking: str, log) -> None:
    """Make the winner the plan under `name`: the original best kept as <name>-alt0 (written
    first, so that a stop between the two writes leaves the original under `name`), then
    <name>.json the winner's plan with the alternatives and a "picked_from" record."""
    rd = the_run.dir
    winner = best["name"]
    # Relative to the run folder, as index.json records files: the folder may move.
    picked = {"plan": winner, "ranking": Path(ranking).relative_to(rd.root).as_posix(),
              "heldout_loss": best.get("heldout_loss"),
              "heldout_top1": best.get("heldout_top1")}
    if current.get("picked_from") == picked and current.get("layers") == plans[winner]["layers"]:
        return
    original = plans[original_name(name)]
    if "picked_from" not in current:
        write_json(rd.plan(original_name(name)), original)
    new = {k: v for k, v in plans[winner].items() if k not in _ALT_KEYS}
    if "speedup" in original and "speedup" not in new:
        new["speedup"] = original["speedup"]  # the same request; an alternative of a capped budget lacks it
    new.update(name=name, alternatives=_alternative_names(current), picked_from=picked)
    write_json(rd.plan(name), new)
    if winner == original_name(name):
        log(f"pick {name}: the best plan of the selection stays ({original_name(name)} keeps a copy)")
    else:
        log(f"pick {name}: {winner} wins; RUN/plans/{name}.json now holds it (the original best is "
            f"{original_name(name)}); `hant finetune --plan {name}` trains it")
