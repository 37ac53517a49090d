"""Opening a study (a study directory or a results database) and reading its trials as one DataFrame.

A study directory is what ``tpsexplore search`` writes (`tpsexplore.manifest.StudyLayout`): the results store,
the Optuna journal, the manifest and the trials' weights. Its facts (budget, geometry, objectives, data, weights,
storage) come from the typed manifest (`tpsexplore.manifest.StudyManifest`), never re-derived from the trials. A
bare results database (file or URL) works too: the search keeps the same manifest in the store's study settings.

`load_trials` returns the store's ``trials_frame`` plus a few derived columns that every report view uses:

- ``variant``: method, or ``method+treatment`` when a non-default treatment was searched (from the stored
  ``ReductionConfig`` JSON, column ``config_json``);
- ``accuracy``: top-1 at the study's fidelity (``accuracy_top1@finetuned`` if the study fine-tuned, else
  ``@zero_shot``; the best-populated one when the study does not say);
- ``gmacs``: GMACs (``gmacs@analytic``, else ``gmacs@traced``, else the trial's ``analytic_gmacs``);
- ``is_baseline``: the unreduced reference trial (method ``none``);
- ``usable``: complete trials with a value in ``accuracy`` and ``gmacs``;
- ``within_budget``: usable trials that meet the budget (the store's ``feasible`` flag when set, else
  ``gmacs <=`` the manifest's budget in GMACs).

`open_study` adds, from the accuracy measurements' counts and per-image correctness (docs/HELPERS.md, issue 9):

- ``accuracy_n``, ``accuracy_lo``, ``accuracy_hi``: the size and 95% Wilson interval (fractions) of ``accuracy``;
- ``confirmed_seeds``, ``confirmed_std``, ``confirmed_min``, ``confirmed_max``: the confirmation stage's seeds
  (its mean is ``accuracy_top1@confirmed``);
- ``speedup``, ``speedup_lo``, ``speedup_hi``: the paired speed-up at the largest measured batch and its range;
- ``best_p``: exact McNemar p-value against the most accurate within-budget trial (``is_best``);
  ``tied_with_best``: within budget and not distinguishable from it (p >= 0.05; the best itself too);
- ``recommended``: the trial `tpsexplore.search.recommend.recommend` picks (the report's headline);
- ``paired_throughput`` (img/s at the study's reference baseline = speed-up x reference, with
  ``paired_throughput_lo``/``_hi``), ``paired_latency_ms`` (reference ms / batch-1 speed-up), ``speed_basis``
  ("paired", or "raw" for a study without a reference), ``baseline_drift``, ``speed_flagged`` and ``speed_flag``
  (why: measured under load, or the baseline beside it drifted > 10% from the reference); see
  `tpsexplore.search.drift`. The raw img/s and ms stay in their ``throughput@...`` / ``latency_ms@...`` columns.

Paired comparisons: `StudyData.compare(a, b)` / `compare_trials(study, a, b)`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..manifest import RESULTS_DB, StudyLayout, StudyManifest, read_manifest
from ..reduce import ReductionConfig
from ..search.drift import Reference, drift_flags, paired_speed
from ..search.recommend import (CONFIRMED, Recommendation, TrialRecord, build_record, compare, recommend,
                                tests_against_best)
from ..stats import PairedDifference
from ..storage import ResultsStore, Study

DB_NAME = RESULTS_DB  # kept for importers; the name itself lives in tpsexplore.manifest
ACCURACY_FIDELITIES = ("finetuned", "zero_shot")
GMACS_COLUMNS = ("gmacs@analytic", "gmacs@traced")

_THROUGHPUT_RE = re.compile(r"^(?P<kind>throughput|latency_ms|speedup|joules_per_image|peak_mem_bytes)@"
                            r"(?:(?P<fidelity>[^/]+)/)?bs(?P<bs>\d+)(?:/(?P<dtype>[^/]+))?(?:/(?P<device>.+))?$")


@dataclass
class StudyData:
    """Everything a report or an export reads from one study.

    root: the study directory (None for a bare database); db: the results database path or URL; manifest: the
    study's typed manifest (`tpsexplore.manifest.StudyManifest`); trials: `load_trials`.
    """

    name: str
    db: str
    root: Path | None
    study: Study
    manifest: StudyManifest
    trials: pd.DataFrame
    records: list[TrialRecord] = field(default_factory=list)

    @property
    def layout(self) -> StudyLayout | None:
        return StudyLayout(self.root) if self.root is not None else None

    # ------------------------------------------------------------------ accuracy and the recommendation
    @property
    def fidelity(self) -> str:
        """The fidelity of the ``accuracy`` column (``finetuned`` / ``zero_shot``)."""
        col = self.trials.attrs.get("accuracy_column") or ""
        return col.split("@", 1)[1] if "@" in col else self.manifest.fidelity.accuracy

    def record(self, number: int) -> TrialRecord:
        """The `TrialRecord` of complete trial ``number`` (ValueError naming the trial otherwise)."""
        for r in self.records:
            if r.number == int(number):
                return r
        known = set(int(n) for n in self.trials["number"]) if len(self.trials) else set()
        if int(number) in known:
            state = self.trials.loc[self.trials["number"] == int(number), "state"].iloc[0]
            raise ValueError(f"trial: {number} is {state}; only complete trials have accuracies to compare")
        raise ValueError(f"trial: {number} does not exist in study {self.name!r}")

    def compare(self, a: int, b: int, fidelity: str | None = None) -> PairedDifference:
        """acc(trial a) - acc(trial b) on the same images: Newcombe's 95% interval and the exact McNemar test.

        ``fidelity``: the study's (default), or ``confirmed`` (mean over seeds, paired seed by seed). One-line
        ValueError when a trial is not complete, has no per-image correctness, or the evaluation sets differ.
        """
        fid = fidelity or self.fidelity
        ra, rb = self.record(a), self.record(b)
        if fid not in (CONFIRMED, self.fidelity):
            ra, rb = (self._record_at(r, fid) for r in (ra, rb))
        return compare(ra, rb, CONFIRMED if fid == CONFIRMED else None)

    def _record_at(self, r: TrialRecord, fidelity: str) -> TrialRecord:
        """The record of ``r`` with its accuracy read at another fidelity (e.g. zero_shot)."""
        trial_id = int(self.trials.loc[self.trials["number"] == r.number, "trial_id"].iloc[0])
        _, meas = self.measurements(trial_id)
        ms = meas.to_dict("records")
        if not any(m["kind"] == "accuracy_top1" and m["fidelity"] == fidelity for m in ms):
            raise ValueError(f"fidelity: trial {r.number} has no accuracy_top1 measurement at {fidelity!r}")
        return build_record(r.number, ms, fidelity=fidelity, label=r.label, variant=r.variant, cost=r.cost,
                            within_budget=r.within_budget, is_baseline=r.is_baseline)

    @property
    def recommendation(self) -> Recommendation | None:
        """The recommended config (`tpsexplore.search.recommend.recommend`); None when nothing is within budget."""
        return recommend(self.records, self.fidelity)

    @property
    def reference(self) -> Reference | None:
        """The study's reference baseline speed (the manifest's), if it was measured."""
        ref = self.manifest.reference
        return Reference.from_dict(ref) if ref is not None else None

    # ------------------------------------------------------------------ provenance
    def measurements(self, trial_id: int | None = None) -> tuple[dict[int, dict[str, Any]], pd.DataFrame]:
        """(environments by id, measurements frame) of the study, or of one trial, from the results store."""
        with ResultsStore(self.db) as store:
            meas = store.measurements_frame(self.study, trial_id=trial_id)
            envs = {int(e): store.environment(int(e)) for e in meas["environment_id"].dropna().unique()}
        return envs, meas

    def backbone_description(self) -> dict[str, Any]:
        """``{"name", "timm_name", "img_size", "patch_size", "num_classes", ..., "weights"}`` from the manifest."""
        from .model import backbone_description

        return backbone_description(self.manifest)

    @property
    def data(self) -> dict[str, Any]:
        """The data set's details as the search recorded them (path, classes, sizes, split, proxy, ...)."""
        return dict(self.manifest.data.details)

    @property
    def is_proxy(self) -> bool:
        return self.manifest.data.is_proxy

    @property
    def is_imagenet(self) -> bool:
        """Real ImageNet-1k images: real data with 1,000 classes."""
        return not self.is_proxy and int(self.data.get("num_classes") or self.manifest.geometry.num_classes) == 1000

    @property
    def budget(self) -> float:
        """The budget as a fraction of the baseline's GMACs."""
        return self.manifest.budget.fraction

    @property
    def budget_gmacs(self) -> float:
        """The budget in GMACs, as the search decided it (never rebuilt from the measured baseline)."""
        return self.manifest.budget.gmacs

    @property
    def baseline_gmacs(self) -> float:
        """The unreduced baseline's GMACs the budget was set from."""
        return self.manifest.budget.baseline_gmacs

    @property
    def objectives(self) -> list[str]:
        """``column:direction`` per objective."""
        return self.manifest.objective_specs

    @property
    def optuna_storage(self) -> str | None:
        """The Optuna storage URL (password hidden) or journal path; a journal of a study directory that was moved
        or copied is found beside its results store. None when the journal is gone."""
        storage = self.manifest.storage
        if not storage.is_journal:
            return storage.display
        candidates = [storage.path] + ([self.layout.journal] if self.layout is not None else [])
        return next((str(p) for p in candidates if p.is_file()), None)

    @property
    def optuna_study_name(self) -> str:
        return self.manifest.study

    def weights_path(self, number: int) -> Path | None:
        """Path of trial ``number``'s fine-tuned weights when the study kept them, else None."""
        return self.layout.find_weights(number) if self.layout is not None else None

    @property
    def baseline_row(self) -> pd.Series | None:
        base = self.trials[self.trials["is_baseline"]]
        if base.empty:
            return None
        done = base[base["state"] == "complete"]
        return (done if len(done) else base).iloc[0]


