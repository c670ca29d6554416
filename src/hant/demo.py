"""The embedded default: `hant demo` trains (or reuses) a teacher, then accelerates it.

The demo's teacher is trained in cycles (`TeacherStage`), each from the previous one's
weights, and kept in a cache between runs ($HANT_CACHE or ~/.cache/hant).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hant.pipeline import AccelerateOptions, accelerate_run
from hant.teacher_train import TeacherRecipe


def default_cache_dir() -> Path:
    """Where trained demo teachers are kept between runs ($HANT_CACHE or ~/.cache/hant)."""
    return Path(os.environ.get("HANT_CACHE", Path.home() / ".cache" / "hant"))


@dataclass(frozen=True)
class TeacherStage:
    """One cycle of the demo teacher's training: the input size and the recipe (its `init_from`
    is set to the previous cycle's weights when the cycle runs)."""

    input_size: int
    recipe: TeacherRecipe

    def flags(self) -> str:
        """The same as `hant train-teacher` flags."""
        return f"--input-size {self.input_size} {self.recipe.flags()}".strip()


@dataclass
class DemoSetup:
    """The embedded default: teacher, data, space and budgets; `quick` is the test-sized one."""

    model: str
    data: str
    teacher_stages: tuple[TeacherStage, ...]  # each starts from the previous one's weights
    space: str
    distill_images: int | None
    heldout: int
    finetune_epochs: float
    speedups: list[float]
    batch_size: int
    validate: int
    int8: bool
    score_images: int | None = None
    redistill_images: int | None = None  # None: the config's default
    include: list[str] = field(default_factory=list)

    @property
    def input_size(self) -> int:
        """The teacher's (and so the run's) input size: that of the last stage."""
        return self.teacher_stages[-1].input_size


def demo_setup(quick: bool, data: str | None = None) -> DemoSetup:
    """The demo's settings. Full: EfficientNet-B0 on Fashion-MNIST at 64x64 (at 32x32 the last
    stages see 1x1 maps and it underfits), trained in five cycles, each from the last one's
    weights: 5 epochs at 32x32 (a quarter of the cost per image), 3 at 64x64, then 3 and 4 at
    64x64 without dropout or drop-path (the regularised cycles still underfit: train accuracy
    below held-out; after three cycles, two more epochs of the students' fine-tuning recipe
    still lifted the teacher by 0.39 points, so students' drops were measured against a
    moving target), and 2 at 64x64 without augmentation (after four cycles, the students'
    unaugmented recipe still lifted it by 0.51 points; the fifth took it from 92.27% to
    93.00%). Then the `default` space, 2x and 3x on onnxruntime-cpu. Quick: timm's small test
    EfficientNet at 32x32 (80% top-1 after 85 s of training), the `tiny` space and a few
    thousand images, to finish in minutes."""
    if quick:
        stage = TeacherStage(32, TeacherRecipe(epochs=2.0, lr=3e-3, max_train_images=16000))
        return DemoSetup(model="timm:test_efficientnet", data=data or "fashion-mnist", teacher_stages=(stage,),
                         space="tiny", distill_images=4096, heldout=500, finetune_epochs=0.25, speedups=[2.0],
                         batch_size=1, validate=3, int8=True, redistill_images=2048)
    stages = (TeacherStage(32, TeacherRecipe(epochs=5, lr=3e-3)), TeacherStage(64, TeacherRecipe(epochs=3, lr=1e-3)),
              TeacherStage(64, TeacherRecipe(epochs=3, lr=1e-3, drop_rate=0.0, drop_path_rate=0.0)),
              TeacherStage(64, TeacherRecipe(epochs=4, lr=1e-3, drop_rate=0.0, drop_path_rate=0.0)),
              TeacherStage(64, TeacherRecipe(epochs=2, lr=1e-3, drop_rate=0.0, drop_path_rate=0.0, augment=False)))
    return DemoSetup(model="timm:efficientnet_b0", data=data or "fashion-mnist", teacher_stages=stages,
                     space="default", distill_images=None, heldout=5000,
                     finetune_epochs=0.5, speedups=[2.0, 3.0], batch_size=1, validate=10, int8=True,
                     score_images=1024)


def demo_teacher(setup: DemoSetup, quick: bool = False,
                 log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The demo's teacher: (weights file, its JSON). Reused from the cache when its last stage
    is there; otherwise each missing stage is trained from the previous stage's weights, and
    stages already on disk are kept."""
    from hant.config import DataConfig
    from hant.teacher_train import train_teacher
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
                stage = dataclasses.replace(stage, recipe=dataclasses.replace(stage.recipe, init_from=init_from))
                log(f"[hant] teacher, stage {i + 1} of {len(setup.teacher_stages)}: {setup.model} on {setup.data}, "
                    f"{stage.flags()} -> {out}")
                dcfg = DataConfig(spec=setup.data, input_size=stage.input_size, heldout=setup.heldout)
                command = f"hant train-teacher --model {setup.model} --data {setup.data} {stage.flags()} --out {out}"
                meta = train_teacher(setup.model, dcfg, stage.recipe, out=str(out), command=command)
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
    if setup.redistill_images is not None:
        cfg.distill.redistill_images = setup.redistill_images
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
