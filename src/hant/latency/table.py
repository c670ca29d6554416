"""The latency table of a run: build it, resume it, check it end to end.

What a table predicts for a network (the fixed part plus the chosen entries, then a
fitted calibration), how tables are named and loaded: `hant.latency.model`. This module
measures them.

Entries. Each candidate is timed alone at its layer's input shape, interleaved with the
other candidates of its layer (protocol.py). A standalone call carries a cost that a layer
inside a network does not: the runtime's per-call overhead (argument conversion, output
allocation, Python). So every layer's group also times an identity at the same shape,
and entries are stored net of it (`raw_median_ms` keeps the gross number). A `skip`
candidate therefore costs about zero, as it does inside the network. Every recorded median
has its confidence interval beside it (`ci_lo_ms`, `ci_hi_ms`, `converged`; protocol.py):
entries, overheads, the fixed part (`fixed_ci_ms`), the teacher (`teacher_ci_ms`) and the
validation's networks; `protocol` records how they were timed.

Fixed part. The issue asks for "the teacher with every replaceable layer removed". That
network does not run in general (layers change shapes), so the nearest network that does
is timed: every layer replaced by its cheapest measured candidate (`skip` where shapes
allow, a strided 1x1 projection where not), end to end, and the (small) sum of those
entries is subtracted. Taking the fixed part from the teacher instead (end to end minus
the sum of the teacher's entries) would subtract a large, noisy sum and would make the
teacher's own prediction exact by construction, hiding the table's error; this way the
teacher is a genuine check. Anything per-layer that the net entries still miss (a
constant boundary cost) is absorbed by the fixed part, since every network has exactly
one op per layer.

Whole networks (the fixed part's two, the validation's) are timed as deployed: each turn
of the interleaved protocol runs one untimed call first, so that a network finds its
weights in the caches as it would running alone (protocol.Protocol.turn_warmup).

Validation (`validate=K`). K random networks drawn from the pool (each keeps the teacher's
layer with a random probability q ~ U(0, 1) and otherwise takes a uniformly drawn
candidate, so that they span the range between teacher and all-cheap where selection
works), plus the teacher and the all-cheapest network, are predicted and timed end to
end, interleaved, with three times the table's minimum of repeats. A calibration (an
offset, a scale on the entries, or a linear map; `hant.latency.model`) is kept only if it
lowers the leave-one-out mean error by at least a tenth; the reported errors are then the
leave-one-out ones, never in-sample. On a shared machine the calibration mostly absorbs the
drift between the time the table was measured and the time it is checked.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import Target, get_target, torch_threads
from hant.latency.compare import network_protocol, prepare_network, time_against_teacher, time_networks
from hant.latency.model import _choose_calibration, _summary, predict_ms, table_id
from hant.latency.protocol import Protocol, Stats, measure
from hant.onnx_io import OnnxExportError
from hant.workspace import fault_point, read_json, run_lock, write_json

__all__ = ["build_network", "measure_table", "validate_table", "covers_pools"]

TABLE_VERSION = 1


def covers_pools(table: dict[str, Any], pools: dict[str, list[str]]) -> bool:
    """Whether `table` is complete and has an entry (or a recorded failure) for every
    candidate of `pools` ({layer: specs}, a run's `Run.pools`): a table measured before the
    space grew, or copied from another run, has holes that `measure_table` fills."""
    have = {(e["layer"], e["spec"]) for e in table.get("entries", []) + table.get("failed", [])}
    return bool(table.get("complete")) and all((layer, spec) in have
                                               for layer, specs in pools.items() for spec in specs)
_NULL = "__identity__"


# ---------------------------------------------------------------------------------------------
# The run: config, layers, pools, teacher


class _Run:
    """What the latency stage reads from a run folder; the teacher is loaded on first use."""

    def __init__(self, run: str | Path):
        from hant.run import Run

        self.run = Run(run)
        self.rd = self.run.dir
        self.cfg = self.run.config
        self.layers = self.run.layers
        self.pools = self.run.pools
        self.input_size = self.run.input_shape
        self.model = self.run.layers_doc.get("model", self.cfg.model.source)
        self._teacher: nn.Module | None = None

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self.run.teacher()
        return self._teacher

    def build(self, layer, spec: str) -> nn.Module:
        return fresh_candidate(self.teacher, layer, spec)


def fresh_candidate(teacher: nn.Module, layer: Any, spec: str) -> nn.Module:
    """Candidate `spec` for `layer` (a `hant.layers.LayerInfo`) as the table times it: freshly
    initialised, in eval mode; families derived from the teacher's layer (`teacher`, `self_w50`,
    `sep`, ...) copy it from `teacher`. Timing does not depend on the weights, so this is the
    builder `build_network` needs to time a plan without phase 1's weights. Raises what
    `hant.ops.build` raises for a spec the layer cannot take."""
    from hant import ops
    from hant.layers import get_layer

    teacher_layer = get_layer(teacher, layer.name) if ops.needs_teacher(spec) else None
    return ops.build(spec, layer.in_chs, layer.out_chs, layer.stride, teacher_layer,
                     in_hw=tuple(layer.in_shape[1:]), out_hw=tuple(layer.out_shape[1:])).eval()


def build_network(teacher: nn.Module, layers: Sequence[Any], plan: Mapping[str, str],
                  build: Callable[[Any, str], nn.Module]) -> nn.Module:
    """A copy of `teacher` with each layer's module replaced by `build(layer, plan[layer.name])`.

    Layers absent from `plan` or planned as `teacher` keep the teacher's module; `teacher`
    itself is not changed. Eval mode. Raises HantError for a layer the teacher lacks.
    """
    from hant.layers import replace_layers

    modules = {layer.name: build(layer, plan[layer.name]) for layer in layers
               if plan.get(layer.name, "teacher") != "teacher"}
    return replace_layers(copy.deepcopy(teacher), modules).eval()


def _calibration_inputs(ctx: _Run, n: int = 32) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], str]:
    """Real network inputs and each layer's real inputs (for INT8 calibration), or random ones.

    Returns (images or None, {layer: inputs}, a description of the source).
    """
    from hant.layers import get_layer

    try:
        from hant.data import load_data

        splits = load_data(ctx.cfg.data)
        n = min(n, len(splits.train))
        images = torch.stack([splits.train[i][0] for i in range(n)]).float()
    except Exception as e:  # any failure here only degrades calibration to random inputs
        return None, {}, f"random-normal ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in ctx.layers:
        def hook(m, args, name=layer.name):
            captured[name] = args[0].detach().clone()
        hooks.append(get_layer(ctx.teacher, layer.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ctx.teacher.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    return images, captured, f"real: {n} train images of {ctx.cfg.data.spec}"


# ---------------------------------------------------------------------------------------------
# Building the table


def _fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} in the table, {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k)]


def _layer_signature(layer) -> dict[str, Any]:
    return {"name": layer.name, "in_shape": list(layer.in_shape), "out_shape": list(layer.out_shape),
            "stride": layer.stride}


def _net(stats: Stats, null: Stats | None) -> dict[str, Any]:
    # The interval is shifted by the identity's median like the median itself: it says how
    # well this candidate's median is known, the identity's own interval sits beside it in
    # the table's "overheads".
    base = null.median_ms if null is not None else 0.0
    return {"median_ms": max(0.0, stats.median_ms - base), "ci_lo_ms": max(0.0, stats.ci_lo_ms - base),
            "ci_hi_ms": max(0.0, stats.ci_hi_ms - base), "p10_ms": max(0.0, stats.p10_ms - base),
            "p90_ms": max(0.0, stats.p90_ms - base), "n": stats.n, "converged": stats.converged,
            "raw_median_ms": stats.median_ms}


def _entry_list(ctx: _Run, entries: Mapping[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for layer in ctx.layers:
        for spec in ctx.pools[layer.name]:
            e = entries.get((layer.name, spec))
            if e is not None:
                out.append({"layer": layer.name, "spec": spec, **e})
    return out


def _cheapest_plan(ctx: _Run, entries: Mapping[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    plan = {}
    for layer in ctx.layers:
        have = [(float(entries[(layer.name, s)]["median_ms"]), i, s) for i, s in enumerate(ctx.pools[layer.name])
                if (layer.name, s) in entries]
        plan[layer.name] = min(have)[2] if have else "teacher"
    return plan


def _sum_entries(entries: Mapping[tuple[str, str], dict[str, Any]], plan: Mapping[str, str]) -> float:
    return float(sum(entries[(name, spec)]["median_ms"] for name, spec in plan.items()))


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="op", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.05)


def measure_table(
    run: str | Path,
    target: str = "onnxruntime-cpu",
    batch_size: int = 1,
    validate: int = 0,
    force: bool = False,
    threads: int | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure (or finish) the latency table of `run` on `target` at `batch_size`; write it.

    Times every (layer, candidate) of RUN/layers.json that the table lacks (a restarted
    run measures only what is missing; the table is saved after every layer), then the
    fixed part, then, with `validate=K`, K random networks end to end (see the module
    docstring). `threads` overrides the config's latency.threads; `options` are passed to
    the target (e.g. {"peak_gflops": 500} for `analytic`). Writes
    RUN/latency/<table_id>.json atomically and returns the table.

    Raises HantError for an unknown target, a target that cannot run here, a missing run
    folder, or an existing table measured with another fingerprint (unless `force`).
    """
    t_start = time.perf_counter()
    ctx = _Run(run)
    cfg = ctx.cfg
    tgt = get_target(target, batch_size=batch_size, threads=threads or cfg.latency.threads, **dict(options or {}))
    proto = Protocol.from_config(cfg.latency, seed=cfg.seed)
    tid = table_id(target, batch_size)
    path = ctx.rd.latency_table(tid)
    fingerprint = tgt.fingerprint()

    # Building, folding and exporting candidates is torch work outside any timing; one thread
    # does it fastest on a busy machine (several threads wait on each other's preempted cores).
    with run_lock(ctx.rd.root, log=log), torch_threads(1):
        if tgt.precision == "int8" and "scheme" not in (options or {}):
            if _use_run_int8_scheme(ctx, tgt, tid, log):  # sets the target's scheme, part of its fingerprint
                fingerprint = tgt.fingerprint()
        table, entries = _start_table(ctx, path, tid, tgt, fingerprint, force, log)
        # The protocol of this build (whole networks add one untimed call per turn).
        table["protocol"] = proto.to_dict()
        failed = {(f["layer"], f["spec"]): f for f in table.get("failed", [])}
        missing = {layer.name: [s for s in ctx.pools[layer.name] if (layer.name, s) not in entries
                                and (layer.name, s) not in failed] for layer in ctx.layers}
        n_missing = sum(len(v) for v in missing.values())
        calib_source = None
        layer_inputs: dict[str, torch.Tensor] = {}
        images = None
        if tgt.precision == "int8" and (n_missing or validate or table.get("fixed_ms") is None):
            images, layer_inputs, calib_source = _calibration_inputs(ctx)
            table["quant_calibration"] = calib_source

        build_end: list[float] = []  # when the table (entries + fixed part) was done, before validation

        def save(complete: bool) -> None:
            table["entries"] = _entry_list(ctx, entries)
            table["failed"] = list(failed.values())
            table["complete"] = complete
            elapsed = (build_end[0] if build_end else time.perf_counter()) - t_start
            table["build_time_s"] = round(float(table.get("build_time_s_before", 0.0)) + elapsed, 1)
            write_json(path, {k: v for k, v in table.items() if k != "build_time_s_before"})

        if n_missing:
            log(f"latency {tid}: timing {n_missing} candidates over "
                f"{sum(1 for v in missing.values() if v)} layers on {tgt.threads} thread(s), batch {tgt.batch_size}")
            table["fixed_ms"] = None
            table["validation"] = None
            table["calibration"] = None
            _measure_entries(ctx, tgt, proto, missing, entries, failed, table, layer_inputs, save, progress, log)
        if table.get("fixed_ms") is None:
            _measure_fixed(ctx, tgt, proto, entries, table, images)
            table["validation"] = None
            table["calibration"] = None
            save(complete=True)
        build_end.append(time.perf_counter())
        if validate:
            validation, calibration = validate_table(ctx, table, tgt, proto, int(validate), images=images,
                                                     progress=progress)
            table["validation"], table["calibration"] = validation, calibration
        save(complete=True)
    log(_summary_line(table, tid, path))
    if failed:
        log(f"latency {tid}: {len(failed)} candidates could not be timed (listed under 'failed' in the table)")
    return {k: v for k, v in table.items() if k != "build_time_s_before"}


