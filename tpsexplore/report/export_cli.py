"""`tpsexplore export STUDY --trial N -o config.json` (or ``--pick max-accuracy`` with limits).

    tpsexplore export runs/deit_t_budget035 --trial 17 -o config.json
    tpsexplore export runs/deit_t_budget035 --pick max-accuracy --max-gflops 0.45 -o config.json --weights w.safetensors
    tpsexplore export runs/deit_t_budget035 --pick max-accuracy --min-throughput 5000 --batch-size 64

The config is applied with ``tpsexplore.apply(model, "config.json")``.
"""
from __future__ import annotations

import argparse
import json
import sys


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
    parser.add_argument("--batch-size", dest="batch_size", type=int, metavar="B",
                        help="batch size of the throughput limit (default the largest measured)")
    parser.add_argument("--max-latency", dest="max_latency", type=float, metavar="MS",
                        help="limit: at most MS milliseconds at batch 1")
    parser.add_argument("-o", "--out", metavar="FILE", help="deployment config JSON to write (default: print it)")
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
    cfg = export_trial(args.study, args.out, trial=args.trial, pick=args.pick, max_gmacs=args.max_gmacs,
                       min_throughput=args.min_throughput, max_latency_ms=args.max_latency,
                       batch_size=args.batch_size, weights=args.weights, study_name=args.study_name)
    acc = cfg["measurements"].get(cfg["study"].get("accuracy_column") or "", {}).get("value")
    gm = cfg["measurements"].get("gmacs@analytic", {}).get("value")
    summary = (f"trial {cfg['trial']} ({cfg['label']}): top-1 {acc if acc is not None else '?'}, "
               f"{gm if gm is not None else '?'} GMACs")
    if args.out:
        w = cfg.get("weights") or {}
        where = f"; weights {w['path']}" if w else "; no weights (the study kept none for this trial)"
        print(f"exported {summary} to {args.out}{where}")
    else:
        print(json.dumps(cfg, indent=2))
        print(f"exported {summary}", file=sys.stderr)
    return 0
