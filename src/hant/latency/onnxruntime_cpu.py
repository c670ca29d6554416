"""onnxruntime-cpu and onnxruntime-cpu-int8: ONNX Runtime on the CPU, every graph optimisation on.

The module is exported as the export stage exports a student (`hant.onnx_io.export_onnx`:
eval mode, batch norm folded), at the target's fixed batch size; ONNX Runtime then fuses
conv + activation at ORT_ENABLE_ALL. For INT8 the exported graph is pre-processed and statically quantised to QDQ form with ONNX
Runtime's quantiser (`quantize_onnx`, the one INT8 quantiser of hant: the export uses it
too), calibrated on the inputs given (real layer inputs when the run has data). Which
scheme (`SCHEMES`: signed or unsigned activations, 7-bit or full-range weights) is fastest
depends on the CPU and the model, so a run measures it on the machine at hand
(hant.latency.int8); `int8_scheme()` without a name is only the guess used outside a run.

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
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import Target
from hant.onnx_io import OPSET, export_onnx

__all__ = ["OnnxRuntimeCPU", "SCHEMES", "CALIBRATIONS", "int8_scheme", "quantize_onnx", "cpu_has_vnni"]


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
    """Calibration batches for the quantiser: `examples` regrouped to the batch size.

    At most `batches` batches (None: every full batch); fewer examples than one batch are tiled.
    """

    def __init__(self, name: str, examples: np.ndarray, batch_size: int, batches: int | None = 8):
        reps = -(-batch_size // examples.shape[0])
        pool = np.concatenate([examples] * reps, axis=0) if reps > 1 else examples
        count = max(1, pool.shape[0] // batch_size)
        count = min(count, batches) if batches else count
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


# The candidate INT8 schemes, by name. ONNX Runtime's x86 kernels are built for unsigned
# activations times signed weights; without VNNI the AVX2 multiply can saturate, which
# 7-bit weights (`reduce_range`) avoid at some cost in accuracy; signed activations (S8S8,
# asymmetric) are ONNX Runtime's default and the usual choice on ARM. Which is fastest, or
# whether INT8 beats fp32 at all, was seen to depend on the CPU and the model, so a run
# measures them (hant.latency.int8) instead of assuming one.
SCHEMES: dict[str, dict[str, Any]] = {
    "u8s8-7bit": {"activations": "uint8", "weights": "int8", "reduce_range": True},
    "u8s8": {"activations": "uint8", "weights": "int8", "reduce_range": False},
    "s8s8": {"activations": "int8", "weights": "int8", "reduce_range": False},
}


# How the quantiser reads each activation's range off the calibration images, by name.
# MinMax keeps every value seen. A few images whose activations run 100x past the rest (6 of
# 256 Fashion-MNIST train images did so in an EfficientNet-B0 teacher) then stretch the ranges
# of the late layers until ordinary images quantise to nothing: that teacher fell from 92.6%
# to 18% top-1. The 99.9th percentile of each tensor's histogram clips such images (92.4%);
# the same teacher trained on needed the 99.5th (agreement with fp32 14% MinMax, 74% at
# 99.9, 98% at 99.5). Clipping costs some accuracy where no image is extreme, so the export
# measures which one keeps a model's predictions (hant.export.quantize_int8). Timing does not depend on the ranges, so the
# latency table calibrates with MinMax, the cheapest.
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "MinMax": {"method": "MinMax", "options": {}},
    "Percentile99.9": {"method": "Percentile", "options": {"CalibPercentile": 99.9}},
    "Percentile99.5": {"method": "Percentile", "options": {"CalibPercentile": 99.5}},
    "Percentile99": {"method": "Percentile", "options": {"CalibPercentile": 99.0}},
}


def int8_scheme(name: str | None = None) -> dict[str, Any]:
    """The INT8 scheme `name` (a key of SCHEMES) as the quantiser's settings.

    Returns {"name", "activations", "weights", "per_channel", "reduce_range", "format",
    "calibration"} (a key of CALIBRATIONS, MinMax). Without a name, the guess for this CPU where nothing was measured
    (a target used outside a run): full-range weights with VNNI, 7-bit without, as ONNX
    Runtime advises. Raises HantError for an unknown name.
    """
    if name is None:
        name = "u8s8" if cpu_has_vnni() else "u8s8-7bit"
    if name not in SCHEMES:
        raise HantError(f"unknown INT8 scheme {name!r}; known schemes: {', '.join(SCHEMES)}")
    return {"name": name, **SCHEMES[name], "per_channel": True, "format": "QDQ", "calibration": "MinMax"}


def _scheme(scheme: str | Mapping[str, Any] | None) -> dict[str, Any]:
    # A name, a full or partial scheme dict, or None (the guess for this CPU).
    if scheme is None or isinstance(scheme, str):
        return int8_scheme(scheme)
    name = scheme.get("name")
    base = int8_scheme(name if name in SCHEMES else None)
    return {**base, **scheme, "name": name or "custom"}


def _input_name(model: bytes) -> str:
    import onnx

    proto = onnx.load_from_string(model)
    weights = {t.name for t in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in weights)


def quantize_onnx(model: bytes, examples: np.ndarray, scheme: str | Mapping[str, Any] | None = None,
                  batch_size: int = 1, batches: int | None = 8) -> bytes:
    """Static INT8 (QDQ) of an fp32 ONNX model: hant's one INT8 quantiser.

    `examples` (N, C, H, W) calibrate, fed `batch_size` at a time, at most `batches`
    batches (None: all), with the scheme's "calibration" (a key of CALIBRATIONS); `scheme`
    is a name of SCHEMES, a scheme dict (`int8_scheme()`), or None for the guess for this
    CPU. ONNX Runtime's pre-processing
    (shape inference, graph clean-up) runs first. Returns the quantised model's bytes;
    lets the quantiser's exceptions through (callers decide what a failure means).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    scheme = _scheme(scheme)
    calibration = CALIBRATIONS.get(scheme.get("calibration") or "MinMax")
    if calibration is None:
        raise HantError(f"unknown INT8 calibration {scheme['calibration']!r}; known: {', '.join(CALIBRATIONS)}")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    reader = _Reader(_input_name(model), examples, batch_size, batches)
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
        # The histogram calibrators print their progress; the caller logs what matters.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
            warnings.simplefilter("ignore")
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ,
                            per_channel=scheme["per_channel"], reduce_range=scheme["reduce_range"],
                            activation_type=types[scheme["activations"]], weight_type=types[scheme["weights"]],
                            calibrate_method=getattr(CalibrationMethod, calibration["method"]),
                            extra_options=dict(calibration["options"]))
        with open(dst, "rb") as f:
            return f.read()


