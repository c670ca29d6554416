"""Benchmark of phase 2 (selection): solve time, optimality, and fidelity of the linear model.

    python bench/select_bench.py                       # solve time + optimality (synthetic costs)
    python bench/select_bench.py --sections fidelity --run RUN --target T   # add the fidelity check

1. Solve time of the integer program (HiGHS via scipy.optimize.milp) on random instances of
   100 layers x 200 candidates, and on the EfficientNet-B0 pool: a run's (--pool-run with a
   latency table; its scores, or synthetic ones when it has none), else the `full` space's
   pool shape at 1x64x64 with synthetic latencies and scores (said so in the JSON).
2. Optimality: random instances of 5 layers x 4 candidates against enumeration of all 1024
   plans; the mean gap of the greedy and random baselines.
3. Fidelity (needs RUN with scores): plans across budgets from the fastest to the teacher,
   plus random plans; each is assembled from phase-1 weights (no fine-tuning, no BatchNorm
   re-estimation) and its held-out loss measured; Kendall's tau between the predicted score
   (sum of per-layer d_loss) and the measured loss.

Writes bench/results/select.json (see `--out`); sections not run keep their earlier numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from hant.solver import (exhaustive, greedy, plan_totals, random_feasible, solve)


def _budget(lat, fixed, frac):
    lo = fixed + sum(t.min() for t in lat)
    hi = fixed + sum(t.max() for t in lat)
    return lo + frac * (hi - lo)


def _gap_pct(value, best):
    return 100.0 * (value - best) / abs(best) if best else 0.0


def bench_random(instances: int, layers: int, cands: int, seed: int, correlated: bool) -> dict:
    """Median solve time over `instances` random instances x three budget tightnesses."""
    rng = np.random.default_rng(seed)
    times, cpu_times, greedy_gaps, random_gaps, statuses = [], [], [], [], []
    for _ in range(instances):
        lat = [rng.uniform(0.05, 1.0, cands) for _ in range(layers)]
        if correlated:
            # Scores fall as latency rises, with noise: the structure of a real pool, and the
            # hard case for a knapsack solver.
            costs = [np.clip((1.0 - t) * rng.uniform(0.5, 1.5, cands) + rng.normal(0, 0.05, cands), 0, None)
                     for t in lat]
        else:
            costs = [rng.uniform(0, 1, cands) for _ in range(layers)]
        for frac in (0.1, 0.3, 0.6):
            b = _budget(lat, 0.0, frac)
            cpu = time.process_time()
            sol = solve(costs, lat, b)
            cpu_times.append(time.process_time() - cpu)
            times.append(sol.solve_time_s)
            statuses.append(sol.status)
            greedy_gaps.append(_gap_pct(greedy(costs, lat, b).objective, sol.objective))
            random_gaps.append(_gap_pct(random_feasible(costs, lat, b, rng=rng).objective, sol.objective))
    return {"layers": layers, "candidates": cands, "solves": len(times),
            "costs": "correlated with latency (score ~ (1 - lat) * U(0.5, 1.5) + N(0, 0.05))" if correlated
            else "independent uniform", "budgets": "10%, 30%, 60% of the way from fastest to slowest",
            "solve_time_s_median": statistics.median(times), "solve_time_s_max": max(times),
            "cpu_time_s_median": statistics.median(cpu_times),
            "all_optimal": all(s == "optimal" for s in statuses),
            "greedy_mean_gap_pct": float(np.mean(greedy_gaps)), "random_mean_gap_pct": float(np.mean(random_gaps))}


def bench_brute_force(instances: int, layers: int, cands: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    matches, greedy_gaps, random_gaps, infeasible = 0, [], [], 0
    for _ in range(instances):
        costs = [rng.uniform(0, 1, cands) for _ in range(layers)]
        lat = [rng.uniform(0.1, 1.0, cands) for _ in range(layers)]
        b = _budget(lat, 0.0, float(rng.uniform(0.05, 0.95)))
        best = exhaustive(costs, lat, b)
        sol = solve(costs, lat, b)
        ok = abs(sol.objective - best.objective) <= 1e-9 * max(1.0, abs(best.objective))
        ok &= plan_totals(sol.choice, lat) <= b * (1 + 1e-9)
        matches += int(ok)
        greedy_gaps.append(_gap_pct(greedy(costs, lat, b).objective, best.objective))
        random_gaps.append(_gap_pct(random_feasible(costs, lat, b, rng=rng).objective, best.objective))
    return {"instances": instances, "layers": layers, "candidates": cands, "matches": matches,
            "infeasible": infeasible,
            "greedy_mean_gap_pct": float(np.mean(greedy_gaps)),
            "greedy_optimal_fraction": float(np.mean([g <= 1e-7 for g in greedy_gaps])),
            "random_mean_gap_pct": float(np.mean(random_gaps))}


def _real_pool(run: str | None, target: str | None, seed: int):
    """(costs, lat, fixed, teacher_ms, description): a run's pool, or EfficientNet-B0's shape."""
    if run and target:
        from hant.latency import load_table
        from hant.select import build_pool, predicted_latency, teacher_latency
        from hant.workspace import RunDir, read_json

        rd = RunDir(run)
        layers = read_json(rd.layers)["layers"]
        table = load_table(run, target)
        synthetic = not rd.scores.exists()
        if synthetic:
            # Real latencies, made-up scores: faster than the teacher costs more, with noise.
            rng = np.random.default_rng(seed)
            ms = {(e["layer"], e["spec"]): e["median_ms"] for e in table["entries"]}
            entries = []
            for d in layers:
                t_ms = ms.get((d["name"], "teacher"), 1.0)
                for spec in d["candidates"]:
                    if (d["name"], spec) in ms and spec != "teacher":
                        saved = max(0.0, 1.0 - ms[(d["name"], spec)] / t_ms)
                        entries.append({"layer": d["name"], "spec": spec,
                                        "d_loss": saved * float(rng.uniform(0.02, 0.2)) + abs(rng.normal(0, 0.01))})
            scores = {"entries": entries}
        else:
            scores = read_json(rd.scores)
        pool = build_pool(layers, scores, [table])
        lat, fixed = predicted_latency(table, pool)
        return (pool.cost, lat, fixed, teacher_latency(table, layers)[0],
                {"source": f"run {run} ({read_json(rd.layers).get('model', '?')}), latency table {target}"
                           + ("; scores synthetic (the run has no scores.json)" if synthetic else ""),
                 "synthetic": synthetic, "layers": len(pool.layers),
                 "candidates": int(sum(len(x) for x in pool.specs))})
    from hant.layers import inspect_model

    report = inspect_model("timm:efficientnet_b0", input_size=(1, 64, 64), num_classes=10, space="full")
    rng = np.random.default_rng(seed)
    costs, lat = [], []
    from hant.space import load_space

    space = load_space("full")
    for d in report["layers"]:
        d["candidates"] = specs = space.candidates(d["in_chs"], d["out_chs"], d["stride"])
        n = len(specs)
        scale = d["flops"] / 1e6  # bigger layers take longer
        t = scale * rng.lognormal(-0.7, 0.6, n)
        c = np.clip((scale * 1.2 - t) / scale * rng.uniform(0.02, 0.2) + rng.normal(0, 0.01, n), 0, None)
        i = specs.index("teacher")
        t[i], c[i] = scale * 1.2, 0.0
        lat.append(t)
        costs.append(c)
    teacher_sum = sum(float(t[d["candidates"].index("teacher")]) for t, d in zip(lat, report["layers"]))
    fixed = 0.25 * teacher_sum  # stem and head
    teacher = fixed + teacher_sum
    return costs, lat, fixed, teacher, {
        "source": "timm:efficientnet_b0, 1x64x64, space full (hant inspect); latencies and scores synthetic "
                  "(no run with a latency table and scores was given)", "synthetic": True,
        "layers": len(lat), "candidates": int(sum(t.size for t in lat))}


def bench_real(run, target, seed) -> dict:
    costs, lat, fixed, teacher_ms, info = _real_pool(run, target, seed)
    times, gaps, rows = [], [], []
    fastest = fixed + sum(float(t.min()) for t in lat)
    for speedup in (1.25, 1.5, 2.0, 3.0):
        b = teacher_ms / speedup
        if b < fastest:
            continue
        runs = [solve(costs, lat, b) for _ in range(3)]
        t = statistics.median(r.solve_time_s for r in runs)
        g = greedy(costs, lat, b)
        times.append(t)
        gaps.append(_gap_pct(g.objective, runs[0].objective))
        rows.append({"speedup": speedup, "budget_ms": b, "solve_time_s": t, "status": runs[0].status,
                     "objective": runs[0].objective, "greedy_objective": g.objective})
    return {**info, "teacher_ms": teacher_ms, "fastest_ms": fastest, "budgets": rows,
            "solve_time_s_median": statistics.median(times) if times else None,
            "greedy_mean_gap_pct": float(np.mean(gaps)) if gaps else None}


def bench_fidelity(run: str | None, target: str | None, points: int, n_random: int, images: int | None,
                   seed: int, n_perturbed: int = 0) -> dict:
    """Kendall tau of predicted score vs measured held-out loss of assembled plans.

    Plans: the distinct optima of `points` budgets from the fastest plan to the teacher, the
    teacher itself, `n_random` uniformly drawn plans (one candidate per layer) so that small
    pools still give enough distinct networks, and `n_perturbed` ILP plans with two layers
    changed to random candidates (plans near the good ones that the selection did not pick;
    uniformly random plans of a large pool are mostly broken networks at chance level).
    """
    if not run or not target:
        return {"kendall_tau": None, "plans": 0,
                "reason": "needs a run folder with scores and a latency table: --run RUN --target T"}
    if not (Path(run) / "scores.json").exists():
        return {"kendall_tau": None, "plans": 0, "reason": f"{run} has no scores.json; run `hant score` first"}
    import torch
    from scipy.stats import kendalltau, spearmanr

    from hant.config import RunConfig
    from hant.data import load_data, make_loader
    from hant.latency import load_table
    from hant.select import build_pool, predicted_latency, teacher_latency
    from hant.student import assemble
    from hant.teacher_train import evaluate
    from hant.workspace import RunDir, read_json

    rd = RunDir(run)
    cfg = RunConfig.load(rd.config)
    layers = read_json(rd.layers)["layers"]
    scores = read_json(rd.scores)
    table = load_table(run, target)
    pool = build_pool(layers, scores, [table])
    lat, fixed = predicted_latency(table, pool)
    teacher_ms = teacher_latency(table, layers)[0]
    lo = plan_totals(solve(lat, lat, np.inf, fixed=fixed).choice, lat, fixed)
    plans: dict[tuple, str] = {tuple(s.index("teacher") for s in pool.specs): "teacher"}
    for budget in np.linspace(lo, max(teacher_ms, lo), points):
        plans.setdefault(tuple(solve(pool.cost, lat, float(budget), fixed=fixed).choice), "ilp")
    rng = np.random.default_rng(seed)
    for _ in range(50 * n_random):
        if sum(v == "random" for v in plans.values()) >= n_random:
            break
        plans.setdefault(tuple(int(rng.integers(len(s))) for s in pool.specs), "random")
    optima = [c for c, k in plans.items() if k == "ilp"]
    for _ in range(50 * n_perturbed):
        if sum(v == "perturbed" for v in plans.values()) >= n_perturbed or not optima:
            break
        choice = list(optima[int(rng.integers(len(optima)))])
        for layer in rng.choice(len(choice), size=min(2, len(choice)), replace=False):
            choice[layer] = int(rng.integers(len(pool.specs[layer])))
        plans.setdefault(tuple(choice), "perturbed")
    held = load_data(cfg.data).heldout
    if images is not None and images < len(held):
        held = held.subset(torch.arange(images))
    loader = make_loader(held, batch_size=cfg.data.batch_size)
    rows = []
    for choice, kind in plans.items():
        model = assemble(run, {"layers": pool.plan_layers(choice)}, bn_recalibrate=False)
        ev = evaluate(model, loader)
        rows.append({"kind": kind, "predicted_ms": plan_totals(choice, lat, fixed),
                     "predicted_d_loss": plan_totals(choice, pool.cost), "heldout_loss": ev["loss"],
                     "heldout_top1": ev["top1"],
                     "replaced": int(sum(pool.specs[l][o] != "teacher" for l, o in enumerate(choice)))})
        print(f"  fidelity {len(rows)}/{len(plans)} ({kind}): predicted {rows[-1]['predicted_d_loss']:+.4f}, "
              f"held-out loss {ev['loss']:.4f}", file=sys.stderr)

    def tau(sub):
        if len(sub) < 2:
            return None
        return float(kendalltau([r["predicted_d_loss"] for r in sub], [r["heldout_loss"] for r in sub]).statistic)

    ilp = [r for r in rows if r["kind"] in ("teacher", "ilp")]
    near = [r for r in rows if r["kind"] != "random"]
    return {"kendall_tau": tau(rows), "kendall_tau_ilp_plans": tau(ilp), "kendall_tau_without_random": tau(near),
            "plans": len(rows), "ilp_plans": len(ilp), "random_plans": sum(r["kind"] == "random" for r in rows),
            "perturbed_plans": sum(r["kind"] == "perturbed" for r in rows),
            "spearman": float(spearmanr([r["predicted_d_loss"] for r in rows],
                                        [r["heldout_loss"] for r in rows]).statistic) if len(rows) > 2 else None,
            "images": len(held), "score_method": scores.get("method"), "teacher_source": cfg.model.source,
            "space": cfg.space, "layers": len(pool.layers), "candidates": int(sum(len(x) for x in pool.specs)),
            "assembled": "phase-1 weights, no fine-tuning, no BatchNorm re-estimation",
            "rows": rows, "reason": None if len(rows) >= 10 else "fewer than 10 distinct plans in this pool"}


SECTIONS = ("random", "real", "brute", "fidelity")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="fidelity: a run folder with scores and a latency table")
    p.add_argument("--target", default=None, help="fidelity: latency table id in RUN/latency/")
    p.add_argument("--pool-run", default=None, help="real pool: a run folder (default: EfficientNet-B0 shape)")
    p.add_argument("--pool-target", default=None, help="real pool: latency table id in POOL_RUN/latency/")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of random,real,brute,fidelity; the others are kept from --out")
    p.add_argument("--instances", type=int, default=5, help="random 100x200 instances (x3 budgets each)")
    p.add_argument("--brute-force", type=int, default=200, help="enumerable instances")
    p.add_argument("--fidelity-points", type=int, default=14, help="budgets tried for distinct ILP plans")
    p.add_argument("--fidelity-random", type=int, default=10, help="random plans added to the fidelity set")
    p.add_argument("--fidelity-perturbed", type=int, default=10,
                   help="ILP plans with two layers changed at random, added to the fidelity set")
    p.add_argument("--images", type=int, default=None, help="held-out images for the fidelity check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default=None, help="how the fidelity run was made (stored with its numbers)")
    p.add_argument("--out", default="bench/results/select.json")
    args = p.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section {unknown[0]}; use {', '.join(SECTIONS)}")

    import scipy

    from hant.workspace import read_json, write_json

    path = Path(args.out)
    out = read_json(path) if path.exists() else {}
    commands = out.get("commands", {})
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    t0 = time.perf_counter()
    if "random" in sections:
        rnd_uniform = bench_random(args.instances, 100, 200, args.seed, correlated=False)
        print(f"random 100x200 (independent): median {rnd_uniform['solve_time_s_median']:.3f} s", file=sys.stderr)
        rnd = bench_random(args.instances, 100, 200, args.seed, correlated=True)
        print(f"random 100x200 (correlated): median {rnd['solve_time_s_median']:.3f} s, max "
              f"{rnd['solve_time_s_max']:.3f} s ({rnd['solves']} solves); greedy gap {rnd['greedy_mean_gap_pct']:.3f}%",
              file=sys.stderr)
        out.update({"solve_time_s_random_100x200": rnd["solve_time_s_median"],
                    "solve_time_s_random_100x200_independent": rnd_uniform["solve_time_s_median"],
                    "random_100x200": rnd, "random_100x200_independent": rnd_uniform})
        commands["random"] = command
    if "real" in sections:
        real = bench_real(args.pool_run, args.pool_target, args.seed)
        print(f"real pool ({real['layers']} layers, {real['candidates']} candidates): median "
              f"{real['solve_time_s_median']} s", file=sys.stderr)
        out.update({"solve_time_s_real_pool": real["solve_time_s_median"], "real_pool": real})
        if args.pool_run:
            # The EfficientNet-B0 full-space shape as well, for comparison with earlier runs.
            shape = bench_real(None, None, args.seed)
            out["real_pool_full_space_shape"] = shape
        commands["real"] = command
    if "brute" in sections:
        bf = bench_brute_force(args.brute_force, 5, 4, args.seed + 1)
        print(f"brute force: {bf['matches']}/{bf['instances']} match; greedy gap {bf['greedy_mean_gap_pct']:.3f}%",
              file=sys.stderr)
        out.update({"brute_force_instances": bf["instances"], "brute_force_matches": bf["matches"],
                    "greedy_mean_gap_pct": bf["greedy_mean_gap_pct"], "brute_force": bf})
        commands["brute"] = command
    if "fidelity" in sections:
        fid = bench_fidelity(args.run, args.target, args.fidelity_points, args.fidelity_random, args.images,
                             args.seed, n_perturbed=args.fidelity_perturbed)
        print(f"fidelity: tau {fid['kendall_tau']} over {fid['plans']} plans; ILP plans {fid['kendall_tau_ilp_plans']}, "
              f"without random {fid['kendall_tau_without_random']} ({fid.get('reason')})", file=sys.stderr)
        if args.note:
            fid["note"] = args.note
        out.update({"linear_model_kendall_tau": fid["kendall_tau"], "plans_compared": fid["plans"], "fidelity": fid})
        commands["fidelity"] = command
    out.update({
        "command": command if len(commands) <= 1 else "; ".join(dict.fromkeys(commands.values())),
        "commands": commands,
        "solver": f"HiGHS via scipy.optimize.milp (scipy {scipy.__version__}), mip_rel_gap 0, after dominance "
                  "and reduced-cost pruning",
        "machine": "2-core CPU shared with other work; times are wall clock",
    })
    out.setdefault("bench_time_s", {})
    if not isinstance(out["bench_time_s"], dict):
        out["bench_time_s"] = {}
    out["bench_time_s"][",".join(sections)] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
