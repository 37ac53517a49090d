"""The report's figures, drawn with seaborn on plain matplotlib Figures (Agg canvas, no pyplot state).

Every function takes a trials DataFrame (`tpsexplore.report.frame.load_trials`) and returns a
``matplotlib.figure.Figure``; nothing global is changed (seaborn styles are applied in ``with`` blocks).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..reduce.methods import METHODS
from .pareto import hypervolume_history, pareto_front, parse_objectives

STYLE = "whitegrid"
CONTEXT = "notebook"
BASELINE_COLOR = "black"
_PALETTE_NAME = "tab20"
TIE_COLOR = "goldenrod"
RECOMMENDED_COLOR = "forestgreen"
TIE_LABEL = "\u2248 most accurate (McNemar p \u2265 0.05)"


def new_figure(width: float = 8.0, height: float = 5.0) -> Figure:
    """A Figure with an Agg canvas, not registered with pyplot (so it is freed when dropped)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def method_palette(variants: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per variant (registry order first, then combinations), the same in every figure."""
    order = [m for m in METHODS] + sorted(v for v in set(variants) if v not in METHODS and v != "baseline")
    colors = sns.color_palette(_PALETTE_NAME, n_colors=20)
    # tab20 pairs a dark and a light shade; take the dark shades first so neighbours differ clearly
    ranked = colors[0::2] + colors[1::2]
    pal = {v: ranked[i % len(ranked)] for i, v in enumerate(order)}
    pal["baseline"] = BASELINE_COLOR
    return {v: pal[v] for v in variants if v in pal}


def _variants(df: pd.DataFrame) -> list[str]:
    col = "variant" if "variant" in df.columns else "method"
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted({str(v) for v in df[col].dropna()}, key=lambda v: (order.get(v.split("+")[0], 99), v))


def interval_columns(df: pd.DataFrame, y: str) -> tuple[str, str] | None:
    """The (lower, upper) columns of ``y``'s 95% interval: ``{y}_lo``/``{y}_hi``, or ``accuracy_lo``/``_hi``
    for ``accuracy``; None when the frame has none."""
    for lo, hi in ((f"{y}_lo", f"{y}_hi"),):
        if lo in df.columns and hi in df.columns and df[lo].notna().any():
            return lo, hi
    return None


def _error_bars(ax: Any, data: pd.DataFrame, x: str, y: str, color: Any, **kw: Any) -> None:
    """Vertical 95% interval bars (Wilson) of ``y`` where the frame has them."""
    cols = interval_columns(data, y)
    if cols is None or data.empty:
        return
    d = data.dropna(subset=[cols[0], cols[1]])
    if d.empty:
        return
    yv = d[y].to_numpy(float)
    err = np.vstack([np.clip(yv - d[cols[0]].to_numpy(float), 0, None), np.clip(d[cols[1]].to_numpy(float) - yv, 0, None)])
    opts = dict(fmt="none", ecolor=color, elinewidth=0.9, capsize=2.5, alpha=0.55, zorder=2)
    opts.update(kw)
    ax.errorbar(d[x].to_numpy(float), yv, yerr=err, **opts)


def _x_error_bars(ax: Any, data: pd.DataFrame, x: str, y: str, color: Any) -> None:
    """Horizontal bars: the range of ``x`` (columns ``{x}_lo``/``{x}_hi``, e.g. a speed-up's windows)."""
    cols = interval_columns(data, x)
    if cols is None or data.empty:
        return
    d = data.dropna(subset=[cols[0], cols[1], y])
    if d.empty:
        return
    xv = d[x].to_numpy(float)
    err = np.vstack([np.clip(xv - d[cols[0]].to_numpy(float), 0, None), np.clip(d[cols[1]].to_numpy(float) - xv, 0, None)])
    ax.errorbar(xv, d[y].to_numpy(float), xerr=err, fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.45,
                zorder=2)


def _percent_axis(ax: Any, data: pd.DataFrame, y: str) -> None:
    """Accuracy stored as a fraction reads as percent on the axis (one unit across the report)."""
    if str(y).startswith("accuracy") and len(data) and float(data[y].max()) <= 1.0 + 1e-9:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))


