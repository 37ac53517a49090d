"""`build_report`: every figure and table a study's data allows, written as HTML, Markdown, CSV, PNG and SVG.

Output folder (default ``STUDY/report``)::

    report.html         self-contained: figures embedded as base64 PNG, no external files or scripts
    report.md           the same content; figures linked from figures/
    trials.csv          one row per trial (load_trials)
    pareto.csv          the Pareto-optimal configs with every measurement
    figures/NAME.png    each figure, and NAME.svg

The page opens with the headline (`tpsexplore.search.recommend`: the recommended config, the baseline, the
accuracy drop with its paired interval, the speed-up with its spread, the export command), the same text the
search prints at its end. Accuracies carry their 95% interval everywhere (error bars, "value [lo, hi]" cells
with n, digits as the interval supports); front points not distinguishable from the most accurate (exact
McNemar p >= 0.05) are ringed; speeds are the paired speed-up times the study's reference baseline
(`tpsexplore.search.drift`), and trials timed under load or beside a drifted baseline are flagged.

Figures the data does not allow are listed under "Skipped" with the reason.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..progressbar import progress_bar
from .frame import StudyData, measurement_columns, open_study, runtime_columns
from .pareto import pareto_front, parse_objectives
from .published import baseline_at_chance, published_backbone, published_points
from .tables import fidelity_name, headline_rows, speed_flags_table, summary_table


@dataclass
class FigureEntry:
    """One figure of the report: its file stem, title, caption and (once saved) its files."""

    name: str
    title: str
    caption: str
    figure: Any = None
    png: Path | None = None
    svg: Path | None = None


@dataclass
class Report:
    """What `build_report` wrote."""

    out: Path
    study: StudyData
    figures: list[FigureEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pareto: pd.DataFrame | None = None
    pareto_display: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    speed_flags: pd.DataFrame | None = None
    headline: list[tuple[str, str]] = field(default_factory=list)
    recommendation: Any = None
    published: pd.DataFrame | None = None
    environments: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    html: Path | None = None
    markdown: Path | None = None
    csv: Path | None = None

    @property
    def files(self) -> list[Path]:
        out = [p for p in (self.html, self.markdown, self.csv) if p]
        for f in self.figures:
            out += [p for p in (f.png, f.svg) if p]
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


# ----------------------------------------------------------------------------- provenance
def _env_summary(env: dict[str, Any]) -> str:
    dev = env.get("device") or "?"
    hw = env.get("gpu_name") if str(dev).startswith("cuda") and env.get("gpu_name") else env.get("cpu_model")
    threads = env.get("torch_threads")
    sw = ", ".join(f"{k} {env[k]}" for k in ("torch", "timm", "tpsexplore") if env.get(k))
    commit = env.get("git_commit")
    tail = f", git {str(commit)[:10]}{'+dirty' if env.get('git_dirty') else ''}" if commit else ""
    return f"{dev} ({hw or 'unknown hardware'}{f', {threads} threads' if threads else ''}); {sw}{tail}"


def provenance(data: StudyData, envs: dict[int, dict[str, Any]]) -> list[tuple[str, str]]:
    """(field, value) rows of the report header."""
    m = data.manifest
    bb = data.backbone_description()
    geo = ", ".join(f"{k}={bb[k]}" for k in ("img_size", "patch_size", "num_classes", "depth", "embed_dim",
                                                   "num_heads", "embed_dims", "depths", "mlp_ratios", "sr_ratios",
                                                   "window_size") if bb.get(k) is not None)
    d = data.data
    bits = [m.data.kind] + [f"{k}={d[k]}" for k in ("source", "path", "num_classes", "n_train", "n_val", "img_size",
                                                     "num_patches") if d.get(k) is not None]
    if d.get("note"):
        bits.append(str(d["note"]))
    data_text = "; ".join(bits)
    w = m.weights
    w_text = "; ".join(f"{k}={v}" for k, v in (("source", w.source), ("checkpoint", w.checkpoint), ("note", w.note),
                                                 ("val_top1", w.details.get("val_top1"))) if v is not None)
    acc_col = data.trials.attrs.get("accuracy_column")
    fid_text = (f"accuracy column {acc_col}; fine-tune steps per trial {m.fidelity.finetune_steps}; "
                "zero-shot: evaluated for every built trial")
    devices = sorted({str(e.get("device")) for e in envs.values() if e.get("device")}) or [m.device]
    versions = dict(m.versions)
    if not versions and envs:
        versions = next(iter(envs.values()))
    ver_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "git_dirty")
    if versions.get("git_dirty"):
        ver_text += " (uncommitted changes)"
    b = m.budget
    budget_text = f"{b.fraction:g} x baseline GMACs = {b.gmacs:.4g} GMACs (baseline {b.baseline_gmacs:.4g})"
    counts = data.trials["state"].value_counts().to_dict() if len(data.trials) else {}
    trials_text = f"{len(data.trials)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    rows = [
        ("study", f"{data.name} ({data.root or data.db})"),
        ("backbone", f"{bb.get('name')} = {bb.get('timm_name')}" + (f" ({geo})" if geo else "")),
        ("data", data_text),
        ("weights", w_text),
        ("fidelity", fid_text),
        ("device", ", ".join(devices) or "unknown"),
        ("hardware / software", "; ".join(_env_summary(e) for e in envs.values()) or "not recorded"),
        ("versions", ver_text or "not recorded"),
        ("budget", budget_text),
        ("objectives", ", ".join(data.objectives) or "not recorded"),
        ("trials", trials_text),
        ("methods", ", ".join(map(str, m.extra.get("methods") or []))
         or ", ".join(sorted(set(data.trials.get("variant", []))))),
    ]
    excluded = m.extra.get("excluded_methods") or {}
    if excluded:
        rows.append(("methods left out", "; ".join(f"{k}: {v}" for k, v in excluded.items())))
    return rows


# ----------------------------------------------------------------------------- objectives
def study_objectives(data: StudyData) -> list[tuple[str, str]]:
    """The study's objectives as trials-frame columns; (accuracy max, gmacs min) when they are not usable."""
    df = data.trials
    out = []
    for col, direction in parse_objectives(data.objectives) if data.objectives else []:
        if col in df.columns and df[col].notna().any():
            out.append((col, direction))
        elif col.startswith("accuracy"):
            out.append(("accuracy", direction))
        elif col.startswith(("gmacs", "gflops")):
            out.append(("gmacs", direction))
    return out if len(out) >= 2 else [("accuracy", "max"), ("gmacs", "min")]


