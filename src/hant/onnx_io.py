"""hant's one ONNX exporter: the latency targets time what the export stage writes.

Candidates (for the latency table), teachers and students (for the export) go through
`export_onnx`, so a candidate the table could time is one the student can be exported with,
in the same graph. The module is exported in eval mode with constant folding: the exporter
folds every BatchNorm into the convolution before it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from typing import Sequence

import torch
from torch import nn

from hant.errors import HantError
from hant.workspace import atomic_write_bytes

__all__ = ["OPSET", "OnnxExportError", "export_onnx"]

OPSET = 17


class OnnxExportError(HantError):
    """Neither exporter could express the module; the exporter's own exception is the cause."""


def export_onnx(module: nn.Module, input_shape: Sequence[int], path: str | os.PathLike | None = None, *,
                batch_size: int | None = None, input_name: str = "input", output_name: str = "output") -> bytes:
    """The ONNX bytes of `module` (a copy in eval mode on the CPU; opset 17; batch norm folded).

    `input_shape` is one example's shape (C, H, W). `batch_size` None exports a dynamic batch
    axis (traced at batch 2), an int a graph fixed to that batch. `input_name` and
    `output_name` name the graph's input and output. Writes the bytes atomically to `path`
    when given. Raises OnnxExportError (a HantError) when neither the TorchScript exporter
    nor the dynamo exporter (the fallback, opset 18) can express the module.
    """
    module = copy.deepcopy(module).cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.randn((batch_size or 2, *map(int, input_shape)), generator=torch.Generator().manual_seed(0))
    names = {"input_names": [input_name], "output_names": [output_name]}
    f = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated but fast, needs no torch.export support from
            # every candidate, folds batch norm and emits opset 17; its warnings are noise here.
            # The dynamo exporter needs opset 18 and is the fallback for what it cannot trace.
            warnings.simplefilter("ignore")
            try:
                dynamic = None if batch_size else {input_name: {0: "batch"}, output_name: {0: "batch"}}
                torch.onnx.export(module, (x,), f, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                                  dynamic_axes=dynamic, **names)
            except Exception:  # any tracing failure: try the other exporter before giving up
                f = io.BytesIO()
                with contextlib.redirect_stdout(io.StringIO()):
                    shapes = None if batch_size else ({0: torch.export.Dim("batch")},)
                    prog = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, optimize=True,
                                             dynamic_shapes=shapes, **names)
                prog.save(f)
    except Exception as e:
        raise OnnxExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "the model uses an op ONNX cannot express") from e
    data = f.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data
