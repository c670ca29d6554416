"""Re-distil a plan's chosen candidates on the student's own inputs, before fine-tuning.

Phase 1 trains every candidate on the teacher's input to its layer. In the assembled
student, layer l receives what the student's earlier layers computed, so their errors add
up along the network. `redistill(run, plan)` takes only the plan's replaced layers, in
network order, and trains each from its phase-1 weights on pairs (x_l, y_l): x_l the input
of layer l in the student whose earlier layers are already re-distilled, y_l the teacher's
output at layer l. Loss (phase 1's normalised MSE, `hant.layerwise.nmse`), optimiser,
learning rate, weight decay and batch size are phase 1's (`distill.*`); each layer sees
`distill.redistill_images` train images. With `distill.redistill_through_skips` (or
`through_skips=True`), a layer that the plan follows directly with skipped layers learns the
teacher's output after the last of them instead of its own: the skips pass its output on
unchanged, so it is trained to stand in for the layers the plan removed (the entry records
that layer as `target`).

BatchNorm: the student starts as `assemble` builds it, statistics re-estimated on its own
inputs. A layer trains with batch statistics, and the student's statistics are re-estimated
(`finetune.bn_batches` batches, as `assemble` does) after each layer, so every later layer
learns from the inputs the finished student will give it, and the last re-estimation is
the one `assemble` makes from the written weights.

Files (through hant.workspace's atomic writers, under the run lock):

    RUN/redistilled/<plan>/<layer>/<spec>.safetensors
    RUN/redistilled/<plan>/index.json   {"version", "plan", "complete", "layers": {layer: spec},
        "settings", "entries": [{"layer", "spec", "key", "file", "sha256", "phase1_sha256",
        "steps", "images", "train_loss", "heldout_before", "heldout_start", "heldout_after",
        "seconds"}], "heldout": {"images", "before": {layer: nmse}, "after": {layer: nmse}}}

heldout_before / heldout_after: the held-out NMSE at the layer's output in the assembled
student with phase-1 weights everywhere / with the re-distilled weights (student-side
inputs, `heldout_nmse`); heldout_start: the layer's phase-1 weights once the layers before
it are re-distilled. A layer is done when its entry's `key` (the settings and every replaced
layer up to it, with its phase-1 sha256) matches and its file matches its sha256; a rerun
skips done layers and redoes the rest.

`hant.student.assemble(run, plan)` uses the re-distilled weights once the plan's index is
complete and current (`hant.run.Run.redistilled`). `hant accelerate`, `hant demo` and
`hant.accelerate` run this stage on every plan before fine-tuning (`--no-redistill` to skip),
as the recovery benchmark found it worth the minute it takes (bench/results/recovery.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from hant.errors import HantError
from hant.layerwise import BatchPlan, LayerTap, candidate_seed, load_images, make_optimizer, nmse
from hant.schedule import warmup_cosine_scale
from hant.run import TEACHER_SPEC, Run

__all__ = ["INDEX_VERSION", "redistill", "is_current", "heldout_nmse", "compare_top1"]

INDEX_VERSION = 1
_WARMUP_FRAC = 0.05  # phase 1's (Phase1Options.warmup_frac)
_TAIL_FRAC = 0.1  # train_loss: mean over this last share of the steps, as in phase 1


# ----------------------------------------------------------------------------- measurement


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _prep(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last makes the forward passes ~3x faster on CPU (DESIGN.md, environment facts).
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cpu" and x.dim() == 4 else x


@torch.no_grad()
def heldout_nmse(student: nn.Module, teacher: nn.Module, layers: Sequence[str], dataset,
                 batch_size: int = 128, images: int | None = None) -> dict[str, float]:
    """The NMSE at each of `layers`' outputs, the student's against the teacher's.

    Each network runs on its own inputs, so the student's error at layer l includes what
    its earlier layers passed on. `dataset` is a split of (image, label) items (its first
    `images`, all when None); sums run over all images: ||s_l - t_l||^2 / ||t_l||^2. Both
    models run in eval mode (left so) on the device of the student's parameters. Returns
    {layer: nmse}. Raises HantError when a layer does not run once per forward.
    """

    layers = list(layers)
    if not layers:
        return {}
    device = next(student.parameters()).device
    student.eval()
    teacher.eval()
    s_tap, t_tap = LayerTap(student, layers), LayerTap(teacher, layers)
    n = len(dataset) if images is None else min(int(images), len(dataset))
    num = {name: torch.zeros((), device=device) for name in layers}
    den = {name: torch.zeros((), device=device) for name in layers}
    for start in range(0, n, batch_size):
        x = _prep(load_images(dataset, torch.arange(start, min(n, start + batch_size))), device)
        s, t = s_tap(x, layers), t_tap(x, layers)
        for name in layers:
            y = t[name][1].float()
            num[name] += (s[name][1].float() - y).pow(2).sum()
            den[name] += y.pow(2).sum()
    return {name: float(num[name]) / max(float(den[name]), 1e-12) for name in layers}


def compare_top1(run: str | os.PathLike, plan: str, images: int | None = None,
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Held-out top-1 (percent) of the teacher and of the plan's assembled student with phase-1
    and with re-distilled weights (each as `assemble` builds it, BatchNorm re-estimated).

    `images`: the first that many held-out images (all when None). Returns {"plan", "images",
    "teacher", "phase1", "redistilled"}. Raises HantError when the plan has no complete
    re-distillation (run `hant redistill` first), and what `assemble` raises.
    """
    from torch.utils.data import Subset

    from hant.data import load_data, make_loader
    from hant.student import assemble
    from hant.teacher import evaluate

    the_run = Run(run)
    cfg = the_run.config
    splits = load_data(cfg.data)
    data = splits.heldout if images is None else Subset(splits.heldout, range(min(int(images), len(splits.heldout))))

    def top1(model: nn.Module) -> float:
        model.to(memory_format=torch.channels_last)
        return float(evaluate(model, make_loader(data, cfg.finetune.batch_size, num_workers=cfg.data.workers))["top1"])

    after = assemble(run, plan, splits=splits, redistilled=True)
    if after.hant_arch.get("candidate_weights") != "redistilled":
        raise HantError(f"plan {plan} has no complete re-distillation; "
                        f"run `hant redistill --run {the_run.root} --plan {plan}` first")
    out = {"plan": plan, "images": len(data), "teacher": top1(the_run.teacher()),
           "phase1": top1(assemble(run, plan, splits=splits, redistilled=False)), "redistilled": top1(after)}
    if log:
        log(f"redistill: held-out top-1 of plan {plan} on {out['images']} images: teacher {out['teacher']:.2f}%, "
            f"phase-1 weights {out['phase1']:.2f}%, re-distilled {out['redistilled']:.2f}%")
    return out


