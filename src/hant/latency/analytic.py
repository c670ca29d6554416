"""analytic: a roofline estimate for hardware that is not at hand.

Each tensor operation of the deployed form (batch norm folded) costs
max(FLOPs / peak, bytes moved / bandwidth) + a fixed per-op overhead; a network costs the
sum over its operations. Bytes moved are the operation's tensor inputs (weights included)
and its output. Views cost nothing, and pointwise activations are taken as fused into the
operation that produced their input (what inference runtimes do), unless
`fuse_activations=False`. FLOPs come from torch.utils.flop_counter's formulas
(convolutions, matrix products); operations without a formula are memory-bound.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hant.errors import HantError
from hant.latency.base import Target, fold_batchnorm

__all__ = ["Analytic", "roofline"]

_ACTIVATIONS = {
    "relu", "relu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid",
    "sigmoid_", "gelu", "gelu_", "clamp", "clamp_", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_",
    "tanh", "tanh_", "relu6", "mish", "mish_", "clamp_min", "clamp_min_",
}


class _Roofline(TorchDispatchMode):
    def __init__(self, peak_flops: float, bandwidth: float, overhead_s: float, bytes_per_element: float,
                 fuse_activations: bool):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.peak, self.bw, self.overhead = peak_flops, bandwidth, overhead_s
        self.bpe, self.fuse = bytes_per_element, fuse_activations
        self.seconds = 0.0
        self.flops = 0
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view: no data moves
        if self.fuse and name in _ACTIVATIONS:
            return out
        packet = func._overloadpacket
        flops = 0
        if packet in self.registry:
            flops = int(self.registry[packet](*args, **kwargs, out_val=out))
        nbytes = sum(t.numel() for t in ins + outs) * self.bpe
        self.flops += flops
        self.bytes += nbytes
        self.ops += 1
        self.seconds += max(flops / self.peak, nbytes / self.bw) + self.overhead
        return out


def roofline(module: nn.Module, x: torch.Tensor, peak_gflops: float, bandwidth_gbs: float,
             op_overhead_us: float = 0.0, bytes_per_element: float = 4.0,
             fuse_activations: bool = True) -> dict[str, float]:
    """Run `module` on `x` and sum the roofline time of every operation.

    Returns {"ms", "flops", "bytes", "ops"} for the whole call.
    """
    mode = _Roofline(peak_gflops * 1e9, bandwidth_gbs * 1e9, op_overhead_us * 1e-6, bytes_per_element,
                     fuse_activations)
    with torch.no_grad(), mode:
        module(x)
    return {"ms": mode.seconds * 1e3, "flops": mode.flops, "bytes": mode.bytes, "ops": mode.ops}


class _Estimate:
    def __init__(self, ms: float, detail: dict[str, float]):
        self.ms, self.detail = ms, detail

    def run(self) -> None:
        pass


class Analytic(Target):
    """A roofline model: `peak_gflops` GFLOP/s, `bandwidth_gbs` GB/s, `op_overhead_us` per op.

    The defaults describe a modest CPU core cluster; set them for the hardware you mean.
    """

    id = "analytic"

    def __init__(self, batch_size: int = 1, threads: int | None = None, peak_gflops: float = 100.0,
                 bandwidth_gbs: float = 20.0, op_overhead_us: float = 1.0, bytes_per_element: float = 4.0,
                 fuse_activations: bool = True, precision: str = "fp32"):
        super().__init__(batch_size, threads)
        if peak_gflops <= 0 or bandwidth_gbs <= 0 or op_overhead_us < 0 or bytes_per_element <= 0:
            raise HantError("analytic target needs peak_gflops > 0, bandwidth_gbs > 0, op_overhead_us >= 0 "
                            "and bytes_per_element > 0")
        self.peak_gflops, self.bandwidth_gbs = float(peak_gflops), float(bandwidth_gbs)
        self.op_overhead_us, self.bytes_per_element = float(op_overhead_us), float(bytes_per_element)
        self.fuse_activations, self.precision = bool(fuse_activations), precision

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        x = self.input(input_shape)
        m = fold_batchnorm(module, x)
        est = roofline(m, x, self.peak_gflops, self.bandwidth_gbs, self.op_overhead_us, self.bytes_per_element,
                       self.fuse_activations)
        return _Estimate(est["ms"], est)

    def time(self, runnable, n: int) -> list[float]:
        return [runnable.ms] * n

    def fingerprint(self) -> dict[str, Any]:
        # No hardware is involved: the model's parameters are what make two tables comparable.
        return {"target": self.id, "precision": self.precision, "batch_size": self.batch_size,
                "peak_gflops": self.peak_gflops, "bandwidth_gbs": self.bandwidth_gbs,
                "op_overhead_us": self.op_overhead_us, "bytes_per_element": self.bytes_per_element,
                "fuse_activations": self.fuse_activations}
