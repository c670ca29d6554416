"""The knowledge-distillation loop: a student network trained against a teacher, end to end.

Shared below the stages: `hant.finetune` runs it on a plan's student, `hant.pick` on each
candidate plan for a short distillation, and the benchmarks on any network
(`finetune_module`), so a network trained here differs from a hant student only in where
it started.

The loss is `kd_loss` on the logits, plus, with `finetune.feature_loss` set, feature-map
distillation: `feature_loss` between the student's and the teacher's outputs at named
layers, captured by forward hooks (`FeatureTaps`) in the same forward passes as the logits.

Resumption is exact: every random draw of a step follows from (seed, step, rank), data
order from (seed, epoch), and a checkpoint holds the weights and the optimiser's state, so
a run killed and resumed ends with the same weights as one that was not.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hant.config import AUTO_AUGMENT_PASSES
from hant.dist import Dist
from hant.errors import HantError
from hant.schedule import warmup_then_cosine
from hant.workspace import fault_point, load_safetensors, read_json, save_safetensors, write_json

__all__ = ["kd_loss", "feature_loss", "FeatureTaps", "augments", "Schedule", "make_schedule", "Loop", "Resume",
           "load_resume", "settings_key", "train_kd", "finish_checkpoint", "finetune_module", "CKPT_FILE",
           "CKPT_STATE"]

CKPT_FILE = "finetune.ckpt.safetensors"
CKPT_STATE = "finetune.ckpt.json"


# ----------------------------------------------------------------------------- loss, schedule, processes


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


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, kind: str) -> torch.Tensor:
    """Distance between two feature maps of the same shape (N, ...), per sample, then the batch mean.

    `kind` "nmse": ||s - t||^2 / ||t||^2 (0 when equal, 1 for s = 0); "cosine": 1 - cos(s, t)
    of the flattened samples (0 when parallel, up to 2). Computed in float32. Returns a
    scalar tensor. Raises ValueError for another `kind` or for shapes that differ.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}")
    s, t = student_feat.float(), teacher_feat.float()
    if kind == "nmse":
        dims = tuple(range(1, s.dim()))
        return ((s - t).pow(2).sum(dims) / t.pow(2).sum(dims).clamp_min(1e-12)).mean()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1, eps=1e-8)).mean()
    raise ValueError(f"unknown feature loss {kind!r}; use nmse or cosine")


class FeatureTaps:
    """Forward hooks on the same named layers of the student and the teacher, for the feature loss.

    Per step the teacher runs first: its hooks keep a copy of each layer's output (a later
    op could write into it in place). Then the student runs: each of its hooks computes that
    layer's `feature_loss` term at once, before later ops run, so that an in-place write
    after the layer cannot change the term silently (autograd would report it). `loss()`
    gives the mean over the layers and clears both for the next step. Hooks go on the
    modules themselves, so they fire inside DistributedDataParallel's forward too.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str], kind: str):
        self.kind, self.layers = kind, list(layers)
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.terms: dict[str, torch.Tensor] = {}
        self.handles = []
        try:
            for name in self.layers:
                self.handles.append(teacher.get_submodule(name).register_forward_hook(self._teacher_hook(name)))
                self.handles.append(student.get_submodule(name).register_forward_hook(self._student_hook(name)))
        except AttributeError as e:
            self.close()
            raise HantError(f"feature loss: {e}; the student and the teacher must share the plan's layer names") from None

    def _teacher_hook(self, name: str):
        def fn(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise HantError(f"feature loss: layer {name} does not return one tensor; set finetune.feature_loss: none")
            if name in self.teacher_out:
                raise HantError(f"feature loss: layer {name} runs more than once per forward; "
                                "set finetune.feature_loss: none")
            self.teacher_out[name] = output.detach().clone()

        return fn

    def _student_hook(self, name: str):
        def fn(module, args, output):
            t = self.teacher_out.get(name)
            if t is None or name in self.terms:
                raise HantError(f"feature loss: layer {name} ran in the student without the teacher, or twice; "
                                "set finetune.feature_loss: none")
            if not isinstance(output, torch.Tensor) or output.shape != t.shape:
                raise HantError(f"feature loss: the student's layer {name} gives "
                                f"{tuple(getattr(output, 'shape', ()))}, the teacher's {tuple(t.shape)}; "
                                "set finetune.feature_loss: none")
            self.terms[name] = feature_loss(output, t, self.kind)

        return fn

    def loss(self) -> torch.Tensor:
        """The mean over the layers of this step's terms; clears them for the next step."""
        missing = [n for n in self.layers if n not in self.terms]
        if missing:
            raise HantError(f"feature loss: layer {missing[0]} did not run in the student's forward")
        out = torch.stack([self.terms[n] for n in self.layers]).mean()
        self.teacher_out.clear()
        self.terms.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.teacher_out.clear()
        self.terms.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _epoch_batches(dataset, batch: int, epoch: int, seed: int, dist_: Dist) -> list[list[int]]:
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


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(out: Path, model: nn.Module, opt, state: dict[str, Any]) -> None:
    # Clone: safetensors refuses tensors that share storage, and a clone is cheap at these sizes.
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update({k: v.detach().cpu().clone().contiguous() for k, v in opt_tensors.items()})
    sha = save_safetensors(out / CKPT_FILE, tensors)
    # The state file is written second and names the weights' checksum, so a kill between
    # the two writes is detected on resume rather than mixing two steps.
    write_json(out / CKPT_STATE, {**state, "optimizer": opt_meta, "sha256": sha})


