"""Sampler comparison: hypervolume against trial count for the default sampler, random search, GP and NSGA-II.

The objective is cheap but runs the search's own code path: the search's space (`runner._space`), sampling
and the budget constraint through `objective.check_candidate` (``trial.set_constraint``; an over-budget
sample is told PRUNED with no values, as in the search), the proxy-pretrained backbone of `search.task.Task`,
`tpsexplore.reduce.apply` seeded by `objective.config_seed`, and `Task.evaluate`. Objectives: zero-shot top-1
(no fine-tune) and analytic GMACs, the ``accuracy,gflops`` pair of the search.

* Warm start: every study first runs the trials the search enqueues (the unreduced baseline, then each method's
  published default scaled to the budget), for every sampler alike, so that all samplers start from the same
  trials. A sampler spec can change that (``enqueue=defaults`` leaves the baseline out, ``enqueue=none`` is a
  cold start). Trial counts include the enqueued trials, as ``--trials`` of the search does.
* Evaluation set: a fixed subset of ``--val-limit`` images of the proxy's validation set (a seeded permutation,
  seed `SUBSET_SEED`, first ``val-limit`` indices in their original order); every trial is scored on it.
* Cache: the objective is deterministic, so each distinct config (by its ReductionConfig JSON) is evaluated
  once per run and shared by every sampler and seed.
* Hypervolume: of the feasible completed trials among the first k, in (top-1, GMACs / budget GMACs) with
  reference point (top-1 0, GMACs = the budget's), i.e. the share of the box [0, 1] x [0, budget] that the
  front dominates (unit-free, at most 1). The baseline is over budget and adds nothing.

Sampler specs (``--samplers``, comma-separated ``NAME`` or ``NAME:key=value;key=value``): NAME is a
`SamplerSettings.name` built by `backend.make_sampler` (tpe = the project's default, random, gp, nsga2); keys
are `SamplerSettings` fields (``n_startup_trials``, ``population_size``) and ``enqueue`` (all | defaults |
none). Seeds: 0 .. --seeds - 1, passed as the study seed of `make_sampler` (the task and space keep theirs).
GP and NSGA-II model only the params every completed trial has; the enqueued baseline has none, so with the
search's warm start they are random search (the same stream as ``random`` at the same seed). The default list
therefore also runs them without the baseline (``enqueue=defaults``), and pure random search (``enqueue=none``).

    python benchmarks/sampler_compare.py                       # deit_t, budget 0.35: writes
                                                               # benchmarks/results/sampler_compare.json
    python benchmarks/sampler_compare.py --study studies/smoke.toml --seeds 2 --trials 10 --val-limit 128 \\
        --cache-dir /tmp/samplercache --out /tmp/sampler_compare_tiny.json     # tiny check
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpsexplore.measure.data import TensorData  # noqa: E402
from tpsexplore.measure.environment import environment_info  # noqa: E402
from tpsexplore.reduce import apply  # noqa: E402
from tpsexplore.report.pareto import hypervolume  # noqa: E402
from tpsexplore.search.backend import A_ROLE, make_sampler  # noqa: E402
from tpsexplore.search.objective import check_candidate, config_seed  # noqa: E402
from tpsexplore.search.runner import _space  # noqa: E402
from tpsexplore.search.space import Candidate, SearchSpace  # noqa: E402
from tpsexplore.search.spec import SamplerSettings, SearchSettings, build_settings, load_study_file  # noqa: E402
from tpsexplore.search.task import Task  # noqa: E402
from tpsexplore.stats import median_spread  # noqa: E402

SUBSET_SEED = 0
ENQUEUE = ("all", "defaults", "none")
# gp and nsga2 as the search would run them (baseline enqueued: see the note in the JSON), the same two without
# the baseline trial, and pure random search without any enqueued trial
DEFAULT_SAMPLERS = "tpe,random,gp,nsga2,gp:enqueue=defaults,nsga2:enqueue=defaults,random:enqueue=none"
PERMUTATIONS_MAX = 20_000
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sampler_compare.json"


# ----------------------------------------------------------------------------- sampler specs
@dataclass(frozen=True)
class SamplerChoice:
    """One compared sampler: its label (the spec text), its settings and which trials are enqueued first."""

    label: str
    settings: SamplerSettings
    enqueue: str = "all"

    @property
    def is_project_default(self) -> bool:
        return self.settings == SamplerSettings() and self.enqueue == "all"


def parse_sampler(text: str) -> SamplerChoice:
    """``tpe`` or ``nsga2:population_size=8;enqueue=defaults`` -> SamplerChoice; ValueError naming the bad part."""
    text = text.strip()
    name, _, rest = text.partition(":")
    known = {f.name for f in fields(SamplerSettings)} - {"name"}
    kwargs: dict[str, Any] = {"name": name.strip()}
    enqueue = "all"
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"samplers: {item!r} in {text!r} is not key=value")
        if key == "enqueue":
            if value.strip() not in ENQUEUE:
                raise ValueError(f"samplers: enqueue={value.strip()!r} in {text!r}; allowed: {', '.join(ENQUEUE)}")
            enqueue = value.strip()
        elif key in known:
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ValueError(f"samplers: {key}={value!r} in {text!r} is not an integer") from None
        else:
            raise ValueError(f"samplers: unknown key {key!r} in {text!r}; allowed: {', '.join(sorted(known))}, "
                             "enqueue")
    settings = SamplerSettings(**kwargs).validate()
    if settings.name == "grid":
        raise ValueError(f"samplers: {text!r}: grid needs a grid space; allowed: tpe, random, gp, nsga2")
    return SamplerChoice(text, settings, enqueue)


# ----------------------------------------------------------------------------- the objective
def val_subset(val: Any, limit: int | None) -> Any:
    """A fixed subset of ``limit`` images of the validation set (seeded permutation, original order kept)."""
    if limit is None or limit >= len(val):
        return val
    if not isinstance(val, TensorData):
        raise ValueError(f"val_limit: the validation set is a {type(val).__name__}; a subset is only drawn from "
                         "the proxy's in-memory set (give --val-limit 0 for the whole set)")
    gen = torch.Generator().manual_seed(SUBSET_SEED)
    idx = torch.randperm(len(val), generator=gen)[:limit].sort().values
    return TensorData(val.images[idx], val.labels[idx], val.shift, val.fill, val.indices[idx])


class ZeroShotObjective:
    """Zero-shot top-1 of a candidate, as a trial of the search computes it; one evaluation per distinct config."""

    def __init__(self, task: Task, seed: int) -> None:
        self.task, self.seed = task, seed
        self.cache: dict[str, dict[str, Any]] = {}
        self.evaluations = 0
        self.hits = 0
        self.seconds = 0.0

    def __call__(self, cand: Candidate) -> float:
        key = cand.config.to_json()
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit["top1"]
        t0 = time.perf_counter()
        model = self.task.new_model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config_seed(cand, self.seed))  # learned predictors start as the search's do
            apply(model, cand.config)
        out = self.task.evaluate(model)
        del model
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        self.cache[key] = {"top1": float(out["top1"]), "correct": int(out["correct1"]), "n": int(out["n"])}
        return self.cache[key]["top1"]


# ----------------------------------------------------------------------------- one study
def hv_curve(rows: list[dict[str, Any]], budget_gmacs: float) -> list[float]:
    """Hypervolume of the feasible completed trials among the first k rows, for k = 1 .. len(rows).

    Points are (top-1, -GMACs / budget GMACs) against the reference (0, -1): the share of the box
    [0, 1] x [0, budget] the front dominates.
    """
    pts: list[tuple[float, float]] = []
    out: list[float] = []
    hv = 0.0
    for r in rows:
        if r["state"] == "complete" and r["feasible"] and r["top1"] is not None:
            pts.append((r["top1"], -r["gmacs"] / budget_gmacs))
            hv = hypervolume(np.array(pts), np.array([0.0, -1.0]))
        out.append(hv)
    return out


def run_study(choice: SamplerChoice, seed: int, trials: int, settings: SearchSettings, space: SearchSpace,
              objective: ZeroShotObjective, bar: Any = None) -> dict[str, Any]:
    """``trials`` ask/evaluate/tell steps of one sampler and seed on an in-memory Optuna study."""
    sampler = make_sampler(replace(settings, seed=seed, sampler=choice.settings))
    study = optuna.create_study(directions=settings.directions, sampler=sampler)
    if choice.enqueue == "all":
        study.enqueue_trial({}, user_attrs={A_ROLE: "baseline"})
    if choice.enqueue in ("all", "defaults"):
        for params in space.default_params():
            study.enqueue_trial(params, user_attrs={A_ROLE: "default"})
    rows: list[dict[str, Any]] = []
    configs: set[str] = set()
    sampler_s = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        cand = check_candidate(trial, space)  # the sampler draws the params here (relative ones in ask)
        sampler_s += time.perf_counter() - t0
        configs.add(cand.config.to_json())
        row = {"role": trial.user_attrs.get(A_ROLE, "sampled"), "label": cand.config.label,
               "gmacs": float(f"{cand.gmacs:.7g}"), "feasible": cand.feasible, "top1": None}
        if not cand.feasible and not cand.reference:
            row["state"] = "infeasible"
            study.tell(trial, state=TrialState.PRUNED)
        else:
            row["top1"] = objective(cand)
            row["state"] = "complete"
            t0 = time.perf_counter()
            study.tell(trial, values=[row["top1"], cand.gmacs])
            sampler_s += time.perf_counter() - t0
        rows.append(row)
        if bar is not None:
            bar.update(1)
    hv = hv_curve(rows, space.budget_gmacs)
    # what GP and NSGA-II model jointly: the params every completed trial has (the rest they draw at random)
    common = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False,
                                                                            states=(TrialState.COMPLETE,)))
    return {"seed": seed, "hypervolume": [round(v, 6) for v in hv], "sampler_seconds": round(sampler_s, 3),
            "intersection_params": sorted(common),
            "distinct_configs": len(configs), "infeasible": sum(r["state"] == "infeasible" for r in rows),
            "trials": rows}


# ----------------------------------------------------------------------------- summary
def superiority(a: list[float], b: list[float]) -> dict[str, float]:
    """P(a > b) + P(a = b) / 2 over all (a_i, b_j) pairs, and the two-sided permutation p of mean(a) - mean(b):
    exact over all splits of the pooled values up to `PERMUTATIONS_MAX` splits, else that many seeded draws."""
    pairs = [(x > y) + 0.5 * (x == y) for x in a for y in b]
    pooled = np.asarray(list(a) + list(b), dtype=float)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    if math.comb(len(pooled), len(a)) <= PERMUTATIONS_MAX:
        splits = itertools.combinations(range(len(pooled)), len(a))
    else:
        rng = np.random.default_rng(0)
        splits = (rng.permutation(len(pooled))[:len(a)] for _ in range(PERMUTATIONS_MAX))
    count = total = 0
    for idx in splits:
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(idx)] = True
        total += 1
        count += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
    return {"p_superiority": round(sum(pairs) / len(pairs), 4), "permutation_p": round(count / total, 4)}


def summarise(runs: dict[str, list[dict[str, Any]]], n: int, trials: int, default: str | None,
              random_label: str | None, cold_random: str | None = None) -> dict[str, Any]:
    def at(label: str, k: int) -> list[float]:
        return [r["hypervolume"][k - 1] for r in runs[label]]

    per: dict[str, Any] = {}
    for label, rs in runs.items():
        curves = np.array([r["hypervolume"] for r in rs])
        entry: dict[str, Any] = {"seeds": len(rs), "median_curve": [round(float(v), 6) for v in
                                                                     np.median(curves, axis=0)]}
        for k in sorted({n, trials}):
            med, lo, hi = median_spread(at(label, k))
            entry[f"at_{k}"] = {"median": round(med, 6), "min": round(lo, 6), "max": round(hi, 6),
                                "per_seed": at(label, k)}
        per[label] = entry
    out: dict[str, Any] = {"N": n, "2N": trials, "samplers": per}
    if random_label in runs:
        target = per[random_label][f"at_{trials}"]["median"]
        reach: dict[str, Any] = {}
        for label, rs in runs.items():
            ks = [next((k + 1 for k, v in enumerate(r["hypervolume"]) if v >= target - 1e-12), None) for r in rs]
            med = statistics.median([math.inf if k is None else k for k in ks])  # never reached: beyond 2N
            reach[label] = {"per_seed": ks, "reached": sum(k is not None for k in ks),
                            "median": med if math.isfinite(med) else None}
        out["trials_to_reach_random_median_at_2N"] = {"target": target, "samplers": reach}
    if default in runs:
        comp = {}
        for label in runs:
            if label == default:
                continue
            comp[label] = {f"at_{k}": {"median_minus_default": round(per[label][f"at_{k}"]["median"]
                                                                    - per[default][f"at_{k}"]["median"], 6),
                                      **superiority(at(label, k), at(default, k))}
                           for k in sorted({n, trials})}
        out["versus_default"] = {"default": default, "note": "p_superiority: share of (other seed, default seed) "
                                 "pairs where the other sampler's hypervolume is higher (ties count half); "
                                 "permutation_p: two-sided permutation test of the difference in mean (exact for "
                                 "few seeds)", "samplers": comp}
    if default in runs and random_label in runs:
        d, r = per[default][f"at_{n}"]["median"], per[random_label][f"at_{trials}"]["median"]
        met = d >= r
        out["acceptance"] = {
            "criterion": f"median hypervolume of the default sampler ({default}) at N={n} >= that of random search "
                         f"({random_label}) at 2N={trials}",
            "default_at_N": d, "random_at_2N": r, "met": met,
            "statement": (f"The default sampler reaches a median hypervolume of {d:.4f} after {n} trials, "
                          f"{'at least' if met else 'below'} random search's {r:.4f} after {trials} trials "
                          f"({'met' if met else 'NOT met'}; {len(runs[default])} seeds each, same enqueued "
                          "warm-start trials for both).")}
    if default in runs and cold_random in runs:
        d, r = per[default][f"at_{n}"]["median"], per[cold_random][f"at_{trials}"]["median"]
        out["acceptance_vs_cold_random"] = {
            "criterion": f"as acceptance, against random search without enqueued trials ({cold_random})",
            "default_at_N": d, "random_at_2N": r, "met": d >= r}
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=str(ROOT / "studies" / "deit_t_budget035.toml"),
                   help="study file giving the space, geometry and proxy (default: the headline study)")
    p.add_argument("--backbone", default=None, help="override the study's backbone")
    p.add_argument("--budget", type=float, default=None, help="override the study's budget (fraction of GMACs)")
    p.add_argument("--seeds", type=int, default=5, help="sampler seeds 0 .. seeds-1 (default 5)")
    p.add_argument("--trials", type=int, default=40, help="trials per study, 2N (default 40; N = trials // 2)")
    p.add_argument("--val-limit", type=int, default=512,
                   help="images of the fixed validation subset (default 512; 0 = the whole set)")
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS,
                   help=f"comma-separated sampler specs (default {DEFAULT_SAMPLERS}; see the module docstring)")
    p.add_argument("--cache-dir", default=None,
                   help="proxy weights cache (sets TPSEXPLORE_CACHE; default: $TPSEXPLORE_CACHE or ~/.cache)")
    p.add_argument("--device", default="cpu", help="device of the evaluations (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's choice)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: {args.seeds} is not >= 1")
    if args.trials < 2:
        p.error(f"--trials: {args.trials} is not >= 2")
    if args.val_limit < 0:
        p.error(f"--val-limit: {args.val_limit} is not >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.cache_dir:
        os.environ["TPSEXPLORE_CACHE"] = str(Path(args.cache_dir).absolute())
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    choices = [parse_sampler(s) for s in args.samplers.split(",") if s.strip()]
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise ValueError(f"samplers: {args.samplers!r} names a sampler twice")
    settings = build_settings(load_study_file(args.study), {"backbone": args.backbone, "budget": args.budget,
                                                             "finetune_steps": 0, "device": args.device})
    device = torch.device(args.device)
    task = Task(settings, device)
    t0 = time.perf_counter()
    task.prepare(progress=not args.no_progress)
    prepare_s = time.perf_counter() - t0
    full_val = len(task.val_set)
    task.val_set = val_subset(task.val_set, args.val_limit or None)
    space = _space(settings, task)
    objective = ZeroShotObjective(task, settings.seed)
    n = args.trials // 2
    default = next((c.label for c in choices if c.is_project_default), None)
    random_label = next((c.label for c in choices if c.settings.name == "random" and c.enqueue == "all"), None)
    cold_random = next((c.label for c in choices if c.settings.name == "random" and c.enqueue == "none"), None)

    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in choices}
    total = len(choices) * args.seeds * args.trials
    with tqdm(total=total, desc="sampler_compare", file=sys.stderr, disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for seed in range(args.seeds):  # seeds outermost: an interrupted run still has every sampler
            for c in choices:
                bar.set_postfix_str(f"{c.label} seed {seed}, {objective.evaluations} evaluated")
                runs[c.label].append(run_study(c, seed, args.trials, settings, space, objective, bar))

    summary = summarise(runs, n, args.trials, default, random_label, cold_random)
    enqueued = [space.baseline().config.label] + [space.from_params(p).config.label for p in space.default_params()]
    result = {
        "benchmark": "sampler_compare",
        "command": "python benchmarks/sampler_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "objective": {
            "accuracy": "zero-shot top-1 (no fine-tune) through Task.new_model + reduce.apply + Task.evaluate",
            "cost": "analytic GMACs (batch 1)", "directions": settings.directions,
            "infeasible": "over-budget samples: trial.set_constraint('budget', ...) and PRUNED without values",
            "cache": "one evaluation per distinct ReductionConfig JSON, shared by all samplers and seeds "
                     "(the objective is deterministic)"},
        "hypervolume": {
            "points": "feasible completed trials: (top-1, GMACs / budget GMACs)",
            "trial_rows": "runs[sampler][i].trials: one row per trial in order (role, config label, analytic GMACs, "
                          "feasible, zero-shot top-1 or null, state complete | infeasible)",
            "reference": {"top1": 0.0, "gmacs": space.budget_gmacs},
            "units": "share of the box top-1 [0, 1] x GMACs [0, budget] dominated by the front (at most 1)",
            "trial_count": "all trials so far, the enqueued ones included (as the search's --trials)"},
        "settings": {
            "study_file": settings.study_file, "backbone": settings.backbone, "budget": settings.budget,
            "methods": [v.key for v in space.variants], "excluded_methods": space.excluded,
            "max_stages": settings.max_stages, "space": settings.space.to_dict(), "study_seed": settings.seed,
            "baseline_gmacs": space.baseline_gmacs, "budget_gmacs": space.budget_gmacs,
            "geometry": {"img_size": task.geometry.img_size[0], "patch_size": task.geometry.patch_size[0],
                         "num_patches": task.geometry.num_patches, "depth": task.geometry.depth,
                         "embed_dim": task.geometry.embed_dim},
            "data": task.data_description, "weights": task.weights_info,
            "val_subset": {"n": len(task.val_set), "of": full_val, "seed": SUBSET_SEED,
                           "rule": "seeded permutation of the validation set, first n indices, original order",
                           "eval_set": task.eval_set},
            "trials": args.trials, "N": n, "seeds": list(range(args.seeds)),
            "samplers": {c.label: {**vars(c.settings), "enqueue": c.enqueue, "project_default": c.is_project_default}
                         for c in choices},
            "enqueued": {"labels": enqueued, "note": "enqueue=all: baseline then the published defaults, in the "
                         "search's order; defaults: the defaults only; none: cold start"},
            "device": str(device), "torch_threads": torch.get_num_threads()},
        "notes": [
            "GPSampler and NSGAIISampler model only Optuna's intersection search space (the params every completed "
            "trial has) and draw every other param with their RandomSampler(seed). The enqueued baseline trial has "
            "no params, so with enqueue=all that space is empty (see intersection_params per run) and both are "
            "random search; with the same seed they draw the same stream as 'random' and give the same curve.",
            "Without the baseline (enqueue=defaults) the intersection is the params all methods share (method, "
            "fill); the method-specific params (locations, keep ratios, r schedule, options) stay random.",
            "Seeds are paired by index only through the sampler's seed; the comparisons in versus_default treat the "
            "samplers' seeds as independent samples."],
        "baseline_top1_on_subset": objective.cache.get(space.baseline().config.to_json(), {}).get("top1"),
        "summary": summary,
        "cost": {"wall_seconds": round(time.perf_counter() - t_start, 1), "prepare_seconds": round(prepare_s, 1),
                 "evaluations": objective.evaluations, "cache_hits": objective.hits,
                 "evaluation_seconds": round(objective.seconds, 1),
                 "seconds_per_evaluation": round(objective.seconds / max(1, objective.evaluations), 3),
                 "sampler_seconds": {label: round(sum(r["sampler_seconds"] for r in rs), 2)
                                     for label, rs in runs.items()}},
        "runs": runs,
        "environment": environment_info(device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(compact_json(result) + "\n")
    tmp.replace(out)
    _print_summary(summary, result["cost"], out)
    return 0


def compact_json(obj: Any) -> str:
    """Indented JSON with every list of scalars and every dict of scalars (a curve, a trial row) on one line."""
    flat: list[str] = []

    def scalar(v: Any) -> bool:
        return v is None or isinstance(v, (bool, int, float, str))

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            if v and all(scalar(x) for x in v.values()):
                flat.append(json.dumps(v, separators=(", ", ": "), default=str))
                return f"\0{len(flat) - 1}\0"
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            if all(scalar(x) for x in v):
                flat.append(json.dumps(list(v), separators=(", ", ": "), default=str))
                return f"\0{len(flat) - 1}\0"
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(obj), indent=1, default=str)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: flat[int(m.group(1))], text)


def _print_summary(summary: dict[str, Any], cost: dict[str, Any], out: Path) -> None:
    n, n2 = summary["N"], summary["2N"]
    print(f"hypervolume (median [min, max] over seeds) at N={n} and 2N={n2} trials:")
    for label, e in summary["samplers"].items():
        a, b = e[f"at_{n}"], e[f"at_{n2}"]
        print(f"  {label:<28} N: {a['median']:.4f} [{a['min']:.4f}, {a['max']:.4f}]   "
              f"2N: {b['median']:.4f} [{b['min']:.4f}, {b['max']:.4f}]")
    if "acceptance" in summary:
        print(summary["acceptance"]["statement"])
    print(f"{cost['evaluations']} evaluations ({cost['seconds_per_evaluation']:.3f} s each), {cost['cache_hits']} "
          f"cache hits, {cost['wall_seconds']:.0f} s in all; wrote {out}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f"sampler_compare: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
