"""The report: RUN/report.md, RUN/pareto.png and RUN/architecture.png.

Reads only artifacts (layers.json, plans/, students/*/eval.json, timings.json); never
re-measures anything, so a report can be rebuilt at any time for free.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from hant.errors import HantError
from hant.workspace import RunDir, atomic_write_text, read_json

# One colour per op family, so the architecture picture reads the same across runs.
_FAMILY_COLORS = {
    "teacher": "#9e9e9e", "mb": "#1f77b4", "fmb": "#ff7f0e", "ds": "#2ca02c", "conv": "#d62728",
    "basic": "#9467bd", "bottle": "#8c564b", "skip": "#ffffff", "proj": "#e377c2",
    "self": "#17becf", "sep": "#aec7e8", "lr": "#ffbb78", "sp": "#98df8a", "grp": "#c5b0d5",
}


def family(spec: str) -> str:
    """The family token of a spec string (`mb_k3_e4_relu` -> `mb`)."""
    return spec.split("_", 1)[0]


def stage_of(layer_name: str) -> str:
    """A readable stage label for a layer name: `blocks.3.1` -> `blocks.3`, `layer2.0` -> `layer2`."""
    m = re.match(r"^(.*?)(?:\.\d+)$", layer_name)
    return m.group(1) if m else layer_name


def collect(run: str | Path) -> dict[str, Any]:
    """Gather every artifact the report needs into one dict (also used by `hant demo` to print the table).

    Returns {"layers", "plans": {name: plan}, "evals": {name: eval}, "timings", "config"}.
    Raises HantError when the run has no layers.json.
    """
    rd = RunDir(run)
    rd.require(rd.layers, "init")
    layers = read_json(rd.layers)["layers"]
    # Only plan files are plans; `hant pick`'s ranking (<plan>.pick.json) lives beside them.
    plans = {p.stem: d for p in sorted((rd.root / "plans").glob("*.json"))
             if isinstance(d := read_json(p), dict) and isinstance(d.get("layers"), dict)}
    evals = {}
    for p in sorted((rd.root / "students").glob("*/eval.json")):
        evals[p.parent.name] = read_json(p)
    timings_path = rd.root / "timings.json"
    timings = read_json(timings_path).get("stages", {}) if timings_path.exists() else {}
    config = {}
    if rd.config.exists():
        from hant.workspace import read_yaml

        config = read_yaml(rd.config) or {}
    return {"layers": layers, "plans": plans, "evals": evals, "timings": timings, "config": config}


def _fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    if x is None:
        return "–"
    try:
        return f"{x:{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(x)


def _with_ci(x: Any, lo: Any, hi: Any, spec: str = ".3f", suffix: str = "") -> str:
    """`1.899 ±1.2%`: a median and the half-width of its interval relative to it (the
    interval may be lopsided; the budget-check table and eval.json keep both ends)."""
    if x is None or lo is None or hi is None or not x:
        return _fmt(x, spec, suffix)
    return f"{_fmt(x, spec, suffix)} ±{100.0 * (hi - lo) / 2.0 / abs(x):.1f}%"


def _span(x: Any, lo: Any, hi: Any, spec: str = ".3f", suffix: str = "") -> str:
    """`1.95x [1.90, 2.01]`: a median and both ends of its interval."""
    if x is None or lo is None or hi is None:
        return _fmt(x, spec, suffix)
    return f"{_fmt(x, spec, suffix)} [{lo:{spec}}, {hi:{spec}}]"


def results_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated student (fp32 and, when exported, INT8), plus the teacher first."""
    rows: list[dict[str, Any]] = []
    teacher_seen = False
    for name, ev in info["evals"].items():
        t, s = ev.get("teacher", {}), ev.get("student", {})
        if not teacher_seen and t:
            rows.append({"name": "teacher", "precision": "fp32", "target": ev.get("target"),
                         "batch_size": ev.get("batch_size"), "latency_ms": t.get("latency_ms"),
                         "latency_ci_lo_ms": t.get("latency_ci_lo_ms"), "latency_ci_hi_ms": t.get("latency_ci_hi_ms"),
                         "top1": t.get("top1"), "speedup": 1.0, "predicted_ms": None, "d_top1": 0.0})
            teacher_seen = True
        plan = info["plans"].get(name, {})
        pred = ev.get("predicted_ms", plan.get("predicted_ms"))
        lat = s.get("latency_ms")
        rows.append({
            "name": name, "precision": "fp32", "target": ev.get("target"), "batch_size": ev.get("batch_size"),
            "budget_ms": plan.get("budget_ms"), "predicted_ms": pred, "latency_ms": lat,
            "latency_ci_lo_ms": s.get("latency_ci_lo_ms"), "latency_ci_hi_ms": s.get("latency_ci_hi_ms"),
            "pred_err_pct": (100.0 * (pred - lat) / lat) if (pred and lat) else None,
            "speedup": ev.get("speedup"), "speedup_ci_lo": ev.get("speedup_ci_lo"),
            "speedup_ci_hi": ev.get("speedup_ci_hi"), "top1": s.get("top1"),
            "d_top1": (s["top1"] - t["top1"]) if (s.get("top1") is not None and t.get("top1") is not None) else None,
            **_paired_interval(ev.get("paired")),
        })
        q = ev.get("int8")
        if q and q.get("top1") is not None:
            # The INT8 model is timed against the teacher in export's own interleaved run: its
            # speedup is that run's ratio, not its latency over the fp32 measurement's teacher,
            # which was timed at another moment (an eval.json from before it had no speedup).
            tl = t.get("latency_ms")
            own = q.get("speedup")
            rows.append({
                "name": name, "precision": "int8", "target": ev.get("target"), "batch_size": ev.get("batch_size"),
                "latency_ms": q.get("latency_ms"), "top1": q.get("top1"),
                "speedup": own if own else (tl / q["latency_ms"]) if (tl and q.get("latency_ms")) else None,
                "d_top1": (q["top1"] - t["top1"]) if t.get("top1") is not None else None,
            })
    return rows