# ----------------------------------------------------------------------------- training


def _layer_keys(settings: Mapping[str, Any], chain: Sequence[tuple[str | None, ...]]) -> dict[str, str]:
    """{layer: key} for every layer of `chain` ((layer, spec, phase-1 sha256[, target]) in
    network order): a layer's inputs depend on the layers before it, so its key covers them all."""
    keys = {}
    for i, (name, *_) in enumerate(chain):
        blob = json.dumps({"settings": dict(settings), "chain": [list(c) for c in chain[: i + 1]]}, sort_keys=True)
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


def _optimizer(module: nn.Module, dcfg) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": dcfg.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]

    return make_optimizer(groups, dcfg.optimizer, dcfg.lr, params[0].device)


def _train_layer(student: nn.Module, teacher: nn.Module, name: str, train, batches, steps: int, dcfg,
                 seed: int, bar=None, target: str | None = None) -> float:
    """Train the student's layer `name` for `steps` steps on (its input in the student, the
    teacher's output at `target`, default `name`). Returns the mean loss over the last tenth
    of the steps."""
    from hant.layers import get_layer

    module = get_layer(student, name)
    device = next(module.parameters()).device
    opt = _optimizer(module, dcfg)
    target = target or name
    s_tap, t_tap = LayerTap(student, [name]), LayerTap(teacher, [target])
    warmup = max(1, round(steps * _WARMUP_FRAC))
    tail_from = steps - max(1, round(steps * _TAIL_FRAC))
    torch.manual_seed(candidate_seed(seed, name, "redistill"))  # randomness inside the op (dropout)
    tail = []
    for step in range(steps):
        images = _prep(load_images(train, batches.indices(step)), device)
        student.eval()
        x = s_tap(images, [name])[name][0]
        y = t_tap(images, [target])[target][1]
        for g in opt.param_groups:
            g["lr"] = dcfg.lr * warmup_cosine_scale(step, steps, warmup)
        module.train()
        loss = nmse(module(x), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise HantError(f"re-distilling layer {name} diverged at step {step} (loss {value}); "
                            "lower distill.lr, or fine-tune without re-distillation")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= tail_from:
            tail.append(value)
        if bar is not None:
            bar.update(len(images))
    student.eval()
    return sum(tail) / len(tail)


def _finished(root: Path, doc: dict[str, Any] | None, keys: Mapping[str, str],
              log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Entries of `doc` that need no more work: same key, file present and matching its sha256."""
    from hant.workspace import sha256_file

    out = {}
    for e in (doc or {}).get("entries") or []:
        name = e.get("layer")
        if name not in keys or e.get("key") != keys[name] or not e.get("file"):
            continue
        f = root / e["file"]
        if not f.is_file() or sha256_file(f) != e.get("sha256"):
            log(f"redistill: {f} is missing or does not match its recorded checksum (truncated or altered); "
                "re-distilling that layer again")
            continue
        out[name] = e
    return out


class _Work(NamedTuple):
    """What a plan's re-distillation has to do, worked out from weights and the index alone."""

    student: nn.Module  # the plan assembled from phase-1 weights, BatchNorm statistics as the teacher's
    replaced: list[str]  # the layers the plan replaces, in network order
    specs: dict[str, str]  # {replaced layer: spec}
    trainable: list[str]  # replaced layers whose op has parameters
    phase1_sha: dict[str, str | None]  # {replaced layer: sha256 of the phase-1 weights it starts from}
    settings: dict[str, Any]  # what every layer's key covers besides the chain before it
    keys: dict[str, str]  # {replaced layer: key}
    previous: dict[str, Any] | None  # the index on disk
    done: dict[str, dict[str, Any]]  # its entries that need no more work
    pending: list[str]  # trainable layers left to train
    targets: dict[str, str]  # {trainable layer: the later layer whose teacher output it learns}, where not its own

    @property
    def current(self) -> bool:
        """Whether the index on disk is complete for exactly these layers and settings."""
        p = self.previous
        return bool(not self.pending and p and p.get("complete") and p.get("layers") == self.specs
                    and p.get("heldout"))


def _through_skips(the_run: Run, specs: Mapping[str, str], trainable: Sequence[str]) -> dict[str, str]:
    """{trainable layer: target} for each trainable layer that the plan follows directly with
    skipped layers: the target is the last of them. A skip is the identity, so the student's
    output there is this layer's, and the layer is trained to give what the teacher gives after
    the layers it stands in for. "Directly" is checked on the teacher: each skipped layer's
    input must be exactly the previous layer's output (on two random images), so a layer
    whose next layer in network order reads something else is left with its own target."""
    from hant.ops.simple import SKIP

    order = [info.name for info in the_run.layers]
    runs = {}
    for name in trainable:
        i = j = order.index(name)
        while j + 1 < len(order) and specs.get(order[j + 1]) == SKIP.name:
            j += 1
        if j > i:
            runs[name] = order[i: j + 1]
    if not runs:
        return {}
    teacher = the_run.teacher().eval()
    d = the_run.config.data
    x = torch.randn(2, int(d.in_chans), int(d.input_size), int(d.input_size),
                    generator=torch.Generator().manual_seed(0))
    names = list(dict.fromkeys(n for chain in runs.values() for n in chain))
    with torch.no_grad():
        seen = LayerTap(teacher, names)(x, names)
    targets = {}
    for name, chain in runs.items():
        last = name
        for prev, nxt in zip(chain, chain[1:]):
            if not torch.equal(seen[nxt][0], seen[prev][1]):
                break
            last = nxt
        if last != name:
            targets[name] = last
    return targets


def _work(the_run: Run, plan: str, n_img: int, log: Callable[[str], None], through_skips: bool = False) -> _Work:
    from hant.layers import get_layer
    from hant.student import assemble

    student = assemble(the_run.root, plan, bn_recalibrate=False, redistilled=False)
    layers_arch = student.hant_arch["layers"]
    replaced = [info.name for info in the_run.layers
                if info.name in layers_arch and layers_arch[info.name]["spec"] != TEACHER_SPEC]
    specs = {name: layers_arch[name]["spec"] for name in replaced}
    trainable = [name for name in replaced if any(True for _ in get_layer(student, name).parameters())]
    phase1 = the_run.candidate_index()
    phase1_sha = {name: (phase1.get((name, specs[name])) or {}).get("sha256") for name in replaced}
    cfg, dcfg = the_run.config, the_run.config.distill
    settings = {"version": INDEX_VERSION, "images": n_img, "batch_size": dcfg.batch_size,
                "optimizer": dcfg.optimizer, "lr": dcfg.lr, "weight_decay": dcfg.weight_decay, "seed": cfg.seed,
                "bn_batches": cfg.finetune.bn_batches, "bn_batch_size": cfg.finetune.batch_size,
                "teacher_sha256": the_run.layers_doc.get("checkpoint_sha256")}
    targets = _through_skips(the_run, specs, trainable) if through_skips else {}
    # A layer trained to another target gets it in its key (and so do the layers after it);
    # with none, the keys are what they were before targets existed.
    keys = _layer_keys(settings, [(name, specs[name], phase1_sha[name], *([targets[name]] if name in targets else []))
                                  for name in replaced])
    previous = the_run.redistilled_index(plan, log)
    done = _finished(the_run.root, previous, keys, log)
    pending = [name for name in trainable if name not in done]
    return _Work(student, replaced, specs, trainable, phase1_sha, settings, keys, previous, done, pending, targets)


def is_current(run: str | os.PathLike, plan: str, images: int | None = None,
               through_skips: bool | None = None) -> bool:
    """Whether `redistill(run, plan, images, through_skips)` would find every layer done with
    today's settings and train nothing (reads weights and the index; no data, no training)."""
    the_run = Run(run)
    dcfg = the_run.config.distill
    n_img = int(images if images is not None else dcfg.redistill_images)
    skips = bool(dcfg.redistill_through_skips if through_skips is None else through_skips)
    return _work(the_run, plan, n_img, lambda *_: None, skips).current


def _bar(total: int):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc="redistill", unit="img", unit_scale=True, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, file=sys.stderr)


def redistill(run: str | os.PathLike, plan: str, images: int | None = None,
              log: Callable[[str], None] = print, through_skips: bool | None = None) -> dict[str, Any]:
    """Re-distil a plan's replaced layers on the student's own inputs; write their weights.

    `plan` names RUN/plans/<plan>.json; `images`: train images per layer (default
    `distill.redistill_images`). Layers the plan keeps as the teacher's, and ops without
    parameters, are not trained (the latter still shape the inputs of later layers). Writes
    RUN/redistilled/<plan>/<layer>/<spec>.safetensors and index.json after every layer
    (under the run lock), so an interrupted run resumes at the first unfinished layer; done
    layers with unchanged settings are skipped, and a run with nothing left to do trains
    and measures nothing.

    Returns the index (see the module docstring) with "trained" and "reused" (layer names)
    and "wall_s" added. Raises HantError for a missing plan or phase-1 weights, `images`
    below 1, a held run folder, or a layer whose loss diverges.
    """
    from hant.workspace import run_lock

    t0 = time.time()
    if not isinstance(plan, str):
        raise HantError("redistill takes a plan name (RUN/plans/<name>.json); write the plan with `hant select`")
    the_run = Run(run)
    dcfg = the_run.config.distill
    n_img = int(images if images is not None else dcfg.redistill_images)
    skips = bool(dcfg.redistill_through_skips if through_skips is None else through_skips)
    if n_img < 1:
        raise HantError(f"images per re-distilled layer must be at least 1, got {n_img}; pass --images N")
    index_path = the_run.dir.redistilled_index(plan)

    with run_lock(the_run.root, log=log):
        # Weights first, without data or BatchNorm re-estimation: a rerun with nothing left to
        # do stops here.
        w = _work(the_run, plan, n_img, log, skips)
        if w.current:
            log(f"redistill: plan {plan}: all {len(w.trainable)} layers re-distilled already -> {index_path}")
            return {**w.previous, "trained": [], "reused": list(w.trainable), "wall_s": time.time() - t0}
        trainer = _Trainer(the_run, plan, w, n_img, log)
        bar = _bar(len(w.pending) * trainer.steps * trainer.batches.batch_size) if w.pending else None
        try:
            for name in w.pending:
                trainer.train(name, bar)
        finally:
            if bar is not None:
                bar.close()
        doc = trainer.finish()
    before, after = doc["heldout"]["before"], doc["heldout"]["after"]
    n = max(1, len(w.replaced))
    log(f"redistill: plan {plan}: mean held-out NMSE at the replaced layers {sum(before.values()) / n:.4f} -> "
        f"{sum(after.values()) / n:.4f}; {len(w.pending)} layers trained in {time.time() - t0:.0f} s "
        f"-> {index_path}")
    return {**doc, "trained": list(w.pending), "reused": [n for n in w.trainable if n not in w.pending],
            "wall_s": time.time() - t0}


class _Trainer:
    """One re-distillation under way: the student (as `assemble` builds it, with the layers
    already done loaded), the teacher, the data, and the index entries so far."""

    def __init__(self, the_run: Run, plan: str, w: _Work, n_img: int, log: Callable[[str], None]):
        from hant.data import load_data
        from hant.layers import get_layer
        from hant.workspace import load_safetensors

        self.run, self.plan, self.w, self.log = the_run, plan, w, log
        cfg = self.cfg = the_run.config
        dcfg = cfg.distill
        self.splits = load_data(cfg.data)
        self.batches = BatchPlan(len(self.splits.train), dcfg.batch_size, cfg.seed)
        self.steps = math.ceil(n_img / self.batches.batch_size)
        log(f"redistill: plan {plan}: {len(w.trainable)} layers to re-distil, {len(w.trainable) - len(w.pending)} "
            f"done, {n_img} images each (batch {self.batches.batch_size}, {self.steps} steps)")
        self.device = _device()
        memory = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.student = w.student.to(device=self.device, memory_format=memory)
        self.teacher = the_run.teacher().to(device=self.device, memory_format=memory)
        heldout = self.splits.heldout
        self.n_heldout = len(heldout) if dcfg.heldout_images is None else min(dcfg.heldout_images, len(heldout))
        # The student as `assemble` builds it (statistics re-estimated on its own inputs), to
        # measure from; then with the layers already done, to go on from.
        self.recalibrate()
        self.before = self.nmse(w.replaced)
        for name in w.trainable:
            if name in w.done:
                get_layer(self.student, name).load_state_dict(
                    load_safetensors(the_run.root / w.done[name]["file"], w.done[name]["sha256"]))
        if w.done:
            self.recalibrate()
        self.entries = {name: {**w.done[name], "heldout_before": self.before[name]} for name in w.done}

    def recalibrate(self) -> None:
        from hant.student import bn_loader, recalibrate_batchnorm

        if self.cfg.finetune.bn_batches > 0:
            recalibrate_batchnorm(self.student, bn_loader(self.cfg, self.splits.train), self.cfg.finetune.bn_batches,
                                  self.device)

    def nmse(self, layers: Sequence[str]) -> dict[str, float]:
        return heldout_nmse(self.student, self.teacher, layers, self.splits.heldout, self.cfg.distill.batch_size,
                            self.n_heldout)

    def train(self, name: str, bar) -> None:
        """Trains one layer on the student's inputs, writes its weights and the index."""
        from hant.layers import get_layer
        from hant.workspace import save_safetensors

        w, t1 = self.w, time.time()
        spec, target = w.specs[name], w.targets.get(name, name)
        start = self.nmse([target])[target]
        train_loss = _train_layer(self.student, self.teacher, name, self.splits.train, self.batches, self.steps,
                                  self.cfg.distill, self.cfg.seed, bar, target=target)
        self.recalibrate()
        after = self.nmse([target])[target]
        f = self.run.dir.redistilled_dir(self.plan) / name / f"{spec}.safetensors"
        state = {k: v.detach().cpu().clone() for k, v in get_layer(self.student, name).state_dict().items()}
        sha = save_safetensors(f, state, metadata={"layer": name, "spec": spec, "plan": self.plan,
                                                   "key": w.keys[name]})
        self.entries[name] = {"layer": name, "spec": spec, "key": w.keys[name], "status": "done",
                              "file": str(f.relative_to(self.run.root)), "sha256": sha,
                              "phase1_sha256": w.phase1_sha[name], "steps": self.steps,
                              "images": self.steps * self.batches.batch_size, "train_loss": train_loss,
                              "heldout_before": self.before[name], "heldout_start": start, "heldout_after": after,
                              "seconds": round(time.time() - t1, 2), **({"target": target} if target != name else {})}
        self.write(complete=False)
        at = f" at {target} (the skipped layers' output)" if target != name else ""
        self.log(f"redistill: {name} ({spec}): held-out NMSE{at} in the student {self.before[target]:.4f} -> "
                 f"{after:.4f} (phase-1 weights on these inputs {start:.4f}), {time.time() - t1:.1f} s")

    def write(self, complete: bool, after: dict[str, float] | None = None) -> dict[str, Any]:
        from hant.workspace import write_json

        w = self.w
        doc = {"version": INDEX_VERSION, "plan": self.plan, "complete": complete, "layers": w.specs,
               "settings": w.settings, "entries": [self.entries[name] for name in w.trainable if name in self.entries]}
        if after is not None:
            doc["heldout"] = {"images": self.n_heldout, "before": self.before, "after": after}
        write_json(self.run.dir.redistilled_index(self.plan), doc)
        return doc

    def finish(self) -> dict[str, Any]:
        """Measures every replaced layer in the finished student, writes the complete index
        and removes weight files the index no longer names."""
        after = self.nmse(self.w.replaced)
        for name in self.entries:
            self.entries[name]["heldout_after"] = after[name]
        doc = self.write(complete=True, after=after)
        keep = {self.run.root / e["file"] for e in self.entries.values()}
        for f in self.run.dir.redistilled_dir(self.plan).glob("*/*.safetensors"):
            if f not in keep:
                f.unlink()  # a layer the plan no longer replaces, or another spec for it
        return doc
