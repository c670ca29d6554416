"""Phase 1's engine: many candidates trained at once by layer-wise distillation, on plain modules.

For each batch of the train split the teacher runs once (eval mode, no grad); forward
hooks capture each replaced layer's input x and output y, and every pending candidate
of that layer takes one optimiser step on the normalised MSE

    ||o(x) - y||^2 / ||y||^2        (sums over the batch)

so that losses compare across layers. Candidates are independent: each has its own
parameters, optimiser state and random stream, so the result of one does not depend
on which others trained beside it, in which group, on which rank, or whether the run
was interrupted.

`train_pool(teacher, candidates, train_set, heldout_set, options)` groups the candidates
under a memory budget (`measure_candidate`, `pack_groups`), streams the data, evaluates on
the held-out set (`evaluate_pool`), checkpoints and resumes (given a work folder). The stage
that runs it on a run folder, across torchrun ranks, is `hant.distill.distill`.

Where the time goes: the teacher's forward is a small share of phase 1 (on
EfficientNet-B0 with the `default` space, under 1%: the 457 candidates cost ~85 teacher
forwards per image), so sharing one teacher pass mainly saves the teacher's work; the
candidates' own steps dominate. See bench/phase1.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from hant.errors import HantError
from hant.schedule import warmup_cosine_scale
from hant.layerwise import BatchPlan, LayerTap, candidate_seed, load_images, make_optimizer, sum_squared_error
from hant.workspace import fault_point

__all__ = [
    "Candidate",
    "Phase1Options",
    "train_pool",
    "evaluate_pool",
    "measure_candidate",
    "pack_groups",
    "partition",
    "default_max_memory_mb",
    "peak_rss_mb",
]

_MB = 1 << 20


# ----------------------------------------------------------------------------- pieces


@dataclass
class Candidate:
    """One candidate operation for one layer.

    `module` maps the layer's input to its output. `train=False` keeps it as it is
    (the teacher's own layer): it is only evaluated. `init` is recorded in the index.
    `cost` (FLOPs per image) balances ranks; `state_bytes` and `act_bytes` (per image)
    are measured by `measure_candidate` and pack groups.
    """

    layer: str
    spec: str
    module: nn.Module
    init: str = "random"
    train: bool = True
    cost: float = 0.0
    state_bytes: int = 0
    act_bytes: float = 0.0
    clone_input: bool = False  # the module writes into its input: give it a copy
    lr_scale: float = 1.0  # its learning rate is the group's times this
    frozen_bn: bool = False  # train with BatchNorm in eval mode (running statistics, affine still learnt)
    # Time spent in its forward and backward passes (this process). On CUDA, kernels run
    # asynchronously and this is mostly launch time: syncing per candidate would idle the GPU.
    seconds: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.layer, self.spec)

    @property
    def trainable(self) -> bool:
        return self.train and any(p.requires_grad for p in self.module.parameters())


@dataclass
class Phase1Options:
    """How the engine trains (see `DistillConfig` for the user-facing names).

    steps: optimiser steps per candidate (images per candidate / batch_size).
    max_memory_bytes: budget for one group of candidates (None: no grouping).
    checkpoint_minutes: how often the group in progress is saved (needs a work folder).
    device: None picks CUDA when present. channels_last / autocast: None picks the fast
    choice for the device (channels_last on CPU, bf16 autocast on CUDA).
    """

    steps: int
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_frac: float = 0.05
    seed: int = 0
    max_memory_bytes: int | None = None
    checkpoint_minutes: float = 5.0
    device: str | torch.device | None = None
    channels_last: bool | None = None
    autocast: bool | None = None
    workers: int = 0
    heldout_batch_size: int | None = None
    progress: bool = True
    tail_frac: float = 0.1  # train_loss is the mean over this last share of the steps


def _image_stream(dataset, plan: "BatchPlan", start: int, stop: int, workers: int, skip: bool = False
                  ) -> Iterator[torch.Tensor | None]:
    """Images of steps start..stop-1, prefetched by `workers` processes; None per step when
    `skip` (replayed from the cache) or without workers (loaded on demand, in-memory data)."""
    if skip or workers <= 0:
        while True:
            yield None
    from torch.utils.data import DataLoader

    batches = [plan.indices(s).tolist() for s in range(start, stop)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    for item in loader:
        yield item[0] if isinstance(item, (tuple, list)) else item
    while True:
        yield None


# ----------------------------------------------------------------------------- memory


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_candidate(cand: Candidate, x: torch.Tensor, y: torch.Tensor, optimizer: str = "adamw",
                      autocast: bool = False) -> None:
    """Measure what one candidate costs to train, in place on `cand`.

    Runs one forward and backward on the sample (x, y) (a few images of the layer's
    input and output) and records: `act_bytes`, bytes per image of the tensors autograd
    keeps for the backward pass (counted through saved-tensor hooks, each storage once)
    plus the output and its gradient; `state_bytes`, parameters, their gradients and the
    optimiser's per-parameter state, plus buffers; `cost`, forward FLOPs per image
    (counted by torch's FlopCounterMode); and `clone_input` when the module writes into
    its input. The module's weights are restored afterwards (BatchNorm statistics too).
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = cand.module
    params = [p for p in m.parameters() if p.requires_grad]
    n_state = {"adamw": 2, "sgd": 1}.get(optimizer, 2) if cand.trainable else -1
    p_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    b_bytes = sum(b.numel() * b.element_size() for b in m.buffers())
    cand.state_bytes = int(p_bytes * (2 + n_state) + b_bytes) if cand.trainable else int(p_bytes + b_bytes)
    saved = dict(m.state_dict())
    snapshot = {k: v.detach().clone() for k, v in saved.items()}
    modes = [(mod, mod.training) for mod in m.modules()]
    try:
        m.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x[:1].clone())
        cand.cost = float(fc.get_total_flops())
        if not cand.trainable:
            with torch.no_grad():
                o = m(x)
            cand.act_bytes = 2.0 * o.numel() * o.element_size() / len(x)
            return
        m.train()
        seen = {_storage_key(p) for p in m.parameters()} | {_storage_key(b) for b in m.buffers()}
        seen.add(_storage_key(x))
        total = [0]

        def pack(t):
            k = _storage_key(t)
            if k not in seen:
                seen.add(k)
                total[0] += t.untyped_storage().nbytes()
            return t

        xv = x._version
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            o = m(x)
        cand.clone_input = x._version != xv
        loss = sum_squared_error(o, y)
        loss.backward()
        cand.act_bytes = (total[0] + 2.0 * o.numel() * o.element_size()) / len(x)
        for p in params:
            p.grad = None
    finally:
        m.load_state_dict(snapshot)
        for mod, training in modes:
            mod.training = training


def pack_groups(cands: Sequence[Candidate], budget_bytes: int | None, batch_size: int,
                layer_bytes: dict[str, float] | None = None) -> list[list[int]]:
    """Split candidates (kept in order) into groups that fit in `budget_bytes` each.

    A group needs the persistent state of all its candidates, the activations of the
    largest one (candidates step one after another, so only one backward is alive at a
    time) and the captured teacher tensors of its layers (`layer_bytes`, per image).
    Returns lists of indices. A candidate too large on its own gets a group of its own.
    """
    if budget_bytes is None:
        return [list(range(len(cands)))] if cands else []
    layer_bytes = layer_bytes or {}
    groups: list[list[int]] = []
    cur: list[int] = []
    state = act = 0.0
    layers: set[str] = set()

    def need(s, a, ls):
        return s + a * batch_size + sum(layer_bytes.get(l, 0.0) for l in ls) * batch_size

    for i, c in enumerate(cands):
        s2, a2, l2 = state + c.state_bytes, max(act, c.act_bytes), layers | {c.layer}
        if cur and need(s2, a2, l2) > budget_bytes:
            groups.append(cur)
            cur, state, act, layers = [], 0.0, 0.0, set()
            s2, a2, l2 = c.state_bytes, c.act_bytes, {c.layer}
        cur.append(i)
        state, act, layers = s2, a2, l2
    if cur:
        groups.append(cur)
    return groups


def partition(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Assign items to `world_size` ranks balancing the summed cost (largest first, to the lightest rank).

    Deterministic: ties break by index. Returns, per rank, the item indices in their original order.
    """
    loads = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        out[r].append(i)
    return [sorted(o) for o in out]


def default_max_memory_mb(device: torch.device | None = None) -> int:
    """A safe share of memory for one group: half of the available RAM (80% of free GPU memory)."""
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.8 / _MB)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * 0.5 / _MB)
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.5 / _MB)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- activations


class _ActivationCache:
    """Captured teacher tensors of past batches, on disk, for groups that run after the first.

    One safetensors file per (split, step); a tensor shared by two layers (the output of
    one is the input of the next) is stored once.
    """

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        meta = folder / "meta.json"
        if folder.exists():
            try:
                ok = json.loads(meta.read_text()).get("key") == key
            except (OSError, json.JSONDecodeError):
                ok = False
            if not ok:
                shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            from hant.workspace import atomic_write_text

            atomic_write_text(meta, json.dumps({"key": key}))
        self.bytes_written = 0

    def _path(self, split: str, step: int) -> Path:
        return self.folder / f"{split}-{step:07d}.safetensors"

    def get(self, split: str, step: int, layers: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        from safetensors import safe_open

        path = self._path(split, step)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                names = json.loads(f.metadata()["layers"])
                if not layers <= set(names):
                    return None
                out = {}
                for layer in layers:
                    xk, yk = names[layer]
                    out[layer] = (f.get_tensor(xk), f.get_tensor(yk))
                return out
        except Exception:  # a torn or foreign file: recompute the batch
            return None

    def has_all(self, split: str, start: int, stop: int, layers: set[str]) -> bool:
        """Whether every step in start..stop-1 is cached (the layers are checked when read)."""
        return all(self._path(split, s).exists() for s in range(start, stop))

    def put(self, split: str, step: int, acts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        from hant.workspace import save_safetensors

        tensors: dict[str, torch.Tensor] = {}
        by_ptr: dict[tuple[int, tuple, tuple], str] = {}
        names: dict[str, tuple[str, str]] = {}
        for layer, pair in acts.items():
            keys = []
            for t in pair:
                ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
                k = by_ptr.get(ident)
                if k is None:
                    k = f"t{len(tensors)}"
                    by_ptr[ident] = k
                    tensors[k] = t
                keys.append(k)
            names[layer] = tuple(keys)
        save_safetensors(self._path(split, step), tensors, metadata={"layers": json.dumps(names)})
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())


class _Source:
    """Gives each step's captured (x, y) per layer: from the cache, else one teacher pass.

    Layers that groups still to come will need are written to the cache on the way, so
    the teacher runs at most once per batch over the whole phase.
    """

    def __init__(self, tap: LayerTap, device: torch.device, channels_last: bool, autocast: bool,
                 cache: _ActivationCache | None):
        self.tap, self.device, self.channels_last, self.autocast = tap, device, channels_last, autocast
        self.cache = cache

    def _prep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def get(self, split: str, step: int, load: Callable[[], torch.Tensor], layers: set[str],
            keep: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is not None:
            hit = self.cache.get(split, step, layers | keep)
            if hit is not None:
                return {k: (self._prep(x), self._prep(y)) for k, (x, y) in hit.items() if k in layers}
        images = self._prep(load())
        acts = self.tap(images, layers | keep, autocast=self.autocast)
        if keep and self.cache is not None:
            self.cache.put(split, step, {k: acts[k] for k in layers | keep})
        return {k: acts[k] for k in layers}


# ----------------------------------------------------------------------------- training


def _seed(device: torch.device, seed: int) -> None:
    # torch.manual_seed also walks every accelerator backend: ~0.6 ms, too slow once per
    # candidate per step. Seed only the generators this device uses.
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


class _Group:
    """The candidates that train together: one optimiser, per-candidate parameter groups.

    Optimisers whose update is elementwise per parameter (AdamW, SGD with momentum) keep
    every candidate independent even inside one torch optimiser; a candidate whose loss
    turns non-finite stops getting gradients and so stops changing.
    """

    def __init__(self, cands: list[Candidate], opts: Phase1Options, device: torch.device):
        self.cands = cands
        self.opts = opts
        self.device = device
        self.status = ["pending"] * len(cands)
        self.reason: list[str | None] = [None] * len(cands)
        self.first: list[float | None] = [None] * len(cands)
        self.tail: list[list[float]] = [[] for _ in cands]
        self.steps_done = 0
        self.cand_steps = [0] * len(cands)  # steps each candidate completed (a failed one stops early)
        self.trainable = [c.trainable for c in cands]  # before any failure freezes parameters
        self.opt_seconds = 0.0
        self.session_images = 0  # candidate-images trained by this process (not before a resume)
        self.tail_from = max(0, opts.steps - max(1, round(opts.steps * opts.tail_frac)))
        groups = []
        for i, c in enumerate(cands):
            if not c.trainable:
                continue
            decay = [p for p in c.module.parameters() if p.requires_grad and p.dim() > 1]
            rest = [p for p in c.module.parameters() if p.requires_grad and p.dim() <= 1]
            if decay:
                groups.append({"params": decay, "weight_decay": opts.weight_decay, "lr_scale": c.lr_scale})
            if rest:
                groups.append({"params": rest, "weight_decay": 0.0, "lr_scale": c.lr_scale})
        self.opt = make_optimizer(groups, opts.optimizer, opts.lr, device) if groups else None
        self.warmup = max(1, round(opts.steps * opts.warmup_frac))

    def active(self) -> list[int]:
        return [i for i, c in enumerate(self.cands) if c.trainable and self.status[i] == "pending"]

    def fail(self, i: int, reason: str) -> None:
        self.status[i] = "failed"
        self.reason[i] = reason
        for p in self.cands[i].module.parameters():
            p.grad = None
            p.requires_grad_(False)

    def step(self, step: int, acts: dict[str, tuple[torch.Tensor, torch.Tensor]], autocast: bool) -> None:
        scale = warmup_cosine_scale(step, self.opts.steps, self.warmup)
        if self.opt is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.opts.lr * scale * g["lr_scale"]
        denom: dict[str, torch.Tensor] = {}
        losses, who = [], []
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        for i in self.active():
            c = self.cands[i]
            x, y = acts[c.layer]
            if c.layer not in denom:
                denom[c.layer] = y.float().pow(2).sum().clamp_min(1e-12)
            _seed(self.device, candidate_seed(self.opts.seed, c.layer, c.spec, step))
            _train_mode(c)
            t0 = time.perf_counter()
            try:
                with ctx:
                    o = c.module(x.clone() if c.clone_input else x)
                loss = sum_squared_error(o, y) / denom[c.layer]
                loss.backward()
            except RuntimeError as e:
                self.fail(i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
                continue
            c.seconds += time.perf_counter() - t0
            losses.append(loss.detach())
            who.append(i)
            self.session_images += len(x)
        if losses:
            values = torch.stack(losses).cpu().tolist()
            for i, v in zip(who, values):
                if not math.isfinite(v):
                    self.fail(i, f"training loss became {v} at step {step}")
                    continue
                self.cand_steps[i] = step + 1
                if self.first[i] is None:
                    self.first[i] = v
                if step >= self.tail_from:
                    self.tail[i].append(v)
        if self.opt is not None:
            t0 = time.perf_counter()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.opt_seconds += time.perf_counter() - t0
        self.steps_done = step + 1

    # -- checkpoint: weights, optimiser state and loss records of every candidate

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, c in enumerate(self.cands):
            for k, v in c.module.state_dict().items():
                out[f"{i}.m.{k}"] = v
            if self.opt is None:
                continue
            for j, p in enumerate(c.module.parameters()):
                for k, v in self.opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"{i}.o.{j}.{k}"] = v
        return out

    def meta(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "cand_steps": self.cand_steps, "status": self.status,
                "reason": self.reason, "first": self.first, "tail": self.tail}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, c in enumerate(self.cands):
            sd = {k[len(f"{i}.m."):]: v for k, v in tensors.items() if k.startswith(f"{i}.m.")}
            c.module.load_state_dict(sd)
            if self.opt is None:
                continue
            for j, p in enumerate(c.module.parameters()):
                prefix = f"{i}.o.{j}."
                st = {}
                for k, v in tensors.items():
                    if k.startswith(prefix):
                        name = k[len(prefix):]
                        if v.shape == p.shape:
                            v = torch.empty_like(p).copy_(v)  # same layout as the parameter
                        st[name] = v.to(p.device)
                if st:
                    self.opt.state[p] = st
        self.steps_done = meta["steps_done"]
        self.cand_steps = meta["cand_steps"]
        self.first, self.tail = meta["first"], meta["tail"]
        for i, (s, r) in enumerate(zip(meta["status"], meta["reason"])):
            if s == "failed":
                self.fail(i, r)


def _train_mode(c: Candidate) -> None:
    c.module.train()
    if c.frozen_bn:
        for m in c.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _group_key(cands: Sequence[Candidate], opts: Phase1Options) -> str:
    ident = {"cands": [[c.layer, c.spec, c.init, c.lr_scale, c.frozen_bn] for c in cands], "steps": opts.steps, "bs": opts.batch_size,
             "opt": opts.optimizer, "lr": opts.lr, "wd": opts.weight_decay, "warm": opts.warmup_frac,
             "seed": opts.seed}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class _Checkpoints:
    def __init__(self, folder: Path):
        self.folder = folder

    def _meta(self, key: str) -> Path:
        return self.folder / f"group-{key}.json"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from hant.workspace import load_safetensors

        path = self._meta(key)
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
            tensors = load_safetensors(self.folder / meta["file"], expect_sha256=meta["sha256"])
        except (OSError, json.JSONDecodeError, KeyError, HantError):
            return None
        return tensors, meta

    def save(self, key: str, group: _Group) -> None:
        from hant.workspace import atomic_write_text, save_safetensors

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"group-{key}-{group.steps_done:07d}.safetensors"
        sha = save_safetensors(self.folder / name, group.state_tensors())
        old = self.load_meta(key)
        atomic_write_text(self._meta(key), json.dumps({**group.meta(), "file": name, "sha256": sha}))
        if old and old.get("file") != name:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / old["file"]).unlink()

    def load_meta(self, key: str) -> dict | None:
        try:
            return json.loads(self._meta(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def drop(self, key: str) -> None:
        meta = self.load_meta(key)
        with contextlib.suppress(FileNotFoundError):
            self._meta(key).unlink()
            if meta:
                (self.folder / meta["file"]).unlink()


class _Interrupts:
    """Defers SIGINT/SIGTERM to the end of the current step, so that the group in progress
    can be checkpointed in a consistent state before the process stops. A second signal
    stops at once. Only in the main thread (elsewhere signals cannot be caught)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupts":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, sig, frame) -> None:
        if self.signal is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signal = sig

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def raise_if_pending(self) -> None:
        if self.signal is None:
            return
        self._restore()
        if self.signal == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        raise KeyboardInterrupt


def _resolve_device(opts: Phase1Options) -> tuple[torch.device, bool, bool]:
    device = torch.device(opts.device) if opts.device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    channels_last = opts.channels_last if opts.channels_last is not None else device.type == "cpu"
    autocast = opts.autocast if opts.autocast is not None else device.type == "cuda"
    return device, channels_last, autocast


@torch.no_grad()
def evaluate_pool(cands: Sequence[Candidate], source: _Source, dataset, batch_size: int,
                  keep: set[str] = frozenset(), autocast: bool = False, tick: Callable[[int], None] | None = None
                  ) -> list[float]:
    """Held-out normalised MSE of each candidate (eval mode): sum of squared errors over sum of y^2."""
    layers = {c.layer for c in cands}
    # Sums stay on the device until the end: one synchronisation, not one per candidate and batch.
    num: list[torch.Tensor | float] = [0.0] * len(cands)
    den: dict[str, torch.Tensor | float] = {layer: 0.0 for layer in layers}
    n = len(dataset)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    for c in cands:
        c.module.eval()
    for step, start in enumerate(range(0, n, batch_size)):
        idx = torch.arange(start, min(n, start + batch_size))
        acts = source.get("heldout", step, lambda: load_images(dataset, idx), layers, set(keep))
        for layer in layers:
            den[layer] = den[layer] + acts[layer][1].float().pow(2).sum()
        for i, c in enumerate(cands):
            x, y = acts[c.layer]
            try:
                with ctx:
                    o = c.module(x.clone() if c.clone_input else x)
                num[i] = num[i] + sum_squared_error(o, y)
            except RuntimeError:
                num[i] = float("nan")
        if tick:
            tick(len(idx))
    return [float(num[i]) / max(float(den[c.layer]), 1e-12) for i, c in enumerate(cands)]


def _measure_and_pack(cands: list[Candidate], tap: LayerTap, layer_order: list[str], train_set, plan: BatchPlan,
                      opts: Phase1Options, device: torch.device, channels_last: bool, autocast: bool,
                      sample: torch.Tensor | None) -> list[list[int]]:
    """Measure every candidate on a few real images of its layer, then pack them into groups
    (lists of indices into `cands`) that fit `opts.max_memory_bytes` together."""
    bs = plan.batch_size
    layer_bytes: dict[str, float] = {}
    if cands:
        if sample is None:
            sample = load_images(train_set, plan.indices(0)[: min(8, bs)])
        src0 = _Source(tap, device, channels_last, autocast, None)
        sample_acts = src0.get("probe", 0, lambda: sample, set(layer_order), set())
        layer_bytes = {layer: (x.numel() * x.element_size() + y.numel() * y.element_size()) / len(x)
                       for layer, (x, y) in sample_acts.items()}
        for c in cands:
            x, y = sample_acts[c.layer]
            measure_candidate(c, x, y, opts.optimizer, autocast)
        tap.passes, tap.images, tap.seconds = 0, 0, 0.0  # the probe is not a training pass
    budget = opts.max_memory_bytes
    if budget is not None:
        # Every candidate's weights stay in memory from the start; groups share what is left.
        resident = sum(t.numel() * t.element_size() for c in cands for t in c.module.state_dict().values())
        budget = max(1, budget - resident)
    return pack_groups(cands, budget, bs, layer_bytes)


def _group_entries(group_cands: list[Candidate], g: _Group, held: list[float], bs: int) -> list[dict[str, Any]]:
    """The result entries of a finished group (see `train_pool`), one per candidate."""
    out = []
    for i, c in enumerate(group_cands):
        tail = g.tail[i]
        status, reason = g.status[i], g.reason[i]
        if status == "pending":
            status = "done"
        if status == "done" and not math.isfinite(held[i]):
            status, reason = "failed", f"held-out loss is {held[i]}"
        trained = g.trainable[i]
        e = {
            "layer": c.layer,
            "spec": c.spec,
            "status": status,
            "init": c.init,
            "train_loss": (sum(tail) / len(tail)) if tail and trained else None,
            "train_loss_first": g.first[i] if trained else None,
            "heldout_loss": held[i] if math.isfinite(held[i]) else None,
            "steps": g.cand_steps[i] if trained else 0,
            "images": g.cand_steps[i] * bs if trained else 0,
            "flops": c.cost,
            "train_s": round(c.seconds, 4),
        }
        if reason:
            e["reason"] = reason
        out.append(e)
    return out


@dataclass
class _GroupTraining:
    """What every group of one `train_pool` call trains with, and the call's counters."""

    train_set: Any
    plan: BatchPlan
    opts: Phase1Options
    source: "_Source"
    cache: "_ActivationCache | None"
    ckpt: "_Checkpoints | None"
    bar: Any  # a tqdm bar, or None
    log: Callable[[str], None]
    autocast: bool
    n_groups: int
    n_cands: int
    done_count: int = 0  # candidates of finished groups
    # Passages through each fault point in this call, for the crash tests (hant.workspace.fault_point).
    steps_run: int = 0
    checkpoints_saved: int = 0
    _last_ckpt: float = 0.0  # when the group in training last saved (or started)

    def train(self, gi: int, g: "_Group", key: str, layers: set[str], later: set[str]) -> None:
        """Train group `gi` to the end of its steps, resuming from its checkpoint when there is
        one; checkpoint every `checkpoint_minutes` and on SIGINT/SIGTERM (then stop, raising).
        `layers` are the group's, `later` those of later groups (whose activations are cached)."""
        opts, bs, bar = self.opts, self.plan.batch_size, self.bar
        if self.ckpt is not None and any(c.trainable for c in g.cands):
            loaded = self.ckpt.load(key)
            if loaded is not None:
                g.load(*loaded)
                self.log(f"group {gi + 1}/{self.n_groups}: resuming at step {g.steps_done}/{opts.steps}")
        if bar is not None:
            bar.update(g.steps_done * bs)
        shown = g.steps_done
        self._last_ckpt = time.time()
        if g.active():
            with _Interrupts() as interrupts:
                skip = self.cache is not None and self.cache.has_all("train", g.steps_done, opts.steps, layers | later)
                images = _image_stream(self.train_set, self.plan, g.steps_done, opts.steps, opts.workers, skip=skip)
                for step in range(g.steps_done, opts.steps):
                    self.steps_run += 1
                    fault_point("distill:interrupt", self.steps_run, "interrupt")
                    batch = next(images)
                    acts = self.source.get("train", step, lambda s=step, b=batch: b if b is not None else load_images(
                        self.train_set, self.plan.indices(s)), layers, later)
                    g.step(step, acts, self.autocast)
                    del acts, batch
                    shown += 1
                    if bar is not None:
                        bar.update(bs)
                        bar.set_postfix_str(f"group {gi + 1}/{self.n_groups}, {self.done_count}/{self.n_cands} "
                                            "candidates done", refresh=False)
                    self._checkpoint(key, g, step, interrupts)
                    if interrupts.signal is not None:
                        if bar is not None:
                            bar.close()
                        self.log(f"interrupted: group {gi + 1}/{self.n_groups} "
                                 + (f"saved at step {g.steps_done}/{opts.steps}; run again to resume"
                                    if self.ckpt is not None else f"stopped at step {g.steps_done}/{opts.steps}"))
                        interrupts.raise_if_pending()
                    if not g.active():
                        break
        if bar is not None and shown < opts.steps:
            bar.update((opts.steps - shown) * bs)  # nothing (more) to train in this group

    def _checkpoint(self, key: str, g: "_Group", step: int, interrupts: "_Interrupts") -> None:
        # Every checkpoint_minutes (not after the last step: the group is about to finish) and
        # at once on a signal.
        if self.ckpt is None:
            return
        due = step + 1 < self.opts.steps and time.time() - self._last_ckpt >= self.opts.checkpoint_minutes * 60.0
        if due or interrupts.signal is not None:
            self.ckpt.save(key, g)
            self._last_ckpt = time.time()
            self.checkpoints_saved += 1
            fault_point("distill:after_checkpoint", self.checkpoints_saved, "exit")


def train_pool(
    teacher: nn.Module,
    candidates: Sequence[Candidate],
    train_set,
    heldout_set,
    opts: Phase1Options,
    workdir: str | os.PathLike | None = None,
    on_group_done: Callable[[list[Candidate], list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = print,
    sample: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train `candidates` by layer-wise distillation from `teacher`; the engine of phase 1.

    Takes the teacher (any nn.Module whose named submodules are the candidates' layers),
    the candidates (modules are trained in place), the train and held-out datasets (items
    `(image, label)` or images), the options, and optionally a work folder (for
    checkpoints and the activation cache; needed to resume) and a callback called after
    each group with its candidates and their result entries (`layer`, `spec`, `status`,
    `init`, `train_loss` (mean over the last tenth of the steps), `train_loss_first`,
    `heldout_loss`, `steps`, `images`, `flops`, `train_s`, `reason`); the callback may
    set a candidate's `module` to None to release it. `sample` is a batch of images used
    to measure memory (default: the first images of the first batch).

    Returns {"entries": [...], "groups", "teacher_passes", "teacher_images", "cache_mb",
    "candidate_images", "train_s", "eval_s", "teacher_train_s", "optimizer_s", "wall_s",
    "batch_size", "device"} (counts and times of this call). Raises HantError for a user-fixable problem (a layer that does not run, an
    unknown optimiser, several groups without a work folder).
    """
    device, channels_last, autocast = _resolve_device(opts)
    cands = list(candidates)
    _place([teacher.eval()] + [c.module for c in cands], device, channels_last)
    layer_order = list(dict.fromkeys(c.layer for c in cands))
    tap = LayerTap(teacher, layer_order)
    plan = BatchPlan(len(train_set), opts.batch_size, opts.seed)
    bs = plan.batch_size
    hbs = opts.heldout_batch_size or bs
    work = Path(workdir) if workdir is not None else None
    t_start = time.time()

    groups = _measure_and_pack(cands, tap, layer_order, train_set, plan, opts, device, channels_last, autocast,
                               sample)
    n_groups = len(groups)
    cache = None
    if n_groups > 1:
        log(f"{len(cands)} candidates in {n_groups} groups under {opts.max_memory_bytes / _MB:.0f} MB; "
            "later groups replay the teacher's activations from disk")
        cache = _activation_cache(work, len(train_set), len(heldout_set), bs, hbs, opts)
    source = _Source(tap, device, channels_last, autocast, cache)
    ckpt = _Checkpoints(work / "checkpoints") if work is not None else None

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=n_groups * (opts.steps * bs + len(heldout_set)), unit="img", unit_scale=True,
                   dynamic_ncols=True, desc="phase 1", mininterval=1.0)
    entries: list[dict[str, Any]] = []
    totals: dict[str, float] = {"train_s": 0.0, "eval_s": 0.0, "optimizer_s": 0.0, "teacher_eval_s": 0.0,
                                "candidate_images": 0}
    run = _GroupTraining(train_set, plan, opts, source, cache, ckpt, bar, log, autocast, n_groups, len(cands))
    try:  # a stage that stops on an error must not leave its bar open over the error line
        for gi, idxs in enumerate(groups):
            group_cands = [cands[i] for i in idxs]
            later = {cands[i].layer for later_idxs in groups[gi + 1:] for i in later_idxs}
            group_entries = _train_group(run, gi, group_cands, later, heldout_set, hbs, totals)
            if on_group_done is not None:
                on_group_done(group_cands, group_entries)
            fault_point("distill:after_group", gi + 1, "exit")  # groups finished in this call, for the crash tests
            if ckpt is not None:
                ckpt.drop(_group_key(group_cands, opts))
            entries.extend(group_entries)
            run.done_count += len(group_cands)
            if bar is not None:
                bar.set_postfix_str(f"group {gi + 1}/{n_groups}, {run.done_count}/{len(cands)} candidates done")
            if device.type != "cpu":  # later groups replay from disk: free this group's memory first
                for c in group_cands:
                    if c.module is not None:
                        c.module.to("cpu")
    finally:
        if bar is not None:
            bar.close()
    if cache is not None:
        shutil.rmtree(cache.folder, ignore_errors=True)
    return {
        "entries": entries,
        "groups": n_groups,
        "teacher_passes": tap.passes,
        "teacher_images": tap.images,
        "cache_mb": (cache.bytes_written / _MB) if cache is not None else 0.0,
        "train_s": totals["train_s"],
        "eval_s": totals["eval_s"],
        "candidate_images": totals["candidate_images"],  # trained in this call (a resumed group from its checkpoint)
        "teacher_train_s": tap.seconds - totals["teacher_eval_s"],  # teacher passes for training batches
        "optimizer_s": totals["optimizer_s"],
        "wall_s": time.time() - t_start,
        "batch_size": bs,
        "device": str(device),
    }


def _activation_cache(work: Path | None, n_train: int, n_heldout: int, bs: int, hbs: int, opts: Phase1Options
                      ) -> "_ActivationCache":
    """The teacher's activations on disk, for groups after the first, keyed by what they depend on."""
    if work is None:
        raise HantError("several groups need a work folder for the activation cache; pass workdir=")
    key = json.dumps({"n": n_train, "h": n_heldout, "bs": bs, "hbs": hbs, "seed": opts.seed, "steps": opts.steps})
    return _ActivationCache(work / "cache", hashlib.sha256(key.encode()).hexdigest()[:20])


def _place(modules: Sequence[nn.Module], device: torch.device, channels_last: bool) -> None:
    for m in modules:
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)


def _train_group(run: "_GroupTraining", gi: int, group_cands: list[Candidate], later: set[str], heldout_set,
                 hbs: int, totals: dict[str, float]) -> list[dict[str, Any]]:
    """Trains one group (resuming from its checkpoint), scores it on the held-out images and
    returns its result entries; adds its times and images to `totals`."""
    opts, source, bar = run.opts, run.source, run.bar
    g = _Group(group_cands, opts, source.device)
    t0 = time.time()
    run.train(gi, g, _group_key(group_cands, opts), {c.layer for c in group_cands}, later)
    totals["train_s"] += time.time() - t0
    totals["optimizer_s"] += g.opt_seconds
    totals["candidate_images"] += g.session_images
    t0, tap_s = time.time(), source.tap.seconds
    held = evaluate_pool(group_cands, source, heldout_set, hbs, keep=later, autocast=run.autocast,
                         tick=(bar.update if bar is not None else None)) if len(heldout_set) else [
        float("nan")] * len(group_cands)
    totals["eval_s"] += time.time() - t0
    totals["teacher_eval_s"] += source.tap.seconds - tap_s
    return _group_entries(group_cands, g, held, run.plan.batch_size)
