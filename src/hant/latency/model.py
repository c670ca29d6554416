"""The latency model: predict a network's latency from a run's latency table.

Model. A network's latency is the fixed part plus, for every replaceable layer, the
entry of the candidate chosen there:

    predicted = fixed_ms + sum_l entry(l, spec_l)        (then a fitted calibration, if any)

Calibration. The table's validation (`hant.latency.table.validate_table`) times networks
end to end and may keep a calibration fitted on them (an offset, a scale on the entries,
or a linear map; `_fit`), chosen by leave-one-out error (`_choose_calibration`). Every
calibration is affine, so `entry_costs` gives the calibrated table in additive form, as
the integer program of the selection needs it.

File naming. `RUN/latency/<target>.json` for batch size 1 and
`RUN/latency/<target>-b<B>.json` otherwise, so `--target onnxruntime-cpu` names the
batch-1 table and `--target onnxruntime-cpu-b64` the other; `load_table` also accepts a
target id with `batch_size`, or a target id alone when only one table exists for it.

The table is measured by `hant.latency.table`; this module only reads it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hant.errors import HantError
from hant.workspace import RunDir, read_json

__all__ = ["table_id", "table_path", "load_table", "predict_ms", "entry_costs", "CALIBRATIONS"]


# ---------------------------------------------------------------------------------------------
# Naming and loading


def table_id(target: str, batch_size: int) -> str:
    """The table's name: the target id at batch size 1, else `<target>-b<batch_size>`."""
    return target if int(batch_size) == 1 else f"{target}-b{int(batch_size)}"


def table_path(run: str | Path, target: str, batch_size: int) -> Path:
    """RUN/latency/<table_id>.json for a target id and batch size."""
    return RunDir(run).latency_table(table_id(target, batch_size))


def load_table(run: str | Path, target: str, batch_size: int | None = None) -> dict[str, Any]:
    """Read a latency table for the selection stage.

    `target` is a table id (`onnxruntime-cpu`, `onnxruntime-cpu-b64`) or a target id with
    `batch_size`; a target id alone also resolves when the run has exactly one table for
    it. The fingerprint is not checked here: a table measured on the target device may be
    used for selection anywhere. Raises HantError listing the run's tables when none matches.
    """
    folder = RunDir(run).root / "latency"
    if batch_size is not None:
        path = table_path(run, target, batch_size)
    else:
        path = folder / f"{target}.json"
        if not path.exists():
            others = sorted(folder.glob(f"{target}-b*.json"))
            others = [p for p in others if p.stem[len(target) + 2:].isdigit()]
            if len(others) == 1:
                path = others[0]
            elif len(others) > 1:
                names = ", ".join(p.stem for p in others)
                raise HantError(f"{folder} has several tables for {target} ({names}); name one, e.g. --target {others[0].stem}")
    if not path.exists():
        have = sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []
        hint = f"tables in this run: {', '.join(have)}" if have else "this run has no latency table yet"
        bs = batch_size or 1
        raise HantError(f"no latency table {path.name} ({hint}); measure it with "
                        f"`hant latency --run {run} --target {target} --batch-size {bs}`")
    table = read_json(path)
    if table.get("fixed_ms") is None:
        raise HantError(f"{path} is incomplete; finish it with `hant latency --run {run} --target "
                        f"{table.get('target', target)} --batch-size {table.get('batch_size', 1)}`")
    return table