def _use_run_int8_scheme(ctx: _Run, tgt: Target, tid: str, log: Callable[[str], None]) -> bool:
    """Gives an ONNX Runtime INT8 target the scheme measured for this machine and run (shared
    with the export); returns whether it did."""
    from hant.latency.int8 import describe_scheme, run_int8_scheme
    from hant.latency.onnxruntime_cpu import OnnxRuntimeCPU

    if not isinstance(tgt, OnnxRuntimeCPU):
        return False
    choice = run_int8_scheme(ctx.rd.root, tgt.batch_size, tgt.threads, log=log)
    tgt.scheme = choice["scheme"]
    log(f"latency {tid}: INT8 scheme {describe_scheme(tgt.scheme)}: {choice['reason']}")
    return True


def _summary_line(table: dict[str, Any], tid: str, path: Path) -> str:
    v = table.get("validation")
    msg = (f"latency {tid}: {len(table['entries'])} entries, fixed part {table['fixed_ms']:.3f} ms, "
           f"teacher {table['teacher_ms']:.3f} ms measured -> {path}")
    if v:
        msg += (f"; validation on {v['samples']} networks: median |error| {v['median_abs_pct_error']:.1f}%, "
                f"max {v['max_abs_pct_error']:.1f}%, Kendall tau {v['kendall_tau']:.3f}"
                + (f" ({table['calibration']['kind']} calibration kept)" if table.get("calibration") else ""))
    return msg


