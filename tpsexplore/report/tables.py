"""The report's tables as displayed: one unit per quantity and no more digits than the data support.

Units: accuracy in percent, with its 95% Wilson interval (as many decimals as the interval's half-width
supports, `stats.decimals_for`) and n; cost in GMACs (one MAC = one FLOP, the papers' "GFLOPs"); speed as the
paired speed-up (x, reduced over the baseline measured beside it) with its range, and img/s at the study's
reference baseline when the study recorded one. The raw measurements stay in pareto.csv / trials.csv.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..search.confirm import format_confirmed
from ..search.recommend import (CONFIRMED, Recommendation, TrialRecord, accuracy_cell, accuracy_of,
                                fidelity_name)
from ..stats import p_text
from ..stats import Accuracy
from .frame import StudyData

def versus_best(row: pd.Series, best: int | None, alpha: float = 0.05) -> str:
    """How a within-budget trial compares with the most accurate one (exact McNemar)."""
    if not bool(row.get("within_budget")):
        return ""
    if best is not None and int(row["number"]) == best:
        return "most accurate"
    p = row.get("best_p")
    if p is None or not math.isfinite(float(p)):
        return "not tested (no per-image correctness)"
    return f"{'not distinguishable' if p >= alpha else 'less accurate'} ({p_text(float(p))})"


def speed_cell(row: pd.Series) -> str:
    v, lo, hi = row.get("speedup"), row.get("speedup_lo"), row.get("speedup_hi")
    if v is None or not math.isfinite(float(v)):
        return ""
    if lo is not None and hi is not None and math.isfinite(float(lo)) and float(hi) > float(lo):
        return f"{float(v):.2f} [{float(lo):.2f}-{float(hi):.2f}]"
    return f"{float(v):.2f}"


def gmacs_cell(v: Any) -> str:
    return "" if v is None or not math.isfinite(float(v)) else f"{float(v):.4g}"


def _records(data: StudyData) -> dict[int, TrialRecord]:
    return {r.number: r for r in data.records}


def other_accuracies(data: StudyData, meas: pd.DataFrame) -> dict[str, dict[int, tuple[float | None, Accuracy | None]]]:
    """{column title: {trial number: (value, Accuracy)}} for top-1 at the other fidelities and top-5."""
    out: dict[str, dict[int, tuple[float | None, Accuracy | None]]] = {}
    if meas.empty:
        return out
    by_trial = {int(n): g.sort_values("measurement_id").to_dict("records") for n, g in meas.groupby("number")}
    fids = sorted({str(f) for f in meas.loc[meas["kind"] == "accuracy_top1", "fidelity"].dropna()}
                  - {data.fidelity, CONFIRMED})
    for kind, fid in [("accuracy_top1", f) for f in fids] + [("accuracy_top5", data.fidelity)]:
        title = f"{'top-5' if kind.endswith('5') else 'top-1'} % ({fidelity_name(fid)}) [95% CI]"
        cells = {n: accuracy_of(ms, fid, kind) for n, ms in by_trial.items()}
        if any(v is not None for v, _ in cells.values()):
            out[title] = cells
    return out


def display_table(data: StudyData, rows: pd.DataFrame, meas: pd.DataFrame, *, env_keys: dict[int, str] | None = None,
                  env_of: dict[int, list[int]] | None = None, flags: dict[int, str] | None = None) -> pd.DataFrame:
    """The rows (trials of ``data.trials``) as displayed: strings in the units of the module docstring."""
    recs = _records(data)
    fid = data.fidelity
    best_rows = data.trials[data.trials["is_best"]] if "is_best" in data.trials.columns else data.trials.iloc[0:0]
    best = int(best_rows["number"].iloc[0]) if len(best_rows) else None
    base = data.baseline_gmacs
    others = other_accuracies(data, meas)
    any_confirmed = any(recs.get(int(n)) is not None and recs[int(n)].confirmed is not None for n in rows["number"])
    paired = "speed_basis" in rows.columns and (rows["speed_basis"] == "paired").any()
    latency = paired and "paired_latency_ms" in rows.columns and rows["paired_latency_ms"].notna().any()
    out = []
    acc_title = f"top-1 % ({fidelity_name(fid)}) [95% CI]"
    versus_title = f"vs most accurate (exact McNemar, {fidelity_name(fid)})"
    for _, r in rows.iterrows():
        n = int(r["number"])
        rec = recs.get(n)
        row: dict[str, Any] = {"trial": n, "method": r.get("variant"), "config": r.get("label")}
        if "options" in r.index:
            row["options"] = r.get("options")
        row[acc_title] = accuracy_cell(rec.accuracy if rec else None, r.get("accuracy"))
        row["n"] = "" if rec is None or rec.accuracy is None else str(rec.accuracy.n)
        row[versus_title] = versus_best(r, best)
        row["recommended"] = "yes" if bool(r.get("recommended")) else ""
        if any_confirmed:
            row["confirmed top-1 % (mean +- sd over seeds, range)"] = \
                format_confirmed(rec.confirmed) if rec is not None and rec.confirmed is not None else ""
        for title, cells in others.items():
            v, acc = cells.get(n, (None, None))
            row[title] = accuracy_cell(acc, v)
        row["GMACs"] = gmacs_cell(r.get("gmacs"))
        row["x baseline GMACs"] = f"{float(r['gmacs']) / base:.3f}" if base and pd.notna(r.get("gmacs")) else ""
        if "params@analytic" in r.index and pd.notna(r.get("params@analytic")):
            row["params (M)"] = f"{float(r['params@analytic']) / 1e6:.3g}"
        row["speed-up x [range]"] = speed_cell(r)
        if paired:
            v = r.get("paired_throughput")
            row["img/s at the reference baseline"] = f"{float(v):.4g}" if v is not None and pd.notna(v) else ""
        if latency:
            v = r.get("paired_latency_ms")
            row["ms at the reference baseline (batch 1)"] = f"{float(v):.3g}" if v is not None and pd.notna(v) else ""
        if flags is not None:
            row["flags"] = flags.get(n, "")
        if env_of is not None and env_keys is not None:
            row["environment"] = " ".join(env_keys[i] for i in env_of.get(int(r["trial_id"]), []) if i in env_keys)
        out.append(row)
    return pd.DataFrame(out)


def speed_flags_table(data: StudyData) -> pd.DataFrame:
    """The complete trials whose timing is flagged (`tpsexplore.search.drift.drift_flags`), with why."""
    df = data.trials
    if "speed_flagged" not in df.columns:
        return pd.DataFrame()
    bad = df[df["speed_flagged"] & (df["state"] == "complete")]
    rows = [{"trial": int(r["number"]), "method": r["variant"], "config": r["label"],
             "baseline drift vs reference": f"{100 * r['baseline_drift']:+.0f}%" if pd.notna(r.get("baseline_drift"))
             else "", "why": r["speed_flag"]} for _, r in bad.iterrows()]
    return pd.DataFrame(rows, columns=["trial", "method", "config", "baseline drift vs reference", "why"])


def summary_table(data: StudyData) -> pd.DataFrame:
    """Most accurate within-budget trial of each method (displayed like `display_table`), best first."""
    df = data.trials
    pool = df[df["within_budget"]]
    rows = []
    for _, grp in pool.groupby("variant"):
        rows.append(grp.sort_values(["accuracy", "gmacs", "number"], ascending=[False, True, True]).iloc[0])
    if not rows:
        return pd.DataFrame(columns=["method", "trials within budget", "trial"])
    best = pd.DataFrame(rows).sort_values(["accuracy", "gmacs"], ascending=[False, True])
    counts = pool["variant"].value_counts()
    shown = display_table(data, best, pd.DataFrame())
    shown.insert(1, "trials within budget", [int(counts[v]) for v in best["variant"]])
    keep = [c for c in shown.columns if c not in ("options",)]
    return shown[keep]


def headline_rows(rec: Recommendation | None, data: StudyData) -> list[tuple[str, str]]:
    """The report's headline rows (the same text the search prints at its end)."""
    if rec is None:
        return [("recommended", "none: no complete reduced trial is within the budget")]
    where = data.root if data.root is not None else data.db
    return rec.headline(where, data.baseline_gmacs)
