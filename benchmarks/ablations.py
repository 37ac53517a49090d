"""The papers' ablations on the proxy: TPS Tables 4-6 and the similarity-pruning preprint's metric (issue 12).

Each ablation is one grid study under ``studies/`` (`ABLATIONS`): tps_table4_feature (the squeeze's matching
feature), tps_table5_similarity (cosine vs the previous attention map), tps_table6_random (learned vs random
policy under drop and squeeze) and preprint_metric (cosine / euclidean / dot redundancy). This script reads the
finished study folders (``--runs DIR``, default ``runs``: ``tpsexplore search --study NAME`` writes
``runs/NAME``), or runs them first with ``--run`` (a finished study is not re-run: the search resumes and has
nothing left to do), and writes

* ``benchmarks/results/ablations.json``: every row with its trials, seeds, pooled accuracy, 95% interval, seed
  spread, GMACs, the paired McNemar test against the ablation's default row and the paper's number;
* ``benchmarks/results/ablations.md``: the same as one markdown table per ablation.

Rows and statistics:

* A row is one (method variant, option value) of the ablation, over all its seeds (grid option ``seed``).
* Accuracy: all seeds' correct images over all their images (top-1 at the study's fidelity), with the 95% Wilson
  interval of those pooled counts (`tpsexplore.stats.wilson_interval`; it treats seed x image as independent
  trials, so it is a little narrow when seeds disagree: the seeds' min..max is given beside it).
* McNemar: exact, paired image by image and seed by seed (the row's seed s against the default row's seed s,
  seeds both rows have) against the ablation's default row (`Ablation.reference`); the difference carries
  Newcombe's interval (`tpsexplore.stats.paired_difference`).
* Paper: the published top-1 of the same comparison (methods-spec 11.0 and 12; DeiT-T / DeiT-S on ImageNet, not
  the proxy: compare the direction and size of the differences, not the levels).

    python benchmarks/ablations.py                         # read runs/<study> for each ablation
    python benchmarks/ablations.py --run                   # run the four studies first (about 20 min, 2 cores)
    python benchmarks/ablations.py --run --smoke --runs /tmp/abl --out /tmp/abl   # a tiny check of the plumbing
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpsexplore.reduce import ReductionConfig  # noqa: E402
from tpsexplore.stats import (Accuracy, decimals_for, format_p, mcnemar, paired_difference, signed,  # noqa: E402
                              wilson_interval)

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Ablation:
    """One ablation study: which config option it varies, how rows are named and paired, the paper's numbers.

    ``row_key(config)`` names a row; ``references(key)`` are the keys of the rows it is tested against (none: it
    is a default row itself); ``paper`` maps row keys to the published top-1 (percent), ``paper_gmacs`` to GMACs.
    """

    study: str
    title: str
    option: str
    source: str
    paper: dict[tuple[str, str], float] = field(default_factory=dict)
    paper_gmacs: dict[tuple[str, str], float] = field(default_factory=dict)
    note: str = ""

    def row_key(self, config: ReductionConfig, variant: str) -> tuple[str, str]:
        if self.option == "variant":
            return variant, ""
        value = getattr(config, self.option)
        if self.option == "similarity_metric":
            return f"{variant} k{config.keep_ratios[0]:g}", str(value)
        return variant, str(value)

    def references(self, key: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        if self.option == "variant":  # Table 6: learned -> random under drop and under squeeze; squeeze vs drop
            pairs = {"dtps": ("dynamicvit",), "random": ("dynamicvit",), "random+squeeze": ("random", "dtps"),
                     "etps": ("topk",)}
            return tuple((ref, "") for ref in pairs.get(key[0], ()))
        default = {"squeeze_feature": "full", "squeeze_similarity": "cosine", "similarity_metric": "cosine"}[
            self.option]
        return () if key[1] == default else ((key[0], default),)


ABLATIONS = (
    Ablation("tps_table4_feature", "TPS Table 4: the squeeze's matching feature", "squeeze_feature",
             "Wei et al., CVPR 2023, Table 4 (DeiT-T, ImageNet, dTPS keep 0.7; methods-spec 11.0)",
             paper={("dtps", "full"): 71.90, ("dtps", "content"): 71.73, ("dtps", "position"): 70.92},
             note="content = x - p, position = p (p: the position embedding of the token's original patch)."),
    Ablation("tps_table5_similarity", "TPS Table 5: the squeeze's similarity matrix", "squeeze_similarity",
             "Wei et al., CVPR 2023, Table 5 (DeiT-T, ImageNet, keep 0.7 on [3, 6, 9]; methods-spec 11.0)",
             paper={("dtps", "cosine"): 71.90, ("dtps", "attention"): 71.35, ("etps", "cosine"): 72.26,
                    ("etps", "attention"): 71.67},
             paper_gmacs={("dtps", "cosine"): 0.810, ("dtps", "attention"): 0.807, ("etps", "cosine"): 0.821,
                          ("etps", "attention"): 0.818},
             note="attention = the head-averaged attention map computed last before the squeeze."),
    Ablation("tps_table6_random", "TPS Table 6: a random policy under drop and squeeze", "variant",
             "Wei et al., CVPR 2023, Table 6 (DeiT-S, ImageNet, 30-epoch models evaluated with random scores, "
             "mean of 100 runs; methods-spec 11.0)",
             paper={("dynamicvit", ""): 79.42, ("random", ""): 76.51, ("dtps", ""): 79.68,
                    ("random+squeeze", ""): 78.19},
             note="The paper's random rows are the trained DynamicViT / dTPS models evaluated with random scores "
                  "(K = int(196 rho^s)); here random pruning (K = ceil(rho n)) is fine-tuned like the others. "
                  "random+squeeze is tested against random (drop), random against dynamicvit, dtps against "
                  "dynamicvit."),
    Ablation("preprint_metric", "Similarity-pruning preprint 4.4.1: the similarity metric", "similarity_metric",
             "Efficient Patch Pruning for Vision Transformers via Patch Similarity (preprints.org 202504.0596, "
             "section 4.4.1): its numbers could not be retrieved (methods-spec 12)",
             note="Training-free (zero-shot), pruning once before block 0 on the patch embeddings."),
)


# ----------------------------------------------------------------------------- running the studies
SMOKE_TABLES = ("model", "proxy", "train", "measure")  # taken from studies/smoke.toml for --smoke


def smoke_values(name: str) -> dict[str, Any]:
    """The study file's settings on the tiny smoke model (studies/smoke.toml: 4 blocks, 16 patch tokens, a
    proxy pre-trained in seconds), 3 trials, 2 fine-tune steps; locations beyond 4 blocks become [1, 2, 3]."""
    from tpsexplore.search.spec import load_study_file

    values = load_study_file(name)
    smoke = load_study_file("smoke")
    for table in SMOKE_TABLES:
        values[table] = {**values.get(table, {}), **smoke.get(table, {})}
    space = dict(values.get("space", {}))
    depth = int(smoke["model"]["depth"])
    space["grid_locations"] = [locs for locs in space.get("grid_locations", []) if max(locs) < depth] or [[1, 2, 3]]
    values["space"] = space
    values.update(trials=3, threads=1, finetune_steps=0 if values.get("finetune_steps", 1) == 0 else 2)
    return values


def run_studies(runs: Path, names: list[str], smoke: bool) -> dict[str, float]:
    """Run each study into ``runs`` (in process, like ``tpsexplore search --study NAME --out RUNS``); seconds
    per study. ``smoke``: `smoke_values` instead of the study as written (the plumbing only)."""
    from tpsexplore.search.runner import run_search
    from tpsexplore.search.spec import build_settings, load_study_file

    seconds = {}
    for name in names:
        values = smoke_values(name) if smoke else load_study_file(name)
        settings = build_settings(values, {"out": str(runs), "progress": False})
        t0 = time.perf_counter()
        out = io.StringIO()
        outcome = run_search(settings, out=out)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: exit {outcome.exit_code} in {seconds[name]:.0f} s", file=sys.stderr)
        if outcome.exit_code != 0:
            print(out.getvalue()[-2000:], file=sys.stderr)
    return seconds


# ----------------------------------------------------------------------------- reading one study
@dataclass
class Trial:
    number: int
    seed: int
    label: str
    gmacs: float
    accuracy: Accuracy


def read_study(path: Path, ablation: Ablation) -> dict[str, Any]:
    """The rows of one finished study: {key: [Trial, ...]} plus the baseline and the study's fidelity."""
    from tpsexplore.report.frame import open_study, trial_config

    data = open_study(path)
    records = {r.number: r for r in data.records}
    rows: dict[tuple[str, str], list[Trial]] = {}
    baseline = None
    for _, row in data.trials.iterrows():
        number = int(row["number"])
        rec = records.get(number)
        if rec is None or rec.accuracy is None:
            continue
        config = trial_config(row)
        trial = Trial(number, config.seed if config else 0, str(row.get("label") or ""), float(row["gmacs"]),
                      rec.accuracy)
        if config is None or config.method == "none":
            baseline = trial
            continue
        rows.setdefault(ablation.row_key(config, str(row["variant"])), []).append(trial)
    for trials in rows.values():
        trials.sort(key=lambda t: t.seed)
    return {"rows": rows, "baseline": baseline, "fidelity": data.fidelity, "name": data.name}