# ----------------------------------------------------------------------------- opening
def _locate(path: str | os.PathLike[str]) -> tuple[str, StudyLayout | None]:
    """(database path or URL, study layout or None) for a study directory, a database file or a URL."""
    text = os.fspath(path)
    if "://" in text:
        return text, None
    p = Path(text).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"study: {text!r} does not exist; give a study directory (with {RESULTS_DB}) "
                                "or a results database")
    if p.is_dir():
        layout = StudyLayout(p)
        if not layout.results_db.is_file():
            raise FileNotFoundError(f"study: directory {text!r} has no {RESULTS_DB}; give the folder that "
                                    "`tpsexplore search` wrote (DIR/NAME) or a results database")
        return str(layout.results_db), layout
    return str(p), StudyLayout.of_results_db(p)


def study_manifest(layout: StudyLayout | None, row: Study, db: str) -> StudyManifest:
    """The study's manifest: the study folder's file, else the copy in the results store's study settings.

    Studies written before manifests existed are refused with one line (rerun the search to write one).
    """
    if layout is not None and layout.manifest.is_file():
        return read_manifest(layout)
    stored = (row.settings or {}).get("manifest")
    if stored is None:
        raise ValueError(f"manifest: study {row.name!r} in {db!r} has none (written by an older tpsexplore); rerun "
                         "the same `tpsexplore search` command to write it")
    return StudyManifest.from_dict(stored, f"study {row.name!r} in {db!r}")