def pareto_table(data: StudyData, meas: pd.DataFrame, envs: dict[int, dict[str, Any]],
                 objectives: list[tuple[str, str]], flags: dict[int, str] | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, Any]]]:
    """The Pareto-optimal trials within budget, most accurate first: (raw table with every measurement, its
    intervals and an environment key per trial, for pareto.csv; the displayed table, `tables.display_table`;
    the environments by key)."""
    from .export import trial_config
    from .tables import display_table

    df = data.trials
    pool = df[df["within_budget"]]
    front = pareto_front(pool, objectives) if len(pool) else pool
    front = front.sort_values(["accuracy", "gmacs"], ascending=[False, True])
    keys = {e: f"E{i + 1}" for i, e in enumerate(sorted(envs))}
    env_of = meas.dropna(subset=["environment_id"]).groupby("trial_id")["environment_id"] \
        .agg(lambda s: sorted({int(v) for v in s})).to_dict()
    cols = [c for c in measurement_columns(front)]
    derived = [c for c in ("accuracy_n", "accuracy_lo", "accuracy_hi", "best_p", "tied_with_best", "recommended",
                           "confirmed_seeds", "confirmed_std", "confirmed_min", "confirmed_max", "speedup",
                           "speedup_lo", "speedup_hi") if c in front.columns and c not in cols]
    rows = []
    options = []
    for _, r in front.iterrows():
        row = {"trial": int(r["number"]), "method": r["variant"], "config": r["label"]}
        try:
            rc = trial_config(r)
        except ValueError:
            rc = None
        opts = []
        if rc is not None and rc.effective_treatment == "squeeze":
            opts.append(f"temperature={rc.temperature:g}")
        if rc is not None and rc.spec is not None and rc.spec.policy == "similarity":
            opts.append(f"placement={rc.similarity_placement}, with_pos={rc.similarity_with_pos}, "
                        f"diversity={rc.diversity:g}")
        row["options"] = "; ".join(opts)
        options.append(row["options"])
        for c in cols + derived:
            row[c] = r.get(c)
        ids = env_of.get(int(r["trial_id"]), [])
        row["environment"] = " ".join(keys[i] for i in ids if i in keys)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", "method", "config", "options", *cols, *derived, "environment"])
    shown = display_table(data, front.assign(options=options), meas, env_keys=keys, env_of=env_of, flags=flags) \
        if len(front) else pd.DataFrame()
    env_table = {keys[e]: envs[e] for e in sorted(envs)}
    return table, shown, env_table


