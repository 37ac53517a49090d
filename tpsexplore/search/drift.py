"""Speed that does not drift: one reference baseline per study, paired speeds, and flags for doubtful timings.

Raw img/s and ms follow the machine's load: when other processes start mid-study, every later trial (and its
baseline) looks slower. The speed-up of a trial, measured with the unreduced baseline beside it (windows
alternating, `tpsexplore.measure.throughput.measure_pair`), stays put. So a study measures the baseline once
at its start (the *reference*, stored in ``study.json`` and in the results store's study settings under
``"reference"``), and every speed that is plotted, tabulated or optimised is

* throughput = speed-up at the study's batch x the reference throughput (img/s);
* latency    = the reference's batch-1 latency (ms) / the batch-1 speed-up.

The raw figures stay in the database. A trial is *flagged* when any of its timings was taken on a loaded
machine (``extra["contention"]["loaded"]``, see `tpsexplore.measure.telemetry.Contention`) or when the
baseline measured beside it drifted more than ``threshold`` (10%) from the reference.

Inputs are plain: a long measurements frame (`tpsexplore.storage.ResultsStore.measurements_frame`) and the
reference dict (or a study's settings dict holding it). Everything here is pure except `study_speed`, which
reads a results store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import pandas as pd

DRIFT_THRESHOLD = 0.10
SPEED_KINDS = ("speedup", "throughput", "latency_ms", "baseline_throughput", "baseline_latency_ms")
PAIRED_COLUMNS = ("trial_id", "number", "speedup", "speedup_bs1", "throughput", "latency_ms", "raw_throughput",
                  "raw_latency_ms", "baseline_throughput", "baseline_latency_ms", "basis")
FLAG_COLUMNS = ("trial_id", "number", "loaded", "load_reasons", "baseline_drift", "baseline_latency_drift",
                "flagged", "reason")


# ----------------------------------------------------------------------------- the reference
@dataclass(frozen=True)
class ReferencePoint:
    """One reference figure: img/s (throughput) or ms per batch-1 forward (latency), and where it was measured."""

    value: float
    batch_size: int
    dtype: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "dtype": self.dtype, "device": self.device, "value": self.value}

    @classmethod
    def from_dict(cls, data: Any, name: str) -> "ReferencePoint":
        if not isinstance(data, Mapping):
            raise ValueError(f"reference.{name}: {data!r} is not a mapping with batch_size, dtype, device, value")
        value = data.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"reference.{name}.value: {value!r} is not a positive number")
        batch = data.get("batch_size")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"reference.{name}.batch_size: {batch!r} is not an integer >= 1")
        for key in ("dtype", "device"):
            if not isinstance(data.get(key), str) or not data.get(key):
                raise ValueError(f"reference.{name}.{key}: {data.get(key)!r} is not a non-empty string")
        return cls(float(value), batch, data["dtype"], data["device"])


@dataclass(frozen=True)
class Reference:
    """A study's reference baseline: throughput at the study's batch, batch-1 latency (None when latency is
    off), when it was measured (ISO 8601), and the raw record of the measurement (``extra``: contention,
    windows, threads)."""

    throughput: ReferencePoint
    latency_ms: ReferencePoint | None
    measured: str
    extra: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"throughput": self.throughput.to_dict(),
               "latency_ms": self.latency_ms.to_dict() if self.latency_ms else None, "measured": self.measured}
        out.update(dict(self.extra or {}))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Reference":
        """Parse the stored form; ValueError naming the field when it is malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"reference: {data!r} is not a mapping with throughput, latency_ms, measured")
        tp = ReferencePoint.from_dict(data.get("throughput"), "throughput")
        lat = data.get("latency_ms")
        lat_point = ReferencePoint.from_dict(lat, "latency_ms") if lat is not None else None
        measured = data.get("measured")
        if not isinstance(measured, str):
            raise ValueError(f"reference.measured: {measured!r} is not an ISO 8601 time")
        extra = {k: v for k, v in data.items() if k not in ("throughput", "latency_ms", "measured")}
        return cls(tp, lat_point, measured, extra or None)

    @classmethod
    def from_results(cls, results: list[Any], batch_size: int, note: Mapping[str, Any] | None = None) -> "Reference":
        """From `measure_throughput` results of the unreduced baseline (batch ``batch_size``, and batch 1 when
        latency is measured). ValueError when the study's batch did not measure."""
        ok = [r for r in results if r.ok]
        tp = next((r for r in ok if r.requested_batch_size == batch_size), None)
        if tp is None:
            failed = next((r for r in results if r.requested_batch_size == batch_size), None)
            why = f"{failed.status}: {failed.error}" if failed is not None else "not measured"
            raise ValueError(f"reference: the baseline at batch {batch_size} did not measure ({why})")
        lat = next((r for r in ok if r.requested_batch_size == 1), None)
        extra = {"windows": tp.windows, "threads": tp.threads,
                 "contention": {str(r.batch_size): r.contention.to_dict() for r in (tp, lat)
                                if r is not None and r.contention is not None},
                 **dict(note or {})}
        return cls(ReferencePoint(float(tp.images_per_s), tp.batch_size, tp.dtype, tp.device),
                   ReferencePoint(float(lat.latency_ms), 1, lat.dtype, lat.device) if lat is not None else None,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"), extra)

    @property
    def loaded(self) -> bool:
        """Was the machine loaded while the reference itself was measured?"""
        return any(bool(c.get("loaded")) for c in ((self.extra or {}).get("contention") or {}).values())


def as_reference(reference: Reference | Mapping[str, Any] | None) -> Reference | None:
    """A `Reference` from a Reference, its dict, or None (None stays None)."""
    if reference is None or isinstance(reference, Reference):
        return reference
    return Reference.from_dict(reference)


def reference_from_settings(settings: Mapping[str, Any] | None) -> Reference | None:
    """The reference stored in a study's settings: the results store's ``Study.settings`` or the dict of
    ``study.json`` (both hold it under ``"reference"``). None when the study has none (older studies)."""
    if not settings:
        return None
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings: {type(settings).__name__} is not a mapping")
    ref = settings.get("reference")
    return Reference.from_dict(ref) if ref is not None else None


def paired_value(kind: str, speedup: float, reference: Reference | Mapping[str, Any]) -> float | None:
    """The paired speed of one trial: ``throughput`` = speedup x reference img/s; ``latency_ms`` = reference
    ms / batch-1 speedup. None when the reference has no latency or the speed-up is not positive."""
    ref = as_reference(reference)
    if ref is None or not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0):
        return None
    if kind == "throughput":
        return speedup * ref.throughput.value
    if kind == "latency_ms":
        return ref.latency_ms.value / speedup if ref.latency_ms is not None else None
    raise ValueError(f"kind: {kind!r}; allowed: throughput, latency_ms")