def open_study(path: str | os.PathLike[str], study: str | None = None) -> StudyData:
    """Open a study directory, a results database file or URL; ``study`` picks one of several studies.

    Raises FileNotFoundError for a missing path, ValueError when the database holds no study or several
    and none was named, or when the study's manifest is missing or malformed.
    """
    db, layout = _locate(path)
    manifest = read_manifest(layout) if layout is not None and layout.manifest.is_file() else None
    store = ResultsStore(db)
    try:
        studies = store.studies()
        if not studies:
            raise ValueError(f"study: results database {db!r} holds no study; run `tpsexplore search` first")
        name = study or (manifest.study if manifest is not None else None)
        if name is None:
            if len(studies) > 1:
                raise ValueError(f"study: {db!r} holds {len(studies)} studies ({', '.join(s.name for s in studies)}); "
                                 "name one with --study")
            row = studies[0]
        else:
            matches = [s for s in studies if s.name == name]
            if not matches:
                raise ValueError(f"study: {name!r} not found in {db!r}; existing: "
                                 f"{', '.join(s.name for s in studies)}")
            row = matches[0]
        frame = store.trials_frame(row)
        meas = store.measurements_frame(row)
    finally:
        store.close()
    if manifest is None or manifest.study != row.name:
        manifest = study_manifest(None, row, db)
    data = StudyData(name=row.name, db=db, root=layout.root if layout is not None else None, study=row,
                     manifest=manifest, trials=frame)
    data.trials = enrich(frame, manifest)
    ref = data.reference
    data.records = trial_records(data.trials, meas, data.fidelity, ref.throughput.value if ref else None)
    data.trials = add_speed(add_uncertainty(data.trials, data.records, data.fidelity), meas, ref)
    return data


