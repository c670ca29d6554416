"""Phase 3, fine-tuning: the plan's student trained against the teacher, end to end.

`finetune(run, plan)` assembles the plan's student (`hant.student.assemble`) and runs the
knowledge-distillation loop of `hant.kd` on it (loss, schedule, exact resumption,
DistributedDataParallel under torchrun); writes RUN/students/<plan>/. `outdated(run, plan)`
says whether a finished student was made with the settings the run would use now.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable

import torch
from torch import nn

from hant.dist import Dist, process_group
from hant.errors import HantError
from hant.kd import CKPT_STATE, Loop, finish_checkpoint, load_resume, make_schedule, settings_key, train_kd
from hant.run import Run
from hant.student import (ARCH_FILE, EVAL_FILE, STUDENT_FILE, TEACHER_SPEC, assemble, count_params_flops, read_plan,
                          save_student, update_eval)
from hant.workspace import RunDir, read_json, sha256_file

__all__ = ["finetune", "outdated", "embedding_compatibility"]

# ----------------------------------------------------------------------------- a plan's student


def finetune(run: str | os.PathLike, plan: str, epochs: float | None = None,
             log: Callable[[str], None] = print, feature_loss: str | None = None,
             feature_weight: float | None = None, ce_weight: float | None = None) -> dict[str, Any]:
    """Fine-tune the plan's student end to end with knowledge distillation from the teacher.

    Loss: kd_weight * T^2 * KL(teacher || student at temperature T) + ce_weight * CE, plus
    with finetune.feature_loss "nmse" or "cosine" feature_weight * the mean over the plan's
    layers of `feature_loss` between the student's and the teacher's outputs there; on the
    train split only (never the held-out split). `feature_loss`, `feature_weight` and
    `ce_weight` override the run's config for this call. AdamW, linear warm-up then cosine LR,
    channels_last, seeded and deterministic in data order (by seed and epoch) and in
    augmentation (by step). Checkpoints to RUN/students/<plan>/finetune.ckpt.* every epoch
    and every `finetune.checkpoint_minutes`; a rerun resumes there and ends with the same
    weights as an uninterrupted run. Under torchrun (WORLD_SIZE > 1) it runs
    DistributedDataParallel (gloo on CPU, nccl on GPU), the global batch split across ranks.

    Writes student.safetensors, arch.json and eval.json (test top-1 of teacher, of the
    assembled student before fine-tuning and of the fine-tuned student); a newly trained
    student replaces eval.json and removes ONNX files of an earlier one. Returns
    {"plan", "teacher_top1", "student_top1", "assembled_top1", "steps", "epochs", "time_s",
    "dir", "history"} (history: per epoch, the mean loss and its parts on rank 0's batches).
    Raises HantError for a missing plan or phase-1 weights, epochs <= 0, or an unknown
    feature loss or a negative weight.
    """
    import dataclasses

    from hant.workspace import run_lock

    rd = RunDir(run)
    cfg = Run(run).config
    overrides = {k: v for k, v in (("feature_loss", feature_loss), ("feature_weight", feature_weight),
                                   ("ce_weight", ce_weight)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **overrides))
    epochs, min_steps = _epochs_asked(cfg, epochs)
    if not epochs > 0:
        raise HantError(f"fine-tune epochs must be positive, got {epochs:g}")
    with process_group() as dist_, contextlib.ExitStack() as stack:
        error = None
        if dist_.main:
            try:
                stack.enter_context(run_lock(rd.root, log=log))
            except HantError as e:
                error = str(e)
        dist_.agree(error)
        return _finetune(run, plan, cfg, epochs, dist_, log, min_steps)


def _epochs_asked(cfg, epochs: float | None) -> tuple[float, int]:
    """(epochs, floor in steps) of a plan's fine-tuning: epochs from the config get the floor
    finetune.min_steps (a small set's 2 epochs are a handful of steps); epochs passed in are
    taken as they are."""
    if epochs is None:
        return float(cfg.finetune.epochs), int(cfg.finetune.min_steps)
    return float(epochs), 0


def _plan_loop(run, plan: str, cfg, epochs: float, min_steps: int, dist_: Dist, say):
    """The loop that fine-tunes a plan's student, and the data splits and plan it reads."""
    from hant.data import load_data

    ft = cfg.finetune
    out = RunDir(run).student_dir(plan)
    plan_d = read_plan(run, plan)
    splits = load_data(cfg.data)
    train = splits.train
    extra: dict[str, Any] = {"plan_layers": plan_d["layers"]}
    redistilled = RunDir(run).redistilled_index(plan)
    if redistilled.exists():
        # A fine-tuning begun from phase-1 weights must not resume after `hant redistill` has
        # given the plan other starting weights (nor the other way round); without an index
        # the key is what it always was, so older checkpoints still resume.
        extra["redistilled_index_sha256"] = sha256_file(redistilled)
    sched = make_schedule(train, ft, epochs, cfg.seed, dist_)
    if sched.total < min_steps:
        say(f"fine-tune {plan}: {epochs:g} epochs of {len(train)} train images are {sched.total} steps, under "
            f"finetune.min_steps {min_steps}; training {min_steps / sched.steps_per_epoch:.3g} epochs")
        epochs = min_steps / sched.steps_per_epoch
        sched = make_schedule(train, ft, epochs, cfg.seed, dist_)
    loop = Loop(name=plan, train=train, cfg=cfg, epochs=epochs, sched=sched,
                 dist=dist_, out=out, meta={"plan": plan}, extra=extra,
                 fill=[-m / s for m, s in zip(splits.mean, splits.std)],  # normalised black: the padding colour
                 pad=max(1, splits.input_size // 16), say=say, feature_layers=tuple(plan_d["layers"]))
    return loop, splits, plan_d


def outdated(run: str | os.PathLike, plan: str, epochs: float | None = None) -> str | None:
    """Why the plan's fine-tuned student differs from what `finetune(run, plan, epochs)` would
    train now (the settings that changed, e.g. "lr, redistilled_index_sha256"), or None when it
    matches or there is no student. A student records its recipe in arch.json (`finetune`);
    one made before that is compared through its finished checkpoint, and without either it
    counts as current."""
    out = RunDir(run).student_dir(plan)
    if not (out / ARCH_FILE).exists():
        return None
    made = read_json(out / ARCH_FILE).get("finetune")
    state = read_json(out / CKPT_STATE) if made is None and (out / CKPT_STATE).exists() else None
    if made is None and state is None:
        return None
    cfg = Run(run).config
    loop, _, _ = _plan_loop(run, plan, cfg, *_epochs_asked(cfg, epochs), Dist(), lambda *_: None)
    if made is None:
        return None if state.get("settings_key") == settings_key(loop.settings) else "fine-tuning settings"
    now = json.loads(json.dumps(loop.recipe))
    changed = sorted(k for k in set(now) | set(made) if now.get(k) != made.get(k))
    return ", ".join(changed) or None


def _finetune(run, plan: str, cfg, epochs: float, dist_: Dist, log, min_steps: int = 0) -> dict[str, Any]:
    ft = cfg.finetune
    say = log if dist_.main else (lambda *_: None)
    loop, splits, plan_d = _plan_loop(run, plan, cfg, epochs, min_steps, dist_, say)
    out, train, epochs = loop.out, loop.train, loop.epochs
    resume = load_resume(out, loop.settings, say)
    done_before = bool(resume and resume.state.get("done") and (out / STUDENT_FILE).exists())
    info = dict(resume.state.get("info", {})) if resume is not None else {}

    model = assemble(run, plan, bn_recalibrate=resume is None, splits=splits, log=say)
    arch = {**model.hant_arch, "plan": plan, "finetune": loop.recipe}
    replaced = sum(e["spec"] != TEACHER_SPEC for e in arch["layers"].values())
    teacher = Run(run).teacher()
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

    opt, step = train_kd(model, teacher, loop, resume, info)
    total, global_batch = loop.sched.total, loop.sched.batch * dist_.world

    result: dict[str, Any] = {}
    if dist_.main:
        model.eval()
        if not done_before or "student_top1" not in info or "paired" not in info:
            info["paired"] = paired_top1(model, teacher, splits.test, ft.batch_size, cfg.data.workers)
            info["student_top1"] = info["paired"]["top1"]
            lo, hi = info["paired"]["drop_ci95"]
            say(f"fine-tune {plan}: top-1 drop from the teacher {info['paired']['drop']:+.2f} points, 95% interval "
                f"[{lo:+.2f}, {hi:+.2f}] on {info['paired']['images']} paired test images")
        if not done_before or "embedding" not in info:
            info["embedding"] = embedding_compatibility(model, teacher, splits.test, ft.batch_size, cfg.data.workers)
            e = info["embedding"]
            if "cosine" in e:
                say(f"fine-tune {plan}: student features against the teacher's: cosine {e['cosine']:.3f}, "
                    f"retrieval top-1 {e['retrieval_top1']['student_to_teacher']:.2f}% with student queries, "
                    f"{e['retrieval_top1']['teacher_to_teacher']:.2f}% with the teacher's")
        model.to("cpu").to(memory_format=torch.contiguous_format)
        save_student(model, out, arch)
        finish_checkpoint(loop, model, opt, step, info)
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
            "embedding": info.get("embedding"),
            "paired": info.get("paired"),
            "start": _start_record(run, plan, arch),
            "target": plan_d.get("target"), "batch_size": plan_d.get("batch_size"),
            "predicted_ms": plan_d.get("predicted_ms"), "params": params, "flops": flops,
            "finetune": {"epochs": epochs, "steps": total, "batch_size": global_batch,
                         "processes": dist_.world, "lr": ft.lr, "train_images": len(train),
                         "kd_weight": ft.kd_weight, "ce_weight": ft.ce_weight, "temperature": ft.temperature,
                         "feature_loss": ft.feature_loss, "feature_weight": ft.feature_weight,
                         "augment": loop.augment, "head_fit": info.get("head_fit"),
                         "final_loss": info.get("final_loss"),
                         "history": info.get("history", []),
                         "time_s": round(info["train_time_s"], 1)},
        })
        say(f"fine-tune {plan}: test top-1 teacher {info['teacher_top1']:.2f}%, student "
            f"{info['student_top1']:.2f}% (assembled {info['assembled_top1']:.2f}%) in "
            f"{info['train_time_s']:.0f} s -> {out}")
        result = {"plan": plan, "teacher_top1": info["teacher_top1"], "student_top1": info["student_top1"],
                  "assembled_top1": info["assembled_top1"], "steps": total, "epochs": epochs,
                  "time_s": info["train_time_s"], "dir": str(out), "history": info.get("history", [])}
    return dist_.from_main(result)


def _start_record(run, plan: str, arch: dict[str, Any]) -> dict[str, Any]:
    """What fine-tuning started from: the candidates' weights ("phase1" or "redistilled") and,
    when re-distilled, the plan's mean held-out NMSE at its replaced layers before and after."""
    out: dict[str, Any] = {"candidate_weights": arch.get("candidate_weights", "phase1")}
    if out["candidate_weights"] == "redistilled":
        index = RunDir(run).redistilled_index(plan)
        doc = read_json(index) if index.exists() else {}
        held = doc.get("heldout") or {}
        before, after = held.get("before") or {}, held.get("after") or {}
        if before and after:
            out["redistill"] = {"images": (doc.get("settings") or {}).get("images"),
                                "mean_heldout_nmse_before": sum(before.values()) / len(before),
                                "mean_heldout_nmse_after": sum(after.values()) / len(after)}
    return out


EMBEDDING_RETRIEVAL_IMAGES = 10000


def embedding_compatibility(model: nn.Module, teacher: nn.Module, dataset, batch_size: int,
                            workers: int = 0) -> dict[str, Any]:
    """hant.embedding.compatibility of `model` against `teacher` on `dataset` (the test split);
    {"error": why} instead of raising when a network has no classifier whose input is its
    embedding. Both networks' train/eval modes are restored."""
    from hant.data import make_loader
    from hant.embedding import compatibility

    try:
        return compatibility(model, teacher, make_loader(dataset, batch_size, num_workers=workers),
                             max_images=EMBEDDING_RETRIEVAL_IMAGES)
    except HantError as e:
        return {"error": str(e)}


def paired_top1(model: nn.Module, teacher: nn.Module, dataset, batch_size: int, workers: int = 0) -> dict[str, Any]:
    """hant.paired.compare of `model` against `teacher` on `dataset` (the test split): both
    networks' top-1 and the drop with its 95% interval, from one pass of each over the same
    images. Both networks' train/eval modes are restored."""
    from hant.data import make_loader
    from hant.paired import compare, predictions, same_images

    t = predictions(teacher, make_loader(dataset, batch_size, num_workers=workers))
    s = predictions(model, make_loader(dataset, batch_size, num_workers=workers))
    same_images(t, s)
    return compare(t.right, s.right)


def _top1(model: nn.Module, dataset, batch_size: int, workers: int = 0, desc: str | None = None) -> float:
    """Test top-1 (percent) with hant.teacher.evaluate; the model's train/eval mode is restored."""
    from hant.data import make_loader
    from hant.teacher import evaluate

    was = model.training
    try:
        return float(evaluate(model, make_loader(dataset, batch_size, num_workers=workers), desc=desc)["top1"])
    finally:
        model.train(was)