def _paired_interval(paired: dict[str, Any] | None) -> dict[str, float]:
    """The 95% interval of a student's top-1 change from the teacher, from eval.json's `paired`
    section (hant.paired.compare on the test split): {"d_top1_ci_lo", "d_top1_ci_hi"}, empty
    for an eval.json without one."""
    if not paired or not paired.get("drop_ci95"):
        return {}
    lo, hi = paired["drop_ci95"]
    return {"d_top1_ci_lo": -hi, "d_top1_ci_hi": -lo}


def results_table(info: dict[str, Any]) -> str:
    """The headline table as markdown: accuracy, measured latency and speedup (each with the
    relative half-width of its confidence interval where recorded), predicted vs measured."""
    rows = results_rows(info)
    if not rows:
        return "_No student has been evaluated yet (run `hant finetune`)._\n"
    out = ["| network | precision | budget ms | predicted ms | measured ms | pred. error | speedup | top-1 % | Δ top-1 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['precision']} | {_fmt(r.get('budget_ms'), '.3f')} | {_fmt(r.get('predicted_ms'), '.3f')} "
            f"| {_with_ci(r.get('latency_ms'), r.get('latency_ci_lo_ms'), r.get('latency_ci_hi_ms'))} "
            f"| {_fmt(r.get('pred_err_pct'), '+.1f', '%')} "
            f"| {_with_ci(r.get('speedup'), r.get('speedup_ci_lo'), r.get('speedup_ci_hi'), '.2f', 'x')} "
            f"| {_fmt(r.get('top1'), '.2f')} | {_span(r.get('d_top1'), r.get('d_top1_ci_lo'), r.get('d_top1_ci_hi'), '+.2f')} |"
        )
    return "\n".join(out) + "\n"


def choices_table(info: dict[str, Any]) -> str:
    """Markdown: the spec each plan chose for each layer, layers in network order."""
    plans = info["plans"]
    if not plans:
        return "_No plans yet (run `hant select`)._\n"
    names = list(plans)
    out = ["| layer | stride | in → out | " + " | ".join(names) + " |",
           "|---|---:|---|" + "---|" * len(names)]
    for layer in info["layers"]:
        n = layer["name"]
        shape = f"{layer['in_shape'][0]}→{layer['out_shape'][0]} @{layer['out_shape'][-1]}"
        specs = [plans[p].get("layers", {}).get(n, "–") for p in names]
        out.append(f"| {n} | {layer['stride']} | {shape} | " + " | ".join(f"`{s}`" for s in specs) + " |")
    return "\n".join(out) + "\n"


