"""Search overhead: what a trial costs outside measurement.

1. Non-training part of a trial, for the headline space (deit_t, budget 0.35, every method, TPE multivariate
   with group decomposition, journal storage): Optuna's ask (the sampler), building the candidate (sampling
   the params, scaling keep ratios / r by bisection on the analytic count), the analytic FLOPs of the final
   config alone, set_constraint + the trial records, and tell. Measured over ``--trials`` sampled trials
   with a synthetic objective (no model is built), so the sampler sees a realistic growing history.
2. The infeasible path (an over-budget config: analytic count, set_constraint, records, prune).
3. Share of trial time spent outside measurement in real searches: per trial, wall time (Optuna start to
   complete) minus the measured phases (build, throughput, zero-shot eval, fine-tune, fine-tuned eval,
   save weights). Runs the smoke study fresh, and reads any finished study directories given with
   ``--study-dir`` (e.g. the headline run ``runs/deit_t_budget035``).

    python benchmarks/search_overhead.py                       # writes benchmarks/results/search_overhead.json
    python benchmarks/search_overhead.py --study-dir runs/deit_t_budget035
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpsexplore.measure.environment import environment_info  # noqa: E402
from tpsexplore.measure.flops import analytic_macs, geometry  # noqa: E402
from tpsexplore.search.backend import (SearchJournalBackend, info, make_sampler, open_storage,  # noqa: E402
                                       record)
from tpsexplore.search.objective import TrialContext, analytic_measurements, run_trial  # noqa: E402
from tpsexplore.search.space import SearchSpace, SpaceSettings, _Fixed, resolve_variants  # noqa: E402
from tpsexplore.search.spec import build_settings, load_study_file  # noqa: E402

MEASURED_PHASES = ("build", "throughput", "zero-shot eval", "fine-tune", "fine-tuned eval", "save weights")


def _stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"median_ms": statistics.median(v) * 1e3, "p90_ms": v[int(0.9 * (len(v) - 1))] * 1e3,
            "max_ms": v[-1] * 1e3, "mean_ms": statistics.fmean(v) * 1e3, "n": len(v)}


def sampling_overhead(n_trials: int, tmp: Path) -> dict:
    settings = build_settings(load_study_file(ROOT / "studies" / "deit_t_budget035.toml"),
                              {"out": str(tmp), "study_name": "overhead"})
    geo = geometry(settings.backbone)
    space = SearchSpace(geo, settings.budget, resolve_variants(settings.methods), settings.max_stages,
                        settings.space, settings.seed)
    study = optuna.create_study(study_name="overhead", storage=open_storage(settings),
                                directions=settings.directions, sampler=make_sampler(settings))
    for params in space.default_params():
        study.enqueue_trial(params)
    parts: dict[str, list[float]] = {k: [] for k in ("ask", "suggest (sampler + candidate)", "candidate_only",
                                                     "analytic_count", "record", "tell", "non_training_total")}
    feasible = 0
    by_n: list[tuple[int, float]] = []
    n_defaults = len(space.default_params())
    for i in range(n_trials):
        t0 = time.perf_counter()
        trial = study.ask()
        t1 = time.perf_counter()
        cand = space.suggest(trial)  # TPE samples here (relative params are drawn lazily) + our scaling
        t2 = time.perf_counter()
        trial.set_constraint("budget", cand.constraint)
        trial.set_user_attr("tpsx_info", {"config": cand.config.to_dict(), "label": cand.config.label,
                                          "variant": cand.variant, "gmacs": cand.gmacs, "feasible": cand.feasible})
        trial.set_user_attr("tpsx_record", {"measurements": analytic_measurements(cand), "durations": {}})
        t3 = time.perf_counter()
        acc = 0.95 - 0.6 * (1 - cand.fraction) ** 2 + 0.02 * len(cand.config.locations)  # synthetic
        study.tell(trial, [acc, cand.gmacs])
        t4 = time.perf_counter()
        # outside the timed sequence: our own candidate building (same params, no sampler) and one count
        r0 = time.perf_counter()
        space.suggest(_Fixed(trial.params))
        r1 = time.perf_counter()
        analytic_macs(cand.config, geo)
        r2 = time.perf_counter()
        if i >= n_defaults:
            feasible += cand.feasible
        for k, v in (("ask", t1 - t0), ("suggest (sampler + candidate)", t2 - t1), ("candidate_only", r1 - r0),
                     ("analytic_count", r2 - r1), ("record", t3 - t2), ("tell", t4 - t3),
                     ("non_training_total", t4 - t0)):
            parts[k].append(v)
        by_n.append((i, t4 - t0))
    sampled = n_trials - n_defaults
    return {
        "study": "deit_t_budget035 space (synthetic objective)",
        "sampler": "TPE multivariate, group, constant_liar",
        "storage": "journal file (flock)",
        "trials": n_trials,
        "components": {k: _stats(v) for k, v in parts.items()},
        "non_training_by_trial_block": {f"{a}-{a + 24}": _stats([t for i, t in by_n if a <= i < a + 25])
                                        for a in range(0, n_trials, 25)},
        "feasible_share_sampled": feasible / sampled if sampled else None,
    }


def infeasible_path(tmp: Path, n: int = 30) -> dict:
    settings = build_settings({}, {"out": str(tmp), "budget": 0.2, "study_name": "infeasible"})
    space = SearchSpace(geometry("deit_t"), 0.2, resolve_variants(["etps"]), 3,
                        SpaceSettings(grid_locations=((3, 6, 9),), grid_keep_ratios=(0.7,)))
    study = optuna.create_study(study_name="infeasible", storage=open_storage(settings),
                                directions=settings.directions, sampler=make_sampler(settings))
    ctx = TrialContext(settings=settings, space=space, task=None, study=study, weights_dir=tmp / "w",
                       environment={}, device=torch.device("cpu"))
    check, total = [], []
    for _ in range(n):
        study.enqueue_trial({"method": "etps", "locations": "3,6,9", "keep": 0.7, "temperature": 1.0})
        trial = study.ask()
        t0 = time.perf_counter()
        outcome, _ = run_trial(ctx, trial)
        study.tell(trial, state=TrialState.PRUNED)
        total.append(time.perf_counter() - t0)
        assert outcome == "infeasible"
        t0 = time.perf_counter()
        space.suggest(optuna.trial.FixedTrial({"method": "etps", "locations": "3,6,9", "keep": 0.7,
                                               "temperature": 1.0}))
        check.append(time.perf_counter() - t0)
    return {"config": "etps k0.7@3,6,9 on deit_t at budget 0.2 (0.65 x baseline)",
            "decision_only (sample + analytic count)": _stats(check),
            "recorded (constraint + records + prune)": _stats(total)}


def study_share(study_dir: Path, name: str | None = None) -> dict:
    name = name or study_dir.name
    journal = study_dir / "optuna.journal"
    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(journal)))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    rows = []
    for t in trials:
        if not t.state.is_finished() or not t.datetime_complete or not t.datetime_start:
            continue
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        dur = record(t, "durations") or {}
        measured = sum(v for k, v in dur.items() if k in MEASURED_PHASES)
        rows.append({"number": t.number, "state": t.state.name.lower(), "label": info(t, "label"), "wall_s": wall,
                     "measured_s": measured, "sampling_s": dur.get("sampling", 0.0),
                     "outside_s": max(0.0, wall - measured)})
    total_wall = sum(r["wall_s"] for r in rows)
    total_out = sum(r["outside_s"] for r in rows)
    built = [r for r in rows if r["measured_s"] > 0]
    return {
        "study_dir": str(study_dir), "trials": len(rows),
        "total_trial_wall_s": total_wall, "outside_measurement_s": total_out,
        "share_outside_measurement": total_out / total_wall if total_wall else None,
        "per_built_trial_outside_s": _stats([r["outside_s"] for r in built]) if built else None,
        "per_built_trial_wall_s": _stats([r["wall_s"] for r in built]) if built else None,
        "phases_total_s": {p: sum((record(t, "durations") or {}).get(p, 0.0) for t in trials)
                           for p in ("sampling", *MEASURED_PHASES)},
        "trials_detail": rows,
    }


def smoke_search(tmp: Path) -> Path:
    from tpsexplore.cli import main

    os.environ.setdefault("TPSEXPLORE_CACHE", str(tmp / "cache"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["search", "--study", str(ROOT / "studies" / "smoke.toml"), "--out", str(tmp / "runs"),
                   "--quiet"])
    if rc != 0:
        raise SystemExit(f"smoke search failed with exit code {rc}")
    return tmp / "runs" / "smoke"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="sampled trials for part 1 (default 100)")
    p.add_argument("--study-dir", action="append", default=[], help="a finished study directory to analyse")
    p.add_argument("--no-smoke", action="store_true", help="skip the fresh smoke search")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_overhead.json"))
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result["sampling"] = sampling_overhead(args.trials, tmp / "s")
        result["infeasible"] = infeasible_path(tmp / "i")
        studies = {}
        if not args.no_smoke:
            studies["smoke (fresh)"] = study_share(smoke_search(tmp))
        for sd in args.study_dir:
            studies[sd] = study_share(Path(sd))
        result["studies"] = studies
    result["load_average_after"] = os.getloadavg()
    env = environment_info("cpu")
    result["environment"] = {k: env.get(k) for k in ("cpu_model", "logical_cores", "torch", "optuna", "python",
                                                     "git_commit")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    c = result["sampling"]["components"]
    print(f"non-training part of a trial (median over {args.trials}): ask {c['ask']['median_ms']:.1f} ms, "
          f"suggest {c['suggest (sampler + candidate)']['median_ms']:.2f} ms (of which our candidate building "
          f"{c['candidate_only']['median_ms']:.2f} ms; analytic count alone "
          f"{c['analytic_count']['median_ms']:.3f} ms), records {c['record']['median_ms']:.2f} ms, tell "
          f"{c['tell']['median_ms']:.2f} ms, total {c['non_training_total']['median_ms']:.1f} ms; "
          f"feasible share of sampled {result['sampling']['feasible_share_sampled']:.2f}")
    inf = result["infeasible"]["recorded (constraint + records + prune)"]
    print(f"infeasible sample recorded in {inf['median_ms']:.2f} ms median (max {inf['max_ms']:.2f} ms)")
    for name, s in result["studies"].items():
        print(f"{name}: {s['trials']} trials, {100 * (s['share_outside_measurement'] or 0):.1f}% of trial time "
              f"outside measurement")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
