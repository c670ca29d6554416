"""Phase 3, the student itself: assemble it from a plan, save it, load it.

- `assemble(run, plan)`: the teacher with each planned layer replaced by its candidate and
  the candidate's phase-1 weights (or the plan's re-distilled ones, `hant.redistill`, when
  they exist); BatchNorm statistics re-estimated on train batches.
- `save_student` / `load_student`: student.safetensors + arch.json (teacher source, spec per
  layer, normalisation); loading needs neither the run folder nor the teacher checkpoint.
- `update_eval`: the student folder's eval.json, merged section by section.

Fine-tuning is `hant.finetune`; timing against the teacher is `hant.measure`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from hant.errors import HantError
from hant.run import TEACHER_SPEC, Run
from hant.workspace import load_safetensors, read_json, save_safetensors, write_json

__all__ = [
    "ARCH_VERSION", "read_plan", "assemble", "recalibrate_batchnorm", "bn_loader", "save_student",
    "load_student", "update_eval", "count_params_flops",
]

ARCH_VERSION = 1
STUDENT_FILE = "student.safetensors"
ARCH_FILE = "arch.json"
EVAL_FILE = "eval.json"


# ----------------------------------------------------------------------------- plans and run


def read_plan(run: str | os.PathLike, plan_name_or_layers: str | Mapping[str, Any]) -> dict[str, Any]:
    """The plan as a dict with at least "layers" ({layer name: spec}).

    Takes a plan name (RUN/plans/<name>.json, read by `hant.run.Run.plan`), a plan dict, or
    a bare {layer: spec} mapping. Raises HantError when the plan file is missing or has no
    "layers" mapping.
    """
    if isinstance(plan_name_or_layers, str):
        return Run(run).plan(plan_name_or_layers)
    if not isinstance(plan_name_or_layers, Mapping):
        raise HantError(f"a plan is a name or a {{layer: spec}} mapping, not {type(plan_name_or_layers).__name__}")
    d = dict(plan_name_or_layers)
    plan = d if isinstance(d.get("layers"), Mapping) else {"layers": d}
    layers = plan.get("layers")
    if not isinstance(layers, Mapping) or not all(isinstance(v, str) for v in layers.values()):
        raise HantError("the plan's \"layers\" must map layer names to spec strings; re-run `hant select`")
    plan["layers"] = dict(layers)
    return plan


def _data_info(cfg) -> dict[str, Any]:
    return {"in_chans": cfg.data.in_chans, "num_classes": cfg.data.num_classes, "input_size": cfg.data.input_size}


# ----------------------------------------------------------------------------- assemble


def _arch_entry(spec: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The arch.json entry of a layer: its spec (canonical form) and its shapes."""
    from hant.ops import parse

    entry = {"spec": parse(spec).encode(),  # raises on a malformed spec
             "in_chs": int(info["in_chs"]), "out_chs": int(info["out_chs"]), "stride": int(info["stride"])}
    for k in ("in_shape", "out_shape"):
        if info.get(k) is not None:
            entry[k] = [int(v) for v in info[k]]
    return entry


def _candidate(model: nn.Module, name: str, entry: Mapping[str, Any]) -> nn.Module:
    """The candidate module of an arch entry, built for the layer `name` of `model` (the
    teacher's layer it replaces gives the ops that copy from it their start)."""
    from hant.layers import get_layer
    from hant.ops import build

    in_hw = tuple(entry["in_shape"][1:]) if entry.get("in_shape") else None
    out_hw = tuple(entry["out_shape"][1:]) if entry.get("out_shape") else None
    return build(entry["spec"], int(entry["in_chs"]), int(entry["out_chs"]), int(entry["stride"]),
                 teacher_layer=get_layer(model, name), in_hw=in_hw, out_hw=out_hw)


