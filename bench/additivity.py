"""Is a plan's damage the sum of its layers' damage one at a time? And which score predicts it best?

    .venv/bin/python bench/additivity.py --run ~/.cache/hant/families/regnetx_002 \\
        --plan onnxruntime-cpu-b1-x2 --plan onnxruntime-cpu-b1-x2-noself --speedups 2,2.5,3
        -> bench/results/additivity.json

The integer program of `hant select` minimises the sum of per-layer scores (`hant score`: the
teacher's held-out loss change with one layer replaced, `d_loss`, by default). This measures,
on a finished run folder (e.g. one of bench/families.py's), how far that sum is from the
truth, and whether another objective would pick better plans:

- `plans`: for each `--plan`, its replaced layers in network order, each with its score
  (`d_loss`, `kl`), its phase-1 held-out NMSE, the held-out loss change with that layer
  alone replaced (`single`) and with it and every earlier replaced layer (`cumulative`).
  Candidates carry their phase-1 weights and BatchNorm statistics, as when they are scored.
  `sum_single` against the last `cumulative` is the additivity gap.
- `objectives`: at each of `--speedups` (budget: the teacher's latency on the run's table
  divided by it, no hardware check), the plan that minimises the summed `d_loss`, the summed
  `kl`, or the summed phase-1 NMSE, assembled from phase-1 candidates with BatchNorm
  statistics re-estimated (as fine-tuning starts when re-distillation is off), and its test
  loss and top-1 (the test split: none of the three objectives saw it).

Plans of the objective comparison are written to a scratch copy of the run folder (links to
its files, its own plans/ and scores.json), never into the run. Everything is evaluated on
one thread on the run's data. Time: 5 min for RegNetX-200MF at 64 px on 2 CPU cores (two
plans, three budgets), beside a training job.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from families import Families, fingerprint  # noqa: E402  (bench/ is the script's folder)

_evaluate = Families.evaluate  # (model, dataset, run config): eval mode, channels_last, top-1 and loss
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "additivity.json"
OBJECTIVES = ("d_loss", "kl", "nmse")


def _loss(run: Path, layers: dict[str, str], dataset, cfg, bn: bool, splits) -> dict[str, float]:
    from hant.student import assemble

    model = assemble(run, {"layers": layers}, bn_recalibrate=bn, splits=splits, redistilled=False, log=None)
    return _evaluate(model, dataset, cfg)


def plan_additivity(run: Path, plan: str, scores: dict, nmse: dict, splits, cfg,
                    log) -> dict[str, Any]:
    """The plan's replaced layers one at a time and cumulatively, on the held-out split."""
    from hant.run import Run
    from hant.workspace import read_json

    the_run = Run(run)
    order = [info.name for info in the_run.layers]
    layers = read_json(the_run.dir.plan(plan))["layers"]
    replaced = [(n, layers[n]) for n in order if layers.get(n, "teacher") != "teacher"]
    base = _evaluate(the_run.teacher(), splits.heldout, cfg)["loss"]
    rows, sofar = [], {}
    for name, spec in replaced:
        sofar[name] = spec
        single = _loss(run, {name: spec}, splits.heldout, cfg, False, splits)["loss"] - base
        cumulative = _loss(run, dict(sofar), splits.heldout, cfg, False, splits)["loss"] - base
        s = scores.get((name, spec)) or {}
        rows.append({"layer": name, "spec": spec, "d_loss": s.get("d_loss"), "kl": s.get("kl"),
                     "nmse": nmse.get((name, spec)), "single": single, "cumulative": cumulative})
        log(f"[additivity] {plan} {name} {spec}: single {single:+.4f}, cumulative {cumulative:+.4f}")
    bn = _loss(run, layers, splits.heldout, cfg, True, splits)["loss"] - base
    return {"plan": plan, "teacher_heldout_loss": base, "layers": rows,
            "sum_single": sum(r["single"] for r in rows),
            "sum_score_d_loss": sum(r["d_loss"] or 0.0 for r in rows),
            "cumulative": rows[-1]["cumulative"] if rows else 0.0,
            "with_bn_recalibration": bn}