def pooled(trials: list[Trial]) -> dict[str, Any]:
    """Accuracy over all seeds (pooled counts), its Wilson interval and the seeds' spread."""
    correct = sum(t.accuracy.correct for t in trials)
    n = sum(t.accuracy.n for t in trials)
    lo, hi = wilson_interval(correct, n)
    values = [t.accuracy.value for t in trials]
    return {"top1": correct / n, "ci95": [lo, hi], "n_images": n, "correct": correct,
            "seeds": [t.seed for t in trials], "per_seed": values, "seed_min": min(values), "seed_max": max(values),
            "trials": [t.number for t in trials], "gmacs": float(np.mean([t.gmacs for t in trials])),
            "label": trials[0].label}


def paired(row: list[Trial], ref: list[Trial]) -> dict[str, Any] | None:
    """Exact McNemar and Newcombe's interval of row - ref, image by image over the seeds both have."""
    by_seed = {t.seed: t for t in ref}
    pairs = [(t, by_seed[t.seed]) for t in row if t.seed in by_seed]
    if not pairs and len(ref) == 1:  # a reference without seeds (e.g. one trial): pair every seed with it
        pairs = [(t, ref[0]) for t in row]
    pairs = [(a, b) for a, b in pairs if a.accuracy.bits is not None and b.accuracy.bits is not None
             and a.accuracy.eval_set == b.accuracy.eval_set]
    if not pairs:
        return None
    a = np.concatenate([p[0].accuracy.bits for p in pairs])
    b = np.concatenate([p[1].accuracy.bits for p in pairs])
    test = mcnemar(a, b)
    diff = paired_difference(a, b)
    return {"seeds": [p[0].seed for p in pairs], "difference": diff.difference, "ci95": [diff.low, diff.high],
            "p_value": test.p_value, "only_row": test.only_a, "only_reference": test.only_b}


