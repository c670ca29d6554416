"""The accuracy-recovery benchmark: test top-1 of hant students against fine-tuning epochs, per recipe.

    .venv/bin/python bench/recovery.py --run runs/demo      # the demo run -> bench/results/recovery.{json,png}

What it measures. On a run folder whose phase 1 and scores are done (`hant demo` leaves
runs/demo: EfficientNet-B0 on Fashion-MNIST at 64x64), for target onnxruntime-cpu at
`--batch-size` (64), for each speedup of `--speedups` (2, 3, 4):

1. plans checked on the hardware: `hant.select.select_measured` with `--candidates` K plans
   (the best and K - 1 alternatives at its budget) and `hant.measure.time_plan` as the
   timer, as `hant.pipeline.accelerate_run` does (larger speedups capped by the budgets of
   smaller ones). The best plan is the K = 1 plan; `hant.pick.check_alternatives` times the
   alternatives and `hant.pick.pick_plan` gives every eligible plan a short distillation
   (`--pick-images`) and keeps the best on held-out images (the picked plan);
2. re-distillation (`hant.redistill.redistill`, `--redistill-images` per layer) of each plan a
   recipe needs re-distilled, once per distinct set of layers, under its own plan name
   RUN/plans/recovery-b<B>-x<S>-rd-<hash>.json;
3. for every recipe and every epoch count of `--epochs` (0, 0.25, 0.5, 1, 2) its own
   fine-tuning schedule (warm-up and cosine over exactly that many epochs, not a snapshot
   of a longer one) from the assembled, BatchNorm-recalibrated student, through
   `hant.kd.finetune_module` (the loop of `hant finetune`) on a model assembled once per
   start; epoch 0 is the assembled student itself. Then test top-1, and the student timed
   against the teacher, interleaved, with the run's latency protocol
   (`hant.latency.compare.time_against_teacher`): measured speedup with its interval.

Recipes: `today` = the K = 1 plan, phase-1 weights, logits KD + label CE (no feature loss),
with augmentation;
`new` = the K = 1 plan, re-distilled weights, KD + CE (+ `--feature-loss`, default none).
Ablations of `new`, one change each (`--ablations`), run at epoch counts up to
`--ablation-epochs` (0.5): `pick` (the picked of K plans), `feature` (with the nmse
feature loss at the plan's layers), `pick-feature` (both), `no-redistill` (phase-1
weights, `new`'s augmentation; left out when that makes it `today`). The
sweep (`--sweep`, at `--sweep-epochs` and `--sweep-speedups`): `new` with the label-loss
weight (ce=W), the peak LR (lr=X), the feature loss at the plan's layers (fl=cosine),
fine-tuning augmentation (aug=0|1), batch (bs=N), KD temperature (t=X) or seed (seed=N,
the spread of one recipe) (each of these
with its own control), or the images per re-distilled layer (rd=N) changed. `today` and
`new` (with the sweep at its epochs) run every epoch count first, then the ablations.

Control: the teacher fine-tuned with the same loss for the same epochs (`finetune_module` on
a copy of the teacher; one control per distinct loss, the feature loss at all the run's
replaceable layers). Every point's `drop` is (the better of the teacher's test top-1 and
that control's at the same epochs) minus the point's top-1, in points.

Resumable: every unit (a selection, a pick, a re-distillation, a student start, a
fine-tuned point, a control) is a JSON file in `--cache` (default
~/.cache/hant/recovery/<run-name>/units/), named by a hash of everything it depends on, so a
rerun skips finished units and a changed setting redoes only what it changes; a
fine-tuning in progress checkpoints under --cache/work/ and resumes there. Identical points
of two recipes (e.g. `new` and `pick` when the pick keeps the best plan) are trained once.
`--out` (bench/results/recovery.json) and the plot beside it (recovery.png: top-1 against
epochs, a panel per speedup, a line per recipe, the controls dashed) are rewritten after
every unit, so a long run that stops leaves what it finished.

Time for the demo run on 2 CPU cores (an epoch of 55k images at 64x64 takes a hant student
~230-460 s and the teacher ~900 s, about 30% more with the feature loss): 3 speedups x 5
recipes x 3.75 epochs of fine-tuning (~6 h), two controls of 3.75 epochs (~2 h), ~85 test
evaluations and timings (~1.3 h), picks, re-distillations and selections (~0.5 h): about
10 hours; less when the pick keeps the best plan (`new` and `pick` then share their points).
"""

from __future__ import annotations

import os
import sys

# Before torch: spinning OpenMP workers slow every other process on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not sys.stderr.isatty():  # progress bars into a log file: one line every 30 s, not ten a second
    os.environ.setdefault("TQDM_MININTERVAL", "30")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET = "onnxruntime-cpu"
