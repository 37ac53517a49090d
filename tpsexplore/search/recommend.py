"""The recommended config of a study, chosen once for the search's closing summary and for the report.

Rule: among the complete trials within the budget, take the most accurate (the *best*); every trial whose
exact McNemar test against the best gives p >= alpha (0.05) is statistically indistinguishable from it, and
of those the cheapest (fewest GMACs) is recommended. Where the confirmation stage has run (accuracy
measurements of fidelity ``confirmed``: the mean over several fine-tune seeds), the candidates are the
confirmed trials and the accuracies their means: a single fine-tune's lucky seed cannot win then.

Everything here is a pure function over `TrialRecord`, a small typed view of one trial that both sides build
from the same measurement records (dicts with kind, value, fidelity, batch_size, extra): the search from its
Optuna trials (`records_from_trials`), the report from the results store (`tpsexplore.report.frame`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..stats import (Accuracy, PairedDifference, PairedTest, decimals_for, format_accuracy, format_difference,
                     mcnemar, median_spread, p_text, paired_difference)
from .confirm import FIDELITY as CONFIRMED
from .confirm import ConfirmedAccuracy, confirmed_accuracy, format_confirmed

ALPHA = 0.05


# ----------------------------------------------------------------------------- typed views of measurements
def pooled(c: ConfirmedAccuracy, k: int | None = None) -> Accuracy:
    """The first ``k`` seeds' outcomes of a confirmed trial as one `Accuracy` over k x n (seed, image) pairs."""
    bits = list(c.bits) if len(c.bits) == c.count and all(b is not None for b in c.bits) else []
    k = len(bits) if k is None else k
    if k < 1 or k > len(bits):
        raise ValueError(f"seeds: {k} seeds asked for, {len(bits)} stored with per-image correctness")
    tag = f"{c.eval_set}x{k}" if c.eval_set else None
    return Accuracy.from_bits(np.concatenate(bits[:k]), tag)


@dataclass(frozen=True)
class Speed:
    """A trial's paired speed-up (reduced / baseline measured side by side) with its spread.

    median/low/high: the speed-up and its range (over the measurement windows); batch_size: of the
    measurement; spread: how the range was obtained; reference: the study's reference baseline img/s (when
    known), so ``median * reference`` is the trial's throughput at the reference.
    """

    median: float
    low: float
    high: float
    batch_size: int | None = None
    spread: str = "one measurement"
    reference: float | None = None

    @property
    def at_reference(self) -> float | None:
        return None if self.reference is None else self.median * self.reference

    def text(self) -> str:
        d = 2 if self.median < 10 else 1
        if self.high - self.low > 0:
            rng = f" (range {self.low:.{d}f}-{self.high:.{d}f}, {self.spread})"
        else:
            rng = f" ({self.spread})"
        bs = f" at batch {self.batch_size}" if self.batch_size else ""
        ref = f"; {self.at_reference:.0f} img/s at the reference baseline" if self.at_reference else ""
        return f"{self.median:.{d}f}x{bs}{rng}{ref}"


@dataclass(frozen=True)
class TrialRecord:
    """What the recommendation needs to know about one complete trial.

    accuracy: top-1 at the study's fidelity (counts, interval, per-image bits; None when not stored with
    counts); top1: that top-1 as a fraction (also for old records without counts); confirmed: the confirmed
    accuracy, if any; cost: GMACs (analytic); speed: the paired speed-up, if measured.
    """

    number: int
    label: str
    variant: str
    cost: float | None
    within_budget: bool
    is_baseline: bool
    top1: float | None
    accuracy: Accuracy | None = None
    confirmed: ConfirmedAccuracy | None = None
    speed: Speed | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    def value(self, basis: str | None = None) -> float | None:
        """Top-1 (fraction) on ``basis``: ``confirmed`` (the mean over seeds) or the study's fidelity."""
        if basis == CONFIRMED:
            return None if self.confirmed is None else self.confirmed.mean
        return self.accuracy.value if self.accuracy is not None else self.top1


def accuracy_of(measurements: Iterable[Mapping[str, Any]], fidelity: str,
                kind: str = "accuracy_top1") -> tuple[float | None, Accuracy | None]:
    """(value, Accuracy) of the newest ``kind`` measurement at ``fidelity`` (Accuracy None without counts)."""
    found = [m for m in measurements if m.get("kind") == kind and m.get("fidelity") == fidelity
             and _finite(m.get("value"))]
    if not found:
        return None, None
    m = found[-1]
    return float(m["value"]), Accuracy.from_extra(_extra(m))


