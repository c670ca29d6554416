"""Learning-rate schedules: pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.15, start_div: float = 25.0,
                 end_div: float = 1e4) -> float:
    """The learning rate at `step` of `total`: a cosine rise from peak/start_div to `peak` over the
    first `warmup` share of the steps, then a cosine fall to peak/end_div at `total`.

    Steps past `total` keep the last value. Raises nothing.
    """
    up = max(1, int(round(warmup * total)))
    if step < up:
        t = step / up
        lo = peak / start_div
        return lo + (peak - lo) * (1 - math.cos(math.pi * t)) / 2
    t = min(1.0, (step - up) / max(1, total - up))
    lo = peak / end_div
    return lo + (peak - lo) * (1 + math.cos(math.pi * t)) / 2


def warmup_cosine_scale(step: int, steps: int, warmup: int) -> float:
    """Phase 1's schedule, as a factor of the base rate: a linear warm-up over `warmup` steps
    multiplied by a cosine from 1 to 0 over `steps` (phase 1 and re-distillation).

    `warmup` 0 means no warm-up. Raises nothing.
    """
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return w * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def warmup_then_cosine(step: int, total: int, warmup: int, base: float) -> float:
    """Fine-tuning's schedule: the rate rises linearly to `base` over `warmup` steps, then
    falls along a cosine to zero at `total` (steps past `total` stay at zero). Raises nothing."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(1.0, t)))
