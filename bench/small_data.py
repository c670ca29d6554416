"""The small-data case: a ResNet-18 trained on a 1,500-image ImageFolder, `hant accelerate` at the defaults.

    .venv/bin/python bench/small_data.py                           # -> bench/results/small_data.json
    .venv/bin/python bench/small_data.py --distill-images 128,4096  # + a curve over phase-1 images
    .venv/bin/python bench/small_data.py --quick                    # smoke run, under a minute

What it measures. A user with a small dataset of their own, typing the commands of the CLI:

1. Data. An ImageFolder tree made from the Fashion-MNIST idx files of the Debian package
   dataset-fashion-mnist (/usr/share/datasets/fashion-mnist): 150 images per class of its
   train split as train/<class>/<index>.png (1,500 images) and 100 per class of its test
   split as test/<class>/<index>.png (1,000), 28x28 grey PNGs, drawn by a permutation
   seeded with 0 per class (the source indices are listed in dataset.json). hant takes it
   as `--data imagefolder:DIR`: with train/ and test/ inside, train/ is the pool and
   test/ the test split; `data.heldout` (default 5000) is capped at a fifth of the pool,
   so 300 of the 1,500 are held out (a seeded draw, the same for the teacher and every
   run) and 1,200 train. The default held-out size therefore suits this set and is left
   as it is.
2. Teacher. `hant train-teacher --model timm:resnet18` on it at `--input-size` 64 (the 28 px
   images upscaled; at 32 the last stage sees 1x1 maps), `--teacher-epochs` 40 at batch
   64 (~750 AdamW steps), hant's recipe otherwise (lr 3e-3 one-cycle, weight decay 0.05,
   label smoothing 0.1, dropout 0.2, drop-path 0.1, random crop and flip, seed 0): on
   1,200 images a long schedule with its regularisation, not a short one. Its test top-1
   is `teacher_top1`.
3. `hant accelerate --speedup 2 --speedup 3` with every default (space `default`; phase 1
   at `distill.epochs` 0.02 of an epoch per candidate, 24 of the 1,200 images, raised to
   the floor `distill.min_images` 1024, 8 steps of 128; the plan's layers re-distilled on
   the student's inputs; fine-tuning 2 epochs, 18 steps of 128, raised to the floor
   `finetune.min_steps` 200, about 22 epochs; target onnxruntime-cpu at `--batch-size` 1,
   three hardware checks, INT8 export), in a run folder of its own. Per speedup a row:
   `measured_speedup` (eval.json: the fine-tuned student timed against the teacher,
   interleaved, by `hant measure`) with its 95% interval, `top1` (student, test),
   `control_top1` (the teacher fine-tuned with the run's recipe for the students' epochs,
   floor included: `hant.kd.finetune_module` on a copy, once per teacher and recipe),
   `drop` (the better of teacher and control minus the student, in points, so that what
   extra training does for the teacher is not counted as recovery; `drop_vs_teacher` beside
   it), `wall_s` (the `hant accelerate` call that made both rows), `stages`
   (RUN/timings.json: the shared stages and this plan's own), and what phase 1 used per
   candidate: `images_per_candidate` (as hant resolves the budget) and
   `phase1_images_trained` (its steps times the batch: whole batches, so at least one batch).
4. `--distill-images N[,N...]`: the same with `distill.images: N` (a config YAML passed
   with --config, nothing else changed), each in its own run folder, for a curve of drop
   and wall time against phase-1 images per candidate; rows carry `distill_images` (None
   for the defaults). `--no-redistill` is passed through when `hant accelerate` has that
   flag (read from its --help) and refused otherwise.

The goal checked under `goal`: at the defaults, the 2x row measures at least 2x with a drop
of at most 1.0 point. With 1,000 test images one standard error of a top-1 near 85% is
about 1.1 points, so a single run decides the goal only when the drop is far from 1.

Resumable: the dataset (written once, reused when dataset.json and every file are there),
the teacher (`hant train-teacher` resumes its own partial file) and the run folders live in
--cache (default ~/.cache/hant/small-data). A variant whose run folder holds every student
measured is read back, not run; an unfinished one is given to `hant accelerate` again,
which skips finished stages. Calls and their wall times are kept in CACHE/units/. `--out`
is rewritten after every step, so a stopped run keeps what finished.

Time on 2 idle CPU cores, measured here: dataset ~10 s, teacher 480 s (46,000 images at
64 px, ~100 images/s), accelerate at the defaults 1,053 s (phase 1 of 285 candidates at
1,024 images each 261 s, latency table 133, scores on 300 held-out images 149, per speedup
selection with checks ~5, re-distillation 50-75, fine-tuning 200 steps ~190, measurement and
INT8 export ~30), the control 258 s: about 30 min in all. Each --distill-images variant
repeats the whole run (~13 min besides phase 1, whose cost grows with N). --quick: ~50 s
(a rerun that reuses everything ~10 s).
"""