def confirmed_of(measurements: Iterable[Mapping[str, Any]]) -> ConfirmedAccuracy | None:
    """The newest confirmed top-1 (`confirm.confirmed_accuracy`) among a trial's measurements."""
    found = [m for m in measurements if m.get("kind") == "accuracy_top1" and m.get("fidelity") == CONFIRMED]
    return confirmed_accuracy(_extra(found[-1])) if found else None


def speed_of(measurements: Sequence[Mapping[str, Any]], reference: float | None = None) -> Speed | None:
    """The paired speed-up at the largest measured batch (batch 1 when that is all), with its spread.

    Spread, best first: the adjacent window-pair ratios the speed-up is the median of (``extra["window_ratios"]``,
    `measure_pair`); the per-window speed-ups when the record has them (``extra["values"]`` or
    ``extra["window_speedups"]``); else the model's slowest and fastest window over the paired baseline's
    median (``images_per_s_min``/``_max`` of the throughput record beside it); else the one value.
    """
    sps = [m for m in measurements if m.get("kind") == "speedup" and _finite(m.get("value"))]
    if not sps:
        return None
    bs = max(int(m.get("batch_size") or 0) for m in sps)
    m = [s for s in sps if int(s.get("batch_size") or 0) == bs][-1]
    extra = _extra(m)
    value = float(m["value"])
    reference = reference if bs > 1 else None  # the reference is a throughput at the study's (large) batch
    ratios = extra.get("window_ratios")
    if isinstance(ratios, (list, tuple)) and ratios:
        _, lo, hi = median_spread(ratios)
        return Speed(value, min(value, lo), max(value, hi), bs or None,
                     f"lowest-highest of {len(ratios)} window-pair ratios", reference)
    windows = extra.get("values") or extra.get("window_speedups")
    if isinstance(windows, (list, tuple)) and windows:
        med, lo, hi = median_spread(windows)
        return Speed(med, lo, hi, bs or None, f"median of {len(windows)} windows", reference)
    kind = "throughput" if bs != 1 else "latency_ms"
    twin = [t for t in measurements if t.get("kind") == kind and int(t.get("batch_size") or 0) == bs
            and t.get("dtype") == m.get("dtype")]
    base = extra.get("baseline_images_per_s")
    if twin and _finite(base) and float(base) > 0:
        te = _extra(twin[-1])
        lo, hi = te.get("images_per_s_min"), te.get("images_per_s_max")
        if _finite(lo) and _finite(hi):
            n = te.get("windows")
            what = f"{n} window{'s' if n != 1 else ''}" if isinstance(n, int) else "the windows"
            return Speed(value, min(value, float(lo) / float(base)), max(value, float(hi) / float(base)), bs or None,
                         f"slowest-fastest of {what} over the paired baseline", reference)
    return Speed(value, value, value, bs or None, "one measurement", reference)


def build_record(number: int, measurements: Sequence[Mapping[str, Any]], *, fidelity: str, label: str = "",
                 variant: str = "", cost: float | None = None, within_budget: bool = False,
                 is_baseline: bool = False, config: Mapping[str, Any] | None = None,
                 reference: float | None = None) -> TrialRecord:
    """A `TrialRecord` from one trial's measurement records (the same dicts in Optuna and in the store)."""
    top1, acc = accuracy_of(measurements, fidelity)
    return TrialRecord(int(number), str(label), str(variant), None if not _finite(cost) else float(cost),
                       bool(within_budget), bool(is_baseline), top1, acc, confirmed_of(measurements),
                       speed_of(measurements, reference), dict(config or {}))


def records_from_trials(trials: Sequence[Any], fidelity: str, reference: float | None = None,
                        confirmed: Mapping[int, ConfirmedAccuracy] | None = None) -> list[TrialRecord]:
    """`TrialRecord`s of the complete Optuna trials of a search (their user attributes, see `backend`).

    ``confirmed``: trial number -> its confirmation (the confirmation stage writes those to the results store
    only, `confirm.confirmed_from_store`).
    """
    from optuna.trial import TrialState

    from .backend import info, record, role

    confirmed = confirmed or {}
    out = []
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        variant = info(t, "variant", "?")
        baseline = variant == "baseline" or role(t) == "baseline"
        r = build_record(t.number, record(t, "measurements") or [], fidelity=fidelity,
                         label=info(t, "label", "?"), variant=variant, cost=info(t, "gmacs"),
                         within_budget=bool(info(t, "feasible")) and not baseline, is_baseline=baseline,
                         config=info(t, "config") or {}, reference=reference)
        if t.number in confirmed:
            r = replace(r, confirmed=confirmed[t.number])
        out.append(r)
    return out