def _start_table(ctx: _Run, path: Path, tid: str, tgt: Target, fingerprint: dict[str, Any], force: bool,
                 log: Callable[[str], None]) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """The table to continue (existing, checked) or a new one, and its entries by (layer, spec)."""
    signatures = [_layer_signature(layer) for layer in ctx.layers]
    fresh = {
        "version": TABLE_VERSION, "target": tgt.id, "table_id": tid, "batch_size": tgt.batch_size,
        "fingerprint": fingerprint, "model": ctx.model, "input_size": list(ctx.input_size),
        "layers": [layer.name for layer in ctx.layers], "layer_shapes": signatures,
        "protocol": None, "fixed_ms": None, "fixed_ci_ms": None, "teacher_ms": None, "teacher_ci_ms": None,
        "fixed": None, "overheads": {}, "entries": [], "failed": [],
        "validation": None, "calibration": None, "complete": False,
    }
    if not path.exists():
        return fresh, {}
    try:
        old = read_json(path)
    except HantError:  # torn or altered: measure again rather than trust any of it
        log(f"latency {tid}: {path} is unreadable (corrupt or truncated); measuring it afresh")
        return fresh, {}
    if old.get("target") != tgt.id or int(old.get("batch_size", -1)) != tgt.batch_size:
        raise HantError(f"{path} holds a table for {old.get('target')} at batch {old.get('batch_size')}, "
                        f"not {tgt.id} at batch {tgt.batch_size}; delete it to measure afresh")
    diff = _fingerprint_diff(old.get("fingerprint") or {}, fingerprint)
    if diff and not force:
        raise HantError(f"{path} was measured with another fingerprint ({'; '.join(diff[:3])}); "
                        "pass --force to reuse its entries, or delete it to measure afresh")
    table = {**fresh, **{k: v for k, v in old.items() if k in fresh or k in ("quant_calibration", "build_time_s")}}
    table["build_time_s_before"] = float(old.get("build_time_s") or 0.0)
    table.pop("build_time_s", None)
    if diff:
        log(f"latency {tid}: reusing a table measured with another fingerprint ({'; '.join(diff[:3])})")
        table["previous_fingerprint"] = old.get("fingerprint")
        table["fingerprint"] = fingerprint
    old_shapes = {s["name"]: s for s in old.get("layer_shapes") or []}
    same = {s["name"] for s in signatures if old_shapes.get(s["name"]) == s}
    pools = {name: set(p) for name, p in ctx.pools.items()}
    entries = {(e["layer"], e["spec"]): {k: v for k, v in e.items() if k not in ("layer", "spec")}
               for e in old.get("entries", []) if e["layer"] in same and e["spec"] in pools.get(e["layer"], ())}
    dropped = len(old.get("entries", [])) - len(entries)
    if dropped:
        log(f"latency {tid}: dropped {dropped} entries whose layer shape or pool changed")
        table["fixed_ms"] = None
    table["failed"] = [f for f in old.get("failed", []) if f["layer"] in same]
    table["layers"], table["layer_shapes"] = fresh["layers"], signatures
    table["overheads"] = {k: v for k, v in (old.get("overheads") or {}).items() if k in same}
    return table, entries


