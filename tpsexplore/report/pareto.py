"""Pareto fronts and hypervolume of trial tables (pure pandas/numpy, no plotting).

Objectives are given as ``{"column": "max" | "min"}`` (``maximize``/``minimize`` are accepted too), as a
list of ``"column:maximize"`` strings (the form studies store) or as ``(column, direction)`` pairs.
Rows with a missing value in any objective take no part in a front.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd

Objectives = Union[Mapping[str, str], Sequence[str], Sequence[tuple[str, str]]]

_DIRECTIONS = {"max": "max", "maximize": "max", "maximise": "max", "min": "min", "minimize": "min",
               "minimise": "min"}


def parse_objectives(objectives: Objectives) -> list[tuple[str, str]]:
    """Normalise ``objectives`` to ``[(column, 'max'|'min'), ...]``; ValueError naming a bad entry."""
    if isinstance(objectives, str):
        objectives = [objectives]
    items: Iterable[Any] = objectives.items() if isinstance(objectives, Mapping) else objectives
    out: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            name, sep, direction = item.rpartition(":")
            if not sep:
                raise ValueError(f"objectives: {item!r} has no direction; write 'column:maximize' or "
                                 "'column:minimize'")
        else:
            try:
                name, direction = item
            except (TypeError, ValueError):
                raise ValueError(f"objectives: {item!r} is not a (column, direction) pair") from None
        d = _DIRECTIONS.get(str(direction).strip().lower())
        if d is None:
            raise ValueError(f"objectives: direction {direction!r} of {name!r}; allowed: max, min, maximize, "
                             "minimize")
        out.append((str(name), d))
    if not out:
        raise ValueError("objectives: at least one objective is needed")
    return out


def _signed(df: pd.DataFrame, objectives: list[tuple[str, str]]) -> np.ndarray:
    """Objective values turned into 'larger is better' (minimised columns negated)."""
    missing = [c for c, _ in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"objectives: column {missing[0]!r} is not in the table; columns: "
                         f"{', '.join(map(str, df.columns))}")
    vals = np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c, _ in objectives]) \
        if len(df) else np.zeros((0, len(objectives)))
    signs = np.array([1.0 if d == "max" else -1.0 for _, d in objectives])
    return vals * signs


def pareto_mask(df: pd.DataFrame, objectives: Objectives) -> pd.Series:
    """Boolean Series over ``df.index``: True for rows no other row dominates (NaN rows are False).

    Row a dominates row b when a is at least as good in every objective and better in one. Rows with
    equal objective values do not dominate each other, so duplicates are all on the front.
    """
    objs = parse_objectives(objectives)
    vals = _signed(df, objs)
    ok = np.isfinite(vals).all(axis=1) if len(df) else np.zeros(0, dtype=bool)
    mask = np.zeros(len(df), dtype=bool)
    idx = np.flatnonzero(ok)
    pts = vals[idx]
    for j, p in zip(idx, pts):
        ge = (pts >= p).all(axis=1)
        gt = (pts > p).any(axis=1)
        mask[j] = not (ge & gt).any()
    return pd.Series(mask, index=df.index, name="pareto")


def pareto_front(df: pd.DataFrame, objectives: Objectives) -> pd.DataFrame:
    """The Pareto-optimal rows of ``df`` (a copy), sorted by the first objective ascending.

    Example: ``pareto_front(df, {"gmacs@analytic": "min", "accuracy_top1@finetuned": "max"})``.
    """
    objs = parse_objectives(objectives)
    front = df.loc[pareto_mask(df, objs)].copy()
    return front.sort_values([c for c, _ in objs], kind="stable")


# ----------------------------------------------------------------------------- hypervolume
def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` (n, d) and bounded by ``reference`` (d,), all objectives maximised.

    Points not strictly better than the reference in every objective add nothing. Exact: a sweep in 2-D,
    slicing on the first objective above that (fine for the fronts of a study: tens of points).
    """
    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    pts = pts[np.isfinite(pts).all(axis=1)]
    pts = pts[(pts > ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(_hv(pts, ref))


def _hv(pts: np.ndarray, ref: np.ndarray) -> float:
    d = pts.shape[1]
    if d == 1:
        return float(pts[:, 0].max() - ref[0])
    if d == 2:
        order = np.argsort(-pts[:, 0], kind="stable")
        total, best_y = 0.0, ref[1]
        for x, y in pts[order]:
            if y > best_y:
                total += (x - ref[0]) * (y - best_y)
                best_y = y
        return total
    # slice along the first objective: between consecutive x levels the dominated set is fixed
    xs = np.unique(pts[:, 0])[::-1]
    total = 0.0
    for i, x in enumerate(xs):
        lower = xs[i + 1] if i + 1 < len(xs) else ref[0]
        sub = pts[pts[:, 0] >= x][:, 1:]
        total += (x - lower) * _hv(sub, ref[1:])
    return total


def hypervolume_history(df: pd.DataFrame, objectives: Objectives, order_by: str = "number",
                        reference: Sequence[float] | None = None) -> pd.DataFrame:
    """Hypervolume of the front of the first k rows (in ``order_by`` order), for every k.

    Objectives are scaled to [0, 1] by the range over all rows (so the volume is unit-free and at most 1);
    the default reference is the worst value of each objective over all rows. Returns columns
    ``order_by`` and ``hypervolume`` (rows with missing objectives keep the previous value).
    """
    objs = parse_objectives(objectives)
    data = df.sort_values(order_by, kind="stable") if order_by in df.columns else df
    vals = _signed(data, objs)
    finite = np.isfinite(vals).all(axis=1)
    if not finite.any():
        return pd.DataFrame({order_by: data[order_by].to_numpy() if order_by in data else [],
                             "hypervolume": np.zeros(len(data))})
    lo = vals[finite].min(axis=0)
    hi = vals[finite].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = (vals - lo) / span
    if reference is None:
        ref = np.zeros(len(objs)) - 1e-9
    else:
        signs = np.array([1.0 if d == "max" else -1.0 for _, d in objs])
        ref = (np.asarray(reference, dtype=float) * signs - lo) / span
    hv, out = 0.0, []
    for k in range(len(data)):
        if finite[k]:
            hv = hypervolume(scaled[: k + 1][finite[: k + 1]], ref)
        out.append(hv)
    keys = data[order_by].to_numpy() if order_by in data.columns else np.arange(len(data))
    return pd.DataFrame({order_by: keys, "hypervolume": out})