def summarise_search(trials: Sequence[Any], fidelity: str, study_dir: Any, study_name: str,
                     baseline_gmacs: float | None = None) -> tuple[list[str], dict[int, dict[str, Any]]]:
    """The search's closing headline and, per complete trial, ``{"accuracy": Accuracy, "vs_best": text}`` for
    its front table. Reads the reference baseline from the study's manifest and the confirmations from its
    results store (`tpsexplore.manifest.StudyLayout`; both written by the search; missing ones are not used)."""
    from ..manifest import StudyLayout, read_reference
    from .drift import reference_from_settings

    layout = StudyLayout(study_dir)
    try:
        ref = reference_from_settings({"reference": read_reference(layout)})
    except ValueError:
        ref = None
    confirmed: dict[int, ConfirmedAccuracy] = {}
    if layout.results_db.is_file():
        from ..storage import ResultsStore
        from .confirm import confirmed_from_store

        try:
            with ResultsStore(layout.results_db) as store:
                confirmed = confirmed_from_store(store, study_name)
        except ValueError:  # no such study in the store yet
            confirmed = {}
    records = records_from_trials(trials, fidelity, ref.throughput.value if ref else None, confirmed)
    best, tests = tests_against_best(records)
    marks: dict[int, dict[str, Any]] = {}
    for r in records:
        t = tests.get(r.number)
        vs = "" if r.number not in tests else "most accurate" if best is not None and r.number == best.number \
            else "untested" if t is None else f"{'~' if not t.significant() else '<'} ({p_text(t.p_value)})"
        marks[r.number] = {"accuracy": r.accuracy, "vs_best": vs}
    rec = recommend(records, fidelity)
    if rec is None:
        return ["Recommended config: none (no complete reduced trial is within the budget)"], marks
    rows = rec.headline(layout.root, baseline_gmacs)
    width = max(len(k) for k, _ in rows)
    lines = ["Recommended config (rule: most accurate within budget; among trials an exact McNemar test cannot "
             "tell apart from it, the cheapest):"]
    lines += [f"  {k:<{width}} : {v}" for k, v in rows]
    lines += [f"  note: {n}" for n in rec.notes]
    return lines, marks


def accuracy_cell(acc: Accuracy | None, value: float | None = None) -> str:
    """'93.4 [92.6, 94.1]' (percent; the interval's digits); the bare value to 1 decimal without counts."""
    if acc is None:
        return "" if value is None or not math.isfinite(value) else f"{100 * value:.1f} (no n stored)"
    lo, hi = acc.interval
    d = decimals_for(acc.half_width)
    return f"{100 * acc.value:.{d}f} [{100 * lo:.{d}f}, {100 * hi:.{d}f}]"


# ----------------------------------------------------------------------------- paired comparisons
def paired_accuracies(a: TrialRecord, b: TrialRecord, basis: str | None = None) -> tuple[Accuracy, Accuracy]:
    """The two `Accuracy` objects a paired test of ``a`` and ``b`` compares on ``basis``.

    ``confirmed``: both trials' confirmed seeds, paired seed by seed (as many seeds as the shorter has);
    otherwise the study-fidelity evaluation of each. ValueError (one line) when per-image correctness is
    missing.
    """
    if basis == CONFIRMED:
        for r in (a, b):
            if r.confirmed is None or not r.confirmed.bits or any(x is None for x in r.confirmed.bits):
                raise ValueError(f"accuracy: trial {r.number} has no confirmed per-image correctness")
        k = min(a.confirmed.count, b.confirmed.count)
        return pooled(a.confirmed, k), pooled(b.confirmed, k)
    for r in (a, b):
        if r.accuracy is None or r.accuracy.bits is None:
            raise ValueError(f"accuracy: trial {r.number} has no per-image correctness stored, so no paired "
                             "test is possible")
    return a.accuracy, b.accuracy


def compare(a: TrialRecord, b: TrialRecord, basis: str | None = None) -> PairedDifference:
    """acc(a) - acc(b) with Newcombe's interval and the exact McNemar test (same images required)."""
    x, y = paired_accuracies(a, b, basis)
    return paired_difference(x, y)