def _measure_entries(ctx: _Run, tgt: Target, proto: Protocol, missing: Mapping[str, list[str]],
                     entries: dict, failed: dict, table: dict, layer_inputs: Mapping[str, torch.Tensor],
                     save: Callable[[bool], None], progress: bool, log: Callable[[str], None]) -> None:
    """Time the missing candidates one layer at a time (interleaved within the layer)."""
    groups = [(layer, missing[layer.name]) for layer in ctx.layers if missing[layer.name]]
    total = sum(len(specs) + 1 for _, specs in groups)
    cap_left, items_left = proto.time_cap_s, total
    tid = table["table_id"]
    bar = _bar(total, f"latency {tid}", progress)
    try:
        for done, (layer, specs) in enumerate(groups, 1):
            bar.set_postfix_str(f"{layer.name}: preparing {len(specs)}", refresh=True)
            prepared: dict[Any, Any] = {}
            examples = layer_inputs.get(layer.name)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.cfg.seed)
                for spec in specs:
                    try:
                        prepared[spec] = tgt.prepare(ctx.build(layer, spec), layer.in_shape, examples)
                    except Exception as e:  # one candidate the exporter or runtime cannot take must not sink the table
                        if isinstance(e, OnnxExportError):
                            e = e.__cause__ or e  # the exporter's own error, which names the op
                        elif isinstance(e, HantError):
                            raise
                        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                            # The machine's problem, not the candidate's: stop, and time it on the rerun.
                            raise HantError(f"no space left on the device while preparing {layer.name}/{spec}; "
                                            "free some space and rerun (finished work is kept)") from None
                        failed[(layer.name, spec)] = {"layer": layer.name, "spec": spec,
                                                      "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                        log(f"latency {tid}: cannot time {layer.name}/{spec}: {failed[(layer.name, spec)]['error']}")
                        bar.update(1)
                prepared[_NULL] = tgt.prepare(nn.Identity(), layer.in_shape, examples)
            group_cap = cap_left * len(prepared) / max(1, items_left)
            bar.set_postfix_str(f"{layer.name}: timing {len(prepared)}", refresh=True)
            t0 = time.perf_counter()
            # Entries need no minimum time: a layer's rounds are interleaved with its whole pool.
            stats = measure(prepared, tgt, Protocol(**{**proto.to_dict(), "time_cap_s": group_cap, "min_time_s": 0.0}),
                            bar)
            cap_left = max(0.0, cap_left - (time.perf_counter() - t0))
            items_left -= len(specs) + 1
            null = stats.pop(_NULL)
            table["overheads"][layer.name] = null.to_dict()
            for spec, s in stats.items():
                entries[(layer.name, spec)] = _net(s, null)
            del prepared
            save(False)
            fault_point("latency:after_layer", done)
    finally:
        bar.close()


def _measure_fixed(ctx: _Run, tgt: Target, proto: Protocol, entries: dict, table: dict,
                   images: torch.Tensor | None) -> None:
    """Fixed part = end to end of the all-cheapest network minus the sum of its entries."""
    cheapest = _cheapest_plan(ctx, entries)
    teacher_plan = {layer.name: "teacher" for layer in ctx.layers}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.cfg.seed)
        cheapest_net = build_network(ctx.teacher, ctx.layers, cheapest, ctx.build)
    stats = time_against_teacher(copy.deepcopy(ctx.teacher), {"cheapest": cheapest_net}, tgt, ctx.input_size,
                                 proto, images).stats
    sum_cheap = _sum_entries(entries, cheapest)
    cheap = stats["cheapest"]
    fixed = cheap.median_ms - sum_cheap
    table["fixed"] = {
        "method": "all-cheapest network end to end minus the sum of its entries",
        "cheapest_plan": cheapest, "cheapest_ms": stats["cheapest"].to_dict(), "cheapest_sum_entries_ms": sum_cheap,
        "teacher_ms": stats["teacher"].to_dict(),
        "teacher_sum_entries_ms": _sum_entries(entries, teacher_plan) if all(
            (n, "teacher") in entries for n in teacher_plan) else None,
        "clamped": fixed < 0,
    }
    table["fixed_ms"] = max(0.0, fixed)
    # The entries' sum is subtracted as a constant, so the fixed part's interval is the
    # cheapest network's, shifted.
    table["fixed_ci_ms"] = [max(0.0, cheap.ci_lo_ms - sum_cheap), max(0.0, cheap.ci_hi_ms - sum_cheap)]
    table["teacher_ms"] = stats["teacher"].median_ms
    table["teacher_ci_ms"] = [stats["teacher"].ci_lo_ms, stats["teacher"].ci_hi_ms]


