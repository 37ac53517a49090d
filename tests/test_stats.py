"""tpsexplore.stats against independent references (scipy) and the properties the report relies on."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from tpsexplore.stats import (Accuracy, decimals_for, eval_set_fingerprint, format_accuracy, mcnemar,
                              pack_correct, paired_difference, unpack_correct, wilson_interval)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (359, 400), (3700, 4000)])
def test_wilson_matches_scipy(k, n):
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_wilson_refuses_bad_counts():
    with pytest.raises(ValueError, match=r"^correct: 11 is outside \[0, 10\]$"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match=r"^n: 0 "):
        wilson_interval(0, 0)


def test_mcnemar_exact_matches_binomial_test():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(20, 400))
        a = rng.random(n) < 0.8
        b = np.where(rng.random(n) < 0.1, ~a, a)
        t = mcnemar(a, b)
        assert t.only_a == int(np.sum(a & ~b)) and t.only_b == int(np.sum(~a & b)) and t.n == n
        ref = sps.binomtest(t.only_a, t.discordant, 0.5).pvalue if t.discordant else 1.0
        assert t.p_value == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_mcnemar_is_sharper_than_two_intervals():
    # B fixes 12 images A gets wrong and breaks none: the intervals overlap, the paired test does not.
    a = np.zeros(400, bool)
    a[:340] = True
    b = a.copy()
    b[340:352] = True
    la, ha = Accuracy.from_bits(a).interval
    lb, hb = Accuracy.from_bits(b).interval
    assert lb < ha  # unpaired intervals overlap
    assert mcnemar(a, b).p_value < 0.001


def test_paired_difference_interval_covers_and_refuses_unpaired():
    rng = np.random.default_rng(1)
    covered = 0
    trials = 400
    for _ in range(trials):  # true difference 0.9 - 0.85 = 0.05 with correlated outcomes
        u = rng.random(300)
        a, b = u < 0.9, u < 0.85
        flip = rng.random(300) < 0.05
        b = np.where(flip, ~b, b)
        true = 0.9 - (0.85 * 0.95 + 0.15 * 0.05)
        d = paired_difference(a, b)
        assert d.low <= d.difference <= d.high
        covered += d.low <= true <= d.high
    assert covered / trials > 0.92  # nominal 95%
    with pytest.raises(ValueError, match=r"^n: 3 and 4 images differ"):
        paired_difference([1, 0, 1], [1, 0, 1, 1])
    x = Accuracy.from_bits([1, 0, 1], eval_set="aaa")
    y = Accuracy.from_bits([1, 1, 1], eval_set="bbb")
    with pytest.raises(ValueError, match=r"^eval_set: aaa and bbb differ"):
        mcnemar(x, y)
    with pytest.raises(ValueError, match=r"^accuracy: no per-image correctness"):
        mcnemar(Accuracy(2, 3), y)


def test_bits_round_trip_through_extra():
    rng = np.random.default_rng(2)
    bits = rng.random(4001) < 0.7
    assert np.array_equal(unpack_correct(pack_correct(bits), bits.size), bits)
    acc = Accuracy.from_bits(bits, eval_set=eval_set_fingerprint(np.arange(4001) % 10))
    extra = acc.extra()
    assert extra["n"] == 4001 and extra["correct"] == int(bits.sum()) and len(extra["correct_bits"]) < 700
    back = Accuracy.from_extra(extra)
    assert back.correct == acc.correct and back.eval_set == acc.eval_set and np.array_equal(back.bits, bits)
    assert extra["ci95"] == list(acc.interval)
    assert Accuracy.from_extra({"value": 0.5}) is None


def test_digits_follow_the_interval():
    # n = 4000 near 90%: half-width ~0.9 points -> one decimal; n = 40: ~10 points -> none.
    assert decimals_for(Accuracy(3600, 4000).half_width) == 1
    assert decimals_for(Accuracy(36, 40).half_width) == 0
    assert decimals_for(Accuracy(399_000, 400_000).half_width) == 2
    text = format_accuracy(Accuracy(36, 40))
    assert text.startswith("90% [") and text.endswith("(n=40)")
    assert not math.isnan(Accuracy(1, 1).half_width)