# ----------------------------------------------------------------------------- the recommendation
@dataclass(frozen=True)
class Contender:
    """A within-budget trial and its test against the best (None for the best itself, or untestable)."""

    record: TrialRecord
    test: PairedTest | None
    indistinguishable: bool


@dataclass(frozen=True)
class Recommendation:
    """The recommended trial, how it was chosen, and its comparison with the unreduced baseline."""

    chosen: TrialRecord
    best: TrialRecord
    basis: str  # "confirmed" or the study's fidelity ("finetuned", "zero_shot")
    candidates: tuple[Contender, ...]
    baseline: TrialRecord | None
    drop: PairedDifference | None  # chosen - baseline
    drop_basis: str | None
    alpha: float = ALPHA
    notes: tuple[str, ...] = ()

    @property
    def indistinguishable(self) -> list[int]:
        """Trial numbers not distinguishable from the best (the best included), cheapest first."""
        tied = [c.record for c in self.candidates if c.indistinguishable]
        return [r.number for r in sorted(tied, key=_cost_key)]

    def test_of(self, number: int) -> PairedTest | None:
        return next((c.test for c in self.candidates if c.record.number == number), None)

    def export_command(self, study_dir: Any) -> str:
        return f"tpsexplore export {study_dir} --trial {self.chosen.number} -o config.json"

    def headline(self, study_dir: Any = "STUDY_DIR", baseline_gmacs: float | None = None) -> list[tuple[str, str]]:
        """(field, text) rows: recommended, why, baseline, accuracy drop, speed-up, export."""
        c = self.chosen
        rows = [("recommended", f"trial {c.number}: {_name(c)}, {_cost_text(c.cost, baseline_gmacs)}")]
        rows.append(("top-1", _accuracy_text(c, self.basis)))
        if c.number == self.best.number:
            tied = [n for n in self.indistinguishable if n != c.number]
            why = f"the most accurate within the budget ({_basis_text(self.basis)})"
            if tied:
                which = f"trial {tied[0]} is" if len(tied) == 1 else f"trials {', '.join(map(str, tied))} are"
                why += (f"; {which} not distinguishable from it (McNemar p >= {self.alpha:g}) but not "
                        "cheaper")
            else:
                why += f"; every other within-budget trial is significantly worse (McNemar p < {self.alpha:g})" \
                    if len(self.candidates) > 1 else "; the only within-budget trial"
        else:
            test = self.test_of(c.number)
            why = (f"not distinguishable from the most accurate, trial {self.best.number} "
                   f"({_accuracy_text(self.best, self.basis, short=True)}; McNemar {p_text(test.p_value)} "
                   f"{_test_text(self.basis)}), "
                   f"and cheaper ({_cost_text(c.cost, baseline_gmacs)} vs {_cost_text(self.best.cost, baseline_gmacs)})")
        rows.append(("chosen because", why))
        if self.baseline is not None:
            b = self.baseline
            rows.append(("baseline", f"trial {b.number} (no reduction): "
                                     f"{_accuracy_text(b, self.drop_basis or self.basis)}"))
        else:
            rows.append(("baseline", "no unreduced baseline trial completed"))
        if self.drop is not None:
            diff = format_difference(self.drop).replace("p=<", "p<")
            rows.append(("accuracy vs baseline", f"{diff} ({_basis_text(self.drop_basis)})"))
        elif self.baseline is not None:
            bv, cv = self.baseline.value(self.drop_basis), c.value(self.drop_basis)
            diff = f"{100 * (cv - bv):+.1f} pts" if bv is not None and cv is not None else "unknown"
            rows.append(("accuracy vs baseline", f"{diff} (no per-image correctness stored: no interval)"))
        rows.append(("speed-up", c.speed.text() if c.speed is not None else "not measured"))
        rows.append(("export", self.export_command(study_dir)))
        return rows


def tests_against_best(records: Sequence[TrialRecord], basis: str | None = None
                       ) -> tuple[TrialRecord | None, dict[int, PairedTest | None]]:
    """(most accurate within-budget trial, {number: McNemar test against it}) on ``basis``.

    The test is None for the best itself and for trials without per-image correctness.
    """
    pool = [r for r in records if r.within_budget and not r.is_baseline and r.value(basis) is not None]
    if not pool:
        return None, {}
    best = min(pool, key=lambda r: (-r.value(basis), *_cost_key(r)))
    tests: dict[int, PairedTest | None] = {}
    for r in pool:
        if r.number == best.number:
            tests[r.number] = None
            continue
        try:
            x, y = paired_accuracies(best, r, basis)
            tests[r.number] = mcnemar(x, y)
        except ValueError:
            tests[r.number] = None
    return best, tests


