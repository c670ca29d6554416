"""How far hant's timings can be trusted on this machine: table validation and plan re-measurement.

On the bundled tiny setting (timm mobilenetv2_050 at 64x64, `tiny` space, ONNX Runtime on
the CPU, batch 1, the run's default thread count), it

1. builds the latency table and validates it on K random networks (`hant latency
   --validate K`), once on a quiet machine and once while another single-threaded process
   computes without pause beside it (the normal case on a user's workstation);
2. chooses a 2x plan from the quiet table and times it against the teacher in P separate
   processes (`hant.measure.time_plan`, the protocol of the plan check and of the final
   measurement), and reports how far the processes disagree.

Writes bench/results/timing.json ({"command", "fingerprint", "validation": {condition:
{...}}, "processes": [...], "spread_pct", "goals"}). The teacher has random weights
(`--random-teacher`): latency does not depend on weight values.

    .venv/bin/python bench/timing.py                  # K=10, three processes
    .venv/bin/python bench/timing.py --k 10 --processes 3 --time-cap 120
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "timm:mobilenetv2_050"
TARGET = "onnxruntime-cpu"
# A single-threaded process that computes without pause: the neighbour of condition "loaded".
LOAD = ("import numpy as np\n"
        "a = np.random.rand(384, 384)\n"
        "while True:\n"
        "    a = a @ a\n"
        "    a /= np.abs(a).max()\n")


def make_run(run: Path, time_cap: float) -> None:
    """A run folder with phase 1 (a few images per candidate) and distill scores: enough to select."""
    from hant.distill import distill
    from hant.run import init_run
    from hant.score import score

    cfg = run.parent / f"{run.name}.config.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump({"latency": {"time_cap_s": time_cap},
                                   "distill": {"images": 64, "batch_size": 32, "heldout_images": 32},
                                   "data": {"heldout": 64}}))
    init_run(run, model=MODEL, data="synthetic:400", input_size=64, space="tiny", config=str(cfg),
             random_teacher=True, log=lambda s: None)
    distill(run, log=lambda s: None)
    score(run, method="distill", log=lambda s: None)


def copy_run(src: Path, dst: Path, latency: dict) -> Path:
    """The run without its latency tables, so a condition measures its own; `latency`
    overrides settings of its config's latency section (e.g. min_repeats)."""
    from hant.config import RunConfig

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("latency", "plans", ".lock"))
    if latency:
        cfg = RunConfig.load(dst / "config.yaml")
        for key, value in latency.items():
            setattr(cfg.latency, key, value)
        cfg.save(dst / "config.yaml")
    return dst


def validate(run: Path, k: int) -> dict:
    from hant.latency import measure_table

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    table = measure_table(run, target=TARGET, batch_size=1, validate=k, progress=False, log=lambda s: None)
    v = table["validation"]
    return {"median_abs_pct_error": v["median_abs_pct_error"], "max_abs_pct_error": v["max_abs_pct_error"],
            "kendall_tau": v["kendall_tau"], "k": v["k"], "errors_are": v.get("errors_are"),
            "teacher_ms": table["teacher_ms"], "fixed_ms": table["fixed_ms"], "entries": len(table["entries"]),
            "threads": table["fingerprint"].get("threads"), "clock": table["fingerprint"].get("clock"),
            "wall_s": round(time.perf_counter() - t0, 1), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "fingerprint": table["fingerprint"]}


