"""The recommendation as the search's closing summary computes it: real Optuna FrozenTrials carrying the same
measurement records a search writes (`objective._Recorder`), a real study.json with a reference baseline and
a real results store with a confirmation (`tpsexplore.search.confirm`)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tpsexplore.search.backend import A_FINETUNED, A_INFO, A_RECORD, A_ROLE, A_ZERO_SHOT
from tpsexplore.search.confirm import ConfirmedAccuracy
from tpsexplore.search.progress import front_table, pareto_front
from tpsexplore.search.recommend import (build_record, compare, paired_accuracies, recommend, records_from_trials,
                                         speed_of, summarise_search)
from tpsexplore.stats import Accuracy
from tpsexplore.storage import ResultsStore

N = 1000
RANK = np.argsort(np.random.default_rng(1).permutation(N))
BASE_GMACS = 1.25


def bits(correct: int) -> np.ndarray:
    return RANK < correct  # nested correct sets: two trials differ on |difference| images


def top1(correct: int, fidelity: str = "finetuned", eval_set: str = "val-1000") -> dict:
    acc = Accuracy.from_bits(bits(correct), eval_set)
    return {"kind": "accuracy_top1", "value": acc.value, "unit": "fraction", "fidelity": fidelity,
            "extra": acc.extra()}


def trial(number: int, correct: int, gmacs: float, *, variant: str = "topk", feasible: bool = True,
          speedup: float = 2.0, windows: list | None = None):
    """A complete FrozenTrial as a search leaves it: config record, measurements, values (top-1, GMACs)."""
    label = "baseline" if variant == "baseline" else f"{variant} k{gmacs / BASE_GMACS:.2f}@3"
    sp_extra = {"baseline_images_per_s": 100.0, **({"values": windows} if windows else {})}
    meas = [{"kind": "gmacs", "value": gmacs, "unit": "GMACs", "fidelity": "analytic"},
            {"kind": "throughput", "value": 100.0 * speedup, "batch_size": 64, "dtype": "fp32", "device": "cpu",
             "extra": {"windows": 5, "images_per_s_min": 95.0 * speedup, "images_per_s_max": 104.0 * speedup}},
            {"kind": "speedup", "value": speedup, "batch_size": 64, "dtype": "fp32", "device": "cpu",
             "extra": sp_extra},
            {"kind": "speedup", "value": 1.5, "batch_size": 1, "dtype": "fp32", "device": "cpu"},
            top1(correct - 50, "zero_shot"), top1(correct)]
    return create_trial(
        state=TrialState.COMPLETE, values=[correct / N, gmacs], params={"x": gmacs / BASE_GMACS},
        distributions={"x": FloatDistribution(0.0, 1.0)},
        user_attrs={A_ROLE: "baseline" if variant == "baseline" else "sampled", A_ZERO_SHOT: (correct - 50) / N,
                    A_FINETUNED: correct / N,
                    A_INFO: {"config": {"method": "none" if variant == "baseline" else variant}, "label": label,
                             "variant": variant, "gmacs": gmacs, "feasible": feasible},
                    A_RECORD: {"measurements": meas, "durations": {}}})


def frozen(number: int, t):
    t.number = number  # create_trial numbers every trial 0; a study assigns them in order
    return t


@pytest.fixture
def trials():
    return [frozen(0, trial(0, 930, BASE_GMACS, variant="baseline", feasible=False, speedup=1.0)),
            frozen(1, trial(1, 921, 0.50, variant="etps", speedup=2.2, windows=[2.1, 2.2, 2.3, 2.25, 2.15])),
            frozen(2, trial(2, 918, 0.42, variant="tome", speedup=2.6)),
            frozen(3, trial(3, 900, 0.30, variant="random", speedup=3.4)),
            frozen(4, trial(4, 940, 0.90, variant="evit", feasible=False))]


def test_summary_names_the_cheaper_indistinguishable_trial(trials, tmp_path):
    ref = {"throughput": {"batch_size": 64, "dtype": "fp32", "device": "cpu", "value": 150.0},
           "latency_ms": None, "measured": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "study.json").write_text(json.dumps({"reference": ref}))
    lines, marks = summarise_search(trials, "finetuned", tmp_path, "s", BASE_GMACS)
    text = "\n".join(lines)
    # #1 (92.1%) is the most accurate within budget; #2 is 3 images below (p = 0.25): the cheaper #2 wins;
    # #3 is 21 below (p < 1e-4); #4 is over the budget and takes no part
    assert "trial 2: tome k0.34@3, 0.42 GMACs (0.34x baseline)" in lines[1]
    assert "not distinguishable from the most accurate, trial 1" in text
    assert "McNemar p=0.25 on the search's fine-tuned evaluation" in text  # which evaluations were compared
    # n = 1000: the interval is +-1.6 points, so whole percents; the paired difference is sharper: one decimal
    assert "baseline             : trial 0 (no reduction): 93% [91, 94] (n=1000)" in text
    assert "accuracy vs baseline : -1.2 pts [-2.0, -0.5], McNemar p=0.00049" in text
    assert "speed-up             : 2.60x at batch 64 (range 2.47-2.70, slowest-fastest of 5 windows" in text
    assert "390 img/s at the reference baseline" in text  # 2.6 x the reference's 150 img/s
    # a speed-up measured by measure_pair carries its window-pair ratios: they give the spread
    sp = {"kind": "speedup", "value": 2.5, "batch_size": 64, "dtype": "fp32",
          "extra": {"window_ratios": [2.4, 2.5, 2.45, 2.6, 2.55]}}
    speed = speed_of([sp])
    assert (speed.median, speed.low, speed.high) == (2.5, 2.4, 2.6) and "5 window-pair ratios" in speed.spread
    assert lines[-1].endswith(f"tpsexplore export {tmp_path} --trial 2 -o config.json")
    assert marks[1]["vs_best"] == "most accurate" and marks[2]["vs_best"] == "~ (p=0.25)"
    assert marks[3]["vs_best"] == "< (p<1e-4)" and marks[4]["vs_best"] == ""
    # the front table shows the same, percent with the interval's digits
    table = front_table(pareto_front(trials, False), "gflops", BASE_GMACS, marks)
    row2 = next(line for line in table.splitlines() if line.startswith("2 "))
    assert "92 [90, 93]" in row2 and "~ (p=0.25)" in row2 and re.search(r"\s87\s", row2)


def confirm_store(tmp_path, second: list[int]):
    """A results store where trials #1 and #2 were confirmed over seeds 1-3 (#1 right on 921, 925, 923 of N
    images, #2 on ``second``); returns its folder."""
    with ResultsStore(tmp_path / "results.db") as store:
        study = store.get_or_create_study("s", backbone="deit_t", budget=0.5, objectives=["a:maximize"],
                                          data="proxy", weights="random", settings={})
        for number, counts in ((1, [921, 925, 923]), (2, second)):
            tid = store.start_trial(study, number, {"method": "x"}, method="x", label="x")
            c = ConfirmedAccuracy((1, 2, 3), tuple(counts), N, "val-1000", tuple(bits(k) for k in counts))
            store.add_measurements(tid, [{"kind": "accuracy_top1", "value": c.mean, "fidelity": "confirmed",
                                          "extra": c.extra()}])
            store.finish_trial(tid, "complete")
    return tmp_path