def _label_points(ax: Any, pts: pd.DataFrame, x: str, y: str, color: Any = "crimson") -> None:
    """Trial numbers beside points (``#n``)."""
    if "number" not in pts.columns:
        return
    for _, r in pts.iterrows():
        ax.annotate(f"#{int(r['number'])}", (float(r[x]), float(r[y])), xytext=(5, 6), textcoords="offset points",
                    fontsize="x-small", color=color, zorder=6)


def _tie_marks(ax: Any, front: pd.DataFrame, x: str, y: str) -> None:
    """Rings on front points not distinguishable from the most accurate; a square on the recommended one."""
    if "tied_with_best" in front.columns:
        tied = front[front["tied_with_best"].fillna(False).astype(bool)]
        if len(tied):
            ax.scatter(tied[x], tied[y], s=430, facecolors="none", edgecolors=TIE_COLOR, linewidths=2.2,
                       zorder=2, label=TIE_LABEL)
    if "recommended" in front.columns:
        rec = front[front["recommended"].fillna(False).astype(bool)]
        if len(rec):
            ax.scatter(rec[x], rec[y], s=120, marker="s", facecolors="none", edgecolors=RECOMMENDED_COLOR,
                       linewidths=2.0, zorder=5, label=f"recommended (#{int(rec['number'].iloc[0])})"
                       if "number" in rec.columns else "recommended")


def _step_front(ax: Any, front: pd.DataFrame, x: str, y: str, x_dir: str, **kw: Any) -> None:
    """Draw a 2-D front as the staircase of what is attainable (x minimised: 'post'; maximised: 'pre')."""
    if front.empty:
        return
    f = front.sort_values(x)
    ax.step(f[x].to_numpy(float), f[y].to_numpy(float), where="post" if x_dir == "min" else "pre", **kw)


def plot_tradeoff(df: pd.DataFrame, x: str = "gmacs", y: str = "accuracy", *, x_direction: str = "min",
                  budget: float | None = None, budget_label: str | None = None, shade: bool = True,
                  title: str | None = None, x_label: str | None = None, y_label: str | None = None,
                  hue: str = "variant", flag: str | None = None) -> Figure:
    """Every usable trial coloured by method, the Pareto front of the trials within budget, the baseline
    (black star) and the budget as a vertical line on the x axis (``budget`` in x units; ``shade`` greys the
    side beyond it).

    Trials over the budget are drawn hollow; they take no part in the front. Each point carries its 95%
    interval (columns ``{y}_lo``/``{y}_hi``, e.g. ``accuracy_lo``/``accuracy_hi`` of `load_trials`) as an error
    bar; front points are labelled ``#trial``; front points not distinguishable from the most accurate
    within-budget trial (column ``tied_with_best``) get a gold ring, the recommended one (``recommended``) a
    green square. Accuracy columns stored as fractions are shown in percent. ``x`` ranges (``{x}_lo``/``{x}_hi``,
    e.g. ``speedup_lo``) are horizontal bars; ``flag`` names a boolean column whose trials get a black cross
    (e.g. ``speed_flagged``: timings taken under load or with a drifted baseline).
    """
    data = df[df["usable"] & df[x].notna()] if "usable" in df.columns else df[df[x].notna() & df[y].notna()]
    trials = data[~data["is_baseline"]] if "is_baseline" in data.columns else data
    base = data[data["is_baseline"]] if "is_baseline" in data.columns else data.iloc[0:0]
    within = trials[trials["within_budget"]] if "within_budget" in trials.columns else trials
    over = trials.drop(within.index)
    if hue not in data.columns:
        hue = "method"
    pal = method_palette(_variants(data) if len(data) else [])
    fig = new_figure(9.0, 5.0)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        ax = fig.add_subplot()
        for v, grp in trials.groupby(hue):
            _error_bars(ax, grp, x, y, pal.get(v, "grey"))
            _x_error_bars(ax, grp, x, y, pal.get(v, "grey"))
        if interval_columns(data, y) is not None:
            ax.plot([], [], color="grey", lw=0.9, label="95% interval (Wilson)")
        if len(within):
            sns.scatterplot(data=within, x=x, y=y, hue=hue, palette=pal, s=60, alpha=0.9, edgecolor="white",
                            linewidth=0.5, ax=ax, legend=True, zorder=3)
        if len(over):
            for v, grp in over.groupby(hue):
                ax.scatter(grp[x], grp[y], s=45, facecolors="none", edgecolors=[pal.get(v, "grey")],
                           linewidths=1.2, alpha=0.8, label=None if len(within) and v in set(within[hue]) else v)
            ax.scatter([], [], s=45, facecolors="none", edgecolors="grey", label="over budget (hollow)")
        front = pareto_front(within, {x: x_direction, y: "max"}) if len(within) else within
        _step_front(ax, front, x, y, x_direction, color="crimson", lw=1.8, alpha=0.9, label="Pareto front", zorder=1)
        if len(front):
            ax.scatter(front[x], front[y], s=190, facecolors="none", edgecolors="crimson", linewidths=1.1, zorder=2)
            _tie_marks(ax, front, x, y)
            _label_points(ax, front, x, y)
        if flag and flag in trials.columns:
            bad = trials[trials[flag].fillna(False).astype(bool)]
            if len(bad):
                ax.scatter(bad[x], bad[y], marker="x", s=70, color="black", linewidths=1.4, zorder=5,
                           label="speed flagged (load or baseline drift > 10%)")
        if len(base):
            _error_bars(ax, base, x, y, BASELINE_COLOR)
            ax.scatter(base[x], base[y], marker="*", s=320, color=BASELINE_COLOR, edgecolors="white",
                       linewidths=0.8, zorder=4, label="baseline (no reduction)")
            _label_points(ax, base, x, y, BASELINE_COLOR)
        if budget is not None and np.isfinite(budget):
            ax.axvline(budget, color="dimgray", ls="--", lw=1.4, label=budget_label or f"budget {budget:.3g}")
            ax.margins(x=0.07, y=0.08)
            lo, hi = ax.get_xlim()
            if not shade:
                pass
            elif x_direction == "min":
                ax.axvspan(budget, max(hi, budget), color="grey", alpha=0.08, lw=0)
            else:
                ax.axvspan(min(lo, budget), budget, color="grey", alpha=0.08, lw=0)
            ax.set_xlim(lo, hi)
        ax.margins(x=0.07, y=0.08)
        ax.set_xlabel(x_label or x)
        ax.set_ylabel(y_label or y)
        if title:
            fig.suptitle(title)
        _legend(ax)
        _percent_axis(ax, data, y)
    return fig


