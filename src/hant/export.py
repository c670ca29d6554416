"""Export a fine-tuned student: ONNX (checked against PyTorch), optionally static INT8.

The ONNX graph is exported by `hant.onnx_io.export_onnx`, the exporter the latency targets
use, with a dynamic batch axis: in eval mode with constant folding, which folds every
BatchNorm into the convolution before it; ONNX Runtime then fuses further at load time
(conv + activation into FusedConv, and so on). What was folded and fused is read off the
graphs themselves: the exported graph's node types against those of the graph ONNX
Runtime saves after optimising it. INT8 is ONNX Runtime's static quantiser in QDQ format
(`hant.latency.onnxruntime_cpu.quantize_onnx`, the same one the INT8 latency table uses),
calibrated on train images, in the scheme measured for this machine on the run's teacher
(`hant.latency.int8`: the same record the INT8 table takes its scheme from), with the
calibration (MinMax or a percentile, `CALIBRATIONS`) whose predictions agree most with the
fp32 model's on held-out images; its accuracy is
measured on the test split with ONNX Runtime, and its latency in the same interleaved run
as the fp32 student and the teacher.

The architecture JSON and the safetensors weights are written by fine-tuning
(`hant.finetune`, through `hant.student.save_student`); this module adds model.onnx, model.int8.onnx and the
"onnx" / "int8" sections of eval.json.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from hant.errors import HantError
from hant.latency.onnxruntime_cpu import int8_scheme, quantize_onnx  # one quantiser for table and export
from hant.onnx_io import OPSET, export_onnx  # one exporter for table and export
from hant.workspace import RunDir, atomic_write_bytes


__all__ = ["export", "check_onnx", "quantize_int8", "calibration_check", "onnx_predictions", "int8_scheme",
           "onnx_top1", "ort_fusions", "op_counts"]

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# ONNX Runtime and PyTorch sum in different orders, and BN folding changes the arithmetic:
# differences around 1e-5 of the logits' scale are normal; 1e-3 of it means a wrong graph.
REL_TOLERANCE = 1e-3


def op_counts(model: bytes | str | os.PathLike) -> Counter:
    """Node op types of an ONNX model (with the domain for non-standard ops, e.g. com.microsoft.FusedConv)."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in proto.graph.node)


def _session_options(threads: int | None = None, optimized_path: str | None = None, level: str | None = None):
    import onnxruntime as ort

    from hant.latency import get_target

    # The latency targets' settings, so that what is reported is what was timed.
    so = get_target("onnxruntime-cpu", threads=threads).session_options()
    if level is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    return so


def _session(model: bytes | str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, _session_options(threads), providers=["CPUExecutionProvider"])


def _optimized_ops(model: bytes | str | os.PathLike, level: str, threads: int | None) -> Counter:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="hant-ort-") as d:
        opt = os.path.join(d, "optimized.onnx")
        src = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(src, _session_options(threads, opt, level), providers=["CPUExecutionProvider"])
        return op_counts(opt)


def ort_fusions(model: bytes | str | os.PathLike, threads: int | None = None) -> dict[str, Any]:
    """What ONNX Runtime does to the graph at load time.

    Returns {"exported_ops": {type: n}; "fused_ops": {type: n}, the node types that appear
    only after ORT's graph fusions (ORT_ENABLE_EXTENDED, e.g. com.microsoft.FusedConv);
    "removed_ops": {type: n}, how many nodes of each exported type those fusions absorbed;
    "runtime_ops": {type: n}, the graph that actually runs in the latency measurements
    (ORT_ENABLE_ALL, which adds the CPU's blocked NCHWc layout)}.
    """
    before = op_counts(model)
    fused = _optimized_ops(model, "ORT_ENABLE_EXTENDED", threads)
    runtime = _optimized_ops(model, "ORT_ENABLE_ALL", threads)
    return {
        "exported_ops": dict(sorted(before.items())),
        "fused_ops": {k: v for k, v in sorted(fused.items()) if k not in before},
        "removed_ops": {k: before[k] - fused.get(k, 0) for k in sorted(before) if before[k] > fused.get(k, 0)},
        "runtime_ops": dict(sorted(runtime.items())),
    }


def check_onnx(model: bytes | str | os.PathLike, torch_model: nn.Module, x: torch.Tensor,
               rel_tolerance: float = REL_TOLERANCE) -> float:
    """Run `x` through the ONNX model in ONNX Runtime and through `torch_model`; return the max abs diff.

    Raises HantError when it exceeds `rel_tolerance` times the largest PyTorch output (at least 1).
    """
    with torch.no_grad():
        ref = torch_model.eval()(x).float().numpy()
    got = _session(model).run(None, {INPUT_NAME: x.numpy().astype(np.float32)})[0]
    if got.shape != ref.shape:
        raise HantError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}; the export is wrong")
    diff = float(np.max(np.abs(got - ref)))
    tol = rel_tolerance * max(1.0, float(np.max(np.abs(ref))))
    if not diff <= tol:
        raise HantError(f"ONNX Runtime's output differs from PyTorch's by {diff:.3g} (tolerance {tol:.3g}); "
                        "the exported graph does not compute the student")
    return diff


