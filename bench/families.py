"""End to end on other families: `hant accelerate --speedup 2` on four teachers that are not EfficientNets.

    .venv/bin/python bench/families.py                          # the benchmark -> bench/results/families.json
    .venv/bin/python bench/families.py --quick --out /tmp/fq/families.json   # a smoke run, ~30 s

What it measures. For each teacher of `--models` (default the four below), trained here on
Fashion-MNIST at 64x64 (one channel) with one short, fixed recipe, it runs hant as a user
would, `hant accelerate --speedup 2` (`hant.pipeline.accelerate_run`: phase 1, latency
table, scores, selection checked on the hardware, fine-tuning, measurement, export; without
the refinement `accelerate` now runs by default, `REFINE = 0`, as the first rows were made:
bench/refine.py measures refinement on the same runs) on
onnxruntime-cpu at batch size 1, space `--space` (`default`), and records per teacher:

- `speedup` with `speedup_ci_lo`/`speedup_ci_hi`: the fine-tuned student timed against the
  teacher, interleaved, by `hant measure` (eval.json);
- `top1`: the student's test top-1; `teacher_top1`; `control_top1`: the teacher fine-tuned
  with the same fine-tuning recipe for the same epochs (`hant.kd.finetune_module` on a
  copy of the teacher, as bench/recovery.py does its control); `drop` = the better of
  teacher and control minus the student, in points;
- `pool_size` (mean candidates per layer; `pool_total` the sum), `layers` (replaceable
  layers) and `families`: how many of the 2x plan's layers each op family holds (the
  spec's first `_`-token; `teacher` = layer kept);
- `ablation_no_self`: the 2x plan selected without the `self` family (`SelectOptions(
  exclude_families=("self",))`, checked on the hardware like the main plan, its own plan
  name), re-distilled when the main plan was (`start`: the weights fine-tuning starts from)
  and fine-tuned the same way: held-out loss of the assembled student before fine-tuning
  (from phase-1 candidates, `heldout_loss`, and from the re-distilled ones,
  `heldout_loss_redistilled`) and test top-1 after, beside the same for the plan with it. Recorded as not
  applicable, with the reason, when the family is not registered or the run's pool has no
  `self` candidate; when the 2x plan uses no `self` layer the plan without it is the same.

Teachers (`MODELS`), each with the layers hant's default discovery finds: ResNet-18
(timm:resnet18, 8 blocks), RegNetX-200MF (timm:regnetx_002, 13 blocks), ConvNeXt-Atto
(timm:convnext_atto, 12 blocks and 3 stage downsamples) and MobileNetV3-Large
(timm:mobilenetv3_large_100, 16 blocks). Large rather than Small: at 64x64 the Small network is
10 MFLOP, of which its 12 blocks hold 86% (the Large one: 40 MFLOP, 93% in 16 blocks), so at
batch 1 its latency is mostly per-op overhead and the stem and head that no plan touches,
and 2x would mostly measure that; the Large one is also the mobile block design (inverted
residuals, SE, hard-swish) nearest the demo's EfficientNet-B0.

Recipe (`TEACHER`, `run_config`; written under `recipe` in the results). Teacher: `hant
train-teacher` on the train split (55000 images; 5000 held out, never trained on), 6 epochs,
batch 128, AdamW peak lr 2e-3 one-cycle, weight decay 0.05, label smoothing 0.1, random
crop and flip, no dropout or drop-path (a single short cycle underfits with them, as the
demo's teacher did), seed 0; cached at ~/.cache/hant/teachers/<model>-fmnist64-families
.safetensors (another --teacher-epochs gets `-e<N>` in the name) and reused; an
interrupted training resumes. Run: the demo's settings (phase 1 at 2% of an epoch per
candidate, scores on 1024 held-out images, latency timed on one thread), fine-tuning with
hant's defaults (2 epochs, KD + 0.5 CE, lr 1e-3, batch 64), `--epochs` to change it.

Resumable: every unit is kept and reused. Teachers as above; each run folder is
--cache/<model> (~/.cache/hant/families/<model>; `-<space>` and `-e<N>` appended for
another --space or --teacher-epochs), whose stages skip finished work (a model whose
student is measured is not run through the pipeline again); controls and held-out losses
are JSON files under --cache/units/<run>/ named by a hash of what they depend on, a
control's fine-tuning checkpoints under --cache/work/ and resumes there; the ablation's plan
and student live in the run folder. `--out` is rewritten after every unit, so a stopped
run leaves what it finished. To resume, run the same command again. A run of some of the
models (`--models`) keeps the complete rows of the others already in `--out` when they were
made with the same recipe (`recipe_key`), so the benchmark can be run a model at a time on
different days or machines; each row carries the command and fingerprint that made it.

Time on 2 CPU cores (estimates from the demo's stage times and the teachers' FLOPs):
teachers ~3 h (ResNet-18 ~70 min, ConvNeXt-Atto ~45, MobileNetV3-Large ~35, RegNetX ~30);
per model phase 1 + latency table + scores ~15-25 min, selection and checks ~2 min,
fine-tuning 2 epochs ~20-40 min, measurement and INT8 export ~2 min, the control ~30-50
min: about 9 hours in all, ~11 hours once the `self` family exists (one more 2-epoch
fine-tuning per model). Measured: RegNetX-200MF 58 min in all (teacher 17 min at ~320 img/s),
MobileNetV3-Large ~85 min (teacher ~30 min at ~190 img/s), ResNet-18 100 min (teacher 45 min at
~120 img/s); rerunning a model's ablation alone 6-15 min. --quick: about 30 s (a rerun of it, ~10 s).
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
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET = "onnxruntime-cpu"
BATCH_SIZE = 1
REFINE = 0  # rounds of `hant refine` after selection (bench/refine.py measures them on these runs)
UNIT_VERSION = 1
CACHE = Path.home() / ".cache" / "hant"


@dataclasses.dataclass(frozen=True)
class Model:
    """A teacher of the benchmark: its model source and the layer globs hant replaces."""

    name: str
    source: str
    include: tuple[str, ...] = ()
    why: str = ""


MODELS = {m.name: m for m in (
    Model("resnet18", "timm:resnet18", (), "ResNet-18: basic blocks layerN.i, 8 layers"),
    Model("regnetx_002", "timm:regnetx_002", (), "RegNetX-200MF: its 13 blocks s1.b1 ... s4.b4"),
    Model("convnext_atto", "timm:convnext_atto", (),
          "ConvNeXt-Atto: its blocks stages.i.blocks.j and the stage downsamples, 15 layers"),
    Model("mobilenetv3_large_100", "timm:mobilenetv3_large_100", (),
          "MobileNetV3-Large: blocks.i.j, 16 layers (Large, not Small: see the module docstring)"),
)}
QUICK_MODEL = Model("test_efficientnet", "timm:test_efficientnet", (), "timm's tiny test EfficientNet (--quick)")


@dataclasses.dataclass(frozen=True)
class Setting:
    """Data, budgets and the teacher recipe of one mode (the benchmark or --quick)."""

    data: str
    input_size: int
    heldout: int
    data_batch: int
    space: str
    teacher_epochs: float
    teacher_lr: float
    validate: int
    check_rounds: int
    int8: bool
    quick: bool


FULL = Setting(data="fashion-mnist", input_size=64, heldout=5000, data_batch=128, space="default",
               teacher_epochs=6.0, teacher_lr=2e-3, validate=10, check_rounds=3, int8=True, quick=False)
QUICK = Setting(data="synthetic:256", input_size=32, heldout=48, data_batch=32, space="tiny",
                teacher_epochs=1.0, teacher_lr=3e-3, validate=2, check_rounds=1, int8=False, quick=True)


def teacher_recipe(setting: Setting, epochs: float):
    """The fixed teacher recipe: TeacherRecipe's defaults but `epochs`, the lr and no dropout or drop-path."""
    from hant.teacher_train import TeacherRecipe

    return TeacherRecipe(epochs=float(epochs), lr=setting.teacher_lr, drop_rate=0.0, drop_path_rate=0.0, seed=0)