def compare_trials(study: "StudyData | str | os.PathLike[str]", a: int, b: int,
                   fidelity: str | None = None) -> PairedDifference:
    """acc(a) - acc(b) of two trials of a study (a `StudyData` or a path/URL `open_study` takes), paired on
    the same images: ``.difference``, ``.interval`` (Newcombe 95%) and ``.test`` (exact McNemar, ``.p_value``).

    ``str(tpsexplore.stats.format_difference(result))`` reads '-1.2 pts [-2.0, -0.4], McNemar p=0.003'.
    Refuses with a one-line ValueError when the evaluation sets differ or per-image correctness is missing.
    """
    data = study if isinstance(study, StudyData) else open_study(study)
    return data.compare(a, b, fidelity)


def load_trials(db: str | os.PathLike[str], study: str | None = None) -> pd.DataFrame:
    """One row per trial of a study (directory, results.db path or URL), measurements as columns.

    Columns: the store's ``trials_frame`` (``number``, ``method``, ``label``, ``state``, ``config.*``, one
    column per measurement type such as ``accuracy_top1@finetuned``, ``gmacs@analytic``,
    ``throughput@bs64/fp32/cuda``) plus ``variant``, ``accuracy``, ``gmacs``, ``is_baseline``, ``usable`` and
    ``within_budget`` (see the module docstring). ``df.attrs`` holds the columns
    chosen for ``accuracy`` and ``gmacs``.
    """
    return open_study(db, study).trials


# ----------------------------------------------------------------------------- columns
def _populated(df: pd.DataFrame, col: str) -> int:
    return int(df[col].notna().sum()) if col in df.columns else 0


def accuracy_column(df: pd.DataFrame, fidelity: str | None = None) -> str | None:
    """The top-1 column to use: the study's fidelity when it has values, else the most populated one
    (fine-tuned before zero-shot on a tie)."""
    cols = [c for c in df.columns if isinstance(c, str) and c.startswith("accuracy_top1")]
    if fidelity and f"accuracy_top1@{fidelity}" in cols and _populated(df, f"accuracy_top1@{fidelity}"):
        return f"accuracy_top1@{fidelity}"
    ranked = sorted(cols, key=lambda c: (-_populated(df, c),
                                         next((i for i, f in enumerate(ACCURACY_FIDELITIES) if c.endswith(f)), 9)))
    return ranked[0] if ranked and _populated(df, ranked[0]) else None


def gmacs_column(df: pd.DataFrame) -> str | None:
    for col in GMACS_COLUMNS:
        if _populated(df, col):
            return col
    others = [c for c in df.columns if isinstance(c, str) and c.startswith("gmacs@") and _populated(df, c)]
    if others:
        return others[0]
    return "analytic_gmacs" if _populated(df, "analytic_gmacs") else None


@dataclass(frozen=True)
class RuntimeColumn:
    """A runtime measurement column: kind (throughput, latency_ms, ...), batch size, dtype, device."""

    column: str
    kind: str
    batch_size: int
    dtype: str | None
    device: str | None

    @property
    def title(self) -> str:
        bits = [f"batch {self.batch_size}"] + [b for b in (self.dtype, self.device) if b]
        return ", ".join(bits)


def runtime_columns(df: pd.DataFrame, kind: str = "throughput") -> list[RuntimeColumn]:
    """Columns of measurements of ``kind`` with a batch size (sorted by batch size), e.g. throughput per batch."""
    out = []
    for col in df.columns:
        m = _THROUGHPUT_RE.match(str(col))
        if m and m.group("kind") == kind and _populated(df, col):
            out.append(RuntimeColumn(col, kind, int(m.group("bs")), m.group("dtype"), m.group("device")))
    return sorted(out, key=lambda r: (r.batch_size, r.dtype or "", r.device or ""))


