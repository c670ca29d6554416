"""The first checks on a GPU, in one call: the torch-cuda latency table, the demo's plans, phase 1.

A lent GPU machine gets a copy of the working tree and little time (minutes, machine start
included), no network and nothing to install. So the work is split in two:

Here (on the CPU machine), once: copy what the GPU run needs from a run folder into a
folder inside the repository that git ignores (config.yaml, layers.json, the plans, the
teacher checkpoint the config points at, with its sha256 checked as `hant.run.Run` does):

    PYTHONPATH=src .venv/bin/python bench/gpu.py --prepare --run /root/hant-runs/demo-c7

It prints the one command to run on the GPU machine (with the folder to carry), e.g.

    PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu.py --run .gpu/run --out $OUT/gpu.json --budget-s 360

There, the parts run in this order, each capped by a share of what is left of --budget-s,
and the JSON is rewritten after every part (a run stopped by its time limit still returns
what it finished):

1. `table`: `hant.latency.measure_table(run, "torch-cuda", batch_size=B, validate=K)` at the
   first of --table-batches (64): entries, fixed part, and the validation on K random
   networks plus the teacher and the all-cheapest one, predicted against measured; the
   JSON keeps the validation's error statistics and the points, and the table itself is
   written beside the JSON (`<out>-tables/`), so it can be put into the run folder later.
2. `plans`: every plan of the run (plans/*.json, not *.pick.json) rebuilt with freshly
   initialised candidates (`hant.latency.build_network`; timing does not depend on weights,
   and phase 1's weights are too big to carry) and timed against the teacher on torch-cuda,
   interleaved (`hant.latency.compare.time_against_teacher`, the protocol `hant.measure`
   uses), at the batch size the plan was chosen for. Plans with the same layers are timed
   once. Each row keeps the plan's CPU hardware check (`latency_check`) beside the GPU
   speedup, and the GPU table's prediction when part 1 measured that batch size.
3. `phase1`: candidate-images per second of `hant.phase1.train_pool` on the run's teacher,
   the whole pool (or K candidates per layer) for a few steps on synthetic images of the
   run's shape (throughput does not depend on the pixels; the dataset is not on the GPU
   machine): a one-step warm-up call, then the measured call; teacher passes, groups and
   peak GPU memory. bench/results/phase1.json (the same engine on the CPU) is quoted beside it.
4. `table` at the other --table-batches (1), if time is left.

`--device cpu` runs the same on the CPU with the torch-cpu target (the test's smoke mode).
The run folder is copied into a scratch folder first (`--work`), so the prepared folder is
never written and a second call starts from the same state.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREPARED = ROOT / ".gpu"
TEACHER_FILE = "teacher.safetensors"
PREPARED_RECORD = "prepared.json"
TARGETS = {"cuda": "torch-cuda", "cpu": "torch-cpu"}
# Shares of the time left when a part starts: later parts get what earlier ones leave.
SHARES = {"table": 0.4, "plans": 0.35, "phase1": 0.5}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# The run folder: prepared here, staged into a scratch folder there


def git_state() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the repository, or None where there is no git (the GPU machine's copy)."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def code_digest() -> str:
    """sha256 of the code that runs (src/hant and this script, paths and contents): names the
    code on a machine without git, and shows whether it is the code a commit holds."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted([*(ROOT / "src" / "hant").rglob("*.py"), *(ROOT / "src" / "hant").rglob("*.yaml"),
                     Path(__file__).resolve()]):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stage_run(src: Path, dest: Path) -> dict[str, Any]:
    """Copy the part of run folder `src` that timing and phase 1 read into `dest` (replaced).

    Copies config.yaml, layers.json and the plans (not the pick rankings), and the teacher
    checkpoint as `dest/teacher.safetensors`: the config's checkpoint where that file
    exists, else `src/teacher.safetensors` (a prepared folder on another machine). The
    copied config points at the copy by absolute path; `Run(dest).check_teacher()` then
    checks it against the sha256 `init` recorded. Returns what was copied. Raises HantError
    when the run folder is incomplete or the checkpoint is missing or changed.
    """
    from hant.errors import HantError
    from hant.run import Run

    src_run = Run(src)
    cfg = src_run.config
    ckpt = Path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    if ckpt is None or not ckpt.is_file():
        ckpt = src / TEACHER_FILE
    if not ckpt.is_file():
        raise HantError(f"no teacher checkpoint for {src}: neither {cfg.model.checkpoint} nor {src / TEACHER_FILE} "
                        "exists; prepare the folder again with --prepare")
    if dest.resolve() == src.resolve():
        raise HantError(f"cannot stage {src} onto itself; give another destination")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "plans").mkdir(parents=True)
    shutil.copyfile(src_run.dir.layers, dest / "layers.json")
    plans = [p for p in sorted((src / "plans").glob("*.json")) if not p.name.endswith(".pick.json")]
    for p in plans:
        shutil.copyfile(p, dest / "plans" / p.name)
    shutil.copyfile(ckpt, dest / TEACHER_FILE)
    meta = ckpt.with_suffix(".json")  # what `hant train-teacher` recorded (test accuracy, recipe)
    if meta.is_file():
        shutil.copyfile(meta, dest / "teacher.json")
    cfg.model.checkpoint = str((dest / TEACHER_FILE).resolve())
    cfg.save(dest / "config.yaml")
    Run(dest).check_teacher()
    return {"source_run": str(src.resolve()), "teacher_checkpoint": str(ckpt),
            "teacher_sha256": src_run.layers_doc.get("checkpoint_sha256"), "plans": [p.stem for p in plans]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(src: Path, dest: Path, budget_s: int) -> dict[str, Any]:
    """Stage `src` into `dest/run` for the GPU machine and record how (`dest/prepared.json`).

    Prints the device command. Returns the record.
    """
    from hant.workspace import write_json

    dest.mkdir(parents=True, exist_ok=True)
    record = stage_run(src, dest / "run")
    record.update(prepared_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), git=git_state(), code_sha256=code_digest(),
                  host_torch=torch.__version__)
    write_json(dest / PREPARED_RECORD, record)
    size = folder_bytes(dest)
    inside = dest.resolve().is_relative_to(ROOT)
    rel = dest.resolve().relative_to(ROOT) if inside else dest.resolve()
    if inside:
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(rel)]).returncode == 0
        if not ignored:
            log(f"warning: {rel} is not ignored by git; add '/{rel}/' to .git/info/exclude so it is never committed")
    log(f"prepared {rel}: {len(record['plans'])} plans, teacher {record['teacher_sha256'][:12]}, "
        f"{size / 2**20:.1f} MiB")
    timeout = budget_s + 60
    print("\ndevice command (carry [\"%s\"], timeout_s %d):\n  PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu.py "
          "--run %s/run --out $OUT/gpu.json --budget-s %d\n" % (rel, timeout, rel, budget_s), flush=True)
    return record