def time_in_process(run: Path, plan: str) -> dict:
    """`time_plan` in a fresh Python process, as a separate `hant` command would run it."""
    code = ("import json, sys\n"
            "from hant.measure import time_plan\n"
            f"r = time_plan({str(run)!r}, {plan!r}, log=lambda s: None)\n"
            "print(json.dumps(r))\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def processes_only(work: Path, base: Path, latency: dict, processes: int, result: dict, out: Path) -> int:
    """The plan-agreement part alone: the base run's own table, its 2x plan, timed in
    `processes` separate processes under the machine's present load (recorded)."""
    from hant.latency import measure_table
    from hant.select import select

    run = work / "processes"
    if not (run / "plans" / "x2.json").exists():
        run = copy_run(base, run, latency)
        measure_table(run, target=TARGET, batch_size=1, progress=False, log=lambda s: None)
        select(run, target=TARGET, speedup=2.0, name="x2", log=lambda s: None)
    load0 = os.getloadavg()
    rows = []
    for _ in range(processes):
        rows.append(time_in_process(run, "x2"))
        print(f"process {len(rows)}: {rows[-1]['speedup']:.3f}x (teacher {rows[-1]['teacher_ms']:.4f} ms, "
              f"student {rows[-1]['student_ms']:.4f} ms)", flush=True)
    result.update(processes=rows, loadavg_before=load0, loadavg_after=os.getloadavg())
    for key in ("student_ms", "teacher_ms", "speedup"):
        vals = [float(r[key]) for r in rows]
        result.setdefault("spread_pct", {})[key] = round(100.0 * (max(vals) - min(vals)) / min(vals), 2)
    result["goals"] = {"processes_agree_on_speedup_within_5pct": result["spread_pct"]["speedup"] <= 5.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"spread %: {result['spread_pct']}\n-> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10, help="random networks to validate each table on")
    p.add_argument("--processes", type=int, default=3, help="separate processes that time the same plan")
    p.add_argument("--repeats", type=int, default=3, help="tables built and validated per condition")
    p.add_argument("--latency", action="append", default=[], metavar="KEY=VALUE",
                   help="override a latency setting of the run's config (e.g. min_repeats=60)")
    p.add_argument("--time-cap", type=float, default=120.0, help="seconds of timing rounds per measurement")
    p.add_argument("--work", default=None, help="folder for the run folders (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS / "timing.json"))
    p.add_argument("--processes-only", action="store_true",
                   help="skip the validation; time the base run's 2x plan in --processes processes, "
                        "with the --latency overrides (e.g. min_time_s=30), and write only that part")
    args = p.parse_args(argv)
    command = "bench/timing.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from hant.select import select

    latency = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.latency)}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hant-timing-"))
    base = work / "base"
    if not (base / "scores.json").exists():
        make_run(base, args.time_cap)

    result: dict = {"version": 1, "command": command, "model": MODEL, "input_size": [1, 64, 64], "space": "tiny",
                    "target": TARGET, "batch_size": 1, "repeats": args.repeats, "latency_overrides": latency,
                    "validation": {}}
    if args.processes_only:
        return processes_only(work, base, latency, args.processes, result, Path(args.out))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for condition in ("quiet", "loaded"):
        rows = []
        for r in range(args.repeats):
            run = copy_run(base, work / f"{condition}-{r}", latency)
            neighbour = subprocess.Popen([sys.executable, "-c", LOAD], env=env) if condition == "loaded" else None
            try:
                if neighbour is not None:
                    time.sleep(2.0)
                rows.append(validate(run, args.k))
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            print(f"{condition} {r}: median |err| {rows[-1]['median_abs_pct_error']:.2f}%, "
                  f"tau {rows[-1]['kendall_tau']:.3f}, table {rows[-1]['wall_s']} s", flush=True)
        result["fingerprint"] = rows[0]["fingerprint"]
        for row in rows:
            row.pop("fingerprint")
        errs = [row["median_abs_pct_error"] for row in rows]
        taus = [row["kendall_tau"] for row in rows]
        result["validation"][condition] = {"runs": rows, "median_abs_pct_error": float(np.median(errs)),
                                           "worst_median_abs_pct_error": max(errs),
                                           "kendall_tau": float(np.median(taus)), "worst_kendall_tau": min(taus)}
    quiet = work / "quiet-0"

    plan = select(quiet, target=TARGET, speedup=2.0, name="x2", log=lambda s: None)
    rows = [time_in_process(quiet, "x2") for _ in range(args.processes)]
    result["plan"] = {"layers": plan["layers"], "predicted_ms": plan["predicted_ms"], "budget_ms": plan["budget_ms"]}
    result["processes"] = rows
    for key in ("student_ms", "teacher_ms", "speedup"):
        vals = [float(r[key]) for r in rows]
        result.setdefault("spread_pct", {})[key] = round(100.0 * (max(vals) - min(vals)) / min(vals), 2)
    print(f"processes: {json.dumps(rows)}\nspread %: {result['spread_pct']}", flush=True)

    q, ld = result["validation"]["quiet"], result["validation"]["loaded"]
    # Goals on the median over repeats; the worst repeat is recorded beside it.
    result["goals"] = {
        "quiet_median_error_le_5pct_and_tau_ge_0_8": q["median_abs_pct_error"] <= 5.0 and q["kendall_tau"] >= 0.8,
        "loaded_median_error_le_5pct_and_tau_ge_0_8": ld["median_abs_pct_error"] <= 5.0 and ld["kendall_tau"] >= 0.8,
        "processes_agree_on_speedup_within_5pct": result["spread_pct"]["speedup"] <= 5.0,
        "processes_agree_on_student_ms_within_5pct": result["spread_pct"]["student_ms"] <= 5.0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"goals: {result['goals']}\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
