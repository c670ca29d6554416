"""The headline benchmark: hant against pruning, a smaller network and quantisation at equal measured latency.

    .venv/bin/python bench/headline.py --run runs/demo         # the full benchmark -> bench/results/headline.*
    .venv/bin/python bench/headline.py --quick --out /tmp/hl   # a tiny end-to-end run in a few minutes

It takes a run folder whose phase 1 and scores are done (`hant demo` leaves one in
runs/demo: EfficientNet-B0 on Fashion-MNIST at 64x64), and on ONNX Runtime (CPU), for
every batch size (64 and 1):

1. builds the latency table with hant's latency stage (kept when it is there);
2. makes hant students at each speedup (`--speedups`, 2x 3x 4x) exactly as `hant accelerate`
   does (`hant.pipeline.accelerate_run`): in ascending order, each plan is selected with
   `hant.select.select_measured`, which times the assembled plan against the teacher
   (`hant.measure.time_plan`) and tightens its budget until the measured speedup is met, at
   most `--check-rounds` times (3; 0: the table's prediction alone, plain `select`), its
   budget capped by the tightest final budget of a smaller speedup at the same batch size;
   the plan's layers are then re-distilled on the student's own inputs
   (`hant.redistill.redistill`; `--no-redistill` skips it) and the student is fine-tuned
   with hant's own stage (`hant.finetune.finetune`). At batch 64 it then bisects the speedup
   for the largest one whose top-1 drop is at most `--max-drop` points (0.4); each speedup
   the bisection tries is capped the same way by the smaller speedups already selected;
3. at each student's *measured* latency (at the first batch size, `--alternatives-at`; at the
   others these networks are timed as they are), trains what a user would otherwise reach
   for, each with the best recipe that applies to it and the same epochs and images:
   - `pruned`: Torch-Pruning, DepGraph with L2 magnitude importance, one pruning ratio for
     every layer (channels rounded to `--prune-round-to`), the ratio searched until the
     measured latency matches the hant student's; fine-tuned with logit distillation (KD on
     the teacher's logits + CE, `hant.kd.kd_loss`) by `hant.kd.finetune_module`,
     the very loop that fine-tunes hant's students (feature distillation does not apply: no
     layer of it has the teacher's shape);
   - `smaller`: the teacher's timm EfficientNet family scaled down by its own compound rule
     (width 1.1^phi, depth 1.2^phi, phi < 0; the resolution is the data's), phi searched the
     same way; from random weights, as no pretrained ones can be downloaded here; the same
     logit distillation through `finetune_module`;
   - `random`: a random feasible plan from hant's pool under the hant plan's final budget
     (`hant.solver.random_feasible`), re-distilled (unless `--no-redistill`) and fine-tuned
     by hant's own stages, as hant's plan is;
   - `hant-int8` (at every batch size): the hant student quantised with ONNX Runtime's static INT8;
4. adds the teacher, the teacher in static INT8, and the control: the teacher fine-tuned
   with the same recipe (so that nothing extra training alone gives is credited to hant);
5. times every network of a batch size in one interleaved run of hant's latency protocol
   (the latency tables' target, threads and clock), and writes
   OUT/headline.json, OUT/headline.md (table) and OUT/headline.png (top-1 vs latency).

Every finished network is a JSON file in OUT/headline_rows/ (its weights under
RUN/headline/ and RUN/students/); a killed benchmark resumes without redoing them, and
fine-tuning resumes inside a network from its last checkpoint. hant's units and plans are
named after the recipe that made them: `hant-hw-b64-x2` and plan `headline-hw-b64-x2`
(hardware-checked and re-distilled), `hw-nord` (checked, not re-distilled), `rd`
(re-distilled, the table's plan), no tag (neither: the recipe before hardware checks, whose
units keep their old names `hant-b64-x2`); a unit records its recipe and is made again when
`--check-rounds` changes. An alternative is named after the hant unit it was matched to
(`pruned-hw-b64-x2`, `random-hw-b64-x2`, `hant-int8-hw-b64-x2`) and is made again when that
student's weights change; the teacher, its INT8 copy and the control do not depend on hant's
recipe and are kept.

Time: on the 2-core development machine the full benchmark's networks took about 1 h 45 min
to make with the recipe before hardware checks (0.5 epochs each; the alternatives dominate).
The hardware checks add one to four interleaved timings per plan (about half a minute each
at batch 64, seconds at batch 1) and re-distillation about a minute per hant and random plan
on the demo run: an estimated 2 h to 2 h 15 min in all (not yet measured). `--quick` takes a
few minutes (`tests/test_headline.py` runs a reduced one, twice, in about 80 s).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET = "onnxruntime-cpu"
# EfficientNet's compound scaling (Tan & Le 2019): depth alpha^phi, width beta^phi.
ALPHA, BETA = 1.2, 1.1
# Width and depth multipliers of timm's EfficientNets (timm.models.efficientnet._gen_efficientnet).
EFFICIENTNET_BASE = {"efficientnet_b0": (1.0, 1.0), "efficientnet_b1": (1.0, 1.1), "efficientnet_b2": (1.1, 1.2),
                     "efficientnet_b3": (1.2, 1.4), "efficientnet_b4": (1.4, 1.8), "efficientnet_b5": (1.6, 2.2),
                     "efficientnet_b6": (1.8, 2.6), "efficientnet_b7": (2.0, 3.1), "test_efficientnet": (1.0, 1.0)}
# The alternatives to hant that --methods picks from.
METHODS = ("random", "pruned", "smaller", "int8")
LABELS = {"teacher": "teacher", "teacher-int8": "teacher, ORT static INT8",
          "teacher-ft": "teacher + same fine-tuning (control)", "hant": "hant", "hant-int8": "hant + ORT static INT8",
          "random": "random plan from hant's pool", "pruned": "Torch-Pruning (DepGraph, L2 magnitude)",
          "smaller": "smaller EfficientNet (compound scaling)"}
# How hant's students were made before plans were checked on the hardware and re-distilled: a
# unit without a "recipe" field was made so.
LEGACY_RECIPE = {"check_rounds": 0, "redistill": False}


def recipe_tag(recipe: dict) -> str:
    """The part of hant's unit and plan names that says how the student was made.

    "hw": plan checked on the hardware and re-distilled (`hant accelerate`'s default);
    "hw-nord": checked, not re-distilled; "rd": the table's plan, re-distilled; "": neither
    (the names units had before hardware checks, so that their cache stays valid).
    """
    if recipe["check_rounds"] > 0:
        return "hw" if recipe["redistill"] else "hw-nord"
    return "rd" if recipe["redistill"] else ""


def budget_cap(budgets: dict[float, float], speedup: float) -> float | None:
    """The budget a plan for `speedup` may not exceed: the tightest final budget of the smaller
    speedups already selected at its batch size (`budgets`: speedup -> budget_ms), None
    when there is none.

    `hant accelerate` selects its speedups in ascending order, each capped by the budget the
    one before it ended with, so that a hardware check that tightened a small speedup's
    budget never leaves a larger speedup with a looser one. The benchmark's bisection also
    tries speedups between known ones; the minimum over every smaller speedup is then the
    cap (with ascending, capped selections it is the largest smaller speedup's budget). A cap
    only ever lowers a budget, and plans already made for larger speedups are left as they are.
    """
    smaller = [float(v) for s, v in budgets.items() if s < speedup and v is not None]
    return min(smaller) if smaller else None


# ----------------------------------------------------------------------------- models of the alternatives


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """The output layers pruning must leave alone: Linear layers with num_classes outputs."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def prune(teacher: nn.Module, ratio: float, input_shape: tuple[int, int, int], num_classes: int,
          round_to: int | None = 8) -> nn.Module:
    """A copy of `teacher` with `ratio` of the channels of every prunable layer removed.

    Torch-Pruning's DepGraph finds the groups of coupled channels (residuals, depthwise
    convolutions, squeeze-excite); each group is ranked by the L2 norm of its weights
    (MagnitudeImportance) and the same share is removed everywhere (no global ranking),
    channel counts rounded to `round_to`. Deterministic for a given teacher.
    """
    import torch_pruning as tp

    model = copy.deepcopy(teacher).cpu().eval()
    if ratio <= 0:
        return model
    example = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=float(ratio), ignored_layers=classifier_layers(model, num_classes),
                                  round_to=round_to or None)
    pruner.step()
    return model.eval()


