"""`tpsexplore export STUDY --trial N -o config.json` (or ``--pick max-accuracy`` with limits).

    tpsexplore export runs/deit_t_budget035 --trial 17 -o config.json
    tpsexplore export runs/deit_t_budget035 --pick max-accuracy --max-gflops 0.45 -o config.json --weights w.safetensors
    tpsexplore export runs/deit_t_budget035 --pick max-accuracy --min-throughput 5000 --batch-size 64

The config is applied with ``tpsexplore.apply(model, "config.json")``. With ``--format onnx|pt2|torchscript``
the reduced model itself is written, with the trial's fine-tuned weights, and its config beside it:

    tpsexplore export runs/deit_t_budget035 --trial 17 --format onnx -o deit.onnx   # + deit.onnx.json
"""
from __future__ import annotations

import argparse
import json
import sys


FORMATS = ("onnx", "pt2", "torchscript")  # tpsexplore.deploy.FORMATS (not imported here: `--help` stays light)


def _batch(text: str) -> int | str:
    """--batch-size: a positive integer, or 'dynamic' (a dynamic batch of an exported model)."""
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="a study directory, its results.db or a database URL")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, metavar="N", help="export trial number N")
    # no argparse choices: the rules live in tpsexplore.report.export (pandas, torch), which checks them after
    # parsing; a test keeps this help listing every rule
    which.add_argument("--pick", metavar="RULE", help="pick a trial by rule: max-accuracy (the default: the most "
                       "accurate within the study's budget, or within the limits below) or recommended (the "
                       "report's headline)")
    parser.add_argument("--max-gflops", "--max-gmacs", dest="max_gmacs", type=float, metavar="G",
                        help="limit: at most G GMACs (analytic, batch 1; the papers' 'GFLOPs')")
    parser.add_argument("--min-throughput", dest="min_throughput", type=float, metavar="X",
                        help="limit: at least X img/s as measured by the study")
    parser.add_argument("--batch-size", dest="batch_size", type=_batch, metavar="B",
                        help="batch size of the throughput limit (default the largest measured); with --format "
                        "also the exported model's batch: B fixes it, 'dynamic' leaves it free (the default for "
                        "onnx and pt2; torchscript defaults to 1)")
    parser.add_argument("--max-latency", dest="max_latency", type=float, metavar="MS",
                        help="limit: at most MS milliseconds at batch 1")
    parser.add_argument("-o", "--out", metavar="FILE", help="deployment config JSON to write (default: print it); "
                        "with --format the model file (its config goes beside it as FILE.json)")
    parser.add_argument("--format", choices=FORMATS, help="write the reduced model with the trial's fine-tuned "
                        "weights instead of only its config: onnx (opset 18, onnxruntime), pt2 (torch.export) or "
                        "torchscript; an error when the study did not keep the trial's weights")
    parser.add_argument("--weights", metavar="PATH", help="also save the trial's fine-tuned weights here "
                        "(.safetensors, .pth or .pt); an error when the study did not keep them")
    parser.add_argument("--study-name", dest="study_name", metavar="NAME",
                        help="which study, when the database holds several")


def run(args: argparse.Namespace) -> int:
    from .export import PICK_RULES, export_trial

    if args.pick is not None and args.pick not in PICK_RULES:  # before the study is opened
        raise ValueError(f"pick: {args.pick!r} is not a rule; allowed: {', '.join(PICK_RULES)}")
    limits = (args.max_gmacs, args.min_throughput, args.max_latency)
    if args.trial is not None and any(v is not None for v in limits):
        raise ValueError("trial: --max-gflops/--min-throughput/--max-latency choose a trial by rule; they cannot "
                         "be combined with --trial")
    if args.batch_size == "dynamic" and args.format is None:
        raise ValueError("batch_size: dynamic is the batch of an exported model; it needs --format")
    limit_batch = args.batch_size if isinstance(args.batch_size, int) else None
    cfg = export_trial(args.study, args.out, trial=args.trial, pick=args.pick, max_gmacs=args.max_gmacs,
                       min_throughput=args.min_throughput, max_latency_ms=args.max_latency,
                       batch_size=limit_batch, weights=args.weights, study_name=args.study_name,
                       format=args.format, model_batch_size=args.batch_size if args.format else None)
    acc = cfg["measurements"].get(cfg["study"].get("accuracy_column") or "", {}).get("value")
    gm = cfg["measurements"].get("gmacs@analytic", {}).get("value")
    summary = (f"trial {cfg['trial']} ({cfg['label']}): top-1 {acc if acc is not None else '?'}, "
               f"{gm if gm is not None else '?'} GMACs")
    if args.format:
        m = cfg["model"]
        batch = "dynamic batch" if m["batch_size"] == "dynamic" else f"batch {m['batch_size']}"
        print(f"exported {summary} as {m['format']} ({batch}) to {args.out}; config {args.out}.json")
    elif args.out:
        w = cfg.get("weights") or {}
        where = f"; weights {w['path']}" if w else "; no weights (the study kept none for this trial)"
        print(f"exported {summary} to {args.out}{where}")
    else:
        print(json.dumps(cfg, indent=2))
        print(f"exported {summary}", file=sys.stderr)
    return 0
