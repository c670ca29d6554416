"""torch-cuda: PyTorch on an NVIDIA GPU in fp16 or bf16, timed with CUDA events.

Optionally each candidate is captured once into a CUDA graph and replayed, which removes
the per-kernel launch cost from the measurement (what a deployment with graphs sees).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import Target, fold_batchnorm

__all__ = ["TorchCUDA"]


class _Cuda:
    def __init__(self, module: nn.Module, x: torch.Tensor, graph: bool):
        self.module, self.x = module, x
        self.graph = None
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):  # warm-up on a side stream, as capture requires
                    module(x)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.inference_mode():
                self.out = module(x)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self.module(self.x)


class TorchCUDA(Target):
    """PyTorch on `device` (default cuda:0); `precision` "fp16" or "bf16"; `cuda_graphs` to replay graphs."""

    id = "torch-cuda"

    def __init__(self, batch_size: int = 1, threads: int | None = None, precision: str = "fp16",
                 cuda_graphs: bool = False, device: str = "cuda:0", channels_last: bool = True):
        super().__init__(batch_size, threads)
        if not torch.cuda.is_available():
            raise HantError("torch-cuda needs a CUDA GPU; none is visible (use onnxruntime-cpu, torch-cpu or analytic)")
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        if precision not in dtypes:
            raise HantError(f"torch-cuda precision must be one of {', '.join(dtypes)}, got {precision!r}")
        self.precision, self.dtype = precision, dtypes[precision]
        self.cuda_graphs, self.device, self.channels_last = bool(cuda_graphs), torch.device(device), channels_last

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        x = self.input(input_shape)
        m = fold_batchnorm(module, x[:1])
        m = m.to(self.device, self.dtype)
        x = x.to(self.device, self.dtype)
        if self.channels_last and x.dim() == 4:
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return _Cuda(m, x, self.cuda_graphs)

    def time(self, runnable, n: int) -> list[float]:
        out = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runnable.run()
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
        return out

    def fingerprint(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {**super().fingerprint(), "gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "cuda_graphs": self.cuda_graphs,
                "channels_last": self.channels_last, "clock": "cuda-events"}
