"""The Python API: `hant.accelerate(model, train_data, heldout_data, ...)` runs every stage of
`hant accelerate` on a model and tensors held in memory.

The module is not named `accelerate`, so that `hant.accelerate` stays the function.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hant.errors import HantError
from hant.pipeline import AccelerateOptions, accelerate_run
from hant.workspace import RunDir, read_json


class AccuracyRiskWarning(UserWarning):
    """A plan's predicted loss increase is large against the teacher's held-out loss."""


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

    warnings: dict[str, str] = dataclasses.field(default_factory=dict)  # plan -> why it may lose accuracy

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
               finetune_epochs: float | None = None, redistill: bool = True, refine: int | None = None,
               log: Callable[[str], None] = print) -> AccelerateResult:
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
    phase-1 budget, fine-tuning); `input_size` defaults to the images' side; `redistill=False`
    fine-tunes from the phase-1 weights instead of re-distilling the chosen candidates on the
    student's own inputs first; `refine` is the rounds of re-scoring each plan's candidates around
    the plan and selecting again (0: off; None: `AccelerateOptions`' default). Returns an
    AccelerateResult with one student per speedup. Raises HantError for bad input and from
    every stage (an infeasible speedup names the fastest latency the pool reaches).
    """
    import torch

    from hant.data import save_tensor_data
    from hant.report import collect, results_table
    from hant.student import load_student

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

    if model is None:
        raise HantError("model is None: pass the trained nn.Module, or a source string such as 'timm:resnet18'")
    given_object = not isinstance(model, str)
    if not given_object and source is not None:
        raise HantError("pass source= only with a model object; a model given as a string is its own source")
    run = Path(run or Path("runs") / f"accelerate-{type(model).__name__.lower() if given_object else 'model'}")
    run.mkdir(parents=True, exist_ok=True)
    data_file = _write_named(run, "data", lambda p: save_tensor_data(p, train, held, test))
    if given_object:
        src, checkpoint = _teacher_source(model, source, run, int(c), num_classes, held[0][:8], size)
        log(f"[hant] teacher: {type(model).__name__} as {src}")
    else:
        src, checkpoint = model, None
    cfg_path = _write_config(run, config, space, src, checkpoint, data_file, size, int(c), num_classes)
    speedups = [float(s) for s in (speedup if isinstance(speedup, (list, tuple)) else [speedup])]
    opts = AccelerateOptions(target=target, batch_size=batch_size, speedups=speedups, int8=int8,
                             finetune_epochs=finetune_epochs, redistill=redistill,
                             **({} if refine is None else {"refine": refine}))
    out = accelerate_run(run, opts, init_kwargs={"config": str(cfg_path)}, log=log)
    rd = RunDir(run)
    students = {p: load_student(rd.student_dir(p)) for p in out["plans"]}
    evals = {p: read_json(rd.student_dir(p) / "eval.json") for p in out["plans"]}
    table = results_table(collect(run))
    # A plan whose predicted damage is large was announced in the log; a caller that silenced
    # the log still gets the warning, and finds it on the result.
    risks = {p: (read_json(rd.plan(p)).get("accuracy_risk") or {}) for p in out["plans"] if rd.plan(p).exists()}
    flagged = {p: r["message"] for p, r in risks.items() if r.get("large")}
    for message in flagged.values():
        warnings.warn(message, AccuracyRiskWarning, stacklevel=2)
    return AccelerateResult(run=run, plans=out["plans"], students=students, evals=evals, report=Path(out["report"]),
                            table=table, source=src, warnings=flagged)


def _teacher_source(module: Any, source: str | None, run: Path, in_chans: int, num_classes: int, images: Any,
                    size: int) -> tuple[str, Path]:
    """Writes a copy of `module`'s weights into the run folder; returns the source its
    architecture is rebuilt from (`source`, else timm's or torchvision's name when outputs
    match, else a registered in-memory model) and the weights file."""
    import copy

    from hant.teacher import infer_source, register_model
    from hant.workspace import save_safetensors

    cpu = copy.deepcopy(module).cpu().float().eval()
    checkpoint = _write_named(run, "teacher", lambda p: save_safetensors(p, cpu.state_dict()))
    src = source
    if src is None:
        src = infer_source(cpu, in_chans, num_classes)
        if src is not None and not _same_outputs(cpu, src, in_chans, num_classes, checkpoint, images, size):
            src = None
    return (src if src is not None else register_model(cpu)), checkpoint


def _write_config(run: Path, config: str | Path | None, space: str, src: str, checkpoint: Path | None,
                  data_file: Path, size: int, in_chans: int, num_classes: int) -> Path:
    """The run's configuration (`config`'s YAML, or the defaults with `space`) pointed at this
    model and these images; written to RUN/accelerate-config.yaml, whose path is returned."""
    from hant.config import RunConfig

    cfg = RunConfig.load(config) if config is not None else RunConfig()
    cfg.model.source = src
    cfg.model.checkpoint = str(checkpoint) if checkpoint is not None else cfg.model.checkpoint
    cfg.data.spec = f"tensors:{data_file.resolve()}"
    cfg.data.input_size = size
    cfg.data.in_chans = in_chans
    cfg.data.num_classes = num_classes
    if config is None:
        cfg.space = space
    path = run / "accelerate-config.yaml"
    cfg.save(path)
    return path


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
