"""Phase 3: assemble the student from a plan, fine-tune it end to end, measure it, load it.

- `assemble(run, plan)`: the teacher with each planned layer replaced by its candidate and
  the candidate's phase-1 weights; BatchNorm statistics re-estimated on train batches.
- `save_student` / `load_student`: student.safetensors + arch.json (teacher source, spec per
  layer, normalisation); loading needs neither the run folder nor the teacher checkpoint.
- `finetune(run, plan)`: knowledge distillation from the teacher, end to end; resumable;
  DistributedDataParallel under torchrun. Writes RUN/students/<plan>/.
- `measure(run, plan)`: end-to-end latency of teacher and student on the plan's target with
  the latency protocol (one process, interleaved); merges it into eval.json.
"""

from __future__ import annotations

import dataclasses

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hant.errors import HantError
from hant.workspace import RunDir, load_safetensors, read_json, save_safetensors, write_json

__all__ = [
    "ARCH_VERSION", "read_plan", "assemble", "recalibrate_batchnorm", "save_student", "load_student",
    "finetune", "finetune_module", "measure", "update_eval", "kd_loss", "count_params_flops", "resolve_target",
]

ARCH_VERSION = 1
STUDENT_FILE = "student.safetensors"
ARCH_FILE = "arch.json"
EVAL_FILE = "eval.json"
CKPT_FILE = "finetune.ckpt.safetensors"
CKPT_STATE = "finetune.ckpt.json"
TEACHER_SPEC = "teacher"
# The status of a finished candidate in candidates/index.json.
_TRAINED = ("done",)


# ----------------------------------------------------------------------------- plans and run


def _config(run: str | os.PathLike):
    from hant.config import RunConfig

    rd = RunDir(run)
    return RunConfig.load(rd.require(rd.config, "init"))


def read_plan(run: str | os.PathLike, plan_name_or_layers: str | Mapping[str, Any]) -> dict[str, Any]:
    """The plan as a dict with at least "layers" ({layer name: spec}).

    Takes a plan name (RUN/plans/<name>.json), a plan dict, or a bare {layer: spec} mapping.
    Raises HantError when the plan file is missing or has no "layers" mapping.
    """
    if isinstance(plan_name_or_layers, str):
        rd = RunDir(run)
        path = rd.plan(plan_name_or_layers)
        if not path.exists():
            have = sorted(p.stem for p in (rd.root / "plans").glob("*.json")) if (rd.root / "plans").is_dir() else []
            raise HantError(f"no plan '{plan_name_or_layers}' in {rd.root / 'plans'}; "
                            + (f"plans: {', '.join(have)}" if have else "run `hant select` first"))
        plan = read_json(path)
        plan.setdefault("name", plan_name_or_layers)
    elif isinstance(plan_name_or_layers, Mapping):
        d = dict(plan_name_or_layers)
        plan = d if isinstance(d.get("layers"), Mapping) else {"layers": d}
    else:
        raise HantError(f"a plan is a name or a {{layer: spec}} mapping, not {type(plan_name_or_layers).__name__}")
    layers = plan.get("layers")
    if not isinstance(layers, Mapping) or not all(isinstance(v, str) for v in layers.values()):
        raise HantError("the plan's \"layers\" must map layer names to spec strings; re-run `hant select`")
    plan["layers"] = dict(layers)
    return plan


def _layer_table(run: str | os.PathLike, cfg=None) -> dict[str, dict[str, Any]]:
    """layers.json as {name: LayerInfo dict}; checks that the teacher checkpoint is the one
    phase 1 learnt from (a student mixing two teachers would be silently wrong)."""
    from hant.layers import LayerInfo
    from hant.workspace import sha256_file

    rd = RunDir(run)
    data = read_json(rd.require(rd.layers, "init"))
    entries = data.get("layers", []) if isinstance(data, dict) else data
    sha = data.get("checkpoint_sha256") if isinstance(data, dict) else None
    ckpt = cfg.model.checkpoint if cfg is not None else None
    if sha and ckpt and Path(ckpt).is_file() and sha256_file(ckpt) != sha:
        raise HantError(f"teacher checkpoint {ckpt} changed since `hant init`; "
                        "initialise a new run folder for the new teacher")
    return {e["name"]: LayerInfo.from_dict(e).to_dict() for e in entries}


def _candidate_index(run: str | os.PathLike) -> dict[tuple[str, str], dict[str, Any]]:
    rd = RunDir(run)
    if not rd.candidates_index.exists():
        return {}
    return {(e["layer"], e["spec"]): e for e in read_json(rd.candidates_index).get("candidates", [])}


