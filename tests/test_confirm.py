"""The confirmation stage (tpsexplore.search.confirm) end to end on a 4-trial smoke search (studies/smoke.toml:
the baseline and the three enqueued published defaults, so two study directories see the same configs): real
timm models, real Optuna journal files, real SQLite results stores, a real Ctrl-C (SIGINT to this process)
during confirmation. No mocks."""
from __future__ import annotations

import contextlib
import tempfile
import io
import math
import statistics
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from tpsexplore.cli import main
from tpsexplore.reduce import ReductionConfig
from tpsexplore.search.backend import A_FINETUNED, SearchJournalBackend, info
from tpsexplore.search.cli import parse_confirm
from tpsexplore.search.confirm import (ConfirmedAccuracy, confirmed_accuracy, confirmed_from_store, derived_seed,
                                       format_confirmed, seed_run)
from tpsexplore.search.spec import build_settings, load_study_file
from tpsexplore.search.task import Task
from tpsexplore.stats import Accuracy, unpack_correct
from tpsexplore.storage import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
# the smoke study on the old digits proxy: its 4 trials give a front of two configs to confirm (on the cluttered
# proxy the tiny model stays near chance and the front is often one config)
DIGITS_SMOKE = Path(tempfile.mkdtemp(prefix="tpsx-confirm-")) / "smoke.toml"
DIGITS_SMOKE.write_text(SMOKE.read_text().replace("[proxy]\n", '[proxy]\nproxy = "digits"\n', 1))
TRIALS = ["--trials", "4", "--confirm", "2x2"]  # 3 seeds per confirmed config; a later --confirm wins
optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")




class _Stderr(io.StringIO):
    """Captured stderr that presses Ctrl-C once a line containing ``at`` is written: it raises the
    KeyboardInterrupt that Python's SIGINT handler would, from this write. (Not `_thread.interrupt_main`: that
    does nothing while the process's SIGINT disposition is not Python's handler, and once in a CI run the
    signal was lost. A real SIGINT to a search process is tested in test_search.py.)"""

    def __init__(self, at: str | None = None) -> None:
        super().__init__()
        self.at, self.fired = at, False

    def write(self, text: str) -> int:
        n = super().write(text)
        if self.at and not self.fired and self.at in text:
            self.fired = True
            raise KeyboardInterrupt
        return n


def _search(out: Path, *args: str, study: Path = DIGITS_SMOKE, interrupt_at: str | None = None) -> tuple[int, str]:
    err = _Stderr(interrupt_at)
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["search", "--study", str(study), "--out", str(out), *TRIALS, *args])
    return rc, err.getvalue()


def _confirmed_rows(study_dir: Path) -> list:
    with ResultsStore(study_dir / "results.db") as store:
        frame = store.measurements_frame("smoke", kind="accuracy_top1")
    return list(frame[frame["fidelity"] == "confirmed"].itertuples())


def _finetuned_rows(study_dir: Path) -> dict[int, object]:
    with ResultsStore(study_dir / "results.db") as store:
        frame = store.measurements_frame("smoke", kind="accuracy_top1")
    return {int(r.number): r for r in frame[frame["fidelity"] == "finetuned"].itertuples()}


def _trials(study_dir: Path) -> list:
    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(study_dir / "optuna.journal")))
    return optuna.load_study(study_name="smoke", storage=storage).get_trials(deepcopy=False)


