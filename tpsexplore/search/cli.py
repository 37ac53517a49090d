"""`tpsexplore search`: Optuna search of method x locations x keep ratios under a GFLOPs budget.

    tpsexplore search --backbone deit_t --budget 0.35
    tpsexplore search --study studies/deit_s_paper.toml --trials 200 --device cuda
    tpsexplore search --study smoke --out /tmp/runs --workers 2

Flags override the study file (``--study``), which overrides the defaults. Bad input is one line on stderr
and exit code 2, with nothing written.
"""
from __future__ import annotations

import argparse
import sys

from ..measure.options import add_data_weights_arguments, check_data_weights
from .defaults import (CONFIRM_SEEDS, CONFIRM_TOP, DEFAULT_BACKBONE, DEFAULT_BUDGET, DEFAULT_FINETUNE_STEPS,
                       DEFAULT_TRIALS, OBJECTIVES)

# Flags that set a `SearchSettings` field of the same name (``--labels`` goes to the [dataset] table).
_FLAGS = ("backbone", "budget", "trials", "timeout", "methods", "max_stages", "objectives", "finetune_steps",
          "device", "study_name", "out", "storage", "workers", "seed", "threads", "data", "checkpoint", "weights")
#: error-message fields that are set by a flag of another name (`tpsexplore.cli` names the flag)
FIELD_FLAGS = {"dataset.labels": "labels", "study_file": "study", "confirm.top": "confirm", "confirm.seeds": "confirm"}


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value  # the range (0, 1] is checked by the settings (one line, exit 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to search")
    g.add_argument("--study", metavar="FILE", help="TOML study spec (a path or a name under studies/, e.g. "
                   "deit_t_budget035); flags override it")
    g.add_argument("--backbone", help=f"deit_t, deit_s, deit_b, vit_b16 or a timm ViT name (default "
                   f"{DEFAULT_BACKBONE})")
    g.add_argument("--budget", type=_budget, help="GFLOPs budget as a fraction of the unreduced baseline, in "
                   f"(0, 1] (default {DEFAULT_BUDGET})")
    g.add_argument("--methods", help="comma-separated methods and policy+treatment combos (e.g. "
                   "etps,tome,similarity+squeeze); default all that can meet the budget")
    g.add_argument("--max-stages", dest="max_stages", type=int, help="reduction stages per config, 1-4 "
                   "(default 3)")
    g.add_argument("--objectives", help=f"one of {', '.join(OBJECTIVES)} (default accuracy,gflops; latency is "
                   "batch 1)")
    g = parser.add_argument_group("how long")
    g.add_argument("--trials", type=int, help=f"trials in the study, resumed ones included (default "
                   f"{DEFAULT_TRIALS})")
    g.add_argument("--timeout", help="stop starting trials after this long (seconds, or 15m / 1h)")
    g.add_argument("--finetune-steps", dest="finetune_steps", type=int, help="fine-tune steps per trial that "
                   f"passes the zero-shot gate; 0 = zero-shot only (default {DEFAULT_FINETUNE_STEPS})")
    g.add_argument("--confirm", metavar="TOP[xSEEDS]", help="after the trials, re-fine-tune TOP configs (the most "
                   "accurate of the feasible front, then the cheapest a paired test cannot tell from it) and the "
                   "baseline with SEEDS more seeds each and store mean +- spread "
                   f"(default {CONFIRM_TOP}x{CONFIRM_SEEDS}; 0 = off; study file: [confirm] top, "
                   "seeds, baseline)")
    g = parser.add_argument_group("where")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs); the study goes to DIR/NAME")
    g.add_argument("--study-name", dest="study_name", help="study name (default <backbone>_budget<percent>)")
    g.add_argument("--storage", help="Optuna storage: default a journal file DIR/NAME/optuna.journal; a "
                   "PostgreSQL URL to share a study between machines; a sqlite:/// URL only with one worker")
    g.add_argument("--workers", type=int, help="worker processes on this machine (one per GPU when there are "
                   "several; default 1)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, help="seed of the sampler, the data and the fine-tunes (default 0)")
    g.add_argument("--threads", type=int, help="CPU torch threads (default 0: one per core not busy with other "
                   "processes)")
    add_data_weights_arguments(parser)  # the same as `tpsexplore profile`
    parser.add_argument("--quiet", action="store_true", help="no progress display (the final table still prints)")


def run(args: argparse.Namespace) -> int:
    from .runner import run_search
    from .spec import build_settings, load_study_file

    file_values = load_study_file(args.study) if args.study else {}
    flags = {k: getattr(args, k, None) for k in _FLAGS}
    if args.quiet:
        flags["progress"] = False
    if getattr(args, "confirm", None) is not None:
        flags["confirm"] = parse_confirm(args.confirm)
    if args.labels is not None:
        flags["dataset"] = {**file_values.get("dataset", {}), "labels": args.labels}
    settings = build_settings(file_values, flags)
    check_data_weights(settings.data, settings.dataset.get("labels"), args.weights, settings.checkpoint)
    outcome = run_search(settings, out=sys.stdout)
    if outcome.interrupted:
        print("tpsexplore search: interrupted; what was measured is recorded (rerun the same command to resume)",
              file=sys.stderr)
    return outcome.exit_code


def parse_confirm(text: str) -> dict[str, int]:
    """``--confirm`` as [confirm] overrides: '3' (top 3), '3x4' (top 3, 4 more seeds), '0' / 'off' (none)."""
    t = str(text).strip().lower()
    if t in ("off", "none", "no"):
        return {"top": 0}
    top, sep, seeds = t.partition("x")
    try:
        out = {"top": int(top)}
        if sep:
            out["seeds"] = int(seeds)
    except ValueError:
        raise ValueError(f"confirm: {text!r} is not TOP or TOPxSEEDS (e.g. 2x2; 0 or off turns it off)") from None
    return out