def _lookup(table: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    return {(e["layer"], e["spec"]): float(e["median_ms"]) for e in table.get("entries", [])}


def predict_ms(table: Mapping[str, Any], plan_layers: Mapping[str, str], calibrated: bool = True) -> float:
    """Predicted latency (ms) of the network that puts `plan_layers[name]` at each layer.

    Layers missing from `plan_layers` keep the teacher's own layer. The fixed part plus
    the sum of entries, mapped through the table's calibration when it has one and
    `calibrated`. Raises HantError for a layer or candidate the table does not have.
    """
    if table.get("fixed_ms") is None:
        raise HantError("this latency table has no fixed part yet; rerun `hant latency` to finish it")
    lookup = _lookup(table)
    layers = list(table.get("layers") or dict.fromkeys(layer for layer, _ in lookup))
    unknown = [name for name in plan_layers if name not in layers]
    if unknown:
        raise HantError(f"layer {unknown[0]!r} is not in the latency table ({table.get('table_id')}); "
                        "the plan and the table come from different runs")
    total = 0.0
    for layer in layers:
        spec = plan_layers.get(layer, "teacher")
        if (layer, spec) not in lookup:
            raise HantError(f"the latency table has no entry for {layer}/{spec}; "
                            "rerun `hant latency` so that it measures what is missing")
        total += lookup[(layer, spec)]
    fixed_scale, a, b = _calibration_terms(table.get("calibration") if calibrated else None)
    return fixed_scale * float(table["fixed_ms"]) + a * total + b


def entry_costs(table: Mapping[str, Any], calibrated: bool = True) -> tuple[float, dict[tuple[str, str], float]]:
    """The table as additive costs for the selection: (fixed_ms, {(layer, spec): ms}).

    Every calibration is affine, predicted = fixed_scale * fixed + a * sum + b, so the
    costs are (fixed_scale * fixed + b, a * entry): `fixed + sum of the chosen costs`
    equals `predict_ms` exactly and an integer program over them stays linear. Raises
    HantError for a table without its fixed part.
    """
    if table.get("fixed_ms") is None:
        raise HantError("this latency table has no fixed part yet; rerun `hant latency` to finish it")
    fixed_scale, a, b = _calibration_terms(table.get("calibration") if calibrated else None)
    return fixed_scale * float(table["fixed_ms"]) + b, {key: a * ms for key, ms in _lookup(table).items()}


def _calibration_terms(cal: Mapping[str, Any] | None) -> tuple[float, float, float]:
    """(fixed_scale, a, b) of predicted = fixed_scale * fixed + a * sum_of_entries + b."""
    if not cal:
        return 1.0, 1.0, 0.0
    a = float(cal.get("a", 1.0))
    return float(cal.get("fixed_scale", a)), a, float(cal.get("b", 0.0))


# ---------------------------------------------------------------------------------------------
# Calibration: fitting and choosing it, and the errors it is judged by


def _pct_errors(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return np.abs(pred - meas) / np.maximum(meas, 1e-12) * 100.0


def _summary(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    from scipy.stats import kendalltau

    err = _pct_errors(pred, meas)
    tau = kendalltau(pred, meas).statistic if len(pred) > 1 else float("nan")
    return {"median_abs_pct_error": float(np.median(err)), "max_abs_pct_error": float(np.max(err)),
            "kendall_tau": None if tau is None or math.isnan(tau) else float(tau)}


CALIBRATIONS = ("offset", "scale", "linear")


def _fit(kind: str, fixed: float, sums: np.ndarray, meas: np.ndarray) -> tuple[float, float, float]:
    """(fixed_scale, a, b) of one calibration kind, least squares on (sum of entries, measured).

    offset: measured = fixed + sum + b (a cost per network the table misses);
    scale:  measured = fixed + a * sum (the entries, timed alone, are off by a factor; the
            directly measured fixed part is kept, so small networks stay anchored);
    linear: measured = a * (fixed + sum) + b.
    """
    pred = fixed + sums
    if kind == "offset":
        return 1.0, 1.0, float(np.mean(meas - pred))
    if kind == "scale":
        den = float(sums @ sums)
        return 1.0, (float(sums @ (meas - fixed)) / den if den > 0 else 1.0), 0.0
    if len(pred) < 2 or np.ptp(pred) <= 0:
        return 1.0, 1.0, float(np.mean(meas - pred))
    a, b = np.polyfit(pred, meas, 1)
    return float(a), float(a), float(b)


def _leave_one_out(kind: str, fixed: float, sums: np.ndarray, meas: np.ndarray) -> np.ndarray:
    out = np.empty_like(sums)
    for i in range(len(sums)):
        keep = np.arange(len(sums)) != i
        fs, a, b = _fit(kind, fixed, sums[keep], meas[keep])
        out[i] = fs * fixed + a * sums[i] + b
    return out


def _choose_calibration(fixed: float, sums: np.ndarray, meas: np.ndarray
                        ) -> tuple[dict[str, Any] | None, np.ndarray, dict]:
    """Keep the calibration with the lowest leave-one-out mean absolute % error, if it beats
    the uncalibrated mean error by at least a tenth. The mean, not the median, so that a
    calibration that fits most networks but throws one far off is not chosen.
    Returns (calibration or None, held-out predictions, per-kind scores)."""
    pred = fixed + sums
    base = _pct_errors(pred, meas)
    scores = {"none": {"mean": float(base.mean()), "median": float(np.median(base)), "max": float(base.max())}}
    best, best_pred, best_mean = None, pred, float(base.mean())
    if len(pred) >= 4:
        for kind in CALIBRATIONS:
            loo = _leave_one_out(kind, fixed, sums, meas)
            err = _pct_errors(loo, meas)
            scores[kind] = {"mean": float(err.mean()), "median": float(np.median(err)), "max": float(err.max())}
            if err.mean() < 0.9 * base.mean() and err.mean() < best_mean:
                best, best_pred, best_mean = kind, loo, float(err.mean())
    if best is None:
        return None, pred, scores
    fs, a, b = _fit(best, fixed, sums, meas)
    cal = {"kind": best, "fixed_scale": fs, "a": a, "b": b, "fit_samples": int(len(pred)),
           "loo_mean_abs_pct_error": best_mean, "uncalibrated_mean_abs_pct_error": float(base.mean())}
    return cal, best_pred, scores