# ----------------------------------------------------------------------------- frames
def _speed_rows(frame: pd.DataFrame, ref: Reference | None) -> pd.DataFrame:
    if frame is None or frame.empty:
        return pd.DataFrame(columns=["trial_id", "number", "kind", "value", "batch_size", "extra"])
    missing = [c for c in ("trial_id", "number", "kind", "value", "batch_size") if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing column {missing[0]!r}; pass ResultsStore.measurements_frame(...)")
    rows = frame[frame["kind"].isin(SPEED_KINDS)]
    if ref is not None:  # the reference's dtype and device only (a study measures on one)
        point = ref.throughput
        for col in ("dtype", "device"):
            if col in rows.columns:
                rows = rows[rows[col].isna() | (rows[col] == getattr(point, col))]
    return rows


def _last(rows: pd.DataFrame, kind: str, batch: Any) -> pd.Series:
    """Per trial_id, the newest value of ``kind`` at batch ``batch`` (a number, or 'large': any batch > 1,
    the largest)."""
    sel = rows[rows["kind"] == kind]
    if batch == "large":
        sel = sel[sel["batch_size"].fillna(0) > 1].sort_values("batch_size", kind="stable")
    else:
        sel = sel[sel["batch_size"] == batch]
    return sel.groupby("trial_id")["value"].last().astype("float64")


def paired_speed(frame: pd.DataFrame, reference: Reference | Mapping[str, Any] | None) -> pd.DataFrame:
    """Plotted speeds per trial from a long measurements frame (`ResultsStore.measurements_frame`).

    Columns (`PAIRED_COLUMNS`), one row per trial with a speed measurement, ordered by trial number:
    ``speedup`` (at the reference batch), ``speedup_bs1``, ``throughput`` = speedup x reference img/s,
    ``latency_ms`` = reference ms / speedup_bs1, the raw ``raw_throughput`` / ``raw_latency_ms`` and the
    ``baseline_throughput`` / ``baseline_latency_ms`` measured beside them, and ``basis``: "paired", or
    "raw" when there is no reference (then throughput / latency_ms are the raw figures).
    """
    ref = as_reference(reference)
    rows = _speed_rows(frame, ref)
    if rows.empty:
        return pd.DataFrame(columns=list(PAIRED_COLUMNS))
    batch = ref.throughput.batch_size if ref is not None else "large"
    numbers = rows.groupby("trial_id")["number"].first()
    out = pd.DataFrame({"trial_id": numbers.index.astype("int64"), "number": numbers.to_numpy()})
    out = out.set_index("trial_id", drop=False)
    out["speedup"] = _last(rows, "speedup", batch)
    out["speedup_bs1"] = _last(rows, "speedup", 1)
    out["raw_throughput"] = _last(rows, "throughput", batch)
    out["raw_latency_ms"] = _last(rows, "latency_ms", 1)
    out["baseline_throughput"] = _last(rows, "baseline_throughput", batch)
    out["baseline_latency_ms"] = _last(rows, "baseline_latency_ms", 1)
    if ref is not None:
        out["throughput"] = out["speedup"] * ref.throughput.value
        out["latency_ms"] = (ref.latency_ms.value / out["speedup_bs1"].where(out["speedup_bs1"] > 0)
                             if ref.latency_ms is not None else float("nan"))
        out["basis"] = "paired"
    else:
        out["throughput"], out["latency_ms"], out["basis"] = out["raw_throughput"], out["raw_latency_ms"], "raw"
    return out[list(PAIRED_COLUMNS)].sort_values("number", kind="stable").reset_index(drop=True)


def _contention_of(extra: Any) -> tuple[bool, list[str]]:
    if not isinstance(extra, Mapping):
        return False, []
    c = extra.get("contention")
    if isinstance(c, Mapping):
        return bool(c.get("loaded")), [str(r) for r in c.get("reasons") or []]
    return bool(extra.get("loaded")), []


def drift_flags(frame: pd.DataFrame, reference: Reference | Mapping[str, Any] | None,
                threshold: float = DRIFT_THRESHOLD) -> pd.DataFrame:
    """Which trials' speeds to doubt, from a long measurements frame and the study's reference.

    Columns (`FLAG_COLUMNS`), one row per trial with a speed measurement, ordered by trial number:
    ``loaded`` (any of its timings has ``extra.contention.loaded``), ``load_reasons`` (the first loaded
    timing's reasons and how many of the trial's timings were loaded), ``baseline_drift`` = baseline img/s beside the trial / reference img/s - 1 and
    ``baseline_latency_drift`` = reference ms / baseline ms - 1 (both signed: negative = the baseline ran
    slower than at study start; NaN without a reference), ``flagged`` = loaded or |either drift| >
    ``threshold``, and ``reason``: why, in a few words ("" when not flagged).
    """
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold > 0):
        raise ValueError(f"threshold: {threshold!r} is not a positive fraction (0.10 = 10%)")
    ref = as_reference(reference)
    rows = _speed_rows(frame, ref)
    if rows.empty:
        return pd.DataFrame(columns=list(FLAG_COLUMNS))
    numbers = rows.groupby("trial_id")["number"].first()
    out = pd.DataFrame({"trial_id": numbers.index.astype("int64"), "number": numbers.to_numpy()})
    out = out.set_index("trial_id", drop=False)
    timed: dict[int, int] = {}
    loaded: dict[int, int] = {}
    reasons: dict[int, list[str]] = {}
    extras = rows["extra"] if "extra" in rows.columns else [None] * len(rows)
    for tid, kind, extra in zip(rows["trial_id"], rows["kind"], extras):
        if kind == "speedup":  # its extra only repeats the verdict of the two timings it divides
            continue
        is_loaded, why = _contention_of(extra)
        timed[tid] = timed.get(tid, 0) + 1
        loaded[tid] = loaded.get(tid, 0) + is_loaded
        if is_loaded and tid not in reasons:
            reasons[tid] = why  # the first loaded timing's reasons speak for the trial
    out["loaded"] = [loaded.get(t, 0) > 0 for t in out.index]
    out["load_reasons"] = [f"{'; '.join(reasons.get(t, []))} (in {loaded[t]} of {timed[t]} timings)"
                           if loaded.get(t, 0) else "" for t in out.index]
    nan = float("nan")
    if ref is not None:
        out["baseline_drift"] = _last(rows, "baseline_throughput", ref.throughput.batch_size) / ref.throughput.value - 1
        out["baseline_latency_drift"] = (ref.latency_ms.value / _last(rows, "baseline_latency_ms", 1) - 1
                                         if ref.latency_ms is not None else nan)
    else:
        out["baseline_drift"], out["baseline_latency_drift"] = nan, nan
    out["baseline_drift"] = out["baseline_drift"].astype("float64")
    out["baseline_latency_drift"] = out["baseline_latency_drift"].astype("float64")
    flagged, why_all = [], []
    for t in out.itertuples():
        why = []
        if t.loaded:
            why.append(f"measured under load ({t.load_reasons})" if t.load_reasons else "measured under load")
        for value, what in ((t.baseline_drift, "throughput"), (t.baseline_latency_drift, "batch-1 speed")):
            if value == value and abs(value) > threshold:  # NaN never flags
                why.append(f"baseline {what} {abs(value):.0%} {'below' if value < 0 else 'above'} the reference")
        flagged.append(bool(why))
        why_all.append("; ".join(why))
    out["flagged"], out["reason"] = flagged, why_all
    return out[list(FLAG_COLUMNS)].sort_values("number", kind="stable").reset_index(drop=True)


def study_speed(store: Any, study: Any) -> tuple[Reference | None, pd.DataFrame]:
    """Reference and per-trial speeds of one study in a results store (`paired_speed` joined with
    `drift_flags` on trial_id and number)."""
    row = store.open_study(study) if isinstance(study, str) else study
    ref = reference_from_settings(row.settings)
    frame = store.measurements_frame(row)
    speeds = paired_speed(frame, ref)
    flags = drift_flags(frame, ref)
    return ref, speeds.merge(flags, on=["trial_id", "number"], how="left")