class OnnxRuntimeCPU(Target):
    """ONNX Runtime's CPU execution provider; `precision` "fp32" or "int8" (static QDQ).

    `scheme` (INT8 only): a name of SCHEMES or a scheme dict; None is the guess for this
    CPU. The latency stage passes the scheme measured for the run (hant.latency.int8).
    """

    id = "onnxruntime-cpu"

    def __init__(self, batch_size: int = 1, threads: int | None = None, precision: str = "fp32",
                 spinning: bool = False, scheme: str | Mapping[str, Any] | None = None, clock: str = "auto"):
        super().__init__(batch_size, threads, clock)
        if precision not in ("fp32", "int8"):
            raise HantError(f"onnxruntime-cpu precision must be fp32 or int8, got {precision!r}")
        import onnxruntime  # noqa: F401  (fail here, with the id in the message, if missing)

        self.precision, self.spinning = precision, spinning
        self.scheme = _scheme(scheme)

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

    def quantize(self, model: bytes, examples: np.ndarray, batches: int | None = 8) -> bytes:
        """Static INT8 of an fp32 ONNX model in this target's scheme, calibrated on `examples`
        (at most `batches` batches of the target's batch size; None: all)."""
        return quantize_onnx(model, examples, self.scheme, self.batch_size, batches)

    def session(self, model: bytes, x: np.ndarray):
        """A runnable of the ONNX `model` on this target's settings, its input fixed to `x`."""
        import onnxruntime as ort

        session = ort.InferenceSession(model, self.session_options(), providers=["CPUExecutionProvider"])
        return _Session(session, x)

    def prepare(self, module: nn.Module, input_shape: Sequence[int], example_inputs: torch.Tensor | None = None):
        x = self.input(input_shape)
        model = export_onnx(module, input_shape, batch_size=self.batch_size)
        if self.precision == "int8":
            if example_inputs is None:
                example_inputs = torch.randn((max(8, self.batch_size), *map(int, input_shape)),
                                             generator=torch.Generator().manual_seed(1))
            model = self.quantize(model, example_inputs.detach().float().cpu().numpy())
        return self.session(model, x.numpy())

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().fingerprint(), "onnxruntime": ort.__version__, "opset": OPSET,
                "graph_optimization": "ORT_ENABLE_ALL", "spinning": self.spinning,
                **({"int8_scheme": self.scheme} if self.precision == "int8" else {})}