def settings_key(d: Mapping[str, Any]) -> str:
    """A short hash of a loop's settings (`Loop.settings`): a checkpoint resumes only under the same key."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


class Resume(NamedTuple):
    """A checkpoint to resume from: its state file and its tensors (model.*, optim.*)."""

    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def load_resume(out: Path, settings: Mapping[str, Any], log) -> Resume | None:
    """The checkpoint in `out` to resume from, or None: when there is none, when its files are
    damaged, or when it was made with other `settings` (`log` hears which, and training starts over)."""
    state_file = out / CKPT_STATE
    if not state_file.exists() or not (out / CKPT_FILE).exists():
        return None
    try:
        state = read_json(state_file)
        tensors = load_safetensors(out / CKPT_FILE, state.get("sha256"))
    except HantError as e:
        log(f"fine-tune checkpoint unusable ({e}); starting over")
        return None
    if state.get("settings_key") != settings_key(settings):
        log("fine-tune checkpoint was made with other settings (epochs, batch, lr, plan, processes); starting over")
        return None
    return Resume(state, tensors)


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Schedule:
    """Steps of one fine-tuning: per-process batch, steps per epoch, total and warm-up steps."""

    batch: int
    steps_per_epoch: int
    total: int
    warmup: int


def augments(setting: bool | str, images_seen: int, train_images: int) -> bool:
    """finetune.augment resolved for a schedule that shows `images_seen` images of a train
    split of `train_images`: "auto" is on past AUTO_AUGMENT_PASSES passes."""
    if setting == "auto":
        return images_seen > AUTO_AUGMENT_PASSES * train_images
    return bool(setting)


def make_schedule(train, ft, epochs: float, seed: int, dist_: Dist) -> Schedule:
    """The steps of `epochs` over `train` with the finetune section `ft`, split across `dist_`'s
    processes. Raises HantError for a train split of fewer than 2 images."""
    if len(train) < 2:
        raise HantError("the train split has fewer than 2 images; use more data")
    batch = max(1, min(ft.batch_size, len(train)) // dist_.world)
    steps_per_epoch = len(_epoch_batches(train, batch, 0, seed, dist_))
    total = max(1, round(epochs * steps_per_epoch))
    return Schedule(batch, steps_per_epoch, total, min(max(1, round(ft.warmup * total)), total))


@dataclass(frozen=True)
class Loop:
    """What one fine-tuning loop runs with besides the two networks; `hant.finetune.finetune`
    (a plan's student) and `finetune_module` (any network) differ only in these."""

    name: str  # in the log and on the progress bar
    train: Any  # the train split, a dataset of (image, label)
    cfg: Any  # a RunConfig: its finetune, data and seed sections
    epochs: float
    sched: Schedule
    dist: Dist
    out: Path  # where checkpoints go
    meta: Mapping[str, Any]  # added to every checkpoint's state
    extra: Mapping[str, Any]  # what else a checkpoint must have been made with (the plan's layers, a key)
    fill: list[float]  # the random crop's padding colour, per channel
    pad: int  # the random crop's padding, in pixels
    say: Callable[[str], None]
    feature_layers: tuple[str, ...] = ()  # where the feature loss compares the two networks (the plan's layers)

    @functools.cached_property
    def augment(self) -> bool:
        """Whether batches are randomly cropped and flipped: finetune.augment, where "auto"
        means only when the schedule passes over the train split more than
        AUTO_AUGMENT_PASSES times (resolved once; every step reads it)."""
        return augments(self.cfg.finetune.augment, self.sched.total * self.sched.batch * self.dist.world,
                        len(self.train))

    @property
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must have been made with to be resumed."""
        ft = self.cfg.finetune
        out = {**self.extra, "epochs": self.epochs, "total": self.sched.total, "batch": self.sched.batch,
               "world": self.dist.world, "lr": ft.lr, "wd": ft.weight_decay, "kd": ft.kd_weight,
               "ce": ft.ce_weight, "T": ft.temperature, "seed": self.cfg.seed, "train": len(self.train),
               "augment": self.augment}
        if ft.head_fit:
            out["head_fit"] = True  # only when on, like the feature loss below
        if ft.feature_loss != "none":
            # Only when on: checkpoints of logits-only runs keep their key and still resume.
            out.update(feature_loss=ft.feature_loss, feature_weight=ft.feature_weight,
                       feature_layers=list(self.feature_layers))
        return out

    @property
    def recipe(self) -> dict[str, Any]:
        """The settings without how the work was split across processes: what a finished
        student records, so that a later run can tell whether it would train it the same way."""
        out = {k: v for k, v in self.settings.items() if k not in ("world", "batch", "total")}
        return {**out, "batch_size": min(int(self.cfg.finetune.batch_size), len(self.train))}

    def seed(self, step: int) -> int:
        """The seed of every random draw of `step` on this rank (augmentation, dropout), so
        that a resumed run repeats the uninterrupted one exactly."""
        return self.cfg.seed * 1_000_003 + step * 1009 + self.dist.rank

    def checkpoint_state(self, step: int, done: bool, info: Mapping[str, Any]) -> dict[str, Any]:
        """The state file of a checkpoint at `step`: the loop's meta, progress, settings key and `info`."""
        return {**self.meta, "step": step, "total": self.sched.total, "done": done,
                "settings_key": settings_key(self.settings), "info": info}


def _restore(model: nn.Module, opt: torch.optim.Optimizer, resume: Resume | None, loop: Loop) -> int:
    """Load a checkpoint's weights and optimiser state; return its step (0 without one)."""
    if resume is None:
        return 0
    model.load_state_dict({k[len("model."):]: v for k, v in resume.tensors.items() if k.startswith("model.")},
                          strict=True)
    _load_optimizer(opt, resume.tensors, resume.state["optimizer"])
    step = int(resume.state["step"])
    loop.say(f"fine-tune {loop.name}: resuming at step {step}/{loop.sched.total}")
    return step


def _rest_of_epoch(loop: Loop, step: int):
    """A loader over the batches of `step`'s epoch from `step` on."""
    per_epoch = loop.sched.steps_per_epoch
    epoch = step // per_epoch
    batches = _epoch_batches(loop.train, loop.sched.batch, epoch, loop.cfg.seed, loop.dist)
    return torch.utils.data.DataLoader(loop.train, batch_sampler=batches[step - epoch * per_epoch:],
                                       num_workers=loop.cfg.data.workers)


def _kd_step(net: nn.Module, teacher: nn.Module, opt: torch.optim.Optimizer, loop: Loop, step: int,
             x: torch.Tensor, y: torch.Tensor, taps: FeatureTaps | None = None) -> tuple[list[float], float]:
    """One optimiser step of `net` on the batch (x, y), with the feature loss when `taps` are
    on the two networks; returns ([loss, logits' loss, feature loss or nan], learning rate)."""
    from hant.data import random_crop_flip

    ft, dev = loop.cfg.finetune, loop.dist.device
    torch.manual_seed(loop.seed(step))
    if loop.augment:
        x = random_crop_flip(x, loop.pad, torch.Generator().manual_seed(loop.seed(step)), fill=loop.fill, flip=True)
    lr = warmup_then_cosine(step, loop.sched.total, loop.sched.warmup, ft.lr)
    for group in opt.param_groups:
        group["lr"] = lr
    x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(dev, non_blocking=True)
    with torch.no_grad():
        t_logits = teacher(x)
    loss = logits_loss = kd_loss(net(x), t_logits, y, ft.kd_weight, ft.ce_weight, ft.temperature)
    feat = loss.new_full((), float("nan"))
    if taps is not None:
        feat = taps.loss()
        loss = logits_loss + ft.feature_weight * feat
    if not torch.isfinite(loss):
        raise HantError(f"fine-tune loss became {loss.item()} at step {step}; lower finetune.lr")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([loss.detach(), logits_loss.detach(), feat.detach()]).tolist(), lr


def train_kd(model: nn.Module, teacher: nn.Module, loop: Loop, resume: Resume | None,
              info: dict[str, Any]) -> tuple[torch.optim.Optimizer, int]:
    """The fine-tuning loop shared by `finetune` and `finetune_module`.

    `model` and `teacher` are on the loop's device in channels_last; `resume` a checkpoint
    to start from (None: step 0). With `finetune.feature_loss` set, hooks on
    `loop.feature_layers` of both networks add the feature loss. Checkpoints go to
    `loop.out` at the end of every epoch and every `finetune.checkpoint_minutes`. `info` is
    updated in place (train_time_s, final_loss, history: see `_record`) and saved with every
    checkpoint. Returns (optimizer, steps done). Raises HantError when the feature loss is on
    without layers to compare, or the loss stops being finite.
    """
    from tqdm.auto import tqdm

    ft, sched, dist_ = loop.cfg.finetune, loop.sched, loop.dist
    if ft.feature_loss != "none" and not loop.feature_layers:
        raise HantError("finetune.feature_loss needs the layers where student and teacher are compared; "
                        "give feature_layers, or set finetune.feature_loss: none")
    opt = torch.optim.AdamW(_param_groups(model, ft.weight_decay), lr=ft.lr)
    step = _restore(model, opt, resume, loop)
    if ft.head_fit and resume is None:
        _fit_head(model, teacher, loop, info)
    t_start = time.perf_counter() - float(info.get("train_time_s", 0.0))
    net: nn.Module = model
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None)
    net.train()
    ckpt_every = max(1.0, ft.checkpoint_minutes * 60.0)
    last_ckpt = time.monotonic()

    def checkpoint(point: str, n: int) -> None:
        nonlocal last_ckpt
        if dist_.main:
            info["train_time_s"] = time.perf_counter() - t_start
            _save_checkpoint(loop.out, model, opt, loop.checkpoint_state(step, False, info))
        last_ckpt = time.monotonic()
        fault_point(f"finetune:{point}", n, "exit")

    global_batch = sched.batch * dist_.world
    if step < sched.total:
        loop.say(f"fine-tune {loop.name}: {sched.total} steps ({loop.epochs:g} epochs of {sched.steps_per_epoch}), "
                 f"batch {global_batch}{f' over {dist_.world} processes' if dist_.world > 1 else ''}, "
                 f"lr {ft.lr:g}, on {dist_.device.type}")
    bar = tqdm(total=sched.total * global_batch, initial=step * global_batch, unit="img", unit_scale=True,
               desc=f"finetune {loop.name}", disable=not dist_.main or step >= sched.total, dynamic_ncols=True)
    loss_ema = None
    with contextlib.ExitStack() as stack:
        taps = None
        if ft.feature_loss != "none" and step < sched.total:
            taps = stack.enter_context(FeatureTaps(model, teacher, loop.feature_layers, ft.feature_loss))
        while step < sched.total:
            for x, y in _rest_of_epoch(loop, step):
                parts, lr = _kd_step(net, teacher, opt, loop, step, x, y, taps)
                step += 1
                loss = parts[0]
                loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
                _record(info, step, sched, parts, taps is not None)
                bar.update(global_batch)
                bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{lr:.2e}", refresh=False)
                if step >= sched.total:
                    break
                if step % sched.steps_per_epoch and time.monotonic() - last_ckpt > ckpt_every:
                    checkpoint("after_step", step)
            if step % sched.steps_per_epoch == 0 and step < sched.total:
                checkpoint("after_epoch", step // sched.steps_per_epoch)
    bar.close()
    info["final_loss"] = loss_ema if loss_ema is not None else info.get("final_loss")
    info["train_time_s"] = time.perf_counter() - t_start
    return opt, step


def _fit_head(model: nn.Module, teacher: nn.Module, loop: Loop, info: dict[str, Any]) -> None:
    """Before the first step: `hant.headfit.fit_output_layer` on the batches BatchNorm
    statistics are re-estimated on (`hant.student.bn_loader`, the same on every rank); the
    outcome goes to info["head_fit"]."""
    from hant.headfit import fit_output_layer
    from hant.student import bn_loader

    cfg = loop.cfg
    res = fit_output_layer(model, teacher, bn_loader(cfg, loop.train), max(1, cfg.finetune.bn_batches),
                           loop.dist.device)
    info["head_fit"] = res
    if res["applied"]:
        loop.say(f"fine-tune {loop.name}: output layer {res['layer']} fitted to the teacher's logits on "
                 f"{res['images']} train images; KL on the quarter held back {res['kl_before']:.4f} -> "
                 f"{res['kl_after']:.4f}")
    elif "reason" in res:
        loop.say(f"fine-tune {loop.name}: output layer not fitted: {res['reason']}")
    else:
        loop.say(f"fine-tune {loop.name}: output layer kept; a fit would raise the KL on the quarter held back "
                 f"{res['kl_before']:.4f} -> {res['kl_after']:.4f}")


def _record(info: dict[str, Any], step: int, sched: Schedule, parts: Sequence[float], feature: bool) -> None:
    """Add step `step`'s losses (this rank's batch) to `info`; at the end of an epoch (or of
    the run) append its means to info["history"] as {"epoch", "steps", "loss", "logits_loss",
    "feature_loss" (None when off)}. The running sums live in info["epoch_sums"], saved with
    every checkpoint, so a resumed run records the same history as an uninterrupted one."""
    acc = info.setdefault("epoch_sums", {"steps": 0, "loss": 0.0, "logits_loss": 0.0, "feature_loss": 0.0})
    acc["steps"] += 1
    acc["loss"] += parts[0]
    acc["logits_loss"] += parts[1]
    if feature:
        acc["feature_loss"] += parts[2]
    if step % sched.steps_per_epoch == 0 or step >= sched.total:
        n = acc["steps"]
        info.setdefault("history", []).append({
            "epoch": -(-step // sched.steps_per_epoch), "steps": n, "loss": acc["loss"] / n,
            "logits_loss": acc["logits_loss"] / n, "feature_loss": acc["feature_loss"] / n if feature else None})
        del info["epoch_sums"]


def finish_checkpoint(loop: Loop, model: nn.Module, opt, step: int, info: dict[str, Any]) -> None:
    """The checkpoint of a finished loop (marked done), from which a rerun rewrites the weights without training."""
    _save_checkpoint(loop.out, model, opt, loop.checkpoint_state(step, True, info))


# ----------------------------------------------------------------------------- any network


def finetune_module(model: nn.Module, teacher: nn.Module, cfg, train, epochs: float | None = None,
                    out_dir: str | os.PathLike | None = None, key: str = "module",
                    log: Callable[[str], None] = print,
                    feature_layers: Sequence[str] | None = None,
                    recalibrate_bn: bool = False) -> dict[str, Any]:
    """Fine-tune any network `model` with knowledge distillation from `teacher`, as `finetune` does a plan's.

    The same loop as `finetune`: loss, AdamW, warm-up and cosine schedule, augmentation and
    data order come from `cfg` (a RunConfig: its finetune, data and seed sections), so a
    network trained here differs from a hant student only in where it started. `train` is
    the train split (a dataset of (image, label)). With `out_dir`, checkpoints are written
    there (finetune.ckpt.*) and a rerun with the same `key` and settings resumes, ending
    with the same weights as an uninterrupted run. Single process (CPU, or CUDA when
    available). With `recalibrate_bn`, for a network whose BatchNorm statistics are stale (a
    pruned one) or the defaults (a new one), they are re-estimated before the first step on
    `finetune.bn_batches` train batches (`hant.student.bn_loader`), as a plan's student's are
    when assembled; without, they are used as they are (a teacher's). `model` is trained in
    place and returned to the CPU in eval mode; the teacher is not changed. With `cfg.finetune.feature_loss` set, the feature loss compares
    the two networks at `feature_layers` (submodule names both have, with outputs of equal
    shape; default: `model.hant_arch["layers"]`, a hant student's). Returns {"steps",
    "epochs", "batch_size", "train_images", "final_loss", "time_s", "history", "head_fit"}
    (`hant.headfit.fit_output_layer`'s outcome with `finetune.head_fit`, else None). Raises
    HantError for epochs <= 0, fewer than 2 train images, or a feature loss without layers.
    """
    import copy
    import tempfile

    from hant.student import bn_loader, recalibrate_batchnorm

    epochs = float(cfg.finetune.epochs if epochs is None else epochs)
    if not epochs > 0:
        raise HantError(f"fine-tune epochs must be positive, got {epochs:g}")
    if cfg.data.mean is None or cfg.data.std is None:
        raise HantError("the config lacks data.mean and data.std; pass the run's config (written by `hant init`)")
    dist_ = Dist()
    sched = make_schedule(train, cfg.finetune, epochs, cfg.seed, dist_)
    if feature_layers is None:
        feature_layers = list(getattr(model, "hant_arch", {}).get("layers", {}))
    with contextlib.ExitStack() as stack:
        out = Path(out_dir) if out_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="hant-finetune-")))
        out.mkdir(parents=True, exist_ok=True)
        loop = Loop(name=key, train=train, cfg=cfg, epochs=epochs, sched=sched, dist=dist_, out=out,
                     meta={"key": key}, extra={"key": key}, fill=[-m / s for m, s in zip(cfg.data.mean, cfg.data.std)],
                     pad=max(1, int(cfg.data.input_size) // 16), say=log, feature_layers=tuple(feature_layers))
        resume = load_resume(out, loop.settings, log)
        info = dict(resume.state.get("info", {})) if resume is not None else {}
        teacher = copy.deepcopy(teacher).to(dist_.device).to(memory_format=torch.channels_last).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        model.to(dist_.device).to(memory_format=torch.channels_last)
        if recalibrate_bn and resume is None:
            # The output-layer fit reads features through these statistics. Fitted through stale
            # ones, a pruned EfficientNet-B0 started fine-tuning at a loss of 20 and a new one at
            # 500,000 (the teacher's ~0.3), and they ended at 75.6% and 54.5% after 2 epochs.
            recalibrate_batchnorm(model, bn_loader(cfg, train), cfg.finetune.bn_batches, dist_.device)
        opt, step = train_kd(model, teacher, loop, resume, info)
        model.eval().to("cpu").to(memory_format=torch.contiguous_format)
        if out_dir is not None:
            finish_checkpoint(loop, model, opt, step, info)
    return {"steps": sched.total, "epochs": epochs, "batch_size": sched.batch, "train_images": len(train),
            "final_loss": info.get("final_loss"), "time_s": round(float(info.get("train_time_s", 0.0)), 1),
            "history": info.get("history", []), "head_fit": info.get("head_fit")}


# Retrieval compares every test image with every other: beyond this many it costs more than
# the rest of the evaluation, and the number is already stable.
