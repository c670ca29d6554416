"""The target interface, the registry of targets, and helpers every target shares.

A target is where latency is measured: a runtime, a precision, a batch size and a thread
count on one machine. It turns a module into its deployed form (`prepare`), times that
form (`time`), and describes itself (`fingerprint`) so that a table measured elsewhere is
recognised. Targets are small classes; the registry maps an id to a factory, and the
built-in factories are named by import path so that importing hant.latency loads no
runtime.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import platform
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from hant.errors import HantError

__all__ = [
    "Target",
    "OtherLoad",
    "BUSY_SHARE",
    "register_target",
    "get_target",
    "target_ids",
    "fold_batchnorm",
    "cpu_model",
    "available_cores",
    "torch_threads",
]


class Target:
    """One place to measure latency. Subclasses set `id` and implement `prepare`.

    `batch_size` images per call; `threads` intra-op threads (None: every core this
    process may use). `prepare(module, input_shape, example_inputs=None)` returns a
    runnable whose `run()` does one forward pass on a fixed input of shape
    `(batch_size, *input_shape)`; `time(runnable, n)` returns n per-call latencies in ms.

    `clock` is "wall" (elapsed time) or "thread-cpu" (CPU time of the calling thread). With
    one thread the runtime computes on the calling thread, so its CPU time is the call's
    latency on an otherwise idle machine: time spent preempted by other processes is not
    counted. On a shared machine that is the difference between a usable table and noise
    (measured here under a load of 8 on 2 cores, EfficientNet-B0 batch 1: median
    end-to-end error 2% with thread-cpu, 64% with wall). "auto" (the default) picks
    thread-cpu with one thread and wall otherwise.
    """

    id: str = "base"
    precision: str = "fp32"
    CLOCKS = ("auto", "wall", "thread-cpu")

    def __init__(self, batch_size: int = 1, threads: int | None = None, clock: str = "auto"):
        if int(batch_size) < 1:
            raise HantError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.threads = int(threads) if threads else available_cores()
        if self.threads < 1:
            raise HantError(f"threads must be at least 1, got {threads}")
        if clock not in self.CLOCKS:
            raise HantError(f"clock must be one of {', '.join(self.CLOCKS)}, got {clock!r}")
        if clock == "auto":
            clock = "thread-cpu" if self.threads == 1 else "wall"
        if clock == "thread-cpu" and self.threads != 1:
            raise HantError("clock thread-cpu counts the calling thread only; use it with threads=1")
        self.clock = clock

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        """The deployed form of `module` for inputs `(batch_size, *input_shape)`.

        `example_inputs` (N, *input_shape) are real inputs for targets that calibrate
        (INT8); others ignore them.
        """
        raise NotImplementedError

    def time(self, runnable, n: int) -> list[float]:
        """Run `runnable` n times; return the latency of each call in milliseconds."""
        now = time.perf_counter_ns if self.clock == "wall" else time.thread_time_ns
        out = []
        for _ in range(n):
            t0 = now()
            runnable.run()
            out.append((now() - t0) * 1e-6)
        return out

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Process settings held while measuring (e.g. torch's thread count), restored after."""
        yield

    def fingerprint(self) -> dict[str, Any]:
        """What makes a measurement comparable: hardware, runtime versions, precision, batch, threads."""
        return {
            "target": self.id,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "clock": self.clock,
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "machine": platform.machine(),
            "system": platform.system(),
            "torch": torch.__version__,
        }

    def input(self, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
        """A fixed random input `(batch_size, *input_shape)` (values do not change latency)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn((self.batch_size, *map(int, input_shape)), generator=g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, batch_size={self.batch_size}, threads={self.threads})"


# id -> (factory or "module:attr", default keyword arguments)
_BUILTIN: dict[str, tuple[str | Callable[..., Target], dict[str, Any]]] = {
    "onnxruntime-cpu": ("hant.latency.onnxruntime_cpu:OnnxRuntimeCPU", {"precision": "fp32"}),
    "onnxruntime-cpu-int8": ("hant.latency.onnxruntime_cpu:OnnxRuntimeCPU", {"precision": "int8"}),
    "torch-cpu": ("hant.latency.torch_cpu:TorchCPU", {}),
    "torch-cuda": ("hant.latency.torch_cuda:TorchCUDA", {}),
    "analytic": ("hant.latency.analytic:Analytic", {}),
}


class _Registry:
    """Target ids to factories; refuses duplicates so a typo never shadows a built-in."""

    def __init__(self, entries: dict[str, tuple[str | Callable[..., Target], dict[str, Any]]]):
        self._entries = dict(entries)

    def register(self, target_id: str, factory: Callable[..., Target], **defaults: Any) -> None:
        if target_id in self._entries:
            raise HantError(f"latency target '{target_id}' is already registered; pick another id")
        self._entries[target_id] = (factory, defaults)

    def unregister(self, target_id: str) -> None:
        if target_id not in self._entries:
            raise HantError(f"latency target '{target_id}' is not registered")
        del self._entries[target_id]

    def ids(self) -> list[str]:
        return list(self._entries)

    def create(self, target_id: str, **kwargs: Any) -> Target:
        if target_id not in self._entries:
            raise HantError(f"unknown latency target '{target_id}'; known targets: {', '.join(self.ids())}")
        factory, defaults = self._entries[target_id]
        if isinstance(factory, str):
            mod, attr = factory.split(":")
            factory = getattr(importlib.import_module(mod), attr)
        try:
            target = factory(**{**defaults, **kwargs})
        except TypeError as e:  # an option this target does not take
            raise HantError(f"latency target '{target_id}' cannot take these options ({e}); "
                            f"given: {', '.join(sorted(kwargs))}") from None
        target.id = target_id
        return target


REGISTRY = _Registry(_BUILTIN)


def register_target(target_id: str, factory: Callable[..., Target], **defaults: Any) -> None:
    """Register a target factory under `target_id` (e.g. a runtime hant does not ship).

    `factory(batch_size=..., threads=..., **defaults, **options)` must return a Target.
    Raises HantError when the id is taken.
    """
    REGISTRY.register(target_id, factory, **defaults)


def target_ids() -> list[str]:
    """Registered target ids, built-ins first."""
    return REGISTRY.ids()


def get_target(target_id: str, batch_size: int = 1, threads: int | None = None, **options: Any) -> Target:
    """Create the target `target_id`. Raises HantError listing the known ids when it is unknown,
    or when the target cannot run here (e.g. torch-cuda without a GPU)."""
    return REGISTRY.create(target_id, batch_size=batch_size, threads=threads, **options)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OtherLoad:
    """How much of the machine other processes used between `start()` and `share()`: the CPU
    time all processes spent (/proc/stat) less this process's own, over the wall time and the
    machine's cores. A timing taken beside other work is unreliable even on the thread's CPU
    clock: shared caches and memory bandwidth slow the teacher and a student unequally (a
    ConvNeXt-Atto plan measured 2.00x beside one training job and 1.62x beside another).
    `share()` is None where /proc/stat is not readable (not Linux)."""

    def __init__(self) -> None:
        self._t0: tuple[float, float, float] | None = None

    def start(self) -> "OtherLoad":
        self._t0 = self._read()
        return self

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        own = sum(os.times()[:2])
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own

    def share(self) -> float | None:
        t1 = self._read()
        if self._t0 is None or t1 is None or t1[0] <= self._t0[0]:
            return None
        others = (t1[1] - self._t0[1]) - (t1[2] - self._t0[2])
        return max(0.0, others / ((t1[0] - self._t0[0]) * (os.cpu_count() or 1)))


# Other processes' share of the machine above which a timing is flagged as taken on a busy machine.
BUSY_SHARE = 0.25


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _bn_replacement(bn: nn.BatchNorm2d) -> nn.Module | None:
    # What is left of a batch norm once folded: nothing, or the activation that timm's
    # BatchNormAct2d applies after normalising. Other subclasses are left alone.
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and isinstance(bn.act, nn.Module):
        drop = getattr(bn, "drop", None)
        return nn.Sequential(drop if isinstance(drop, nn.Module) else nn.Identity(), bn.act)
    return None


@torch.no_grad()
def fold_batchnorm(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `module` (eval mode) with every BatchNorm2d that directly follows a Conv2d
    folded into the conv's weights.

    Pairs are found by running `example` through the copy: a batch norm whose input is
    the very tensor a conv returned. Convs or batch norms called more than once are left
    alone. The folded copy is checked against the original on `example`; if they differ
    (a conv output also used elsewhere), the unfolded copy is returned.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(module).eval()
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    pairs: list[tuple[str, str]] = []
    hooks = []

    def conv_hook(name):
        def hook(m, args, out):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(out)] = (name, out)  # keep the tensor alive so its id is not reused
        return hook

    def bn_hook(name):
        def hook(m, args):
            calls[name] = calls.get(name, 0) + 1
            hit = outputs.get(id(args[0])) if args else None
            if hit is not None and hit[1] is args[0]:
                pairs.append((hit[0], name))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            hooks.append(m.register_forward_pre_hook(bn_hook(name)))
    try:
        reference = model(example)
    finally:
        for h in hooks:
            h.remove()
    outputs.clear()
    # Fold in place, remembering what was replaced, so that a failed check can undo it
    # without a second copy of the whole model.
    replaced: list[tuple[str, nn.Module]] = []
    for conv_name, bn_name in pairs:
        if calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        rest = _bn_replacement(bn)
        if rest is None:
            continue
        replaced += [(conv_name, conv), (bn_name, bn)]
        _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, bn_name, rest)
    if not replaced:
        return model
    out = model(example)
    scale = reference.abs().max().item() + 1e-6 if isinstance(reference, torch.Tensor) else 0.0
    if not (isinstance(out, torch.Tensor) and isinstance(reference, torch.Tensor) and out.shape == reference.shape
            and torch.allclose(out, reference, rtol=1e-3, atol=1e-4 * scale)):
        for name, original in reversed(replaced):
            _set_submodule(model, name, original)
    return model


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Hold torch's (process-wide) intra-op thread count at `n`; restore it afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