def _tidy_axes(ax: Any) -> None:
    """At most 7 ticks per axis, so long tick labels do not run into each other."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8))


def _legend(ax: Any) -> None:
    _tidy_axes(ax)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        if lab and not lab.startswith("_") and lab not in seen and lab != "variant" and lab != "method":
            seen[lab] = h
    if seen:  # methods first, then the marks, in a fixed order
        special = ("Pareto front", "over budget", "95% interval", "\u2248 most accurate", "recommended",
                   "speed flagged", "baseline", "budget", "GMACs budget", "published")
        rank = {lab: next((i + 1 for i, p in enumerate(special) if lab.startswith(p)), 0) for lab in seen}
        seen = dict(sorted(seen.items(), key=lambda kv: rank[kv[0]]))
        leg = ax.legend(seen.values(), seen.keys(), loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
                        frameon=False)
        for h in getattr(leg, "legend_handles", []):  # big rings and stars at one legible size
            if hasattr(h, "set_sizes"):
                h.set_sizes([70])
    elif ax.get_legend() is not None:
        ax.get_legend().remove()


def plot_method_fronts(df: pd.DataFrame, x: str = "gmacs", y: str = "accuracy", *, x_direction: str = "min",
                       published: pd.DataFrame | None = None, budget: float | None = None,
                       title: str | None = None, x_label: str | None = None, y_label: str | None = None) -> Figure:
    """The Pareto front of each method on one plot (the TPS paper's Figure 5 view).

    Front points carry their 95% interval and trial number; gold rings and the green square as in
    `plot_tradeoff`.

    ``published`` (columns method, setting, top1, gmacs; see `published.published_points`) adds the papers'
    points, drawn as crosses in the method's colour (black for the unreduced model) and labelled "published".
    """
    data = df[df["usable"]] if "usable" in df.columns else df.dropna(subset=[x, y])
    if "within_budget" in data.columns:
        data = data[data["within_budget"] | data["is_baseline"]]
    variants = _variants(data) if len(data) else []
    extra = list(published["method"].unique()) if published is not None and len(published) else []
    pal = method_palette(sorted(set(variants) | set(extra) | {"baseline"}))
    fig = new_figure(9.0, 5.0)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        ax = fig.add_subplot()
        base = data[data["is_baseline"]] if "is_baseline" in data.columns else data.iloc[0:0]
        for v in variants:
            if v == "baseline":
                continue
            grp = data[data["variant"] == v]
            front = pareto_front(grp, {x: x_direction, y: "max"})
            _step_front(ax, front, x, y, x_direction, color=pal[v], lw=1.8, alpha=0.9)
            _error_bars(ax, front, x, y, pal[v], alpha=0.7)
            ax.plot(front[x], front[y], "o", color=pal[v], ms=6, label=f"{v} ({len(front)}/{len(grp)})")
            ax.scatter(grp[x], grp[y], s=12, color=pal[v], alpha=0.25, lw=0)
            _tie_marks(ax, front, x, y)
            _label_points(ax, front, x, y, pal[v])
        if interval_columns(data, y) is not None and variants:
            ax.plot([], [], color="grey", lw=0.9, label="95% interval of front points (Wilson)")
        if len(base):
            _error_bars(ax, base, x, y, BASELINE_COLOR)
            ax.scatter(base[x], base[y], marker="*", s=320, color=BASELINE_COLOR, edgecolors="white",
                       linewidths=0.8, zorder=4, label="baseline")
        if published is not None and len(published):
            for m, grp in published.groupby("method"):
                color = BASELINE_COLOR if m == "none" else pal.get(m, "grey")
                ax.scatter(grp["gmacs"], grp["top1"], marker="X", s=90, color=color, edgecolors="white",
                           linewidths=0.6, zorder=5, label=f"published: {'baseline' if m == 'none' else m}")
        if budget is not None and np.isfinite(budget):
            ax.axvline(budget, color="dimgray", ls="--", lw=1.2, label=f"budget {budget:.3g}")
        ax.margins(x=0.07, y=0.08)
        ax.set_xlabel(x_label or x)
        ax.set_ylabel(y_label or y)
        fig.suptitle(title or "Pareto front per method (front points / trials)")
        _legend(ax)
        _percent_axis(ax, data, y)
    return fig


def plot_published(df: pd.DataFrame, published: pd.DataFrame, x: str = "gmacs", y: str = "accuracy",
                   **kw: Any) -> Figure:
    """`plot_method_fronts` with the papers' points (only meaningful for ImageNet DeiT-T/S studies)."""
    kw.setdefault("title", "Study fronts beside the published points (X = published)")
    return plot_method_fronts(df, x, y, published=published, **kw)


def plot_hypervolume(df: pd.DataFrame, objectives: Mapping[str, str] | Sequence[str], *,
                     title: str | None = None) -> Figure:
    """Hypervolume of the within-budget front after each trial (objectives scaled to [0, 1])."""
    objs = parse_objectives(objectives)
    data = df[df["within_budget"]] if "within_budget" in df.columns else df
    hist = hypervolume_history(data, objs)
    fig = new_figure(7.0, 4.0)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        ax = fig.add_subplot()
        if len(hist):
            sns.lineplot(data=hist, x="number", y="hypervolume", drawstyle="steps-post", marker="o", ax=ax,
                         color="tab:blue")
        ax.set_xlabel("trial number")
        ax.set_ylabel("hypervolume (normalised)")
        ax.set_title(title or "Hypervolume of " + " x ".join(f"{c} ({d})" for c, d in objs))
    return fig


def plot_importance(importances: Mapping[str, Mapping[str, float]], *, title: str | None = None) -> Figure:
    """Horizontal bars of parameter importance, one panel per objective (``{objective: {param: value}}``)."""
    n = max(1, len(importances))
    params = sorted({p for imp in importances.values() for p in imp})
    fig = new_figure(5.0 * n, max(2.5, 0.35 * len(params) + 1.5))
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        axes = fig.subplots(1, n, squeeze=False)[0]
        for ax, (obj, imp) in zip(axes, importances.items()):
            frame = pd.DataFrame({"parameter": list(imp), "importance": list(imp.values())})
            frame = frame.sort_values("importance", ascending=False)
            sns.barplot(data=frame, y="parameter", x="importance", ax=ax, color="tab:blue", orient="h")
            ax.set_title(obj, fontsize="medium")
            ax.set_ylabel("")
        if title:
            fig.suptitle(title)
    return fig


def treatment_groups(variants: Sequence[str]) -> dict[str, list[str]]:
    """Split variants into "TPS / squeeze" (pruned tokens squeezed into kept ones) and "pruning" (dropped or
    fused away), the comparison of the TPS paper; the merging family (ToMe, ToFu, PiToMe) and the baseline are
    left out."""
    groups: dict[str, list[str]] = {"TPS / squeeze": [], "pruning (drop or fuse)": []}
    for v in variants:
        method, _, treatment = str(v).partition("+")
        spec = METHODS.get(method)
        if spec is None or spec.merges:
            continue
        t = treatment or spec.treatment
        groups["TPS / squeeze" if t == "squeeze" else "pruning (drop or fuse)"].append(str(v))
    return {k: v for k, v in groups.items() if v}


def best_within_budget(df: pd.DataFrame, budgets: Sequence[float], groups: Mapping[str, Sequence[str]], *,
                       x: str = "gmacs", y: str = "accuracy", baseline_x: float | None = None) -> pd.DataFrame:
    """Best ``y`` each group of variants reaches with ``x`` <= budget x ``baseline_x``, for every budget.

    ``groups`` maps a name to variants, e.g. ``{"TPS (squeeze)": ["dtps", "etps"], "pruning": ["dynamicvit",
    "topk"]}``. Returns columns group, budget, best, trial (the trial number reaching it; NaN when none fits).
    """
    data = df[df["usable"] & ~df["is_baseline"]] if "usable" in df.columns else df
    iv = interval_columns(data, y)
    if baseline_x is None:
        has_base = "is_baseline" in df.columns and df["is_baseline"].any()
        baseline_x = float(df.loc[df["is_baseline"], x].max()) if has_base else float(data[x].max())
    rows = []
    for name, variants in groups.items():
        grp = data[data["variant"].isin(list(variants))]
        for b in budgets:
            ok = grp[grp[x] <= b * baseline_x + 1e-12].dropna(subset=[y])
            best = ok.loc[ok[y].idxmax()] if len(ok) else None
            rows.append({"group": name, "budget": float(b), "best": np.nan if best is None else float(best[y]),
                         "trial": np.nan if best is None else best.get("number", np.nan),
                         "best_lo": np.nan if best is None or iv is None else float(best[iv[0]]),
                         "best_hi": np.nan if best is None or iv is None else float(best[iv[1]])})
    return pd.DataFrame(rows, columns=["group", "budget", "best", "trial", "best_lo", "best_hi"])


def plot_budget_sweep(df: pd.DataFrame, budgets: Sequence[float], groups: Mapping[str, Sequence[str]], *,
                      x: str = "gmacs", y: str = "accuracy", baseline_x: float | None = None,
                      title: str | None = None) -> Figure:
    """`best_within_budget` as lines over the budget (tightening to the right).

    The TPS paper's central claim: squeezing (TPS) loses less accuracy than plain pruning as the budget
    tightens, so its line should fall more slowly.
    """
    table = best_within_budget(df, budgets, groups, x=x, y=y, baseline_x=baseline_x)
    fig = new_figure(7.0, 4.0)
    colors = sns.color_palette("deep", n_colors=max(1, len(groups)))
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        ax = fig.add_subplot()
        for i, (name, grp) in enumerate(table.dropna(subset=["best"]).groupby("group", sort=False)):
            grp = grp.sort_values("budget")
            ax.plot(grp["budget"], grp["best"], "o-", color=colors[i % len(colors)], label=name)
            _error_bars(ax, grp, "budget", "best", colors[i % len(colors)], alpha=0.7)
            _label_points(ax, grp.assign(number=grp["trial"]).dropna(subset=["number"]), "budget", "best",
                          colors[i % len(colors)])
        ax.invert_xaxis()
        ax.set_xlabel(f"budget (fraction of the baseline's {x}); tighter to the right")
        ax.set_ylabel(f"best {y} within budget (95% interval)")
        ax.set_title(title or "Best accuracy as the budget tightens (#trial)")
        if table["best"].notna().any():
            ax.legend(fontsize="small", frameon=False)
        _percent_axis(ax, table.rename(columns={"best": y}).dropna(subset=[y]), y)
    return fig