def _candidate_weights(run: str | os.PathLike, index: dict, layer: str, spec: str) -> dict[str, torch.Tensor]:
    rd = RunDir(run)
    entry = index.get((layer, spec))
    if entry is None or not entry.get("file"):
        raise HantError(f"candidate {spec} of layer {layer} has no phase-1 weights; run `hant distill --run {run}`")
    status = entry.get("status")
    if status is not None and status not in _TRAINED:
        raise HantError(f"candidate {spec} of layer {layer} is '{status}' in phase 1; "
                        f"run `hant distill --run {run}` to finish it")
    f = Path(entry["file"])
    if not f.is_absolute():
        # Recorded relative to the run folder; older layouts recorded it relative to candidates/.
        f = rd.root / f if (rd.root / f).exists() else rd.candidates_dir / f
    return load_safetensors(f, entry.get("sha256"))


def _teacher_from_config(cfg) -> nn.Module:
    from hant.teacher import load_teacher

    return load_teacher(cfg.model.source, cfg.data.in_chans, cfg.data.num_classes, cfg.model.checkpoint,
                        cfg.model.trust_pickle)


def _data_info(cfg) -> dict[str, Any]:
    return {"in_chans": cfg.data.in_chans, "num_classes": cfg.data.num_classes, "input_size": cfg.data.input_size}


# ----------------------------------------------------------------------------- assemble


def _replace_layers(model: nn.Module, plan_layers: Mapping[str, str], shapes: Mapping[str, Mapping[str, Any]],
                    weights: Callable[[str, str], Mapping[str, torch.Tensor] | None]) -> tuple[dict, int]:
    """Replace each layer of `model` named in `plan_layers` by its candidate (in place).

    `shapes[name]` gives in_chs, out_chs, stride (and in_shape/out_shape when known);
    `weights(name, spec)` gives the candidate's state dict, or None to keep it as built.
    Returns (the arch "layers" mapping, number of layers replaced).
    """
    from hant.layers import get_layer, set_layer
    from hant.ops import build, parse

    arch: dict[str, dict[str, Any]] = {}
    replaced = 0
    for name, spec in plan_layers.items():
        if name not in shapes:
            raise HantError(f"the plan names layer '{name}', which is not a replaceable layer of this run; "
                            "re-run `hant select`")
        info = shapes[name]
        spec = parse(spec).encode()  # canonical form; raises on a malformed spec
        entry = {"spec": spec, "in_chs": int(info["in_chs"]), "out_chs": int(info["out_chs"]),
                 "stride": int(info["stride"])}
        for k in ("in_shape", "out_shape"):
            if info.get(k) is not None:
                entry[k] = [int(v) for v in info[k]]
        arch[name] = entry
        if spec == TEACHER_SPEC:
            continue  # the teacher's own layer stays as it is, weights untouched
        in_hw = tuple(entry["in_shape"][1:]) if "in_shape" in entry else None
        out_hw = tuple(entry["out_shape"][1:]) if "out_shape" in entry else None
        module = build(spec, entry["in_chs"], entry["out_chs"], entry["stride"],
                       teacher_layer=get_layer(model, name), in_hw=in_hw, out_hw=out_hw)
        # An op without parameters or buffers (skip) needs no phase-1 file.
        state = weights(name, spec) if module.state_dict() else None
        if state is not None:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise HantError(f"phase-1 weights of {spec} for layer {name} do not fit the op "
                                f"({str(e).splitlines()[0]}); re-run `hant distill`") from e
        set_layer(model, name, module)
        replaced += 1
    return arch, replaced


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
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = x.to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            used += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return used


def _bn_loader(cfg, train):
    from hant.data import make_loader

    n = len(train)
    bs = max(2, min(cfg.finetune.batch_size, n))  # a batch of one cannot give batch statistics
    return make_loader(train, bs, shuffle=True, seed=cfg.seed, drop_last=n >= bs,
                       num_workers=cfg.data.workers)


def _assemble(run, plan_name_or_layers, bn_recalibrate: bool = True, splits=None, log=None):
    """assemble() plus the arch dict and the number of replaced layers."""
    cfg = _config(run)
    plan = read_plan(run, plan_name_or_layers)
    shapes = _layer_table(run, cfg)
    index = _candidate_index(run)
    model = _teacher_from_config(cfg)

    def weights(name: str, spec: str):
        return _candidate_weights(run, index, name, spec)

    layers_arch, replaced = _replace_layers(model, plan["layers"], shapes, weights)
    model.eval()
    if bn_recalibrate and replaced and cfg.finetune.bn_batches > 0:
        if splits is None:
            from hant.data import load_data

            splits = load_data(cfg.data)
        # channels_last makes the forward passes ~3x faster on CPU; the layout is undone after.
        model.to(memory_format=torch.channels_last)
        used = recalibrate_batchnorm(model, _bn_loader(cfg, splits.train), cfg.finetune.bn_batches)
        model.to(memory_format=torch.contiguous_format)
        if log:
            log(f"BatchNorm statistics re-estimated on {used} train batches")
    arch = _arch(cfg, layers_arch, plan)
    model.hant_arch = arch
    return model, arch, replaced