def scaled_model(source: str, phi: float, in_chans: int, num_classes: int) -> nn.Module:
    """The teacher's timm EfficientNet scaled by compound coefficient `phi` (< 0: smaller), random weights.

    Width multiplier base_w * 1.1^phi, depth multiplier base_d * 1.2^phi (timm rounds
    channels to multiples of 8 and repeats up). Raises HantError for another family.
    """
    from timm.models import efficientnet as effnet

    from hant.errors import HantError

    name = source.split(":", 1)[-1]
    if not source.startswith("timm:") or name not in EFFICIENTNET_BASE:
        raise HantError(f"the smaller-network baseline scales timm EfficientNets ({', '.join(EFFICIENTNET_BASE)}); "
                        f"the teacher is {source}: pass --methods without `smaller`")
    w0, d0 = EFFICIENTNET_BASE[name]
    gen = effnet._gen_test_efficientnet if name == "test_efficientnet" else effnet._gen_efficientnet
    return gen(name, channel_multiplier=w0 * BETA ** phi, depth_multiplier=d0 * ALPHA ** phi, pretrained=False,
               in_chans=in_chans, num_classes=num_classes).eval()


def match_latency(ratio_at: Callable[[float], float], lo: float, hi: float, tol: float = 0.03, steps: int = 7,
                  grow: Callable[[float], float | None] | None = None) -> dict[str, Any]:
    """Find the parameter p in [lo, hi] at which ratio_at(p) = 1.

    ratio_at(p) is a network's latency over the reference's; it falls as p grows (more
    pruning, a smaller network). lo and hi are probed first; while hi is still slower,
    `grow(hi)` gives a larger bound to try (None: out of reach). Then regula falsi on
    log(ratio), falling back to bisection when a step would land in the outer tenth of the
    bracket, until |ratio - 1| <= tol or `steps` probes. Returns {"param", "ratio",
    "reached", "probes": [{"param", "ratio"}]}: the closest probe.
    """
    probes: list[dict[str, float]] = []

    def probe(p: float) -> float:
        r = float(ratio_at(p))
        probes.append({"param": float(p), "ratio": r})
        return math.log(r)

    a, fa = lo, probe(lo)
    if fa <= 0:  # already as fast as the reference at lo
        b, fb = lo, fa
    else:
        b, fb = hi, probe(hi)
    while fb > 0 and grow is not None and len(probes) < steps:
        nxt = grow(b)
        if nxt is None:
            break
        a, fa = b, fb
        b, fb = nxt, probe(nxt)
    while (fa > 0 >= fb and len(probes) < steps and abs(b - a) > 1e-4 * max(1.0, abs(b))
           and not any(abs(math.log(p["ratio"])) <= math.log1p(tol) for p in probes)):
        w = b - a
        m = b - fb * (b - a) / (fb - fa)
        if not a + 0.1 * w <= m <= b - 0.1 * w:
            m = (a + b) / 2
        fm = probe(m)
        if fm > 0:
            a, fa = m, fm
        else:
            b, fb = m, fm
    best = min(probes, key=lambda p: abs(math.log(p["ratio"])))
    return {"param": best["param"], "ratio": best["ratio"], "reached": abs(math.log(best["ratio"])) <= math.log1p(tol),
            "probes": probes}


# ----------------------------------------------------------------------------- the benchmark


class _OrtFile:
    """An ONNX file in an ONNX Runtime session with the target's options; `run()` is one call."""

    def __init__(self, path: Path, target, input_shape):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), target.session_options(), providers=["CPUExecutionProvider"])
        x = target.input(input_shape).numpy()
        self.feed = {self.session.get_inputs()[0].name: x}

    def run(self) -> None:
        self.session.run(None, self.feed)


