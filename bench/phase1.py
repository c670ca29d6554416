"""Benchmark of phase 1 (layer-wise distillation) on EfficientNet-B0, Fashion-MNIST, `default` space.

1. The stage itself (`hant distill` in a subprocess) on the whole pool for a few steps:
   candidate-images per second of the one-pass design, teacher passes, peak RSS, the
   run folder (candidates/index.json per DESIGN.md).
2. Throughput of the one-pass design against (a) one teacher pass per layer (all of that
   layer's candidates) and (b) one teacher pass per candidate:
   - on the whole pool, accounted from measured parts: the three designs run the same
     candidate steps and differ only in how many teacher passes they make, so each one's
     time is the stage's measured candidate time plus its passes, each pass timed on its
     own (teacher forward up to that layer, batch as in training);
   - measured directly, end to end, on a subset (K candidates per layer) with each design,
     which also checks the accounting above.
   The baselines stop the teacher's forward at their layer, as the engine does: that
   makes them faster than a naive full forward, so the speedups are conservative.
3. Quality: held-out normalised MSE after the default budget of images, teacher init
   against random init, for every candidate of some layers where teacher init applies;
   the median ratio and the share of candidates where teacher init is better.

The teacher is the demo's trained one when it is in the cache (~/.cache/hant/teachers);
otherwise a randomly initialised EfficientNet-B0 whose BatchNorm statistics are set on
Fashion-MNIST images (said so in the JSON). Writes bench/results/phase1.json.

    .venv/bin/python bench/phase1.py                       # ~20-30 min on a loaded 2-core machine
    .venv/bin/python bench/phase1.py --quick               # a few minutes: small subsets
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEACHER_CACHE = Path(os.environ.get("HANT_CACHE", Path.home() / ".cache" / "hant")) / "teachers"


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def find_teacher(explicit: str | None, input_size: int) -> Path | None:
    if explicit:
        return Path(explicit)
    for name in (f"efficientnet_b0-fmnist{input_size}", f"efficientnet_b0-fashion-mnist{input_size}"):
        p = TEACHER_CACHE / f"{name}.safetensors"
        if p.exists():
            return p
    return None


def calibrated_teacher(out: Path, input_size: int, images: int = 2048) -> Path:
    """A random EfficientNet-B0 whose BatchNorm statistics are those of Fashion-MNIST images."""
    from safetensors.torch import save_file

    from hant.config import DataConfig
    from hant.data import load_data
    from hant.teacher import create_model

    torch.manual_seed(0)
    model = create_model("timm:efficientnet_b0", 1, 10)
    splits = load_data(DataConfig(spec="fashion-mnist", input_size=input_size))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        for start in range(0, images, 128):
            model(splits.train.get_batch(torch.arange(start, start + 128))[0])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def make_run(run: Path, teacher: Path, input_size: int, heldout_images: int) -> None:
    from hant.run import init_run

    cfg = run.parent / f"{run.name}.config.yaml"
    cfg.write_text(yaml.safe_dump({"distill": {"heldout_images": heldout_images}}))
    init_run(run, model="timm:efficientnet_b0", checkpoint=str(teacher), data="fashion-mnist",
             input_size=input_size, space="default", config=str(cfg), log=lambda s: None)


def stage_run(run: Path, images: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "hant.cli", "distill", "--run", str(run), "--images", str(images)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hant distill failed:\n{proc.stderr[-3000:]}")
    index = json.loads((run / "candidates" / "index.json").read_text())
    return {"index": index, "wall_s": time.time() - t0}


def prefix_times(teacher, layers: list[str], images: torch.Tensor, reps: int = 3) -> dict[str, float]:
    """Seconds of one teacher pass up to each layer (the pass a per-layer or per-candidate design makes)."""
    from hant.layerwise import LayerTap

    tap = LayerTap(teacher, layers)
    tap(images, [layers[-1]])  # warm-up
    out = {}
    for layer in layers:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            tap(images, [layer])
            ts.append(time.perf_counter() - t0)
        out[layer] = statistics.median(ts)
    t0 = time.perf_counter()
    tap(images, layers)
    out["*all*"] = time.perf_counter() - t0
    return out


class Head:
    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return self.n

    def get_batch(self, idx):
        return self.ds.get_batch(idx)


def build(pools, keys, teacher, sample, seed, teacher_init=True, suffix=""):
    """Candidates for `keys`; with teacher_init=False they start random (spec label + suffix)."""
    from hant import ops
    from hant.distill import build_candidates
    from hant.phase1 import Candidate
    from hant.layerwise import candidate_seed

    if teacher_init:
        return build_candidates(pools, keys, teacher, sample, seed)
    by = {p.name: p for p in pools}
    out = []
    for layer, spec in keys:
        p = by[layer]
        torch.manual_seed(candidate_seed(seed, layer, spec + suffix))
        m = ops.build(spec, p.in_chs, p.out_chs, p.stride, teacher.get_submodule(layer))
        out.append(Candidate(layer, spec + suffix, m, init="random"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--teacher", default=None, help="teacher weights (default: the demo's cached teacher)")
    ap.add_argument("--stage-images", type=int, default=256, help="images per candidate in the stage run")
    ap.add_argument("--stage-heldout", type=int, default=256, help="held-out images in the stage run")
    ap.add_argument("--subset-per-layer", type=int, default=2)
    ap.add_argument("--subset-steps", type=int, default=2)
    ap.add_argument("--quality-layers", default="blocks.3.1,blocks.5.1")
    ap.add_argument("--quality-images", type=int, default=None, help="default: the config's default budget")
    ap.add_argument("--quality-heldout", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="small everything, for a smoke test")
    ap.add_argument("--out", default=str(RESULTS / "phase1.json"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.stage_images, args.stage_heldout, args.subset_per_layer = 128, 128, 1
        args.subset_steps, args.quality_layers, args.quality_images = 1, "blocks.5.1", 256
    torch.set_num_threads(args.threads)

    from hant.config import DistillConfig, RunConfig
    from hant.data import load_data
    from hant.distill import images_per_candidate, layer_pools
    from hant.phase1 import Phase1Options, train_pool
    from hant.layerwise import BatchPlan, LayerTap, load_images
    from hant.teacher import load_teacher

    work = Path(args.workdir or tempfile.mkdtemp(prefix="hant-bench-phase1-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": " ".join(["python", "bench/phase1.py", *map(shlex.quote, sys.argv[1:])]),
                    "threads": args.threads, "cpu_count": os.cpu_count(), "load_avg_start": load_avg(),
                    "torch": torch.__version__}
    t_all = time.time()

    teacher_file = find_teacher(args.teacher, args.input_size)
    if teacher_file is not None:
        result["teacher"] = {"kind": "trained", "file": str(teacher_file)}
        meta = teacher_file.with_suffix(".json")
        if meta.exists():
            result["teacher"]["test_top1"] = json.loads(meta.read_text()).get("test_top1")
    else:
        teacher_file = calibrated_teacher(work / "teacher.safetensors", args.input_size)
        result["teacher"] = {"kind": "random init, BatchNorm statistics set on 2048 Fashion-MNIST images "
                                     "(the trained demo teacher was not in the cache)"}

    run = work / "run"
    if not (run / "layers.json").exists():
        make_run(run, teacher_file, args.input_size, args.stage_heldout)
    cfg = RunConfig.load(run / "config.yaml")
    doc = json.loads((run / "layers.json").read_text())
    pools = layer_pools(doc)
    n_cands = sum(len(p.candidates) for p in pools)
    result["pool"] = {"layers": len(pools), "candidates": n_cands, "input_size": doc["input_size"],
                      "space": doc["space"]}
    print(f"pool: {len(pools)} layers, {n_cands} candidates; teacher: {result['teacher']['kind']}", flush=True)

    # 1. The stage on the whole pool.
    stage = stage_run(run, args.stage_images, args.threads)
    idx = stage["index"]
    s = idx["phase1"]
    entries = idx["candidates"]
    trained = [e for e in entries if e["steps"] > 0]
    cand_s = sum(e["train_s"] for e in trained)
    result["stage"] = {k: s[k] for k in ("images_per_candidate", "heldout_images", "batch_size", "steps", "groups",
                                         "teacher_passes", "teacher_images", "candidate_images", "train_s", "eval_s",
                                         "teacher_train_s", "optimizer_s", "peak_rss_mb", "max_memory_mb",
                                         "candidate_images_per_s")}
    result["stage"].update(wall_s=round(stage["wall_s"], 1), candidates_done=sum(e["status"] == "done" for e in entries),
                           candidates_failed=sum(e["status"] == "failed" for e in entries),
                           trained_candidates=len(trained), candidate_step_s=round(cand_s, 2),
                           run_folder=str(run))
    result["peak_rss_mb"] = round(s["peak_rss_mb"], 1)
    # Phase 1 of the demo at the default budget, at the rates just measured on this machine.
    default_images = images_per_candidate(RunConfig(distill=DistillConfig()), None, 55000)
    default_images = -(-default_images // s["batch_size"]) * s["batch_size"]
    eval_rate = s["heldout_images"] / max(s["eval_s"], 1e-9)  # held-out images per second, all candidates
    demo_s = (len(trained) * default_images / s["candidate_images_per_s"]
              + DistillConfig().heldout_images / eval_rate)
    result["demo_phase1_estimate"] = {"images_per_candidate": default_images,
                                      "heldout_images": DistillConfig().heldout_images,
                                      "seconds_at_measured_rate": round(demo_s), "threads": args.threads,
                                      "load_avg": load_avg()}
    print(f"stage: {s['candidate_images_per_s']:.0f} candidate-images/s, {s['teacher_passes']} teacher passes, "
          f"peak RSS {s['peak_rss_mb']:.0f} MB", flush=True)

    # 2a. Accounting for the whole pool: one-pass vs per-layer vs per-candidate.
    splits = load_data(cfg.data)
    teacher = load_teacher(cfg.model.source, cfg.data.in_chans, cfg.data.num_classes, cfg.model.checkpoint).eval()
    teacher.to(memory_format=torch.channels_last)
    plan = BatchPlan(len(splits.train), cfg.distill.batch_size, cfg.seed)
    images = load_images(splits.train, plan.indices(0)).contiguous(memory_format=torch.channels_last)
    names = [p.name for p in pools]
    pre = prefix_times(teacher, names, images)
    steps = s["steps"]
    rest = s["train_s"] - s["teacher_train_s"]  # candidate steps, optimiser, data: the same in every design
    one_pass_s = s["train_s"]
    per_layer_s = rest + steps * sum(pre[n] for n in names)
    per_cand_s = rest + steps * sum(pre[e["layer"]] for e in trained)
    result["teacher_pass_s"] = {"full_to_last_layer": round(pre["*all*"], 4),
                                "per_layer": {n: round(pre[n], 4) for n in names}}
    # Naive baselines run the whole teacher for every pass instead of stopping at the layer.
    full = pre["*all*"]
    naive_layer_s = rest + steps * len(names) * full
    naive_cand_s = rest + steps * len(trained) * full
    result["whole_pool"] = {
        "method": "stage run measured; baselines = the same candidate work plus their teacher passes, each timed",
        "one_pass_s": round(one_pass_s, 2), "per_layer_s": round(per_layer_s, 2),
        "per_candidate_s": round(per_cand_s, 2),
        "teacher_share_of_one_pass": round(s["teacher_train_s"] / max(one_pass_s, 1e-9), 4),
        "speedup_vs_per_layer": round(per_layer_s / one_pass_s, 3),
        "speedup_vs_per_candidate": round(per_cand_s / one_pass_s, 3),
        "speedup_vs_per_layer_full_forward": round(naive_layer_s / one_pass_s, 3),
        "speedup_vs_per_candidate_full_forward": round(naive_cand_s / one_pass_s, 3),
    }
    print(f"whole pool: x{per_layer_s / one_pass_s:.2f} vs per-layer, x{per_cand_s / one_pass_s:.2f} vs "
          f"per-candidate (teacher {100 * s['teacher_train_s'] / one_pass_s:.1f}% of one-pass)", flush=True)

    # 2b. Direct measurement of the three designs on a subset.
    sample_imgs = images[:32].contiguous()
    sample = {k: x for k, (x, _) in LayerTap(teacher, names)(sample_imgs, names).items()}
    g = torch.Generator().manual_seed(0)
    subset = []
    for p in pools:
        options = [c for c in p.candidates if c not in ("teacher", "skip")]
        pick = torch.randperm(len(options), generator=g)[: args.subset_per_layer].tolist()
        subset += [(p.name, options[i]) for i in sorted(pick)]
    held = Head(splits.heldout, 16)
    opts = Phase1Options(steps=args.subset_steps, batch_size=plan.batch_size, seed=cfg.seed, progress=False,
                         heldout_batch_size=16)

    def timed(groups_of_keys):
        total_train, total_images, passes = 0.0, 0, 0
        for keys in groups_of_keys:
            cands = build(pools, keys, teacher, sample, cfg.seed)
            out = train_pool(teacher, cands, splits.train, held, opts, workdir=work / "subset", log=lambda m: None,
                             sample=sample_imgs[:8])
            total_train += out["train_s"]
            total_images += sum(e["images"] for e in out["entries"])
            passes += out["teacher_passes"]
        return total_train, total_images, passes

    modes = {}
    modes["one_pass"] = timed([subset])
    modes["per_layer"] = timed([[k for k in subset if k[0] == n] for n in names])
    modes["per_candidate"] = timed([[k] for k in subset])
    rate = {m: v[1] / v[0] for m, v in modes.items()}
    result["subset"] = {
        "candidates": len(subset), "per_layer": args.subset_per_layer, "steps": args.subset_steps,
        "specs": [f"{a}/{b}" for a, b in subset],
        "candidate_images_per_s": {m: round(r, 2) for m, r in rate.items()},
        "train_s": {m: round(v[0], 2) for m, v in modes.items()},
        "teacher_passes": {m: v[2] for m, v in modes.items()},
        "speedup_vs_per_layer": round(rate["one_pass"] / rate["per_layer"], 3),
        "speedup_vs_per_candidate": round(rate["one_pass"] / rate["per_candidate"], 3),
    }
    print(f"subset ({len(subset)} candidates): {result['subset']['candidate_images_per_s']}", flush=True)

    # 3. Quality: teacher init against random init, same budget.
    q_layers = [n for n in args.quality_layers.split(",") if n]
    q_images = args.quality_images or images_per_candidate(RunConfig(distill=DistillConfig()), None,
                                                           len(splits.train))
    q_keys = [(p.name, c) for p in pools if p.name in q_layers for c in p.candidates if c not in ("teacher", "skip")]
    t_cands = build(pools, q_keys, teacher, sample, cfg.seed)
    applies = [c for c in t_cands if c.init != "random"]
    r_cands = build(pools, [(c.layer, c.spec) for c in applies], teacher, sample, cfg.seed, teacher_init=False,
                    suffix="#random")
    q_opts = Phase1Options(steps=-(-q_images // plan.batch_size), batch_size=plan.batch_size, seed=cfg.seed,
                           progress=False)
    out = train_pool(teacher, applies + r_cands, splits.train, Head(splits.heldout, args.quality_heldout), q_opts,
                     workdir=work / "quality", log=lambda m: None, sample=sample_imgs[:8])
    by = {(e["layer"], e["spec"]): e for e in out["entries"]}
    rows = []
    for c in applies:
        a, b = by[(c.layer, c.spec)], by[(c.layer, c.spec + "#random")]
        if a["heldout_loss"] is None or b["heldout_loss"] is None:
            continue
        rows.append({"layer": c.layer, "spec": c.spec, "init": c.init, "teacher_init_loss": a["heldout_loss"],
                     "random_init_loss": b["heldout_loss"], "ratio": a["heldout_loss"] / max(b["heldout_loss"], 1e-12)})
    ratios = [r["ratio"] for r in rows]
    result["quality"] = {
        "layers": q_layers, "images_per_candidate": q_opts.steps * plan.batch_size,
        "heldout_images": min(args.quality_heldout, len(splits.heldout)), "candidates_compared": len(rows),
        "median_ratio": round(statistics.median(ratios), 4) if ratios else None,
        "share_teacher_init_better": round(sum(r < 1 for r in ratios) / len(ratios), 3) if ratios else None,
        "median_teacher_init_loss": round(statistics.median(r["teacher_init_loss"] for r in rows), 5) if rows else None,
        "median_random_init_loss": round(statistics.median(r["random_init_loss"] for r in rows), 5) if rows else None,
        "train_s": round(out["train_s"], 1), "rows": rows,
    }
    print(f"quality: median ratio {result['quality']['median_ratio']}, teacher init better for "
          f"{result['quality']['share_teacher_init_better']}", flush=True)

    # Headline fields: the whole default pool against baselines that stop the teacher at their
    # layer (the conservative reading); the subset and the full-forward baselines sit beside it.
    result["speedup_vs_per_candidate"] = result["whole_pool"]["speedup_vs_per_candidate"]
    result["speedup_vs_per_layer"] = result["whole_pool"]["speedup_vs_per_layer"]
    result["teacher_init_median_loss_ratio"] = result["quality"]["median_ratio"]
    result["goals"] = {"speedup_vs_per_candidate": 5.0, "speedup_vs_per_layer": 1.5,
                       "teacher_init_median_loss_ratio": "< 1 for the large majority"}
    result["goals_met"] = {"speedup_vs_per_candidate": result["speedup_vs_per_candidate"] >= 5.0,
                           "speedup_vs_per_layer": result["speedup_vs_per_layer"] >= 1.5,
                           "teacher_init": bool(ratios) and result["quality"]["share_teacher_init_better"] >= 0.8}
    result["load_avg_end"] = load_avg()
    result["wall_s"] = round(time.time() - t_all, 1)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