def _batches(dataset, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from hant.data import make_loader

    seen = 0
    for x, y in make_loader(dataset, batch_size):
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            x, y = x[: limit - seen], y[: limit - seen]
        seen += len(y)
        yield x.numpy().astype(np.float32), y.numpy()


def onnx_predictions(model: bytes | str | os.PathLike, dataset, batch_size: int = 256, threads: int | None = None,
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(predicted classes, labels) of an ONNX classifier on the first `limit` images of `dataset`."""
    sess = _session(model, threads)
    preds, labels = [], []
    for x, y in _batches(dataset, batch_size, limit):
        preds.append(sess.run(None, {INPUT_NAME: x})[0].argmax(1))
        labels.append(y)
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(preds), np.concatenate(labels)


def onnx_top1(model: bytes | str | os.PathLike, dataset, batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 accuracy (percent) of an ONNX classifier on `dataset`, run in ONNX Runtime."""
    pred, y = onnx_predictions(model, dataset, batch_size, threads)
    if len(y) == 0:
        raise HantError("the test split is empty; nothing to evaluate")
    return 100.0 * float(np.mean(pred == y))


CHECK_IMAGES = 500  # held-out images that choose the calibration: one image is 0.2 points


def quantize_int8(fp32: str | os.PathLike, out: str | os.PathLike, calibration, images: int = 256,
                  scheme: str | dict[str, Any] | None = None, check=None, check_images: int = CHECK_IMAGES,
                  threads: int | None = None) -> dict[str, Any]:
    """Static INT8 (QDQ) of the ONNX file `fp32` into `out`, with the latency target's quantiser.

    `calibration` is a dataset of (image, label); its first `images` images calibrate, 32 at
    a time. `scheme` is a name of `hant.latency.onnxruntime_cpu.SCHEMES` or a scheme dict;
    None is the guess for this CPU (`export` passes the run's measured one). With `check`
    (a dataset of held-out images, not the test split) every calibration of CALIBRATIONS is
    applied, and the one whose predictions agree most with the fp32 model's on the first
    `check_images` of them is kept (a tie keeps the earlier one, MinMax); without it, the
    scheme's own calibration. Writes `out` atomically. Returns {"file", "calibration" (its
    name), "calibrations": {name: {"agreement", "top1"}} (empty without `check`),
    "check_images"}. Raises HantError when quantisation fails.
    """
    from hant.latency.onnxruntime_cpu import CALIBRATIONS, _scheme

    examples = np.concatenate([x for x, _ in _batches(calibration, 32, limit=images)])
    model = Path(fp32).read_bytes()
    scheme = _scheme(scheme)
    ref, labels = onnx_predictions(model, check, threads=threads, limit=check_images) if check is not None else ([], [])
    names = list(CALIBRATIONS) if len(ref) else [scheme.get("calibration") or "MinMax"]
    made: dict[str, tuple[float, bytes]] = {}
    tried: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            data = quantize_onnx(model, examples, {**scheme, "calibration": name}, batch_size=32, batches=None)
        except Exception as e:
            raise HantError(f"INT8 quantisation failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); export without --int8") from e
        agreement = 0.0
        if len(ref):
            pred, _ = onnx_predictions(data, check, threads=threads, limit=check_images)
            agreement = 100.0 * float(np.mean(pred == ref))
            tried[name] = {"agreement": agreement, "top1": 100.0 * float(np.mean(pred == labels))}
        made[name] = (agreement, data)
    kept = max(made, key=lambda n: made[n][0])  # the first of equals: MinMax on a tie
    return {"file": atomic_write_bytes(out, made[kept][1]), "calibration": kept, "calibrations": tried,
            "check_images": len(ref)}


def calibration_check(splits, n_cal: int):
    """(images that choose the INT8 calibration, their split's name): the held-out split, or
    train images past the calibration ones when the run holds none out; (None, "none") when
    neither has any."""
    from torch.utils.data import Subset

    if len(splits.heldout):
        return splits.heldout, "heldout"
    if len(splits.train) > n_cal:
        return Subset(splits.train, range(n_cal, min(len(splits.train), n_cal + CHECK_IMAGES))), "train (uncalibrated)"
    return None, "none"


class _OrtRunnable:
    """One ONNX Runtime session and a fixed input: the latency protocol's runnable."""

    def __init__(self, model: bytes | str | os.PathLike, x: np.ndarray, threads: int | None):
        self.session = _session(model, threads)
        self.feed = {INPUT_NAME: x}

    def run(self) -> None:
        self.session.run(None, self.feed)


def export(run: str | os.PathLike, plan: str, int8: bool = False, calib_images: int = 256,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export RUN/students/<plan>/ to model.onnx (and model.int8.onnx with `int8`).

    The ONNX model is checked against PyTorch on test images in ONNX Runtime (HantError
    beyond tolerance), evaluated on the test split, and timed with the teacher (and the
    INT8 model) in one interleaved run with the latency protocol on ONNX Runtime's CPU
    settings at the plan's batch size. Merges "onnx" (and "int8") sections into eval.json:
    top1, latency_ms, latency_p10_ms, latency_p90_ms, speedup over the teacher with its
    interval (speedup_ci_lo, speedup_ci_hi), max_abs_diff, batchnorm_nodes (left in the
    export: 0 when folded), fused_ops and removed_ops (what ONNX Runtime fused), file;
    "int8" also has calibration (the one kept), calibrations (each one's agreement with fp32
    and top-1 on the held-out images of calibration_check), scheme, scheme_reason,
    scheme_faster_than_fp32 and scheme_file (the scheme measured for this machine,
    `hant.latency.int8.run_int8_scheme`, measured first when the run has none for it).
    Returns {"onnx": {...}, "int8": {...} or None}. Raises HantError when the student has
    not been fine-tuned, the export fails or does not match.
    """
    from hant.workspace import run_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return {"onnx": None, "int8": None}  # under torchrun, rank 0 alone exports and times
    with run_lock(RunDir(run).root, log=log):
        return _export(run, plan, int8, calib_images, log)


def _quantise(run, plan: str, student: nn.Module, onnx_path: Path, int8_path: Path, splits, x_check: torch.Tensor,
              fp32_top1: float, batch_size: int, threads: int | None, calib_images: int, log) -> dict[str, Any]:
    """Static INT8 of the exported student in the scheme chosen on this CPU; its eval.json
    `int8` section, without timings (see `export`)."""
    from hant.latency.int8 import MAX_TOP1_DROP, describe_scheme, run_int8_scheme

    rd = RunDir(run)
    n_cal = min(calib_images, len(splits.train))
    choice = run_int8_scheme(run, batch_size, threads, log=log)
    scheme, scheme_path = choice["scheme"], rd.int8_scheme(batch_size, choice["fingerprint"]["threads"])
    check, check_split = calibration_check(splits, n_cal)
    log(f"export {plan}: static INT8 in scheme {describe_scheme(scheme)}, calibrated on {n_cal} train images; "
        f"chosen on this CPU for the teacher at batch {batch_size}: {choice['reason']}")
    if not choice["faster_than_fp32"]:
        log(f"export {plan}: INT8 is slower than fp32 on this CPU (see {scheme_path}); "
            "exporting it as asked")
    q = quantize_int8(onnx_path, int8_path, splits.train, images=n_cal, scheme=scheme, check=check,
                      threads=threads)
    if q["calibrations"]:
        log(f"export {plan}: INT8 calibration {q['calibration']}, agreement with fp32 on {q['check_images']} "
            f"{check_split} images: " + ", ".join(f"{n} {r['agreement']:.1f}%" for n, r in q["calibrations"].items()))
    with torch.no_grad():
        ref = student(x_check).numpy()
    got = _session(int8_path, threads).run(None, {INPUT_NAME: x_check.numpy()})[0]
    qf = ort_fusions(int8_path, threads)
    int8_sec = {
        "file": INT8_FILE, "calibration_images": n_cal, "calibration": q["calibration"],
        "calibrations": q["calibrations"], "calibration_check": {"images": q["check_images"], "split": check_split},
        "scheme": scheme, "scheme_reason": choice["reason"],
        "scheme_faster_than_fp32": choice["faster_than_fp32"],
        "scheme_file": str(scheme_path.relative_to(rd.root)),
        "max_abs_diff": float(np.max(np.abs(got - ref))),
        "fused_ops": qf["fused_ops"], "runtime_ops": qf["runtime_ops"],
        "top1": onnx_top1(int8_path, splits.test, threads=threads),
    }
    # The scheme was chosen on the teacher with few calibration images, and the calibration
    # on held-out agreement; the test split can still show a loss. Judge it by the scheme's rule.
    int8_sec["accuracy_kept"] = bool(int8_sec["top1"] >= fp32_top1 - MAX_TOP1_DROP)
    if not int8_sec["accuracy_kept"]:
        log(f"warning: export {plan}: the INT8 model's test top-1 {int8_sec['top1']:.2f}% is "
            f"{fp32_top1 - int8_sec['top1']:.1f} points below the fp32 model's {fp32_top1:.2f}% "
            f"(at most {MAX_TOP1_DROP:g} keeps accuracy); deploy {ONNX_FILE}, not {INT8_FILE}")
    return int8_sec


def _export(run, plan: str, int8: bool, calib_images: int, log) -> dict[str, Any]:
    from hant.data import load_data
    from hant.latency import get_target
    from hant.latency.compare import resolve_target, time_against_teacher
    from hant.latency.protocol import Protocol
    from hant.run import Run
    from hant.student import ARCH_FILE, STUDENT_FILE, load_student, read_plan, update_eval

    the_run = Run(run)
    rd = the_run.dir
    cfg = the_run.config
    out = rd.student_dir(plan)
    plan_d = read_plan(run, plan)
    if not (out / ARCH_FILE).exists() or not (out / STUDENT_FILE).exists():
        raise HantError(f"no fine-tuned student in {out}; run `hant finetune --run {run} --plan {plan}` first")
    student = load_student(out)
    in_shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    target_id, batch_size, threads = resolve_target(run, plan_d)
    if not target_id.startswith("onnxruntime"):
        threads = None  # timing on another runtime's thread setting would not mean anything here

    onnx_path = out / ONNX_FILE
    data = export_onnx(student, in_shape, onnx_path, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    exported = op_counts(data)
    splits = load_data(cfg.data)
    n_check = min(len(splits.test), 16)
    x_check = torch.stack([splits.test[i][0] for i in range(n_check)])
    diff = check_onnx(data, student, x_check)
    fusions = ort_fusions(data, threads)
    log(f"export {plan}: {onnx_path} (opset {OPSET}); max |ONNX - PyTorch| = {diff:.2e}; "
        f"BatchNormalization nodes in export: {exported.get('BatchNormalization', 0)}; "
        f"ONNX Runtime fused: {', '.join(f'{k} x{v}' for k, v in fusions['fused_ops'].items()) or 'nothing'}")
    onnx_sec: dict[str, Any] = {
        "file": ONNX_FILE, "opset": OPSET, "max_abs_diff": diff, "checked_images": n_check,
        "batchnorm_nodes": exported.get("BatchNormalization", 0),
        "fused_ops": fusions["fused_ops"], "removed_ops": fusions["removed_ops"],
        "exported_ops": fusions["exported_ops"], "runtime_ops": fusions["runtime_ops"],
        "top1": onnx_top1(data, splits.test, threads=threads),
    }

    int8_path = out / INT8_FILE
    int8_sec = _quantise(run, plan, student, onnx_path, int8_path, splits, x_check, onnx_sec["top1"],
                         batch_size, threads, calib_images, log) if int8 else None

    # Teacher, fp32 student and INT8 student timed together, so their ratios share the machine's state.
    target = get_target("onnxruntime-cpu", batch_size=batch_size, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch_size, *in_shape)).astype(np.float32)
    files = {"onnx": _OrtRunnable(data, x, target.threads)}
    if int8:
        files["int8"] = _OrtRunnable(int8_path, x, target.threads)
    log(f"export {plan}: timing teacher, {', '.join(files)} on ONNX Runtime CPU (batch {batch_size}, "
        f"{target.threads} threads)")
    cmp = time_against_teacher(the_run.teacher(), files, target, in_shape, Protocol.from_config(cfg.latency))
    t_ms = cmp.teacher.median_ms

    def timing(key: str) -> dict[str, Any]:
        s, sp = cmp.stats[key], cmp.speedups[key]
        return {"latency_ms": s.median_ms, "latency_p10_ms": s.p10_ms, "latency_p90_ms": s.p90_ms,
                "latency_n": s.n, "teacher_latency_ms": t_ms, "speedup": sp.ratio if sp else None,
                "speedup_ci_lo": sp.lo if sp else None, "speedup_ci_hi": sp.hi if sp else None,
                "batch_size": batch_size, "threads": target.threads}

    onnx_sec.update(timing("onnx"))
    patch: dict[str, Any] = {"onnx": onnx_sec}
    if int8_sec is not None:
        int8_sec.update(timing("int8"))
        patch["int8"] = int8_sec
        log(f"export {plan}: INT8 test top-1 {int8_sec['top1']:.2f}% (fp32 {onnx_sec['top1']:.2f}%), "
            f"{int8_sec['latency_ms']:.3f} ms vs fp32 {onnx_sec['latency_ms']:.3f} ms, teacher {t_ms:.3f} ms")
    else:
        log(f"export {plan}: ONNX test top-1 {onnx_sec['top1']:.2f}%, {onnx_sec['latency_ms']:.3f} ms, "
            f"teacher {t_ms:.3f} ms")
    update_eval(out, patch)
    return {"onnx": onnx_sec, "int8": int8_sec}