def _plan_arch(plan_layers: Mapping[str, str], shapes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The arch "layers" mapping of a plan. Raises HantError for a layer the run does not have."""
    arch = {}
    for name, spec in plan_layers.items():
        if name not in shapes:
            raise HantError(f"the plan names layer '{name}', which is not a replaceable layer of this run; "
                            "re-run `hant select`")
        arch[name] = _arch_entry(spec, shapes[name])
    return arch


def _candidates(model: nn.Module, layers_arch: Mapping[str, Mapping[str, Any]], run: Run,
                states: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, nn.Module]:
    """{layer: candidate module with its weights} for every layer not planned as `teacher`: those
    of `states` ({layer: state dict}, the re-distilled ones) where given, else phase 1's."""
    index = run.candidate_index()
    states = states or {}
    modules = {}
    for name, entry in layers_arch.items():
        spec = entry["spec"]
        if spec == TEACHER_SPEC:
            continue  # the teacher's own layer stays as it is, weights untouched
        module = _candidate(model, name, entry)
        if module.state_dict():  # an op without parameters or buffers (skip) needs no phase-1 file
            state = states[name] if name in states else run.candidate(name, spec, index)
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                which, stage = ("re-distilled", "redistill") if name in states else ("phase-1", "distill")
                raise HantError(f"{which} weights of {spec} for layer {name} do not fit the op "
                                f"({str(e).splitlines()[0]}); re-run `hant {stage}`") from e
        modules[name] = module
    return modules


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int,
                          device: torch.device | str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance on up to `max_batches` batches.

    Running statistics are reset and accumulated as a plain average over the batches
    (momentum None). Only the batch norms run in training mode, so dropout and drop-path
    do not disturb the statistics. `batches` yields tensors or (x, y) pairs. The model is
    left in eval mode. Returns the number of batches used.
    """
    bns = _batchnorms(model)
    if not bns or max_batches <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    from hant.data import batch_inputs

    used = 0
    try:
        for x in batch_inputs(batches, max_batches, device):
            model(x)
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return used


def bn_loader(cfg, train):
    """The train batches `assemble` re-estimates BatchNorm statistics on: `finetune.batch_size`
    images, shuffled with the run's seed, so every call yields the same batches."""
    from hant.data import make_loader

    n = len(train)
    bs = max(2, min(cfg.finetune.batch_size, n))  # a batch of one cannot give batch statistics
    return make_loader(train, bs, shuffle=True, seed=cfg.seed, drop_last=n >= bs,
                       num_workers=cfg.data.workers)


def assemble(run: str | os.PathLike, plan_name_or_layers: str | Mapping[str, Any], bn_recalibrate: bool = True,
             splits=None, log: Callable[[str], None] | None = None, redistilled: bool = True) -> nn.Module:
    """The student of a plan: the teacher with each planned layer replaced by its candidate.

    Candidates carry their phase-1 weights (RUN/candidates/, checked against the recorded
    sha256), or, with `redistilled` and a named plan whose re-distillation is complete and
    current (`hant redistill`, RUN/redistilled/<plan>/), the re-distilled weights, checked
    likewise; `model.hant_arch["candidate_weights"]` says which ("phase1" or "redistilled").
    `teacher` keeps the teacher's layer untouched; layers the plan does not name
    stay the teacher's. When at least one layer is replaced and `bn_recalibrate`, every
    BatchNorm's statistics are re-estimated on `finetune.bn_batches` train batches (of
    `splits`, the run's data splits, loaded when None; `log` hears how many).
    Returns the model in eval mode, with its architecture dict as `model.hant_arch`.
    Raises HantError for a missing plan, an unknown layer, a bad spec, missing weights, or a
    re-distilled file that does not match its recorded sha256.
    """
    from hant.layers import replace_layers

    the_run = Run(run)
    cfg = the_run.config
    plan = read_plan(run, plan_name_or_layers)
    layers_arch = _plan_arch(plan["layers"], {info.name: info.to_dict() for info in the_run.layers})
    model = the_run.teacher()
    states = None
    if redistilled and plan.get("name"):
        states = the_run.redistilled(plan["name"], layers_arch, log=log)
    modules = _candidates(model, layers_arch, the_run, states)
    replace_layers(model, modules).eval()
    if bn_recalibrate and modules and cfg.finetune.bn_batches > 0:
        if splits is None:
            from hant.data import load_data

            splits = load_data(cfg.data)
        # channels_last makes the forward passes ~3x faster on CPU; the layout is undone after.
        model.to(memory_format=torch.channels_last)
        used = recalibrate_batchnorm(model, bn_loader(cfg, splits.train), cfg.finetune.bn_batches)
        model.to(memory_format=torch.contiguous_format)
        if log:
            log(f"BatchNorm statistics re-estimated on {used} train batches")
    model.hant_arch = {**_arch(cfg, layers_arch, plan), "candidate_weights": "redistilled" if states else "phase1"}
    return model


def _arch(cfg, layers_arch: dict, plan: dict) -> dict[str, Any]:
    return {
        "version": ARCH_VERSION,
        "teacher": {"source": cfg.model.source, **_data_info(cfg)},
        "layers": layers_arch,
        "mean": list(cfg.data.mean) if cfg.data.mean is not None else None,
        "std": list(cfg.data.std) if cfg.data.std is not None else None,
        **({"plan": plan["name"]} if plan.get("name") else {}),
        **({"target": plan["target"]} if plan.get("target") else {}),
    }


# ----------------------------------------------------------------------------- save / load


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Clone: safetensors refuses tensors that share storage, and a clone is cheap at these sizes.
    return {k: v.detach().cpu().clone().contiguous() for k, v in _unwrap(model).state_dict().items()}


def save_student(model: nn.Module, out_dir: str | os.PathLike, arch: Mapping[str, Any]) -> Path:
    """Write out_dir/student.safetensors and out_dir/arch.json (atomically, weights first).

    `arch` is {"version", "teacher": {source, in_chans, num_classes, input_size},
    "layers": {name: {spec, in_chs, out_chs, stride}}, "mean", "std"}; the weights' sha256
    is added to it. Returns out_dir.
    """
    out = Path(out_dir)
    for key in ("teacher", "layers"):
        if key not in arch:
            raise HantError(f"architecture dict lacks '{key}'; build it with assemble()")
    sha = save_safetensors(out / STUDENT_FILE, _state_tensors(model), metadata={"format": "hant-student"})
    write_json(out / ARCH_FILE, {"version": ARCH_VERSION, **{k: v for k, v in arch.items() if k != "version"},
                                 "weights": STUDENT_FILE, "sha256": sha})
    return out


def load_student(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved student from arch.json and student.safetensors.

    `path` is the student folder, its arch.json or its student.safetensors. The teacher's
    architecture comes from its source (`hant.teacher.create_model`, no checkpoint), each
    listed layer is rebuilt from its spec, and the weights are loaded strictly. Returns the
    model in eval mode with the arch dict as `model.hant_arch`. Raises HantError when a file
    is missing, altered, or does not match the architecture.
    """
    from hant.layers import replace_layers
    from hant.teacher import create_model

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    arch_file = p if p.suffix == ".json" else folder / ARCH_FILE
    arch = read_json(arch_file)
    if int(arch.get("version", 0)) > ARCH_VERSION:
        raise HantError(f"{arch_file} has version {arch.get('version')}, newer than this hant reads; upgrade hant")
    t = arch.get("teacher") or {}
    if not t.get("source"):
        raise HantError(f"{arch_file} lacks the teacher source; re-export the student")
    weights_file = p if p.suffix == ".safetensors" else folder / arch.get("weights", STUDENT_FILE)
    state = load_safetensors(weights_file, arch.get("sha256"))
    model = create_model(t["source"], t.get("in_chans"), t.get("num_classes"))
    replace_layers(model, {name: _candidate(model, name, e) for name, e in (arch.get("layers") or {}).items()
                           if e["spec"] != TEACHER_SPEC})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HantError(f"{weights_file} does not match {arch_file} ({str(e).splitlines()[0]}); "
                        "save the student again") from e
    model.eval()
    model.hant_arch = arch
    return model


# ----------------------------------------------------------------------------- eval.json and sizes


def update_eval(out_dir: str | os.PathLike, patch: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `patch` into out_dir/eval.json (sections merged key by key) and write it atomically.

    Returns the merged dict.
    """
    path = Path(out_dir) / EVAL_FILE
    cur = read_json(path) if path.exists() else {}
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(cur.get(k), dict):
            cur[k] = {**cur[k], **v}
        else:
            cur[k] = v
    write_json(path, cur)
    return cur


def count_params_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Parameters and FLOPs per image (a multiply-add is two FLOPs, as in layers.json)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    dev = next(model.parameters()).device
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape, device=dev))
    model.train(was)
    return int(params), int(counter.get_total_flops())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
