"""Uncertainty of accuracies and paired comparisons between configs evaluated on the same images.

Pure functions on counts and per-image correctness vectors (numpy only), so every layer can use them:
the search stores an `Accuracy` with every accuracy measurement, the report and the notebook compare
trials with `mcnemar` and `paired_difference`.

- `wilson_interval`: the 95% Wilson score interval of one proportion (good coverage at small n and near
  0 or 1, unlike the Wald interval).
- `mcnemar`: the exact (binomial) McNemar test of two classifiers scored on the same images. Only the
  discordant images carry information, which makes it much sharper than comparing two intervals.
- `paired_difference`: the difference of two paired accuracies with Newcombe's (1998, method 10)
  interval, built from the two Wilson intervals and the phi correlation of the paired outcomes.
- `pack_correct` / `unpack_correct`: the per-image correctness as base64 bits (500 bytes for 4,000
  images), stored in the measurement's ``extra`` so any two trials can be compared later.
- `decimals_for`: how many decimals (in percent) an interval supports, so tables do not print noise.
"""
from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
CI_METHOD = "wilson"


# ----------------------------------------------------------------------------- one proportion
def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct / n`` (fractions in [0, 1])."""
    if n <= 0:
        raise ValueError(f"n: {n} must be a positive count")
    if not 0 <= correct <= n:
        raise ValueError(f"correct: {correct} is outside [0, {n}]")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its count, size, 95% Wilson interval and (optionally) per-image correctness."""

    correct: int
    n: int
    bits: np.ndarray | None = None  # (n,) bool, in the evaluation set's fixed order
    eval_set: str | None = None     # fingerprint of the evaluation set (images and order)

    @property
    def value(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def half_width(self) -> float:
        lo, hi = self.interval
        return (hi - lo) / 2

    @classmethod
    def from_bits(cls, bits: Any, eval_set: str | None = None) -> "Accuracy":
        b = np.asarray(bits, dtype=bool).reshape(-1)
        return cls(int(b.sum()), int(b.size), b, eval_set)

    def extra(self, with_bits: bool = True) -> dict[str, Any]:
        """The fields stored in a measurement's ``extra`` (JSON-ready)."""
        lo, hi = self.interval
        out: dict[str, Any] = {"n": self.n, "correct": self.correct, "ci95": [lo, hi], "ci_method": CI_METHOD}
        if with_bits and self.bits is not None:
            out["correct_bits"] = pack_correct(self.bits)
        if self.eval_set is not None:
            out["eval_set"] = self.eval_set
        return out

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "Accuracy | None":
        """The `Accuracy` of a stored measurement's ``extra``; None when it has no counts."""
        if not extra or "n" not in extra or "correct" not in extra:
            return None
        n = int(extra["n"])
        bits = unpack_correct(extra["correct_bits"], n) if extra.get("correct_bits") else None
        return cls(int(extra["correct"]), n, bits, extra.get("eval_set"))

    def __str__(self) -> str:
        return format_accuracy(self)


# ----------------------------------------------------------------------------- per-image bits
def pack_correct(bits: Any) -> str:
    """Per-image correctness (bool vector) as base64 of its packed bits."""
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=bool).reshape(-1)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The inverse of `pack_correct` for a vector of ``n`` images."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    if raw.size * 8 < n:
        raise ValueError(f"correct_bits: {raw.size * 8} bits stored, fewer than n = {n}")
    return np.unpackbits(raw)[:n].astype(bool)


def eval_set_fingerprint(labels: Any, ids: Any | None = None) -> str:
    """A short fingerprint of an evaluation set (its labels and, if given, image ids, in order)."""
    h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    if ids is not None:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- paired comparisons
@dataclass(frozen=True)
class PairedTest:
    """Exact McNemar test of A against B on the same n images.

    only_a: images A gets right and B wrong; only_b: the reverse. p_value: two-sided exact binomial
    p-value of the discordant split (1.0 when there are no discordant images).
    """

    n: int
    only_a: int
    only_b: int
    p_value: float

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def _as_bits(x: Any) -> np.ndarray:
    if isinstance(x, Accuracy):
        if x.bits is None:
            raise ValueError("accuracy: no per-image correctness stored, so no paired test is possible")
        return x.bits
    return np.asarray(x, dtype=bool).reshape(-1)


