"""onnxruntime-cpu and onnxruntime-cpu-int8: ONNX Runtime on the CPU, every graph optimisation on.

The module is exported in eval mode (the exporter folds batch norm into the convolution
when constant folding), then ONNX Runtime fuses conv + activation at ORT_ENABLE_ALL. For
INT8 the exported graph is pre-processed and statically quantised to QDQ form with ONNX
Runtime's quantiser (`int8_scheme()`: uint8 activations, int8 per-channel weights),
calibrated on the inputs given (real layer inputs when the run has data).

Sessions run sequentially with `threads` intra-op threads and no spinning: with many
sessions measured in turn, an idle session's spinning workers would steal the cores of the
one being timed (seen here as erratic 1-2x slow-downs). The end-to-end checks use the
same settings, so table and network agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import Target

__all__ = ["OnnxRuntimeCPU", "export_onnx", "int8_scheme", "cpu_has_vnni"]

OPSET = 17


def export_onnx(module: nn.Module, x: torch.Tensor) -> bytes:
    """The ONNX bytes of `module` (eval mode) for the fixed input `x`; batch norm folded."""
    if module.training:
        import copy

        module = copy.deepcopy(module).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is fast, needs no torch.export support
        # from every candidate, and folds batch norm; its warnings are noise here.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(module, (x,), f, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=["x"], output_names=["y"])
    return f.getvalue()


@contextlib.contextmanager
def _quiet_root_logger():
    # The quantiser logs advice ("consider pre-processing") on the root logger for every
    # model, and its calibration sessions warn about initialisers the pre-processing left
    # unused; for hundreds of candidates that is noise. ONNX Runtime has no getter for its
    # default severity, so it goes back to ONNX Runtime's default (warnings) afterwards.
    import onnxruntime as ort

    root = logging.getLogger()
    drop = lambda record: record.levelno > logging.WARNING  # noqa: E731
    root.addFilter(drop)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.removeFilter(drop)
        ort.set_default_logger_severity(2)


class _Session:
    """An inference session and its fixed input; `run()` is one call."""

    def __init__(self, session, x: np.ndarray):
        self.session = session
        self.feed = {session.get_inputs()[0].name: x}

    def run(self) -> None:
        self.session.run(None, self.feed)


class _Reader:
    """Calibration batches for the quantiser: `example_inputs` regrouped to the batch size."""

    def __init__(self, name: str, examples: np.ndarray, batch_size: int, batches: int = 8):
        reps = -(-batch_size // examples.shape[0])  # tile when there are fewer examples than one batch
        pool = np.concatenate([examples] * reps, axis=0) if reps > 1 else examples
        count = max(1, min(batches, pool.shape[0] // batch_size))
        self._feeds = iter([{name: pool[i * batch_size:(i + 1) * batch_size]} for i in range(count)])

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # part of the reader protocol in newer onnxruntime; one pass suffices
        pass


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products without AVX2's 16-bit saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        pass
    return False


def int8_scheme() -> dict[str, Any]:
    """The INT8 deployed form on this CPU: uint8 activations, int8 per-channel weights, QDQ.

    ONNX Runtime's x86 int8 kernels are built for unsigned activations times signed
    weights (signed-by-signed runs slower than fp32 on AVX2); without VNNI the AVX2
    multiply can saturate, so weights use 7 bits (`reduce_range`), as ONNX Runtime advises.
    The INT8 export of a student should use this same scheme so that table and export agree.
    """
    return {"activations": "uint8", "weights": "int8", "per_channel": True, "reduce_range": not cpu_has_vnni(),
            "format": "QDQ", "calibration": "MinMax"}


class OnnxRuntimeCPU(Target):
    """ONNX Runtime's CPU execution provider; `precision` "fp32" or "int8" (static QDQ)."""

    id = "onnxruntime-cpu"

    def __init__(self, batch_size: int = 1, threads: int | None = None, precision: str = "fp32",
                 spinning: bool = False, scheme: dict[str, Any] | None = None, clock: str = "auto"):
        super().__init__(batch_size, threads, clock)
        if precision not in ("fp32", "int8"):
            raise HantError(f"onnxruntime-cpu precision must be fp32 or int8, got {precision!r}")
        import onnxruntime  # noqa: F401  (fail here, with the id in the message, if missing)

        self.precision, self.spinning = precision, spinning
        self.scheme = {**int8_scheme(), **(scheme or {})}

    def session_options(self):
        """The session options used for every measurement (table and end to end)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return so

    def quantize(self, model: bytes, examples: np.ndarray) -> bytes:
        """Static INT8 (QDQ, `int8_scheme()`) of an fp32 ONNX model, calibrated (MinMax) on `examples`."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        scheme = self.scheme
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        with tempfile.TemporaryDirectory(prefix="hant-int8-") as d:
            src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
            with open(src, "wb") as f:
                f.write(model)
            try:
                # Shape inference and graph clean-up first: without it the squeeze-excite
                # convolutions stay in float between Quantize/Dequantize pairs (measured here:
                # EfficientNet-B0 at batch 64 runs 2x slower than with it).
                from onnxruntime.quantization.shape_inference import quant_pre_process

                pre = os.path.join(d, "pre.onnx")
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
                    warnings.simplefilter("ignore")
                    quant_pre_process(src, pre)
                src = pre
            except Exception:  # an optimisation only: quantise the plain export without it
                pass
            with warnings.catch_warnings(), _quiet_root_logger():
                warnings.simplefilter("ignore")
                quantize_static(src, dst, _Reader("x", examples, self.batch_size), quant_format=QuantFormat.QDQ,
                                per_channel=scheme["per_channel"], reduce_range=scheme["reduce_range"],
                                activation_type=types[scheme["activations"]], weight_type=types[scheme["weights"]],
                                calibrate_method=CalibrationMethod.MinMax)
            with open(dst, "rb") as f:
                return f.read()

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        import onnxruntime as ort

        x = self.input(input_shape)
        model = export_onnx(module, x)
        if self.precision == "int8":
            if example_inputs is None:
                example_inputs = torch.randn((max(8, self.batch_size), *map(int, input_shape)),
                                             generator=torch.Generator().manual_seed(1))
            model = self.quantize(model, example_inputs.detach().float().cpu().numpy())
        session = ort.InferenceSession(model, self.session_options(), providers=["CPUExecutionProvider"])
        return _Session(session, x.numpy())

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().fingerprint(), "onnxruntime": ort.__version__, "opset": OPSET,
                "graph_optimization": "ORT_ENABLE_ALL", "spinning": self.spinning,
                **({"int8_scheme": self.scheme} if self.precision == "int8" else {})}