def _scratch(run: Path, where: Path) -> Path:
    """A folder that links to every file of `run` but plans/ and scores.json, which are its own."""
    scratch = where / run.name
    scratch.mkdir(parents=True)
    for p in run.iterdir():
        if p.name not in ("plans", "scores.json") and not p.name.startswith("."):  # .lock stays the run's
            os.symlink(p.resolve(), scratch / p.name)
    (scratch / "plans").mkdir()
    return scratch


def objective_plans(run: Path, target: str, batch: int, speedups: list[float], scores_doc: dict, nmse: dict,
                    splits, cfg, log) -> list[dict[str, Any]]:
    from hant.latency import table_id
    from hant.select import SelectOptions, select

    tid = table_id(target, batch)
    out = []
    with tempfile.TemporaryDirectory(prefix="hant-additivity-") as tmp:
        scratch = _scratch(run, Path(tmp))
        for obj in OBJECTIVES:
            entries = []
            for e in scores_doc["entries"]:
                e = dict(e)
                if obj == "nmse":  # the phase-1 NMSE goes in through d_loss
                    e["d_loss"] = 0.0 if e["spec"] == "teacher" else nmse.get((e["layer"], e["spec"]))
                entries.append(e)
            (scratch / "scores.json").write_text(json.dumps({**scores_doc, "entries": entries}))
            for s in speedups:
                plan = select(scratch, target=tid, speedup=s, name=f"{obj}-x{s:g}", log=lambda m: None,
                              options=SelectOptions(objective="d_loss" if obj == "nmse" else obj))
                test = _loss(scratch, plan["layers"], splits.test, cfg, True, splits)
                out.append({"objective": obj, "speedup": s, "predicted_ms": plan["predicted_ms"],
                            "predicted_speedup": plan.get("predicted_speedup"), "layers": plan["layers"],
                            "test_loss": test["loss"], "test_top1": test["top1"]})
                log(f"[additivity] objective {obj} at {s:g}x: test loss {test['loss']:.4f}, "
                    f"top-1 {test['top1']:.2f}% (predicted {plan['predicted_ms']:.4g} ms)")
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from hant.data import load_data
    from hant.errors import HantError
    from hant.run import Run
    from hant.workspace import atomic_write_text, read_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished run folder (scored, with plans)")
    ap.add_argument("--plan", action="append", default=[], help="a plan of the run to take apart (repeatable)")
    ap.add_argument("--speedups", default="2,2.5,3", help="budgets of the objective comparison ('' for none)")
    ap.add_argument("--target", default="onnxruntime-cpu", help="the latency table's target (default %(default)s)")
    ap.add_argument("--latency-batch", type=int, default=1, help="the latency table's batch size (default 1)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = print
    try:
        run = args.run.expanduser().resolve()
        the_run = Run(run)
        scores_doc = read_json(run / "scores.json")
        scores = {(e["layer"], e["spec"]): e for e in scores_doc["entries"]}
        nmse = {(c["layer"], c["spec"]): c.get("heldout_loss") for c in the_run.candidate_index().values()}
        splits = load_data(the_run.config.data)
        t0 = time.perf_counter()
        result: dict[str, Any] = {
            "command": "bench/additivity.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "run": str(run), "teacher_test": _evaluate(the_run.teacher(), splits.test, the_run.config),
            "plans": [plan_additivity(run, p, scores, nmse, splits, the_run.config, log) for p in args.plan],
            "objectives": objective_plans(run, args.target, args.latency_batch, [float(s) for s in args.speedups.split(",") if s.strip()],
                                          scores_doc, nmse, splits, the_run.config, log)}
    except HantError as e:
        print(f"additivity: {e}", file=sys.stderr)
        return 1
    result.update(fingerprint=fingerprint(), wall_time_s=round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    for p in result["plans"]:
        log(f"[additivity] {p['plan']}: sum of one-at-a-time {p['sum_single']:+.4f}, together "
            f"{p['cumulative']:+.4f} (BatchNorm re-estimated: {p['with_bn_recalibration']:+.4f})")
    log(f"[additivity] -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
