"""Phase 1, the stage: train every candidate of every layer by layer-wise distillation.

`distill(run, images=None, max_memory_mb=None)` reads RUN/config.yaml and RUN/layers.json,
builds and initialises the candidates (`build_candidates`), shards them across torchrun
ranks, trains them with phase 1's engine (`hant.phase1.train_pool`: one teacher pass per
batch, every candidate its own optimiser step on the normalised MSE of its layer's output),
and writes RUN/candidates/<layer>/<spec>.safetensors and RUN/candidates/index.json.

Several processes (one machine or many; gloo on CPU, nccl on GPU):

    torchrun --nproc_per_node=2 -m hant.cli -- distill --run RUN

(the `--` keeps torchrun's own parser from reading `--run` as its `--run-path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hant.dist import process_group
from hant.errors import HantError
from hant.layers import LayerInfo
from hant.phase1 import Candidate, Phase1Options, default_max_memory_mb, partition, peak_rss_mb, train_pool
from hant.layerwise import BatchPlan, LayerTap, candidate_seed, load_images

__all__ = [
    "LayerPool",
    "layer_pools",
    "build_candidates",
    "images_per_candidate",
    "distill",
]

INDEX_VERSION = 1
_MB = 1 << 20


# ----------------------------------------------------------------------------- the stage


class _Head:
    """The first `n` items of a dataset (the held-out split is already a random draw)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]

    def get_batch(self, idx: torch.Tensor):
        return load_images(self.dataset, idx), None


def images_per_candidate(cfg, images: int | None, n_train: int) -> int:
    """Training images per candidate: `images`, else `distill.images`, else `distill.epochs`
    epochs but at least `distill.min_images`."""
    if images is None:
        images = cfg.distill.images
    if images is None:
        images = max(int(round(cfg.distill.epochs * n_train)), int(cfg.distill.min_images))
    if images < 1:
        raise HantError(f"images per candidate must be at least 1, got {images}; pass --images N")
    return int(images)