class Bench:
    """The state of one benchmark: run folder, data, teacher, output folders and the per-network cache."""

    def __init__(self, run: Path, out: Path, args: argparse.Namespace, log: Callable[[str], None] = print):
        from hant.config import RunConfig
        from hant.data import load_data
        from hant.run import Run
        from hant.teacher import load_teacher
        from hant.workspace import RunDir

        self.run, self.out, self.args, self.log = run, out, args, log
        self.rd = RunDir(run)
        self.cfg = RunConfig.load(self.rd.require(self.rd.config, "init"))
        self.rows_dir = out / "headline_rows"
        self.work = self.rd.root / "headline"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.splits = load_data(self.cfg.data)
        d = self.cfg.data
        self.in_shape = (int(d.in_chans), int(d.input_size), int(d.input_size))
        self.teacher = load_teacher(self.cfg.model.source, d.in_chans, d.num_classes, self.cfg.model.checkpoint,
                                    self.cfg.model.trust_pickle).eval()
        self.epochs = float(args.finetune_epochs if args.finetune_epochs is not None else self.cfg.finetune.epochs)
        self.small_epochs = float(args.small_epochs) if args.small_epochs is not None else self.epochs
        # A cached network made with other settings, or from another teacher, is made again.
        self.settings = {"teacher_sha256": Run(run).layers_doc.get("checkpoint_sha256"),
                         "finetune_epochs": self.epochs, "small_epochs": self.small_epochs,
                         "prune_round_to": args.prune_round_to, "match_tol": args.match_tol,
                         "random_draws": args.random_draws}
        # How hant's students are made; part of their names (`recipe_tag`) and checked in their units.
        self.recipe = {"check_rounds": int(args.check_rounds), "redistill": bool(args.redistill)}
        if self.recipe["check_rounds"] > 0:
            from hant.speedup import OVERSHOOT

            self.recipe["overshoot"] = OVERSHOOT  # when a plan faster than asked is loosened
        self.tag = recipe_tag(self.recipe)
        # Final plan budgets, {batch: {speedup: budget_ms}}, for the caps of larger speedups.
        self.budgets: dict[int, dict[float, float]] = {}

    # --- cache ---------------------------------------------------------------------------

    def cached(self, unit: str, check: Callable[[dict], str | None] | None = None) -> dict | None:
        """The saved unit, or None when there is none or it must be made again: made with other
        settings, its files gone, or `check(unit)` gives a reason (logged)."""
        path = self.rows_dir / f"{unit}.json"
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        if d.get("settings") != self.settings and d.get("status") != "unreachable":
            self.log(f"[headline] {unit}: cached with other settings ({d.get('settings')}); redoing it")
            return None
        why = check(d) if check is not None else None
        if why:
            self.log(f"[headline] {unit}: {why}; redoing it")
            return None
        for key in ("weights", "onnx"):
            f = d.get(key)
            if f and not Path(f).exists():
                self.log(f"[headline] {unit}: {f} is gone; redoing it")
                return None
        return d

    def save(self, unit: str, d: dict) -> dict:
        from hant.workspace import atomic_write_text

        d = {"unit": unit, **d, "settings": self.settings}
        atomic_write_text(self.rows_dir / f"{unit}.json", json.dumps(d, indent=1) + "\n")
        return d

    def unit(self, unit: str, make: Callable[[], dict], check: Callable[[dict], str | None] | None = None) -> dict:
        """The cached result of `unit` (see `cached`), else make() timed and saved."""
        d = self.cached(unit, check)
        return d if d is not None else self.make_unit(unit, make)

    def make_unit(self, unit: str, make: Callable[[], dict]) -> dict:
        """make() timed and saved as `unit`."""
        self.log(f"[headline] {unit} ...")
        t0 = time.perf_counter()
        d = make()
        d["cost_s"] = round(time.perf_counter() - t0, 1)
        self.log(f"[headline] {unit}: top-1 {d.get('top1', float('nan')):.2f}% in {d['cost_s']:.0f} s")
        return self.save(unit, d)

    # --- helpers ---------------------------------------------------------------------------

    def top1(self, model: nn.Module) -> float:
        from hant.data import make_loader
        from hant.teacher_train import evaluate

        return float(evaluate(model.eval(), make_loader(self.splits.test, self.cfg.finetune.batch_size))["top1"])

    def target(self, batch: int):
        from hant.latency import get_target
        from hant.latency.compare import resolve_target

        tid, _, threads = resolve_target(self.run, {"target": self.table_id(batch)})
        return get_target(tid, batch_size=batch, threads=threads)

    def quantize(self, fp32: Path, batch: int) -> dict:
        """Static INT8 of `fp32` beside it, as `hant export --int8` makes it: in the scheme
        measured for the run on this machine at `batch`, with the calibration that agrees
        most with fp32 on held-out images."""
        from hant.export import calibration_check, quantize_int8
        from hant.latency.int8 import run_int8_scheme
        from hant.workspace import run_lock

        n = min(256, len(self.splits.train))
        threads = self.target(batch).threads
        with run_lock(self.run, log=self.log):
            scheme = run_int8_scheme(self.run, batch, threads, log=self.log)["scheme"]
        check, split = calibration_check(self.splits, n)
        q = quantize_int8(fp32, fp32.parent / "model.int8.onnx", self.splits.train, images=n, scheme=scheme,
                          check=check, threads=threads)
        return {**q, "scheme": scheme, "calibration_images": n, "check_split": split}

    @staticmethod
    def calibrated(d: dict) -> str | None:
        """A `cached` check of an INT8 row: made in the run's scheme with a chosen calibration."""
        return None if "calibration" in d else "quantised before the calibration was chosen on held-out images"

    @staticmethod
    def int8_fields(q: dict) -> dict:
        """What a row records of its INT8 model's making."""
        return {"calibration_images": q["calibration_images"], "scheme": q["scheme"]["name"],
                "calibration": q["calibration"], "calibrations": q["calibrations"]}

    @staticmethod
    def table_id(batch: int) -> str:
        from hant.latency import table_path

        return Path(table_path(".", TARGET, batch)).stem

    def probe_protocol(self):
        from hant.latency import Protocol

        q = self.args.quick
        return Protocol(warmup=2, min_repeats=5 if q else 8, max_repeats=20 if q else 40,
                        time_cap_s=10.0 if q else 40.0, turn_warmup=1, seed=self.cfg.seed)

    def params_flops(self, model: nn.Module) -> tuple[int, int]:
        from hant.student import count_params_flops

        return count_params_flops(model, self.in_shape)

    # --- stages ----------------------------------------------------------------------------

    def tables(self) -> None:
        from hant.latency import covers_pools, get_target, measure_table, table_path
        from hant.run import Run

        for b in self.args.batch_sizes:
            path = table_path(self.run, TARGET, b)
            if path.exists():
                # A complete table measured here, validated at least as widely, is kept as it is
                # (measure_table would validate it again every time).
                t = json.loads(path.read_text())
                v = t.get("validation") or {}
                here = get_target(TARGET, batch_size=b, threads=self.cfg.latency.threads).fingerprint()
                if (covers_pools(t, Run(self.run).pools) and t.get("fingerprint") == here
                        and (v.get("k") or 0) >= self.args.validate):
                    self.log(f"[headline] latency table {path.name}: complete, kept")
                    continue
            self.log(f"[headline] latency table {TARGET} batch {b}")
            measure_table(self.run, target=TARGET, batch_size=b, validate=self.args.validate,
                          progress=sys.stderr.isatty(), log=self.log)

    def teacher_units(self) -> None:
        from hant.export import onnx_top1
        from hant.onnx_io import export_onnx

        def teacher():
            p, f = self.params_flops(self.teacher)
            return {"method": "teacher", "kind": "teacher", "top1": self.top1(self.teacher), "params": p, "flops": f,
                    "init": "trained teacher"}

        self.teacher_d = self.unit("teacher", teacher)

        def teacher_int8():
            folder = self.work / "teacher-int8"
            fp32 = folder / "model.onnx"
            export_onnx(self.teacher, self.in_shape, fp32)
            b = self.args.batch_sizes[0]
            q = self.quantize(fp32, b)
            return {"method": "teacher-int8", "kind": "onnx", "onnx": str(q["file"]),
                    "top1": onnx_top1(q["file"], self.splits.test, threads=self.target(b).threads),
                    "init": "trained teacher", **self.int8_fields(q)}

        if "int8" in self.args.methods:
            self.unit("teacher-int8", teacher_int8, self.calibrated)
        all_teacher = {d["name"]: "teacher" for d in self.layers()}
        self.unit("teacher-ft", lambda: self.finetune_plan("headline-teacher-ft", "teacher-ft",
                                                           {"layers": all_teacher}))

    def layers(self) -> list[dict]:
        from hant.workspace import read_json

        return read_json(self.rd.layers)["layers"]

    def finetune_plan(self, plan: str, method: str, plan_d: dict | None = None) -> dict:
        """Fine-tune a plan with hant's own stage; write the plan first when `plan_d` is given."""
        from hant.finetune import finetune
        from hant.workspace import write_json

        if plan_d is not None:
            write_json(self.rd.plan(plan), {"version": 1, "name": plan,
                                            "target": plan_d.get("target", self.table_id(self.args.batch_sizes[0])),
                                            **plan_d})
        res = finetune(self.run, plan, epochs=self.epochs, log=self.log)
        folder = self.rd.student_dir(plan)
        from hant.student import load_student

        p, f = self.params_flops(load_student(folder))
        arch = json.loads((folder / "arch.json").read_text())
        start = arch.get("candidate_weights")
        return {"method": method, "kind": "student", "plan": plan, "dir": str(folder),
                "weights": str(folder / "student.safetensors"), "sha256": arch.get("sha256"),
                "top1": res["student_top1"], "top1_before_finetune": res["assembled_top1"], "params": p, "flops": f,
                "init": ("teacher" if method == "teacher-ft" else
                         "re-distilled candidates" if start == "redistilled" else "phase-1 candidates"),
                "finetune": {"epochs": res["epochs"], "steps": res["steps"], "time_s": round(res["time_s"], 1),
                             "train_images": len(self.splits.train), "via": "hant.finetune.finetune"}}

    def redistill_plan(self, plan: str) -> dict:
        """Re-distil the plan's layers on the student's own inputs (`hant.redistill.redistill`,
        resumable); returns what the unit records of it."""
        from hant.redistill import redistill

        doc = redistill(self.run, plan, log=self.log)
        held = doc.get("heldout") or {}

        def mean(v: dict) -> float | None:
            return sum(v.values()) / len(v) if v else None

        return {"done": True, "index": str(self.rd.redistilled_dir(plan) / "index.json"),
                "layers": len(doc.get("layers") or {}), "trained_layers": len(doc.get("trained") or []),
                "reused_layers": len(doc.get("reused") or []),
                "images_per_layer": (doc.get("settings") or {}).get("images"), "heldout_images": held.get("images"),
                "mean_heldout_nmse_before": mean(held.get("before") or {}),
                "mean_heldout_nmse_after": mean(held.get("after") or {}),
                "time_s": round(float(doc.get("wall_s", 0)), 1)}

    def hant_names(self, b: int, s: float) -> tuple[str, str]:
        """(unit, plan) names of the hant student of speedup s at batch b under this recipe."""
        t = f"-{self.tag}" if self.tag else ""
        return f"hant{t}-b{b}-x{s:g}", f"headline{t}-b{b}-x{s:g}"

    def hant_unit(self, b: int, s: float) -> dict | None:
        """The hant student of speedup s at batch b, made as `hant accelerate` makes it (None
        when the pool cannot reach s).

        With `--check-rounds` N > 0 the plan is selected by `hant.select.select_measured`
        (timed against the teacher by `hant.measure.time_plan`, its budget tightened up to N
        times), its budget capped by `budget_cap` of the speedups already selected at batch
        b; else by plain `select`. Then re-distilled (unless `--no-redistill`) and fine-tuned.
        A cached student made with another recipe, or whose budget is looser than the cap, is
        made again (and with it every alternative matched to it).
        """
        from hant.measure import time_plan
        from hant.select import InfeasibleError, select, select_measured
        from hant.workspace import read_json, write_json

        unit, plan = self.hant_names(b, s)
        rounds = self.recipe["check_rounds"]
        known = self.budgets.setdefault(b, {})
        cap = budget_cap(known, s) if rounds > 0 else None

        def looser(budget: float | None) -> bool:
            return cap is not None and budget is not None and budget > cap * (1 + 1e-9)

        def check(d: dict) -> str | None:
            if d.get("recipe", LEGACY_RECIPE) != self.recipe:
                return f"made with recipe {d.get('recipe', LEGACY_RECIPE)}, not {self.recipe}"
            if d.get("status") != "unreachable" and looser(d.get("budget_ms")):
                return f"its budget {d['budget_ms']:.4g} ms is looser than a smaller speedup's {cap:.4g} ms"
            return None

        d = self.cached(unit, check)
        if d is not None:
            if d.get("status") == "unreachable":
                return None
            budget = d.get("budget_ms")
            if budget is None and self.rd.plan(plan).exists():  # a unit of the recipe before checks
                budget = read_json(self.rd.plan(plan)).get("budget_ms")
            if budget is not None:
                known[s] = float(budget)
            return d
        path = self.rd.plan(plan)

        def make() -> dict:
            plan_d = read_json(path) if path.exists() else {}
            # A plan left by an interrupted run is used when this recipe made it and the cap
            # allows it: selecting again could choose another plan and restart its fine-tuning.
            settled = (plan_d.get("headline_recipe") == self.recipe and (rounds <= 0 or "latency_check" in plan_d)
                       and not looser(plan_d.get("budget_ms")))
            if not settled:
                if rounds > 0:
                    select_measured(self.run, self.table_id(b), speedup=s, name=plan,
                                    timer=lambda r, n: time_plan(r, n, log=self.log), rounds=rounds,
                                    max_budget_ms=cap, log=self.log)
                else:
                    select(self.run, target=self.table_id(b), speedup=s, name=plan, log=self.log)
                write_json(path, {**read_json(path), "headline_recipe": self.recipe})
            plan_d = read_json(path)
            rd = self.redistill_plan(plan) if self.recipe["redistill"] else {"done": False}
            return {**self.finetune_plan(plan, "hant"), "batch_size": b, "speedup_target": s, "recipe": self.recipe,
                    "budget_ms": float(plan_d["budget_ms"]), "budget_cap_ms": cap,
                    "predicted_ms": plan_d.get("predicted_ms"), "latency_check": plan_d.get("latency_check"),
                    "redistill": rd}

        try:  # the unit's cost counts the selection and its hardware check
            d = self.make_unit(unit, make)
        except InfeasibleError as e:
            self.log(f"[headline] {unit}: {e}")
            self.save(unit, {"method": "hant", "status": "unreachable", "batch_size": b, "speedup_target": s,
                             "recipe": self.recipe, "reason": str(e)})
            return None
        budget = known[s] = d["budget_ms"]
        tighter_than = sorted(t for t, v in known.items() if t > s and v > budget * (1 + 1e-9))
        if tighter_than:
            # Plans of larger speedups made earlier are kept; say so rather than hide it.
            self.log(f"[headline] {unit}: its check ended at {budget:.4g} ms, tighter than the budgets of "
                     f"{', '.join(f'{t:g}x' for t in tighter_than)} selected before it (kept as they are)")
        return d

    @staticmethod
    def alt_name(method: str, ref: dict) -> str:
        """An alternative's unit name, after the hant unit it is matched to: `pruned-hw-b64-x2`
        for `hant-hw-b64-x2`."""
        return method + ref["unit"][len("hant"):]

    @staticmethod
    def same_ref(ref: dict) -> Callable[[dict], str | None]:
        """A `cached` check: the alternative was made against this very hant student."""
        def check(d: dict) -> str | None:
            if d.get("ref_sha256") != ref.get("sha256"):
                return f"matched to another {ref['unit']} (its weights changed)"
            return None
        return check

    def plan_of(self, d: dict) -> dict:
        from hant.workspace import read_json

        return read_json(self.rd.plan(d["plan"]))

    def random_unit(self, b: int, s: float, ref: dict) -> dict:
        """A random feasible plan under the budget of the hant student `ref`'s plan, made as
        that student was after its selection: re-distilled when it was, then fine-tuned."""
        redistilled = ref.get("recipe", LEGACY_RECIPE)["redistill"]

        def make():
            from hant.latency import load_table, predict_ms
            from hant.select import build_pool, predicted_latency
            from hant.solver import plan_totals, random_feasible
            from hant.workspace import read_json, write_json

            plan_h = self.plan_of(ref)
            table = load_table(self.run, self.table_id(b))
            pool = build_pool(self.layers(), read_json(self.rd.scores), [table], self.cfg.score.objective)
            lat, fixed = predicted_latency(table, pool)
            # Of many random feasible plans, the one that uses the budget most: a uniform draw is
            # usually far under it, which would compare hant with a faster network.
            rng = np.random.default_rng(self.cfg.seed)
            draws = [random_feasible(pool.cost, lat, plan_h["budget_ms"], fixed=fixed, rng=rng)
                     for _ in range(max(1, self.args.random_draws))]
            sol = max(draws, key=lambda d: plan_totals(d.choice, lat, fixed))
            layers = pool.plan_layers(sol.choice)
            plan = f"{ref['plan']}-random"
            plan_d = {"target": self.table_id(b), "batch_size": b, "budget_ms": plan_h["budget_ms"], "layers": layers,
                      "predicted_ms": float(predict_ms(table, layers)), "predicted_score": float(sol.objective),
                      "status": "random", "seed": self.cfg.seed, "draws": self.args.random_draws}
            if redistilled:
                # The plan file first: re-distillation reads it.
                write_json(self.rd.plan(plan), {"version": 1, "name": plan, **plan_d})
                rd = self.redistill_plan(plan)
            else:
                rd = {"done": False}
            d = self.finetune_plan(plan, "random", plan_d)
            return {**d, "batch_size": b, "speedup_target": s, "matched_to": ref["unit"],
                    "ref_sha256": ref.get("sha256"), "budget_ms": plan_h["budget_ms"], "redistill": rd}

        return self.unit(self.alt_name("random", ref), make, self.same_ref(ref))

    def hant_int8_unit(self, b: int, s: float, ref: dict) -> dict:
        unit = self.alt_name("hant-int8", ref)

        def make():
            from hant.export import onnx_top1
            from hant.onnx_io import export_onnx
            from hant.student import load_student

            folder = self.work / unit
            fp32 = folder / "model.onnx"
            export_onnx(load_student(ref["dir"]), self.in_shape, fp32)
            q = self.quantize(fp32, b)
            return {"method": "hant-int8", "kind": "onnx", "onnx": str(q["file"]), "batch_size": b,
                    "speedup_target": s, "top1": onnx_top1(q["file"], self.splits.test, threads=self.target(b).threads),
                    "init": f"hant student {ref['unit']}", **self.int8_fields(q), "of": ref["unit"],
                    "ref_sha256": ref.get("sha256")}

        same = self.same_ref(ref)
        return self.unit(unit, make, lambda d: same(d) or self.calibrated(d))

    def matched_unit(self, method: str, b: int, s: float, ref: dict) -> dict:
        """A pruned or smaller network whose measured latency matches the hant student `ref`,
        fine-tuned with logit distillation (the KD + CE loss of `hant.kd.kd_loss`, through
        `finetune_module`, the loop that fine-tunes hant's students) for the same epochs (the
        smaller network: `--small-epochs`, by default the same). Feature distillation is off
        for them whatever the run's config says: no layer of theirs has the teacher's shape."""
        import dataclasses

        from hant.kd import finetune_module
        from hant.student import load_student
        from hant.workspace import save_safetensors

        unit = self.alt_name(method, ref)
        d = self.cfg.data

        def build(p: float) -> nn.Module:
            if method == "pruned":
                return prune(self.teacher, p, self.in_shape, d.num_classes, self.args.prune_round_to)
            return scaled_model(self.cfg.model.source, -p, d.in_chans, d.num_classes)

        def make():
            search_file = self.work / unit / "match.json"
            match = json.loads(search_file.read_text()) if search_file.exists() else None
            if match is None or match.get("settings") != self.settings or match.get("ref_sha256") != ref.get("sha256"):
                target = self.target(b)
                proto = self.probe_protocol()
                ref_item = target.prepare(load_student(ref["dir"]), self.in_shape)
                from hant.latency import measure

                def ratio_at(p: float) -> float:
                    st = measure({"ref": ref_item, "probe": target.prepare(build(p), self.in_shape)}, target, proto)
                    r = st["probe"].median_ms / st["ref"].median_ms
                    self.log(f"[headline] {unit}: {'ratio' if method == 'pruned' else 'phi'} "
                             f"{p if method == 'pruned' else -p:.4f}: {r:.3f}x the hant student's latency")
                    return r

                if method == "pruned":
                    match = match_latency(ratio_at, 0.0, 0.6, self.args.match_tol, self.args.match_steps,
                                          grow=lambda h: None if h >= 0.95 else min(0.95, h + 0.2))
                else:
                    match = match_latency(ratio_at, 0.0, 4.0, self.args.match_tol, self.args.match_steps,
                                          grow=lambda h: None if h >= 24 else h * 1.6)
                match["settings"] = self.settings
                match["ref_sha256"] = ref.get("sha256")
                search_file.parent.mkdir(parents=True, exist_ok=True)
                search_file.write_text(json.dumps(match, indent=1))
            model = build(match["param"])
            # A random network's accuracy before training says nothing; a pruned one's does.
            init_top1 = self.top1(model) if method == "pruned" else None
            epochs = self.epochs if method == "pruned" else self.small_epochs
            cfg = dataclasses.replace(self.cfg, finetune=dataclasses.replace(self.cfg.finetune, feature_loss="none"))
            # The key names the network searched, so that a checkpoint of another one (an earlier
            # match, another hant student) is never resumed into it.
            key = f"{unit}:{(ref.get('sha256') or '')[:12]}:{match['param']:.6g}"
            # Its BatchNorm statistics are stale (pruned) or the defaults (new): re-estimated first.
            ft = finetune_module(model, self.teacher, cfg, self.splits.train, epochs=epochs,
                                 out_dir=self.work / unit, key=key, log=self.log, recalibrate_bn=True)
            sha = save_safetensors(self.work / unit / "model.safetensors",
                                   {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
            p, f = self.params_flops(model)
            if method == "pruned":
                detail = {"pruning_ratio": match["param"], "round_to": self.args.prune_round_to,
                          "importance": "MagnitudeImportance(p=2)", "global_pruning": False}
            else:
                phi = -match["param"]
                w0, d0 = EFFICIENTNET_BASE[self.cfg.model.source.split(":", 1)[-1]]
                detail = {"phi": phi, "channel_multiplier": w0 * BETA ** phi, "depth_multiplier": d0 * ALPHA ** phi}
            return {"method": method, "kind": method, "batch_size": b, "speedup_target": s, "matched_to": ref["unit"],
                    "ref_sha256": ref.get("sha256"),
                    "match": {"ratio_at_search": match["ratio"], "reached": match["reached"],
                              "tolerance": self.args.match_tol, "probes": match["probes"]},
                    "param": match["param"], "detail": detail, "weights": str(self.work / unit / "model.safetensors"),
                    "sha256": sha, "top1": self.top1(model), "top1_before_finetune": init_top1,
                    "params": p, "flops": f,
                    "init": "teacher weights, pruned" if method == "pruned" else "random (no pretrained weights here)",
                    "finetune": {**ft, "via": "hant.kd.finetune_module", "loss": "logits (KD + CE)",
                                 "batchnorm_reestimated": True}}

        def check(d: dict) -> str | None:
            if not (d.get("finetune") or {}).get("batchnorm_reestimated"):
                return "fine-tuned from stale BatchNorm statistics"
            return self.same_ref(ref)(d)

        return self.unit(unit, make, check)

    def load_module(self, d: dict) -> nn.Module:
        """Rebuild a finished network for timing."""
        from hant.student import load_student
        from hant.workspace import load_safetensors

        kind = d["kind"]
        if kind == "teacher":
            return self.teacher
        if kind == "student":
            return load_student(d["dir"])
        cd = self.cfg.data
        if kind == "pruned":
            model = prune(self.teacher, d["param"], self.in_shape, cd.num_classes, d["detail"]["round_to"])
        else:
            model = scaled_model(self.cfg.model.source, -d["param"], cd.in_chans, cd.num_classes)
        model.load_state_dict(load_safetensors(d["weights"], d.get("sha256")), strict=True)
        return model.eval()

    def reference(self) -> dict:
        """What every drop is measured from: the better of the teacher and the control (the
        teacher fine-tuned with the same recipe), so that extra training alone is never
        counted as hant's. The control before it is made: the teacher."""
        control = self.cached("teacher-ft")
        if control is not None and control["top1"] > self.teacher_d["top1"]:
            return control
        return self.teacher_d

    def right(self, d: dict) -> torch.Tensor:
        """Whether the unit's network gets each test image right, in split order; kept in the
        unit's JSON (`test_right`, hant.paired.pack) once computed."""
        from hant.paired import pack, unpack

        kept = d.get("test_right")
        if kept and kept.get("n") == len(self.splits.test):
            return unpack(kept)
        if d["kind"] == "onnx":
            from hant.export import onnx_predictions

            b = d.get("batch_size") or self.args.batch_sizes[0]
            pred, y = onnx_predictions(d["onnx"], self.splits.test, threads=self.target(b).threads)
            right = torch.from_numpy(np.asarray(pred) == np.asarray(y))
        else:
            from hant.data import make_loader
            from hant.paired import predictions

            right = predictions(self.load_module(d), make_loader(self.splits.test, self.cfg.finetune.batch_size)).right
        d["test_right"] = pack(right)
        self.save(d["unit"], {k: v for k, v in d.items() if k not in ("unit", "settings")})
        return right

    def paired_drop(self, d: dict) -> dict:
        """The unit's top-1 drop from the reference, image by image (hant.paired.compare)."""
        from hant.paired import compare

        ref = self.reference()
        r = compare(self.right(ref), self.right(d))
        return {"drop": r["drop"], "ci95": r["drop_ci95"], "images": r["images"], "reference": ref["unit"]}

    def time_batch(self, b: int, units: list[dict]) -> dict[str, dict]:
        """Every unit of batch size b timed in one interleaved run; cached while the units are unchanged."""
        from hant.latency import Protocol, measure

        key = sorted(f"{u['unit']}:{u.get('cost_s')}" for u in units)
        cache = self.rows_dir / f"timing-b{b}.json"
        if cache.exists():
            c = json.loads(cache.read_text())
            if c.get("key") == key:
                return c["stats"]
        target = self.target(b)
        self.log(f"[headline] timing {len(units)} networks at batch {b} on {target.id} ({target.threads} thread(s), "
                 f"{target.clock} clock), interleaved")
        items = {}
        for u in units:
            items[u["unit"]] = (_OrtFile(Path(u["onnx"]), target, self.in_shape) if u["kind"] == "onnx"
                                else target.prepare(self.load_module(u), self.in_shape))
        lat = self.cfg.latency
        proto = Protocol.from_config(lat, turn_warmup=1, seed=self.cfg.seed,
                                     time_cap_s=self.args.time_cap if self.args.time_cap else lat.time_cap_s)
        load0 = os.getloadavg()
        stats = measure(items, target, proto)
        out = {k: {**v.to_dict(), "loadavg": [load0, os.getloadavg()]} for k, v in stats.items()}
        from hant.workspace import atomic_write_text

        atomic_write_text(cache, json.dumps({"key": key, "stats": out, "fingerprint": target.fingerprint(),
                                             "protocol": proto.to_dict()}, indent=1))
        return out


# ----------------------------------------------------------------------------- flow


def sweep(bench: Bench, b: int, found: dict[float, dict], max_drop: float, steps: int) -> float | None:
    """Bisect the speedup for the largest one with top-1 drop <= max_drop (from the better of the
    teacher and the control); returns that speedup."""
    t = bench.reference()["top1"]

    def ok(s):
        return found[s] is not None and t - found[s]["top1"] <= max_drop

    for _ in range(steps):
        tried = sorted(found)
        good = [s for s in tried if ok(s)]
        lo = max(good) if good else 1.0
        bad = [s for s in tried if s > lo]
        if bad:
            hi = min(bad)
        else:
            hi = lo * 1.5  # every speedup tried passes: look further out
        mid = round(((lo + hi) / 2) * 4) / 4  # quarter steps: the noise of a 10k test set is ~0.2 points
        if mid <= lo or mid >= hi or mid in found or mid <= 1.0:
            break
        bench.log(f"[headline] sweep: {lo:g}x passes, {hi:g}x " + ("fails" if bad else "untried") + f"; trying {mid:g}x")
        found[mid] = bench.hant_unit(b, mid)
    good = [s for s in found if ok(s)]
    return max(good) if good else None


def timed_only(units: list[dict]) -> list[dict]:
    """The alternatives matched at another batch size, to be timed at this one as they are.

    Their latency was matched to a hant student of that batch size, not this one's, so
    their rows carry `matched_at_batch` and no `matched_to`: they are points on the
    accuracy-latency plane of this batch size, not matched comparisons.
    """
    return [{**u, "matched_to": None, "matched_at_batch": u["batch_size"]}
            for u in units if u["method"] in ("random", "pruned", "smaller")]


def build_rows(bench: Bench, units_by_batch: dict[int, list[dict]]) -> list[dict]:
    t1 = bench.reference()["top1"]
    rows = []
    for b, units in units_by_batch.items():
        stats = bench.time_batch(b, units)
        t_ms = stats["teacher"]["median_ms"]
        for u in units:
            st = stats[u["unit"]]
            row = {
                "method": u["method"], "label": LABELS.get(u["method"], u["method"]), "batch_size": b,
                "latency_ms": st["median_ms"], "latency_p10_ms": st["p10_ms"], "latency_p90_ms": st["p90_ms"],
                "latency_n": st["n"], "speedup": t_ms / st["median_ms"], "speedup_p10_p90": [
                    t_ms / st["p90_ms"], t_ms / st["p10_ms"]],
                "top1": u["top1"], "top1_drop": t1 - u["top1"], "top1_drop_paired": bench.paired_drop(u),
                "top1_drop_from_teacher": bench.teacher_d["top1"] - u["top1"],
                "speedup_target": u.get("speedup_target"),
                "unit": u["unit"], "matched_to": u.get("matched_to"), "init": u.get("init"),
                "top1_before_finetune": u.get("top1_before_finetune"), "params": u.get("params"),
                "flops": u.get("flops"), "finetune": u.get("finetune"), "cost_s": u.get("cost_s"),
            }
            for k in ("plan", "detail", "match", "budget_ms", "calibration_images", "sweep", "matched_at_batch",
                      "recipe", "redistill"):
                if u.get(k) is not None:
                    row[k] = u[k]
            if u.get("latency_check"):
                row["hardware_check"] = hardware_check(u["latency_check"], u.get("budget_ms"))
            rows.append(row)
    return rows


def hardware_check(check: dict, budget_ms: float | None) -> dict:
    """What a row shows of a plan's `latency_check` (written by `hant.select.select_measured`):
    the timing of the plan that was kept (the last at its final budget), how many timings were
    made, whether the speedup was met, and the cap."""
    rounds = check.get("rounds") or []
    kept = [r for r in rounds if budget_ms is not None and math.isclose(r["budget_ms"], budget_ms, rel_tol=1e-9)]
    last = (kept or rounds or [{}])[-1]
    return {"met": check.get("met"), "timings": len(rounds), "speedup": last.get("speedup"),
            "speedup_ci": [last.get("speedup_ci_lo"), last.get("speedup_ci_hi")],
            "goal_speedup": check.get("goal_speedup"), "budget_ms": last.get("budget_ms"),
            "budget_cap_ms": check.get("budget_cap_ms"), "decisions": [r.get("decision") for r in rounds]}


def comparisons(rows: list[dict]) -> list[dict]:
    """At each hant student: its top-1 minus each alternative's, and their latency ratio."""
    by_unit = {r["unit"]: r for r in rows}
    out = []
    for r in rows:
        ref = by_unit.get(r.get("matched_to") or "")
        if ref is None:
            continue
        out.append({"batch_size": r["batch_size"], "speedup_target": r["speedup_target"], "method": r["method"],
                    "hant_top1": ref["top1"], "top1": r["top1"], "hant_minus_method": ref["top1"] - r["top1"],
                    "latency_ratio_to_hant": r["latency_ms"] / ref["latency_ms"],
                    "hant_leads_by_1_point": ref["top1"] - r["top1"] >= 1.0})
    return out


def best_within(rows: list[dict], methods: tuple[str, ...], batch: int, max_drop: float) -> dict | None:
    ok = [r for r in rows if r["method"] in methods and r["batch_size"] == batch and r["top1_drop"] <= max_drop]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["speedup"])
    return {"speedup": r["speedup"], "speedup_target": r["speedup_target"], "top1": r["top1"],
            "top1_drop": r["top1_drop"], "top1_drop_ci95": (r.get("top1_drop_paired") or {}).get("ci95"),
            "latency_ms": r["latency_ms"], "unit": r["unit"], "method": r["method"]}


def fingerprint(bench: Bench, target) -> dict[str, Any]:
    import onnxruntime
    import timm

    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    from hant.latency import cpu_model

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "torch_pruning": tp_version, "numpy": np.__version__,
            "hant_commit": commit, "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
            "system": platform.platform(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "seeds": {"run": bench.cfg.seed, "data": bench.cfg.data.seed, "protocol": bench.cfg.seed,
                      "random_plan": bench.cfg.seed},
            "latency_target": target.fingerprint()}


def write_outputs(bench: Bench, rows: list[dict], best: float | None, command: str, wall_s: float) -> dict:
    from hant.workspace import atomic_write_text

    args, cfg = bench.args, bench.cfg
    max_drop = args.max_drop
    hant_methods = ("hant",)
    comps = comparisons(rows)
    best64 = best_within(rows, hant_methods, 64, max_drop) if 64 in args.batch_sizes else None
    result = {
        "version": 1,
        "command": command,
        "run": str(bench.run),
        "model": cfg.model.source,
        "data": cfg.data.spec,
        "input_size": list(bench.in_shape),
        "space": cfg.space,
        "target": TARGET,
        "teacher_top1": bench.teacher_d["top1"],
        "reference": {"unit": bench.reference()["unit"], "top1": bench.reference()["top1"]},
        "teacher_training": teacher_training(bench),
        "test_images": len(bench.splits.test),
        "max_drop": max_drop,
        "best_speedup_within_0_4": best64,
        "best_speedup_within_0_4_int8": best_within(rows, ("hant-int8",), 64, max_drop)
        if 64 in args.batch_sizes else None,
        "best_speedup_within_0_4_by_batch": {str(b): best_within(rows, hant_methods, b, max_drop)
                                             for b in args.batch_sizes},
        "sweep_best_speedup_target": best,
        "hant_recipe": {**bench.recipe, "tag": bench.tag, "selection": "hant.select.select_measured"
                        if bench.recipe["check_rounds"] > 0 else "hant.select.select",
                        "as": "hant.pipeline.accelerate_run"},
        "finetune": {"epochs": bench.epochs, "smaller_network_epochs": bench.small_epochs,
                     "feature_loss_hant": cfg.finetune.feature_loss, "feature_loss_pruned_smaller": "none",
                     "train_images": len(bench.splits.train), "batch_size": cfg.finetune.batch_size,
                     "lr": cfg.finetune.lr, "kd_weight": cfg.finetune.kd_weight, "ce_weight": cfg.finetune.ce_weight,
                     "temperature": cfg.finetune.temperature, "augment": cfg.finetune.augment},
        "rows": rows,
        "comparisons": comps,
        "goals": {
            "speedup_within_0_4_at_batch_64": best64["speedup"] if best64 else None,
            "reaches_3_6x": bool(best64 and best64["speedup"] >= 3.6),
            "hant_leads_by_1_point_at_every_match": all(c["hant_leads_by_1_point"] for c in comps) if comps else None,
        },
        "wall_time_s": round(wall_s, 1),
        # What a run from nothing cached spends on its networks (this invocation may have reused them).
        "networks_cost_s": round(sum({r["unit"]: r.get("cost_s") or 0.0 for r in rows}.values()), 1),
        "fingerprint": fingerprint(bench, bench.target(args.batch_sizes[0])),
        "notes": notes(bench, rows),
    }
    out = bench.out
    atomic_write_text(out / "headline.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "headline.md", markdown(result))
    plot(result, out / "headline.png")
    return result


def teacher_training(bench: Bench) -> dict | None:
    """How the teacher was trained (the JSON `hant train-teacher` writes beside it), when it is there."""
    from hant.teacher_train import teacher_meta_path

    ckpt = bench.cfg.model.checkpoint
    path = teacher_meta_path(ckpt) if ckpt else None
    if path is None or not path.exists():
        return None
    meta = json.loads(path.read_text())
    keep = ("epochs", "steps", "batch_size", "train_images", "lr", "test_top1", "heldout_top1", "train_time_s",
            "images_per_s", "threads", "command", "history", "sha256")
    return {"file": str(path), **{k: meta.get(k) for k in keep if k in meta}}


def notes(bench: Bench, rows: list[dict]) -> list[str]:
    n = [
        "top1_drop is the reference's test top-1 minus the row's, in points, the reference being the better "
        "of the teacher and the control (the teacher given the same fine-tuning), so that extra training "
        "alone is not counted; top1_drop_from_teacher is from the teacher. top1_drop_paired gives the drop "
        "with its 95% interval from the test images only one of the two networks gets right (hant.paired). "
        "speedup is the teacher's median latency over the row's, both from the same interleaved timing run "
        "of that batch size.",
        "Every trained row used the same epochs, batch, learning-rate schedule, augmentation and train images, "
        "and logit distillation from the teacher (KD + CE"
        + (f", plus the run's {bench.cfg.finetune.feature_loss} feature loss for hant's, the random plans' and "
           "the control's, which pruned and smaller networks cannot have" if bench.cfg.finetune.feature_loss != "none"
           else "") + "); hant and random plans and the control through hant.finetune.finetune, pruned and "
        "smaller networks through hant.kd.finetune_module (the same loop).",
        hant_recipe_note(bench.recipe),
        "The smaller networks start from random weights (nothing pretrained can be downloaded here); with "
        f"{bench.small_epochs:g} epochs they are far from converged, so their row says what the same training "
        "budget buys, not what the architecture can reach.",
    ]
    elsewhere = sorted({r["matched_at_batch"] for r in rows if r.get("matched_at_batch") is not None})
    if elsewhere:
        n.append("Rows noted 'matched at batch N' are the alternatives trained at batch N's matched latency, "
                 "timed as they are at this batch size: points on its accuracy-latency plane, not matched "
                 "comparisons (they are left out of hant's lead).")
    unmatched = [r["unit"] for r in rows
                 if r.get("match") and not r["match"]["reached"] and r.get("matched_at_batch") is None]
    if unmatched:
        n.append("latency not matched within tolerance (closest probe used): " + ", ".join(unmatched))
    return n


def hant_recipe_note(recipe: dict) -> str:
    """One sentence on how hant's students (and the random plans) were made."""
    if recipe["check_rounds"] > 0:
        sel = ("hant's plans were made as `hant accelerate` makes them: each selected from the latency table, then "
               "assembled and timed against the teacher on the target (hant.select.select_measured with "
               f"hant.measure.time_plan), its budget tightened up to {recipe['check_rounds']} times until the "
               "measured speedup met the request (within 2%, or within the timing's interval), and capped by the "
               "final budget of every smaller speedup at the same batch size")
    else:
        sel = "hant's plans were chosen from the latency table's prediction alone (no hardware check)"
    if recipe["redistill"]:
        rd = ("; each plan's layers (and each random plan's) were re-distilled on the student's own inputs "
              "(hant.redistill) before fine-tuning")
    else:
        rd = "; no plan was re-distilled before fine-tuning"
    return sel + rd + ". Random plans are drawn under the hant plan's final budget by the table's prediction."


def _f(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def _ci(row: dict) -> str:
    ci = (row.get("top1_drop_paired") or {}).get("ci95")
    return f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""


def markdown(result: dict) -> str:
    lines = [f"# hant headline benchmark: {result['model']} on {result['data']} "
             f"({'x'.join(map(str, result['input_size']))}), {result['target']}", "",
             f"Teacher test top-1: {result['teacher_top1']:.2f}% on {result['test_images']} images"
             + (f"; drops are from the control's {result['reference']['top1']:.2f}% (the teacher given the same "
                "fine-tuning)" if (result.get("reference") or {}).get("unit") == "teacher-ft" else "") + ". "
             f"Fine-tuning of every trained row: {result['finetune']['epochs']:g} epochs of "
             f"{result['finetune']['train_images']} images, logit distillation from the teacher.", ""]
    recipe = result.get("hant_recipe")
    if recipe:
        lines += [f"hant's students: {hant_recipe_note(recipe)}", ""]
    best = result.get("best_speedup_within_0_4")
    if best:
        lines += [f"Largest measured speedup at batch 64 with at most {result['max_drop']:g} points top-1 drop: "
                  f"**{best['speedup']:.2f}x** ({best['top1']:.2f}%, drop {best['top1_drop']:+.2f}"
                  + (" [{:+.2f}, {:+.2f}]".format(*best["top1_drop_ci95"]) if best.get("top1_drop_ci95") else "")
                  + ").", ""]
    lines += ["| batch | method | asked | latency ms (p10–p90) | speedup | top-1 % | drop [95%] | note |",
              "|---:|---|---:|---|---:|---:|---:|---|"]
    order = {m: i for i, m in enumerate(["teacher", "teacher-ft", "teacher-int8", "hant", "hant-int8", "random",
                                         "pruned", "smaller"])}
    for r in sorted(result["rows"], key=lambda r: (-r["batch_size"], r["speedup_target"] or 0,
                                                   order.get(r["method"], 99))):
        parts = [f"matched at batch {r['matched_at_batch']}"] if r.get("matched_at_batch") is not None else []
        if r.get("detail", {}).get("pruning_ratio") is not None:
            parts.append(f"ratio {r['detail']['pruning_ratio']:.3f}")
        elif r.get("detail", {}).get("phi") is not None:
            parts.append(f"width {r['detail']['channel_multiplier']:.2f}, depth {r['detail']['depth_multiplier']:.2f}")
        elif r.get("sweep"):
            parts.append("found by the sweep")
        hc = r.get("hardware_check")
        if hc and hc.get("speedup") is not None:
            parts.append(f"plan checked {hc['speedup']:.2f}x" + ("" if hc.get("met") else " (short)"))
        if (r.get("redistill") or {}).get("done"):
            parts.append("re-distilled")
        note = "; ".join(parts)
        lines.append(f"| {r['batch_size']} | {r['label']} | {_f(r['speedup_target'], 'g') if r['speedup_target'] else ''}"
                     f"{'x' if r['speedup_target'] else ''} | {r['latency_ms']:.3f} ({r['latency_p10_ms']:.3f}–"
                     f"{r['latency_p90_ms']:.3f}) | {r['speedup']:.2f}x | {r['top1']:.2f} | {r['top1_drop']:+.2f}{_ci(r)} | {note} |")
    comps = result.get("comparisons") or []
    if comps:
        lines += ["", "hant's lead at matched latency (points of top-1; latency of the alternative over hant's):", "",
                  "| batch | asked | method | hant − method | latency ratio |", "|---:|---:|---|---:|---:|"]
        for c in comps:
            lines.append(f"| {c['batch_size']} | {c['speedup_target']:g}x | {c['method']} | "
                         f"{c['hant_minus_method']:+.2f} | {c['latency_ratio_to_hant']:.2f} |")
    lines += ["", *[f"- {n}" for n in result.get("notes", [])], "",
              f"Command: `{result['command']}` ({result['wall_time_s']:.0f} s this time; making every network from "
              f"nothing cached takes {result.get('networks_cost_s', 0):.0f} s, timing and tables aside).", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hant.workspace import atomic_write_bytes

    batches = sorted({r["batch_size"] for r in result["rows"]}, reverse=True)
    fig = Figure(figsize=(6.2 * len(batches), 4.6), dpi=120)
    FigureCanvasAgg(fig)
    styles = {"teacher": ("*", "black"), "teacher-ft": ("P", "grey"), "teacher-int8": ("X", "black"),
              "hant": ("o", "tab:blue"), "hant-int8": ("D", "tab:cyan"), "random": ("v", "tab:orange"),
              "pruned": ("s", "tab:red"), "smaller": ("^", "tab:green")}
    for i, b in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), i + 1)
        rows = [r for r in result["rows"] if r["batch_size"] == b]
        for m, (marker, color) in styles.items():
            sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["latency_ms"])
            if not sel:
                continue
            x = [r["latency_ms"] for r in sel]
            y = [r["top1"] for r in sel]
            xerr = [[r["latency_ms"] - r["latency_p10_ms"] for r in sel], [r["latency_p90_ms"] - r["latency_ms"]
                                                                           for r in sel]]
            ax.errorbar(x, y, xerr=xerr, fmt=marker + ("-" if m in ("hant", "hant-int8") else ""), color=color,
                        ms=9 if marker == "*" else 6, lw=1, capsize=2, label=LABELS[m])
        t = result["teacher_top1"]
        ax.axhline(t - result["max_drop"], color="grey", lw=0.8, ls="--", label=f"teacher − {result['max_drop']:g}")
        ax.set_xlabel("measured latency, ms (median, p10–p90)")
        ax.set_ylabel("test top-1, %")
        ax.set_title(f"{result['target']}, batch {b}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------- quick run


def make_quick_run(root: Path, log: Callable[[str], None] = print) -> Path:
    """A tiny run folder (phase 1 and scores done): timm's test EfficientNet at 32x32 on
    3000 Fashion-MNIST train images (synthetic images when Fashion-MNIST is not here), `tiny` space."""
    from hant.config import DataConfig, RunConfig
    from hant.data import load_data, save_tensor_data
    from hant.distill import distill
    from hant.errors import HantError
    from hant.run import init_run
    from hant.score import score
    from hant.teacher_train import train_teacher

    run = root / "run"
    if (run / "scores.json").exists():
        return run
    root.mkdir(parents=True, exist_ok=True)
    data_file = root / "data.safetensors"
    if not data_file.exists():
        try:
            s = load_data(DataConfig(spec="fashion-mnist", input_size=28, heldout=0))
            tr, te = s.train, s.test
            save_tensor_data(data_file, (tr.images[:3000], tr.labels[:3000]),
                             heldout=(tr.images[3000:3500], tr.labels[3000:3500]),
                             test=(te.images[:1000], te.labels[:1000]), classes=s.classes)
        except HantError as e:
            log(f"[headline] Fashion-MNIST not available ({e}); quick run on synthetic images")
            s = load_data(DataConfig(spec="synthetic:5000", input_size=32, heldout=500))
            tr, he, te = s.train, s.heldout, s.test
            save_tensor_data(data_file, (tr.images, tr.labels), heldout=(he.images, he.labels),
                             test=(te.images, te.labels), classes=s.classes)
    spec = f"tensors:{data_file.resolve()}"
    teacher_file = root / "teacher.safetensors"
    if not teacher_file.exists():
        log("[headline] quick: training timm:test_efficientnet at 32x32")
        meta = train_teacher("timm:test_efficientnet", DataConfig(spec=spec, input_size=32), epochs=4,
                             out=str(teacher_file), lr=3e-3, seed=0, log=log)
        log(f"[headline] quick teacher: {meta['test_top1']:.2f}% in {meta['train_time_s']:.0f} s")
    cfg = RunConfig()
    cfg.model.source = "timm:test_efficientnet"
    cfg.model.checkpoint = str(teacher_file.resolve())
    cfg.data.spec = spec
    cfg.data.input_size = 32
    cfg.space = "tiny"
    cfg.distill.images = 1024
    cfg.distill.heldout_images = 256
    cfg.score.images = 500
    cfg.finetune.epochs = 1.0
    cfg.finetune.bn_batches = 5
    cfg.latency.threads = 1
    cfg.latency.warmup = 3
    cfg.latency.min_repeats = 8
    cfg.latency.max_repeats = 40
    cfg.latency.time_cap_s = 20.0
    cfg_path = root / "run-config.yaml"
    cfg.save(cfg_path)
    init_run(run, config=str(cfg_path), log=log)
    distill(run, log=log)
    score(run, log=log)
    return run


# ----------------------------------------------------------------------------- main


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run folder with phase 1 and scores done (e.g. runs/demo)")
    p.add_argument("--out", help="results folder (default bench/results; with --quick /tmp/hant-headline-quick)")
    p.add_argument("--speedups", type=_floats, help="hant speedups (default 2,3,4; --quick 1.5,2)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 1])
    p.add_argument("--finetune-epochs", type=float, help="default: the run's finetune.epochs")
    p.add_argument("--small-epochs", type=float,
                   help="epochs for the smaller network, which starts from random weights (default: the same)")
    p.add_argument("--max-drop", type=float, default=0.4, help="top-1 points the sweep may lose (batch 64)")
    p.add_argument("--sweep-steps", type=int, help="extra hant speedups the sweep may try (default 2; --quick 1)")
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",")], default=list(METHODS),
                   help=f"alternatives to run, of {','.join(METHODS)}")
    p.add_argument("--alternatives-at", type=lambda s: [int(x) for x in s.split(",")],
                   help="batch sizes at which the alternatives are matched and trained (default: the first "
                        "batch size; at the others they are timed as they are)")
    p.add_argument("--validate", type=int, help="latency tables: networks to validate on (default 10; --quick 3)")
    p.add_argument("--match-tol", type=float, default=0.03, help="latency match tolerance (relative)")
    p.add_argument("--match-steps", type=int, help="latency probes per matched network (default 7; --quick 4)")
    p.add_argument("--random-draws", type=int, default=200,
                   help="random feasible plans drawn; the one closest to the budget is trained")
    p.add_argument("--prune-round-to", type=int, default=8, help="channel multiple after pruning (0: none)")
    p.add_argument("--time-cap", type=float, help="seconds of interleaved timing per batch size (default: the run's)")
    p.add_argument("--check-rounds", type=int, default=3,
                   help="times each hant plan's budget may be tightened after timing it against the teacher, as "
                        "`hant accelerate --check-rounds` (0: the latency table's prediction, no hardware check)")
    p.add_argument("--no-redistill", dest="redistill", action="store_false",
                   help="fine-tune hant's (and the random) plans from their phase-1 weights, without re-distilling "
                        "them on the student's own inputs first")
    p.add_argument("--quick", action="store_true", help="build and use a tiny run; a few minutes end to end")
    args = p.parse_args(argv)
    q = args.quick
    args.speedups = args.speedups or ([1.5, 2.0] if q else [2.0, 3.0, 4.0])
    args.sweep_steps = args.sweep_steps if args.sweep_steps is not None else (1 if q else 2)
    args.validate = args.validate if args.validate is not None else (3 if q else 10)
    args.match_steps = args.match_steps if args.match_steps is not None else (4 if q else 7)
    args.alternatives_at = args.alternatives_at or args.batch_sizes[:1]
    if args.check_rounds < 0:
        p.error("--check-rounds must be 0 or more")
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method {bad[0]}; choose from {', '.join(METHODS)}")
    out = Path(args.out or ("/tmp/hant-headline-quick" if q else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    command = "bench/headline.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def log(msg: str) -> None:
        print(msg, flush=True)

    from hant.errors import HantError

    t0 = time.perf_counter()
    try:
        if args.run:
            run = Path(args.run)
        elif q:
            run = make_quick_run(out / "quick", log)
        else:
            p.error("give --run RUN (a run folder with phase 1 and scores done), or --quick")
        bench = Bench(run, out, args, log)
        bench.log(f"[headline] run {run}: {bench.cfg.model.source}, input {'x'.join(map(str, bench.in_shape))}, "
                  f"space {bench.cfg.space}; fine-tuning {bench.epochs:g} epochs of {len(bench.splits.train)} images")
        bench.tables()
        bench.teacher_units()
        units_by_batch: dict[int, list[dict]] = {}
        best = None
        for b in args.batch_sizes:
            # Ascending, as `hant accelerate` selects them: each is capped by the smaller ones' budgets.
            found = {s: bench.hant_unit(b, s) for s in sorted(set(args.speedups))}
            if b == 64:
                best = sweep(bench, b, found, args.max_drop, args.sweep_steps)
                bench.log(f"[headline] sweep: largest speedup asked with drop <= {args.max_drop:g}: "
                          f"{best if best is not None else 'none'}")
            points = sorted(s for s in set(args.speedups) | ({best} if best and b == 64 else set())
                            if found.get(s) is not None)
            units = [bench.teacher_d, bench.cached("teacher-ft")]
            if "int8" in args.methods:
                units.append(bench.cached("teacher-int8"))
            units += [{**d, "sweep": s not in args.speedups} for s, d in sorted(found.items()) if d is not None]
            for s in points:
                ref = found[s]
                if "int8" in args.methods:
                    units.append(bench.hant_int8_unit(b, s, ref))
                if b in args.alternatives_at:
                    if "random" in args.methods:
                        units.append(bench.random_unit(b, s, ref))
                    for m in ("pruned", "smaller"):
                        if m in args.methods:
                            units.append(bench.matched_unit(m, b, s, ref))
            units_by_batch[b] = units
        matched_at = next((b for b in args.batch_sizes if b in args.alternatives_at), None)
        for b in args.batch_sizes:
            if b not in args.alternatives_at and matched_at is not None:
                units_by_batch[b] += timed_only(units_by_batch[matched_at])
        rows = build_rows(bench, units_by_batch)
        result = write_outputs(bench, rows, best, command, time.perf_counter() - t0)
    except HantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(f"[headline] {out / 'headline.json'}, {out / 'headline.md'}, {out / 'headline.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