def assemble(run: str | os.PathLike, plan_name_or_layers: str | Mapping[str, Any],
             bn_recalibrate: bool = True) -> nn.Module:
    """The student of a plan: the teacher with each planned layer replaced by its candidate.

    Candidates carry their phase-1 weights (RUN/candidates/, checked against the recorded
    sha256); `teacher` keeps the teacher's layer untouched; layers the plan does not name
    stay the teacher's. When at least one layer is replaced and `bn_recalibrate`, every
    BatchNorm's statistics are re-estimated on `finetune.bn_batches` train batches.
    Returns the model in eval mode, with its architecture dict as `model.hant_arch`.
    Raises HantError for a missing plan, an unknown layer, a bad spec or missing weights.
    """
    return _assemble(run, plan_name_or_layers, bn_recalibrate)[0]


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
    from hant.layers import get_layer, set_layer
    from hant.ops import build
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
    for name, e in (arch.get("layers") or {}).items():
        if e["spec"] == TEACHER_SPEC:
            continue
        in_hw = tuple(e["in_shape"][1:]) if e.get("in_shape") else None
        out_hw = tuple(e["out_shape"][1:]) if e.get("out_shape") else None
        set_layer(model, name, build(e["spec"], int(e["in_chs"]), int(e["out_chs"]), int(e["stride"]),
                                     teacher_layer=get_layer(model, name), in_hw=in_hw, out_hw=out_hw))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HantError(f"{weights_file} does not match {arch_file} ({str(e).splitlines()[0]}); "
                        "save the student again") from e
    model.eval()
    model.hant_arch = arch
    return model


# ----------------------------------------------------------------------------- eval.json


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


def _top1(model: nn.Module, dataset, batch_size: int, workers: int = 0, desc: str | None = None) -> float:
    """Test top-1 (percent) with hant.teacher.evaluate; the model's train/eval mode is restored."""
    from hant.data import make_loader
    from hant.teacher import evaluate

    was = model.training
    try:
        return float(evaluate(model, make_loader(dataset, batch_size, num_workers=workers), desc=desc)["top1"])
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- fine-tune


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            kd_weight: float, ce_weight: float, temperature: float) -> torch.Tensor:
    """kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, y), batch mean."""
    T = float(temperature)
    loss = student_logits.new_zeros(())
    if kd_weight:
        kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                      reduction="batchmean", log_target=True)
        loss = loss + kd_weight * T * T * kl
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student_logits, labels)
    return loss


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to zero at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass
class _Dist:
    """The process group this process is part of (world 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _dist_from_env() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return _Dist(device=torch.device("cuda") if cuda else torch.device("cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    here = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        here = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=device,
                 initialised_here=here)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _fault(point: str, n: int, log) -> None:
    """Fault injection for tests: HANT_FAULT=finetune:<point>:<n> kills the process there."""
    for item in os.environ.get("HANT_FAULT", "").split(","):
        if item.strip() == f"finetune:{point}:{n}":
            log(f"HANT_FAULT: exiting at finetune:{point}:{n}")
            os._exit(75)


def _epoch_batches(dataset, batch: int, epoch: int, seed: int, dist_: _Dist) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation fixed by (seed, epoch), split across ranks."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist_.world, rank=dist_.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    if len(idx) >= batch:
        idx = idx[: len(idx) - len(idx) % batch]  # full batches only: every step sees the same batch size
    return [idx[i:i + batch] for i in range(0, len(idx), batch)]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and normalisation scales, as is usual for AdamW.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]):
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        p = params[int(pid)]
        # Match the parameter's layout (channels_last) so the update runs exactly as before.
        state.setdefault(int(pid), {})[name] = torch.empty_like(p).copy_(v) if v.shape == p.shape else v.clone()
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(out: Path, model: nn.Module, opt, info: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update({k: v.detach().cpu().clone().contiguous() for k, v in opt_tensors.items()})
    sha = save_safetensors(out / CKPT_FILE, tensors)
    # The state file is written second and names the weights' checksum, so a kill between
    # the two writes is detected on resume rather than mixing two steps.
    write_json(out / CKPT_STATE, {**info, "optimizer": opt_meta, "sha256": sha})


def _settings_key(d: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _load_resume(out: Path, settings: dict[str, Any], log) -> tuple[dict | None, dict | None]:
    state_file = out / CKPT_STATE
    if not state_file.exists() or not (out / CKPT_FILE).exists():
        return None, None
    try:
        state = read_json(state_file)
        tensors = load_safetensors(out / CKPT_FILE, state.get("sha256"))
    except HantError as e:
        log(f"fine-tune checkpoint unusable ({e}); starting over")
        return None, None
    if state.get("settings_key") != _settings_key(settings):
        log("fine-tune checkpoint was made with other settings (epochs, batch, lr, plan, processes); starting over")
        return None, None
    return state, tensors


def finetune(run: str | os.PathLike, plan: str, epochs: float | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune the plan's student end to end with knowledge distillation from the teacher.

    Loss: kd_weight * T^2 * KL(teacher || student at temperature T) + ce_weight * CE on the
    train split only (never the held-out split). AdamW, linear warm-up then cosine LR,
    channels_last, seeded and deterministic in data order (by seed and epoch) and in
    augmentation (by step). Checkpoints to RUN/students/<plan>/finetune.ckpt.* every epoch
    and every `finetune.checkpoint_minutes`; a rerun resumes there and ends with the same
    weights as an uninterrupted run. Under torchrun (WORLD_SIZE > 1) it runs
    DistributedDataParallel (gloo on CPU, nccl on GPU), the global batch split across ranks.

    Writes student.safetensors, arch.json and eval.json (test top-1 of teacher, of the
    assembled student before fine-tuning and of the fine-tuned student); a newly trained
    student replaces eval.json and removes ONNX files of an earlier one. Returns
    {"plan", "teacher_top1", "student_top1", "assembled_top1", "steps", "epochs", "time_s", "dir"}.
    Raises HantError for a missing plan or phase-1 weights, or epochs <= 0.
    """
    from hant.workspace import run_lock

    cfg = _config(run)
    epochs = float(cfg.finetune.epochs if epochs is None else epochs)
    if not epochs > 0:
        raise HantError(f"fine-tune epochs must be positive, got {epochs:g}")
    dist_ = _dist_from_env()
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if dist_.main:
                try:
                    stack.enter_context(run_lock(RunDir(run).root, log=log))
                except HantError as e:
                    error = str(e)
            # Every rank must learn that rank 0 could not start, or the others wait forever.
            error = dist_.from_main(error)
            if error:
                raise HantError(error)
            return _finetune(run, plan, cfg, epochs, dist_, log)
    finally:
        dist_.close()


