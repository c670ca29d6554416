"""Whole networks timed together on one target, and against the teacher.

Every end-to-end timing in hant goes through here: the latency table's fixed part and its
validation, the plan's hardware check, the final measurement and the timing of the
exported ONNX and INT8 files. One protocol for all of them, so that their numbers can be
compared: the networks are interleaved (protocol.py), and each turn starts with one untimed
call, so that a network finds its weights in the caches as it would running alone (a small
student interleaved with the teacher would otherwise start every turn with a cold cache
and measure slower than it runs; measured at batch 1: 0.18 ms alone, 0.37 ms interleaved
with 31 other networks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import Target
from hant.latency.protocol import Protocol, Stats, measure, ratio_ci

__all__ = ["TEACHER", "Speedup", "Comparison", "network_protocol", "prepare_network", "time_networks",
           "time_against_teacher", "resolve_target"]

TEACHER = "teacher"


class Speedup(NamedTuple):
    """The teacher's median over a network's, with the ratio's bootstrap interval."""

    ratio: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Comparison:
    """What `time_against_teacher` measured.

    `stats`: "teacher" and every network's Stats; `speedups`: each network's Speedup, None
    when its median is not positive (below the clock's resolution); `protocol`: the protocol
    the networks were timed with (turn_warmup included), to record beside the numbers.
    """

    stats: dict[Hashable, Stats]
    speedups: dict[Hashable, Speedup | None]
    protocol: Protocol

    @property
    def teacher(self) -> Stats:
        return self.stats[TEACHER]


def network_protocol(protocol: Protocol) -> Protocol:
    """`protocol` for whole networks: at least one untimed call at the start of every turn."""
    return dataclasses.replace(protocol, turn_warmup=max(1, protocol.turn_warmup))


def prepare_network(target: Target, network: Any, input_shape: Sequence[int],
                    examples: torch.Tensor | None = None) -> Any:
    """`network`'s deployed form on `target`: an nn.Module is prepared (in eval mode) for inputs
    `(batch, *input_shape)`, with `examples` as calibration inputs for targets that calibrate;
    an already prepared runnable (anything with `run()`) is returned as it is. Raises
    HantError for anything else."""
    if isinstance(network, nn.Module):
        return target.prepare(network.eval(), input_shape, example_inputs=examples)
    if not callable(getattr(network, "run", None)):
        raise HantError(f"cannot time a {type(network).__name__}: give an nn.Module or a prepared runnable")
    return network


def time_networks(networks: Mapping[Hashable, Any], target: Target, input_shape: Sequence[int],
                  protocol: Protocol, examples: torch.Tensor | None = None, progress: Any = None
                  ) -> dict[Hashable, Stats]:
    """Time every network of `networks` on `target`, interleaved, as deployed.

    A value is an nn.Module or an already prepared runnable (`prepare_network`; e.g. an ONNX
    Runtime session on a fixed input). The protocol gets `network_protocol`. `progress` (a tqdm bar or None)
    advances by one per finished network. Returns key -> Stats. Raises HantError for a
    value that is neither.
    """
    prepared = {k: prepare_network(target, m, input_shape, examples) for k, m in networks.items()}
    return measure(prepared, target, network_protocol(protocol), progress)


def time_against_teacher(teacher: Any, networks: Mapping[Hashable, Any], target: Target,
                         input_shape: Sequence[int], protocol: Protocol, examples: torch.Tensor | None = None,
                         progress: Any = None) -> Comparison:
    """Time `teacher` and every network of `networks` together (`time_networks`) and give
    each network's speedup over the teacher with its interval (`protocol.ratio_ci`).

    `teacher` and the values of `networks` are nn.Modules or prepared runnables. Returns a
    Comparison. Raises HantError when `networks` is empty or uses the key "teacher".
    """
    if not networks:
        raise HantError("nothing to time against the teacher")
    if TEACHER in networks:
        raise HantError(f"the key {TEACHER!r} is the teacher's; name the networks otherwise")
    proto = network_protocol(protocol)
    stats = time_networks({TEACHER: teacher, **networks}, target, input_shape, proto, examples, progress)
    t = stats[TEACHER]
    speedups = {}
    for key in networks:
        s = stats[key]
        speedups[key] = (Speedup(*ratio_ci(t.samples, s.samples, proto.confidence, proto.resamples, proto.seed))
                         if s.median_ms > 0 else None)
    return Comparison(stats, speedups, proto)


def resolve_target(run, plan: Mapping[str, Any]) -> tuple[str, int, int | None]:
    """(target id, batch size, threads) to time a plan on: its "target" is a latency-table id
    (RUN/latency/<id>.json names the target and its threads) or a target id. Raises HantError
    when the plan names no target."""
    from hant.workspace import RunDir, read_json

    name = plan.get("target")
    if not name:
        raise HantError("the plan names no target; re-run `hant select --target ...`")
    table = RunDir(run).latency_table(name)
    if table.exists():
        t = read_json(table)
        fp = t.get("fingerprint") or {}
        return (fp.get("target") or t.get("target") or name, int(t.get("batch_size") or plan.get("batch_size") or 1),
                fp.get("threads"))
    return name, int(plan.get("batch_size") or 1), None
