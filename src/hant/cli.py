"""Command line: one subcommand per stage. Parses arguments and calls the stage; nothing else.

Errors a user can cause are HantError and print as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from hant.errors import HantError


def _input_size(values: list[int]) -> tuple[int, int, int]:
    if len(values) != 3:
        raise HantError("--input-size takes three numbers: C H W (e.g. 1 64 64)")
    return tuple(int(v) for v in values)


def cmd_inspect(args: argparse.Namespace) -> int:
    from hant.layers import inspect_model, format_inspect

    report = inspect_model(
        args.model,
        input_size=_input_size(args.input_size),
        num_classes=args.num_classes,
        checkpoint=args.checkpoint,
        trust_pickle=args.trust_pickle,
        space=args.space,
        include=args.include,
        exclude=args.exclude,
    )
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_inspect(report))
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from hant.config import DataConfig
    from hant.teacher_train import TeacherRecipe, train_teacher

    recipe = TeacherRecipe.from_flags(args)
    # The split is the one a run makes with the same data settings, so the images a run holds
    # out to rank candidates are never the teacher's training images.
    data = DataConfig(spec=args.data, data_dir=args.data_dir, input_size=args.input_size,
                      batch_size=args.batch_size, seed=args.data_seed, heldout=args.heldout)
    result = train_teacher(args.model, data, recipe, out=args.out)
    print(f"teacher: test top-1 {result['test_top1']:.2f}% after {result['epochs']} epochs "
          f"in {result['train_time_s']:.0f} s -> {args.out}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from hant.run import init_run

    cfg = init_run(args.run, model=args.model, checkpoint=args.checkpoint, data=args.data,
                   data_dir=args.data_dir, input_size=args.input_size, space=args.space,
                   include=args.include, exclude=args.exclude, trust_pickle=args.trust_pickle,
                   config=args.config, random_teacher=args.random_teacher)
    print(f"initialised {args.run}: {cfg.model.source}, data {cfg.data.spec} at {cfg.data.input_size}px, "
          f"space {cfg.space}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from hant.distill import distill

    distill(args.run, images=args.images, max_memory_mb=args.max_memory)
    return 0


def cmd_redistill(args: argparse.Namespace) -> int:
    from hant.redistill import redistill

    redistill(args.run, args.plan, images=args.images)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from hant.latency import measure_table

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HantError(f"--option takes KEY=VALUE (e.g. peak_gflops=200), got '{item}'")
        import yaml

        options[key] = yaml.safe_load(value)  # numbers and booleans as such, the rest as text
    measure_table(args.run, target=args.target, batch_size=args.batch_size, validate=args.validate,
                  force=args.force, threads=args.threads, options=options or None)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from hant.score import score

    score(args.run, method=args.method, plan=args.plan)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from hant.measure import time_plan
    from hant.pipeline import refine_plan

    refine_plan(args.run, args.plan, args.rounds, timer=time_plan if args.check_rounds else None,
                check_rounds=args.check_rounds)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from hant.measure import time_plan
    from hant.select import SelectOptions, select, select_measured

    options = SelectOptions(max_params=args.max_params, max_flops=args.max_flops, second_target=args.second_target,
                            second_budget_ms=args.second_budget_ms, freeze=args.freeze,
                            exclude_families=args.exclude_family, objective=args.objective,
                            candidates=args.candidates, min_diff=args.min_diff, context=args.context)
    if args.check_rounds:
        if args.speedup is None or args.sweep:
            raise HantError("--check-rounds checks a --speedup plan on the hardware; give --speedup S without --sweep")
        if args.candidates != 1:
            raise HantError("--candidates does not combine with --check-rounds; drop one of them")
        select_measured(args.run, args.target, speedup=args.speedup, timer=time_plan,
                        name=args.name or f"{args.target}-x{args.speedup:g}", rounds=args.check_rounds, options=options)
        return 0
    select(args.run, target=args.target, budget_ms=args.budget_ms, speedup=args.speedup,
           sweep=args.sweep, name=args.name, options=options)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from hant.finetune import finetune
    from hant.measure import measure

    finetune(args.run, args.plan, epochs=args.epochs, feature_loss=args.feature_loss,
             feature_weight=args.feature_weight, ce_weight=args.ce_weight)
    if not args.no_measure:
        measure(args.run, args.plan)
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from hant.measure import measure

    measure(args.run, args.plan)
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    from hant.pick import pick_plan

    pick_plan(args.run, args.plan, images=args.images)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hant.export import export

    export(args.run, args.plan, int8=args.int8)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hant.report import require_report_inputs, write_report

    require_report_inputs(args.run)
    print(f"wrote {write_report(args.run)}")
    return 0


def cmd_accelerate(args: argparse.Namespace) -> int:
    from hant.pipeline import AccelerateOptions, accelerate_run

    opts = AccelerateOptions(target=args.target, batch_size=args.batch_size, speedups=args.speedup or [2.0, 3.0],
                             validate=args.validate, int8=not args.no_int8, finetune_epochs=args.epochs,
                             check_rounds=args.check_rounds, candidates=args.candidates,
                             redistill=not args.no_redistill,
                             **({} if args.refine is None else {"refine": args.refine}))
    init_kwargs = None
    if args.model or args.config or args.data:
        init_kwargs = dict(model=args.model, checkpoint=args.checkpoint, data=args.data, data_dir=args.data_dir,
                           input_size=args.input_size, space=args.space, include=args.include,
                           exclude=args.exclude, trust_pickle=args.trust_pickle, config=args.config,
                           random_teacher=args.random_teacher)
    out = accelerate_run(args.run, opts, init_kwargs=init_kwargs)
    from hant.report import collect, results_table

    print(results_table(collect(args.run)))
    print(f"report: {out['report']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hant.demo import demo

    demo(run=args.run, quick=args.quick, data=args.data)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hant.config import DataConfig  # no torch either: the split's defaults
    from hant.teacher_train import TeacherRecipe  # no torch: the recipe's flags only

    p = argparse.ArgumentParser(prog="hant", description="Hardware-aware network transformation.")
    p.add_argument("--version", action="version", version=f"hant {__import__('hant').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="list the replaceable layers of a model and the candidates per layer")
    s.add_argument("--model", required=True, help="timm:NAME | torchvision:NAME | package.module:factory")
    s.add_argument("--checkpoint", default=None, help="weights: .safetensors, or a torch checkpoint")
    s.add_argument("--trust-pickle", action="store_true", help="allow unpickling a checkpoint you trust")
    s.add_argument("--input-size", nargs="+", type=int, default=[1, 64, 64], metavar="N", help="C H W")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--space", default="default", help="candidate space: full | default | tiny | path.yaml")
    s.add_argument("--include", action="append", default=[], help="layer glob to replace (repeatable)")
    s.add_argument("--exclude", action="append", default=[], help="layer glob to keep (repeatable)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("train-teacher", help="train a teacher network on a dataset")
    s.add_argument("--model", default="timm:efficientnet_b0")
    s.add_argument("--data", default="fashion-mnist", help="fashion-mnist | imagefolder:/path | synthetic:N")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--input-size", type=int, default=64, help="image side in pixels")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--out", required=True, help="output .safetensors (a .json is written beside it)")
    s.add_argument("--data-seed", type=int, default=DataConfig.seed,
                   help=f"seed of the held-out split, as a run's data.seed (default {DataConfig.seed})")
    s.add_argument("--heldout", type=int, default=DataConfig.heldout,
                   help=f"images held out of training, as a run's data.heldout (default {DataConfig.heldout})")
    TeacherRecipe.add_flags(s)  # --epochs, --lr, --seed, ...: one per field of the recipe
    s.set_defaults(func=cmd_train_teacher)

    s = sub.add_parser("init", help="create a run folder: config.yaml and layers.json")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--model", default=None, help="teacher source (default from --config or timm:efficientnet_b0)")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--random-teacher", action="store_true",
                   help="no trained weights: seed the network and save it in the run folder")
    s.add_argument("--trust-pickle", action="store_true")
    s.add_argument("--data", default=None, help="fashion-mnist | imagefolder:/path | synthetic:N")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--input-size", type=int, default=None)
    s.add_argument("--space", default=None, help="full | default | tiny | path.yaml")
    s.add_argument("--include", action="append", default=[])
    s.add_argument("--exclude", action="append", default=[])
    s.add_argument("--config", default=None, help="a YAML config to start from")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("distill", help="phase 1: train every candidate by layer-wise distillation")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--images", type=int, default=None, help="training images per candidate")
    s.add_argument("--max-memory", type=int, default=None, metavar="MB", help="memory budget for one group")
    s.set_defaults(func=cmd_distill)

    s = sub.add_parser("latency", help="time every candidate on a target: the latency table")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--target", default="onnxruntime-cpu")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--validate", type=int, default=0, metavar="K", help="check the table on K random networks")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--force", action="store_true", help="use a table measured on another machine")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, repeatable (analytic: peak_gflops, bandwidth_gbs; "
                        "torch-cuda: precision, cuda_graphs; clock: wall|thread)")
    s.set_defaults(func=cmd_latency)

    s = sub.add_parser("score", help="score every candidate on the held-out split")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--method", "--score", dest="method", choices=["eval", "distill"], default=None,
                   help="eval: replace one layer and run the held-out split; distill: phase-1 held-out error")
    s.add_argument("--plan", default=None,
                   help="score every candidate with the rest of this plan in place (RUN/refine/PLAN.scores.json)")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("select", help="phase 2: choose one candidate per layer under a latency budget")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--target", required=True, help="target id of a latency table in RUN/latency/")
    g = s.add_mutually_exclusive_group(required=False)  # --sweep alone spans every feasible budget
    g.add_argument("--budget-ms", type=float, default=None)
    g.add_argument("--speedup", type=float, default=None)
    s.add_argument("--sweep", action="store_true", help="solve a range of budgets; write the Pareto front")
    s.add_argument("--name", default=None, help="plan name (default from the budget)")
    s.add_argument("--objective", choices=["d_loss", "d_acc", "kl"], default=None)
    s.add_argument("--max-params", type=float, default=None)
    s.add_argument("--max-flops", type=float, default=None)
    s.add_argument("--second-target", default=None)
    s.add_argument("--second-budget-ms", type=float, default=None)
    s.add_argument("--freeze", action="append", default=[], help="layer glob kept as the teacher")
    s.add_argument("--exclude-family", action="append", default=[], help="op family never chosen")
    s.add_argument("--check-rounds", type=int, default=0,
                   help="time the --speedup plan against the teacher and tighten its budget up to N times "
                        "until the measured speedup is met")
    s.add_argument("--candidates", type=int, default=1, metavar="K",
                   help="also write up to K-1 alternative plans at the same budget, as NAME-alt1, NAME-alt2, ...")
    s.add_argument("--min-diff", type=float, default=0.2, metavar="F",
                   help="share of the layers in which every two of the K plans differ (default 0.2)")
    s.add_argument("--context", default=None, metavar="PLAN",
                   help="minimise the scores taken around PLAN (`hant score --plan PLAN`) instead of scores.json")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("refine", help="re-score a plan's candidates around the plan and select again; "
                                      "the plan with the lowest held-out loss keeps its name")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True)
    s.add_argument("--rounds", type=int, default=1, help="rounds of re-scoring and selection at most (default 1)")
    s.add_argument("--check-rounds", type=int, default=3,
                   help="times each new plan is checked against the teacher on the target and its budget "
                        "tightened until the plan's speedup is met (0: trust the latency table)")
    s.set_defaults(func=cmd_refine)

    s = sub.add_parser("redistill", help="re-distil a plan's chosen candidates on the student's own inputs "
                                         "(before finetune, which then starts from them)")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True)
    s.add_argument("--images", type=int, default=None,
                   help="training images per layer (default: distill.redistill_images)")
    s.set_defaults(func=cmd_redistill)

    s = sub.add_parser("finetune", help="phase 3: assemble a plan's student, fine-tune it with distillation, measure it")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True)
    s.add_argument("--epochs", type=float, default=None)
    s.add_argument("--feature-loss", choices=["none", "nmse", "cosine"], default=None,
                   help="also distil the feature maps at the plan's layers (default: finetune.feature_loss)")
    s.add_argument("--feature-weight", type=float, default=None, metavar="W",
                   help="weight of the feature loss (default: finetune.feature_weight)")
    s.add_argument("--ce-weight", type=float, default=None, metavar="W",
                   help="weight of the label loss, 0 for none (default: finetune.ce_weight)")
    s.add_argument("--no-measure", action="store_true", help="skip the end-to-end latency measurement")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("measure", help="time a plan's student against the teacher on its target (into eval.json)")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True)
    s.set_defaults(func=cmd_measure)

    s = sub.add_parser("pick", help="distil a plan and its alternatives briefly; the best on held-out "
                                    "images becomes the plan to fine-tune")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True, help="a plan selected with --candidates K")
    s.add_argument("--images", type=int, default=None, metavar="N",
                   help="train images of each short distillation (default: finetune.pick_images)")
    s.set_defaults(func=cmd_pick)

    s = sub.add_parser("export", help="export a student to ONNX (and INT8)")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--plan", required=True)
    s.add_argument("--int8", action="store_true", help="also static INT8 with ONNX Runtime's quantiser")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("report", help="write RUN/report.md and the plots")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("accelerate", help="every stage in order, skipping finished work")
    s.add_argument("--run", "--run-dir", dest="run", required=True)
    s.add_argument("--config", default=None, help="a YAML config that drives the run")
    s.add_argument("--model", default=None)
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--random-teacher", action="store_true",
                   help="no trained weights: seed the network and save it in the run folder")
    s.add_argument("--trust-pickle", action="store_true")
    s.add_argument("--data", default=None)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--input-size", type=int, default=None)
    s.add_argument("--space", default=None)
    s.add_argument("--include", action="append", default=[])
    s.add_argument("--exclude", action="append", default=[])
    s.add_argument("--target", default="onnxruntime-cpu")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--speedup", type=float, action="append", default=None, help="repeatable; default 2 and 3")
    s.add_argument("--validate", type=int, default=10)
    s.add_argument("--epochs", type=float, default=None, help="fine-tuning epochs")
    s.add_argument("--no-int8", action="store_true")
    s.add_argument("--check-rounds", type=int, default=3,
                   help="times each plan is checked against the teacher on the target and its budget "
                        "tightened until the measured speedup is met (0: trust the latency table)")
    s.add_argument("--candidates", type=int, default=1, metavar="K",
                   help="select K plans per speedup, distil each briefly and fine-tune the best on "
                        "held-out images (default 1: the selection's best)")
    s.add_argument("--no-redistill", action="store_true",
                   help="fine-tune from the phase-1 weights of the chosen candidates instead of re-distilling "
                        "them first on the student's own inputs")
    s.add_argument("--refine", type=int, default=None, metavar="N",
                   help="rounds of re-scoring each plan's candidates around the plan and selecting again, "
                        "keeping the plan with the lowest held-out loss (default 0: off)")
    s.set_defaults(func=cmd_accelerate)

    s = sub.add_parser("demo", help="the embedded default end to end (Fashion-MNIST, EfficientNet-B0)")
    s.add_argument("--quick", action="store_true", help="small model, tiny space, few images: minutes")
    s.add_argument("--run", default=None, help="run folder (default runs/demo or runs/demo-quick)")
    s.add_argument("--data", default=None, help="override the dataset (e.g. synthetic:2000)")
    s.set_defaults(func=cmd_demo)

    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hant` console script. Returns the exit status."""
    # Spinning OpenMP threads starve every other process on a shared machine (a 7x slowdown
    # was measured); passive waiting costs nothing measurable when the machine is idle.
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HantError as e:
        print(f"hant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hant: interrupted; finished work is on disk and will be reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
