"""The machinery of layer-wise distillation, shared by phase 1 (`hant.phase1`, `hant.distill`) and
re-distillation (`hant.redistill`): the teacher's layers tapped in one forward, the
deterministic batch order, per-candidate seeds, the normalised MSE and the optimiser.

Nothing here reads or writes the run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any, Iterable

import torch
from torch import nn

from hant.errors import HantError

__all__ = ["candidate_seed", "BatchPlan", "load_images", "LayerTap", "nmse", "sum_squared_error", "make_optimizer"]


def candidate_seed(seed: int, layer: str, spec: str, step: int = -1) -> int:
    """A seed that depends only on the run seed, the candidate and the step.

    Random init and any randomness inside a candidate (dropout) use it, so a candidate
    trains the same in any group, on any rank and after a resume.
    """
    h = hashlib.sha256(f"{seed}|{layer}|{spec}|{step}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class BatchPlan:
    """The deterministic order of training batches: batch `step` is a function of (seed, step).

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch of
    an epoch is dropped so that every step has `batch_size` images.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise HantError("the train split is empty; use a larger dataset")
        self.n = n
        self.batch_size = max(1, min(batch_size, n))
        self.seed = seed
        self.per_epoch = n // self.batch_size
        self._perm: dict[int, torch.Tensor] = {}

    def indices(self, step: int) -> torch.Tensor:
        """Positions in the dataset of the images of batch `step`."""
        epoch, i = divmod(step, self.per_epoch)
        perm = self._perm.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            self._perm = {epoch: perm}  # steps go forward; one epoch kept
        return perm[i * self.batch_size : (i + 1) * self.batch_size]


def load_images(dataset, idx: torch.Tensor) -> torch.Tensor:
    """The images at positions `idx` of `dataset`, stacked into one batch (labels dropped).

    Uses the dataset's `get_batch(idx)` when it has one (in-memory splits), else indexes it
    item by item; items are `(image, label)` or bare images. Raises what the dataset raises
    for a position out of range.
    """
    get_batch = getattr(dataset, "get_batch", None)
    if callable(get_batch):
        return get_batch(idx)[0]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


class _StopForward(Exception):
    pass


class LayerTap:
    """Forward hooks that capture named layers' (input, output) during one teacher forward.

    `tap(images)` runs the teacher once (no grad) and returns {layer: (x, y)}. The
    forward stops as soon as every requested layer has been seen, so the part of the
    teacher after the last of them is not computed. Should a later op write into a
    captured tensor in place, the batch is rerun with copies (and copies are kept from
    then on).
    """

    def __init__(self, teacher: nn.Module, layer_names: Iterable[str]):
        self.teacher = teacher
        self.modules = {name: teacher.get_submodule(name) for name in layer_names}
        self.clone = False
        self.passes = 0
        self.images = 0
        self.seconds = 0.0

    def __call__(self, images: torch.Tensor, layers: Iterable[str], autocast: bool = False
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        want = set(layers)
        unknown = want - set(self.modules)
        if unknown:
            raise KeyError(f"layer {sorted(unknown)[0]!r} is not tapped")
        for attempt in range(2):
            got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            versions: list[tuple[torch.Tensor, int]] = []

            def hook(name):
                def fn(module, args, output):
                    if name in got:
                        raise HantError(f"layer {name} runs more than once per forward; exclude it with --exclude")
                    x = args[0] if args else None
                    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                        raise HantError(f"layer {name} does not map one tensor to one tensor; exclude it")
                    x, y = x.detach(), output.detach()
                    if self.clone:
                        x, y = x.clone(), y.clone()
                    versions.extend([(x, x._version), (y, y._version)])
                    got[name] = (x, y)
                    if len(got) == len(want):
                        raise _StopForward

                return fn

            handles = [self.modules[n].register_forward_hook(hook(n)) for n in want]
            t0 = time.perf_counter()
            try:
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with torch.no_grad(), ctx:
                    self.teacher(images)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
                self.seconds += time.perf_counter() - t0
            self.passes += 1
            self.images += len(images)
            if len(got) != len(want):
                missing = sorted(want - set(got))[0]
                raise HantError(f"layer {missing} did not run in the teacher's forward; exclude it")
            if all(t._version == v for t, v in versions) or self.clone:
                return got
            self.clone = True  # something wrote into a captured tensor: copy from now on
        return got


def sum_squared_error(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||o - y||^2 summed over the whole batch, in float32 (a 0-dim tensor): nmse's numerator."""
    return (o.float() - y.float()).pow(2).sum()


def nmse(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Phase 1's loss: ||o - y||^2 / ||y||^2, each a sum over the whole batch (a 0-dim float tensor)."""
    return sum_squared_error(o, y) / y.float().pow(2).sum().clamp_min(1e-12)


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Phase 1's optimiser over parameter `groups`: `name` "adamw" or "sgd" (Nesterov momentum
    0.9), fused kernels on the CPU and CUDA. Raises HantError for another name."""
    fused = device.type in ("cpu", "cuda")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused)
    raise HantError(f"unknown optimizer '{name}'; use adamw or sgd")