from __future__ import annotations

import os
import sys

# Before torch: spinning OpenMP workers slow every other process on a small shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not sys.stderr.isatty():  # progress bars into a log file: one line every 30 s, not ten a second
    os.environ.setdefault("TQDM_MININTERVAL", "30")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET = "onnxruntime-cpu"
MODEL = "timm:resnet18"
SEED = 0
UNIT_VERSION = 1
GOAL_SPEEDUP, GOAL_DROP = 2.0, 1.0


@dataclasses.dataclass(frozen=True)
class Setting:
    """Data, teacher recipe and accelerate flags of one mode (the benchmark or --quick)."""

    train_per_class: int
    test_per_class: int
    input_size: int
    teacher_epochs: float
    teacher_batch: int
    speedups: tuple[float, ...]
    accelerate_flags: tuple[str, ...] = ()  # beyond the defaults
    config: dict[str, Any] | None = None  # a run config YAML for every variant (None: no --config)
    quick: bool = False


FULL = Setting(train_per_class=150, test_per_class=100, input_size=64, teacher_epochs=40.0, teacher_batch=64,
               speedups=(2.0, 3.0))
# Tiny budgets everywhere: the smoke run checks the plumbing, its numbers mean nothing.
QUICK = Setting(train_per_class=20, test_per_class=10, input_size=32, teacher_epochs=2.0, teacher_batch=32,
                speedups=(2.0,), quick=True,
                accelerate_flags=("--space", "tiny", "--epochs", "0.2", "--validate", "2", "--check-rounds", "1",
                                  "--no-int8"),
                config={"data": {"batch_size": 32},
                        "distill": {"images": 32, "batch_size": 32, "heldout_images": 64, "redistill_images": 64},
                        "finetune": {"batch_size": 32, "bn_batches": 2, "pick_images": 64},
                        "latency": {"warmup": 1, "min_repeats": 3, "max_repeats": 5, "min_time_s": 0.0,
                                    "time_cap_s": 10.0}})


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def hant_exe() -> str:
    """The `hant` console script of this Python's environment: what a user of the venv types."""
    return str(Path(sys.executable).parent / "hant")


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    from hant.workspace import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def read_doc(path: Path) -> dict[str, Any] | None:
    """A JSON file's contents, or None when it is missing or unreadable (then it is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- 1. the dataset


def _read_idx(path: Path):
    """An idx1/idx3 ubyte file (gzipped or not) as a uint8 numpy array."""
    import numpy as np

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"error: {folder} has no {stem}[.gz]; `apt-get install -y dataset-fashion-mnist` puts the "
                     "Fashion-MNIST idx files there")


def class_folders() -> list[str]:
    """Folder names that sort in Fashion-MNIST's label order (ImageFolder numbers classes by sorted name)."""
    from hant.data import FASHION_MNIST_CLASSES

    return [f"{i}-{name.replace('/', '_').replace(' ', '_')}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def build_dataset(cache: Path, setting: Setting, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The class-balanced ImageFolder tree of `setting` under CACHE/data/, written once; returns
    (folder, its dataset.json). Rebuilt when dataset.json or any listed file is missing."""
    import numpy as np
    from PIL import Image

    from hant.data import DEBIAN_FASHION_MNIST

    src = Path(DEBIAN_FASHION_MNIST)
    folder = cache / "data" / f"fmnist-{setting.train_per_class}-{setting.test_per_class}-s{SEED}"
    want = {"source": str(src), "seed": SEED, "train_per_class": setting.train_per_class,
            "test_per_class": setting.test_per_class}
    manifest = read_doc(folder / "dataset.json")
    if manifest is not None and all(manifest.get(k) == v for k, v in want.items()):
        names = class_folders()
        if all((folder / split / names[c] / f"{i:05d}.png").is_file()
               for split in ("train", "test") for c, idx in enumerate(manifest["indices"][split]) for i in idx):
            log(f"[small-data] dataset: cached {folder} ({manifest['images']['train']} train, "
                f"{manifest['images']['test']} test images)")
            return folder, manifest

    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    per_class = {"train": setting.train_per_class, "test": setting.test_per_class}
    rng = np.random.default_rng(SEED)
    names = class_folders()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    indices: dict[str, list[list[int]]] = {}
    sha: dict[str, str] = {}
    for split, (img_stem, lab_stem) in stems.items():
        img_file, lab_file = _idx_file(src, img_stem), _idx_file(src, lab_stem)
        sha.update({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (img_file, lab_file)})
        images, labels = _read_idx(img_file), _read_idx(lab_file)
        indices[split] = []
        for c, name in enumerate(names):
            pick = sorted(int(i) for i in rng.permutation(np.flatnonzero(labels == c))[:per_class[split]])
            indices[split].append(pick)
            out = tmp / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in pick:
                Image.fromarray(images[i], mode="L").save(out / f"{i:05d}.png")
    manifest = {"version": 1, **want, "source_package": "dataset-fashion-mnist (Debian)", "source_sha256": sha,
                "classes": names, "image": "28x28 grey PNG, the idx pixels unchanged",
                "images": {s: sum(len(x) for x in indices[s]) for s in indices},
                "how": f"per class, the first {setting.train_per_class} (train split) and "
                       f"{setting.test_per_class} (test split) of numpy.random.default_rng({SEED}).permutation of "
                       "that class's indices, drawn class by class in label order, train first",
                "indices": indices}
    write_doc(tmp / "dataset.json", manifest)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"[small-data] dataset: wrote {folder} ({manifest['images']['train']} train, "
        f"{manifest['images']['test']} test images)")
    return folder, manifest


# ----------------------------------------------------------------------------- the benchmark


class SmallData:
    """The state of one benchmark: settings, caches, and what has finished so far."""

    def __init__(self, args: argparse.Namespace, setting: Setting, cache: Path, out: Path, command: str,
                 log: Callable[[str], None] = print):
        self.args, self.setting, self.cache, self.out, self.command, self.log = args, setting, cache, out, command, log
        self.t0 = time.perf_counter()
        self.data_dir: Path | None = None
        self.manifest: dict[str, Any] | None = None
        self.teacher_meta: dict[str, Any] | None = None
        self.teacher_call: dict[str, Any] | None = None
        self.rows: list[dict[str, Any]] = []
        self.status: dict[str, str] = {v: "pending" for v, _ in self.variants()}
        help_text = subprocess.run([hant_exe(), "accelerate", "--help"], capture_output=True, text=True).stdout
        self.has_no_redistill = "--no-redistill" in help_text
        self._fingerprint: dict[str, Any] | None = None

    # --- names ----------------------------------------------------------------------------

    @property
    def speedups(self) -> list[float]:
        return self.args.speedups or list(self.setting.speedups)

    @property
    def input_size(self) -> int:
        return int(self.args.input_size or self.setting.input_size)

    @property
    def teacher_epochs(self) -> float:
        return float(self.args.teacher_epochs if self.args.teacher_epochs is not None else self.setting.teacher_epochs)

    def variants(self) -> list[tuple[str, int | None]]:
        return [("defaults", None)] + [(f"distill-{n}", n) for n in self.args.distill_images]

    def teacher_file(self) -> Path:
        assert self.data_dir is not None
        return (self.cache / "teachers" / f"resnet18-{self.data_dir.name}-{self.input_size}px-"
                f"e{self.teacher_epochs:g}-b{self.setting.teacher_batch}.safetensors")

    def run_dir(self, variant: str) -> Path:
        name = variant
        if self.args.batch_size != 1:
            name += f"-b{self.args.batch_size}"
        if self.args.redistill is False:
            name += "-no-redistill"
        return self.cache / "runs" / self.teacher_file().stem / name

    def redistill(self) -> bool | None:
        """Whether accelerate re-distils the chosen candidates (None: this hant has no such stage flag)."""
        if not self.has_no_redistill:
            return None
        return self.args.redistill is not False

    # --- 2. the teacher ---------------------------------------------------------------------

    def teacher(self) -> dict[str, Any]:
        """`hant train-teacher` once; its JSON (read back when weights and JSON are there)."""
        out = self.teacher_file()
        meta_file = out.with_suffix(".json")
        want = {"source": MODEL, "input_size": self.input_size, "epochs": self.teacher_epochs,
                "batch_size": self.setting.teacher_batch, "data": f"imagefolder:{self.data_dir}"}
        meta = read_doc(meta_file) if out.exists() else None
        if meta is not None and {k: meta.get(k) for k in want} == want:
            self.log(f"[small-data] teacher: cached {out} (test top-1 {meta['test_top1']:.2f}%)")
            return meta
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [hant_exe(), "train-teacher", "--model", MODEL, "--data", f"imagefolder:{self.data_dir}",
                "--input-size", str(self.input_size), "--batch-size", str(self.setting.teacher_batch),
                "--epochs", f"{self.teacher_epochs:g}", "--seed", str(SEED), "--out", str(out)]
        self.log(f"[small-data] teacher: {shlex.join(['hant', *argv[1:]])}")
        t0 = time.perf_counter()
        rc = subprocess.run(argv).returncode
        wall = round(time.perf_counter() - t0, 1)
        if rc != 0:
            raise SystemExit(f"error: hant train-teacher exited with {rc}")
        meta = json.loads(meta_file.read_text())
        write_doc(self.cache / "units" / f"{out.stem}.json", {"wall_s": wall, "command": shlex.join(argv)})
        self.log(f"[small-data] teacher: test top-1 {meta['test_top1']:.2f}% in {wall:.0f} s")
        return meta

    # --- 3. accelerate -----------------------------------------------------------------------

    def config_file(self, run: Path, distill_images: int | None) -> Path | None:
        """The run config YAML of a variant: the mode's settings plus distill.images (None: no --config)."""
        cfg = json.loads(json.dumps(self.setting.config or {}))
        if distill_images is not None:
            cfg.setdefault("distill", {})["images"] = int(distill_images)
        if not cfg:
            return None
        from hant.workspace import write_yaml

        path = self.cache / "configs" / f"{run.parent.name}-{run.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_yaml(path, cfg)
        return path

    def plans(self) -> list[str]:
        from hant.pipeline import plan_name

        return [plan_name(TARGET, self.args.batch_size, s) for s in self.speedups]

    def finished(self, run: Path) -> bool:
        """Whether every plan of the run has a measured student and the report is written."""
        from hant.workspace import RunDir

        rd = RunDir(run)
        for name in self.plans():
            ev = read_doc(rd.student_dir(name) / "eval.json") or {}
            if (ev.get("student") or {}).get("top1") is None or ev.get("speedup") is None:
                return False
        return rd.report.exists()

    def accelerate(self, variant: str, distill_images: int | None) -> dict[str, Any]:
        """`hant accelerate` on the variant's run folder, unless it is finished; returns its unit
        (argv and the wall time of every call)."""
        run = self.run_dir(variant)
        cfg = self.config_file(run, distill_images)
        argv = [hant_exe(), "accelerate", "--run", str(run), "--model", MODEL, "--checkpoint",
                str(self.teacher_file()), "--data", f"imagefolder:{self.data_dir}", "--input-size",
                str(self.input_size)]
        for s in self.speedups:
            argv += ["--speedup", f"{s:g}"]
        if self.args.batch_size != 1:
            argv += ["--batch-size", str(self.args.batch_size)]
        if cfg is not None:
            argv += ["--config", str(cfg)]
        if self.args.redistill is False:
            argv.append("--no-redistill")
        argv += list(self.setting.accelerate_flags)
        settings = {"version": UNIT_VERSION, "argv": argv[1:], "config": self.setting.config,
                    "distill_images": distill_images}
        path = self.cache / "units" / f"{run.parent.name}-{run.name}.json"
        unit = read_doc(path)
        if unit is None or unit.get("key") != digest(settings):
            unit = {"key": digest(settings), "settings": settings, "calls": []}
        if self.finished(run) and unit["calls"]:
            self.log(f"[small-data] {variant}: run {run} finished; accelerate skipped")
            return unit
        self.log(f"[small-data] {variant}: {shlex.join(['hant', *argv[1:]])}")
        t0 = time.perf_counter()
        rc = subprocess.run(argv).returncode
        unit["calls"].append({"wall_s": round(time.perf_counter() - t0, 1), "rc": rc,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_doc(path, unit)
        if rc != 0:
            raise RuntimeError(f"hant accelerate exited with {rc}")
        self.log(f"[small-data] {variant}: accelerate done in {unit['calls'][-1]['wall_s']:.0f} s")
        return unit

    def variant_rows(self, variant: str, distill_images: int | None, unit: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per speedup from the run folder's eval.json, plan, timings and phase-1 summary."""
        from hant.workspace import RunDir

        run = self.run_dir(variant)
        rd = RunDir(run)
        timings = (read_doc(run / "timings.json") or {}).get("stages", {})
        phase1 = (read_doc(rd.candidates_index) or {}).get("phase1") or {}
        shared = {k: v for k, v in timings.items() if " " not in k}  # init, distill, latency, score, report
        rows = []
        for s, name in zip(self.speedups, self.plans()):
            ev = json.loads((rd.student_dir(name) / "eval.json").read_text())
            plan = read_doc(rd.plan(name)) or {}
            t1, s1 = ev["teacher"]["top1"], ev["student"]["top1"]
            own = {k.split(" ", 1)[0]: v for k, v in timings.items() if k.endswith(" " + name)}
            ft = ev.get("finetune") or {}
            rows.append({
                "variant": variant, "distill_images": distill_images, "redistill": self.redistill(),
                "speedup_asked": s, "plan": name, "measured_speedup": ev.get("speedup"),
                "speedup_ci": [ev.get("speedup_ci_lo"), ev.get("speedup_ci_hi")],
                "top1": s1, "top1_assembled": ev["student"].get("top1_assembled"), "teacher_top1": t1,
                "drop": t1 - s1, "wall_s": round(sum(c["wall_s"] for c in unit["calls"]), 1),
                "accelerate_calls": len(unit["calls"]), "stages": {**shared, **own},
                "images_per_candidate": phase1.get("images_per_candidate"),
                "phase1_images_trained": (phase1["steps"] * phase1["batch_size"]
                                          if phase1.get("steps") is not None and phase1.get("batch_size") else None),
                "phase1_heldout_images": phase1.get("heldout_images"),
                "finetune": {k: ft.get(k) for k in ("epochs", "steps", "batch_size", "train_images")},
                "int8": {k: (ev.get("int8") or {}).get(k) for k in ("top1", "speedup")} if ev.get("int8") else None,
                "teacher_ms": ev["teacher"].get("latency_ms"), "student_ms": ev["student"].get("latency_ms"),
                "predicted_ms": ev.get("predicted_ms"), "plan_layers": plan.get("layers"),
                "run": str(run), "command": shlex.join(["hant", *unit["settings"]["argv"]]),
            })
        return rows

    def control(self, variant: str) -> dict[str, Any]:
        """The teacher fine-tuned as the variant's students were: the run's fine-tuning recipe
        (`hant.kd.finetune_module` on a copy of the teacher) for the epochs the first
        student's eval.json records, the finetune.min_steps floor included. Its test top-1 is
        the reference beside the teacher's, so that what extra training does for the teacher
        itself is not counted as recovery. Cached in CACHE/units/; checkpoints resume."""
        from hant.data import load_data
        from hant.run import Run

        run = self.run_dir(variant)
        the_run = Run(run)
        ev = read_doc(the_run.dir.student_dir(self.plans()[0]) / "eval.json") or {}
        epochs = (ev.get("finetune") or {}).get("epochs")
        if epochs is None:
            raise KeyError(f"no fine-tuning epochs in {run}'s first eval.json")
        cfg = the_run.config
        settings = {"version": UNIT_VERSION, "teacher_sha256": (self.teacher_meta or {}).get("sha256"),
                    "finetune": dataclasses.asdict(cfg.finetune), "epochs": epochs, "seed": cfg.seed,
                    "data": {"spec": cfg.data.spec, "input_size": cfg.data.input_size, "heldout": cfg.data.heldout,
                             "seed": cfg.data.seed}}
        # One per teacher and recipe: the variants differ only in phase 1, so they share it.
        name = f"{self.teacher_file().stem}-control-{digest(settings, 12)}"
        path = self.cache / "units" / f"{name}.json"
        d = read_doc(path)
        if d is not None and d.get("key") == digest(settings):
            return d
        self.log(f"[small-data] {variant}: control, the teacher fine-tuned for {epochs:.3g} epochs ...")
        t0 = time.perf_counter()
        from families import teacher_control

        c = teacher_control(the_run, load_data(cfg.data), epochs, self.cache / "work" / name, digest(settings, 12),
                            self.log)
        d = {"key": digest(settings), "settings": settings, "epochs": epochs, "top1": c["top1"],
             "finetune": c["finetune"], "wall_s": round(time.perf_counter() - t0, 1)}
        write_doc(path, d)
        self.log(f"[small-data] {variant}: control top-1 {d['top1']:.2f}% in {d['wall_s']:.0f} s")
        return d

    @staticmethod
    def set_reference(rows: list[dict[str, Any]], control: dict[str, Any]) -> None:
        """drop = the better of teacher and control minus the student (rows changed in place)."""
        for r in rows:
            t, c = r["teacher_top1"], control["top1"]
            r.update(control_top1=c, control_epochs=control["epochs"], reference_top1=max(t, c),
                     reference="control" if c > t else "teacher", drop=max(t, c) - r["top1"],
                     drop_vs_teacher=t - r["top1"])

    # --- the whole benchmark -----------------------------------------------------------------

    def run_all(self) -> int:
        self.data_dir, self.manifest = build_dataset(self.cache, self.setting, self.log)
        self.write()
        self.teacher_meta = self.teacher()
        self.teacher_call = read_doc(self.cache / "units" / f"{self.teacher_file().stem}.json")
        self.write()
        failed = 0
        for variant, n in self.variants():
            try:
                unit = self.accelerate(variant, n)
                rows = self.variant_rows(variant, n, unit)
                if self.args.control if self.args.control is not None else not self.setting.quick:
                    self.set_reference(rows, self.control(variant))
            except (RuntimeError, OSError, KeyError, ValueError) as e:
                failed += 1
                self.status[variant] = f"failed: {e}"
                self.log(f"[small-data] {variant}: {e}")
                self.write()
                continue
            self.rows += rows
            self.status[variant] = "done"
            for r in rows:
                self.log(f"[small-data] {variant} {r['speedup_asked']:g}x: measured {r['measured_speedup']:.2f}x, "
                         f"top-1 {r['top1']:.2f}% (drop {r['drop']:+.2f}), wall {r['wall_s']:.0f} s")
            self.write()
        return failed

    # --- results -------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:  # once: it runs git
            from families import fingerprint  # bench/families.py: the machine as every benchmark records it

            self._fingerprint = fingerprint()
        fp = dict(self._fingerprint)
        cfg = self.run_dir("defaults") / "config.yaml" if self.data_dir is not None else None
        if cfg is not None and cfg.exists():
            from hant.config import RunConfig

            fp["latency_threads"] = RunConfig.load(cfg).latency.threads
        return fp

    def teacher_recipe(self) -> dict[str, Any]:
        from hant.teacher_train import TeacherRecipe

        r = dataclasses.asdict(TeacherRecipe(epochs=self.teacher_epochs, seed=SEED))
        r.pop("init_from", None)
        m = self.teacher_meta or {}
        return {"model": MODEL, "input_size": self.input_size, "in_chans": 1, "batch_size": self.setting.teacher_batch,
                **r, "optimizer": "AdamW, one-cycle lr (hant's train-teacher recipe)",
                "flags": f"--input-size {self.input_size} --batch-size {self.setting.teacher_batch} "
                         f"--epochs {self.teacher_epochs:g} --seed {SEED}",
                "train_images": m.get("train_images"), "heldout": m.get("heldout"), "steps": m.get("steps"),
                "test_top1": m.get("test_top1"), "heldout_top1": m.get("heldout_top1"),
                "train_time_s": m.get("train_time_s"), "wall_s": (self.teacher_call or {}).get("wall_s"),
                # Held-out top-1 after each epoch: whether the recipe had converged.
                "heldout_top1_by_epoch": [h.get("heldout_top1") for h in m.get("history") or []],
                "file": str(self.teacher_file()) if self.data_dir is not None else None,
                "sha256": m.get("sha256")}

    def goal(self) -> dict[str, Any]:
        row = next((r for r in self.rows if r["variant"] == "defaults" and r["speedup_asked"] == GOAL_SPEEDUP), None)
        g = {"text": f"at the defaults, a {GOAL_SPEEDUP:g}x measured speedup with a drop of at most "
                     f"{GOAL_DROP:g} point", "met": None}
        if self.setting.quick:
            g["reason"] = "not judged on a quick smoke run"
        elif row is not None and row["measured_speedup"] is not None:
            g.update(met=row["measured_speedup"] >= GOAL_SPEEDUP and row["drop"] <= GOAL_DROP,
                     measured_speedup=row["measured_speedup"], drop=row["drop"])
        return g

    def notes(self) -> list[str]:
        notes = []
        if self.setting.quick:
            notes.append("QUICK SMOKE RUN (20 train and 10 test images per class, 32 px, tiny space and budgets): "
                         "the numbers mean nothing.")
        notes += [
            "measured_speedup: eval.json's speedup of the fine-tuned student over the teacher, timed interleaved "
            f"by hant measure on {TARGET} at batch {self.args.batch_size} (speedup_ci: its bootstrap 95% interval).",
            "top1, teacher_top1: test top-1 (%) on the test/ folder, both from the same eval.json. control_top1: "
            "the teacher fine-tuned with the run's recipe for the students' epochs (the finetune.min_steps floor "
            "included), so that what extra training does for the teacher is not counted as recovery; drop = "
            "max(teacher_top1, control_top1) - top1 in points (drop_vs_teacher: teacher_top1 - top1). "
            "small_data.teacher_top1 is hant train-teacher's own test top-1 of the same "
            "weights on the same images.",
            "wall_s: the hant accelerate calls of the variant, summed (both speedups of a variant share it; a call "
            "stopped before it returned is not counted); stages: RUN/timings.json, the shared stages (init, "
            "distill, latency, score, report) and this plan's own (select, redistill, finetune, measure, export), "
            "summed over restarts.",
            "images_per_candidate: phase 1's budget as hant resolves it (distill.images, else distill.epochs times "
            "the train images); phase1_images_trained: what each candidate trained on, whole batches of "
            "distill.batch_size (so at least one batch).",
            "Each variant is its own run folder: phase 1, latency table and scores are redone per variant, so "
            "wall_s compares whole runs.",
        ]
        if self.redistill() is None:
            notes.append("This hant accelerate has no --no-redistill flag; redistill is None in the rows.")
        if self.args.note:
            notes.append(self.args.note)
        return notes

    def results(self) -> dict[str, Any]:
        m = self.manifest or {}
        dataset = {k: m.get(k) for k in ("source", "source_package", "seed", "train_per_class", "test_per_class",
                                         "images", "image", "classes", "how", "source_sha256")}
        dataset.update(folder=str(self.data_dir) if self.data_dir else None, spec="imagefolder:<folder>",
                       input_size=self.input_size,
                       split="hant: train/ is the pool and test/ the test split; data.heldout (5000) is capped at a "
                             "fifth of the pool, so a seeded fifth of train/ is held out (never trained on)",
                       hant_train_images=(self.teacher_meta or {}).get("train_images"),
                       hant_heldout_images=(self.teacher_meta or {}).get("heldout"))
        return {
            "version": 1,
            "small_data": {"teacher_top1": (self.teacher_meta or {}).get("test_top1"), "rows": self.rows},
            "goal": self.goal(),
            "status": self.status,
            "dataset": dataset,
            "teacher_recipe": self.teacher_recipe(),
            "accelerate": {"speedups": self.speedups, "target": TARGET, "batch_size": self.args.batch_size,
                           "flags_beyond_defaults": list(self.setting.accelerate_flags), "config": self.setting.config,
                           "distill_images": self.args.distill_images, "redistill": self.redistill(),
                           "no_redistill_flag": self.has_no_redistill},
            "command": self.command,
            "fingerprint": self.fingerprint(),
            "notes": self.notes(),
            "wall_time_s": round(time.perf_counter() - self.t0, 1),
            "cache": str(self.cache),
        }

    def write(self) -> dict[str, Any]:
        result = self.results()
        write_doc(self.out, result)
        return result


def table_text(result: dict[str, Any]) -> str:
    def f(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    sd = result["small_data"]
    lines = [f"teacher top-1 {f(sd['teacher_top1'])}%",
             "| variant | phase-1 images/candidate (trained) | speedup | measured [95% CI] | top-1 | control | drop "
             "| wall s |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in sd["rows"]:
        ci = r["speedup_ci"]
        lines.append(f"| {r['variant']} | {r['images_per_candidate']} ({r['phase1_images_trained']}) | "
                     f"{r['speedup_asked']:g}x | {f(r['measured_speedup'])}x [{f(ci[0])}, {f(ci[1])}] | "
                     f"{f(r['top1'])} | {f(r.get('control_top1'))} | {f(r['drop'], '+.2f')} | "
                     f"{f(r['wall_s'], '.0f')} |")
    g = result["goal"]
    lines.append(f"goal ({g['text']}): {'met' if g['met'] else 'not met' if g['met'] is False else 'n/a'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speedups", type=_floats, help="speedups asked of hant accelerate (default 2,3; --quick 2)")
    p.add_argument("--batch-size", type=int, default=1, help=f"batch size of the {TARGET} target (default 1)")
    p.add_argument("--input-size", type=int, help="image side of teacher and runs (default 64; --quick 32)")
    p.add_argument("--teacher-epochs", type=float, help="hant train-teacher --epochs (default 40; --quick 2)")
    p.add_argument("--distill-images", type=_ints, default=[], metavar="N[,N...]",
                   help="extra variants with distill.images N (phase-1 images per candidate), one run each")
    p.add_argument("--redistill", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-redistill is passed to hant accelerate (only when it has that flag)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="fine-tune the teacher as the students were, the drop's reference (default: on; "
                        "off with --quick)")
    p.add_argument("--cache", help="dataset, teacher, runs and units (default ~/.cache/hant/small-data; "
                                   "--quick /tmp/hant-small-data-quick)")
    p.add_argument("--out", help="results JSON (default bench/results/small_data.json; --quick CACHE/small_data.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20+10 images per class, 32 px, tiny budgets")
    p.add_argument("--note", help="a note appended to the results' notes")
    args = p.parse_args(argv)
    if args.speedups is not None and (not args.speedups or any(s <= 1 for s in args.speedups)):
        p.error("--speedups must be above 1")
    if any(n < 1 for n in args.distill_images):
        p.error("--distill-images must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    args.distill_images = sorted(set(args.distill_images))
    setting = QUICK if args.quick else FULL
    default_cache = Path("/tmp/hant-small-data-quick") if args.quick else Path.home() / ".cache" / "hant" / "small-data"
    cache = Path(args.cache).expanduser().resolve() if args.cache else default_cache
    out = Path(args.out) if args.out else (cache / "small_data.json" if args.quick else RESULTS / "small_data.json")
    command = "bench/small_data.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))

    def log(msg: str) -> None:
        print(msg, flush=True)

    bench = SmallData(args, setting, cache, out, command, log)
    if args.redistill is not None and not bench.has_no_redistill:
        p.error("this hant accelerate has no --no-redistill flag; leave out --redistill/--no-redistill")
    log(f"[small-data] {MODEL} at {bench.input_size} px, speedups {', '.join(f'{s:g}' for s in bench.speedups)}, "
        f"variants {', '.join(v for v, _ in bench.variants())}; cache {cache}")
    failed = bench.run_all()
    result = bench.write()
    print(table_text(result))
    print(f"[small-data] {out} in {time.perf_counter() - bench.t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