def _read_entries(path: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from hant.workspace import read_json

    if not path.exists():
        return []
    try:
        return list(read_json(path).get("candidates", []))
    except HantError:  # a torn or foreign file
        log(f"phase 1: {path} is unreadable; the candidates it listed are trained again")
        return []


def _finished(rd, entries: Iterable[dict[str, Any]], log: Callable[[str], None]
              ) -> dict[tuple[str, str], dict[str, Any]]:
    """Entries that need no more work: failed, or done with their weights file present and
    matching its recorded sha256 (a truncated or altered file is reported and trained again)."""
    from hant.workspace import sha256_file

    out = {}
    for e in entries:
        status = e.get("status")
        if status == "done" and e.get("file") and (rd.root / e["file"]).is_file():
            if e.get("sha256") and sha256_file(rd.root / e["file"]) != e["sha256"]:
                log(f"phase 1: {e['file']} does not match its recorded checksum (truncated or altered); "
                    "training it again")
                continue
            out[(e["layer"], e["spec"])] = e
        elif status == "failed":
            out[(e["layer"], e["spec"])] = e
    return out


def _write_index(rd, order: list[tuple[str, str]], entries: dict[tuple[str, str], dict[str, Any]],
                 summary: dict[str, Any] | None = None) -> None:
    from hant.workspace import write_json

    doc: dict[str, Any] = {"version": INDEX_VERSION, "candidates": [entries[k] for k in order if k in entries]}
    if summary is not None:
        doc["phase1"] = summary
    write_json(rd.candidates_index, doc)


def _candidate_costs(layers, teacher: nn.Module, seed: int) -> dict[tuple[str, str], float]:
    """Forward FLOPs per image of every candidate, counted (built from its seed, then dropped)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hant import ops

    costs = {}
    for info in layers:
        t_layer = teacher.get_submodule(info.name)
        x = torch.zeros(1, *info.in_shape)
        for spec in info.candidates:
            if spec == "teacher":
                costs[(info.name, spec)] = float(info.flops)
                continue
            m = ops.build(spec, info.in_chs, info.out_chs, info.stride, t_layer, check=False).eval()
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                m(x)
            # Training costs about three forwards; the +1 keeps parameter-free ops from being free.
            costs[(info.name, spec)] = 3.0 * float(fc.get_total_flops()) + 1.0
    return costs


@dataclass(frozen=True)
class LayerPool(LayerInfo):
    """A layer from layers.json together with its candidate specs."""

    candidates: tuple[str, ...] = ()


def layer_pools(doc: dict[str, Any]) -> list[LayerPool]:
    """Every layer of a layers.json document (RUN/layers.json, as read) with its candidate
    specs, in the document's order. Raises what `LayerInfo.from_dict` raises for a malformed entry."""
    out = []
    for d in doc.get("layers", []):
        info = LayerInfo.from_dict(d)
        out.append(LayerPool(**dataclasses.asdict(info), candidates=tuple(d.get("candidates") or [])))
    return out


def build_candidates(pools: list[LayerPool], keys: list[tuple[str, str]], teacher: nn.Module,
                     sample: dict[str, torch.Tensor], seed: int) -> list[Candidate]:
    """The candidates `keys` ((layer, spec) pairs of `pools`) as phase 1 trains them, in that order.

    Each is built from its seed (`candidate_seed(seed, layer, spec)`) and initialised from
    the teacher's layer where hant.teacher_init can (`sample`: a batch of each layer's input,
    {layer: x}, used to fold squeeze-excite gates); `teacher` is evaluated as it is, and one
    that starts as an exact copy of the teacher's function is not trained. Raises KeyError
    for a layer not in `pools`, and what hant.ops.build raises for a bad spec.
    """
    from hant import ops
    from hant.teacher_init import INIT_PARTIAL, INIT_RANDOM, INIT_TEACHER, init_from_teacher

    by_name = {p.name: p for p in pools}
    out = []
    for layer, spec in keys:
        p = by_name[layer]
        t_layer = teacher.get_submodule(layer)
        torch.manual_seed(candidate_seed(seed, layer, spec))
        module = ops.build(spec, p.in_chs, p.out_chs, p.stride, t_layer, in_hw=tuple(p.in_shape[1:]),
                           out_hw=tuple(p.out_shape[1:]), sample=sample.get(layer))
        if spec == "teacher":
            out.append(Candidate(layer, spec, module.eval(), init=INIT_TEACHER, train=False))
            continue
        # A family derived from the teacher's layer (`self_w50`, `sep`, ...) was built from its
        # weights already and says how closely it starts; the rest are copied into here.
        init = (getattr(module, "hant_init", INIT_PARTIAL) if ops.needs_teacher(spec)
                else init_from_teacher(module, t_layer, sample.get(layer)))
        # A candidate that starts from the teacher's weights keeps the teacher's BatchNorm
        # statistics while it trains: they describe its inputs, training and held-out
        # evaluation then compute the same function, and a copy of the teacher stays exact.
        # Measured on EfficientNet-B0 (bench/phase1.py's layers, 2816 images): lower held-out
        # loss for 75% of such candidates, mean -6%, exact copies 0.0000 instead of up to 0.1.
        # One that computes exactly the teacher's function (a zero-padded kernel, say) is at
        # the minimum already: training would only feed Adam round-off gradients, so it is
        # evaluated as it is.
        out.append(Candidate(layer, spec, module, init=init, train=init != INIT_TEACHER,
                             frozen_bn=init != INIT_RANDOM))
    return out


def _phase1_summary(per_rank: list[dict[str, Any]], world: int, device: torch.device, images: int, asked: int,
                    heldout: int, batch_size: int, steps: int, budget_mb: int, wall_s: float) -> dict[str, Any]:
    """Phase 1's summary from every rank's `train_pool` counts: images and passes add up,
    times are the slowest rank's (the ranks train side by side)."""
    def total(key):
        return sum(s[key] for s in per_rank)

    def slowest(key):
        return max(s[key] for s in per_rank)

    out = {
        "world_size": world,
        "device": device.type,
        # What each candidate trained on: the budget rounded up to whole batches.
        "images_per_candidate": images,
        "images_asked": asked,
        "heldout_images": heldout,
        "batch_size": batch_size,
        "steps": steps,
        **{k: total(k) for k in ("groups", "teacher_passes", "teacher_images", "candidate_images")},
        "train_s": slowest("train_s"),
        "eval_s": slowest("eval_s"),
        **{k: total(k) for k in ("teacher_train_s", "optimizer_s", "cache_mb")},
        "peak_rss_mb": slowest("peak_rss_mb"),
        "max_memory_mb": budget_mb,
        "wall_s": wall_s,
    }
    out["candidate_images_per_s"] = out["candidate_images"] / max(out["train_s"], 1e-9)
    return out


def distill(run: str | os.PathLike, images: int | None = None, max_memory_mb: int | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Phase 1 on a run folder: train every unfinished candidate, evaluate it, write its weights.

    Reads RUN/config.yaml and RUN/layers.json (from `hant init`). `images` (per
    candidate) overrides `distill.images`/`distill.epochs`; `max_memory_mb` (per group)
    overrides `distill.max_memory_mb` (default: half of the available RAM, 80% of free GPU
    memory). Under torchrun, candidates are shared among the ranks by FLOPs; rank 0
    merges the index. Writes RUN/candidates/<layer>/<spec>.safetensors and
    RUN/candidates/index.json. Candidates already done (or failed) are kept, with the
    budget they were trained with (`steps`, `images` in the index); a group interrupted
    mid-way resumes from its last checkpoint when its settings are unchanged.

    Returns a summary dict (candidates, done, failed, groups, teacher_passes,
    images_per_candidate, wall_s, peak_rss_mb, ...). Raises HantError when init has not
    run, the teacher checkpoint changed since init, or the data cannot be loaded.
    """
    from hant.run import Run
    from hant.workspace import run_lock

    t0 = time.time()
    the_run = Run(run)
    rd = the_run.dir
    cfg = the_run.config
    doc = the_run.layers_doc
    # Ranks wait for each other only at the end, when one may still be training its last
    # group: the timeout must cover a whole phase 1.
    with process_group(timeout=datetime.timedelta(hours=48)) as dist_, contextlib.ExitStack() as stack:
        rank, world, device = dist_.rank, dist_.world, dist_.device
        quiet = (lambda msg: None) if rank != 0 else log
        error = None
        if rank == 0:
            try:
                stack.enter_context(run_lock(rd.root, log=log))
            except HantError as e:
                error = str(e)
        dist_.agree(error)

        from hant.data import load_data

        the_run.check_teacher()
        splits = load_data(cfg.data)
        teacher = the_run.teacher()
        pools = layer_pools(doc)
        order = [(p.name, s) for p in pools for s in p.candidates]
        n_img = images_per_candidate(cfg, images, len(splits.train))
        plan = BatchPlan(len(splits.train), cfg.distill.batch_size, cfg.seed)
        steps = math.ceil(n_img / plan.batch_size)

        parts_dir = rd.candidates_dir / ".parts"
        finished = _finished(rd, _previous_entries(rd, parts_dir, quiet), quiet)
        mine = _share(pools, order, teacher, cfg.seed, world, rank)
        pending = [k for k in mine if k not in finished]
        quiet(f"phase 1: {len(order)} candidates, {len(finished)} finished, "
              f"{len(order) - len(finished)} to train on {world} process{'es' if world > 1 else ''} "
              f"({n_img} images each, batch {plan.batch_size}, {steps} steps, device {device.type})")

        budget_mb = max_memory_mb if max_memory_mb is not None else cfg.distill.max_memory_mb
        if budget_mb is None:
            budget_mb = default_max_memory_mb(device) // max(1, dist_.local_world)
        opts = _options(cfg, steps, plan.batch_size, int(budget_mb), device, progress=(rank == 0))

        sample_images = load_images(splits.train, plan.indices(0)[: min(32, plan.batch_size)])
        cands = _pending_candidates(pools, pending, teacher, sample_images, cfg.seed)
        saver = _Saver(rd, order, finished, mine, parts_dir, rank, world)

        workdir = rd.candidates_dir / ".work" / f"rank{rank}-of{world}"
        heldout = splits.heldout
        if cfg.distill.heldout_images is not None:
            heldout = _Head(heldout, cfg.distill.heldout_images)
        result = train_pool(teacher, cands, splits.train, heldout, opts, workdir=workdir,
                            on_group_done=saver, log=quiet, sample=sample_images[:8])
        stats = {k: v for k, v in result.items() if k != "entries"}
        stats["peak_rss_mb"] = peak_rss_mb()

        if world > 1:
            gathered = dist_.gather((list(saver.mine.values()), stats))
            per_rank = [g[1] for g in gathered]
            for ents, _ in gathered:
                for e in ents:
                    saver.known[(e["layer"], e["spec"])] = e
        else:
            per_rank = [stats]
        all_entries = saver.known

        summary = _phase1_summary(per_rank, world, device, steps * plan.batch_size, n_img, len(heldout),
                                  plan.batch_size, steps, int(budget_mb), time.time() - t0)
        if rank == 0:
            _write_index(rd, order, all_entries, summary=summary)
            shutil.rmtree(parts_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        dist_.barrier()
        if rank == 0:
            shutil.rmtree(rd.candidates_dir / ".work", ignore_errors=True)

    return _finish(summary, order, all_entries, rd, run, quiet)


def _options(cfg, steps: int, batch_size: int, budget_mb: int, device: torch.device, progress: bool
             ) -> Phase1Options:
    """The phase-1 engine's options from the run's `distill` settings."""
    d = cfg.distill
    return Phase1Options(steps=steps, batch_size=batch_size, optimizer=d.optimizer, lr=d.lr,
                         weight_decay=d.weight_decay, seed=cfg.seed, max_memory_bytes=budget_mb * _MB,
                         checkpoint_minutes=d.checkpoint_minutes, device=device, workers=cfg.data.workers,
                         progress=progress)


class _Saver:
    """Phase 1's `on_group_done`: writes each finished group's weights and the index (one
    process) or this rank's part file (torchrun), and keeps the entries: `mine` (this rank's
    share) and `known` (every candidate this process knows of)."""

    def __init__(self, rd, order: list[tuple[str, str]], finished: dict[tuple[str, str], dict[str, Any]],
                 mine: list[tuple[str, str]], parts_dir: Path, rank: int, world: int):
        self.rd, self.order, self.parts_dir, self.rank, self.world = rd, order, parts_dir, rank, world
        self.mine: dict[tuple[str, str], dict[str, Any]] = {k: finished[k] for k in mine if k in finished}
        self.known = dict(finished)

    def __call__(self, group: list[Candidate], group_entries: list[dict[str, Any]]) -> None:
        from hant.workspace import save_safetensors, write_json

        rd = self.rd
        for c, e in zip(group, group_entries):
            if e["status"] == "done":
                path = rd.candidate_file(c.layer, c.spec)
                state = {k: v.detach().cpu() for k, v in c.module.state_dict().items()}
                e["sha256"] = save_safetensors(path, state, metadata={"layer": c.layer, "spec": c.spec,
                                                                      "init": c.init})
                e["file"] = str(path.relative_to(rd.root))
            else:
                e["file"], e["sha256"] = None, None
            self.mine[c.key] = e
            self.known[c.key] = e
            c.module = None  # saved: let its memory go before the next group
        if self.world == 1:
            _write_index(rd, self.order, self.known)
        else:
            write_json(self.parts_dir / f"rank{self.rank}.json", {"candidates": list(self.mine.values())})


def _previous_entries(rd, parts_dir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The index's entries and those of every rank's part file (a torchrun phase 1 that stopped)."""
    previous = _read_entries(rd.candidates_index, log)
    for part in sorted(parts_dir.glob("rank*.json")) if parts_dir.exists() else []:
        previous += _read_entries(part, log)
    return previous


def _share(pools: list[LayerPool], order: list[tuple[str, str]], teacher: nn.Module, seed: int, world: int,
           rank: int) -> list[tuple[str, str]]:
    """The candidates `rank` of `world` trains, balanced by cost. Shares are computed over all
    candidates, finished or not, so that a restart gives every rank the same share (and its
    checkpoints stay valid)."""
    if world == 1:
        return list(order)
    costs = _candidate_costs(pools, teacher, seed)
    return [order[i] for i in partition([costs[k] for k in order], world)[rank]]


def _pending_candidates(pools: list[LayerPool], pending: list[tuple[str, str]], teacher: nn.Module,
                        sample_images: torch.Tensor, seed: int) -> list[Candidate]:
    """`build_candidates` for the pending keys, given a few real images of each layer's input
    (for folding SE gates and measuring memory)."""
    layers = list(dict.fromkeys(layer for layer, _ in pending))
    sample = {}
    if layers:
        sample = {k: x for k, (x, _) in LayerTap(teacher, layers)(sample_images, layers).items()}
    return build_candidates(pools, pending, teacher, sample, seed)


def _finish(summary: dict[str, Any], order: list[tuple[str, str]], all_entries: dict, rd, run,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Count the outcome into `summary`, say it in one line and return it; raise HantError
    when a candidate has no result at all."""
    n_done = sum(1 for k in order if all_entries.get(k, {}).get("status") == "done")
    failed = [all_entries[k] for k in order if all_entries.get(k, {}).get("status") == "failed"]
    missing = [k for k in order if k not in all_entries]
    summary.update(candidates=len(order), done=n_done, failed=len(failed))
    msg = (f"phase 1: {n_done}/{len(order)} candidates done in {summary['wall_s']:.0f} s, "
           f"{summary['teacher_passes']} teacher passes, {summary['candidate_images_per_s']:.0f} candidate-images/s, "
           f"peak RSS {summary['peak_rss_mb']:.0f} MB -> {rd.candidates_index}")
    if failed:
        msg += f"; {len(failed)} failed (e.g. {failed[0]['layer']}/{failed[0]['spec']}: {failed[0].get('reason')})"
    log(msg)
    if missing:
        raise HantError(f"{len(missing)} candidates have no result (e.g. {missing[0][0]}/{missing[0][1]}); "
                        f"rerun `hant distill --run {run}`")
    return summary
