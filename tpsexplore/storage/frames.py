"""pandas views of the results store: column naming of pivoted measurements and the frame builders.

A measurement becomes the wide column ``kind@qualifier``; the qualifier joins, with ``/``, the fidelity
(if any) and then ``bs<batch_size>``, dtype and device (each if set). Examples: ``gmacs@analytic``,
``accuracy_top1@finetuned``, ``throughput@bs64/fp32/cpu``. A measurement with none of these is just ``kind``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

TRIAL_COLUMNS = ("trial_id", "study", "number", "method", "label", "state", "reason", "started", "finished",
                 "duration_s", "worker", "host", "feasible", "analytic_gmacs", "constraint_value",
                 "optuna_trial_id")
FLOAT_COLUMNS = ("duration_s", "analytic_gmacs", "constraint_value")
INT_COLUMNS = ("trial_id", "number")
MEASUREMENT_COLUMNS = ("measurement_id", "trial_id", "study", "number", "method", "label", "kind", "value",
                       "unit", "batch_size", "dtype", "device", "fidelity", "provenance", "column", "extra",
                       "environment_id", "environment_hash", "created")


def measurement_column(kind: str, fidelity: str | None = None, batch_size: int | None = None,
                       dtype: str | None = None, device: str | None = None) -> str:
    """Name of the ``trials_frame`` column that holds measurements with these attributes."""
    parts = [p for p in (fidelity, None if batch_size is None else f"bs{batch_size}", dtype, device) if p]
    return f"{kind}@{'/'.join(parts)}" if parts else kind


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Flatten nested dicts into ``prefix.key.subkey`` entries; lists become tuples (hashable cells)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}", sub))
        return out
    if isinstance(value, list):
        return {prefix: tuple(_freeze(v) for v in value)}
    return {prefix: value}


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def build_trials_frame(trials: Iterable[Mapping[str, Any]], measurements: Iterable[Mapping[str, Any]]
                       ) -> pd.DataFrame:
    """One row per trial: trial fields, ``time.<phase>`` durations, ``config_json`` (the stored config, JSON text:
    read it back with ``ReductionConfig.from_json``), ``config.<key>`` (the same config flattened, for tables) and
    pivoted measurements.

    ``trials`` carry the TRIAL_COLUMNS plus ``config`` and ``durations`` dicts; ``measurements`` carry
    ``trial_id``, ``column`` and ``value``, ordered oldest first: for repeated measurements with the same
    column the newest one wins.
    """
    rows = []
    for t in trials:
        row = {c: t.get(c) for c in TRIAL_COLUMNS}
        row.update(flatten("time", t.get("durations") or {}))
        row["config_json"] = json.dumps(t.get("config") or {}, sort_keys=True)
        row.update(flatten("config", t.get("config") or {}))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else [*TRIAL_COLUMNS, "config_json"])
    for col in FLOAT_COLUMNS:
        frame[col] = frame[col].astype("float64")
    for col in INT_COLUMNS:
        frame[col] = frame[col].astype("int64")
    frame["optuna_trial_id"] = frame["optuna_trial_id"].astype("Int64")
    meas = pd.DataFrame(list(measurements), columns=["trial_id", "column", "value"])
    if not meas.empty and not frame.empty:
        meas = meas.drop_duplicates(["trial_id", "column"], keep="last")
        wide = meas.pivot(index="trial_id", columns="column", values="value")
        wide = wide[sorted(wide.columns)]
        wide.columns.name = None
        frame = frame.merge(wide, how="left", left_on="trial_id", right_index=True)
    return frame.reset_index(drop=True)


def build_measurements_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Long format: one row per measurement with its trial's study/number/method/label and its pivot column."""
    return pd.DataFrame([{c: r.get(c) for c in MEASUREMENT_COLUMNS} for r in rows],
                        columns=list(MEASUREMENT_COLUMNS))
