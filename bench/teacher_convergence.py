"""Is a run's teacher converged? What more training with hant's fine-tuning recipe gives the teacher itself.

    .venv/bin/python bench/teacher_convergence.py --run runs/demo               # 2 epochs -> JSON
    .venv/bin/python bench/teacher_convergence.py --run runs/demo --epochs 1,2  # a small curve

A student's drop means what it says only when the teacher is converged: when the students'
fine-tuning recipe, given to the teacher itself for the same epochs, lifts it by little.
Otherwise part of what fine-tuning does for a student is what it would do for the teacher,
and counting it as recovery flatters hant (the benchmarks therefore measure drops from the
better of teacher and this control). This script measures that lift for the teacher of a
run folder (`hant init` makes one in seconds; no phase 1 is needed): for each `--epochs`
count, a copy of the teacher is fine-tuned by `hant.kd.finetune_module`, the loop
that fine-tunes hant's students, with the run's `finetune` recipe (KD from the unchanged
teacher + label CE, AdamW, warm-up and cosine), and its test top-1 is compared with the
teacher's. `converged` holds when the lift at the largest count is at most `--max-gain`
points (0.2). When it does not, the line printed last names the `hant train-teacher` call
that trains the teacher on from its checkpoint.

Resumable: each count is a JSON file under --cache (default ~/.cache/hant/convergence/
<run name>), named by a hash of the teacher's sha256, the recipe and the epochs, and its
fine-tuning checkpoints resume under --cache/work. Time: on 2 CPU cores the demo's teacher
(EfficientNet-B0, Fashion-MNIST at 64 px) takes ~9 min per epoch.

Keys: `teacher_top1`, `points` [{epochs, top1, gain, steps, time_s}], `max_gain`,
`converged`, `next` (the train-teacher command when not converged), `command`,
`fingerprint`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_MININTERVAL", "30")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _write(path: Path, doc: dict[str, Any]) -> None:
    from hant.workspace import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def measure(run: Path, epochs_list: list[float], cache: Path, max_gain: float, log=print) -> dict[str, Any]:
    """The teacher's test top-1, and after each count of fine-tuning epochs (see the module doc)."""
    from families import Families, teacher_control
    from hant.data import load_data
    from hant.run import Run

    the_run = Run(run)
    cfg = the_run.config
    sha = the_run.layers_doc.get("checkpoint_sha256")
    splits = load_data(cfg.data)
    base = {"teacher_sha256": sha, "seed": cfg.seed, "finetune": dataclasses.asdict(cfg.finetune),
            "data": {"spec": cfg.data.spec, "input_size": cfg.data.input_size, "heldout": cfg.data.heldout,
                     "seed": cfg.data.seed}}
    t_path = cache / f"teacher-{digest(base, 12)}.json"
    t_doc = json.loads(t_path.read_text()) if t_path.exists() else None
    if t_doc is None:
        t_doc = {"top1": Families.evaluate(the_run.teacher().eval(), splits.test, cfg)["top1"]}
        _write(t_path, t_doc)
    t1 = t_doc["top1"]
    log(f"[convergence] teacher: test top-1 {t1:.2f}%")
    points = []
    for e in sorted(epochs_list):
        key = {**base, "epochs": e}
        unit = f"control-e{e:g}-{digest(key, 12)}"
        path = cache / f"{unit}.json"
        d = json.loads(path.read_text()) if path.exists() else None
        if d is None:
            log(f"[convergence] the teacher fine-tuned for {e:g} epochs ...")
            t0 = time.perf_counter()
            c = teacher_control(the_run, splits, e, cache / "work" / unit, unit, log)
            d = {"epochs": e, "top1": c["top1"], "steps": c["finetune"]["steps"],
                 "time_s": round(time.perf_counter() - t0, 1)}
            _write(path, d)
        d = {**d, "gain": d["top1"] - t1}
        log(f"[convergence] after {e:g} epochs: {d['top1']:.2f}% ({d['gain']:+.2f} points)")
        points.append(d)
    converged = bool(points) and points[-1]["gain"] <= max_gain
    nxt = None
    if not converged and points:
        ck = cfg.model.checkpoint
        stem = Path(ck).stem if ck else "teacher"
        nxt = shlex.join(["hant", "train-teacher", "--model", cfg.model.source, "--data", cfg.data.spec,
                          "--input-size", str(cfg.data.input_size), "--init-from", str(ck), "--epochs", "3",
                          "--lr", f"{cfg.finetune.lr:g}", "--drop-rate", "0", "--drop-path-rate", "0",
                          "--out", str(Path(ck).with_name(f"{stem}-more.safetensors")) if ck else "TEACHER.safetensors"])
    return {"teacher_top1": t1, "points": points, "max_gain": max_gain, "converged": converged, "next": nxt,
            "teacher_sha256": sha, "finetune": base["finetune"], "run": str(run)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder whose teacher, data and fine-tuning recipe are used")
    p.add_argument("--epochs", type=lambda s: [float(x) for x in s.split(",") if x.strip()], default=[2.0],
                   help="fine-tuning epochs of the teacher, comma-separated (default 2)")
    p.add_argument("--max-gain", type=float, default=0.2, help="points the last count may lift the teacher (0.2)")
    p.add_argument("--cache", help="cache (default ~/.cache/hant/convergence/<run name>)")
    p.add_argument("--out", help="results JSON (default bench/results/teacher_convergence.json)")
    args = p.parse_args(argv)
    run = Path(args.run).resolve()
    if not (run / "config.yaml").exists():
        print(f"error: {run} is not a run folder (no config.yaml); make one with `hant init`", file=sys.stderr)
        return 2
    if not args.epochs or any(not e > 0 for e in args.epochs):
        print("error: --epochs takes positive numbers, e.g. --epochs 1,2", file=sys.stderr)
        return 2
    cache = Path(args.cache) if args.cache else Path.home() / ".cache" / "hant" / "convergence" / run.name
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "teacher_convergence.json"
    command = shlex.join(["bench/teacher_convergence.py", *(argv if argv is not None else sys.argv[1:])])
    result = measure(run, args.epochs, cache, args.max_gain)
    from families import fingerprint

    _write(out, {"version": 1, **result, "command": command, "fingerprint": fingerprint()})
    if result["converged"]:
        print(f"[convergence] converged: {result['points'][-1]['epochs']:g} more epochs lift the teacher by "
              f"{result['points'][-1]['gain']:+.2f} points (at most {args.max_gain:g}) -> {out}")
    else:
        print(f"[convergence] not converged: {result['points'][-1]['epochs']:g} more epochs lift the teacher by "
              f"{result['points'][-1]['gain']:+.2f} points (more than {args.max_gain:g}); train it on, e.g. "
              f"{result['next']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