def data_config(setting: Setting):
    from hant.config import DataConfig

    return DataConfig(spec=setting.data, input_size=setting.input_size, heldout=setting.heldout,
                      batch_size=setting.data_batch)


def run_config(setting: Setting, model: Model, checkpoint: Path, space: str):
    """The run's configuration: the demo's budgets (hant's defaults otherwise), tiny ones with --quick."""
    from hant.config import RunConfig

    cfg = RunConfig()
    cfg.model.source = model.source
    cfg.model.checkpoint = str(checkpoint.resolve())
    cfg.data = data_config(setting)
    cfg.space = space
    cfg.layers.include = list(model.include)
    # One thread: the latency table is then timed with the thread's CPU clock, stable on a busy machine.
    cfg.latency.threads = 1
    if setting.quick:
        cfg.distill.images = 64
        cfg.distill.batch_size = 32
        cfg.finetune.epochs = 0.1
        cfg.finetune.batch_size = 32
        cfg.finetune.bn_batches = 2
        cfg.latency.warmup = 1
        cfg.latency.min_repeats = 3
        cfg.latency.max_repeats = 5
        cfg.latency.min_time_s = 0.0
        cfg.latency.time_cap_s = 10.0
    else:
        cfg.score.images = 1024  # as the demo: the scores stage stays near ten minutes on 2 cores
    return cfg


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def family_of(spec: str) -> str:
    """A spec's family: its first `_`-token (`mb_k3_e1_relu` -> mb, `teacher` -> teacher)."""
    return spec.split("_", 1)[0]