def measurement_columns(df: pd.DataFrame) -> list[str]:
    """All pivoted measurement columns (``kind@...`` or known bare kinds) that hold a value."""
    # bare kinds (stored without fidelity, batch, dtype or device); "gmacs"/"accuracy" are load_trials' own
    bare = {"params", "throughput", "latency_ms", "speedup", "joules_per_image", "peak_mem_bytes",
            "accuracy_top1", "accuracy_top5"}
    return [c for c in df.columns if isinstance(c, str) and ("@" in c or c in bare) and _populated(df, c)]


def trial_config(row: Any) -> ReductionConfig | None:
    """The `ReductionConfig` stored with a trial (its ``config_json`` column), None when the trial has none."""
    text = row.get("config_json") if hasattr(row, "get") else None
    if not isinstance(text, str) or text.strip() in ("", "{}"):
        return None
    return ReductionConfig.from_json(text)


def variant_of(config: ReductionConfig | None, method: Any = None) -> str:
    """``method`` or ``method+treatment`` (a searched non-default treatment); 'baseline' for method none."""
    m = config.method if config is not None else (method if isinstance(method, str) and method else "none")
    if m == "none":
        return "baseline"
    if config is not None and config.treatment and config.treatment != config.spec.treatment:
        return f"{m}+{config.treatment}"
    return str(m)


def enrich(frame: pd.DataFrame, manifest: StudyManifest) -> pd.DataFrame:
    """Add the derived columns of the module docstring to a ``trials_frame``."""
    df = frame.copy()
    if df.empty:
        for col in ("variant", "accuracy", "gmacs"):
            df[col] = pd.Series(dtype="object" if col == "variant" else "float64")
        for col in ("is_baseline", "usable", "within_budget"):
            df[col] = pd.Series(dtype=bool)
        df.attrs.update(accuracy_column=None, gmacs_column=None)
        return df
    configs = [trial_config(row) for _, row in df.iterrows()]
    df["variant"] = [variant_of(c, m) for c, m in zip(configs, df["method"])]
    acc = accuracy_column(df, manifest.fidelity.accuracy)
    gm = gmacs_column(df)
    df["accuracy"] = df[acc].astype(float) if acc else np.nan
    df["gmacs"] = df[gm].astype(float) if gm else np.nan
    if gm and gm != "analytic_gmacs" and "analytic_gmacs" in df.columns:
        df["gmacs"] = df["gmacs"].fillna(df["analytic_gmacs"])
    df["is_baseline"] = df["variant"] == "baseline"
    df["usable"] = (df["state"] == "complete") & df["accuracy"].notna() & df["gmacs"].notna()
    feasible = df["feasible"] if "feasible" in df.columns else pd.Series([None] * len(df), index=df.index)
    limit = manifest.budget.gmacs * (1 + 1e-9)
    within = [bool(f) if f is not None and not (isinstance(f, float) and math.isnan(f)) else bool(g <= limit)
              for f, g in zip(feasible, df["gmacs"])]
    df["within_budget"] = df["usable"] & pd.Series(within, index=df.index) & ~df["is_baseline"]
    df.attrs.update(accuracy_column=acc, gmacs_column=gm)
    return df


# ----------------------------------------------------------------------------- uncertainty and the recommendation
def trial_records(df: pd.DataFrame, meas: pd.DataFrame, fidelity: str,
                  reference: float | None = None) -> list[TrialRecord]:
    """A `TrialRecord` per complete trial of an enriched trials frame, from the store's measurements frame."""
    if df.empty:
        return []
    by_trial: dict[int, list[dict[str, Any]]] = {}
    cols = [c for c in ("kind", "value", "fidelity", "batch_size", "dtype", "device", "extra") if c in meas.columns]
    for m in meas.sort_values("measurement_id")[["trial_id", *cols]].to_dict("records") if len(meas) else []:
        by_trial.setdefault(int(m["trial_id"]), []).append(m)
    out = []
    for r in df[df["state"] == "complete"].itertuples(index=False):
        row = r._asdict()
        out.append(build_record(int(row["number"]), by_trial.get(int(row["trial_id"]), []), fidelity=fidelity,
                                label=row.get("label") or "", variant=row.get("variant") or "",
                                cost=row.get("gmacs"), within_budget=bool(row.get("within_budget")),
                                is_baseline=bool(row.get("is_baseline")), reference=reference))
    return out


