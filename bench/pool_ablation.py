"""What the teacher-derived candidates change: plans with and without them, before fine-tuning.

    .venv/bin/python bench/pool_ablation.py --source runs/demo --run ~/.cache/hant/pool-ablation/demo

On a finished run (`--source`, e.g. the demo run: EfficientNet-B0 on Fashion-MNIST at 64 px)
this makes a copy (`--run`) whose pool is the current `default` space, which adds the
families derived from the teacher's layer (`self_*`: the teacher's block thinned; `sep`,
`lr_*`, `grp_*`: its convolutions factorised). The copy keeps the source's phase-1
candidates, latency entries and scores, so only the new candidates are trained, timed and
scored (`hant distill`, `hant latency`, `hant score` resume).

Then for every speedup of `--speedups` (2, 3) and every pool of `--pools` (the whole pool;
without `self`; without any derived family), `hant select` at the same budget (the
teacher's latency over the speedup, from the table; no hardware check, so the pools are
compared at one predicted latency) and the plan assembled (phase-1 weights, BatchNorm
recalibrated) and evaluated on the held-out split: cross-entropy, top-1 and the KL from
the teacher, before any fine-tuning. Written to `--out` (bench/results/pool_ablation.json)
with the plans' families, predicted latency and predicted loss increase.

Resumable: every stage skips finished work; each (speedup, pool) result is kept in
RUN/pool_ablation/ and reused. Time on 2 CPU cores for the demo run: ~130 new candidates
(phase 1 ~10 min, table ~5 min, scores ~10 min), then ~1 min per plan.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from hant import ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"all": (), "no-self": ("self",), "no-derived": tuple(ops.derived_families())}
# What the copy keeps of the source run: everything the stages reuse, nothing that depends on the pool.
KEEP = ("config.yaml", "candidates", "latency", "scores.json")


def _prepare(source: Path, run: Path, target: str, log) -> None:
    """A copy of `source` with the current default pool, its new candidates trained, timed, scored."""
    from hant.distill import distill
    from hant.latency.table import measure_table
    from hant.run import init_run
    from hant.score import score

    if not (run / "config.yaml").exists():
        if not (source / "layers.json").exists():
            raise SystemExit(f"error: {source} is not a finished run folder (no layers.json)")
        run.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, run / name)
            elif src.exists():
                shutil.copy2(src, run / name)
    init_run(run, config=run / "config.yaml", log=log)
    distill(run, log=log)
    measure_table(run, target, validate=0, log=log)
    score(run, log=log)


def _evaluate(run: Path, plan: str) -> dict:
    from hant.data import load_data, make_loader
    from hant.run import Run
    from hant.student import assemble

    the_run = Run(run)
    splits = load_data(the_run.config.data)
    model = assemble(run, plan, splits=splits)
    teacher = the_run.teacher().eval()
    held = splits.heldout
    loader = make_loader(held, 256)
    ce = kl = 0.0
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            s, t = model(x), teacher(x)
            ce += float(torch.nn.functional.cross_entropy(s, y, reduction="sum"))
            kl += float(torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True,
                                                   reduction="sum"))
            correct += int((s.argmax(1) == y).sum())
            n += len(y)
    return {"heldout_ce": ce / n, "heldout_kl": kl / n, "heldout_top1": 100.0 * correct / n, "heldout_images": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="a finished run folder (phase 1, table and scores done)")
    p.add_argument("--run", required=True, help="the copy with the current default pool (outside the repo)")
    p.add_argument("--target", default="onnxruntime-cpu")
    p.add_argument("--speedups", default="2,3")
    p.add_argument("--pools", default=",".join(POOLS), help=f"comma list of {', '.join(POOLS)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "pool_ablation.json"))
    args = p.parse_args(argv)
    from hant.errors import HantError
    from hant.select import SelectOptions, select
    from hant.workspace import read_json, write_json

    run, source = Path(args.run).expanduser(), Path(args.source).expanduser()
    pools = [x for x in args.pools.split(",") if x]
    bad = [x for x in pools if x not in POOLS]
    if bad:
        p.error(f"unknown pool {bad[0]!r}; choose from {', '.join(POOLS)}")
    t0 = time.perf_counter()
    try:
        _prepare(source, run, args.target, log=print)
        layers = read_json(run / "layers.json")["layers"]
        pool_sizes = {name: sum(sum(1 for s in d["candidates"] if s.split("_", 1)[0] not in POOLS[name])
                                for d in layers) for name in pools}
        rows = []
        cache = run / "pool_ablation"
        for s in [float(x) for x in args.speedups.split(",") if x]:
            for name in pools:
                plan_name = f"ablation-x{s:g}-{name}"
                unit = cache / f"{plan_name}.json"
                plan = select(run, args.target, speedup=s, name=plan_name,
                              options=SelectOptions(exclude_families=POOLS[name]), log=lambda *_: None)
                key = json.dumps(plan["layers"], sort_keys=True)
                row = read_json(unit) if unit.exists() else None
                if row is None or row.get("layers_key") != key:
                    row = {"speedup": s, "pool": name, "excluded": list(POOLS[name]), "pool_size": pool_sizes[name],
                           "plan": plan_name, "predicted_ms": plan["predicted_ms"],
                           "predicted_speedup": plan["predicted_speedup"],
                           "predicted_d_loss": plan["predicted"]["d_loss"],
                           "families": dict(Counter(v.split("_", 1)[0] for v in plan["layers"].values())),
                           "layers": plan["layers"], "layers_key": key, **_evaluate(run, plan_name)}
                    write_json(unit, row)
                rows.append({k: v for k, v in row.items() if k != "layers_key"})
                print(f"x{s:g} {name}: predicted {row['predicted_ms']:.3f} ms, d_loss {row['predicted_d_loss']:+.4f}, "
                      f"held-out CE {row['heldout_ce']:.4f}, top-1 {row['heldout_top1']:.2f}% {row['families']}")
                write_json(Path(args.out), {"rows": rows, "command": "bench/pool_ablation.py " + " ".join(
                    shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
                    "source": str(source), "target": args.target,
                    "fingerprint": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
                    "note": "assembled students (phase-1 weights, BatchNorm recalibrated), before fine-tuning; "
                            "every pool at the same table-predicted budget"})
    except HantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[pool-ablation] {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
