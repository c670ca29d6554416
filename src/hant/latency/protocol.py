"""The timing protocol: warm-up, then many short repeats interleaved across items.

On a shared machine the speed drifts (other processes, frequency, thermals). Timing one
item after another would give each item its own slice of that drift; instead every round
runs each unfinished item once, in a freshly shuffled order, so drift hits all items
alike and the comparison between items stays fair. Rounds go on until each item's median
has stopped moving, or it has `max_repeats` samples, or the time cap is spent.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from torch import nn

from hant.latency.base import Target

__all__ = ["Protocol", "Stats", "measure", "measure_modules"]


@dataclass(frozen=True)
class Protocol:
    """How long to time. `time_cap_s` caps the rounds (not the preparation)."""

    warmup: int = 5
    min_repeats: int = 15
    max_repeats: int = 200
    time_cap_s: float = 600.0
    rel_tol: float = 0.02  # an item is stable when its median moved less than this...
    stable_checks: int = 3  # ...over this many checks,
    check_every: int = 5  # one check every this many rounds
    turn_warmup: int = 0  # untimed calls at the start of each item's turn (see measure)
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "Protocol":
        """From a `LatencyConfig` (warmup, min_repeats, max_repeats, time_cap_s)."""
        kw = {k: getattr(cfg, k) for k in ("warmup", "min_repeats", "max_repeats", "time_cap_s")}
        kw.update(overrides)
        p = cls(**kw)
        if p.min_repeats < 1 or p.max_repeats < p.min_repeats:
            from hant.errors import HantError

            raise HantError(f"latency repeats need 1 <= min_repeats <= max_repeats, got {p.min_repeats}, {p.max_repeats}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Stats:
    """Summary of one item's per-call latencies, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        a = np.asarray(samples, dtype=float)
        p10, med, p90 = np.percentile(a, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), int(a.size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stable(history: list[float], rel_tol: float, checks: int) -> bool:
    if len(history) < checks:
        return False
    last = history[-checks:]
    ref = abs(last[-1]) or 1e-12
    return (max(last) - min(last)) / ref < rel_tol


def measure(
    items: Mapping[Hashable, Any],
    target: Target,
    protocol: Protocol = Protocol(),
    progress: Any = None,
) -> dict[Hashable, Stats]:
    """Time every prepared runnable in `items` (key -> runnable from `target.prepare`).

    Returns key -> Stats. Every item gets `protocol.warmup` untimed calls, then rounds of
    one timed call per unfinished item in shuffled order, each preceded by
    `protocol.turn_warmup` untimed calls: with 1, an item finds its weights in the caches
    the way it would running alone (whole networks are timed so, as they are deployed),
    with 0 it finds them where the other items left them. An item finishes when it has at
    least `min_repeats` samples and its median is stable, or has `max_repeats`; all
    unfinished items stop when `time_cap_s` is spent (their `n` then tells how many
    samples they got, at least one). `progress` (a tqdm bar or None) advances by one per
    finished item.
    """
    keys = list(items)
    if not keys:
        return {}
    rng = random.Random(protocol.seed)
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
    history: dict[Hashable, list[float]] = {k: [] for k in keys}
    active = list(keys)
    gc_was_enabled = gc.isenabled()
    # A collection in the middle of a call would land on whichever item runs then.
    gc.collect()
    gc.disable()
    try:
        with target.context():
            for k in keys:
                if protocol.warmup:
                    target.time(items[k], protocol.warmup)
            t_end = time.perf_counter() + protocol.time_cap_s
            rounds = 0
            while active:
                order = active[:]
                rng.shuffle(order)
                for k in order:
                    if protocol.turn_warmup:
                        target.time(items[k], protocol.turn_warmup)
                    samples[k].extend(target.time(items[k], 1))
                rounds += 1
                still = []
                for k in active:
                    n = len(samples[k])
                    done = n >= protocol.max_repeats
                    if not done and n >= protocol.min_repeats and (n - protocol.min_repeats) % protocol.check_every == 0:
                        history[k].append(float(np.median(samples[k])))
                        done = _stable(history[k], protocol.rel_tol, protocol.stable_checks)
                    if done:
                        if progress is not None:
                            progress.update(1)
                    else:
                        still.append(k)
                active = still
                if active and time.perf_counter() > t_end:
                    if progress is not None:
                        progress.update(len(active))
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: Stats.of(samples[k]) for k in keys}


def measure_modules(
    items: Sequence[tuple[Hashable, nn.Module, Sequence[int]]],
    target: Target,
    protocol: Protocol = Protocol(),
    progress: Any = None,
) -> dict[Hashable, Stats]:
    """Prepare each `(key, module, input_shape)` on `target` and time them together.

    `input_shape` is per image (C, H, W); the target adds its batch size. Returns key -> Stats.
    """
    prepared = {key: target.prepare(module, shape) for key, module, shape in items}
    return measure(prepared, target, protocol, progress)