def add_uncertainty(df: pd.DataFrame, records: list[TrialRecord], fidelity: str) -> pd.DataFrame:
    """The interval, confirmation, speed-up and tie-with-best columns of the module docstring."""
    out = df.copy()
    by = {r.number: r for r in records}
    best, tests = tests_against_best(records)
    rec = recommend(records, fidelity)

    def col(fn: Any, dtype: str = "float64") -> pd.Series:
        vals = [fn(by[int(n)]) if int(n) in by else None for n in out["number"]]
        return pd.Series([np.nan if v is None and dtype == "float64" else v for v in vals], index=out.index,
                         dtype=dtype)

    out["accuracy_n"] = col(lambda r: r.accuracy.n if r.accuracy else None, "Int64")
    out["accuracy_lo"] = col(lambda r: r.accuracy.interval[0] if r.accuracy else None)
    out["accuracy_hi"] = col(lambda r: r.accuracy.interval[1] if r.accuracy else None)
    out["confirmed_seeds"] = col(lambda r: r.confirmed.count if r.confirmed else None, "Int64")
    out["confirmed_std"] = col(lambda r: r.confirmed.std if r.confirmed else None)
    out["confirmed_min"] = col(lambda r: r.confirmed.min if r.confirmed else None)
    out["confirmed_max"] = col(lambda r: r.confirmed.max if r.confirmed else None)
    out["speedup"] = col(lambda r: r.speed.median if r.speed else None)
    out["speedup_lo"] = col(lambda r: r.speed.low if r.speed else None)
    out["speedup_hi"] = col(lambda r: r.speed.high if r.speed else None)
    p = [tests[int(n)].p_value if tests.get(int(n)) is not None else np.nan for n in out["number"]]
    out["best_p"] = pd.Series(p, index=out.index, dtype="float64")
    out["is_best"] = out["number"] == (best.number if best is not None else -1)
    out["tied_with_best"] = out["is_best"] | (out["within_budget"] & (out["best_p"] >= 0.05))
    out["recommended"] = out["number"] == (rec.chosen.number if rec is not None else -1)
    out.attrs.update(df.attrs)
    return out


def add_speed(df: pd.DataFrame, meas: pd.DataFrame, reference: Reference | None) -> pd.DataFrame:
    """Drift-proof speeds and flags (`tpsexplore.search.drift`) as columns: ``paired_throughput`` (img/s at the
    reference = speed-up x reference), ``paired_latency_ms`` (reference ms / batch-1 speed-up), ``speed_basis``
    ("paired", or "raw" without a reference), ``speedup_bs1``, ``baseline_drift``, ``speed_flagged`` and
    ``speed_flag``."""
    out = df.copy()
    speeds = paired_speed(meas, reference) if len(meas) else pd.DataFrame()
    flags = drift_flags(meas, reference) if len(meas) else pd.DataFrame()
    cols = {"paired_throughput": ("throughput", speeds), "paired_latency_ms": ("latency_ms", speeds),
            "speed_basis": ("basis", speeds), "speedup_bs1": ("speedup_bs1", speeds),
            "baseline_drift": ("baseline_drift", flags), "speed_flagged": ("flagged", flags),
            "speed_flag": ("reason", flags)}
    for name, (src, frame) in cols.items():
        values = dict(zip(frame["trial_id"], frame[src])) if len(frame) and src in frame.columns else {}
        out[name] = [values.get(int(t)) for t in out["trial_id"]]
    for name in ("paired_throughput", "paired_latency_ms", "speedup_bs1", "baseline_drift"):
        out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
    ref = reference.throughput.value if reference is not None else None
    for side in ("lo", "hi"):
        col = f"speedup_{side}"
        out[f"paired_throughput_{side}"] = out[col] * ref if ref is not None and col in out.columns else np.nan
    out["speed_flagged"] = out["speed_flagged"].map(lambda v: bool(v) if v is not None and v == v else False)
    out["speed_flag"] = out["speed_flag"].map(lambda v: v if isinstance(v, str) else "")
    out.attrs.update(df.attrs)
    return out
