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
from hant.workspace import RunDir, read_json, write_json


@dataclass
class AccelerateOptions:
    """What `hant accelerate` does after phase 1: the target, the budgets and the export."""

    target: str = "onnxruntime-cpu"
    batch_size: int = 1
    speedups: list[float] = field(default_factory=lambda: [2.0, 3.0])
    validate: int = 10
    int8: bool = True
    finetune_epochs: float | None = None


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


def _eval_complete(run: Path, plan: str, int8: bool) -> bool:
    path = RunDir(run).student_dir(plan) / "eval.json"
    if not path.exists():
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
    if not rd.layers.exists():
        if init_kwargs is None:
            raise HantError(f"{run} is not initialised; pass --model and --data (or run `hant init`) first")
        from hant.run import init_run

        timer.run("init", lambda: init_run(run, **init_kwargs))
    timer.run("distill", lambda: distill_mod.distill(run))
    tid = table_id(opts.target, opts.batch_size)
    timer.run("latency", lambda: latency.measure_table(run, target=opts.target, batch_size=opts.batch_size,
                                                      validate=opts.validate))
    timer.run("score", lambda: score.score(run))
    plans = []
    for s in opts.speedups:
        name = plan_name(opts.target, opts.batch_size, s)
        plans.append(name)
        timer.run(f"select {name}", lambda: select.select(run, target=tid, speedup=s, name=name),
                  skip=rd.plan(name).exists())
    for name in plans:
        done = _eval_complete(run, name, opts.int8)
        student_file = rd.student_dir(name) / "student.safetensors"
        timer.run(f"finetune {name}", lambda: student.finetune(run, name, epochs=opts.finetune_epochs, log=log),
                  skip=done or student_file.exists())
        timer.run(f"measure {name}", lambda: student.measure(run, name, log=log), skip=done)
        timer.run(f"export {name}", lambda: export_mod.export(run, name, int8=opts.int8), skip=done)
    path = timer.run("report", lambda: report.write_report(run))
    return {"plans": plans, "report": str(path), "timings": timer.timings}


# --- the embedded default ---------------------------------------------------------------

def default_cache_dir() -> Path:
    """Where trained demo teachers are kept between runs ($HANT_CACHE or ~/.cache/hant)."""
    return Path(os.environ.get("HANT_CACHE", Path.home() / ".cache" / "hant"))


@dataclass
class DemoSetup:
    """The embedded default: teacher, data, space and budgets; `quick` is the test-sized one."""

    model: str
    data: str
    input_size: int
    teacher_epochs: float
    teacher_images: int | None
    space: str
    distill_images: int | None
    heldout: int
    finetune_epochs: float
    speedups: list[float]
    batch_size: int
    validate: int
    int8: bool
    include: list[str] = field(default_factory=list)


def demo_setup(quick: bool, data: str | None = None) -> DemoSetup:
    """The demo's settings. Full: EfficientNet-B0 on Fashion-MNIST at 64x64 (at 32x32 it underfits,
    see docs), the `default` space, 2x and 3x on onnxruntime-cpu. Quick: timm's small test
    EfficientNet at 32x32 (80% top-1 after 85 s of training), the `tiny` space and a few thousand images, to finish in minutes."""
    if quick:
        return DemoSetup(model="timm:test_efficientnet", data=data or "fashion-mnist", input_size=32,
                         teacher_epochs=2.0, teacher_images=16000, space="tiny", distill_images=4096,
                         heldout=500, finetune_epochs=0.25, speedups=[2.0], batch_size=1, validate=3,
                         int8=True)
    return DemoSetup(model="timm:efficientnet_b0", data=data or "fashion-mnist", input_size=64,
                     teacher_epochs=10, teacher_images=None, space="default", distill_images=None,
                     heldout=5000, finetune_epochs=1.0, speedups=[2.0, 3.0], batch_size=1, validate=10,
                     int8=True)


def demo(run: str | Path | None = None, quick: bool = False, data: str | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse a cached) teacher, then accelerate it for the demo budgets and print the table.

    Returns accelerate_run's result plus "teacher" (its JSON) and "table" (markdown).
    """
    from hant.config import DataConfig, RunConfig
    from hant.teacher import train_teacher
    from hant.workspace import read_json as _read

    setup = demo_setup(quick, data)
    run = Path(run or Path("runs") / ("demo-quick" if quick else "demo"))
    data_tag = "fmnist" if setup.data == "fashion-mnist" else setup.data.replace(":", "_").replace("/", "_")
    tag = f"{setup.model.split(':')[-1]}-{data_tag}{setup.input_size}"
    if quick:
        tag += "-quick"
    teacher_file = default_cache_dir() / "teachers" / f"{tag}.safetensors"
    meta_file = teacher_file.with_suffix(".json")
    if teacher_file.exists() and meta_file.exists():
        meta = _read(meta_file)
        log(f"[hant] teacher: cached {teacher_file} (test top-1 {meta.get('test_top1', float('nan')):.2f}%, "
            f"trained in {meta.get('train_time_s', 0):.0f} s)")
    else:
        log(f"[hant] teacher: training {setup.model} on {setup.data} at {setup.input_size}px "
            f"for {setup.teacher_epochs:g} epochs -> {teacher_file}")
        dcfg = DataConfig(spec=setup.data, input_size=setup.input_size, heldout=setup.heldout)
        t0 = time.perf_counter()
        meta = train_teacher(setup.model, dcfg, epochs=setup.teacher_epochs, out=str(teacher_file),
                             lr=3e-3, seed=0, max_train_images=setup.teacher_images)
        log(f"[hant] teacher training time: {time.perf_counter() - t0:.0f} s "
            f"(test top-1 {meta['test_top1']:.2f}%)")

    cfg = RunConfig()
    cfg.model.source = setup.model
    cfg.model.checkpoint = str(teacher_file)
    cfg.data.spec = setup.data
    cfg.data.input_size = setup.input_size
    cfg.data.heldout = setup.heldout
    cfg.space = setup.space
    cfg.distill.images = setup.distill_images
    cfg.finetune.epochs = setup.finetune_epochs
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
