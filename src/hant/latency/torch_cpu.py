"""torch-cpu: eager PyTorch on the CPU, batch norm folded, channels_last, inference mode."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from hant.latency.base import Target, fold_batchnorm, torch_threads

__all__ = ["TorchCPU"]


class _Eager:
    """One module and its fixed input; `run()` is one forward pass."""

    def __init__(self, module: nn.Module, x: torch.Tensor):
        self.module, self.x = module, x

    def run(self) -> None:
        with torch.inference_mode():
            self.module(self.x)


class TorchCPU(Target):
    """Eager PyTorch on the CPU in float32 (or bfloat16 with `precision="bf16"`)."""

    id = "torch-cpu"

    def __init__(self, batch_size: int = 1, threads: int | None = None, precision: str = "fp32",
                 channels_last: bool = True, clock: str = "auto"):
        super().__init__(batch_size, threads, clock)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        if precision not in dtypes:
            from hant.errors import HantError

            raise HantError(f"torch-cpu precision must be one of {', '.join(dtypes)}, got {precision!r}")
        self.precision, self.dtype, self.channels_last = precision, dtypes[precision], channels_last

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        x = self.input(input_shape)
        m = fold_batchnorm(module, x[:1] if self.batch_size > 1 else x)
        m = m.to(dtype=self.dtype)
        x = x.to(dtype=self.dtype)
        if self.channels_last and x.dim() == 4:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return _Eager(m, x)

    def context(self):
        # torch's intra-op thread count is process-wide: set it while measuring, then restore.
        return torch_threads(self.threads)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "channels_last": self.channels_last,
                "mkldnn": bool(torch.backends.mkldnn.is_available())}
