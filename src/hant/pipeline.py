"""Every stage in order, each skipped when its artifacts are complete; and the embedded demo.

The stages themselves are resumable (phase 1 trains only unfinished candidates, the
latency table measures only missing entries, ...); this module only decides the order,
records how long each stage took, and names the plans.
"""

from __future__ import annotations

import os
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


def plan_name(target: str, batch_size: int, speedup: float) -> str:
    """The plan name used for one speedup: `onnxruntime-cpu-b1-x2`."""
    return f"{target}-b{batch_size}-x{speedup:g}"


def table_id(target: str, batch_size: int) -> str:
    """The latency table a target and batch size resolve to (the latency stage's naming)."""
    from hant.latency import table_path

    return Path(table_path(".", target, batch_size)).stem


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


def _plan_settled(run: Path, plan: str, check_rounds: int) -> bool:
    """Whether the plan exists (and, when plans are checked on the hardware, was checked)."""
    path = RunDir(run).plan(plan)
    return _readable(path) and (check_rounds <= 0 or "latency_check" in read_json(path))


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
    finetune, measure, export and report. Each finished stage is skipped on a rerun.

    Returns {"plans": [names], "report": path, "timings": {...}}. Raises HantError from any stage.
    """
    from hant import distill as distill_mod
    from hant import export as export_mod
    from hant import latency, report, score, select, student

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
    tid = table_id(opts.target, opts.batch_size)
    timer.run("latency", lambda: latency.measure_table(run, target=opts.target, batch_size=opts.batch_size,
                                                      validate=opts.validate))
    timer.run("score", lambda: score.score(run))
    plans = []
    # Ascending, each capped by the budget the previous one ended with: a check that tightens
    # a small speedup's budget must not leave a larger speedup with a looser one.
    cap = None
    for s in sorted(opts.speedups):
        name = plan_name(opts.target, opts.batch_size, s)
        plans.append(name)
        if opts.check_rounds > 0:
            def choose():
                return select.select_measured(run, tid, speedup=s, name=name, rounds=opts.check_rounds,
                                              max_budget_ms=cap, log=log)
        else:
            def choose():
                return select.select(run, target=tid, speedup=s, name=name, log=log)
        timer.run(f"select {name}", choose, skip=_plan_settled(run, name, opts.check_rounds))
        budget = read_json(rd.plan(name)).get("budget_ms")
        if budget is not None:
            cap = budget if cap is None else min(cap, budget)
    for name in plans:
        intact = _student_intact(run, name)
        done = intact and _eval_complete(run, name, opts.int8)
        timer.run(f"finetune {name}", lambda: student.finetune(run, name, epochs=opts.finetune_epochs, log=log),
                  skip=intact)
        timer.run(f"measure {name}", lambda: student.measure(run, name, log=log), skip=done)
        timer.run(f"export {name}", lambda: export_mod.export(run, name, int8=opts.int8), skip=done)
    path = timer.run("report", lambda: report.write_report(run))
    return {"plans": plans, "report": str(path), "timings": timer.timings}


# --- the embedded default ---------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where trained demo teachers are kept between runs ($HANT_CACHE or ~/.cache/hant)."""
    return Path(os.environ.get("HANT_CACHE", Path.home() / ".cache" / "hant"))