# ----------------------------------------------------------------------------- the build
def build_report(study: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 study_name: str | None = None, keep_maps: bool = True, n_images: int = 3, n_configs: int = 3,
                 progress: bool = True, dpi: int = 110) -> Report:
    """Write the report of ``study`` (a study directory, results.db or URL) to ``out`` and return what it wrote.

    ValueError for an empty study; FileNotFoundError for a missing path.
    """
    from . import html as html_mod
    from .plots import plot_hypervolume, plot_importance, plot_method_fronts, plot_published, plot_tradeoff

    data = open_study(study, study_name)
    df = data.trials
    if df.empty:
        raise ValueError(f"study: {data.name!r} has no trials yet; run `tpsexplore search` (or wait for the "
                         "first trial to finish) before `tpsexplore report`")
    if out is None:
        if data.root is None:
            raise ValueError("out: a bare results database has no study directory; give --out DIR")
        out = data.layout.report_dir
    from ..writable import check_output_dir

    out = check_output_dir(out, "out")  # before anything is written
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    envs, meas = data.measurements()
    rep = Report(out=out, study=data)
    rep.provenance = provenance(data, envs)
    objectives = study_objectives(data)
    usable = df[df["usable"] & ~df["is_baseline"]]
    within = df[df["within_budget"]]
    scale = 100.0 if df["accuracy"].max() <= 1.0 + 1e-9 else 1.0
    plot_df = df.copy()
    plot_df["top1"] = plot_df["accuracy"] * scale
    plot_df["top1_lo"] = plot_df["accuracy_lo"] * 100.0
    plot_df["top1_hi"] = plot_df["accuracy_hi"] * 100.0
    y_label = f"top-1 (%), {fidelity_name(data.fidelity)}, with 95% interval"
    rep.recommendation = data.recommendation
    rep.headline = headline_rows(rep.recommendation, data)
    rep.summary = summary_table(data)
    gm_col = data.trials.attrs.get("gmacs_column") or "gmacs"
    x_label = f"GMACs ({gm_col.split('@')[-1] if '@' in gm_col else gm_col}; batch 1)"
    base = data.baseline_row
    budget_g = data.budget_gmacs
    budget_frac = data.budget

    steps: list[tuple[str, Callable[[], None]]] = []

    def add(entry: FigureEntry) -> None:
        rep.figures.append(entry)

    def skip(name: str, why: str) -> None:
        rep.skipped.append((name, why))

    # -- accuracy vs GMACs
    def f_gmacs() -> None:
        if usable.empty:
            skip("accuracy vs GMACs", "no complete reduced trial has both an accuracy and GMACs yet")
            return
        label = f"budget {budget_frac:g} x baseline = {budget_g:.3g} GMACs" if budget_g else None
        fig = plot_tradeoff(plot_df, "gmacs", "top1", x_direction="min", budget=budget_g, budget_label=label,
                            title="Accuracy vs GMACs (every trial; front of the trials within budget)",
                            x_label=x_label, y_label=y_label)
        add(FigureEntry("accuracy_vs_gmacs", "Accuracy vs GMACs",
                        "Every complete trial coloured by method, with its 95% interval (Wilson) as an error "
                        "bar; hollow markers are over the budget. The red staircase is the Pareto front of the "
                        "trials within budget (circled, labelled #trial), the black star the unreduced baseline, "
                        "the dashed line the GMACs budget (shaded: over budget). Gold rings: front points that an "
                        "exact McNemar test cannot tell apart from the most accurate within-budget trial "
                        "(p >= 0.05); green square: the recommended config (headline).", fig))

    steps.append(("accuracy vs GMACs", f_gmacs))

    # -- accuracy vs speed: paired speed-up x the study's reference baseline (drift-proof), raw figures in the CSV
    ref = data.reference
    sps = runtime_columns(df, "speedup")

    def f_runtime() -> None:
        if not sps or not plot_df["speedup"].notna().any():
            skip("accuracy vs throughput", "the study recorded no paired speed-up (throughput) measurements")
            return
        big = [c for c in sps if c.batch_size > 1] or sps
        rc = next((c for c in big if ref is not None and c.batch_size == ref.throughput.batch_size), big[-1])
        one = next((c for c in sps if c.batch_size == 1), None)
        flagged = int(plot_df.loc[plot_df["usable"], "speed_flagged"].sum())
        flag_text = (f" Black crosses: {flagged} trial(s) whose timing is flagged (measured under load, or the "
                     "baseline beside it drifted more than 10% from the reference; see the table 'Speed flags')."
                     if flagged else " No trial's timing is flagged (load or baseline drift > 10%).")
        specs = []
        if ref is not None:
            r = ref.throughput
            specs.append(("paired_throughput", "max", f"throughput at the reference (batch {r.batch_size}, {r.dtype}, "
                          f"{r.device})", f"img/s at the reference (paired speed-up x {r.value:.4g} img/s)",
                          _slug(f"accuracy_vs_throughput_bs{r.batch_size}_{r.dtype}_{r.device}"),
                          r.value / budget_frac if budget_frac else None))
            if ref.latency_ms is not None and plot_df["paired_latency_ms"].notna().any():
                lt = ref.latency_ms
                specs.append(("paired_latency_ms", "min", f"latency at the reference (batch 1, {lt.dtype}, {lt.device})",
                              f"ms at the reference ({lt.value:.4g} ms / paired batch-1 speed-up)",
                              _slug(f"accuracy_vs_latency_bs1_{lt.dtype}_{lt.device}"),
                              lt.value * budget_frac if budget_frac else None))
            basis = (f"Speeds are the paired speed-up (each trial timed beside the unreduced baseline) times the "
                     f"study's reference baseline measured once at its start ({ref.measured}), so machine load "
                     "during the study does not move the points; the raw img/s and ms are in trials.csv.")
        else:
            specs.append(("speedup", "max", f"paired speed-up ({rc.title})", f"paired speed-up (x), {rc.title}",
                          _slug(f"accuracy_vs_speedup_bs{rc.batch_size}_{rc.dtype}_{rc.device}"),
                          1.0 / budget_frac if budget_frac else None))
            if one is not None and plot_df["speedup_bs1"].notna().any():
                specs.append(("speedup_bs1", "max", f"paired batch-1 speed-up ({one.title})",
                              f"paired speed-up (x), {one.title}",
                              _slug(f"accuracy_vs_speedup_bs1_{one.dtype}_{one.device}"),
                              1.0 / budget_frac if budget_frac else None))
            basis = ("The study recorded no reference baseline, so speed is shown as the paired speed-up (each trial "
                     "timed beside the unreduced baseline), which machine load does not move; the raw img/s and ms "
                     "are in trials.csv.")
        for col, direction, label, axis, stem, line in specs:
            sub = plot_df[plot_df["usable"] & plot_df[col].notna() & ~plot_df["is_baseline"]]
            if sub.empty:
                skip(f"accuracy vs {label}", "no complete reduced trial has this measurement")
                continue
            fig = plot_tradeoff(plot_df, col, "top1", x_direction=direction, budget=line,
                                budget_label=f"GMACs budget at ideal speed-up ({budget_frac:g} x baseline cost)"
                                if line else None, shade=False, title=f"Accuracy vs {label}", x_label=axis,
                                y_label=y_label, flag="speed_flagged")
            add(FigureEntry(stem, f"Accuracy vs {label}",
                            f"{basis} Horizontal bars: the speed-up's range over the timing windows; vertical bars: "
                            "95% accuracy intervals. The front is taken over the trials within the GMACs budget "
                            "(filled markers), labelled #trial, with the gold rings and green square of the first "
                            "figure. The dashed line is where a config at exactly the GMACs budget would be if "
                            "time scaled with GMACs (ideal speed-up); a reference, not the budget." + flag_text,
                            fig))

    steps.append(("accuracy vs throughput", f_runtime))

    # -- per-method fronts
    def f_fronts() -> None:
        if within.empty:
            skip("Pareto front per method", "no complete reduced trial is within the budget")
            return
        fig = plot_method_fronts(plot_df, "gmacs", "top1", budget=budget_g, x_label=x_label, y_label=y_label)
        add(FigureEntry("method_fronts", "Pareto front per method (TPS Figure 5 view)",
                        "Each method's own front over its trials within budget (legend: front points / trials), "
                        "front points labelled #trial with their 95% interval; faint dots are that method's other "
                        "trials. Gold rings and the green square as in the first figure.", fig))

    steps.append(("method fronts", f_fronts))

    # -- published points
    def f_published() -> None:
        short = published_backbone(data.backbone_description().get("timm_name")) or \
            published_backbone(data.backbone_description().get("name"))
        if data.is_proxy:
            skip("published points", "the study ran on the proxy task, not ImageNet: the papers' ImageNet numbers "
                 "are not comparable, so they are not drawn")
            return
        if not data.is_imagenet:
            skip("published points", "the study's real data is not ImageNet-1k (1,000 classes)")
            return
        if short is None:
            skip("published points", f"published points exist for DeiT-T and DeiT-S only; the backbone is "
                 f"{data.backbone_description().get('name')}")
            return
        geo = data.backbone_description()
        if (geo.get("img_size") not in (None, 224)) or (geo.get("patch_size") not in (None, 16)):
            skip("published points", "the papers' points are at 224x224 with patch 16; this study used "
                 f"img_size={geo.get('img_size')}, patch_size={geo.get('patch_size')}")
            return
        if within.empty:
            skip("published points", "no complete reduced trial is within the budget")
            return
        at_chance = baseline_at_chance(base, data.data)
        if at_chance:
            skip("published points", at_chance)
            return
        pub = published_points(short)
        rep.published = pub
        fig = plot_published(plot_df, pub, "gmacs", "top1", budget=budget_g, x_label=x_label, y_label=y_label)
        add(FigureEntry("published_points", f"Study fronts beside the published points ({short})",
                        "Crosses are the papers' ImageNet-1k numbers (methods-spec sections 1.6, 2.3, 3.5, 4.4; "
                        "listed in the table 'Published points' below); the papers' 'GFLOPs' are MACs like "
                        "ours, and their accuracies come from full training, ours from this study's fidelity.",
                        fig))

    steps.append(("published points", f_published))

    # -- hypervolume
    def f_hv() -> None:
        if within.empty:
            skip("hypervolume", "no complete reduced trial is within the budget")
            return
        fig = plot_hypervolume(df, objectives)
        add(FigureEntry("hypervolume", "Hypervolume vs trial number",
                        "Hypervolume of the within-budget front after each trial, with the objectives "
                        f"({', '.join(f'{c} ({d})' for c, d in objectives)}) scaled to [0, 1] over all trials; "
                        "it rises when a trial extends the front.", fig))

    steps.append(("hypervolume", f_hv))

    # -- parameter importance
    def f_importance() -> None:
        from .importance import load_optuna_study, param_importances

        storage = data.optuna_storage
        if not storage:
            skip("parameter importance", f"the study's Optuna storage is gone (the journal "
                 f"{data.manifest.storage.display} does not exist)")
            return
        try:
            ostudy = load_optuna_study(storage, data.optuna_study_name)
        except Exception as e:  # noqa: BLE001 - an unreadable storage is a note, not a failed report
            skip("parameter importance", f"the Optuna storage {storage!r} could not be read: "
                 f"{' '.join(str(e).split())[:200]}")
            return
        imp = param_importances(ostudy, [c for c, _ in objectives])
        if not imp.values:
            skip("parameter importance", imp.note or "no importance could be computed")
            return
        fig = plot_importance(imp.values, title=f"Parameter importance ({imp.evaluator}, {imp.trials} trials)")
        caption = ("fANOVA importance of each sampled parameter for each objective, over the complete trials of "
                   "the Optuna study.")
        if imp.note:
            caption += f" Note: {imp.note}."
        add(FigureEntry("parameter_importance", "Parameter importance", caption, fig))

    steps.append(("parameter importance", f_importance))

    # -- keep maps
    def f_keepmaps() -> None:
        if not keep_maps:
            skip("token-keep maps", "turned off (--no-keep-maps)")
            return
        entry, why = _keep_maps_figure(data, n_images, n_configs)
        if entry is None:
            skip("token-keep maps", why)
        else:
            add(entry)
            if why:
                rep.notes.append(why)

    steps.append(("keep maps", f_keepmaps))

    bar = progress_bar(steps, desc="report", unit="step", disable=not progress)
    for name, step in bar:
        bar.set_postfix_str(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            step()

    # -- save figures
    for entry in rep.figures:
        entry.png = fig_dir / f"{entry.name}.png"
        entry.svg = fig_dir / f"{entry.name}.svg"
        entry.figure.savefig(entry.png, dpi=dpi)
        entry.figure.savefig(entry.svg)

    # -- tables
    flags = {int(n): str(w) for n, w, f in zip(df["number"], df["speed_flag"], df["speed_flagged"]) if f}
    rep.pareto, rep.pareto_display, rep.environments = pareto_table(data, meas, envs, objectives, flags)
    rep.speed_flags = speed_flags_table(data)
    if rep.pareto.empty:
        rep.notes.append("no Pareto-optimal config: no complete reduced trial is within the budget")
    rep.csv = out / "trials.csv"
    _to_csv(df, rep.csv)
    _to_csv(rep.pareto, out / "pareto.csv")
    if base is None:
        rep.notes.append("the study has no unreduced baseline trial (method none), so no baseline is marked")
    rep.html = out / "report.html"
    rep.markdown = out / "report.md"
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rep.html.write_text(html_mod.render_html(rep, generated), encoding="utf-8")
    rep.markdown.write_text(html_mod.render_markdown(rep, generated), encoding="utf-8")
    return rep


def _to_csv(df: pd.DataFrame, path: Path) -> None:
    frame = df.copy()
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v)
    frame.to_csv(path, index=False)


