"""Which INT8 scheme ONNX Runtime runs on this CPU: measured on the run's teacher, not assumed.

Whether unsigned or signed activations, 7-bit or full-range weights, or INT8 at all is
fastest depends on the CPU and the model (a ResNet student ran 2x faster in INT8 on a VNNI
machine; an EfficientNet-B0 export ran slower than fp32 in every scheme on an AVX2 one).
So the first INT8 latency table or INT8 export of a run on a machine applies every scheme
of `SCHEMES` to the teacher, deployed as the latency target deploys it (`prepare`: batch
norm folded at export, ONNX Runtime's full optimisation), and

- times them against the fp32 teacher, interleaved (the latency protocol, at the batch size
  and thread count asked for, one untimed call per turn as for every whole network);
- checks accuracy: top-1 on up to `ACCURACY_IMAGES` held-out images (the test split when
  the run holds none out), against the fp32 teacher's top-1 on the same images. A scheme
  keeps accuracy when it loses at most `MAX_TOP1_DROP` points. Without data (the run's
  data cannot be loaded) the labels are the fp32 teacher's own predictions on random
  inputs, so top-1 is agreement with fp32.

The fastest scheme that keeps accuracy is chosen; when none keeps it, the fastest of those
within the same margin of the most accurate scheme. When the chosen scheme is not faster
than fp32 the record says so (INT8 is still produced when asked for). The record,
RUN/latency/int8_scheme-b<B>-t<T>.json (batch size B, T threads: the choice can differ
between thread counts, and a table and an export timed at different ones must not
overwrite each other's), is reused while its fingerprint (CPU model, VNNI, ONNX Runtime
version, threads, batch size, candidate schemes) matches the machine at hand, and measured
again when it does not. The INT8 latency table and the INT8 export at the same batch size
and threads take their scheme from it, so they agree.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hant.errors import HantError
from hant.latency.base import cpu_model, get_target
from hant.latency.onnxruntime_cpu import SCHEMES, cpu_has_vnni
from hant.latency.protocol import Protocol, measure
from hant.onnx_io import export_onnx
from hant.workspace import RunDir, read_json, write_json

__all__ = ["SCHEME_VERSION", "MAX_TOP1_DROP", "compare_schemes", "choose_scheme", "scheme_fingerprint",
           "run_int8_scheme", "describe_scheme"]

SCHEME_VERSION = 1
MAX_TOP1_DROP = 1.0  # points of top-1 a scheme may lose against fp32 and still keep accuracy
ACCURACY_IMAGES = 500  # a few hundred: one image is 0.2 points, well under the threshold
CALIBRATION_IMAGES = 64


def scheme_fingerprint(batch_size: int, threads: int) -> dict[str, Any]:
    """What makes a scheme measurement valid here: CPU, VNNI, ONNX Runtime, threads, batch, candidates."""
    import onnxruntime as ort

    return {"cpu": cpu_model(), "vnni": cpu_has_vnni(), "onnxruntime": ort.__version__, "threads": int(threads),
            "batch_size": int(batch_size), "candidates": list(SCHEMES)}


def describe_scheme(scheme: Mapping[str, Any]) -> str:
    """One phrase for a scheme: `u8s8 (uint8 activations, int8 per-channel weights, full range)`."""
    per = " per-channel" if scheme.get("per_channel") else ""
    bits = "7-bit range" if scheme.get("reduce_range") else "full range"
    return f"{scheme.get('name')} ({scheme.get('activations')} activations, {scheme.get('weights')}{per} weights, {bits})"


def _predictions(runnable, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Top-1 class of each image, run `batch_size` at a time through a fixed-batch session."""
    name = next(iter(runnable.feed))
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:  # the deployed graph has a fixed batch: pad with the last image
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        logits = runnable.session.run(None, {name: chunk})[0]
        out.append(np.asarray(logits)[:n].reshape(n, -1).argmax(1))
    return np.concatenate(out)


def _stats(s) -> dict[str, Any]:
    return {"median_ms": s.median_ms, "p10_ms": s.p10_ms, "p90_ms": s.p90_ms, "n": s.n}