@dataclass(frozen=True)
class TeacherStage:
    """One cycle of the demo teacher's training: input size, epochs and peak LR; `regularise`
    keeps dropout and drop-path on (off for a last cycle that fits what the earlier ones learnt)."""

    input_size: int
    epochs: float
    lr: float
    regularise: bool = True

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `train_teacher` beyond the shared ones."""
        return {"lr": self.lr} if self.regularise else {"lr": self.lr, "drop_rate": 0.0, "drop_path_rate": 0.0}

    def flags(self) -> str:
        """The same as `hant train-teacher` flags."""
        return (f"--input-size {self.input_size} --epochs {self.epochs:g} "
                + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in self.options().items()))


@dataclass
class DemoSetup:
    """The embedded default: teacher, data, space and budgets; `quick` is the test-sized one."""

    model: str
    data: str
    teacher_stages: tuple[TeacherStage, ...]  # each starts from the previous one's weights
    teacher_images: int | None
    space: str
    distill_images: int | None
    heldout: int
    finetune_epochs: float
    speedups: list[float]
    batch_size: int
    validate: int
    int8: bool
    score_images: int | None = None
    include: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        """The teacher's (and so the run's) input size: that of the last stage."""
        return self.teacher_stages[-1].input_size


def demo_setup(quick: bool, data: str | None = None) -> DemoSetup:
    """The demo's settings. Full: EfficientNet-B0 on Fashion-MNIST at 64x64 (at 32x32 the last
    stages see 1x1 maps and it underfits), trained in three cycles, each from the last one's
    weights: 5 epochs at 32x32 (a quarter of the cost per image), 3 at 64x64, then 3 at 64x64
    without dropout or drop-path (the regularised cycles still underfit: train accuracy below
    held-out). Then the `default` space, 2x and 3x on onnxruntime-cpu. Quick: timm's small test
    EfficientNet at 32x32 (80% top-1 after 85 s of training), the `tiny` space and a few
    thousand images, to finish in minutes."""
    if quick:
        return DemoSetup(model="timm:test_efficientnet", data=data or "fashion-mnist",
                         teacher_stages=(TeacherStage(32, 2.0, 3e-3),), teacher_images=16000, space="tiny",
                         distill_images=4096, heldout=500, finetune_epochs=0.25, speedups=[2.0], batch_size=1,
                         validate=3, int8=True)
    stages = (TeacherStage(32, 5, 3e-3), TeacherStage(64, 3, 1e-3), TeacherStage(64, 3, 1e-3, regularise=False))
    return DemoSetup(model="timm:efficientnet_b0", data=data or "fashion-mnist", teacher_stages=stages,
                     teacher_images=None, space="default", distill_images=None, heldout=5000,
                     finetune_epochs=0.5, speedups=[2.0, 3.0], batch_size=1, validate=10, int8=True,
                     score_images=1024)


def demo_teacher(setup: DemoSetup, quick: bool = False,
                 log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The demo's teacher: (weights file, its JSON). Reused from the cache when its last stage
    is there; otherwise each missing stage is trained from the previous stage's weights, and
    stages already on disk are kept."""
    from hant.config import DataConfig
    from hant.teacher import train_teacher
    from hant.workspace import read_json as _read

    data_tag = "fmnist" if setup.data == "fashion-mnist" else setup.data.replace(":", "_").replace("/", "_")

    def stage_file(i: int) -> Path:
        # The first stage at a size is <model>-<data><size>; a later one at the same size gets -2, -3...
        size = setup.teacher_stages[i].input_size
        nth = sum(st.input_size == size for st in setup.teacher_stages[:i]) + 1
        name = f"{setup.model.split(':')[-1]}-{data_tag}{size}" + (f"-{nth}" if nth > 1 else "")
        return default_cache_dir() / "teachers" / (name + ("-quick" if quick else "") + ".safetensors")

    teacher_file = stage_file(len(setup.teacher_stages) - 1)
    meta_file = teacher_file.with_suffix(".json")
    if teacher_file.exists() and meta_file.exists():
        meta = _read(meta_file)
        log(f"[hant] teacher: cached {teacher_file} (test top-1 {meta.get('test_top1', float('nan')):.2f}%, "
            f"trained in {_teacher_seconds(meta):.0f} s)")
    else:
        t0 = time.perf_counter()
        init_from = None
        for i, stage in enumerate(setup.teacher_stages):
            out = stage_file(i)
            if out.exists() and out.with_suffix(".json").exists():
                meta = _read(out.with_suffix(".json"))
            else:
                log(f"[hant] teacher, stage {i + 1} of {len(setup.teacher_stages)}: {setup.model} on {setup.data}, "
                    f"{stage.flags()} -> {out}")
                dcfg = DataConfig(spec=setup.data, input_size=stage.input_size, heldout=setup.heldout)
                command = (f"hant train-teacher --model {setup.model} --data {setup.data} {stage.flags()}"
                           + (f" --init-from {init_from}" if init_from else "") + f" --out {out}")
                meta = train_teacher(setup.model, dcfg, epochs=stage.epochs, out=str(out), seed=0,
                                     max_train_images=setup.teacher_images, init_from=init_from,
                                     command=command, **stage.options())
            init_from = out
        log(f"[hant] teacher training time: {time.perf_counter() - t0:.0f} s "
            f"(test top-1 {meta['test_top1']:.2f}%)")
    return teacher_file, meta