ABLATIONS = ("pick", "feature", "pick-feature", "no-redistill")
UNIT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way from a selection to a fine-tuned student."""

    name: str
    plan: str  # "k1": the selection's best plan; "picked": the winner of the K-plan pick
    redistill: bool  # start from re-distilled weights (else phase 1's)
    feature_loss: str  # none | nmse | cosine
    ablation: bool = False  # run only up to --ablation-epochs
    sweep: bool = False  # run only at --sweep-epochs and --sweep-speedups
    ce_weight: float | None = None  # label-loss weight; None: --ce-weight or the run's
    lr: float | None = None  # peak fine-tuning LR; None: the run's
    redistill_images: int | None = None  # images per re-distilled layer; None: --redistill-images or the run's
    augment: bool | None = None  # random crop and flip while fine-tuning; None: the run's
    batch_size: int | None = None  # fine-tuning batch; None: the run's
    temperature: float | None = None  # KD temperature; None: the run's
    seed: int | None = None  # seed of fine-tuning's data order and augmentation; None: the run's
    head_fit: bool | None = None  # output layer fitted to the teacher's logits first; None: the run's
    redistill_skips: bool | None = None  # re-distilled layers learn the output after the skips that follow
    # them (distill.redistill_through_skips); None: the run's

    def describe(self) -> str:
        return (f"{'picked of K plans' if self.plan == 'picked' else 'best plan (K=1)'}, "
                f"{'re-distilled' if self.redistill else 'phase-1'} weights, KD + CE"
                + (f" + {self.feature_loss} feature loss" if self.feature_loss != "none" else "")
                + (f", label-loss weight {self.ce_weight:g}" if self.ce_weight is not None else "")
                + (f", LR {self.lr:g}" if self.lr is not None else "")
                + ("" if self.augment is None else ", augmented" if self.augment else ", not augmented")
                + (f", batch {self.batch_size}" if self.batch_size is not None else "")
                + (f", temperature {self.temperature:g}" if self.temperature is not None else "")
                + (f", fine-tuning seed {self.seed}" if self.seed is not None else "")
                + ("" if self.head_fit is None else ", output layer fitted first" if self.head_fit
                   else ", output layer not fitted")
                + (f", {self.redistill_images} images per re-distilled layer" if self.redistill_images else "")
                + ("" if self.redistill_skips is None else ", re-distilled through the skips after each layer"
                   if self.redistill_skips else ", each layer re-distilled to its own output"))


# Recipe fields that override the fine-tuning loop's setting of the same name when set (the
# seed is the run's), with the tag each adds to a loss label.
LOOP_OVERRIDES = (("lr", "lr"), ("batch_size", "bs"), ("temperature", "T"), ("seed", "seed"),
                  ("head_fit", "head"))


def sweep_recipes(new: Recipe, sweep: list[str]) -> list[Recipe]:
    """`new` with one setting changed per entry of `sweep`: "ce=0" (label-loss weight),
    "lr=2e-3" (fine-tuning LR), "rd=8192" (images per re-distilled layer), "fl=cosine"
    (feature loss at the plan's layers, at the feature weight), "aug=0" (fine-tuning
    augmentation off, 1 on), "bs=64" (fine-tuning batch), "t=4" (KD temperature), "seed=1"
    (fine-tuning's data order and augmentation: the spread of one recipe), "head=1" (output
    layer fitted to the teacher's logits before the first step, 0 not), "sk=1" (a re-distilled
    layer learns the teacher's output after the skipped layers that follow it, 0 its own)."""
    out = []
    fields = {"ce": "ce_weight", "lr": "lr", "rd": "redistill_images", "aug": "augment", "bs": "batch_size",
              "t": "temperature", "seed": "seed", "head": "head_fit", "sk": "redistill_skips"}
    whole = {"rd", "bs", "seed"}  # whole numbers, at least 1
    for item in sweep:
        key, _, value = item.partition("=")
        if key == "fl":
            if value not in ("nmse", "cosine") or value == new.feature_loss:
                raise ValueError(f"--sweep fl= takes nmse or cosine, other than new's {new.feature_loss}; "
                                 f"got {item!r}")
            out.append(dataclasses.replace(new, name=f"fl-{value}", sweep=True, feature_loss=value))
            continue
        try:
            v = float(value)
        except ValueError:
            v = None
        if (key not in fields or v is None or (key in whole and (v != int(v) or v < 1))
                or (key in ("aug", "head", "sk") and v not in (0, 1)) or (key in ("lr", "t") and not v > 0)):
            raise ValueError("--sweep entries are ce=W, lr=X, rd=N (images), fl=nmse|cosine, aug=0|1, bs=N, "
                             f"t=X, seed=N, head=0|1 or sk=0|1, got {item!r}")
        value = int(v) if key in whole else bool(v) if key in ("aug", "head", "sk") else v
        out.append(dataclasses.replace(new, name=f"{key}{v:g}", sweep=True, **{fields[key]: value}))
    return out


def make_recipes(feature_loss: str, ablations: list[str]) -> list[Recipe]:
    """`today`, `new` and the chosen ablations of `new` (each one change; one equal to an
    earlier recipe is left out, since its points are that recipe's)."""
    other = "nmse" if feature_loss == "none" else "none"
    variants = {"pick": Recipe("pick", "picked", True, feature_loss, True),
                "feature": Recipe("feature", "k1", True, other, True),
                "pick-feature": Recipe("pick-feature", "picked", True, other, True),
                "no-redistill": Recipe("no-redistill", "k1", False, feature_loss, True)}
    # `today` is the recipe before the recovery work, augmentation included and no head fit,
    # whatever the run says.
    recipes = [Recipe("today", "k1", False, "none", augment=True, head_fit=False), Recipe("new", "k1", True, feature_loss)]
    for a in ablations:
        r = variants[a]
        if all((r.plan, r.redistill, r.feature_loss, r.augment) != (q.plan, q.redistill, q.feature_loss, q.augment)
               for q in recipes):
            recipes.append(r)
    return recipes


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------- the benchmark


class Recovery:
    """The state of one benchmark: run folder, data, teacher, cache of units, results so far."""

    def __init__(self, run: Path, cache: Path, out: Path, args: argparse.Namespace, command: str,
                 log: Callable[[str], None] = print):
        from hant.data import load_data
        from hant.latency import table_id
        from hant.run import Run

        self.run, self.cache, self.out, self.args, self.command, self.log = run, cache, out, args, command, log
        self.the_run = Run(run)
        self.cfg = self.the_run.config
        self.rd = self.the_run.dir
        self.units_dir = cache / "units"
        self.work_dir = cache / "work"
        self.units_dir.mkdir(parents=True, exist_ok=True)
        self.splits = load_data(self.cfg.data)
        d = self.cfg.data
        self.in_shape = (int(d.in_chans), int(d.input_size), int(d.input_size))
        self.teacher = self.the_run.teacher().eval()
        self.teacher_sha = self.the_run.layers_doc.get("checkpoint_sha256")
        self.layer_names = [info.name for info in self.the_run.layers]
        self.table_id = table_id(TARGET, args.batch_size)
        self.recipes = make_recipes(args.feature_loss, args.ablations)
        self.recipes += sweep_recipes(self.recipes[1], args.sweep)
        self.t0 = time.perf_counter()
        self.test = self.splits.test
        if args.test_images is not None:
            from torch.utils.data import Subset

            self.test = Subset(self.test, range(min(int(args.test_images), len(self.test))))
        # Results so far, filled as units finish or are read back.
        self.teacher_d: dict | None = None
        self.plans: dict[float, dict] = {}  # speedup -> {"select", "pick", "redistill": {which: record}}
        self.points: dict[tuple[str, float, float], dict] = {}  # (recipe, speedup, epochs) -> unit record
        self.controls: dict[tuple[str, float], dict] = {}  # (loss label, epochs) -> unit record
        self.used_units: set[str] = set()
        self._starts: dict[str, nn.Module] = {}  # start key -> assembled student (in memory, copied per point)
        self._target = None
        self._teacher_prepared = None

    # --- settings every key includes -------------------------------------------------------

    def base_settings(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"version": UNIT_VERSION, "teacher_sha256": self.teacher_sha, "seed": self.cfg.seed,
                "data": {"spec": d.spec, "input_size": d.input_size, "heldout": d.heldout, "seed": d.seed,
                         "train": len(self.splits.train), "test": len(self.test)}}

    def finetune_settings(self, loss: dict[str, Any]) -> dict[str, Any]:
        ft = self.cfg.finetune
        out = {"lr": ft.lr, "weight_decay": ft.weight_decay, "batch_size": ft.batch_size, "kd_weight": ft.kd_weight,
               "temperature": ft.temperature, "warmup": ft.warmup, "augment": ft.augment, "head_fit": ft.head_fit,
               **loss}
        if not out["head_fit"]:
            del out["head_fit"]  # only when on: units made before the head fit keep their keys
        return out

    def loss_of(self, recipe: Recipe) -> dict[str, Any]:
        """The fine-tuning loss of a recipe: what its cfg.finetune overrides."""
        a, ft = self.args, self.cfg.finetune
        ce = recipe.ce_weight if recipe.ce_weight is not None else a.ce_weight if a.ce_weight is not None \
            else ft.ce_weight
        loss = {"feature_loss": recipe.feature_loss, "ce_weight": float(ce)}
        if recipe.feature_loss != "none":
            loss["feature_weight"] = float(a.feature_weight if a.feature_weight is not None else ft.feature_weight)
        # Each of these overrides the run's value in the settings (finetune_settings).
        augment = recipe.augment if recipe.augment is not None else None if a.augment is None else a.augment == "on"
        if augment is not None and augment != ft.augment:  # the run's own setting keeps the keys it had
            loss["augment"] = augment
        loss.update({key: getattr(recipe, key) for key, _ in LOOP_OVERRIDES if getattr(recipe, key) is not None})
        return loss

    @staticmethod
    def loss_label(loss: dict[str, Any]) -> str:
        label = f"kd+ce{loss['ce_weight']:g}"
        if loss["feature_loss"] != "none":
            label += f"+{loss['feature_loss']}{loss['feature_weight']:g}"
        if "lr" in loss:
            label += f"-lr{loss['lr']:g}"
        if "augment" in loss:
            label += "-aug" if loss["augment"] else "-noaug"
        return label + "".join(f"-{tag}{loss[key]:g}" for key, tag in LOOP_OVERRIDES if key != "lr" and key in loss)

    def cfg_with(self, loss: dict[str, Any]):
        fields = ("feature_weight", "augment", *(key for key, _ in LOOP_OVERRIDES if key != "seed"))
        ft = dataclasses.replace(self.cfg.finetune, feature_loss=loss["feature_loss"], ce_weight=loss["ce_weight"],
                                 **{k: loss[k] for k in fields if k in loss})
        return dataclasses.replace(self.cfg, finetune=ft, seed=loss.get("seed", self.cfg.seed))

    # --- the cache of units ----------------------------------------------------------------

    def _path(self, unit: str) -> Path:
        return self.units_dir / f"{unit}.json"

    def cached(self, unit: str, key: str) -> dict | None:
        path = self._path(unit)
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            self.log(f"[recovery] {unit}: cached file unreadable; redoing it")
            return None
        if d.get("key") != key or not d.get("complete"):
            self.log(f"[recovery] {unit}: cached with other settings; redoing it")
            return None
        return d

    def unit(self, unit: str, settings: dict[str, Any], make: Callable[[], dict],
             valid: Callable[[dict], bool] | None = None, only_cached: bool = False) -> dict | None:
        """The cached record of `unit` made with `settings`, else make() timed, saved and the
        results rewritten (with `only_cached`, None instead). `valid(record)` may reject a
        cached record whose artifacts are gone."""
        key = digest(settings)
        d = self.cached(unit, key) if not only_cached or self._path(unit).exists() else None
        if d is not None and (valid is None or valid(d)):
            self.used_units.add(unit)
            return d
        if only_cached:
            return None
        self.used_units.add(unit)
        self.log(f"[recovery] {unit} ...")
        t0 = time.perf_counter()
        d = make()
        d = {"unit": unit, "key": key, **d, "settings": settings, "complete": True,
             "cost_s": round(time.perf_counter() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        from hant.workspace import atomic_write_text

        atomic_write_text(self._path(unit), json.dumps(d, indent=1, default=str) + "\n")
        self.log(f"[recovery] {unit}: done in {d['cost_s']:.0f} s"
                 + (f", top-1 {d['top1']:.2f}%" if d.get("top1") is not None else ""))
        self.write_outputs()
        return d

    # --- helpers ---------------------------------------------------------------------------

    def scored(self, model: nn.Module) -> dict[str, Any]:
        """{"top1", "test_right"}: test top-1 and which images the model gets right
        (hant.paired.pack), so that drops can be compared image by image."""
        from hant.data import make_loader
        from hant.paired import pack, predictions

        model.eval().to(memory_format=torch.channels_last)
        try:
            right = predictions(model, make_loader(self.test, self.cfg.finetune.batch_size,
                                                   num_workers=self.cfg.data.workers)).right
        finally:
            model.to(memory_format=torch.contiguous_format)
        return {"top1": 100.0 * int(right.sum()) / right.numel(), "test_right": pack(right)}

    def target(self):
        if self._target is None:
            from hant.latency import get_target
            from hant.latency.compare import resolve_target

            tid, batch, threads = resolve_target(self.run, {"target": self.table_id,
                                                            "batch_size": self.args.batch_size})
            self._target = get_target(tid, batch_size=batch, threads=threads or self.cfg.latency.threads)
        return self._target

    def protocol(self):
        from hant.latency import Protocol

        over = {}
        if self.args.max_repeats is not None:
            over["max_repeats"] = self.args.max_repeats
            over["min_repeats"] = min(self.cfg.latency.min_repeats, self.args.max_repeats)
        if self.args.time_cap is not None:
            over["time_cap_s"] = self.args.time_cap
        return Protocol.from_config(self.cfg.latency, seed=self.cfg.seed, **over)

    def time_student(self, model: nn.Module) -> dict[str, Any]:
        """`model` and the teacher timed interleaved on the plan's target (the protocol of
        `hant.measure`): medians with intervals and the speedup with its interval."""
        from hant.latency.compare import prepare_network, time_against_teacher

        target = self.target()
        if self._teacher_prepared is None:  # exported once, reused by every timing
            self._teacher_prepared = prepare_network(target, copy.deepcopy(self.teacher), self.in_shape)
        load0 = os.getloadavg()
        cmp = time_against_teacher(self._teacher_prepared, {"student": copy.deepcopy(model).eval()}, target,
                                   self.in_shape, self.protocol())
        t, s = cmp.teacher, cmp.stats["student"]
        sp = cmp.speedups["student"]
        return {"measured_speedup": sp.ratio if sp else None, "speedup_ci_lo": sp.lo if sp else None,
                "speedup_ci_hi": sp.hi if sp else None, "teacher_ms": t.median_ms,
                "teacher_ci_ms": [t.ci_lo_ms, t.ci_hi_ms], "student_ms": s.median_ms,
                "student_ci_ms": [s.ci_lo_ms, s.ci_hi_ms], "timing_n": [t.n, s.n],
                "timing_converged": [t.converged, s.converged], "loadavg": [load0, os.getloadavg()],
                "timing": {"target_id": target.id, "batch_size": self.args.batch_size, "threads": target.threads,
                           "clock": target.clock, "protocol": cmp.protocol.to_dict()}}

    def plan_file(self, name: str, doc: dict) -> None:
        """Write RUN/plans/<name>.json unless it is there with the same layers (a plan file the
        stages have added to, e.g. an alternative's hardware check, is kept)."""
        from hant.errors import HantError
        from hant.workspace import read_json, write_json

        path = self.rd.plan(name)
        if path.exists():
            try:
                if read_json(path).get("layers") == doc["layers"]:
                    return
            except HantError:  # a damaged file is rewritten
                pass
        write_json(path, doc)

    # --- stages ----------------------------------------------------------------------------

    def ensure_table(self) -> None:
        from hant.latency import covers_pools, measure_table, table_path

        path = table_path(self.run, TARGET, self.args.batch_size)
        if path.exists() and covers_pools(json.loads(path.read_text()), self.the_run.pools):
            return
        self.log(f"[recovery] latency table {TARGET} batch {self.args.batch_size} (missing, unfinished or "
                 "without some of the run's candidates)")
        measure_table(self.run, target=TARGET, batch_size=self.args.batch_size, validate=self.args.validate,
                      progress=sys.stderr.isatty(), log=self.log)

    def teacher_unit(self) -> dict:
        from hant.student import count_params_flops

        def make():
            p, f = count_params_flops(self.teacher, self.in_shape)
            return {**self.scored(self.teacher), "params": p, "flops": f}

        self.teacher_d = self.unit("teacher", self.base_settings(), make)
        return self.teacher_d

    def base_name(self, s: float) -> str:
        return f"recovery-b{self.args.batch_size}-x{s:g}"

    def select_unit(self, s: float, cap: float | None) -> dict:
        """The hardware-checked selection of speedup s with K plans; the best is the K = 1 plan."""
        from hant.measure import time_plan
        from hant.speedup import OVERSHOOT
        from hant.select import select_measured
        from hant.workspace import sha256_file

        a = self.args
        name = self.base_name(s)
        settings = {**self.base_settings(), "speedup": s, "table": self.table_id,
                    "table_sha256": sha256_file(self.rd.latency_table(self.table_id)),
                    "scores_sha256": sha256_file(self.rd.scores), "candidates": a.candidates,
                    "min_diff": a.min_diff, "check_rounds": a.check_rounds, "budget_cap_ms": cap,
                    "overshoot": OVERSHOOT}

        def make():
            def timer(r, n):
                return time_plan(r, n, log=self.log)

            plan = select_measured(self.run, self.table_id, speedup=s, name=name, timer=timer,
                                   rounds=a.check_rounds, max_budget_ms=cap, log=self.log,
                                   candidates=a.candidates, min_diff=a.min_diff)
            alts = [{k: v for k, v in alt.items() if k != "path"} for alt in plan.get("alternatives") or []]
            best = {k: v for k, v in plan.items() if k not in ("path",)}
            best["alternatives"] = [x["name"] for x in alts]
            last = plan["latency_check"]["rounds"][-1]
            return {"plan": name, "best": best, "alternatives": alts, "layers": plan["layers"],
                    "budget_ms": plan["budget_ms"], "check_speedup": last["speedup"],
                    "check_speedup_ci": [last["speedup_ci_lo"], last["speedup_ci_hi"]],
                    "check_met": plan["latency_check"]["met"]}

        return self.unit(f"select-b{a.batch_size}-x{s:g}", settings, make)

    def restore_selection(self, sel: dict) -> None:
        """Make RUN/plans hold the selection `sel` records (the pick reads it from there): the
        alternatives, and the best plan under its name unless a pick of this selection has
        replaced it (then <name>-alt0 holds the best)."""
        from hant.pick import original_name
        from hant.workspace import read_json, write_json

        name = sel["plan"]
        for alt in sel["alternatives"]:
            self.plan_file(alt["name"], alt)
        path = self.rd.plan(name)
        if path.exists():
            cur = read_json(path)
            if "picked_from" not in cur and cur.get("layers") == sel["layers"]:
                return
            alt0 = self.rd.plan(original_name(name))
            if "picked_from" in cur and alt0.exists() and read_json(alt0).get("layers") == sel["layers"]:
                return
        write_json(path, sel["best"])

    def pick_unit(self, s: float, sel: dict) -> dict:
        from hant.measure import time_plan
        from hant.pick import check_alternatives, pick_plan

        a = self.args
        images = int(a.pick_images if a.pick_images is not None else self.cfg.finetune.pick_images)
        settings = {**self.base_settings(), "selection": sel["key"], "images": images,
                    "finetune": self.finetune_settings({"feature_loss": self.cfg.finetune.feature_loss,
                                                        "ce_weight": self.cfg.finetune.ce_weight})}

        def make():
            self.restore_selection(sel)
            name = sel["plan"]
            checks = []
            if sel["alternatives"]:
                checks = check_alternatives(self.run, name, timer=lambda r, n: time_plan(r, n, log=self.log),
                                            speedup=s, log=self.log)
            doc = pick_plan(self.run, name, images=images, log=self.log)
            winner = doc.get("winner") or name
            ranking = doc.get("ranking") or []
            win = next((e for e in ranking if e["name"] == winner), None)
            layers = win["layers"] if win else sel["layers"]
            summary = [{k: e.get(k) for k in ("name", "rank", "rank_assembled", "heldout_loss", "heldout_top1",
                                              "measured_speedup", "steps", "train_images", "time_s")}
                       | {"assembled_heldout_loss": (e.get("assembled") or {}).get("heldout_loss"),
                          "assembled_heldout_top1": (e.get("assembled") or {}).get("heldout_top1")}
                       for e in ranking]
            return {"winner": winner, "layers": layers, "same_as_best": layers == sel["layers"],
                    "alternative_checks": checks, "skipped": doc.get("skipped") or [], "ranking": summary,
                    "teacher": doc.get("teacher"), "images": images,
                    "winner_measured_speedup": (win or {}).get("measured_speedup", sel["check_speedup"])}

        return self.unit(f"pick-b{a.batch_size}-x{s:g}", settings, make)

    def default_redistill_images(self) -> int:
        a = self.args
        return int(a.redistill_images if a.redistill_images is not None else self.cfg.distill.redistill_images)

    def default_redistill_skips(self) -> bool:
        return bool(self.cfg.distill.redistill_through_skips)

    def redistill_key(self, r: Recipe) -> str:
        """Where a recipe's re-distillation sits in a speedup's plans entry."""
        images = r.redistill_images or self.default_redistill_images()
        skips = self.default_redistill_skips() if r.redistill_skips is None else r.redistill_skips
        return (r.plan + ("" if images == self.default_redistill_images() else f"@{images}")
                + ("" if skips == self.default_redistill_skips() else f"+sk{int(skips)}"))

    def redistill_unit(self, s: float, layers: dict[str, str], images: int | None = None,
                       skips: bool | None = None) -> dict:
        """Re-distillation of a plan's layers, once per distinct set of layers, image count and
        skip targets, under the plan name <base>-rd-<hash of the layers> (-rd<images>- when not
        the default image count, -rd..sk0/1- when not the default targets), so `assemble` finds
        the weights by that name."""
        from hant.redistill import redistill
        from hant.student import TEACHER_SPEC

        default = self.default_redistill_images()
        images = int(images or default)
        skips = self.default_redistill_skips() if skips is None else bool(skips)
        index = self.the_run.candidate_index()
        phase1 = {n: (index.get((n, sp)) or {}).get("sha256") for n, sp in layers.items() if sp != TEACHER_SPEC}
        tag = (f"{'' if images == default else images}"
               + ("" if skips == self.default_redistill_skips() else f"sk{int(skips)}"))
        name = f"{self.base_name(s)}-rd{tag}-{digest(layers, 8)}"
        dc = self.cfg.distill
        settings = {**self.base_settings(), "plan": name, "layers": layers, "phase1": phase1, "images": images,
                    "distill": {"lr": dc.lr, "batch_size": dc.batch_size, "optimizer": dc.optimizer,
                                "weight_decay": dc.weight_decay, "heldout_images": dc.heldout_images},
                    "bn_batches": self.cfg.finetune.bn_batches,
                    **({"through_skips": True} if skips else {})}  # only when on: older units keep their keys

        def make():
            self.plan_file(name, {"version": 1, "name": name, "target": self.table_id,
                                  "batch_size": self.args.batch_size, "layers": layers,
                                  "note": "written by bench/recovery.py: the layers re-distilled for its recipes"})
            doc = redistill(self.run, name, images=images, log=self.log, through_skips=skips)
            held = doc.get("heldout") or {}
            n = max(1, len(held.get("before") or {}))
            return {"plan": name, "layers": layers, "images": images, "through_skips": skips,
                    "targets": {e["layer"]: e["target"] for e in doc.get("entries") or [] if e.get("target")},
                    "entries": {e["layer"]: e["sha256"] for e in doc.get("entries") or []},
                    "heldout_nmse_before": held.get("before"), "heldout_nmse_after": held.get("after"),
                    "mean_heldout_nmse_before": sum((held.get("before") or {}).values()) / n,
                    "mean_heldout_nmse_after": sum((held.get("after") or {}).values()) / n,
                    "trained": doc.get("trained"), "wall_s": round(doc.get("wall_s", 0.0), 1)}

        def valid(d: dict) -> bool:
            path = self.rd.redistilled_dir(d["plan"]) / "index.json"
            if not path.exists():
                self.log(f"[recovery] re-distilled weights of {d['plan']} are gone from the run folder; redoing them")
                return False
            doc = json.loads(path.read_text())
            ok = doc.get("complete") and {e["layer"]: e["sha256"] for e in doc.get("entries") or []} == d["entries"]
            if not ok:
                self.log(f"[recovery] re-distilled weights of {d['plan']} differ from the cached record; redoing them")
            return bool(ok)

        return self.unit(f"redistill-{name}", settings, make, valid)

    # --- students --------------------------------------------------------------------------

    def start_settings(self, layers: dict[str, str], rd: dict | None) -> dict[str, Any]:
        """What an assembled student depends on: its layers and the weights they start from."""
        from hant.student import TEACHER_SPEC

        if rd is not None:
            weights = {"redistilled": rd["plan"], "sha256": rd["entries"]}
        else:
            index = self.the_run.candidate_index()
            weights = {"phase1": {n: (index.get((n, sp)) or {}).get("sha256")
                                  for n, sp in layers.items() if sp != TEACHER_SPEC}}
        return {**self.base_settings(), "layers": layers, "weights": weights,
                "bn_batches": self.cfg.finetune.bn_batches, "bn_batch_size": self.cfg.finetune.batch_size}

    def start_model(self, layers: dict[str, str], rd: dict | None) -> nn.Module:
        """The assembled, BatchNorm-recalibrated student (once per start, copied for each point)."""
        from hant.errors import HantError
        from hant.student import assemble

        key = digest(self.start_settings(layers, rd))
        if key not in self._starts:
            plan = {"name": rd["plan"], "layers": layers} if rd is not None else {"layers": layers}
            model = assemble(self.run, plan, bn_recalibrate=True, splits=self.splits, log=self.log,
                             redistilled=rd is not None)
            got = model.hant_arch.get("candidate_weights")
            if rd is not None and rd["entries"] and got != "redistilled":
                raise HantError(f"assembling {rd['plan']} gave {got} weights, not the re-distilled ones; "
                                f"delete {self._path('redistill-' + rd['plan'])} and rerun")
            self._starts[key] = model
        return copy.deepcopy(self._starts[key])

    def point_unit(self, recipe: Recipe, s: float, epochs: float, layers: dict[str, str], rd: dict | None,
                   plan_info: dict, only_cached: bool = False) -> dict | None:
        """One point of a curve: the start (epochs 0) or its own fine-tuning of `epochs` epochs
        (with `only_cached`, the point if it is cached, else None)."""
        from hant.kd import finetune_module
        from hant.student import count_params_flops, save_student

        a = self.args
        start = self.start_settings(layers, rd)
        loss = self.loss_of(recipe)
        if epochs == 0:
            settings, unit = start, f"start-{digest(start, 12)}"
        else:
            settings = {"start": digest(start), "epochs": epochs, "finetune": self.finetune_settings(loss)}
            unit = f"ft-e{epochs:g}-{digest(settings, 12)}"

        def make():
            model = self.start_model(layers, rd)
            out: dict[str, Any] = {"layers": layers, "candidate_weights": model.hant_arch.get("candidate_weights"),
                                   "redistilled_plan": rd["plan"] if rd else None, "epochs": epochs}
            if epochs > 0:
                work = self.work_dir / unit
                res = finetune_module(model, self.teacher, self.cfg_with(loss), self.splits.train, epochs=epochs,
                                      out_dir=work, key=unit, log=self.log)
                out["loss"] = loss
                out["finetune"] = {k: res.get(k) for k in ("steps", "batch_size", "final_loss", "time_s", "history",
                                                          "head_fit")}
                out["finetune"]["train_images_seen"] = res["steps"] * res["batch_size"]
            out.update(self.scored(model))
            out.update(self.time_student(model))
            out["params"], out["flops"] = count_params_flops(model, self.in_shape)
            if a.keep_weights:
                folder = self.cache / "weights" / unit
                save_student(model, folder, model.hant_arch)
                out["weights"] = str(folder)
            if epochs > 0:
                shutil.rmtree(self.work_dir / unit, ignore_errors=True)  # the checkpoint (weights + optimiser)
            return out

        d = self.unit(unit, settings, make, only_cached=only_cached)
        if d is not None:
            self.points[(recipe.name, s, epochs)] = {**d, "plan_info": plan_info}
        return d

    def control_unit(self, loss: dict[str, Any], epochs: float, only_cached: bool = False) -> dict | None:
        """The teacher fine-tuned with `loss` for `epochs` (the feature loss, when on, at every
        replaceable layer of the run); with `only_cached`, None unless it is cached."""
        from hant.kd import finetune_module

        label = self.loss_label(loss)
        # The teacher's own output layer gives its logits exactly (KL 0, which no refit lowers),
        # so `hant.headfit` keeps it: a recipe's control with the head fit is the one without.
        loss = {k: v for k, v in loss.items() if k != "head_fit"}
        ft_settings = {k: v for k, v in self.finetune_settings(loss).items() if k != "head_fit"}
        settings = {**self.base_settings(), "control": True, "epochs": epochs, "finetune": ft_settings,
                    "feature_layers": self.layer_names if loss["feature_loss"] != "none" else []}
        unit = f"control-{self.loss_label(loss)}-e{epochs:g}-{digest(settings, 12)}"

        def make():
            model = copy.deepcopy(self.teacher)
            layers = self.layer_names if loss["feature_loss"] != "none" else None
            cfg = self.cfg_with(loss)
            cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, head_fit=False))
            res = finetune_module(model, self.teacher, cfg, self.splits.train, epochs=epochs,
                                  out_dir=self.work_dir / unit, key=unit, log=self.log, feature_layers=layers)
            scored = self.scored(model)
            shutil.rmtree(self.work_dir / unit, ignore_errors=True)
            return {"loss": loss, "epochs": epochs, **scored,
                    "finetune": {k: res.get(k) for k in ("steps", "batch_size", "final_loss", "time_s", "history")}}

        d = self.unit(unit, settings, make, only_cached=only_cached)
        if d is not None:
            self.controls[(label, epochs)] = d
        return d

    # --- the flow --------------------------------------------------------------------------

    def plans_for(self, s: float, cap: float | None) -> float | None:
        """Selection, pick and re-distillations of speedup s; returns the budget for the next cap."""
        needs_pick = any(r.plan == "picked" for r in self.recipes)
        sel = self.select_unit(s, cap)
        entry: dict[str, Any] = {"select": sel, "pick": None, "redistill": {}}
        self.plans[s] = entry
        picked = sel["layers"]
        if needs_pick:
            entry["pick"] = self.pick_unit(s, sel)
            picked = entry["pick"]["layers"]
        entry["layers"] = {"k1": sel["layers"], "picked": picked}
        for r in self.recipes:
            key = self.redistill_key(r)
            if not any(self.runs_at(r, s, e) for e in self.args.epochs):
                continue
            if r.redistill and key not in entry["redistill"]:
                entry["redistill"][key] = self.redistill_unit(s, entry["layers"][r.plan], r.redistill_images,
                                                              r.redistill_skips)
        self.write_outputs()
        return sel["budget_ms"]

    def run_all(self) -> None:
        a = self.args
        self.ensure_table()
        self.teacher_unit()
        cap = None
        for s in sorted(a.speedups):  # ascending, each capped by the budget before it (as the pipeline does)
            budget = self.plans_for(s, cap)
            if budget is not None:
                cap = budget if cap is None else min(cap, budget)
        losses = {}
        for r in self.recipes:
            loss = self.loss_of(r)
            losses[self.loss_label(loss)] = loss
        # Every point and control already cached, so that the results show them from the start.
        for e in sorted(a.epochs):
            for label, loss in losses.items():
                if e > 0:
                    self.control_unit(loss, e, only_cached=True)
            for s in sorted(a.speedups):
                for r in self.recipes:
                    if self.runs_at(r, s, e):
                        self.point(r, s, e, only_cached=True)
        self.write_outputs()
        # `today`, `new` and the sweep (at its epochs and speedups) over every epoch count first,
        # then the ablations up to --ablation-epochs; each pass by epochs ascending, so a run
        # that stops early has every recipe of the pass at the smaller budgets.
        for ablation in (False, True):
            for e in sorted(a.epochs):
                recipes = [r for r in self.recipes if r.ablation == ablation and (not a.only or r.name in a.only)
                           and any(self.runs_at(r, s, e) for s in a.speedups)]
                if not recipes:
                    continue
                # The students before their controls: a run that stops early has the points,
                # measured against the teacher until their controls are done.
                for s in sorted(a.speedups):
                    for r in recipes:
                        if self.runs_at(r, s, e):
                            self.point(r, s, e)
                if e > 0:
                    for label in dict.fromkeys(self.loss_label(self.loss_of(r)) for r in recipes):
                        self.control_unit(losses[label], e)
        self.write_outputs()

    def runs_at(self, r: Recipe, s: float, e: float) -> bool:
        """Whether recipe r has a point at speedup s after e epochs."""
        a = self.args
        if r.ablation:
            return e <= a.ablation_epochs
        if r.sweep:
            return e in a.sweep_epochs and s in a.sweep_speedups
        return True

    def point(self, r: Recipe, s: float, e: float, only_cached: bool = False) -> dict | None:
        """Recipe r's point at speedup s after e epochs (see point_unit)."""
        p = self.plans[s]
        rd = p["redistill"].get(self.redistill_key(r)) if r.redistill else None
        info = {"which": r.plan, "plan": (p["pick"] or {}).get("winner") if r.plan == "picked"
                else p["select"]["plan"]}
        return self.point_unit(r, s, e, p["layers"][r.plan], rd, info, only_cached=only_cached)

    # --- results ---------------------------------------------------------------------------

    def paired(self, recipe: Recipe, epochs: float, d: dict) -> dict[str, Any] | None:
        """The point's drop from its reference image by image (hant.paired.compare):
        {"drop", "ci95"}, or None when either was scored before images were kept."""
        from hant.paired import compare, unpack

        ref = self.reference(recipe, epochs)
        holder = self.control_of(recipe, epochs) if ref["reference"] == "control" else self.teacher_d
        if not holder or "test_right" not in holder or "test_right" not in d:
            return None
        r = compare(unpack(holder["test_right"]), unpack(d["test_right"]))
        return {"drop": r["drop"], "ci95": r["drop_ci95"]}

    def control_of(self, recipe: Recipe, epochs: float) -> dict | None:
        """The control unit of the recipe's loss at `epochs`, when it is made."""
        return self.controls.get((self.loss_label(self.loss_of(recipe)), epochs))

    def reference(self, recipe: Recipe, epochs: float) -> dict[str, Any]:
        """The better of the teacher and the control (same loss, same epochs)."""
        t = self.teacher_d["top1"] if self.teacher_d else None
        if epochs == 0:
            return {"reference_top1": t, "reference": "teacher", "control_top1": t}
        c = self.control_of(recipe, epochs)
        ct = c["top1"] if c else None
        if t is None:
            return {"reference_top1": ct, "reference": "control" if ct is not None else None, "control_top1": ct}
        if ct is None:
            return {"reference_top1": t, "reference": "teacher (control not yet run)", "control_top1": None}
        return {"reference_top1": max(t, ct), "reference": "control" if ct > t else "teacher", "control_top1": ct}

    def results(self) -> dict[str, Any]:
        a = self.args
        curves: dict[str, dict[str, list]] = {}
        for r in self.recipes:
            per = curves.setdefault(r.name, {})
            for s in sorted(a.speedups):
                rows = []
                for e in sorted(a.epochs):
                    d = self.points.get((r.name, s, e))
                    if d is None:
                        continue
                    ref = self.reference(r, e)
                    drop = (ref["reference_top1"] - d["top1"]) if ref["reference_top1"] is not None else None
                    rows.append({
                        "epochs": e, "top1": d["top1"], "drop": drop, "drop_paired": self.paired(r, e, d), **ref,
                        "teacher_top1": self.teacher_d["top1"] if self.teacher_d else None,
                        "measured_speedup": d.get("measured_speedup"), "speedup_ci": [d.get("speedup_ci_lo"),
                                                                                      d.get("speedup_ci_hi")],
                        "teacher_ms": d.get("teacher_ms"), "student_ms": d.get("student_ms"),
                        "plan": d["plan_info"]["plan"], "plan_kind": d["plan_info"]["which"],
                        "candidate_weights": d.get("candidate_weights"), "loss": self.loss_of(r),
                        "steps": (d.get("finetune") or {}).get("steps", 0),
                        "train_images_seen": (d.get("finetune") or {}).get("train_images_seen", 0),
                        "final_loss": (d.get("finetune") or {}).get("final_loss"),
                        "params": d.get("params"), "flops": d.get("flops"), "unit": d["unit"],
                        "cost_s": d.get("cost_s")})
                per[f"{s:g}"] = rows
        controls: dict[str, Any] = {}
        for (label, e), d in sorted(self.controls.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            c = controls.setdefault(label, {"loss": d["loss"], "used_by": [r.name for r in self.recipes
                                                                             if self.loss_label(self.loss_of(r)) == label],
                                            "feature_layers": "all replaceable layers of the run"
                                            if d["loss"]["feature_loss"] != "none" else None,
                                            "points": [{"epochs": 0.0, "top1": self.teacher_d["top1"] if self.teacher_d
                                                        else None, "what": "the teacher"}]})
            c["points"].append({"epochs": e, "top1": d["top1"], "steps": d["finetune"]["steps"],
                                "final_loss": d["finetune"]["final_loss"], "unit": d["unit"],
                                "cost_s": d.get("cost_s")})
        best = {}
        for r in self.recipes:
            ok = [(s, row) for s, rows in curves[r.name].items() for row in rows
                  if row["epochs"] == a.at_epochs and row["drop"] is not None and row["drop"] <= a.max_drop
                  and row["measured_speedup"] is not None]
            if ok:
                s, row = max(ok, key=lambda x: x[1]["measured_speedup"])
                best[r.name] = {"speedup_asked": float(s), "measured_speedup": row["measured_speedup"],
                                "speedup_ci": row["speedup_ci"], "top1": row["top1"], "drop": row["drop"],
                                "drop_ci95": (row["drop_paired"] or {}).get("ci95"), "epochs": a.at_epochs}
            else:
                best[r.name] = None
        plans = {}
        for s, p in sorted(self.plans.items()):
            sel, pick = p["select"], p.get("pick")
            plans[f"{s:g}"] = {
                "k1": {"plan": sel["plan"], "layers": sel["layers"], "budget_ms": sel["budget_ms"],
                       "check_speedup": sel["check_speedup"], "check_speedup_ci": sel["check_speedup_ci"],
                       "check_met": sel["check_met"], "alternatives": [x["name"] for x in sel["alternatives"]]},
                "picked": None if pick is None else {
                    "winner": pick["winner"], "layers": pick["layers"], "same_as_k1": pick["same_as_best"],
                    "images": pick["images"], "ranking": pick["ranking"], "skipped": pick["skipped"]},
                "redistill": {w: {"plan": d["plan"], "images": d["images"],
                                  "mean_heldout_nmse_before": d["mean_heldout_nmse_before"],
                                  "mean_heldout_nmse_after": d["mean_heldout_nmse_after"]}
                              for w, d in p["redistill"].items()}}
        costs = {}
        for f in self.units_dir.glob("*.json"):
            if f.stem in self.used_units:
                try:
                    costs[f.stem] = json.loads(f.read_text()).get("cost_s") or 0.0
                except (OSError, ValueError):
                    pass
        return {
            "version": 1,
            **({"note": a.note} if a.note else {}),
            "command": self.command,
            "run": str(self.run),
            "model": self.cfg.model.source,
            "data": self.cfg.data.spec,
            "input_size": list(self.in_shape),
            "space": self.cfg.space,
            "target": TARGET,
            "batch_size": a.batch_size,
            "table": self.table_id,
            "teacher_top1": self.teacher_d["top1"] if self.teacher_d else None,
            "test_images": len(self.test),
            "train_images": len(self.splits.train),
            "speedups": sorted(a.speedups),
            "epochs": sorted(a.epochs),
            "recipes": {r.name: {"plan": r.plan, "redistill": r.redistill, "feature_loss": r.feature_loss,
                                 "ablation": r.ablation, "sweep": r.sweep,
                                 "loss": self.loss_of(r), "description": r.describe()} for r in self.recipes},
            "settings": {"candidates": a.candidates, "min_diff": a.min_diff, "check_rounds": a.check_rounds,
                         "pick_images": int(a.pick_images if a.pick_images is not None
                                            else self.cfg.finetune.pick_images),
                         "redistill_images": int(a.redistill_images if a.redistill_images is not None
                                                 else self.cfg.distill.redistill_images),
                         "redistill_through_skips": self.default_redistill_skips(),
                         "finetune": self.finetune_settings({}), "bn_batches": self.cfg.finetune.bn_batches,
                         "timing_protocol": self.protocol().to_dict(), "max_drop": a.max_drop,
                         "at_epochs": a.at_epochs, "ablation_epochs": a.ablation_epochs,
                         "cache": str(self.cache)},
            "curves": curves,
            "controls": controls,
            "plans": plans,
            "best_speedup_within_0_4_at_2_epochs": best,
            **self.small_data(),
            "notes": self.notes(),
            "wall_time_s": round(time.perf_counter() - self.t0, 1),
            "units_cost_s": round(sum(costs.values()), 1),
            "fingerprint": fingerprint(self),
        }

    def small_data(self) -> dict[str, Any]:
        """The small-data case, as bench/small_data.py last wrote it beside --out (its own
        benchmark: a ResNet-18 on a 1,500-image ImageFolder, `hant accelerate` at the defaults)."""
        src = self.out.parent / "small_data.json"
        try:
            d = json.loads(src.read_text())
        except (OSError, ValueError):
            return {"small_data": {}, "small_data_note": f"not measured: run bench/small_data.py (no {src.name} "
                                                         f"beside the results)"}
        keep = ("variant", "distill_images", "speedup_asked", "measured_speedup", "speedup_ci", "top1",
                "top1_assembled", "teacher_top1", "control_top1", "reference_top1", "drop", "wall_s",
                "images_per_candidate")
        return {"small_data": {"teacher_top1": d["small_data"].get("teacher_top1"),
                               "rows": [{k: r.get(k) for k in keep} for r in d["small_data"].get("rows", [])],
                               "goal": d.get("goal"), "command": d.get("command"), "source": src.name},
                "small_data_note": f"copied from {src.name}, written by its own command (bench/small_data.py)"}

    def notes(self) -> list[str]:
        a = self.args
        n = [
            "top1: test top-1 (%) on the run's test split. drop: the better of the teacher's top-1 and the "
            "control's (the teacher fine-tuned with the same loss for the same epochs) minus the point's, in "
            "points; at epochs 0 the reference is the teacher. drop_paired: the same drop with its 95% interval "
            "from the test images only one of the two networks gets right (hant.paired); null for a point or "
            "reference scored before images were kept.",
            "Every point with epochs > 0 is its own fine-tuning schedule (warm-up then cosine over exactly that "
            "many epochs) from the assembled, BatchNorm-recalibrated student; epochs 0 is that student untrained. "
            "Points of different recipes that are the same computation (same layers, starting weights, loss "
            "and epochs) are one unit and share their numbers.",
            "measured_speedup: the teacher's median latency over the student's, both timed interleaved in one "
            "run of the latency protocol (hant.latency.compare.time_against_teacher) on the target at this batch "
            "size; speedup_ci its bootstrap interval.",
            "The pick's short distillations use the run's own fine-tuning loss (finetune section of its config), "
            "whatever the recipe's: hant.pick.pick_plan takes no loss override.",
            f"best_speedup_within_0_4_at_2_epochs: per recipe, the largest measured speedup whose point at "
            f"{a.at_epochs:g} epochs has drop <= {a.max_drop:g} (None when no speedup qualifies or the point "
            "is not there).",
        ]
        if a.at_epochs not in a.epochs:
            n.append(f"--at-epochs {a.at_epochs:g} is not among --epochs; best_speedup_within_0_4_at_2_epochs is "
                     "empty.")
        elif a.at_epochs != 2.0:
            n.append(f"best_speedup_within_0_4_at_2_epochs is taken at {a.at_epochs:g} epochs (--at-epochs), "
                     "not 2.")
        return n

    def write_outputs(self) -> dict[str, Any]:
        from hant.workspace import atomic_write_text

        result = self.results()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(result, indent=1, default=str) + "\n")
        try:
            plot(result, self.out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - a plot never stops the benchmark
            self.log(f"[recovery] plot failed: {e}")
        return result


def fingerprint(bench: Recovery) -> dict[str, Any]:
    import onnxruntime
    import timm

    from hant.latency import cpu_model
    from hant.latency.base import available_cores

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    try:
        target = bench.target()
    except Exception:  # noqa: BLE001 - a fingerprint without the target rather than no results
        target = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_available": available_cores(),
            "torch_threads": torch.get_num_threads(), "latency_threads": target.threads if target else None,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
            "hant_commit": commit, "system": platform.platform(), "teacher_sha256": bench.teacher_sha,
            "teacher_checkpoint": bench.cfg.model.checkpoint, "seed": bench.cfg.seed,
            "latency_target": target.fingerprint() if target else None}


# ----------------------------------------------------------------------------- plot


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hant.workspace import atomic_write_bytes

    speedups = [f"{s:g}" for s in result["speedups"]]
    fig = Figure(figsize=(5.2 * max(1, len(speedups)), 4.4), dpi=120)
    FigureCanvasAgg(fig)
    colors = {"today": "tab:grey", "new": "tab:blue", "pick": "tab:orange", "no-redistill": "tab:green",
              "feature": "tab:purple", "pick-feature": "tab:red"}
    markers = {"today": "s", "new": "o", "pick": "v", "no-redistill": "^", "feature": "D", "pick-feature": "P"}
    sweep_colors = iter(["tab:cyan", "tab:olive", "tab:brown", "tab:pink", "black", "tab:green", "gold"])
    for name, r in result["recipes"].items():
        if name not in colors:
            colors[name] = next(sweep_colors, None)
            markers.setdefault(name, "x" if r.get("sweep") else "o")
    # The controls of the recipes on every panel (the sweep's own controls are in the JSON).
    shown = {label: c for label, c in result["controls"].items()
             if any(not result["recipes"][n].get("sweep") for n in c["used_by"] if n in result["recipes"])}
    control_styles = ["--", "-."]
    for i, s in enumerate(speedups):
        ax = fig.add_subplot(1, len(speedups), i + 1)
        for name, per in result["curves"].items():
            rows = per.get(s) or []
            if not rows:
                continue
            sp = [r["measured_speedup"] for r in rows if r.get("measured_speedup")]
            label = f"{name} ({min(sp):.2f}-{max(sp):.2f}x)" if sp else name
            ax.plot([r["epochs"] for r in rows], [r["top1"] for r in rows], marker=markers.get(name, "o"), ms=5,
                    lw=1.3, color=colors.get(name), label=label)
        for j, (label, c) in enumerate(shown.items()):
            pts = sorted(c["points"], key=lambda p: p["epochs"])
            ax.plot([p["epochs"] for p in pts], [p["top1"] for p in pts], control_styles[j % 2], color="black",
                    lw=1, label=f"control: teacher + {label}")
        if result.get("teacher_top1") is not None:
            ax.axhline(result["teacher_top1"], color="black", lw=0.6, ls=":", label="teacher")
        ax.set_xlabel("fine-tuning epochs (each point its own schedule)")
        ax.set_ylabel("test top-1, %")
        ax.set_title(f"{s}x asked, {result['target']} batch {result['batch_size']}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"accuracy recovery: {result['model']} on {result['data']} "
                 f"({'x'.join(map(str, result['input_size']))})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def table_text(result: dict[str, Any]) -> str:
    lines = [f"teacher top-1 {result['teacher_top1']:.2f}%",
             "| speedup | recipe | epochs | top-1 | drop | reference | measured speedup [95% CI] |",
             "|---:|---|---:|---:|---:|---|---|"]
    for name, per in result["curves"].items():
        for s, rows in per.items():
            for r in rows:
                ci = r["speedup_ci"]
                sp = (f"{r['measured_speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"
                      if r["measured_speedup"] is not None else "n/a")
                drop = f"{r['drop']:+.2f}" if r["drop"] is not None else "n/a"
                lines.append(f"| {s}x | {name} | {r['epochs']:g} | {r['top1']:.2f} | {drop} | {r['reference']} "
                             f"{r['reference_top1']:.2f} | {sp} |")
    for label, c in result["controls"].items():
        lines.append(f"control {label}: " + ", ".join(f"{p['epochs']:g} ep {p['top1']:.2f}%" for p in c["points"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="run folder with phase 1 and scores done (default runs/demo)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the latency target (default 64)")
    p.add_argument("--speedups", type=_floats, default=[2.0, 3.0, 4.0], help="speedups asked (default 2,3,4)")
    p.add_argument("--epochs", type=_floats, default=[0.0, 0.25, 0.5, 1.0, 2.0],
                   help="fine-tuning epochs, each its own schedule; 0 = the assembled student (default 0,0.25,0.5,1,2)")
    p.add_argument("--ablations", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=list(ABLATIONS), help=f"ablations of `new` to run, of {','.join(ABLATIONS)} (default all; "
                                                 "'' for none)")
    p.add_argument("--sweep", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["ce=0", "ce=1", "lr=5e-4", "lr=2e-3", "rd=8192", "fl=cosine"],
                   help="variants of `new` with one setting changed: ce=W (label-loss weight), lr=X (fine-tuning "
                        "LR), rd=N (images per re-distilled layer), fl=nmse|cosine (feature loss), aug=0|1 "
                        "(fine-tuning augmentation), bs=N (fine-tuning batch), t=X (KD temperature) or seed=N "
                        "(fine-tuning's data order and augmentation) (default "
                        "ce=0,ce=1,lr=5e-4,lr=2e-3,rd=8192,fl=cosine; '' for none)")
    p.add_argument("--sweep-epochs", type=_floats, default=[0.0, 0.25], help="epochs of the sweep (0,0.25)")
    p.add_argument("--sweep-speedups", type=_floats, default=[3.0], help="speedups of the sweep (3)")
    p.add_argument("--ablation-epochs", type=float, default=0.5,
                   help="ablations run only at epoch counts up to this (default 0.5)")
    p.add_argument("--feature-loss", default="none", choices=("nmse", "cosine", "none"),
                   help="feature loss of `new` (default none); the `feature` ablations use nmse, or none "
                        "when this is set")
    p.add_argument("--feature-weight", type=float, help="feature-loss weight (default: the run's finetune.feature_weight)")
    p.add_argument("--ce-weight", type=float, help="label-loss weight, every recipe (default: the run's finetune.ce_weight)")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=[],
                   help="recipes to run (with their controls), e.g. new,seed1; the others' cached points are "
                        "shown, none is made (default: every recipe)")
    p.add_argument("--augment", choices=["on", "off"],
                   help="fine-tuning augmentation (random crop and flip), every recipe (default: the run's "
                        "finetune.augment)")
    p.add_argument("--candidates", type=int, default=4, help="K plans selected per speedup for the pick (default 4)")
    p.add_argument("--min-diff", type=float, default=0.2, help="share of layers in which the K plans differ (0.2)")
    p.add_argument("--check-rounds", type=int, default=3, help="hardware re-selection rounds of select_measured (3)")
    p.add_argument("--pick-images", type=int, help="train images of each plan's short distillation in the pick "
                                                    "(default: the run's finetune.pick_images)")
    p.add_argument("--redistill-images", type=int,
                   help="train images per re-distilled layer (default: the run's distill.redistill_images)")
    p.add_argument("--test-images", type=int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--max-repeats", type=int, help="timing: at most this many calls per network (default: the run's)")
    p.add_argument("--time-cap", type=float, help="timing: seconds per timing run (default: the run's)")
    p.add_argument("--validate", type=int, default=10, help="validation networks when the latency table is built")
    p.add_argument("--max-drop", type=float, default=0.4, help="top-1 points a point may lose (0.4)")
    p.add_argument("--at-epochs", type=float, default=2.0, help="epochs at which the best speedup is read (2)")
    p.add_argument("--keep-weights", action="store_true", help="keep every fine-tuned student under CACHE/weights")
    p.add_argument("--cache", help="unit cache (default ~/.cache/hant/recovery/<run-name>)")
    p.add_argument("--out", help="results JSON (default bench/results/recovery.json); the plot goes beside it")
    p.add_argument("--note", help="a note stored in the results under `note`")
    args = p.parse_args(argv)
    try:
        sweep_recipes(Recipe("new", "k1", True, "none"), args.sweep)
    except ValueError as e:
        p.error(str(e))
    bad = [x for x in args.ablations if x not in ABLATIONS]
    if bad:
        p.error(f"unknown ablation {bad[0]}; choose from {', '.join(ABLATIONS)}")
    names = [r.name for r in make_recipes(args.feature_loss, args.ablations)
             + sweep_recipes(Recipe("new", "k1", True, args.feature_loss), args.sweep)]
    bad = [x for x in args.only if x not in names]
    if bad:
        p.error(f"--only names recipe {bad[0]}, which this command does not have; it has {', '.join(names)}")
    if any(e < 0 for e in args.epochs) or not args.speedups or any(s <= 1 for s in args.speedups):
        p.error("--epochs must be >= 0 and --speedups > 1")
    args.epochs = sorted(set(args.epochs))
    run = Path(args.run)
    if not run.is_dir():
        p.error(f"no run folder {run}; `hant demo` makes runs/demo")
    cache = Path(args.cache).expanduser() if args.cache else Path.home() / ".cache" / "hant" / "recovery" / \
        run.resolve().name
    out = Path(args.out) if args.out else RESULTS / "recovery.json"
    command = "bench/recovery.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))

    def log(msg: str) -> None:
        print(msg, flush=True)

    from hant.errors import HantError

    t0 = time.perf_counter()
    try:
        bench = Recovery(run, cache, out, args, command, log)
        log(f"[recovery] run {run}: {bench.cfg.model.source}, input {'x'.join(map(str, bench.in_shape))}, "
            f"{len(bench.splits.train)} train images; recipes {', '.join(r.name for r in bench.recipes)}; "
            f"cache {cache}")
        bench.run_all()
        result = bench.write_outputs()
    except HantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table_text(result))
    print(f"[recovery] {out} and {out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