def stage_summary(info: dict[str, Any]) -> str:
    """Markdown: per plan and stage, which families were chosen (the paper's 'insights' view)."""
    lines = []
    for name, plan in info["plans"].items():
        by_stage: dict[str, Counter] = defaultdict(Counter)
        for layer in info["layers"]:
            spec = plan.get("layers", {}).get(layer["name"])
            if spec:
                by_stage[stage_of(layer["name"])][family(spec)] += 1
        parts = []
        for stage, counts in by_stage.items():
            parts.append(f"{stage}: " + ", ".join(f"{fam}×{c}" for fam, c in counts.most_common()))
        kept = sum(1 for s in plan.get("layers", {}).values() if s == "teacher")
        removed = sum(1 for s in plan.get("layers", {}).values() if s == "skip")
        lines.append(f"- **{name}**: {kept} of {len(plan.get('layers', {}))} layers kept as the teacher, "
                     f"{removed} removed (`skip`). "
                     + "; ".join(parts))
    return "\n".join(lines) + "\n" if lines else ""


def plot_pareto(info: dict[str, Any], path: Path) -> Path | None:
    """Top-1 against measured latency for the teacher and every student (fp32 and INT8)."""
    rows = [r for r in results_rows(info) if r.get("latency_ms") and r.get("top1") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"fp32": ("o", "#1f77b4"), "int8": ("s", "#ff7f0e")}
    for prec in ("fp32", "int8"):
        pts = sorted((r["latency_ms"], r["top1"], r["name"]) for r in rows
                     if r["precision"] == prec and r["name"] != "teacher")
        if pts:
            m, c = styles[prec]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, label=f"hant students ({prec})")
            for x, y, n in pts:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in rows:
        if r["name"] == "teacher":
            ax.scatter([r["latency_ms"]], [r["top1"]], marker="*", s=160, color="black", zorder=5, label="teacher")
    first = rows[0]
    ax.set_xlabel(f"measured latency, ms ({first.get('target')}, batch {first.get('batch_size')})")
    ax.set_ylabel("test top-1, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_architecture(info: dict[str, Any], path: Path) -> Path | None:
    """One row per plan (teacher on top), one box per layer coloured by the chosen family."""
    plans = info["plans"]
    if not plans:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    layers = [layer["name"] for layer in info["layers"]]
    rows = [("teacher", {n: "teacher" for n in layers})] + [(p, plans[p].get("layers", {})) for p in plans]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 0.5 * len(rows) + 1.6), dpi=120)
    used = set()
    for y, (label, choice) in enumerate(reversed(rows)):
        for x, n in enumerate(layers):
            spec = choice.get(n, "teacher")
            fam = family(spec)
            used.add(fam)
            ax.add_patch(Rectangle((x, y + 0.1), 0.9, 0.8, facecolor=_FAMILY_COLORS.get(fam, "#bcbd22"),
                                   edgecolor="black", linewidth=0.5))
        ax.text(-0.3, y + 0.5, label, ha="right", va="center", fontsize=8)
    ax.set_xlim(-0.2, len(layers))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([i + 0.45 for i in range(len(layers))])
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_yticks([])
    ax.legend(handles=[Patch(facecolor=_FAMILY_COLORS.get(f, "#bcbd22"), edgecolor="black", label=f)
                       for f in sorted(used)], fontsize=7, ncol=min(len(used), 6),
              loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(layers) > 8 else -0.2))
    ax.set_title("chosen operation per layer", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _fusion_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    for name, ev in info["evals"].items():
        onnx = ev.get("onnx") or {}
        fused = onnx.get("fusions") or onnx.get("fused_ops")
        if isinstance(fused, dict):
            fused = ", ".join(f"{op.split('.')[-1]}×{n}" for op, n in fused.items())
        elif isinstance(fused, list):
            fused = ", ".join(fused)
        bn = onnx.get("batchnorm_nodes", onnx.get("bn_nodes_in_export"))
        if fused is not None or bn is not None:
            lines.append(f"- {name}: BatchNormalization nodes left in the export: {_fmt(bn, 'd')}; "
                         f"ONNX Runtime fused ops: {fused if fused else 'none reported'}")
    return lines


def _int8_scheme_lines(info: dict[str, Any]) -> list[str]:
    """One line per INT8 scheme the exports used, with the reason it was chosen (eval.json's int8)."""
    seen: dict[tuple, list[str]] = {}
    for name, ev in info["evals"].items():
        q = ev.get("int8") or {}
        sch = q.get("scheme")
        if isinstance(sch, dict) and sch.get("name"):
            key = (sch["name"], sch.get("activations"), sch.get("weights"), sch.get("reduce_range"),
                   q.get("scheme_reason"), q.get("scheme_faster_than_fp32"))
            seen.setdefault(key, []).append(name)
    lines = []
    for (scheme, act, wts, reduced, reason, faster), plans in seen.items():
        slower = "; INT8 is slower than fp32 on this CPU" if faster is False else ""
        lines.append(f"INT8 scheme `{scheme}` ({act} activations, {wts} weights, "
                     f"{'7-bit' if reduced else 'full'} range) for {', '.join(plans)}: "
                     f"{reason or 'no reason recorded'}{slower}.")
    for name, ev in info["evals"].items():
        q, o = ev.get("int8") or {}, ev.get("onnx") or {}
        if q.get("calibrations"):
            check = q.get("calibration_check") or {}
            lines.append(f"INT8 calibration of {name}: {q.get('calibration')}, the one that agrees most with fp32 on "
                         f"{check.get('images', '?')} {check.get('split', 'held-out')} images ("
                         + ", ".join(f"{c} {r['agreement']:.1f}%" for c, r in q["calibrations"].items()) + ").")
        if q.get("accuracy_kept") is False:
            lines.append(f"**The INT8 model of {name} does not keep accuracy:** test top-1 {q['top1']:.2f}% against "
                         f"fp32's {o.get('top1', float('nan')):.2f}%; deploy its model.onnx, not model.int8.onnx.")
    if len(lines) > 1:  # several batch sizes or machines: a list, so that markdown keeps them apart
        lines = [f"- {line}" for line in lines]
    return lines + [""] if lines else []


def write_report(run: str | Path) -> Path:
    """Write RUN/report.md, RUN/pareto.png and RUN/architecture.png. Returns the report path.

    Raises HantError when the run folder has not been initialised.
    """
    rd = RunDir(run)
    info = collect(run)
    cfg = info["config"]
    model = cfg.get("model", {}).get("source", "?")
    data = cfg.get("data", {})
    pareto = plot_pareto(info, rd.root / "pareto.png")
    arch = plot_architecture(info, rd.root / "architecture.png")

    md = [f"# hant report: {rd.root.name}", "",
          f"Teacher `{model}`, data `{data.get('spec', '?')}` at {data.get('input_size', '?')} px, "
          f"candidate space `{cfg.get('space', '?')}`, {len(info['layers'])} replaceable layers.", "",
          "## Accuracy and measured latency", "",
          "Latency is measured end to end on the plan's target in one interleaved run (medians; "
          f"± is the half-width of the median's {_confidence(info)}bootstrap confidence interval, relative to "
          "it); `predicted` is the latency table's estimate used by the selection. An INT8 row is timed against "
          "the teacher in its export's own interleaved run: its measured ms is from that run and its speedup is "
          "that run's ratio. A student's Δ top-1 is from the teacher on the same test images, with its 95% "
          "interval from the images only one of the two gets right (hant.paired).", "",
          results_table(info)]
    disagree = timing_disagreements(info)
    if disagree:
        md += ["Where a plan's hardware check and its final measurement disagree beyond their intervals, or the "
               "final measurement had to be timed again, the machine's speed changed between timings; such a "
               "number is not the network's latency alone:", "",
               *disagree, ""]
    starts = start_lines(info)
    if starts:
        md += ["How each student was made: the weights its replaced layers started from (phase 1's, or "
               "re-distilled on the student's own inputs, with the mean held-out NMSE at those layers before "
               "and after), its top-1 as assembled, and its fine-tuning.", "",
               "| student | started from | assembled top-1 | fine-tuning | top-1 |", "|---|---|---:|---|---:|",
               *starts, ""]
    embed = embedding_lines(info)
    if embed:
        md += ["Embedding compatibility on the test split: the mean cosine similarity of each student's "
               "penultimate features to the teacher's for the same image, and nearest-neighbour retrieval "
               "top-1 with student queries against a gallery the teacher embedded (beside teacher queries, "
               "what the gallery gives today).", "",
               "| student | cosine | retrieval top-1, student queries | teacher queries |", "|---|---:|---:|---:|",
               *embed, ""]
    refined = refine_lines(info)
    if refined:
        md += ["Plans refined around themselves (`hant refine`: every candidate scored again with the rest "
               "of the plan in place, the program solved again under the same budget); the loss increase "
               "over the teacher's on the held-out split, assembled from phase-1 weights, of each round's "
               "plan, and the one kept.", "", *refined, ""]
    risks = accuracy_risk_lines(info)
    if risks:
        md += ["Plans whose predicted damage is large (the summed loss increase of their layers, each "
               "replaced alone, against the teacher's held-out loss): check their accuracy before use.", "",
               *risks, ""]
    if pareto:
        md += ["![accuracy against latency](pareto.png)", ""]
    md += _int8_scheme_lines(info)
    checks = _budget_check_lines(info)
    if checks:
        md += ["## Budgets checked on the hardware", "",
               "Each plan was timed against the teacher before fine-tuning, with the protocol of the final "
               "measurement; where its measured speedup fell short beyond the measurement's interval, the "
               "budget was tightened by the shortfall and the program solved again.", "",
               "| plan | round | budget ms | predicted ms | measured ms | teacher ms | speedup | decision |",
               "|---|---:|---:|---:|---:|---:|---:|---|"] + checks + [""]
    md += ["## Chosen operations", "", stage_summary(info), choices_table(info)]
    if arch:
        md += ["![architecture](architecture.png)", ""]
    fusions = _fusion_lines(info)
    if fusions:
        md += ["## Kernel fusion", "", "Batch norm is folded into the convolutions at export; ONNX Runtime "
               "fuses the rest at its full optimisation level.", ""] + fusions + [""]
    if info["timings"]:
        md += ["## Time per stage", "", "| stage | seconds |", "|---|---:|"]
        md += [f"| {k} | {v:.0f} |" for k, v in info["timings"].items() if isinstance(v, (int, float))]
        md.append("")
    path = rd.report
    atomic_write_text(path, "\n".join(md))
    return path


def _budget_check_lines(info: dict[str, Any]) -> list[str]:
    """Table rows for each plan's latency_check rounds (see `hant.select.select_measured`)."""
    rows = []
    for name, plan in info["plans"].items():
        for i, r in enumerate((plan.get("latency_check") or {}).get("rounds") or [], 1):
            rows.append(f"| {name} | {i} | {_fmt(r.get('budget_ms'), '.3f')} | {_fmt(r.get('predicted_ms'), '.3f')} "
                        f"| {_with_ci(r.get('student_ms'), r.get('student_ci_lo_ms'), r.get('student_ci_hi_ms'))} "
                        f"| {_with_ci(r.get('teacher_ms'), r.get('teacher_ci_lo_ms'), r.get('teacher_ci_hi_ms'))} "
                        f"| {_span(r.get('speedup'), r.get('speedup_ci_lo'), r.get('speedup_ci_hi'), '.2f', 'x')} "
                        f"| {r.get('decision', '–')} |")
    return rows


def _confidence(info: dict[str, Any]) -> str:
    """`95% `: the confidence level the evaluations were timed at (from eval.json's protocol),
    or "" when they record none or several."""
    levels = {((ev.get("timing") or {}).get("protocol") or {}).get("confidence") for ev in info["evals"].values()}
    levels.discard(None)
    return f"{100 * levels.pop():g}% " if len(levels) == 1 else ""


def _interval(x: Any, lo: Any, hi: Any) -> tuple[float, float, float] | None:
    if x is None or lo is None or hi is None:
        return None
    return float(x), float(lo), float(hi)


def timing_disagreements(info: dict[str, Any]) -> list[str]:
    """One markdown line per network whose two timings disagree beyond their intervals.

    For each plan with a hardware check ("latency_check" in the plan) and a final
    measurement (eval.json), the teacher and the student are compared separately: the
    check's last round against the final measurement. They disagree when their confidence
    intervals do not overlap. Timings without an interval (older artifacts) are not
    compared. A final measurement timed more than once (`timing_attempts`, the teacher
    drifted) gets a line too. Returns the lines (empty when everything agrees).
    """
    lines = []
    for name, ev in info["evals"].items():
        attempts = ev.get("timing_attempts") or []
        if len(attempts) > 1:
            lines.append(f"- {name}: the teacher's latency in the final measurement drifted from the run's earlier "
                         f"timings, so it was timed {len(attempts)} times (teacher "
                         + ", ".join(f"{a['teacher_ms']:.3f}" for a in attempts)
                         + f" ms) and the one nearest the earlier timings kept ({ev['teacher']['latency_ms']:.3f} ms).")
        rounds = ((info["plans"].get(name) or {}).get("latency_check") or {}).get("rounds") or []
        if not rounds:
            continue
        last = rounds[-1]
        for who in ("teacher", "student"):
            sec = ev.get(who) or {}
            check = _interval(last.get(f"{who}_ms"), last.get(f"{who}_ci_lo_ms"), last.get(f"{who}_ci_hi_ms"))
            final = _interval(sec.get("latency_ms"), sec.get("latency_ci_lo_ms"), sec.get("latency_ci_hi_ms"))
            if check is None or final is None or (check[1] <= final[2] and final[1] <= check[2]):
                continue
            lines.append(f"- {name}, {who}: {_span(*check)} ms at the plan's hardware check, {_span(*final)} ms "
                         f"in the final measurement; the two disagree beyond their intervals.")
    return lines


def start_lines(info: dict[str, Any]) -> list[str]:
    """One markdown table row per fine-tuned student: its starting weights and its fine-tuning."""
    rows = []
    for name, ev in info["evals"].items():
        st, ft, stu = ev.get("start") or {}, ev.get("finetune") or {}, ev.get("student") or {}
        if not st or stu.get("top1") is None:
            continue
        rd = st.get("redistill")
        start = (f"re-distilled ({rd['images']} images per layer; NMSE {rd['mean_heldout_nmse_before']:.3f} -> "
                 f"{rd['mean_heldout_nmse_after']:.3f})" if rd else
                 "re-distilled" if st.get("candidate_weights") == "redistilled" else "phase-1 weights")
        tune = (f"{ft['epochs']:.3g} epochs, {ft['steps']} steps, LR {ft['lr']:g}" if "steps" in ft else "")
        assembled = stu.get("top1_assembled")
        rows.append(f"| {name} | {start} | {'' if assembled is None else f'{assembled:.2f}%'} | {tune} | "
                    f"{stu['top1']:.2f}% |")
    return rows


def embedding_lines(info: dict[str, Any]) -> list[str]:
    """One markdown table row per student whose eval.json records embedding compatibility."""
    rows = []
    for name, ev in info["evals"].items():
        e = ev.get("embedding") or {}
        if "cosine" in e:
            r = e["retrieval_top1"]
            rows.append(f"| {name} | {e['cosine']:.3f} | {r['student_to_teacher']:.2f}% | "
                        f"{r['teacher_to_teacher']:.2f}% |")
        elif e.get("error"):
            rows.append(f"| {name} | not compared: {e['error']} | | |")
    return rows


def refine_lines(info: dict[str, Any]) -> list[str]:
    """One markdown line per refined plan: each round's held-out loss increase, the one kept."""
    lines = []
    for name, plan in info["plans"].items():
        r = plan.get("refined") or {}
        if r.get("heldout_d_loss"):
            rounds = ", ".join(f"{n.rsplit('-', 1)[-1]} {v:+.4g}" for n, v in r["heldout_d_loss"].items())
            lines.append(f"- {name}: {rounds}; kept {r['winner'].rsplit('-', 1)[-1]}.")
    return lines


def _interim(plan: dict[str, Any]) -> bool:
    """A plan that refinement replaced or tried (its first plan, a round's plan)."""
    return "refined_as" in plan or "refinement_of" in plan


def accuracy_risk_lines(info: dict[str, Any]) -> list[str]:
    """One markdown line per plan that `hant select` flagged as likely to lose accuracy
    (its `accuracy_risk.large`), with the largest speedup whose predicted damage is small;
    not for the interim plans of a refinement."""
    lines = []
    for name, plan in info["plans"].items():
        if _interim(plan):
            continue
        risk = plan.get("accuracy_risk") or {}
        if risk.get("large"):
            safe, measured = risk.get("safe_speedup"), risk.get("safe_speedup_measured")
            upto = (f"; up to about {measured:.2f}x as measured ({safe:.2f}x as the table predicts) the damage is small"
                    if measured else f"; up to {safe:.2f}x (predicted) the damage is small" if safe else "")
            lines.append(f"- {name}: predicted loss increase {risk['predicted_d_loss']:.3g} against the teacher's "
                         f"{risk['teacher_loss']:.3g}{upto}.")
    return lines


def require_report_inputs(run: str | Path) -> None:
    """Raise HantError when there is nothing to report yet."""
    info = collect(run)
    if not info["plans"] and not info["evals"]:
        raise HantError(f"{run} has no plans or evaluated students yet; run `hant select` and `hant finetune` first")