def demo(run: str | Path | None = None, quick: bool = False, data: str | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse a cached) teacher, then accelerate it for the demo budgets and print the table.

    Returns accelerate_run's result plus "teacher" (its JSON) and "table" (markdown).
    """
    from hant.config import RunConfig

    setup = demo_setup(quick, data)
    run = Path(run or Path("runs") / ("demo-quick" if quick else "demo"))

    teacher_file, meta = demo_teacher(setup, quick, log)

    cfg = RunConfig()
    cfg.model.source = setup.model
    cfg.model.checkpoint = str(teacher_file)
    cfg.data.spec = setup.data
    cfg.data.input_size = setup.input_size
    cfg.data.heldout = setup.heldout
    cfg.space = setup.space
    cfg.distill.images = setup.distill_images
    cfg.finetune.epochs = setup.finetune_epochs
    # Each of the 457 candidates runs the rest of the network over the scored images; 1024
    # images (scored paired, on the same images for every candidate) keep this stage near
    # ten minutes on 2 cores instead of an hour for all 5000.
    cfg.score.images = setup.score_images
    cfg.layers.include = list(setup.include)
    # One thread: the latency table is then timed with the thread's own CPU clock, which
    # stays accurate on a busy shared machine (wall-clock tables were unusable under load).
    cfg.latency.threads = 1
    cfg_path = run.parent / f".{run.name}-config.yaml"
    run.parent.mkdir(parents=True, exist_ok=True)
    cfg.save(cfg_path)
    opts = AccelerateOptions(target="onnxruntime-cpu", batch_size=setup.batch_size, speedups=setup.speedups,
                             validate=setup.validate, int8=setup.int8, finetune_epochs=setup.finetune_epochs)
    out = accelerate_run(run, opts, init_kwargs={"config": str(cfg_path)}, log=log)
    from hant.report import collect, results_table

    table = results_table(collect(run))
    log("")
    log(table)
    log(f"[hant] report: {out['report']}")
    return {**out, "teacher": meta, "table": table}


def _teacher_seconds(meta: dict[str, Any]) -> float:
    """Training time of a cached teacher, including every stage it was initialised from whose
    JSON is beside that stage's weights."""
    from hant.workspace import read_json

    seconds, seen = 0.0, set()
    while meta is not None:
        seconds += float(meta.get("train_time_s") or 0.0)
        init = (meta.get("init_from") or {}).get("file")
        meta = None
        if init and init not in seen and Path(init).with_suffix(".json").exists():
            seen.add(init)
            meta = read_json(Path(init).with_suffix(".json"))
    return seconds


# --- the Python API ------------------------------------------------------------------------

@dataclass
class AccelerateResult:
    """What `hant.accelerate` returns: the run folder, one student per speedup, and the evidence."""

    run: Path
    plans: list[str]
    students: dict[str, Any]  # plan -> nn.Module (eval mode)
    evals: dict[str, dict]  # plan -> RUN/students/<plan>/eval.json
    report: Path
    table: str
    source: str

    @property
    def student(self):
        """The student of the first (or only) speedup."""
        return self.students[self.plans[0]]


def _as_tensors(data: Any, what: str) -> tuple[Any, Any]:
    """(images, labels) from a tuple of tensors or a dataset of (image, label) items."""
    import torch

    if data is None:
        return None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError as e:
            raise HantError(f"{what} must be a (images, labels) pair of tensors or a dataset of (image, label) "
                            f"items with len(); got {type(data).__name__}") from e
        if not items or not isinstance(items[0][0], torch.Tensor):
            raise HantError(f"{what} must yield (image tensor, label) items; transform the images to tensors")
        images = torch.stack([it[0] for it in items])
        labels = torch.as_tensor([int(it[1]) for it in items])
    if images.dim() == 3:  # N x H x W grey images
        images = images.unsqueeze(1)
    return images.detach().cpu(), labels.detach().cpu()


def _write_named(folder: Path, stem: str, write: Callable[[Path], str]) -> Path:
    """Write a file through `write` (which returns its sha256) and name it by its content."""
    pending = folder / f".{stem}-pending.safetensors"
    sha = write(pending)
    final = folder / f"{stem}-{sha[:12]}.safetensors"
    if final.exists():
        pending.unlink()
    else:
        os.replace(pending, final)
    return final