@dataclass(frozen=True)
class _Schedule:
    """Steps of one fine-tuning: per-process batch, steps per epoch, total and warm-up steps."""

    batch: int
    steps_per_epoch: int
    total: int
    warmup: int


def _schedule(train, ft, epochs: float, seed: int, dist_: "_Dist") -> _Schedule:
    if len(train) < 2:
        raise HantError("the train split has fewer than 2 images; use more data")
    batch = max(1, min(ft.batch_size, len(train)) // dist_.world)
    steps_per_epoch = len(_epoch_batches(train, batch, 0, seed, dist_))
    total = max(1, round(epochs * steps_per_epoch))
    return _Schedule(batch, steps_per_epoch, total, min(max(1, round(ft.warmup * total)), total))


def _settings(sched: _Schedule, epochs: float, cfg, train, dist_: "_Dist", **extra: Any) -> dict[str, Any]:
    """What a checkpoint must have been made with to be resumed."""
    ft = cfg.finetune
    return {**extra, "epochs": epochs, "total": sched.total, "batch": sched.batch, "world": dist_.world,
            "lr": ft.lr, "wd": ft.weight_decay, "kd": ft.kd_weight, "ce": ft.ce_weight, "T": ft.temperature,
            "seed": cfg.seed, "train": len(train), "augment": ft.augment}


def _train_kd(model: nn.Module, teacher: nn.Module, train, cfg, sched: _Schedule, dist_: "_Dist", out: Path,
              settings: Mapping[str, Any], state: dict | None, ckpt: dict | None, info: dict[str, Any],
              meta: Mapping[str, Any], say: Callable[[str], None], name: str, fill: list[float], pad: int):
    """The fine-tuning loop shared by `finetune` (a plan's student) and `finetune_module` (any network).

    `model` and `teacher` are on the device in channels_last; `state`/`ckpt` a checkpoint to
    resume from (None: start). `fill` (per channel) and `pad` set the random-crop
    augmentation. Checkpoints go to `out` every epoch and every `finetune.checkpoint_minutes`,
    with `meta` added to their state. `info` is updated in place (train_time_s, final_loss).
    Returns (optimizer, steps done).
    """
    from tqdm.auto import tqdm

    from hant.data import random_crop_flip

    ft = cfg.finetune
    dev = dist_.device
    opt = torch.optim.AdamW(_param_groups(model, ft.weight_decay), lr=ft.lr)
    step = 0
    if state is not None:
        msd = {k[len("model."):]: v for k, v in ckpt.items() if k.startswith("model.")}
        model.load_state_dict(msd, strict=True)
        _load_optimizer(opt, ckpt, state["optimizer"])
        step = int(state["step"])
        say(f"fine-tune {name}: resuming at step {step}/{sched.total}")
    t_start = time.perf_counter() - float(info.get("train_time_s", 0.0))

    net: nn.Module = model
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    net.train()
    ckpt_every = max(1.0, ft.checkpoint_minutes * 60.0)
    last_ckpt = time.monotonic()
    global_batch = sched.batch * dist_.world
    total, steps_per_epoch = sched.total, sched.steps_per_epoch

    def checkpoint() -> None:
        if dist_.main:
            info["train_time_s"] = time.perf_counter() - t_start
            _save_checkpoint(out, model, opt, {**meta, "step": step, "total": total, "done": False,
                                               "settings_key": _settings_key(settings), "info": info})

    if step < total:
        say(f"fine-tune {name}: {total} steps ({settings['epochs']:g} epochs of {steps_per_epoch}), batch {global_batch}"
            f"{f' over {dist_.world} processes' if dist_.world > 1 else ''}, lr {ft.lr:g}, on {dev.type}")
    bar = tqdm(total=total * global_batch, initial=step * global_batch, unit="img", unit_scale=True,
               desc=f"finetune {name}", disable=not dist_.main or step >= total, dynamic_ncols=True)
    loss_ema = None
    while step < total:
        epoch = step // steps_per_epoch
        batches = _epoch_batches(train, sched.batch, epoch, cfg.seed, dist_)
        first = step - epoch * steps_per_epoch
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches[first:],
                                             num_workers=cfg.data.workers)
        for x, y in loader:
            # Every random draw of a step (augmentation, dropout) follows from (seed, step, rank),
            # so a resumed run repeats the uninterrupted one exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist_.rank)
            if ft.augment:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist_.rank)
                x = random_crop_flip(x, pad, g, fill=fill, flip=True)
            lr = _lr_at(step, total, sched.warmup, ft.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(dev, non_blocking=True)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd_loss(net(x), t_logits, y, ft.kd_weight, ft.ce_weight, ft.temperature)
            if not torch.isfinite(loss):
                raise HantError(f"fine-tune loss became {loss.item()} at step {step}; lower finetune.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            bar.update(global_batch)
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step >= total:
                break
            if step % steps_per_epoch and time.monotonic() - last_ckpt > ckpt_every:
                checkpoint()
                last_ckpt = time.monotonic()
                _fault("after_step", step, say)
        if step % steps_per_epoch == 0 and step < total:
            checkpoint()
            last_ckpt = time.monotonic()
            _fault("after_epoch", step // steps_per_epoch, say)
    bar.close()
    info["final_loss"] = loss_ema if loss_ema is not None else info.get("final_loss")
    info["train_time_s"] = time.perf_counter() - t_start
    return opt, step


def _finish_checkpoint(out: Path, model: nn.Module, opt, meta: Mapping[str, Any], step: int, total: int,
                       settings: Mapping[str, Any], info: dict[str, Any]) -> None:
    _save_checkpoint(out, model, opt, {**meta, "step": step, "total": total, "done": True,
                                       "settings_key": _settings_key(settings), "info": info})


def _finetune(run, plan: str, cfg, epochs: float, dist_: "_Dist", log) -> dict[str, Any]:
    from hant.data import load_data

    ft = cfg.finetune
    rd = RunDir(run)
    out = rd.student_dir(plan)
    say = log if dist_.main else (lambda *_: None)
    plan_d = read_plan(run, plan)
    splits = load_data(cfg.data)
    train = splits.train
    sched = _schedule(train, ft, epochs, cfg.seed, dist_)
    settings = _settings(sched, epochs, cfg, train, dist_, plan_layers=plan_d["layers"])
    state, ckpt = _load_resume(out, settings, say)
    done_before = bool(state and state.get("done") and (out / STUDENT_FILE).exists())
    info = dict(state.get("info", {})) if state is not None else {}

    model, arch, replaced = _assemble(run, plan, bn_recalibrate=state is None, splits=splits, log=say)
    arch = {**arch, "plan": plan}
    teacher = _teacher_from_config(cfg)
    dev = dist_.device
    model.to(dev).to(memory_format=torch.channels_last)
    teacher.to(dev).to(memory_format=torch.channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    if dist_.main and "teacher_top1" not in info:
        info["teacher_top1"] = _top1(teacher, splits.test, ft.batch_size, cfg.data.workers)
        info["assembled_top1"] = _top1(model, splits.test, ft.batch_size, cfg.data.workers)
        say(f"test top-1: teacher {info['teacher_top1']:.2f}%, assembled student {info['assembled_top1']:.2f}% "
            f"({replaced} of {len(arch['layers'])} layers replaced)")

    meta = {"plan": plan}
    fill = [-m / s for m, s in zip(splits.mean, splits.std)]  # normalised black: the padding colour
    opt, step = _train_kd(model, teacher, train, cfg, sched, dist_, out, settings, state, ckpt, info, meta, say,
                          name=plan, fill=fill, pad=max(1, splits.input_size // 16))
    total, global_batch = sched.total, sched.batch * dist_.world

    result: dict[str, Any] = {}
    if dist_.main:
        model.eval()
        if not done_before or "student_top1" not in info:
            info["student_top1"] = _top1(model, splits.test, ft.batch_size, cfg.data.workers)
        model.to("cpu").to(memory_format=torch.contiguous_format)
        save_student(model, out, arch)
        _finish_checkpoint(out, model, opt, meta, step, total, settings, info)
        in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
        params, flops = count_params_flops(model, in_shape)
        t_params, t_flops = count_params_flops(teacher.to("cpu"), in_shape)
        if not done_before:
            # New weights: latencies, ONNX files and their accuracies from an earlier student are stale.
            for stale in (EVAL_FILE, "model.onnx", "model.int8.onnx"):
                (out / stale).unlink(missing_ok=True)
        update_eval(out, {
            "plan": plan,
            "teacher": {"top1": info["teacher_top1"], "params": t_params, "flops": t_flops},
            "student": {"top1": info["student_top1"], "top1_assembled": info["assembled_top1"],
                        "params": params, "flops": flops},
            "target": plan_d.get("target"), "batch_size": plan_d.get("batch_size"),
            "predicted_ms": plan_d.get("predicted_ms"), "params": params, "flops": flops,
            "finetune": {"epochs": epochs, "steps": total, "batch_size": global_batch,
                         "processes": dist_.world, "lr": ft.lr, "train_images": len(train),
                         "final_loss": info.get("final_loss"), "time_s": round(info["train_time_s"], 1)},
        })
        say(f"fine-tune {plan}: test top-1 teacher {info['teacher_top1']:.2f}%, student "
            f"{info['student_top1']:.2f}% (assembled {info['assembled_top1']:.2f}%) in "
            f"{info['train_time_s']:.0f} s -> {out}")
        result = {"plan": plan, "teacher_top1": info["teacher_top1"], "student_top1": info["student_top1"],
                  "assembled_top1": info["assembled_top1"], "steps": total, "epochs": epochs,
                  "time_s": info["train_time_s"], "dir": str(out)}
    return dist_.from_main(result)


def finetune_module(model: nn.Module, teacher: nn.Module, cfg, train, epochs: float | None = None,
                    out_dir: str | os.PathLike | None = None, key: str = "module",
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune any network `model` with knowledge distillation from `teacher`, as `finetune` does a plan's.

    The same loop as `finetune`: loss, AdamW, warm-up and cosine schedule, augmentation and
    data order come from `cfg` (a RunConfig: its finetune, data and seed sections), so a
    network trained here differs from a hant student only in where it started. `train` is
    the train split (a dataset of (image, label)). With `out_dir`, checkpoints are written
    there (finetune.ckpt.*) and a rerun with the same `key` and settings resumes, ending
    with the same weights as an uninterrupted run. Single process (CPU, or CUDA when
    available). `model` is trained in place and returned to the CPU in eval mode; the
    teacher is not changed. Returns {"steps", "epochs", "batch_size", "train_images",
    "final_loss", "time_s"}. Raises HantError for epochs <= 0 or fewer than 2 train images.
    """
    import copy
    import tempfile

    epochs = float(cfg.finetune.epochs if epochs is None else epochs)
    if not epochs > 0:
        raise HantError(f"fine-tune epochs must be positive, got {epochs:g}")
    if cfg.data.mean is None or cfg.data.std is None:
        raise HantError("the config lacks data.mean and data.std; pass the run's config (written by `hant init`)")
    fill = [-m / s for m, s in zip(cfg.data.mean, cfg.data.std)]
    dist_ = _Dist(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    sched = _schedule(train, cfg.finetune, epochs, cfg.seed, dist_)
    settings = _settings(sched, epochs, cfg, train, dist_, key=key)
    with contextlib.ExitStack() as stack:
        out = Path(out_dir) if out_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="hant-finetune-")))
        out.mkdir(parents=True, exist_ok=True)
        state, ckpt = _load_resume(out, settings, log)
        info = dict(state.get("info", {})) if state is not None else {}
        teacher = copy.deepcopy(teacher).to(dist_.device).to(memory_format=torch.channels_last).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        model.to(dist_.device).to(memory_format=torch.channels_last)
        meta = {"key": key}
        opt, step = _train_kd(model, teacher, train, cfg, sched, dist_, out, settings, state, ckpt, info, meta,
                              log, name=key, fill=fill, pad=max(1, int(cfg.data.input_size) // 16))
        model.eval().to("cpu").to(memory_format=torch.contiguous_format)
        if out_dir is not None:
            _finish_checkpoint(out, model, opt, meta, step, sched.total, settings, info)
    return {"steps": sched.total, "epochs": epochs, "batch_size": sched.batch, "train_images": len(train),
            "final_loss": info.get("final_loss"), "time_s": round(float(info.get("train_time_s", 0.0)), 1)}


# ----------------------------------------------------------------------------- measure


def resolve_target(run: str | os.PathLike, plan: Mapping[str, Any]) -> tuple[str, int, int | None]:
    """(target id, batch size, threads) for a plan: its "target" is a latency-table id
    (RUN/latency/<id>.json names the target) or a target id. Raises HantError when neither."""
    rd = RunDir(run)
    name = plan.get("target")
    if not name:
        raise HantError("the plan names no target; re-run `hant select --target ...`")
    table = rd.latency_table(name)
    if table.exists():
        t = read_json(table)
        fp = t.get("fingerprint") or {}
        return (fp.get("target") or t.get("target") or name, int(t.get("batch_size") or plan.get("batch_size") or 1),
                fp.get("threads"))
    return name, int(plan.get("batch_size") or 1), None


def measure(run: str | os.PathLike, plan: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """End-to-end latency of teacher and student on the plan's target (one process, interleaved).

    Uses the latency stage's target (deployed form: e.g. ONNX Runtime with BN folded) and
    timing protocol (`latency` section of the config). The student is the fine-tuned one
    (RUN/students/<plan>/), else the plan assembled without fine-tuning (latency does not
    depend on the weights). Merges into eval.json: teacher/student latency_ms (median),
    latency_p10_ms, latency_p90_ms, speedup, predicted_ms, target, batch_size, params,
    flops. Returns that dict ({} on ranks other than 0 under torchrun). Raises HantError for
    a missing plan or an unknown target.
    """
    from hant.workspace import run_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under torchrun only rank 0 times; the other ranks must not load the cores meanwhile
    with run_lock(RunDir(run).root, log=log):
        return _measure(run, plan, log)


def _measure(run, plan: str, log) -> dict[str, Any]:
    """`measure` under the run lock. Besides the medians, eval.json gets each one's confidence
    interval (teacher/student latency_ci_lo_ms, latency_ci_hi_ms, latency_converged;
    speedup_ci_lo, speedup_ci_hi) and `timing` (threads, clock and protocol, the same record
    as the plan's hardware check)."""
    cfg = _config(run)
    rd = RunDir(run)
    plan_d = read_plan(run, plan)
    out = rd.student_dir(plan)
    if (out / ARCH_FILE).exists() and (out / STUDENT_FILE).exists():
        student = load_student(out)
    else:
        log(f"measure {plan}: no fine-tuned student yet; timing the assembled plan")
        student = assemble(run, plan, bn_recalibrate=False)
    teacher = _teacher_from_config(cfg)
    in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    timed = _time_against_teacher(run, cfg, plan_d, teacher, student, log)
    target = timed["target"]
    params, flops = count_params_flops(student, in_shape)
    t_params, t_flops = count_params_flops(teacher, in_shape)

    def section(s, p, f):
        return {"latency_ms": s.median_ms, "latency_ci_lo_ms": s.ci_lo_ms, "latency_ci_hi_ms": s.ci_hi_ms,
                "latency_converged": s.converged, "latency_p10_ms": s.p10_ms, "latency_p90_ms": s.p90_ms,
                "latency_n": s.n, "params": p, "flops": f}

    t, s = timed["teacher"], timed["student"]
    pred = plan_d.get("predicted_ms")
    patch = {
        "plan": plan,
        "teacher": section(t, t_params, t_flops),
        "student": section(s, params, flops),
        "speedup": timed["speedup"], "speedup_ci_lo": timed["speedup_ci_lo"], "speedup_ci_hi": timed["speedup_ci_hi"],
        "predicted_ms": pred,
        "prediction_error_pct": (100.0 * (pred - s.median_ms) / s.median_ms) if pred and s.median_ms else None,
        "target": plan_d.get("target"), "target_id": timed["target_id"], "batch_size": timed["batch_size"],
        "threads": target.threads, "params": params, "flops": flops,
        "latency_fingerprint": target.fingerprint(), "timing": timed["timing"],
    }
    merged = update_eval(out, patch)
    speedup = (f"{patch['speedup']:.2f}x [{patch['speedup_ci_lo']:.2f}, {patch['speedup_ci_hi']:.2f}]"
               if patch["speedup"] is not None else "n/a")
    log(f"measure {plan}: teacher {t.median_ms:.3f} ms, student {s.median_ms:.3f} ms, speedup {speedup}"
        + (f", predicted {pred:.3f} ms" if pred else ""))
    return merged


def _time_against_teacher(run, cfg, plan_d: dict, teacher: nn.Module, student: nn.Module, log
                          ) -> dict[str, Any]:
    """Time `teacher` and `student` on the plan's target, interleaved in this process.

    The one protocol behind both the plan's hardware check (`time_plan`) and the final
    measurement (`measure`), so that their numbers are comparable. Returns {"teacher": Stats,
    "student": Stats, "speedup", "speedup_ci_lo", "speedup_ci_hi" (None without a positive
    student median), "target": Target, "target_id", "batch_size", "timing": {target_id,
    batch_size, threads, clock, protocol}} (timing is what both outputs record).
    """
    from hant.data import load_data
    from hant.latency import get_target
    from hant.latency.protocol import Protocol, ratio_ci
    from hant.latency.protocol import measure as protocol_measure

    target_id, batch_size, threads = resolve_target(run, plan_d)
    in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    # The table's thread count when there is a table, else the config's: never a silent "all cores".
    target = get_target(target_id, batch_size=batch_size, threads=threads or cfg.latency.threads)
    examples = None
    if getattr(target, "precision", "fp32") != "fp32":
        # Calibrating targets (INT8) want real inputs, not noise.
        train = load_data(cfg.data).train
        n = min(len(train), max(64, batch_size * 8))
        examples = torch.stack([train[i][0] for i in range(n)])
    log(f"measure {plan_d.get('name')}: timing teacher and student on {target_id} (batch {batch_size}, "
        f"{target.threads} threads), interleaved")
    prepared = {k: target.prepare(m.eval(), in_shape, example_inputs=examples)
                for k, m in (("teacher", teacher), ("student", student))}
    # One untimed call per turn, so each network is timed with warm caches as it runs alone.
    proto = dataclasses.replace(Protocol.from_config(cfg.latency), turn_warmup=1)
    stats = protocol_measure(prepared, target, proto)
    t, s = stats["teacher"], stats["student"]
    speedup = lo = hi = None
    if s.median_ms > 0:
        speedup, lo, hi = ratio_ci(t.samples, s.samples, proto.confidence, proto.resamples, proto.seed)
    timing = {"target_id": target_id, "batch_size": batch_size, "threads": target.threads, "clock": target.clock,
              "protocol": proto.to_dict()}
    return {"teacher": t, "student": s, "speedup": speedup, "speedup_ci_lo": lo, "speedup_ci_hi": hi,
            "target": target, "target_id": target_id, "batch_size": batch_size, "timing": timing}


def time_plan(run: str | os.PathLike, plan: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The plan assembled from its phase-1 candidates, timed end to end against the teacher on
    the plan's target with the same protocol as `measure`, before any fine-tuning; writes nothing.

    Returns {"teacher_ms", "teacher_ci_lo_ms", "teacher_ci_hi_ms", "student_ms",
    "student_ci_lo_ms", "student_ci_hi_ms", "speedup", "speedup_ci_lo", "speedup_ci_hi",
    "predicted_ms", "timing"} (medians with their confidence intervals; timing as in
    eval.json). Used to check that a plan chosen from the latency table really gives the
    requested speedup. Raises HantError for a missing plan or an unknown target.
    """
    cfg = _config(run)
    plan_d = read_plan(run, plan)
    student = assemble(run, plan, bn_recalibrate=False)
    timed = _time_against_teacher(run, cfg, plan_d, _teacher_from_config(cfg), student, log)
    t, s = timed["teacher"], timed["student"]
    if timed["speedup"] is None:  # a zero median: the student is below the clock's resolution
        timed.update(speedup=math.inf, speedup_ci_lo=math.inf, speedup_ci_hi=math.inf)
    return {"teacher_ms": t.median_ms, "teacher_ci_lo_ms": t.ci_lo_ms, "teacher_ci_hi_ms": t.ci_hi_ms,
            "student_ms": s.median_ms, "student_ci_lo_ms": s.ci_lo_ms, "student_ci_hi_ms": s.ci_hi_ms,
            "speedup": timed["speedup"], "speedup_ci_lo": timed["speedup_ci_lo"],
            "speedup_ci_hi": timed["speedup_ci_hi"], "predicted_ms": plan_d.get("predicted_ms"),
            "timing": timed["timing"]}