def choose_scheme(fp32: Mapping[str, Any], schemes: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """(name, one-line reason) of the scheme to deploy, from measured results.

    `fp32` has median_ms and top1; each of `schemes` has median_ms, top1 and
    keeps_accuracy, or an "error" (it could not be applied). The fastest scheme that keeps
    accuracy wins; when none does, the fastest of those within MAX_TOP1_DROP of the most
    accurate scheme. Raises HantError when no scheme could be applied.
    """
    ok = {n: r for n, r in schemes.items() if r.get("median_ms") is not None}
    if not ok:
        errors = "; ".join(f"{n}: {r.get('error')}" for n, r in schemes.items())
        raise HantError(f"no INT8 scheme could be applied to the teacher ({errors[:300]}); use an fp32 target")
    keep = [n for n, r in ok.items() if r["keeps_accuracy"]]
    if keep:
        name = min(keep, key=lambda n: ok[n]["median_ms"])
        why = (f"fastest of {len(keep)} scheme(s) that keep accuracy (top-1 at most {MAX_TOP1_DROP:g} point "
               "below fp32's)")
    else:
        # Measured against the best INT8 top-1 instead: a slightly more accurate scheme
        # should not win at any cost in speed when neither is close to fp32.
        best = max(ok[n]["top1"] for n in ok)
        near = [n for n in ok if ok[n]["top1"] >= best - MAX_TOP1_DROP - 1e-9]
        name = min(near, key=lambda n: (ok[n]["median_ms"], -ok[n]["top1"]))
        why = (f"no scheme keeps top-1 within {MAX_TOP1_DROP:g} point of fp32's; the fastest within "
               f"{MAX_TOP1_DROP:g} point of the most accurate")
    r = ok[name]
    why += (f": {r['median_ms']:.3f} ms against fp32 {fp32['median_ms']:.3f} ms, "
            f"top-1 {r['top1']:.1f}% against {fp32['top1']:.1f}%")
    return name, why


def compare_schemes(teacher: nn.Module, input_shape: Sequence[int], calibration: np.ndarray,
                    images: np.ndarray, labels: np.ndarray | None, batch_size: int, threads: int | None,
                    protocol: Protocol = Protocol(), names: Sequence[str] | None = None) -> dict[str, Any]:
    """Apply each INT8 scheme to `teacher`, time it against fp32 and check its accuracy.

    `input_shape` is per image (C, H, W); `calibration` (N, C, H, W) calibrates the
    quantiser; `images` (M, C, H, W) with `labels` (M,) measure top-1 (labels None: the
    fp32 teacher's predictions stand in). Timing is the latency protocol on ONNX Runtime's
    CPU target at `batch_size` and `threads`, every network interleaved with the others.
    Returns {"fp32": {median_ms, p10_ms, p90_ms, n, top1}, "schemes": {name: {"scheme",
    median_ms, p10_ms, p90_ms, n, speedup, top1, top1_drop, agreement, keeps_accuracy} or
    {"scheme", "error"}}, "chosen", "scheme", "reason", "faster_than_fp32"}. Raises
    HantError when no scheme can be applied.
    """
    fp32_target = get_target("onnxruntime-cpu", batch_size=batch_size, threads=threads)
    x = fp32_target.input(input_shape)
    model = export_onnx(teacher, input_shape, batch_size=fp32_target.batch_size)
    runnables = {"fp32": fp32_target.session(model, x.numpy())}
    results: dict[str, dict[str, Any]] = {}
    for name in names or list(SCHEMES):
        target = get_target("onnxruntime-cpu-int8", batch_size=batch_size, threads=fp32_target.threads, scheme=name)
        try:
            # Every calibration image, as the export calibrates on all of its own.
            runnables[name] = target.session(target.quantize(model, calibration, batches=None), x.numpy())
            results[name] = {"scheme": target.scheme}
        except Exception as e:  # one scheme the quantiser or runtime cannot take must not sink the others
            results[name] = {"scheme": target.scheme,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}

    ref = _predictions(runnables["fp32"], images, batch_size)
    truth = ref if labels is None else np.asarray(labels)
    fp32_top1 = 100.0 * float(np.mean(ref == truth))
    stats = measure(runnables, fp32_target, dataclasses.replace(protocol, turn_warmup=max(1, protocol.turn_warmup)))
    fp32 = {**_stats(stats["fp32"]), "top1": fp32_top1}
    for name, r in results.items():
        if "error" in r:
            continue
        pred = _predictions(runnables[name], images, batch_size)
        top1 = 100.0 * float(np.mean(pred == truth))
        s = stats[name]
        r.update(_stats(s), speedup=fp32["median_ms"] / s.median_ms if s.median_ms else None, top1=top1,
                 top1_drop=fp32_top1 - top1, agreement=100.0 * float(np.mean(pred == ref)),
                 keeps_accuracy=bool(fp32_top1 - top1 <= MAX_TOP1_DROP + 1e-9))
    chosen, reason = choose_scheme(fp32, results)
    return {"fp32": fp32, "schemes": results, "chosen": chosen, "scheme": results[chosen]["scheme"],
            "reason": reason, "faster_than_fp32": results[chosen]["median_ms"] < fp32["median_ms"]}


def _run_inputs(cfg, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(calibration images, accuracy images, their labels or None, a description) for a run."""
    try:
        from hant.data import load_data

        splits = load_data(cfg.data)
        held, split = (splits.heldout, "heldout") if len(splits.heldout) else (splits.test, "test")
        n_cal, n_acc = min(CALIBRATION_IMAGES, len(splits.train)), min(ACCURACY_IMAGES, len(held))
        if n_cal == 0 or n_acc == 0:
            raise HantError("the run's data has no train or held-out images")
        cal = torch.stack([splits.train[i][0] for i in range(n_cal)]).float().numpy()
        items = [held[i] for i in range(n_acc)]
        images = torch.stack([img for img, _ in items]).float().numpy()
        labels = np.array([int(y) for _, y in items])
        return cal, images, labels, {"images": n_acc, "split": split, "labels": "dataset",
                                     "calibration_images": n_cal}
    except Exception as e:  # without data the check falls back to agreement with fp32 on random inputs
        g = torch.Generator().manual_seed(1)
        cal = torch.randn((CALIBRATION_IMAGES, *input_shape), generator=g).numpy()
        images = torch.randn((100, *input_shape), generator=g).numpy()
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return cal, images, None, {"images": 100, "split": f"random-normal ({why})", "labels": "fp32 predictions",
                                   "calibration_images": CALIBRATION_IMAGES}


def run_int8_scheme(run: str | Path, batch_size: int, threads: int | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """The INT8 scheme of `run` on this machine at `batch_size` and `threads` (None: every core).

    Reads RUN/latency/int8_scheme-b<B>-t<T>.json when its fingerprint matches this machine;
    otherwise measures every scheme on the run's teacher (`compare_schemes`) and writes the
    record atomically. The caller holds the run's lock. Returns the record: version,
    fingerprint, accuracy (how it was checked), fp32, schemes, chosen, scheme (the chosen
    scheme's settings), reason (one line), faster_than_fp32, measured_at, time_s. Raises
    HantError when the run has no config or no scheme can be applied to its teacher.
    """
    from hant.config import RunConfig
    from hant.teacher import load_teacher

    rd = RunDir(run)
    threads = get_target("onnxruntime-cpu", batch_size=batch_size, threads=threads).threads
    path = rd.int8_scheme(batch_size, threads)
    fingerprint = scheme_fingerprint(batch_size, threads)
    if path.exists():
        try:
            old = read_json(path)
        except HantError:
            old = {}
        if (old.get("version") == SCHEME_VERSION and old.get("fingerprint") == fingerprint
                and old.get("chosen") in SCHEMES):
            return old
        changed = [k for k in fingerprint if (old.get("fingerprint") or {}).get(k) != fingerprint[k]]
        log(f"int8 scheme b{batch_size}: {path.name} was measured elsewhere or is unreadable "
            f"({', '.join(changed) or 'format'} differ); measuring again")

    t0 = time.perf_counter()
    cfg = RunConfig.load(rd.require(rd.config, "init"))
    c = cfg.model
    teacher = load_teacher(c.source, cfg.data.in_chans, cfg.data.num_classes, c.checkpoint, c.trust_pickle).eval()
    shape = (int(cfg.data.in_chans), cfg.data.input_size, cfg.data.input_size)
    cal, images, labels, accuracy = _run_inputs(cfg, shape)
    log(f"int8 scheme b{batch_size}: trying {', '.join(SCHEMES)} on the teacher ({threads} thread(s), "
        f"accuracy on {accuracy['images']} {accuracy['split']} images)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        found = compare_schemes(teacher, shape, cal, images, labels, batch_size, threads,
                                Protocol.from_config(cfg.latency, seed=cfg.seed))
    record = {
        "version": SCHEME_VERSION, "fingerprint": fingerprint,
        "accuracy": {**accuracy, "max_top1_drop": MAX_TOP1_DROP,
                     "rule": f"keeps accuracy: top-1 at most {MAX_TOP1_DROP:g} point below fp32's on the same images"},
        **found,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "time_s": round(time.perf_counter() - t0, 1),
    }
    write_json(path, record)
    parts = [f"fp32 {found['fp32']['median_ms']:.3f} ms top-1 {found['fp32']['top1']:.1f}%"]
    parts += [f"{n} {r['median_ms']:.3f} ms top-1 {r['top1']:.1f}%" if "error" not in r else f"{n} failed"
              for n, r in found["schemes"].items()]
    log(f"int8 scheme b{batch_size}: {'; '.join(parts)} -> {found['chosen']} ({path})")
    if not found["faster_than_fp32"]:
        r = found["schemes"][found["chosen"]]
        log(f"int8 scheme b{batch_size}: INT8 is slower than fp32 on this CPU ({found['chosen']} {r['median_ms']:.3f} ms "
            f"against {found['fp32']['median_ms']:.3f} ms)")
    return record