def test_summary_uses_confirmations_from_the_results_store(trials, tmp_path):
    """Confirmed numbers win: here #2 confirms well below #1 (p < 0.05 seed by seed), so #1 is recommended."""
    lines, _ = summarise_search(trials, "finetuned", confirm_store(tmp_path, [918, 905, 904]), "s", BASE_GMACS)
    text = "\n".join(lines)
    assert "trial 1: etps" in lines[1] and "3 seeds" in text and "confirmed: mean over fine-tune seeds" in text
    records = records_from_trials(trials, "finetuned", confirmed={})
    assert recommend(records).chosen.number == 2  # without the confirmations the cheaper tie would win


def test_confirmed_tie_says_which_evaluations_the_test_compared(trials, tmp_path):
    """#2 confirms 1-2 images below #1 on each seed: still a tie, so the cheaper #2 is recommended, and the
    headline says its McNemar test is on the confirmed seeds (the report's tables test the search's evaluation)."""
    lines, _ = summarise_search(trials, "finetuned", confirm_store(tmp_path, [920, 924, 921]), "s", BASE_GMACS)
    text = "\n".join(lines)
    assert "trial 2: tome" in lines[1]
    assert "McNemar p=0.12 on the confirmed seeds, paired seed by seed" in text  # 3,000 pairs, 4 images apart


def test_recommendation_edge_cases(trials):
    records = records_from_trials(trials, "finetuned")
    by = {r.number: r for r in records}
    assert by[1].speed.spread == "median of 5 windows" and by[1].speed.median == pytest.approx(2.2)
    assert (by[1].speed.low, by[1].speed.high) == (2.1, 2.3)
    # nothing within budget: no recommendation
    assert recommend([r for r in records if not r.within_budget]) is None
    # a trial measured on other images cannot be compared, in one line
    other = build_record(9, [top1(920, eval_set="other")], fidelity="finetuned", within_budget=True, cost=0.1)
    with pytest.raises(ValueError, match=r"^eval_set: val-1000 and other differ"):
        compare(by[1], other)
    with pytest.raises(ValueError, match=r"^accuracy: trial 1 has no confirmed per-image correctness$"):
        paired_accuracies(by[1], by[2], "confirmed")
    # a speed-up without any spread is one value, said so
    assert speed_of([{"kind": "speedup", "value": 1.7, "batch_size": 8}]).spread == "one measurement"
    assert speed_of([{"kind": "throughput", "value": 1.0, "batch_size": 8}]) is None


def test_confirmation_targets_are_the_ones_the_recommendation_can_pick(trials):
    """`confirm.select_targets`: the most accurate front member, then the cheapest trials a paired test cannot
    tell apart from it, then the rest of the front; the baseline last, outside ``top``."""
    from tpsexplore.search.confirm import select_targets

    more = [*trials, frozen(5, trial(5, 920, 0.45, variant="evit"))]  # 1 image below #1, costlier than #2
    numbers = [t.number for t in select_targets(more, 2, maximize_cost=False)]
    assert numbers == [1, 2, 0]  # not [1, 5, 0]: #5 is more accurate than #2, but #2 is the cheaper tie
    assert [t.number for t in select_targets(more, 3, maximize_cost=False, baseline=False)] == [1, 2, 5]
    assert [t.number for t in select_targets(more, 4, maximize_cost=False, baseline=False)] == [1, 2, 5, 3]
    assert [t.number for t in select_targets(more, 1, maximize_cost=False)] == [1, 0]
    assert select_targets(more, 0, maximize_cost=False) == []
