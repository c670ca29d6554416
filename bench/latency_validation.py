"""Latency table vs end-to-end measurements on EfficientNet-B0 (1x32x32, `default` space).

For each (target, batch size) it builds the run's latency table, then validates it on K
random networks plus the teacher and the all-cheapest one (`hant latency --validate K`),
and records the errors, Kendall's tau, the effect of the calibration, the number of
entries and the build time. Writes

    bench/results/latency.json              a list: one object per (target, batch size)
    bench/results/latency_validation.json   the same with details (points, fingerprint, load)
    bench/results/latency_validation.png    predicted against measured, one panel per table

The teacher has random weights: latency does not depend on weight values. Each table's
measuring rounds are capped by --time-cap seconds (the protocol's time_cap_s; preparing
the candidates comes on top), so a table takes a few minutes on 2 cores.

    .venv/bin/python bench/latency_validation.py                      # the issue's three tables, K=30
    .venv/bin/python bench/latency_validation.py --tables onnxruntime-cpu:1 --k 10 --time-cap 60
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def make_run(run: Path, data: str, threads: int | None, time_cap: float, input_size: int) -> None:
    """An initialised run folder for EfficientNet-B0 with the benchmark's latency settings."""
    from hant.run import init_run

    cfg = run.parent / f"{run.name}.config.yaml"
    cfg.write_text(yaml.safe_dump({"latency": {"threads": threads, "warmup": 5, "min_repeats": 15,
                                               "max_repeats": 200, "time_cap_s": time_cap}}))
    init_run(run, model="timm:efficientnet_b0", data=data, input_size=input_size, space="default", config=cfg,
             random_teacher=True, log=lambda s: None)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        pts = r["points"]
        meas = [p["measured_ms"] for p in pts]
        colors = {"teacher": "black", "cheapest": "tab:green", "random": "tab:blue"}
        for kind in ("random", "teacher", "cheapest"):
            sel = [p for p in pts if p["kind"] == kind]
            if not sel:
                continue
            ax.scatter([p["predicted_ms"] for p in sel], [p["measured_ms"] for p in sel], facecolors="none",
                       edgecolors=colors[kind], s=30, label=f"{kind}: table sum")
            if r["calibration"]:
                ax.scatter([p["heldout_predicted_ms"] for p in sel], [p["measured_ms"] for p in sel],
                           color=colors[kind], s=14, label=f"{kind}: calibrated (held out)")
        lo, hi = min(meas + [p["predicted_ms"] for p in pts]), max(meas + [p["predicted_ms"] for p in pts])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("predicted latency, ms")
        ax.set_ylabel("measured end to end, ms")
        ax.set_title(f"{r['target']} batch {r['batch_size']} ({r['clock']} clock)\nmedian |err| {r['median_abs_pct_error']:.1f}%, "
                     f"max {r['max_abs_pct_error']:.1f}%, tau {r['kendall_tau']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", default="onnxruntime-cpu:1,onnxruntime-cpu:64,torch-cpu:64",
                   help="comma-separated TARGET:BATCH[:CLOCK]; a table with its own clock is built in a "
                        "copy of the run folder (its fingerprint differs)")
    p.add_argument("--k", type=int, default=30, help="random networks to validate on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "thread-cpu"],
                   help="auto: thread-cpu with one thread (see hant.latency.base.Target)")
    p.add_argument("--time-cap", type=float, default=180.0, help="seconds of timing rounds per table")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--run", default=None, help="run folder to use (default: a fresh temporary one)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    from hant.latency import measure_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="hant-latbench-")) / "run"
    if not (work / "layers.json").exists():
        make_run(work, args.data, args.threads, args.time_cap, args.input_size)
    command = "bench/latency_validation.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = []
    for item in args.tables.split(","):
        target, batch, *rest = item.split(":")
        clock = rest[0] if rest else args.clock
        run = work
        if rest:
            run = work.parent / f"{work.name}-{clock}"
            if not (run / "layers.json").exists():
                run.mkdir(parents=True, exist_ok=True)
                for name in ("config.yaml", "layers.json"):
                    (run / name).write_bytes((work / name).read_bytes())
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        options = {"clock": clock} if target != "analytic" else {}
        table = measure_table(run, target=target, batch_size=int(batch), validate=args.k, threads=args.threads,
                              options=options, progress=sys.stderr.isatty(), log=print)
        wall = time.perf_counter() - t0
        v = table["validation"]
        cal = table["calibration"]
        results.append({
            "target": target, "batch_size": int(batch), "k": v["k"], "samples": v["samples"],
            "median_abs_pct_error": v["median_abs_pct_error"], "max_abs_pct_error": v["max_abs_pct_error"],
            "kendall_tau": v["kendall_tau"], "errors_are": v["errors_are"],
            "uncalibrated": v["uncalibrated"], "random_only": v["random_only"], "calibration": cal,
            "calibration_scores": v["calibration_scores"],
            "entries": len(table["entries"]), "failed": len(table["failed"]),
            "build_time_s": table["build_time_s"], "validation_time_s": v.get("time_s"), "wall_time_s": round(wall, 1),
            "fixed_ms": table["fixed_ms"], "teacher_ms": table["teacher_ms"],
            "threads": table["fingerprint"].get("threads"), "clock": table["fingerprint"].get("clock"),
            "time_cap_s": args.time_cap,
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "fingerprint": table["fingerprint"],
            "command": f"{command}  # table {item}",
            "points": v["points"],
        })
        print(f"{target} b{batch} ({table['fingerprint'].get('clock')}): median |err| {v['median_abs_pct_error']:.2f}%, max {v['max_abs_pct_error']:.2f}%, "
              f"tau {v['kendall_tau']:.3f} ({v['errors_are']}); {len(table['entries'])} entries, "
              f"table {table['build_time_s']:.0f} s, all {wall:.0f} s", flush=True)
        # Written after every table, so a long benchmark leaves what it finished.
        summary = [{k: r[k] for k in r if k not in ("points", "fingerprint", "uncalibrated", "random_only",
                                                     "calibration_scores")} for r in results]
        (out / "latency.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "latency_validation.json").write_text(json.dumps(
            {"version": 1, "model": "timm:efficientnet_b0", "input_size": [1, args.input_size, args.input_size],
             "space": "default", "command": command, "results": results}, indent=2) + "\n")
        plot(results, out / "latency_validation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