def _keep_maps_figure(data: StudyData, n_images: int, n_configs: int) -> tuple[FigureEntry | None, str]:
    """The keep-map figure of the best configs, or (None, why not)."""
    import torch

    from .export import trial_config
    from .images import study_images
    from .keepmaps import compute_keep_maps, plot_keep_maps
    from .model import build_model, is_hierarchical_backbone

    df = data.trials
    pool = df[df["within_budget"]]
    if pool.empty:
        return None, "no complete reduced trial is within the budget"
    if data.root is None:
        return None, ("a bare results database was given: the keep maps need the study directory (its manifest "
                      "for the data, its weights folder for the trials' weights)")
    # each method's most accurate trial within budget, best methods first: the configs worth deploying
    ranked = pool.sort_values(["accuracy", "gmacs", "number"], ascending=[False, True, True], kind="stable")
    picked = [grp.iloc[0] for _, grp in ranked.groupby("variant", sort=False)][:n_configs]
    try:
        backbone = data.backbone_description()
    except ValueError as e:
        return None, str(e)
    if is_hierarchical_backbone(backbone):
        return None, (f"they show which patch tokens of a ViT's single grid each stage keeps; {backbone['name']} is "
                      "a hierarchical backbone (a new token grid per stage), which they do not map")
    base_ckpt = _base_checkpoint(data)
    maps, weight_notes, images = [], [], None
    for r in picked:
        number = int(r["number"])
        cfg = trial_config(r)
        wpath = data.weights_path(number)
        source = f"trial {number} fine-tuned weights" if wpath else None
        if wpath is None and base_ckpt is not None:
            wpath, source = base_ckpt, "the study's starting weights"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(backbone, cfg, wpath)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            return None, f"the model of trial {number} could not be rebuilt: {' '.join(str(e).split())[:200]}"
        if source is None:
            source = "random init (no weights kept)"
        weight_notes.append(f"trial {number}: {source}")
        if images is None:
            images, why = study_images(data.data, model, n_images)
            if images is None:
                return None, f"no images: {why}"
            img_note = why
        torch.manual_seed(0)
        maps.append(compute_keep_maps(model, cfg, images, title=f"#{number} {cfg.label}"))
    if not maps or not any(m.stages and m.stages[0] for m in maps):
        return None, "the best configs reduce no tokens on these images"
    fig = plot_keep_maps(maps)
    caption = (f"Which patches each reduction stage keeps (clear), squeezes, fuses or merges into another token "
               f"(tinted with that token's colour; its host outlined) or drops (dark), for the most accurate "
               f"config within budget of each of the best methods, on {img_note}. Weights: {'; '.join(weight_notes)}.")
    return FigureEntry("keep_maps", "Token-keep maps of the best configs (TPS Figure 7 style)", caption, fig), ""


def _base_checkpoint(data: StudyData) -> Path | None:
    ckpt = data.manifest.weights.checkpoint
    return Path(ckpt) if ckpt and Path(ckpt).is_file() else None