def _check_paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a, Accuracy) and isinstance(b, Accuracy) and a.eval_set and b.eval_set \
            and a.eval_set != b.eval_set:
        raise ValueError(f"eval_set: {a.eval_set} and {b.eval_set} differ; a paired test needs the same images")
    x, y = _as_bits(a), _as_bits(b)
    if x.size != y.size:
        raise ValueError(f"n: {x.size} and {y.size} images differ; a paired test needs the same images")
    if x.size == 0:
        raise ValueError("n: 0 images; a paired test needs at least one")
    return x, y


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (min(1, 2 * tail))."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    log_half_n = -n * math.log(2.0)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


def mcnemar(a: Any, b: Any) -> PairedTest:
    """Exact McNemar test of two per-image correctness vectors (or `Accuracy` objects with bits)."""
    x, y = _check_paired(a, b)
    only_a = int(np.count_nonzero(x & ~y))
    only_b = int(np.count_nonzero(~x & y))
    return PairedTest(int(x.size), only_a, only_b, binomial_two_sided(only_a, only_a + only_b))


@dataclass(frozen=True)
class PairedDifference:
    """acc(A) - acc(B) on the same images, with Newcombe's 95% interval and the McNemar test."""

    difference: float
    low: float
    high: float
    test: PairedTest

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high


def paired_difference(a: Any, b: Any, z: float = Z95) -> PairedDifference:
    """acc(A) - acc(B) with Newcombe's hybrid-score interval for paired proportions (method 10)."""
    x, y = _check_paired(a, b)
    n = x.size
    both = int(np.count_nonzero(x & y))
    only_a = int(np.count_nonzero(x & ~y))
    only_b = int(np.count_nonzero(~x & y))
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denom) if denom > 0 else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    test = PairedTest(n, only_a, only_b, binomial_two_sided(only_a, only_a + only_b))
    return PairedDifference(d, max(-1.0, low), min(1.0, high), test)


def indistinguishable_from(best: Any, others: Sequence[Any], alpha: float = 0.05) -> list[bool]:
    """For each of ``others``: True when McNemar against ``best`` gives p >= alpha (no supported gap)."""
    return [not mcnemar(best, o).significant(alpha) for o in others]


# ----------------------------------------------------------------------------- spreads and display
def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements (a speed-up's windows, a config's seeds)."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if v.size == 0:
        return math.nan, math.nan, math.nan
    return float(np.median(v)), float(v.min()), float(v.max())


def decimals_for(half_width: float, scale: float = 100.0) -> int:
    """Decimals (of ``value * scale``) that an interval of this half-width supports: its first digit."""
    hw = half_width * scale
    if not math.isfinite(hw) or hw <= 0:
        return 1
    return int(min(3, max(0, -math.floor(math.log10(hw)))))


def format_accuracy(acc: Accuracy, decimals: int | None = None) -> str:
    """'93.4% [92.6, 94.1] (n=4000)': percent, with the digits the interval supports."""
    lo, hi = acc.interval
    d = decimals_for(acc.half_width) if decimals is None else decimals
    return f"{100 * acc.value:.{d}f}% [{100 * lo:.{d}f}, {100 * hi:.{d}f}] (n={acc.n})"


def format_difference(diff: PairedDifference, decimals: int | None = None) -> str:
    """'-1.2 pts [-2.0, -0.4], McNemar p=0.003': percentage points, signed."""
    d = decimals_for((diff.high - diff.low) / 2) if decimals is None else decimals
    return (f"{signed(100 * diff.difference, d)} pts [{signed(100 * diff.low, d)}, {signed(100 * diff.high, d)}], "
            f"McNemar {p_text(diff.test.p_value)}")


def signed(x: float, decimals: int) -> str:
    """'+1.2' / '-0.4', and '0.0' rather than '-0.0' when the rounding reaches zero."""
    text = f"{x:+.{decimals}f}"
    return text[1:] if float(text) == 0 else text


def format_p(p: float) -> str:
    return "<1e-4" if p < 1e-4 else f"{p:.2g}"


def p_text(p: float) -> str:
    """'p=0.03' or 'p<1e-4'."""
    text = format_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"