# ---------------------------------------------------------------------------------------------
# Validation and calibration


def _random_plans(ctx: _Run, entries: Mapping[tuple[str, str], Any], k: int, seed: int,
                  exclude: Sequence[Mapping[str, str]] = ()) -> list[dict[str, str]]:
    pools = {layer.name: [s for s in ctx.pools[layer.name] if (layer.name, s) in entries] for layer in ctx.layers}
    rng = random.Random(seed)
    plans, seen = [], {tuple(p[layer.name] for layer in ctx.layers) for p in exclude}
    for _ in range(50 * max(1, k)):
        if len(plans) >= k:
            break
        q = rng.random()
        plan = {layer.name: ("teacher" if rng.random() < q or not pools[layer.name] else rng.choice(pools[layer.name]))
                for layer in ctx.layers}
        key = tuple(plan.values())
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    return plans


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def validate_table(ctx: _Run, table: dict[str, Any], tgt: Target, proto: Protocol, k: int,
                   images: torch.Tensor | None = None, progress: bool = True) -> tuple[dict[str, Any], dict | None]:
    """Predict and time end to end K random networks plus the teacher and the all-cheapest one.

    Returns (validation, calibration or None); see the module docstring for the method.
    """
    if k < 1:
        raise HantError(f"--validate needs a positive number of networks, got {k}")
    t0 = time.perf_counter()
    load_before = _loadavg()
    entries = {(e["layer"], e["spec"]): e for e in table["entries"]}
    plans = [("teacher", {layer.name: "teacher" for layer in ctx.layers}),
             ("cheapest", _cheapest_plan(ctx, entries))]
    plans += [("random", p) for p in _random_plans(ctx, entries, k, ctx.cfg.seed + 1, [p for _, p in plans])]
    raw_table = {**table, "calibration": None}
    pred = np.array([predict_ms(raw_table, p) for _, p in plans])
    fixed = float(table["fixed_ms"])
    bar = _bar(len(plans), f"validate {table['table_id']}", progress)
    try:
        bar.set_postfix_str(f"preparing {len(plans)} networks", refresh=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.cfg.seed)
            # Prepared one at a time, so that only one network's PyTorch copy is alive at once.
            nets = {i: prepare_network(tgt, build_network(ctx.teacher, ctx.layers, plan, ctx.build), ctx.input_size,
                                       images) for i, (_, plan) in enumerate(plans)}
        bar.set_postfix_str("timing", refresh=True)
        # The check is only as good as its end-to-end medians, and there are few networks:
        # give them three times the table's minimum of repeats and half its tolerance.
        check = replace(network_protocol(proto), min_repeats=min(3 * proto.min_repeats, proto.max_repeats),
                        rel_tol=proto.rel_tol / 2)
        stats = time_networks(nets, tgt, ctx.input_size, check, images, bar)
        del nets
    finally:
        bar.close()
    meas = np.array([stats[i].median_ms for i in range(len(plans))])
    cal, held_out, scores = _choose_calibration(fixed, pred - fixed, meas)
    head = _summary(held_out, meas)
    is_random = np.array([kind == "random" for kind, _ in plans])
    validation = {
        "k": int(is_random.sum()),
        "samples": len(plans),
        **head,
        "errors_are": "leave-one-out after calibration" if cal else "uncalibrated prediction",
        "uncalibrated": _summary(pred, meas),
        "random_only": _summary(held_out[is_random], meas[is_random]) if is_random.sum() > 1 else None,
        "calibration_scores": scores,
        "protocol": check.to_dict(),
        "time_s": round(time.perf_counter() - t0, 1),
        "loadavg": [load_before, _loadavg()],  # a busy machine is the usual cause of a poor result
        "points": [
            {"kind": kind, "predicted_ms": float(p), "calibrated_ms": predict_ms({**table, "calibration": cal}, plan),
             "heldout_predicted_ms": float(h), "measured_ms": s.median_ms, "ci_lo_ms": s.ci_lo_ms,
             "ci_hi_ms": s.ci_hi_ms, "converged": s.converged, "p10_ms": s.p10_ms, "p90_ms": s.p90_ms,
             "n": s.n, "plan": plan}
            for (kind, plan), p, h, s in zip(plans, pred, held_out, (stats[i] for i in range(len(plans))))
        ],
    }
    return validation, cal