def accelerate(model: Any, train_data: Any, heldout_data: Any, *, test_data: Any = None,
               target: str = "onnxruntime-cpu", speedup: float | list[float] = 2.0, batch_size: int = 1,
               run: str | Path | None = None, space: str = "default", input_size: int | None = None,
               source: str | None = None, config: str | Path | None = None, int8: bool = False,
               finetune_epochs: float | None = None, log: Callable[[str], None] = print) -> AccelerateResult:
    """Accelerate a trained `model` for `target`: every stage of `hant accelerate`, from Python.

    `model` is an nn.Module (left untouched) or a source string. `train_data`, `heldout_data`
    and `test_data` are (images, labels) tensor pairs or datasets of (image tensor, label)
    items; images N x C x H x W, uint8 grey levels or float values normalised the way the
    model expects. Held-out images rank the candidates and are never trained on; accuracy
    is reported on `test_data`, or on the held-out images when it is None. The images and
    the teacher's weights are written into the run folder (named by their sha256), so a
    later call with the same model and data resumes where this one stopped. The
    architecture is rebuilt from `source`, else from timm or torchvision when the model is
    one of theirs (checked by comparing outputs), else kept in memory (then only a Python
    process that passes the model again can resume the run).

    `speedup` is one factor or a list; `config` a YAML file for everything else (space,
    phase-1 budget, fine-tuning); `input_size` defaults to the images' side. Returns an
    AccelerateResult with one student per speedup. Raises HantError for bad input and from
    every stage (an infeasible speedup names the fastest latency the pool reaches).
    """
    import torch

    from hant.config import RunConfig
    from hant.data import save_tensor_data
    from hant.report import collect, results_table
    from hant.student import load_student
    from hant.teacher import infer_source, load_teacher, register_model
    from hant.workspace import save_safetensors

    train, held, test = (_as_tensors(train_data, "train_data"), _as_tensors(heldout_data, "heldout_data"),
                         _as_tensors(test_data, "test_data"))
    if held is None:
        raise HantError("heldout_data is required: images the candidates are ranked on and nobody trains on")
    c, h, w = train[0].shape[1:]
    if h != w and input_size is None:
        raise HantError(f"images are {h}x{w}; hant works on square inputs, pass input_size=S to resize them to SxS")
    size = int(input_size or h)
    labels = torch.cat([p[1] for p in (train, held, test) if p is not None])
    num_classes = int(labels.max()) + 1

    if isinstance(model, str):
        src, module = model, None
    else:
        module = model
        src = source
    run = Path(run or Path("runs") / f"accelerate-{type(module).__name__.lower() if module is not None else 'model'}")
    run.mkdir(parents=True, exist_ok=True)
    data_file = _write_named(run, "data", lambda p: save_tensor_data(p, train, held, test))
    checkpoint = None
    if module is not None:
        import copy

        cpu = copy.deepcopy(module).cpu().float().eval()
        checkpoint = _write_named(run, "teacher", lambda p: save_safetensors(p, cpu.state_dict()))
        if src is None:
            src = infer_source(cpu, c, num_classes)
            if src is not None and not _same_outputs(cpu, src, c, num_classes, checkpoint, held[0][:8], size):
                src = None
        if src is None:
            src = register_model(cpu)
        log(f"[hant] teacher: {type(module).__name__} as {src}")
    elif source is not None:
        raise HantError("pass source= only with a model object; a model given as a string is its own source")

    cfg = RunConfig.load(config) if config is not None else RunConfig()
    cfg.model.source = src
    cfg.model.checkpoint = str(checkpoint) if checkpoint is not None else cfg.model.checkpoint
    cfg.data.spec = f"tensors:{data_file.resolve()}"
    cfg.data.input_size = size
    cfg.data.in_chans = int(c)
    cfg.data.num_classes = num_classes
    if config is None:
        cfg.space = space
        # 2% of an epoch is plenty for a large set but starves a small one; give every
        # candidate at least a few thousand images (repeating the set when it is smaller).
        cfg.distill.images = max(4096, int(round(cfg.distill.epochs * len(train[0]))))
    cfg_path = run / "accelerate-config.yaml"
    cfg.save(cfg_path)
    speedups = [float(s) for s in (speedup if isinstance(speedup, (list, tuple)) else [speedup])]
    opts = AccelerateOptions(target=target, batch_size=batch_size, speedups=speedups, int8=int8,
                             finetune_epochs=finetune_epochs)
    out = accelerate_run(run, opts, init_kwargs={"config": str(cfg_path)}, log=log)
    rd = RunDir(run)
    students = {p: load_student(rd.student_dir(p)) for p in out["plans"]}
    evals = {p: read_json(rd.student_dir(p) / "eval.json") for p in out["plans"]}
    table = results_table(collect(run))
    return AccelerateResult(run=run, plans=out["plans"], students=students, evals=evals, report=Path(out["report"]),
                            table=table, source=src)


def _same_outputs(model: Any, source: str, in_chans: int, num_classes: int, checkpoint: Path, images: Any,
                  size: int) -> bool:
    """Whether `source` with `checkpoint` computes what `model` computes on a few images."""
    import torch

    from hant.data import resize_batch
    from hant.teacher import load_teacher

    try:
        rebuilt = load_teacher(source, in_chans, num_classes, checkpoint)
    except HantError:
        return False
    x = resize_batch(images.float() / (255.0 if images.dtype == torch.uint8 else 1.0), size)
    with torch.no_grad():
        return torch.allclose(rebuilt(x), model(x), rtol=1e-4, atol=1e-5)
