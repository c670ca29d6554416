"""The timing protocol: warm-up, then many short repeats interleaved across items.

On a shared machine the speed drifts (other processes, frequency, thermals). Timing one
item after another would give each item its own slice of that drift; instead every round
runs each unfinished item once, in a freshly shuffled order, so drift hits all items
alike and the comparison between items stays fair.

Every median comes with its confidence interval (a percentile bootstrap of the median,
`confidence` level, `resamples` resamples drawn with a fixed seed, so the same samples
always give the same interval). Rounds go on until each item's interval is narrow enough
(half-width at most `rel_tol` of the median), or it has `max_repeats` samples, or the time
cap is spent; `Stats.converged` says which. `ratio_ci` gives the ratio of two items'
medians (a speedup) with its interval, from the raw samples kept on `Stats.samples`.
"""

from __future__ import annotations

import gc
import math
import random
import time
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from torch import nn

from hant.latency.base import Target

__all__ = ["Protocol", "Stats", "measure", "measure_modules", "median_ci", "ratio_ci"]


@dataclass(frozen=True)
class Protocol:
    """How long to time. `time_cap_s` caps the rounds (not the preparation).

    An item has converged when the `confidence` interval of its median (bootstrap,
    `resamples` resamples) has a half-width of at most `rel_tol` times the median. The
    interval is computed only at checks, one every `check_every` rounds from `min_repeats`
    samples on.
    """

    warmup: int = 5
    min_repeats: int = 100  # the same defaults as LatencyConfig; see there
    max_repeats: int = 600
    time_cap_s: float = 600.0
    rel_tol: float = 0.02
    confidence: float = 0.95
    resamples: int = 300
    check_every: int = 5
    turn_warmup: int = 0  # untimed calls at the start of each item's turn (see measure)
    seed: int = 0
    # Rounds go on for at least this long, whatever the interval and max_repeats say: a
    # sub-millisecond network converges in a fraction of a second, which samples one moment
    # of a shared machine's speed; measurements minutes apart then disagree beyond their
    # intervals (bench/timing.py). The time cap still wins.
    min_time_s: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "Protocol":
        """From a `LatencyConfig` (warmup, min_repeats, max_repeats, time_cap_s) and `overrides`.

        Raises HantError for repeats out of order or a confidence outside (0, 1).
        """
        kw = {k: getattr(cfg, k) for k in ("warmup", "min_repeats", "max_repeats", "time_cap_s")}
        kw["min_time_s"] = float(getattr(cfg, "min_time_s", 0.0) or 0.0)
        kw.update(overrides)
        p = cls(**kw)
        from hant.errors import HantError

        if p.min_repeats < 1 or p.max_repeats < p.min_repeats:
            raise HantError(f"latency repeats need 1 <= min_repeats <= max_repeats, got {p.min_repeats}, {p.max_repeats}")
        if not 0.0 < p.confidence < 1.0:
            raise HantError(f"latency confidence must be between 0 and 1, got {p.confidence}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bootstrap_medians(a: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    return np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)


def _bounds(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def median_ci(samples: Sequence[float], confidence: float = 0.95, resamples: int = 300,
              seed: int = 0) -> tuple[float, float, float]:
    """(median, lo, hi): the median of `samples` and its `confidence` percentile-bootstrap interval.

    Resampling uses `np.random.default_rng(seed)`, so the interval is a function of the
    samples alone. One sample gives a zero-width interval. Raises ValueError when
    `samples` is empty.
    """
    a = np.asarray(samples, dtype=float)
    if a.size == 0:
        raise ValueError("median_ci needs at least one sample")
    med = float(np.median(a))
    if a.size == 1:
        return med, med, med
    lo, hi = _bounds(_bootstrap_medians(a, resamples, np.random.default_rng(seed)), confidence)
    # The percentile interval of a median brackets it up to the quantile's interpolation;
    # clamp so that lo <= median <= hi holds exactly.
    return med, min(lo, med), max(hi, med)


def ratio_ci(samples_a: Sequence[float], samples_b: Sequence[float], confidence: float = 0.95,
             resamples: int = 300, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, lo, hi): median(a) / median(b) and its `confidence` bootstrap interval.

    a and b are resampled independently (items of a round are interleaved, not paired:
    one may have finished before the other). With a = teacher and b = student samples
    this is the speedup. Raises ValueError when either is empty or b's median is not
    positive.
    """
    a, b = np.asarray(samples_a, dtype=float), np.asarray(samples_b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci needs samples on both sides")
    mb = float(np.median(b))
    if mb <= 0:
        raise ValueError(f"ratio_ci needs a positive denominator median, got {mb}")
    ratio = float(np.median(a)) / mb
    rng = np.random.default_rng(seed)
    ra = _bootstrap_medians(a, resamples, rng) if a.size > 1 else np.full(resamples, a[0])
    rb = _bootstrap_medians(b, resamples, rng) if b.size > 1 else np.full(resamples, b[0])
    lo, hi = _bounds(ra / np.maximum(rb, 1e-300), confidence)
    return ratio, min(lo, ratio), max(hi, ratio)


def _converged(med: float, lo: float, hi: float, rel_tol: float) -> bool:
    return (hi - lo) / 2.0 <= rel_tol * abs(med)


def _clearly_wide(samples: Sequence[float], protocol: Protocol) -> bool:
    """Whether the distribution-free interval of the median (order statistics about the
    middle, normal approximation) is over twice the tolerance: then the bootstrap, which
    gives nearly the same interval, would fail too, and a noisy item's checks skip it.
    A sort instead of a few hundred medians; a false "wide" costs only a few more samples."""
    a = np.sort(np.asarray(samples, dtype=float))
    n = a.size
    k = int(NormalDist().inv_cdf(0.5 + protocol.confidence / 2.0) * math.sqrt(n) / 2.0)
    lo, hi = a[max(0, (n - 1) // 2 - k)], a[min(n - 1, n // 2 + k)]
    return (hi - lo) / 2.0 > 2.0 * protocol.rel_tol * abs(float(np.median(a)))


@dataclass(frozen=True)
class Stats:
    """Summary of one item's per-call latencies, in milliseconds.

    `ci_lo_ms`, `ci_hi_ms`: the median's confidence interval (see `Protocol`);
    `converged`: whether that interval met the protocol's tolerance. `samples` keeps the
    raw latencies (for `ratio_ci`); `to_dict` leaves them out.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    ci_lo_ms: float
    ci_hi_ms: float
    converged: bool
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, samples: Sequence[float], protocol: Protocol = Protocol()) -> "Stats":
        """Stats of a non-empty list of latencies, the interval per `protocol`."""
        a = np.asarray(samples, dtype=float)
        p10, p90 = np.percentile(a, [10, 90])
        med, lo, hi = median_ci(a, protocol.confidence, protocol.resamples, protocol.seed)
        return cls(med, float(p10), float(p90), int(a.size), lo, hi, _converged(med, lo, hi, protocol.rel_tol),
                   tuple(float(v) for v in a))

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON values (without the raw samples)."""
        return {k: v for k, v in asdict(self).items() if k != "samples"}


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
    least `min_repeats` samples and its median's confidence interval is within
    `rel_tol` of the median (checked every `check_every` rounds), or has `max_repeats`;
    all unfinished items stop when `time_cap_s` is spent (their `n` then tells how many
    samples they got, at least one). Each Stats carries its interval, whether it
    converged, and the raw samples. `progress` (a tqdm bar or None) advances by one per
    finished item.
    """
    keys = list(items)
    if not keys:
        return {}
    rng = random.Random(protocol.seed)
    samples: dict[Hashable, list[float]] = {k: [] for k in keys}
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
            t_start = time.perf_counter()
            t_end = t_start + protocol.time_cap_s
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
                long_enough = time.perf_counter() - t_start >= protocol.min_time_s
                for k in active:
                    n = len(samples[k])
                    done = n >= protocol.max_repeats
                    # The bootstrap costs a few hundred medians (about a millisecond), as much
                    # as a round of small ops: it runs at checks only, and not when a sort
                    # already shows the interval far too wide.
                    check = n >= protocol.min_repeats and (n - protocol.min_repeats) % protocol.check_every == 0
                    if not done and check and not _clearly_wide(samples[k], protocol):
                        med, lo, hi = median_ci(samples[k], protocol.confidence, protocol.resamples, protocol.seed)
                        done = _converged(med, lo, hi, protocol.rel_tol)
                    done = done and long_enough
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
    return {k: Stats.of(samples[k], protocol) for k in keys}


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