def recommend(records: Sequence[TrialRecord], fidelity: str = "finetuned",
              alpha: float = ALPHA) -> Recommendation | None:
    """The recommended trial (module docstring); None when no complete trial is within the budget.

    ``fidelity`` names the records' ``accuracy`` (the study's fidelity) in the texts.
    """
    within = [r for r in records if r.within_budget and not r.is_baseline]
    confirmed = [r for r in within if r.confirmed is not None]
    basis = CONFIRMED if confirmed else None
    pool = confirmed if confirmed else within
    best, tests = tests_against_best(pool, basis)
    if best is None:
        return None
    notes = []
    candidates = []
    for r in sorted(pool, key=lambda r: (-(r.value(basis) or -1.0), *_cost_key(r))):
        if r.value(basis) is None:
            continue
        t = tests.get(r.number)
        same = r.number == best.number or (t is not None and not t.significant(alpha))
        if r.number != best.number and t is None:
            notes.append(f"trial {r.number}: no per-image correctness, so it cannot be shown equal to the best")
        candidates.append(Contender(r, t, same))
    chosen = min((c.record for c in candidates if c.indistinguishable), key=_cost_key)
    baselines = [r for r in records if r.is_baseline]
    baseline = baselines[-1] if baselines else None
    drop, drop_basis = None, None
    if baseline is not None:
        for b in ((CONFIRMED, None) if basis == CONFIRMED else (None,)):
            try:
                drop, drop_basis = compare(chosen, baseline, b), b
                break
            except ValueError:
                continue
        if drop is None:
            drop_basis = basis if baseline.value(basis) is not None else None
    return Recommendation(chosen, best, basis or fidelity, tuple(candidates), baseline, drop,
                          drop_basis or fidelity, alpha, tuple(notes))


# ----------------------------------------------------------------------------- text
def _basis_text(basis: str | None) -> str:
    if basis == CONFIRMED:
        return "confirmed: mean over fine-tune seeds, paired seed by seed"
    if basis in (None, "finetuned"):
        return "one fine-tune per trial, not confirmed with further seeds"
    return f"{fidelity_name(basis)} accuracy, one evaluation per trial"


FIDELITY_NAMES = {"finetuned": "fine-tuned", "zero_shot": "zero-shot", CONFIRMED: "confirmed"}


def fidelity_name(fidelity: str | None) -> str:
    """How tables, figures and the headline name an accuracy's fidelity ('fine-tuned', 'zero-shot', ...)."""
    return FIDELITY_NAMES.get(str(fidelity), str(fidelity).replace("_", "-"))


def _test_text(basis: str | None) -> str:
    """Which evaluations a paired test compared: the report's tables test the search's own evaluation."""
    if basis == CONFIRMED:
        return "on the confirmed seeds, paired seed by seed"
    return f"on the search's {fidelity_name(basis or 'finetuned')} evaluation"


def _accuracy_text(r: TrialRecord, basis: str | None, short: bool = False) -> str:
    if basis == CONFIRMED and r.confirmed is not None:
        text = f"{format_confirmed(r.confirmed)} (mean over fine-tune seeds)"
        if not short and r.accuracy is not None:
            text += f"; its search fine-tune {format_accuracy(r.accuracy)}"
        return text
    if r.accuracy is not None:
        return format_accuracy(r.accuracy)
    return f"{100 * r.top1:.1f}% (no counts stored)" if r.top1 is not None else "unknown"


def _cost_text(cost: float | None, baseline_gmacs: float | None) -> str:
    if cost is None:
        return "? GMACs"
    frac = f" ({cost / baseline_gmacs:.2f}x baseline)" if baseline_gmacs else ""
    return f"{cost:.4g} GMACs{frac}"


def _name(r: TrialRecord) -> str:
    """'tome r7' or 'topk+squeeze topk k0.5@3' (the variant when the label does not say it)."""
    return r.label if not r.variant or r.label.startswith(r.variant) else f"{r.variant} {r.label}"


def _cost_key(r: TrialRecord) -> tuple[float, int]:
    return (r.cost if r.cost is not None else math.inf, r.number)


def _extra(m: Mapping[str, Any]) -> dict[str, Any]:
    e = m.get("extra")
    return e if isinstance(e, dict) else {}


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