# ---------------------------------------------------------------------------------------------
# Recording


def clean(obj: Any) -> Any:
    """`obj` as strict JSON values: NaN and infinities become None, tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def fingerprint(device: str, prepared: dict[str, Any] | None) -> dict[str, Any]:
    """Machine, accelerator, library versions and the code's commit (from git, else from the prepare step)."""
    from hant.latency import cpu_model

    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except Exception:  # absent or broken: say so rather than stop the benchmark
            return None

    fp: dict[str, Any] = {
        "python": platform.python_version(), "system": platform.platform(), "machine": platform.machine(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "onnxruntime": version("onnxruntime"), "timm": version("timm"), "numpy": version("numpy"),
        "scipy": version("scipy"), "torch_threads": torch.get_num_threads(),
        "git": git_state(), "git_at_prepare": (prepared or {}).get("git"), "code_sha256": code_digest(),
        "code_sha256_at_prepare": (prepared or {}).get("code_sha256"),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fp["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                     "multiprocessors": props.multi_processor_count}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit,mig.mode.current",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            fp["gpu"]["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:200]
        except (OSError, subprocess.SubprocessError) as e:
            fp["gpu"]["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return fp


class Report:
    """The result JSON, rewritten atomically after every part."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path, self.doc = path, doc

    def write(self) -> None:
        from hant.workspace import atomic_write_text

        self.doc["wall_s"] = round(time.perf_counter() - T0, 1)
        self.doc["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(clean(self.doc), indent=2) + "\n")


class Budget:
    """Wall-clock seconds left of --budget-s, counted from the start of the script."""

    def __init__(self, total_s: float):
        self.total_s = float(total_s)

    def left(self) -> float:
        return max(0.0, self.total_s - (time.perf_counter() - T0))


class Stop(BaseException):
    """SIGTERM (a time limit): stop the part in progress, write what is done. Not an
    Exception, so that no `except Exception` on the way (a candidate that fails to build is
    recorded and skipped) mistakes it for the part's own failure."""


def _on_term(signum, frame):
    raise Stop(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# Part 1: the latency table and its validation


def set_latency(run: Path, **fields: Any) -> dict[str, Any]:
    """Change fields of the `latency` section of RUN/config.yaml (the scratch copy); return the section."""
    import dataclasses

    from hant.config import RunConfig

    cfg = RunConfig.load(run / "config.yaml")
    for k, v in fields.items():
        setattr(cfg.latency, k, v)
    cfg.save(run / "config.yaml")
    return dataclasses.asdict(cfg.latency)


def pct_errors(pred: list[float], meas: list[float]) -> dict[str, Any]:
    """Median, mean and max of |predicted - measured| / measured in percent, and the signed median."""
    errs = [100.0 * (p - m) / m for p, m in zip(pred, meas) if m and m > 0]
    if not errs:
        return {"n": 0}
    absolute = [abs(e) for e in errs]
    return {"n": len(errs), "median_abs_pct": statistics.median(absolute), "mean_abs_pct": statistics.fmean(absolute),
            "max_abs_pct": max(absolute), "median_signed_pct": statistics.median(errs)}


def table_part(run: Path, target_id: str, batch: int, validate: int, share_s: float, tables_dir: Path
               ) -> dict[str, Any]:
    """Measure the table at `batch` with validation, the rounds capped to fit `share_s`; summarise it."""
    from hant.latency import measure_table

    # Entries, fixed part and validation are each capped by time_cap_s; preparing the
    # candidates and networks comes on top, hence a quarter of the share each.
    cap = max(1.0, share_s / 4.0)
    latency_cfg = set_latency(run, time_cap_s=round(cap, 1))
    log(f"table {target_id} b{batch}: validate {validate}, time cap {cap:.0f} s per stage of the table")
    t0 = time.perf_counter()
    table = measure_table(run, target=target_id, batch_size=batch, validate=validate, progress=False,
                          log=lambda m: log(m))
    wall = time.perf_counter() - t0
    tables_dir.mkdir(parents=True, exist_ok=True)
    (tables_dir / f"{table['table_id']}.json").write_text(json.dumps(clean(table), indent=1) + "\n")
    entries = table.get("entries") or []
    out: dict[str, Any] = {
        "table_id": table["table_id"], "target": target_id, "batch_size": batch, "wall_s": round(wall, 1),
        "build_time_s": table.get("build_time_s"), "latency_config": latency_cfg, "protocol": table.get("protocol"),
        "fingerprint": table.get("fingerprint"), "entries": len(entries), "failed": table.get("failed") or [],
        "entries_converged": sum(bool(e.get("converged")) for e in entries),
        "teacher_entries_sum_ms": sum(e["median_ms"] for e in entries if e["spec"] == "teacher"),
        "fixed_ms": table.get("fixed_ms"), "fixed_ci_ms": table.get("fixed_ci_ms"),
        "teacher_ms": table.get("teacher_ms"), "teacher_ci_ms": table.get("teacher_ci_ms"),
        "cheapest_ms": ((table.get("fixed") or {}).get("cheapest_ms") or {}).get("median_ms"),
        "file": str(tables_dir / f"{table['table_id']}.json"),
    }
    v = table.get("validation")
    if v:
        points = v.get("points") or []
        meas = [p["measured_ms"] for p in points]
        out["validation"] = {
            **{k: v.get(k) for k in ("k", "samples", "median_abs_pct_error", "max_abs_pct_error", "kendall_tau",
                                     "errors_are", "uncalibrated", "random_only", "calibration_scores", "time_s",
                                     "protocol")},
            "calibration": table.get("calibration"),
            # The same errors, spelt out from the points: the table's raw prediction, the
            # leave-one-out calibrated one (what the headline errors are when a calibration
            # is kept), and the random networks alone.
            "relative_error": {
                "uncalibrated": pct_errors([p["predicted_ms"] for p in points], meas),
                "heldout": pct_errors([p["heldout_predicted_ms"] for p in points], meas),
                "random_uncalibrated": pct_errors([p["predicted_ms"] for p in points if p["kind"] == "random"],
                                                  [p["measured_ms"] for p in points if p["kind"] == "random"]),
            },
            "measured_converged": sum(bool(p.get("converged")) for p in points),
            "points": [{k: p.get(k) for k in ("kind", "predicted_ms", "calibrated_ms", "heldout_predicted_ms",
                                              "measured_ms", "ci_lo_ms", "ci_hi_ms", "converged", "n")}
                       for p in points],
        }
        log(f"table {table['table_id']}: {len(entries)} entries, fixed {table['fixed_ms']:.3f} ms, teacher "
            f"{table['teacher_ms']:.3f} ms; validation median |error| {v['median_abs_pct_error']:.1f}%, "
            f"max {v['max_abs_pct_error']:.1f}% ({v['errors_are']}), tau {v['kendall_tau']}")
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: the run's plans end to end against the teacher


def cpu_check(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The plan's last hardware-check round on the machine it was selected for, if it has one."""
    check = plan.get("latency_check") or {}
    rounds = check.get("rounds") or []
    if not rounds:
        return None
    last = rounds[-1]
    return {**{k: last.get(k) for k in ("teacher_ms", "student_ms", "speedup", "speedup_ci_lo", "speedup_ci_hi")},
            "met": check.get("met"), "timing": {k: (check.get("timing") or {}).get(k)
                                                for k in ("target_id", "batch_size", "threads", "clock")}}


def plans_part(run: Path, target_id: str, share_s: float, tables: dict[int, dict[str, Any]],
               order: list[int]) -> dict[str, Any]:
    """Time every plan of `run` against the teacher on `target_id`, at its own batch size."""
    from hant.latency import Protocol, build_network, get_target, predict_ms
    from hant.latency.compare import time_against_teacher
    from hant.latency.table import fresh_candidate
    from hant.run import Run

    r = Run(run)
    cfg, layers = r.config, r.layers
    # By name, so that a plan comes before its alternatives and speaks for the network they share.
    names = sorted(p.stem for p in (run / "plans").glob("*.json") if not p.name.endswith(".pick.json"))
    plans = {n: r.plan(n) for n in names}
    by_batch: dict[int, dict[tuple, list[str]]] = {}
    for n, p in plans.items():
        key = tuple(sorted(p["layers"].items()))
        by_batch.setdefault(int(p.get("batch_size") or 1), {}).setdefault(key, []).append(n)
    batches = sorted(by_batch, key=lambda b: (order.index(b) if b in order else len(order), b))
    n_nets = sum(len(v) + 1 for v in by_batch.values())
    if not plans:
        log("plans: the run has no plans")
    teacher = r.teacher()
    build = functools.partial(fresh_candidate, teacher)
    rows: dict[str, dict[str, Any]] = {}
    groups = []
    for batch in batches:
        # Each batch size's timing gets its share of the part by its number of networks;
        # building them comes on top, hence two thirds.
        cap = max(1.0, share_s * 2 / 3 * (len(by_batch[batch]) + 1) / n_nets)
        proto = Protocol.from_config(cfg.latency, seed=cfg.seed, time_cap_s=cap)
        target = get_target(target_id, batch_size=batch, threads=cfg.latency.threads)
        nets, keys = {}, {}
        for i, (key, members) in enumerate(by_batch[batch].items()):
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    nets[f"n{i}"] = build_network(teacher, layers, dict(key), build)
                keys[f"n{i}"] = members
            except Exception as e:  # one plan that does not build must not sink the others
                for m in members:
                    rows[m] = {"plan": m, "error": f"{type(e).__name__}: {e}"}
        log(f"plans b{batch}: {sum(map(len, keys.values()))} plans, {len(nets)} distinct networks, "
            f"time cap {cap:.0f} s")
        t0 = time.perf_counter()
        cmp = time_against_teacher(copy.deepcopy(teacher), nets, target, r.input_shape, proto)
        t = cmp.teacher
        table = tables.get(batch)
        groups.append({"batch_size": batch, "networks": len(nets), "wall_s": round(time.perf_counter() - t0, 1),
                       "teacher_ms": t.median_ms, "teacher_ci_ms": [t.ci_lo_ms, t.ci_hi_ms], "teacher_n": t.n,
                       "teacher_converged": t.converged, "protocol": cmp.protocol.to_dict(),
                       "target_fingerprint": target.fingerprint(),
                       "gpu_table": table["table_id"] if table else None})
        for k, members in keys.items():
            s, sp = cmp.stats[k], cmp.speedups[k]
            for m in members:
                p = plans[m]
                predicted = None
                if table is not None:
                    with contextlib.suppress(Exception):  # a table without every layer predicts nothing
                        predicted = predict_ms(table, p["layers"])
                rows[m] = {
                    "plan": m, "target_as_written": p.get("target"), "batch_size": batch,
                    "same_network_as": members[0] if m != members[0] else None,
                    "requested_speedup": p.get("speedup"), "predicted_speedup_cpu_table": p.get("predicted_speedup"),
                    "cpu_check": cpu_check(p),
                    "teacher_ms": t.median_ms, "student_ms": s.median_ms, "student_ci_ms": [s.ci_lo_ms, s.ci_hi_ms],
                    "student_n": s.n, "student_converged": s.converged,
                    "speedup": sp.ratio if sp else None, "speedup_ci": [sp.lo, sp.hi] if sp else None,
                    "replaced_layers": sum(v != "teacher" for v in p["layers"].values()),
                    "gpu_table_predicted_ms": predicted, "layers": p["layers"],
                }
        log(f"plans b{batch}: teacher {t.median_ms:.3f} ms; speedups "
            + ", ".join(f"{members[0]} {cmp.speedups[k].ratio:.2f}x" for k, members in keys.items()
                        if cmp.speedups[k]))
    return {"target": target_id, "groups": groups, "rows": [rows[n] for n in names if n in rows]}


def predict_plans(plans: dict[str, Any], batch: int, table: dict[str, Any]) -> None:
    """Fill in the prediction of a table measured after the plans were timed (the later batch sizes)."""
    from hant.latency import predict_ms

    for row in plans.get("rows") or []:
        if row.get("batch_size") == batch and row.get("gpu_table_predicted_ms") is None and row.get("layers"):
            with contextlib.suppress(Exception):
                row["gpu_table_predicted_ms"] = predict_ms(table, row["layers"])


# ---------------------------------------------------------------------------------------------
# Part 3: phase 1's throughput


def cpu_phase1_reference() -> dict[str, Any] | None:
    """The CPU number of bench/phase1.py (the stage on the whole pool), to quote beside the GPU's."""
    path = RESULTS / "phase1.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stage = d.get("stage") or {}
    return {"file": str(path.relative_to(ROOT)), "command": d.get("command"), "threads": d.get("threads"),
            "candidate_images_per_s": stage.get("candidate_images_per_s"), "steps": stage.get("steps"),
            "batch_size": stage.get("batch_size"), "trained_candidates": stage.get("trained_candidates")}


def phase1_part(run: Path, device: str, per_layer: int, max_steps: int, batch_size: int | None, heldout: int,
                share_s: float, work: Path) -> dict[str, Any]:
    """Train the pool (or `per_layer` candidates of each layer) on synthetic images with
    `train_pool`: one warm-up step, then as many steps (up to `max_steps`) as fit `share_s`."""
    import dataclasses

    from hant.data import load_data
    from hant.distill import build_candidates, layer_pools
    from hant.layerwise import LayerTap, load_images
    from hant.phase1 import Phase1Options, default_max_memory_mb, peak_rss_mb, train_pool
    from hant.run import Run

    t_part = time.perf_counter()
    r = Run(run)
    cfg = r.config
    pools = layer_pools(r.layers_doc)
    if per_layer > 0:
        # As bench/phase1.py draws its subset: K trainable specs per layer, seeded.
        g = torch.Generator().manual_seed(0)
        keys = []
        for p in pools:
            options = [c for c in p.candidates if c not in ("teacher", "skip")]
            pick = torch.randperm(len(options), generator=g)[:per_layer].tolist()
            keys += [(p.name, options[i]) for i in sorted(pick)]
    else:
        keys = [(p.name, s) for p in pools for s in p.candidates]
    bs = int(batch_size or cfg.distill.batch_size)
    # synthetic:N keeps a fifth for test and holds out at most a fifth of the rest: a pool of
    # `pool` images gives `heldout` held out and at least four batches to train on.
    pool = max(5 * heldout, 4 * bs + heldout, 64)
    data_cfg = dataclasses.replace(cfg.data, spec=f"synthetic:{pool + pool // 4 + 2}", heldout=heldout)
    splits = load_data(data_cfg)
    teacher = r.teacher()
    names = list(dict.fromkeys(layer for layer, _ in keys))
    sample_images = load_images(splits.train, torch.arange(min(32, len(splits.train))))
    t0 = time.perf_counter()
    sample = {k: x for k, (x, _) in LayerTap(teacher, names)(sample_images, names).items()}
    cands = build_candidates(pools, keys, teacher, sample, cfg.seed)
    build_s = time.perf_counter() - t0
    dev = torch.device(device)
    budget_mb = cfg.distill.max_memory_mb or default_max_memory_mb(dev)
    opts = Phase1Options(steps=1, batch_size=bs, optimizer=cfg.distill.optimizer, lr=cfg.distill.lr,
                         weight_decay=cfg.distill.weight_decay, seed=cfg.seed, max_memory_bytes=int(budget_mb) << 20,
                         device=dev, progress=False)
    log(f"phase1: {len(cands)} candidates ({sum(c.trainable for c in cands)} trainable) on {len(names)} layers, "
        f"built in {build_s:.1f} s; synthetic {data_cfg.spec}, batch {bs}, {len(splits.heldout)} held out")

    def call(steps: int, folder: str) -> dict[str, Any]:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = train_pool(teacher, cands, splits.train, splits.heldout, dataclasses.replace(opts, steps=steps),
                         workdir=work / folder, log=lambda m: log(f"phase1: {m}"), sample=sample_images[:8])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        stats = {k: v for k, v in out.items() if k != "entries"}
        stats.update(steps=steps, call_wall_s=round(wall, 2),
                     candidate_images_per_s=out["candidate_images"] / max(out["train_s"], 1e-9),
                     candidate_images_per_wall_s=out["candidate_images"] / max(wall, 1e-9),
                     heldout_candidate_images_per_s=len(splits.heldout) * len(cands) / max(out["eval_s"], 1e-9),
                     failed=[f"{e['layer']}/{e['spec']}: {e.get('reason')}" for e in out["entries"]
                             if e["status"] == "failed"],
                     peak_rss_mb=round(peak_rss_mb(), 1))
        if dev.type == "cuda":
            stats.update(peak_gpu_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                         peak_gpu_reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1))
        return stats

    warm = call(1, "warm")
    # The warm-up's step includes first-call costs (kernel selection, allocator growth), so
    # the steps it suggests are a safe lower bound.
    per_step = max(warm["train_s"], 1e-3)
    overhead = warm["call_wall_s"] - warm["train_s"]  # probing, packing, held-out evaluation
    left = share_s - (time.perf_counter() - t_part) - overhead
    steps = int(max(2, min(max_steps, left / per_step)))
    log(f"phase1: warm-up step {warm['train_s']:.2f} s ({warm['candidate_images_per_s']:.0f} candidate-images/s); "
        f"measuring {steps} steps")
    measured = call(steps, "measured")
    log(f"phase1: {measured['candidate_images_per_s']:.0f} candidate-images/s over {steps} steps, "
        f"{measured['teacher_passes']} teacher passes, {measured['groups']} group(s)"
        + (f", peak GPU {measured['peak_gpu_allocated_mb']:.0f} MiB" if "peak_gpu_allocated_mb" in measured else ""))
    return {
        "device": str(dev), "data": data_cfg.spec, "input_shape": list(r.input_shape), "batch_size": bs,
        "candidates": len(cands), "trainable": sum(c.trainable for c in cands), "layers": len(names),
        "subset": {"per_layer": per_layer, "drawn_like": "bench/phase1.py subset"} if per_layer > 0 else "whole pool",
        "max_memory_mb": int(budget_mb), "build_s": round(build_s, 2), "warmup": warm, "measured": measured,
        "candidate_images_per_s": measured["candidate_images_per_s"],
        "autocast": "bf16" if dev.type == "cuda" else None, "cpu_reference": cpu_phase1_reference(),
        "wall_s": round(time.perf_counter() - t_part, 1),
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder (with --prepare: the one to copy from)")
    ap.add_argument("--prepare", action="store_true", help="copy what the GPU run needs into --dest and stop")
    ap.add_argument("--dest", default=str(PREPARED), help="with --prepare: the folder to prepare (git-ignored)")
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    ap.add_argument("--budget-s", type=float, default=360.0, help="wall-clock seconds for all parts together")
    ap.add_argument("--device", choices=sorted(TARGETS), default="cuda",
                    help="cuda: torch-cuda and phase 1 on the GPU; cpu: the same on the CPU (smoke test)")
    ap.add_argument("--parts", default="table,plans,phase1", help="comma-separated subset of table,plans,phase1")
    ap.add_argument("--table-batches", default="64,1", help="the first before the plans, the others last")
    ap.add_argument("--validate", type=int, default=16, help="random networks in each table's validation")
    ap.add_argument("--phase1-per-layer", type=int, default=0, help="candidates per layer (0: the whole pool)")
    ap.add_argument("--phase1-steps", type=int, default=16, help="at most this many measured steps")
    ap.add_argument("--phase1-batch-size", type=int, default=None, help="default: the run's distill.batch_size")
    ap.add_argument("--phase1-heldout", type=int, default=256, help="held-out images evaluated after training")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --prepare, the prepare step); return the exit status."""
    args = parse_args(argv)
    if args.prepare:
        prepare(Path(args.run), Path(args.dest), int(args.budget_s))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(SHARES)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))}; choose from {', '.join(SHARES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; use --device cpu for the smoke run")
    batches = [int(b) for b in args.table_batches.split(",") if b]
    target_id = TARGETS[args.device]
    budget = Budget(args.budget_s)
    out = Path(args.out)
    tables_dir = out.with_name(out.stem + "-tables")
    src = Path(args.run)
    prepared_file = src.parent / PREPARED_RECORD
    prepared = json.loads(prepared_file.read_text()) if prepared_file.is_file() else None
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "PYTHONUNBUFFERED") if k in os.environ)
    report = Report(out, {
        "benchmark": "bench/gpu.py",
        "command": (env + " " if env else "") + shlex.join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s, "device": args.device,
        "target": target_id, "fingerprint": fingerprint(args.device, prepared), "prepared": prepared,
        "parts_planned": [], "parts_done": [], "skipped": {}, "errors": {},
    })
    signal.signal(signal.SIGTERM, _on_term)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hant-gpu-"))
    run = work / "run"
    staged = stage_run(src, run)
    from hant.run import Run

    r = Run(run)
    report.doc["run"] = {"source": (prepared or staged)["source_run"], "model": r.layers_doc.get("model"),
                         "input_shape": list(r.input_shape), "layers": len(r.layers),
                         "candidates": sum(len(v) for v in r.pools.values()), "space": r.layers_doc.get("space"),
                         "teacher_sha256": r.layers_doc.get("checkpoint_sha256"), "plans": len(staged["plans"]),
                         "latency_config": r.config.to_dict()["latency"]}
    if (run / "teacher.json").is_file():
        report.doc["run"]["teacher_test_top1"] = json.loads((run / "teacher.json").read_text()).get("test_top1")

    # The order of the standing request: the first table, the plans, phase 1, then the other tables.
    steps: list[tuple[str, int | None]] = []
    if "table" in parts and batches:
        steps.append(("table", batches[0]))
    steps += [(p, None) for p in ("plans", "phase1") if p in parts]
    if "table" in parts:
        steps += [("table", b) for b in batches[1:]]
    report.doc["parts_planned"] = [f"{p}-b{b}" if b else p for p, b in steps]
    report.write()
    try:
        status = run_parts(steps, run, r, args, target_id, batches, budget, tables_dir, report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if status == 124:
        return status
    report.doc["finished"] = True
    report.write()
    log(f"done in {time.perf_counter() - T0:.0f} s -> {out}")
    return status


def run_parts(steps: list[tuple[str, int | None]], run: Path, r, args: argparse.Namespace, target_id: str,
              batches: list[int], budget: Budget, tables_dir: Path, report: Report) -> int:
    """Run the parts in order, each with its share of the time left; write the JSON after each.

    Returns 0, 1 when a part failed (recorded, the others still ran), or 124 when a signal
    stopped the run (what was done is written)."""
    tables: dict[int, dict[str, Any]] = {}
    status = 0
    work = run.parent
    for i, (part, batch) in enumerate(steps):
        name = f"{part}-b{batch}" if batch else part
        left = budget.left()
        later_tables = part == "table" and i > 0
        share = left / (len(steps) - i) if later_tables else left * SHARES[part]
        if left < max(3.0, 0.05 * args.budget_s):
            report.doc["skipped"][name] = f"{left:.0f} s of the budget left"
            log(f"{name}: skipped, {left:.0f} s left")
            continue
        log(f"{name}: starting with {left:.0f} s left, share {share:.0f} s")
        t0 = time.perf_counter()
        try:
            if part == "table":
                result = table_part(run, target_id, batch, args.validate, share, tables_dir)
                report.doc.setdefault("latency_tables", {})[f"b{batch}"] = result
                with contextlib.suppress(Exception):
                    tables[batch] = r.table(target_id, batch)
                if batch in tables and report.doc.get("plans"):
                    predict_plans(report.doc["plans"], batch, tables[batch])
            elif part == "plans":
                report.doc["plans"] = plans_part(run, target_id, share, tables, batches)
            else:
                report.doc["phase1"] = phase1_part(run, args.device, args.phase1_per_layer, args.phase1_steps,
                                                   args.phase1_batch_size, args.phase1_heldout, share, work / "phase1")
            report.doc["parts_done"].append(name)
        except (Stop, KeyboardInterrupt, SystemExit) as e:
            # A time limit's SIGTERM: ours (Stop), or phase 1's own handler, which ends the
            # step in progress and exits.
            why = f"{type(e).__name__} {e}".strip()
            report.doc["errors"][name] = f"stopped ({why}) after {time.perf_counter() - t0:.0f} s"
            report.write()
            log(f"{name}: stopped ({why}); results so far in {report.path}")
            return 124
        except Exception as e:  # record it and go on: the next part may still work
            status = 1
            report.doc["errors"][name] = {"error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc().splitlines()[-12:]}
            log(f"{name}: failed: {type(e).__name__}: {e}")
        report.doc.setdefault("part_wall_s", {})[name] = round(time.perf_counter() - t0, 1)
        report.write()
    return status


if __name__ == "__main__":
    from hant.errors import HantError

    try:
        sys.exit(main())
    except HantError as e:  # a run folder that cannot be prepared or staged: one line says why
        print(f"bench/gpu.py: {e}", file=sys.stderr)
        sys.exit(2)