def summarise(ablation: Ablation, study: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    rows = study["rows"]
    for key in sorted(rows, key=lambda k: (_order(ablation, k), k)):
        base = {"row": list(key), **pooled(rows[key]), "paper_top1": ablation.paper.get(key),
                "paper_gmacs": ablation.paper_gmacs.get(key)}
        refs = [r for r in ablation.references(key) if r in rows] or [None]
        for ref in refs:  # one entry per comparison (a default row: one entry without)
            out.append({**base, "reference": list(ref) if ref else None,
                        "paired": paired(rows[key], rows[ref]) if ref else None})
    return out


def _order(ablation: Ablation, key: tuple[str, str]) -> tuple[str, int]:
    """Rows of one method together, its default option first; Table 6 in the paper's order."""
    if ablation.option == "variant":
        order = ("dynamicvit", "random", "dtps", "random+squeeze", "topk", "etps")
        return "", order.index(key[0]) if key[0] in order else len(order)
    values = {"squeeze_feature": ("full", "content", "position"), "squeeze_similarity": ("cosine", "attention"),
              "similarity_metric": ("cosine", "euclidean", "dot")}[ablation.option]
    return key[0], values.index(key[1]) if key[1] in values else len(values)


# ----------------------------------------------------------------------------- the markdown
def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["# The papers' ablations on the proxy", "",
             "Written by `python benchmarks/ablations.py` (see its docstring) from the grid studies under `studies/`. "
             "Accuracy: top-1 over all seeds' images with the 95% Wilson interval of the pooled counts and the "
             "seeds' min..max; McNemar: exact, paired image by image and seed by seed against the row named in "
             "'vs'. The paper's numbers are ImageNet top-1 of DeiT-T/-S: compare the direction and size of the "
             "differences, not the levels.", ""]
    for res in results:
        ab = res["ablation"]
        lines += [f"## {ab['title']}", "", f"Study `{ab['study']}`; paper: {ab['source']}."]
        if ab["note"]:
            lines += ["", ab["note"]]
        if res.get("missing"):
            lines += ["", f"*Not run yet:* {res['missing']}", ""]
            continue
        base = res.get("baseline")
        if base:
            lines += ["", f"Unreduced baseline: {100 * base['top1']:.1f}% (n={base['n']}), {base['gmacs']:.4f} GMACs; "
                          f"accuracy fidelity {res['fidelity']}."]
        lines += ["", "| method | option | seeds | top-1 % [95% CI] | seed min..max | GMACs | vs | diff pts [95% CI] "
                      "| McNemar p | paper top-1 | paper GMACs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            d = decimals_for((r["ci95"][1] - r["ci95"][0]) / 2)
            acc = f"{100 * r['top1']:.{d}f} [{100 * r['ci95'][0]:.{d}f}, {100 * r['ci95'][1]:.{d}f}]"
            spread = f"{100 * r['seed_min']:.{d}f}..{100 * r['seed_max']:.{d}f}"
            vs = diff = p = "—"
            if r["reference"]:
                vs = " ".join(x for x in r["reference"] if x)
            if r["paired"]:
                pr = r["paired"]
                dd = decimals_for((pr["ci95"][1] - pr["ci95"][0]) / 2)  # the difference's own interval
                diff = (f"{signed(100 * pr['difference'], dd)} [{signed(100 * pr['ci95'][0], dd)}, "
                        f"{signed(100 * pr['ci95'][1], dd)}]")
                p = format_p(pr["p_value"])
            paper = f"{r['paper_top1']:.2f}" if r["paper_top1"] is not None else "—"
            paper_g = f"{r['paper_gmacs']:.3f}" if r["paper_gmacs"] is not None else "—"
            lines.append(f"| {r['row'][0]} | {r['row'][1] or '—'} | {len(r['seeds'])} | {acc} | {spread} | "
                         f"{r['gmacs']:.4f} | {vs} | {diff} | {p} | {paper} | {paper_g} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs", help="folder holding the study folders (default runs)")
    ap.add_argument("--run", action="store_true", help="run the studies first (a finished one is resumed: no-op)")
    ap.add_argument("--smoke", action="store_true", help="with --run: each study on the tiny smoke model "
                    "(studies/smoke.toml), 3 trials, 2 fine-tune steps: checks the plumbing, measures nothing")
    ap.add_argument("--studies", default=",".join(a.study for a in ABLATIONS),
                    help="comma-separated subset of the ablation studies")
    ap.add_argument("--out", default=str(RESULTS), help="folder for ablations.json and ablations.md")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.studies.split(",") if s.strip()]
    known = {a.study: a for a in ABLATIONS}
    for name in names:
        if name not in known:
            raise SystemExit(f"studies: unknown ablation {name!r}; allowed: {', '.join(known)}")
    runs = Path(args.runs)
    seconds = run_studies(runs, names, args.smoke) if args.run else {}
    results = []
    for name in names:
        ab = known[name]
        entry: dict[str, Any] = {"ablation": {"study": ab.study, "title": ab.title, "option": ab.option,
                                              "source": ab.source, "note": ab.note}}
        path = runs / name
        if not (path / "results.db").exists():
            entry["missing"] = f"no study folder {str(path)!r}; run `tpsexplore search --study {name}`"
            results.append(entry)
            continue
        study = read_study(path, ab)
        base = study["baseline"]
        entry.update(study=str(path), fidelity=study["fidelity"], seconds=seconds.get(name),
                     baseline={"top1": base.accuracy.value, "n": base.accuracy.n, "gmacs": base.gmacs}
                     if base else None,
                     rows=summarise(ab, study))
        results.append(entry)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"smoke": bool(args.smoke), "runs": str(runs), "ablations": results}
    (out / "ablations.json").write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    (out / "ablations.md").write_text(markdown(results))
    print(f"wrote {out / 'ablations.json'} and {out / 'ablations.md'}", file=sys.stderr)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
