"""Does re-scoring a plan's candidates around the plan itself (`hant refine`) choose a better plan?

    .venv/bin/python bench/refine.py --run ~/.cache/hant/families/regnetx_002 \\
        --run ~/.cache/hant/families/resnet18 --run ~/.cache/hant/families/mobilenetv3_large_100
        -> bench/results/refine.json

The integer program adds up replace-one-layer scores taken around the teacher, and with many
layers replaced their damage compounds (bench/results/additivity.json). `hant.pipeline.
refine_plan` scores every candidate again with the rest of the chosen plan in place, solves
the program on those scores under the same budget and keeps whichever plan has the lower
measured held-out loss. For each finished run folder (e.g. bench/families.py's) and its plan
`--plan` (default the 2x plan), this runs `refine_plan` for `--rounds` rounds in a scratch
copy of the run under `--work` (links to its files; its own plans/, refine/ and scores.json;
the run is never written; kept, so that a rerun reuses the context scores) and records, for the first plan and the one kept:

- `heldout`: the held-out loss change from the teacher's, top-1 and KL of the plan assembled
  from phase-1 candidates (what `refine` measures and keeps the best plan by, on the whole
  held-out split);
- `test`: test loss and top-1 of the same plan with BatchNorm statistics re-estimated (as
  fine-tuning starts when re-distillation is off), on the test split, which nothing here saw;
- `predicted_ms` and the plan's layers; `rounds`: every round's plan and held-out loss.

No hardware check: the new plans are selected under the first plan's budget on the run's
latency table (`refine --check-rounds 0`). With `--finetune`, the kept plan (when it is not
the first) is re-distilled, fine-tuned and timed against the teacher as `accelerate` does,
in the scratch copy (`finetuned`: its test top-1 and measured speedup beside those of the
run's own student of the first plan, made the same way). Time on 2 CPU cores: one round costs one pass of
`hant score` (RegNetX-200MF 4 min, ResNet-18 5 min, MobileNetV3-Large 6 min alone).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from families import Families, fingerprint  # noqa: E402  (bench/ is the script's folder)

from hant.errors import HantError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "refine.json"
PLAN = "onnxruntime-cpu-b1-x2"
TARGET = "onnxruntime-cpu"  # the families runs' latency table (batch 1)


# What the scratch copy holds itself rather than links to: what refinement and fine-tuning write.
OWN = ("plans", "refine", "scores.json", "students", "redistilled", "timings.json", "report.md")


def _scratch(run: Path, where: Path, plan: str) -> Path:
    """A folder that links to every file of `run` but those of OWN (scores.json copied).
    Kept between calls: its context scores (refine/*.scores.json) and students are reused,
    its plans and refinement records made again."""
    scratch = where / run.name
    scratch.mkdir(parents=True, exist_ok=True)
    for p in run.iterdir():
        if p.name not in OWN and not p.name.startswith(".") and not (scratch / p.name).exists():  # .lock stays the run's
            os.symlink(p.resolve(), scratch / p.name)
    for name in OWN:  # a link made by an earlier version of this script
        if (scratch / name).is_symlink():
            (scratch / name).unlink()
    shutil.copy(run / "scores.json", scratch / "scores.json")
    shutil.rmtree(scratch / "plans", ignore_errors=True)  # students and re-distilled weights stay (reused)
    for record in (scratch / "refine").glob("*.json") if (scratch / "refine").exists() else []:
        if not record.name.endswith(".scores.json"):
            record.unlink()
    (scratch / "plans").mkdir()
    if (run / "plans" / f"{plan}.json").exists():
        plan_doc = json.loads((run / "plans" / f"{plan}.json").read_text())
        (scratch / "plans" / f"{plan}.json").write_text(json.dumps(plan_doc))
    return scratch


def _made(folder: Path, plan: str, log) -> dict[str, Any]:
    """A plan of the scratch copy re-distilled, fine-tuned and timed as `accelerate` does (the
    run's config); a student already made there is read back."""
    from hant.finetune import finetune
    from hant.measure import measure
    from hant.redistill import redistill

    student = folder / "students" / plan
    ev_path, arch_path = student / "eval.json", student / "arch.json"
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else {}
    arch = json.loads(arch_path.read_text()) if arch_path.exists() else {}
    want = json.loads((folder / "plans" / f"{plan}.json").read_text())["layers"]
    made = {n: d["spec"] for n, d in (arch.get("layers") or {}).items()}
    if not ev.get("speedup") or made != want:
        redistill(folder, plan, log=log)
        finetune(folder, plan, log=log)
        measure(folder, plan, log=log)
        ev = json.loads(ev_path.read_text())
    return _summary(ev, ev_path)


def _summary(ev: dict[str, Any], source: Path) -> dict[str, Any]:
    st = ev.get("student") or {}
    return {"top1": st.get("top1"), "assembled_top1": st.get("top1_assembled"), "speedup": ev.get("speedup"),
            "speedup_ci_lo": ev.get("speedup_ci_lo"), "speedup_ci_hi": ev.get("speedup_ci_hi"),
            "teacher_top1": (ev.get("teacher") or {}).get("top1"), "source": str(source)}


def finetune_both(run: Path, scratch: Path, plan: str, log) -> dict[str, Any]:
    """The kept plan re-distilled, fine-tuned and timed as `accelerate` does, in the scratch copy;
    beside it the first plan: the run's own student of it when the run has one (made the same
    way), else made in the scratch copy as <plan>-r0."""
    t0 = time.perf_counter()
    kept = _made(scratch, plan, log)
    own = run / "students" / plan / "eval.json"
    first = _summary(json.loads(own.read_text()), own) if own.exists() else _made(scratch, f"{plan}-r0", log)
    return {"kept": kept, "first": first, "wall_time_s": round(time.perf_counter() - t0, 1)}


def refine_one(run: Path, plan: str, rounds: int, work: Path, log, with_finetune: bool = False,
               speedup: float | None = None) -> dict[str, Any]:
    from hant.data import load_data
    from hant.pipeline import refine_plan
    from hant.run import Run
    from hant.student import assemble

    the_run = Run(run)
    cfg = the_run.config
    splits = load_data(cfg.data)
    scratch = _scratch(run, work, plan)
    if not (scratch / "plans" / f"{plan}.json").exists():
        if speedup is None:
            raise HantError(f"{run} has no plan {plan}; give --speedup S to select one on the run's latency table")
        from hant.select import select

        select(scratch, target=TARGET, speedup=speedup, name=plan, log=log)
    t0 = time.perf_counter()
    record = refine_plan(scratch, plan, rounds, timer=None, check_rounds=0, log=log)
    wall = time.perf_counter() - t0
    plans = {r["name"]: json.loads((scratch / "plans" / f"{r['name']}.json").read_text())
             for r in record["rounds"]}

    def row(name: str) -> dict[str, Any]:
        r = next(r for r in record["rounds"] if r["name"] == name)
        model = assemble(scratch, {"layers": r["layers"]}, bn_recalibrate=True, splits=splits,
                         redistilled=False, log=None)
        return {"name": name, "layers": r["layers"], "heldout": r["heldout"],
                "test": Families.evaluate(model, splits.test, cfg),
                "predicted_ms": plans[name]["predicted_ms"], "changed": r["changed"]}

    first, kept = row(f"{plan}-r0"), row(record["winner"])
    log(f"[refine] {run.name}: held-out loss change {first['heldout']['d_loss']:+.4f} -> "
        f"{kept['heldout']['d_loss']:+.4f}; test (BN re-estimated) {first['test']['loss']:.4f} / "
        f"{first['test']['top1']:.2f}% -> {kept['test']['loss']:.4f} / {kept['test']['top1']:.2f}% "
        f"({kept['changed']} layers changed, {wall:.0f} s)")
    out = {"run": str(run), "model": run.name, "plan": plan, "rounds_asked": rounds, "first": first, "kept": kept,
           "rounds": record["rounds"], "wall_time_s": round(wall, 1)}
    if with_finetune:
        if record["winner"] == f"{plan}-r0":
            out["finetuned"] = {"same_as_first": True}
        else:
            out["finetuned"] = finetune_both(run, scratch, plan, log)
            f = out["finetuned"]
            log(f"[refine] {run.name} {plan}: fine-tuned top-1 {f['first']['top1']:.2f}% (first plan, "
                f"{f['first']['speedup']:.2f}x) -> {f['kept']['top1']:.2f}% (kept plan, {f['kept']['speedup']:.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from hant.workspace import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", type=Path, required=True, help="a finished run folder (repeatable)")
    ap.add_argument("--plan", default=PLAN, help="the plan to refine in each run (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="refinement rounds at most (default 1)")
    ap.add_argument("--speedup", type=float, default=None,
                    help="a run without the plan: select it at this speedup on the run's table (no hardware check)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--finetune", action="store_true",
                    help="also re-distil, fine-tune and time the kept plan as accelerate does (minutes per run)")
    ap.add_argument("--work", type=Path, default=Path("~/.cache/hant/refine-bench"),
                    help="scratch copies of the runs, kept for their context scores (default %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = {(r["model"], r["plan"]): r for r in old.get("rows", [])}
    result = {"command": "bench/refine.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    try:
        for run in args.run:
            r = refine_one(run.expanduser().resolve(), args.plan, args.rounds, args.work.expanduser(), print,
                           with_finetune=args.finetune, speedup=args.speedup)
            r["fingerprint"] = fingerprint()
            r["command"] = result["command"]
            rows[(r["model"], r["plan"])] = r
            result["rows"] = list(rows.values())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    except HantError as e:
        print(f"refine: {e}", file=sys.stderr)
        return 1
    print(f"[refine] -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