def family_counts(layers: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in layers.values():
        counts[family_of(spec)] = counts.get(family_of(spec), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ----------------------------------------------------------------------------- the benchmark


class Families:
    """The state of one benchmark: settings, caches, and the rows so far."""

    def __init__(self, args: argparse.Namespace, setting: Setting, models: list[Model], cache: Path,
                 teachers: Path, out: Path, command: str, log: Callable[[str], None] = print):
        self.args, self.setting, self.models = args, setting, models
        self.cache, self.teachers, self.out, self.command, self.log = cache, teachers, out, command, log
        self.rows: dict[str, dict[str, Any]] = {m.name: {"model": m.name, "source": m.source, "status": "pending"}
                                                for m in models}
        self.t0 = time.perf_counter()
        self._fingerprint: dict[str, Any] | None = None
        self.kept = self.earlier_rows()

    # --- names ----------------------------------------------------------------------------

    @property
    def space(self) -> str:
        return self.args.space or self.setting.space

    @property
    def teacher_epochs(self) -> float:
        return float(self.args.teacher_epochs if self.args.teacher_epochs is not None else self.setting.teacher_epochs)

    def variant(self) -> str:
        """What is appended to names for a non-default teacher recipe or space."""
        v = ""
        if self.teacher_epochs != self.setting.teacher_epochs:
            v += f"-e{self.teacher_epochs:g}"
        return v

    def teacher_file(self, model: Model) -> Path:
        s = self.setting
        tag = "fmnist" if s.data == "fashion-mnist" else s.data.replace(":", "").replace("/", "_")
        return self.teachers / f"{model.name}-{tag}{s.input_size}-families{self.variant()}.safetensors"

    def run_dir(self, model: Model) -> Path:
        extra = f"-{Path(self.space).stem}" if self.space != self.setting.space else ""
        return self.cache / f"{model.name}{extra}{self.variant()}"

    # --- rows of earlier runs -----------------------------------------------------------------

    def recipe_key(self) -> str:
        """What a row's numbers depend on beyond its own model: the recipe less the model list
        and the ablation's family (each row names its own ablation)."""
        return digest({k: v for k, v in self.recipe().items() if k not in ("models", "ablation")})

    def earlier_rows(self) -> dict[str, dict[str, Any]]:
        """The rows of `--out` for models this run leaves out, when `--out` was written with the
        same recipe: a benchmark of many hours can then be run a model or two at a time (on
        whatever machine is at hand; each row keeps its own fingerprint and command) and its
        results file still holds every model. Rows of another recipe are dropped, said in one line."""
        if not self.out.exists():
            return {}
        try:
            d = json.loads(self.out.read_text())
        except (OSError, ValueError) as e:
            self.log(f"[families] {self.out}: not readable ({e}); its rows are not kept")
            return {}
        rows = [r for r in d.get("rows", []) if r.get("model") not in self.rows and r.get("status") == "complete"]
        if not rows:
            return {}
        if d.get("recipe_key") != self.recipe_key():
            self.log(f"[families] {self.out}: rows of {', '.join(r['model'] for r in rows)} were made with another "
                     "recipe; they are not kept (rerun those models with this one)")
            return {}
        self.log(f"[families] keeping the earlier rows of {', '.join(r['model'] for r in rows)} from {self.out}")
        return {r["model"]: r for r in rows}

    # --- the cache of units ----------------------------------------------------------------

    def unit(self, run: Path, unit: str, settings: dict[str, Any], make: Callable[[], dict]) -> dict:
        """The cached record of `unit` made with `settings`, else make() timed and saved."""
        from hant.workspace import atomic_write_text

        key = digest({"version": UNIT_VERSION, **settings})
        path = self.cache / "units" / run.name / f"{unit}.json"
        if path.exists():
            try:
                d = json.loads(path.read_text())
                if d.get("key") == key and d.get("complete"):
                    return d
                self.log(f"[families] {run.name}/{unit}: cached with other settings; redoing it")
            except (OSError, ValueError):
                self.log(f"[families] {run.name}/{unit}: cached file unreadable; redoing it")
        self.log(f"[families] {run.name}/{unit} ...")
        t0 = time.perf_counter()
        d = make()
        d = {"unit": unit, "key": key, **d, "settings": settings, "complete": True,
             "cost_s": round(time.perf_counter() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(d, indent=1, default=str) + "\n")
        return d

    # --- units ------------------------------------------------------------------------------

    def teacher(self, model: Model) -> dict[str, Any]:
        """The trained teacher's JSON: reused when its weights and JSON are there, else trained
        (train_teacher resumes from its partial file)."""
        from hant.errors import HantError
        from hant.teacher_train import train_teacher

        out = self.teacher_file(model)
        meta_file = out.with_suffix(".json")
        recipe = teacher_recipe(self.setting, self.teacher_epochs)
        if out.exists() and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            want = {"source": model.source, "input_size": self.setting.input_size, "epochs": recipe.epochs,
                    "lr": recipe.lr}
            got = {k: meta.get(k) for k in want}
            if got != want:
                raise HantError(f"{out} was trained with {got}, not {want}; delete it (and {meta_file}) to retrain")
            self.log(f"[families] teacher {model.name}: cached {out} (test top-1 {meta.get('test_top1'):.2f}%)")
            return meta
        out.parent.mkdir(parents=True, exist_ok=True)
        command = (f"hant train-teacher --model {model.source} --data {self.setting.data} --input-size "
                   f"{self.setting.input_size} --batch-size {self.setting.data_batch} {recipe.flags()} --out {out}")
        self.log(f"[families] teacher {model.name}: {command}")
        return train_teacher(model.source, data_config(self.setting), recipe, out=str(out), command=command,
                             log=self.log)

    def accelerate(self, model: Model, run: Path, cfg_path: Path, epochs: float) -> str:
        """`hant accelerate --speedup S` on the run folder; returns the plan name. A run whose
        student is fine-tuned for `epochs` and measured is left as it is."""
        from hant.finetune import finetune
        from hant.pipeline import AccelerateOptions, accelerate_run, plan_name
        from hant.workspace import RunDir

        a, s = self.args, self.setting
        name = plan_name(TARGET, BATCH_SIZE, a.speedup)
        student = RunDir(run).student_dir(name)
        if self._student_done(student, epochs, s.int8):
            self.log(f"[families] {run.name}: {name} fine-tuned and measured; accelerate skipped")
            return name
        # Selection as the first rows were made, without `hant refine` (REFINE); what refinement
        # changes on these runs is bench/refine.py's to measure.
        opts = AccelerateOptions(target=TARGET, batch_size=BATCH_SIZE, speedups=[a.speedup], validate=s.validate,
                                 int8=s.int8, finetune_epochs=epochs, check_rounds=s.check_rounds, candidates=1,
                                 refine=REFINE)
        accelerate_run(run, opts, init_kwargs={"config": str(cfg_path)}, log=self.log)
        if not self._student_done(student, epochs, s.int8):
            # The pipeline keeps an intact student whatever its epochs; another --epochs trains anew.
            from hant import export as export_mod
            from hant import measure as measure_mod

            self.log(f"[families] {run.name}: the student of {name} was fine-tuned for other epochs; "
                     f"fine-tuning {epochs:g} epochs")
            finetune(run, name, epochs=epochs, log=self.log)
            measure_mod.measure(run, name, log=self.log)
            export_mod.export(run, name, int8=s.int8, log=self.log)
        return name

    @staticmethod
    def _student_done(student: Path, epochs: float, int8: bool, start: str | None = None) -> bool:
        """Whether the student is fine-tuned for `epochs`, measured (and exported to INT8 with
        `int8`), having started from `start` candidate weights ("phase1" or "redistilled") when given."""
        try:
            ev = json.loads((student / "eval.json").read_text())
        except (OSError, ValueError):
            return False
        st = ev.get("student") or {}
        ok = (st.get("top1") is not None and st.get("latency_ms") is not None and ev.get("speedup") is not None
              and (ev.get("finetune") or {}).get("epochs") == epochs and (student / "student.safetensors").exists())
        if start is not None and (ev.get("start") or {}).get("candidate_weights", "phase1") != start:
            return False
        return ok and (not int8 or (ev.get("int8") or {}).get("top1") is not None)

    def base_settings(self, the_run) -> dict[str, Any]:
        d = the_run.config.data
        return {"teacher_sha256": the_run.layers_doc.get("checkpoint_sha256"), "seed": the_run.config.seed,
                "data": {"spec": d.spec, "input_size": d.input_size, "heldout": d.heldout, "seed": d.seed}}

    def control(self, run: Path, the_run, splits, epochs: float) -> dict[str, Any]:
        """The teacher fine-tuned with the run's fine-tuning recipe for `epochs` (the feature
        loss, when on, at every replaceable layer of the run), and its test top-1."""
        cfg = the_run.config
        ft = dataclasses.asdict(cfg.finetune)
        layers = [info.name for info in the_run.layers]
        settings = {**self.base_settings(the_run), "control": True, "epochs": epochs, "finetune": ft,
                    "train": len(splits.train), "feature_layers": layers if cfg.finetune.feature_loss != "none" else []}
        unit = f"control-e{epochs:g}-{digest(settings, 12)}"

        def make():
            return {"epochs": epochs, **teacher_control(the_run, splits, epochs, self.cache / "work" / run.name / unit,
                                                        unit, self.log)}

        return self.unit(run, unit, settings, make)

    @staticmethod
    def evaluate(model, dataset, cfg) -> dict[str, float]:
        import torch

        from hant.data import make_loader
        from hant.teacher_train import evaluate

        model.eval().to(memory_format=torch.channels_last)
        try:
            return evaluate(model, make_loader(dataset, cfg.finetune.batch_size, num_workers=cfg.data.workers))
        finally:
            model.to(memory_format=torch.contiguous_format)

    def heldout_before(self, run: Path, the_run, splits, layers: dict[str, str],
                       redistilled_plan: str | None = None) -> dict[str, Any]:
        """Held-out loss and top-1 of the plan assembled from its phase-1 candidates (from the
        re-distilled ones of `redistilled_plan` when given), BatchNorm statistics re-estimated,
        before any fine-tuning."""
        from hant.errors import HantError
        from hant.student import TEACHER_SPEC, assemble
        from hant.workspace import sha256_file

        index = the_run.candidate_index()
        cfg = the_run.config
        settings = {**self.base_settings(the_run), "layers": layers,
                    "weights": {n: (index.get((n, sp)) or {}).get("sha256") for n, sp in layers.items()
                                if sp != TEACHER_SPEC},
                    "bn_batches": cfg.finetune.bn_batches, "bn_batch_size": cfg.finetune.batch_size,
                    "heldout_images": len(splits.heldout)}
        if redistilled_plan is not None:
            settings["redistilled_index_sha256"] = sha256_file(the_run.dir.redistilled_index(redistilled_plan))
        unit = f"heldout-{digest(settings, 12)}"

        def make():
            plan = {"layers": layers} if redistilled_plan is None else redistilled_plan
            model = assemble(run, plan, bn_recalibrate=True, splits=splits, log=self.log,
                             redistilled=redistilled_plan is not None)
            if redistilled_plan is not None and model.hant_arch.get("candidate_weights") != "redistilled":
                raise HantError(f"the re-distilled weights of plan {redistilled_plan} are not current; "
                                "rerun the same command")
            r = self.evaluate(model, splits.heldout, cfg)
            return {"heldout_loss": r["loss"], "heldout_top1": r["top1"], "heldout_n": r["n"]}

        return self.unit(run, unit, settings, make)

    def heldout_redistilled(self, run: Path, the_run, splits, plan: str, layers: dict[str, str]) -> dict[str, Any]:
        """`heldout_before` of the plan's re-distilled candidates, as fine-tuning starts from them:
        {"heldout_loss_redistilled", "heldout_top1_redistilled"}."""
        r = self.heldout_before(run, the_run, splits, layers, redistilled_plan=plan)
        return {"heldout_loss_redistilled": r["heldout_loss"], "heldout_top1_redistilled": r["heldout_top1"]}

    def ablation(self, run: Path, the_run, splits, plan: str, epochs: float, main: dict[str, Any]) -> dict[str, Any]:
        """The plan of the same speedup without `--ablate-family`, fine-tuned the same way, beside the plan with it."""
        from hant import ops
        from hant.errors import HantError

        fam = self.args.ablate_family
        rec: dict[str, Any] = {"family": fam, "applicable": False, "reason": None}
        if fam not in ops.families():
            rec["reason"] = (f"the `{fam}` family is not registered in this checkout (hant.ops.families(): "
                             f"{', '.join(ops.families())})")
            return rec
        pool = [sp for d in the_run.layers_doc["layers"] for sp in d.get("candidates") or []]
        if not any(family_of(sp) == fam for sp in pool):
            rec["reason"] = f"the run's pool (space `{the_run.config.space}`) has no `{fam}` candidate"
            return rec
        rec["applicable"] = True
        with_layers = main["layers"]
        rec["with"] = {"plan": plan, "uses": sum(family_of(sp) == fam for sp in with_layers.values()),
                       **self.heldout_before(run, the_run, splits, with_layers),
                       **(self.heldout_redistilled(run, the_run, splits, plan, with_layers)
                          if main["start"] == "redistilled" else {}),
                       "start": main["start"], "top1": main["top1"], "top1_assembled": main["top1_assembled"],
                       "speedup": main["speedup"], "speedup_ci": [main["speedup_ci_lo"], main["speedup_ci_hi"]]}
        for k in ("unit", "key", "settings", "complete", "finished", "cost_s"):
            rec["with"].pop(k, None)
        self.rows[main["model"]]["ablation_no_" + fam] = rec
        self.write()
        if rec["with"]["uses"] == 0:
            # Without a family it does not use, the integer program's optimum stays the same plan.
            rec.update(same_plan=True, without={**rec["with"], "plan": plan},
                       note=f"the {self.args.speedup:g}x plan uses no `{fam}` layer, so the plan without the "
                            "family is the same plan")
            return rec
        try:
            rec["without"] = self.ablation_student(run, the_run, splits, plan, epochs, main["start"])
        except HantError as e:  # e.g. the speedup is out of reach without the family
            rec["without"] = {"error": str(e)}
            return rec
        rec["same_plan"] = rec["without"]["layers"] == with_layers
        rec["layers_differ"] = sum(with_layers.get(n) != sp for n, sp in rec["without"]["layers"].items())
        rec["delta_heldout_loss"] = rec["without"]["heldout_loss"] - rec["with"]["heldout_loss"]
        rec["delta_top1"] = rec["without"]["top1"] - rec["with"]["top1"]
        if "error" not in rec["without"]:
            rec["paired"] = self.paired_ablation(run, the_run, splits, plan, rec["without"]["plan"], main["start"])
        return rec

    def paired_ablation(self, run: Path, the_run, splits, with_plan: str, without_plan: str,
                        start: str) -> dict[str, Any]:
        """The two plans of the ablation compared image by image (hant.paired): test top-1 of the
        fine-tuned students and held-out loss of the students fine-tuning started from (`start`
        weights, BatchNorm re-estimated), each as without minus with, with its 95% interval."""
        from hant.data import make_loader
        from hant.paired import compare, compare_loss, predictions, same_images
        from hant.student import STUDENT_FILE, assemble, load_student
        from hant.workspace import sha256_file

        rd, cfg = the_run.dir, the_run.config
        redistilled = start == "redistilled"
        settings = {**self.base_settings(the_run), "paired": 1, "start": start,
                    "students": {p: sha256_file(rd.student_dir(p) / STUDENT_FILE) for p in (with_plan, without_plan)},
                    "redistilled": {p: sha256_file(rd.redistilled_index(p)) for p in (with_plan, without_plan)}
                    if redistilled else None, "bn_batches": cfg.finetune.bn_batches}
        unit = f"paired-{digest(settings, 12)}"

        def scored(model, dataset):
            import torch

            model.to(memory_format=torch.channels_last)
            return predictions(model, make_loader(dataset, cfg.finetune.batch_size, num_workers=cfg.data.workers))

        def make():
            test = {p: scored(load_student(rd.student_dir(p)), splits.test) for p in (with_plan, without_plan)}
            held = {p: scored(assemble(run, p, bn_recalibrate=True, splits=splits, log=self.log,
                                       redistilled=redistilled), splits.heldout) for p in (with_plan, without_plan)}
            w, wo = test[with_plan], test[without_plan]
            same_images(w, wo)
            top1 = compare(wo.right, w.right)  # drop: without's top-1 minus with's
            hw, hwo = held[with_plan], held[without_plan]
            same_images(hw, hwo)
            loss = compare_loss(hw.loss, hwo.loss)  # increase: without's loss minus with's
            return {"test_top1_without_minus_with": {"value": top1["drop"], "ci95": top1["drop_ci95"],
                                                     "images": top1["images"],
                                                     "only_with_right": top1["network_only"],
                                                     "only_without_right": top1["reference_only"]},
                    "heldout_loss_without_minus_with": {"value": loss["increase"], "ci95": loss["increase_ci95"],
                                                        "images": loss["images"], "start": start}}

        d = self.unit(run, unit, settings, make)
        return {k: d[k] for k in ("test_top1_without_minus_with", "heldout_loss_without_minus_with")}

    def ablation_student(self, run: Path, the_run, splits, plan: str, epochs: float, start: str) -> dict[str, Any]:
        """The plan without the family, selected and checked like the main one, then started from
        the same kind of weights as the main student (`start`: re-distilled when it was) and
        fine-tuned the same way."""
        from hant import redistill as redistill_mod
        from hant.finetune import finetune
        from hant.latency import table_id
        from hant.measure import measure, time_plan
        from hant.select import SelectOptions, select, select_measured
        from hant.workspace import RunDir, read_json

        fam, s = self.args.ablate_family, self.setting
        name = f"{plan}-no{fam}"
        rd = RunDir(run)
        path = rd.plan(name)
        settled = False
        if path.exists():
            try:
                d = read_json(path)
                settled = ((d.get("constraints") or {}).get("excluded_families") == [fam]
                           and (s.check_rounds <= 0 or "latency_check" in d))
            except Exception:  # noqa: BLE001 - a damaged plan file is selected again
                settled = False
        if not settled:
            options = SelectOptions(exclude_families=(fam,))
            tid = table_id(TARGET, BATCH_SIZE)
            if s.check_rounds > 0:
                select_measured(run, tid, speedup=self.args.speedup, name=name,
                                timer=lambda r, n: time_plan(r, n, log=self.log), rounds=s.check_rounds,
                                options=options, log=self.log)
            else:
                select(run, target=tid, speedup=self.args.speedup, name=name, options=options, log=self.log)
        doc = read_json(path)
        layers = doc["layers"]
        h = self.heldout_before(run, the_run, splits, layers)
        held = {"heldout_loss": h["heldout_loss"], "heldout_top1": h["heldout_top1"]}
        if start == "redistilled":
            if not redistill_mod.is_current(run, name):
                redistill_mod.redistill(run, name, log=self.log)
            held.update(self.heldout_redistilled(run, the_run, splits, name, layers))
        student = rd.student_dir(name)
        if not self._student_done(student, epochs, int8=False, start=start):
            finetune(run, name, epochs=epochs, log=self.log)
            measure(run, name, log=self.log)
        ev = json.loads((student / "eval.json").read_text())
        check = ((doc.get("latency_check") or {}).get("rounds") or [{}])[-1]
        return {"plan": name, "layers": layers, "families": family_counts(layers), **held, "start": start,
                "top1": ev["student"]["top1"], "top1_assembled": ev["student"].get("top1_assembled"),
                "speedup": ev.get("speedup"), "speedup_ci": [ev.get("speedup_ci_lo"), ev.get("speedup_ci_hi")],
                "check_speedup": check.get("speedup"), "check_met": (doc.get("latency_check") or {}).get("met")}

    # --- one model ----------------------------------------------------------------------------

    def model(self, model: Model) -> None:
        from hant.data import load_data
        from hant.run import Run

        row = self.rows[model.name]
        meta = self.teacher(model)
        row.update(status="teacher trained", teacher_train={
            k: meta.get(k) for k in ("test_top1", "heldout_top1", "epochs", "steps", "batch_size", "lr",
                                     "train_time_s", "images_per_s", "sha256")})
        row["teacher_train"]["file"] = str(self.teacher_file(model))
        self.write()

        run = self.run_dir(model)
        cfg_path = self.cache / "configs" / f"{run.name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg = run_config(self.setting, model, self.teacher_file(model), self.space)
        cfg.save(cfg_path)
        epochs = float(self.args.epochs if self.args.epochs is not None else cfg.finetune.epochs)
        row.update(run=str(run), space=self.space, include=list(model.include), finetune_epochs=epochs)
        plan = self.accelerate(model, run, cfg_path, epochs)

        the_run = Run(run)
        plan_d = the_run.plan(plan)
        ev = json.loads((the_run.dir.student_dir(plan) / "eval.json").read_text())
        layers_doc = the_run.layers_doc["layers"]
        sizes = [len(d.get("candidates") or []) for d in layers_doc]
        check = (plan_d.get("latency_check") or {})
        stages = {}
        timings = run / "timings.json"
        if timings.exists():
            stages = json.loads(timings.read_text()).get("stages", {})
        row.update(
            status="accelerated", plan=plan, teacher_top1=ev["teacher"]["top1"], top1=ev["student"]["top1"],
            top1_assembled=ev["student"].get("top1_assembled"), speedup=ev.get("speedup"),
            speedup_ci_lo=ev.get("speedup_ci_lo"), speedup_ci_hi=ev.get("speedup_ci_hi"),
            teacher_ms=(ev.get("teacher") or {}).get("latency_ms"), student_ms=ev["student"].get("latency_ms"),
            params={"teacher": ev["teacher"].get("params"), "student": ev["student"].get("params")},
            flops={"teacher": ev["teacher"].get("flops"), "student": ev["student"].get("flops")},
            int8={k: (ev.get("int8") or {}).get(k) for k in ("top1", "speedup")} if ev.get("int8") else None,
            pool_size=sum(sizes) / max(1, len(sizes)), pool_total=sum(sizes), layers=len(layers_doc),
            families=family_counts(plan_d["layers"]), plan_layers=plan_d["layers"],
            predicted_speedup=plan_d.get("predicted_speedup"),
            plan_check={"speedup": (check.get("rounds") or [{}])[-1].get("speedup"), "met": check.get("met"),
                        "rounds": len(check.get("rounds") or [])},
            accuracy_risk_large=(plan_d.get("accuracy_risk") or {}).get("large"), stage_s=stages)
        self.set_drop(row)
        self.write()

        splits = load_data(the_run.config.data)
        c = self.control(run, the_run, splits, epochs)
        row.update(control_top1=c["top1"], control={"epochs": c["epochs"], "steps": c["finetune"]["steps"],
                                                     "final_loss": c["finetune"]["final_loss"],
                                                     "cost_s": c.get("cost_s"), "unit": c["unit"]})
        self.set_drop(row)
        row["status"] = "control done"
        self.write()

        main = {"model": model.name, "layers": plan_d["layers"], "top1": row["top1"],
                "start": (ev.get("start") or {}).get("candidate_weights", "phase1"),
                "top1_assembled": row["top1_assembled"], "speedup": row["speedup"],
                "speedup_ci_lo": row["speedup_ci_lo"], "speedup_ci_hi": row["speedup_ci_hi"]}
        row["ablation_no_" + self.args.ablate_family] = self.ablation(run, the_run, splits, plan, epochs, main)
        row.update(status="complete", command=self.command, fingerprint=self.fingerprint())
        self.write()

    @staticmethod
    def set_drop(row: dict[str, Any]) -> None:
        t, c, s = row.get("teacher_top1"), row.get("control_top1"), row.get("top1")
        if t is None or s is None:
            return
        ref = max(t, c) if c is not None else t
        row["reference"] = "control" if c is not None and c > t else (
            "teacher" if c is not None else "teacher (control not yet run)")
        row["reference_top1"] = ref
        row["drop"] = ref - s

    def run_all(self) -> int:
        from hant.errors import HantError

        failed = 0
        self.write()
        for m in self.models:
            try:
                self.model(m)
            except HantError as e:
                failed += 1
                self.rows[m.name].update(status="failed", error=str(e))
                self.log(f"[families] {m.name}: {e}")
                self.write()
        return failed

    # --- results -------------------------------------------------------------------------

    def recipe(self) -> dict[str, Any]:
        s, a = self.setting, self.args
        r = teacher_recipe(s, self.teacher_epochs)
        cfg = run_config(s, self.models[0], Path("teacher.safetensors"), self.space)
        epochs = float(a.epochs if a.epochs is not None else cfg.finetune.epochs)
        return {
            "teacher": {"data": s.data, "input_size": s.input_size, "in_chans": 1, "heldout": s.heldout,
                        "batch_size": s.data_batch, "optimizer": "AdamW, one-cycle lr (hant.schedule)",
                        **{k: v for k, v in dataclasses.asdict(r).items() if k != "init_from"},
                        "flags": f"--input-size {s.input_size} --batch-size {s.data_batch} {r.flags()}".strip(),
                        "weights": str(self.teachers / ("<model>-" + self.teacher_file(self.models[0]).name.split(
                            "-", 1)[1]))},
            "models": {m.name: {"source": m.source, "include": list(m.include), "why": m.why} for m in self.models},
            "accelerate": {"target": TARGET, "batch_size": BATCH_SIZE, "speedup": a.speedup, "space": self.space,
                           "check_rounds": s.check_rounds, "candidates": 1, "validate": s.validate, "int8": s.int8,
                           # Named only when on, so that rows made before refinement existed keep their key.
                           **({"refine": REFINE} if REFINE else {})},
            "distill": {k: getattr(cfg.distill, k) for k in ("images", "epochs", "batch_size", "optimizer", "lr")},
            "score": dataclasses.asdict(cfg.score),
            "latency": dataclasses.asdict(cfg.latency),
            "finetune": {**dataclasses.asdict(cfg.finetune), "epochs": epochs},
            "control": "the teacher fine-tuned by hant.kd.finetune_module with the finetune recipe above "
                       "for the same epochs",
            "ablation": f"the {a.speedup:g}x plan with SelectOptions(exclude_families=('{a.ablate_family}',)), "
                        "checked on the hardware like the main plan, fine-tuned with the same recipe",
        }

    def results(self) -> dict[str, Any]:
        a = self.args
        note = (f"{'QUICK SMOKE RUN (synthetic data, tiny budgets): the numbers mean nothing. ' if a.quick else ''}"
                f"hant accelerate --speedup {a.speedup:g} on {TARGET} batch {BATCH_SIZE} per teacher. speedup: "
                "eval.json's measured speedup of the fine-tuned student over the teacher (interleaved timing, "
                "bootstrap 95% interval). top1/teacher_top1/control_top1: test top-1 (%). drop: max(teacher, "
                "control) - student, in points. pool_size: mean candidates per layer (pool_total: all); families: "
                f"layers of the plan per op family (first `_`-token of the spec). ablation_no_{a.ablate_family}: "
                "held-out loss of the assembled student before fine-tuning and test top-1 after, for the plan "
                "with and without the family.")
        if a.note:
            note += " " + a.note
        ran = [self.rows[m.name] for m in self.models]
        return {"version": 1, "command": self.command, "note": note, "recipe": self.recipe(),
                "recipe_key": self.recipe_key(), "rows": self.ordered(list(self.kept.values()) + ran),
                "rows_kept_from_earlier_runs": sorted(self.kept), "fingerprint": self.fingerprint(),
                "wall_time_s": round(time.perf_counter() - self.t0, 1), "cache": str(self.cache)}

    @staticmethod
    def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The benchmark's own models first, in MODELS' order, then the others by name."""
        known = list(MODELS)
        return sorted(rows, key=lambda r: (known.index(r["model"]) if r["model"] in known else len(known), r["model"]))

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:  # once: it runs git
            self._fingerprint = fingerprint()
        return self._fingerprint

    def write(self) -> dict[str, Any]:
        from hant.workspace import atomic_write_text

        result = self.results()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(result, indent=1, default=str) + "\n")
        return result


def cpu_flags() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {k: k in flags for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")} | {
        "vnni": "avx512_vnni" in flags or "avx_vnni" in flags}


def teacher_control(the_run, splits, epochs: float, work: Path, key: str, log: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    """The control of every benchmark here: a copy of the run's teacher fine-tuned with the
    run's fine-tuning recipe for `epochs` (`hant.kd.finetune_module`, the loop of hant's
    students; the feature loss, when on, at every replaceable layer), its checkpoints under
    `work` resuming by `key` and removed once done. Returns {"top1" (test), "finetune":
    {steps, batch_size, final_loss, time_s}}."""
    from hant.kd import finetune_module

    cfg = the_run.config
    layers = [info.name for info in the_run.layers] if cfg.finetune.feature_loss != "none" else None
    teacher = the_run.teacher().eval()
    model = copy.deepcopy(teacher)
    res = finetune_module(model, teacher, cfg, splits.train, epochs=epochs, out_dir=work, key=key, log=log,
                          feature_layers=layers)
    top1 = Families.evaluate(model, splits.test, cfg)["top1"]
    shutil.rmtree(work, ignore_errors=True)
    return {"top1": top1, "finetune": {k: res.get(k) for k in ("steps", "batch_size", "final_loss", "time_s")}}


def fingerprint() -> dict[str, Any]:
    import onnxruntime
    import timm
    import torch

    from hant.latency import available_cores, cpu_model

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "cores_available": available_cores(),
            "torch_threads": torch.get_num_threads(), "latency_threads": 1,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
            "hant_commit": commit, "system": platform.platform()}


def table_text(result: dict[str, Any]) -> str:
    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    lines = ["| model | teacher | control | student | drop | speedup [95% CI] | layers | pool/layer | families |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        sp = (f"{r['speedup']:.2f}x [{f(r.get('speedup_ci_lo'))}, {f(r.get('speedup_ci_hi'))}]"
              if r.get("speedup") is not None else "n/a")
        fams = ", ".join(f"{k} {v}" for k, v in (r.get("families") or {}).items())
        lines.append(f"| {r['model']} | {f(r.get('teacher_top1'))} | {f(r.get('control_top1'))} | {f(r.get('top1'))} "
                     f"| {f(r.get('drop'), '+.2f')} | {sp} | {r.get('layers', 'n/a')} | {f(r.get('pool_size'), '.1f')} "
                     f"| {fams} |" + (f" {r['status']}: {r.get('error', '')}" if r.get("status") == "failed" else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help=f"comma list of {', '.join(MODELS)} or other timm names (default: those four; --quick: "
                        f"{QUICK_MODEL.name})")
    p.add_argument("--speedup", type=float, default=2.0, help="speedup asked of hant accelerate (default 2)")
    p.add_argument("--epochs", type=float, help="fine-tuning epochs of students and controls (default: the run's "
                                                "finetune.epochs: 2, --quick 0.1)")
    p.add_argument("--teacher-epochs", type=float, help="teacher training epochs (default 6; --quick 1)")
    p.add_argument("--space", help="candidate space (default: the run config's, `default`; --quick `tiny`)")
    p.add_argument("--ablate-family", default="self", help="the op family the ablation leaves out (default self)")
    p.add_argument("--cache", help="run folders and units (default ~/.cache/hant/families; --quick: beside --out)")
    p.add_argument("--teachers", help="teacher weights (default ~/.cache/hant/teachers; --quick: CACHE/teachers)")
    p.add_argument("--out", help="results JSON (default bench/results/families.json; --quick "
                                 "/tmp/hant-families-quick/families.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: synthetic:256 at 32 px, tiny space and budgets")
    p.add_argument("--note", help="a note appended to the results' `note`")
    args = p.parse_args(argv)
    if not args.speedup > 1:
        p.error("--speedup must be above 1")
    if args.epochs is not None and not args.epochs > 0:
        p.error("--epochs must be positive")
    setting = QUICK if args.quick else FULL
    names = args.models or ([QUICK_MODEL.name] if args.quick else list(MODELS))
    models = [MODELS.get(n) or (QUICK_MODEL if n == QUICK_MODEL.name else
                                Model(n.split(":")[-1], n if ":" in n else f"timm:{n}")) for n in names]
    if args.quick:
        out = Path(args.out) if args.out else Path("/tmp/hant-families-quick/families.json")
        cache = Path(args.cache).expanduser() if args.cache else out.parent / "families-cache"
        teachers = Path(args.teachers).expanduser() if args.teachers else cache / "teachers"
    else:
        out = Path(args.out) if args.out else RESULTS / "families.json"
        cache = Path(args.cache).expanduser() if args.cache else CACHE / "families"
        teachers = Path(args.teachers).expanduser() if args.teachers else CACHE / "teachers"
    command = "bench/families.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))

    def log(msg: str) -> None:
        print(msg, flush=True)

    from hant.errors import HantError

    t0 = time.perf_counter()
    bench = Families(args, setting, models, cache, teachers, out, command, log)
    log(f"[families] {', '.join(m.source for m in models)}; {setting.data} at {setting.input_size} px, space "
        f"{bench.space}; cache {cache}; results {out}")
    try:
        failed = bench.run_all()
    except HantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = bench.write()
    print(table_text(result))
    print(f"[families] {out} in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
