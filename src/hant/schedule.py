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