def _by_trial(rows: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(int(r.number), []).append(r)
    return out


@pytest.fixture(scope="module")
def run_a(proxy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("confirm-a")
    rc, err = _search(out)  # top 2 configs + the baseline, 2 extra seeds each (TRIALS)
    return {"rc": rc, "dir": out / "smoke", "out": out, "stderr": err}


@pytest.fixture(scope="module")
def run_b(proxy_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("confirm-b")
    rc, err = _search(out)
    return {"rc": rc, "dir": out / "smoke", "out": out, "stderr": err}


# ============================================================================= pure helpers
def test_stored_extra_round_trip_mean_and_spread():
    rng = np.random.default_rng(0)
    bits = tuple(rng.random(37) < p for p in (0.5, 0.7, 0.9))
    c = ConfirmedAccuracy((11, 12, 13), tuple(int(b.sum()) for b in bits), 37, "abc", bits)
    values = [int(b.sum()) / 37 for b in bits]
    assert c.mean == pytest.approx(statistics.mean(values)) and c.std == pytest.approx(statistics.stdev(values))
    assert c.spread == (min(values), max(values))
    extra = c.extra()
    assert set(extra) >= {"seeds", "values", "correct", "n", "mean", "std", "min", "max", "eval_set", "correct_bits",
                          "ci95"}
    back = confirmed_accuracy(extra)
    assert back == c and all(np.array_equal(a.bits, b) for a, b in zip(back.accuracies(), bits))
    lo, hi = back.interval
    assert lo < back.mean < hi
    text = format_confirmed(back)
    assert text.startswith(f"{100 * c.mean:.0f}% \u00b1 ") and "3 seeds" in text
    close = ConfirmedAccuracy((1, 2), (3500, 3512), 4000)  # interval +-1 point: the mean is shown to 0 decimals
    assert format_confirmed(close).startswith("88% \u00b1 0.2 (2 seeds, 87.5-87.8)")  # the spread shows its first digit
    assert confirmed_accuracy({"n": 37, "correct": 20}) is None  # a single-run measurement is not a confirmation
    assert ConfirmedAccuracy((5,), (20,), 37).std == 0.0
    with pytest.raises(ValueError, match=r"^seeds: 2 seeds for 1 counts"):
        ConfirmedAccuracy((1, 2), (3,), 10)
    seeds = [derived_seed(99, k) for k in range(5)]
    assert seeds[0] == 99 and len(set(seeds)) == 5 and seeds == [derived_seed(99, k) for k in range(5)]
    assert all(0 <= s < 2 ** 31 for s in seeds)


def test_confirm_settings_and_flag_parse():
    assert build_settings({}, {}).confirm.top == 2 and build_settings({}, {}).confirm.seeds == 1
    s = build_settings({}, {"confirm": parse_confirm("3x4")}).confirm
    assert (s.top, s.seeds, s.baseline) == (3, 4, True)
    assert build_settings({"confirm": {"seeds": 5}}, {"confirm": parse_confirm("1")}).confirm.seeds == 5
    assert build_settings({}, {"confirm": parse_confirm("off")}).confirm.top == 0


# ============================================================================= end to end
def test_top_front_configs_are_confirmed_with_all_seeds(run_a, proxy_cache):
    assert run_a["rc"] == 0, run_a["stderr"][-2000:]
    d = run_a["dir"]
    trials = _trials(d)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    # expected: the most accurate member of the feasible front, then the cheapest trial a paired test cannot
    # tell apart from it (else the next most accurate of the front), then the unreduced baseline
    from tpsexplore.search.progress import pareto_front
    from tpsexplore.search.recommend import records_from_trials, tests_against_best

    front = sorted(pareto_front(trials, False), key=lambda r: (-r.accuracy, r.cost, r.number))
    by_number = {t.number: t for t in trials}
    front = [r for r in front if info(by_number[r.number], "label") != "baseline"]
    records = records_from_trials(trials, "finetuned")
    best, tests = tests_against_best(records)
    assert best.number == front[0].number
    same = sorted((r for r in records if tests.get(r.number) is not None and not tests[r.number].significant()),
                  key=lambda r: (r.cost, r.number))
    second = same[0].number if same else front[1].number
    expected = [front[0].number, second, next(t.number for t in trials if info(t, "label") == "baseline")]
    rows = _confirmed_rows(d)
    assert [int(r.number) for r in rows] == expected  # one measurement each, in confirmation order
    finetuned = _finetuned_rows(d)
    for r in rows:
        e = r.extra
        assert len(e["seeds"]) == len(e["values"]) == len(e["correct"]) == len(e["correct_bits"]) == 3
        assert r.value == pytest.approx(statistics.mean(e["values"])) == pytest.approx(e["mean"])
        assert e["std"] == pytest.approx(statistics.stdev(e["values"]))
        assert (e["min"], e["max"]) == (min(e["values"]), max(e["values"]))
        assert [c / e["n"] for c in e["correct"]] == pytest.approx(e["values"])
        assert [int(unpack_correct(b, e["n"]).sum()) for b in e["correct_bits"]] == e["correct"]
        own = finetuned[int(r.number)]
        assert e["values"][0] == pytest.approx(own.value) and e["eval_set"] == own.extra["eval_set"]
        assert e["seeds"] == [derived_seed(e["trial_seed"], k) for k in range(3)]
        assert confirmed_accuracy(e).mean == pytest.approx(r.value)
    with ResultsStore(d / "results.db") as store:
        table = store.trials_frame("smoke").set_index("number")
        by_number = confirmed_from_store(store, "smoke")
    for r in rows:
        assert table.loc[int(r.number), "accuracy_top1@confirmed"] == pytest.approx(r.value)
        assert by_number[int(r.number)].mean == pytest.approx(r.value)
    assert "[confirm] trial" in run_a["stderr"] and "seed 2/2" in run_a["stderr"]
    # seed 0 is the trial's own seed: one more run with it repeats the trial's fine-tuned result exactly
    first = rows[0]
    t = next(t for t in trials if t.number == int(first.number))
    settings = build_settings(load_study_file(DIGITS_SMOKE), {"out": str(run_a["out"])})
    task = Task(settings, torch.device("cpu"))
    task.prepare(progress=False)
    again = seed_run(task, ReductionConfig.from_dict(info(t, "config")), first.extra["seeds"][0],
                     settings.finetune_steps)
    own = Accuracy.from_extra(finetuned[int(first.number)].extra)
    assert again.correct == own.correct and np.array_equal(again.bits, own.bits)
    assert t.user_attrs[A_FINETUNED] == pytest.approx(again.value)


def test_rerun_adds_nothing_and_more_seeds_extend(run_a):
    d = run_a["dir"]
    before = _confirmed_rows(d)
    rc, err = _search(run_a["out"])
    assert rc == 0 and len(_confirmed_rows(d)) == len(before)
    assert err.count("already confirmed over 3 seeds") == len(before) and "seed 1/2" not in err
    rc, err = _search(run_a["out"], "--quiet", "--confirm", "0")
    assert rc == 0 and "[confirm]" not in err and len(_confirmed_rows(d)) == len(before)
    # asking for one more seed runs only that seed and stores one newer measurement per trial
    rc, err = _search(run_a["out"], "--confirm", "2x3")
    assert rc == 0 and err.count("seed 3/3") == len(before) and "seed 1/3" not in err
    groups = _by_trial(_confirmed_rows(d))
    assert sorted(groups) == sorted(int(r.number) for r in before)
    for rows in groups.values():
        old, new = rows
        assert len(new.extra["seeds"]) == 4 and new.extra["values"][:3] == old.extra["values"]
        assert new.extra["seeds"][:3] == old.extra["seeds"]
    rc, err = _search(run_a["out"], "--confirm", "2x3", "--quiet")
    assert rc == 0 and "[confirm]" not in err and len(_confirmed_rows(d)) == 2 * len(before)


def test_confirmation_is_deterministic_across_study_dirs(run_a, run_b):
    assert run_b["rc"] == 0, run_b["stderr"][-2000:]
    a = {n: rows[0].extra for n, rows in _by_trial(_confirmed_rows(run_a["dir"])).items()}  # the first (3 seeds)
    b = {n: rows[0].extra for n, rows in _by_trial(_confirmed_rows(run_b["dir"])).items()}
    assert sorted(a) == sorted(b) and len(a) == 3
    for n in a:
        for key in ("seeds", "values", "correct", "correct_bits", "eval_set"):
            assert a[n][key] == b[n][key], (n, key)


def test_ctrl_c_during_confirmation_stores_nothing_half_done(run_b):
    d = run_b["dir"]
    rows = _confirmed_rows(d)
    order = [int(r.number) for r in rows]
    states = {t.number: t.state for t in _trials(d)}
    with ResultsStore(d / "results.db") as store:
        table_before = store.trials_frame("smoke")[["number", "state", "accuracy_top1@finetuned"]]
    # 2 more seeds each; Ctrl-C once the second trial has run its first new seed
    second = order[1]
    rc, err = _search(run_b["out"], "--confirm", "2x4", interrupt_at=f"[confirm] trial {second} (")
    assert rc == 130, err[-2000:]
    assert f"trial {second} (" in err and "nothing stored for it" in err
    groups = _by_trial(_confirmed_rows(d))
    assert [len(r.extra["seeds"]) for r in groups[order[0]]] == [3, 5]  # finished before the Ctrl-C: stored
    assert [len(r.extra["seeds"]) for r in groups[second]] == [3]  # interrupted: nothing half-written
    assert [len(r.extra["seeds"]) for r in groups[order[2]]] == [3]  # not reached
    assert {t.number: t.state for t in _trials(d)} == states  # the trials themselves are untouched
    with ResultsStore(d / "results.db") as store:
        assert store.trials_frame("smoke")[["number", "state", "accuracy_top1@finetuned"]].equals(table_before)
    rc, err = _search(run_b["out"], "--confirm", "2x4")  # the rerun finishes the rest, nothing twice
    assert rc == 0 and f"trial {order[0]} (" in err and "already confirmed over 5 seeds" in err
    groups = _by_trial(_confirmed_rows(d))
    assert {n: [len(r.extra["seeds"]) for r in rows] for n, rows in groups.items()} == \
        {order[0]: [3, 5], second: [3, 5], order[2]: [3, 5]}
    for rows in groups.values():
        assert rows[1].extra["values"][:3] == rows[0].extra["values"]
        assert all(math.isfinite(v) for v in rows[1].extra["values"])


@pytest.mark.parametrize("table,args,needle", [
    ('[confirm]\ntop = "x"\n', [], "confirm.top: 'x' is not an integer >= 0"),
    ("[confirm]\nseeds = 0\n", [], "confirm.seeds: 0 is not an integer >= 1"),
    ("[confirm]\nrounds = 3\n", [], "confirm.rounds: unknown key"),
    ("", ["--confirm", "2y3"], "confirm: '2y3' is not TOP or TOPxSEEDS"),
    ("", ["--confirm", "-1"], "--confirm: -1 is not an integer >= 0"),
])
def test_bad_confirm_settings_exit_2_one_line(tmp_path, capsys, table, args, needle):
    study = tmp_path / "study.toml"
    study.write_text(DIGITS_SMOKE.read_text() + "\n" + table)
    out = tmp_path / "out"
    assert main(["search", "--study", str(study), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()  # nothing written
