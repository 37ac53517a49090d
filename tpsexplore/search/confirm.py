"""Confirmation stage: re-fine-tune the top configs of the front with further seeds and store mean +- spread.

A trial's fine-tuned accuracy is one draw: the learned predictors' initialisation and the fine-tune's batch
order come from one seed. After the search, the coordinator (the only writer of results.db) takes ``top``
complete, fine-tuned trials (`select_targets`: the most accurate of the feasible front, then the cheapest
trials a paired test cannot tell apart from it, which the recommendation would pick, then the next most
accurate of the front; and, with
``baseline``, the unreduced baseline, so the accuracy drop compares seed means with seed means) and runs
each again with ``seeds`` further seeds: a fresh model from the task, `apply` with the predictors
initialised from the seed (as `objective.run_trial` does), the same fine-tune, the same evaluation set.

Seeds: index 0 is the trial's own seed (`objective.config_seed`; its stored fine-tuned accuracy is reused,
not recomputed); index k >= 1 is `derived_seed(trial_seed, k)`, so a rerun gives the same numbers.

Stored per confirmed trial: ONE ``accuracy_top1`` measurement with fidelity ``confirmed``, written after all
its seeds are done (a Ctrl-C in between leaves nothing half-written). value = mean top-1 over all seeds;
``extra`` = seeds, values, correct (per seed), n, mean, std (sample, ddof 1), min, max, eval_set,
correct_bits (per seed, base64), plus ci95 / ci_method (Wilson at the seed-mean count), steps and
trial_seed. A resumed or repeated search skips trials whose stored confirmation already has enough seeds;
asking for more seeds later reuses the stored ones and runs only the missing seeds (a newer measurement).

`confirmed_accuracy(extra)` reads a stored confirmation back (`ConfirmedAccuracy`: mean, std, spread,
per-seed `Accuracy` objects for paired tests); `confirmed_from_store(store, study)` gives all of a study's.
"""
from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..stats import Accuracy, decimals_for, pack_correct, unpack_correct, wilson_interval
from .spec import ConfirmSettings

FIDELITY = "confirmed"
CI_METHOD = "wilson at the seed-mean count"

__all__ = ["FIDELITY", "ConfirmSettings", "ConfirmedAccuracy", "ConfirmedTrial", "ConfirmOutcome",
           "confirmed_accuracy", "confirmed_from_store", "derived_seed", "format_confirmed", "run_confirmation",
           "seed_run", "select_targets"]


# ============================================================================= pure part (the report uses it)
def derived_seed(trial_seed: int, index: int) -> int:
    """Seed number ``index`` of a config whose trial ran with ``trial_seed`` (index 0 is the trial's own)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: {index!r} is not an integer >= 0")
    if index == 0:
        return int(trial_seed)
    return zlib.crc32(f"tpsx-confirm:{int(trial_seed)}:{index}".encode()) % (2 ** 31)


@dataclass(frozen=True)
class ConfirmedAccuracy:
    """Top-1 of one config over several fine-tune seeds, all evaluated on the same ``n`` images."""

    seeds: tuple[int, ...]
    correct: tuple[int, ...]
    n: int
    eval_set: str | None = None
    bits: tuple[np.ndarray | None, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.seeds or len(self.seeds) != len(self.correct):
            raise ValueError(f"seeds: {len(self.seeds)} seeds for {len(self.correct)} counts; need one count per "
                             "seed and at least one seed")
        if self.n <= 0:
            raise ValueError(f"n: {self.n} must be a positive count")
        if self.bits and len(self.bits) != len(self.seeds):
            raise ValueError(f"correct_bits: {len(self.bits)} entries for {len(self.seeds)} seeds")

    @property
    def count(self) -> int:
        return len(self.seeds)

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(c / self.n for c in self.correct)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        return float(np.std(self.values, ddof=1)) if self.count > 1 else 0.0

    @property
    def min(self) -> float:
        return float(min(self.values))

    @property
    def max(self) -> float:
        return float(max(self.values))

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) over seeds."""
        return self.min, self.max

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval at the seed-mean count: the evaluation set's sampling noise around the mean."""
        return wilson_interval(int(round(float(np.mean(self.correct)))), self.n)

    @property
    def half_width(self) -> float:
        lo, hi = self.interval
        return (hi - lo) / 2

    def accuracies(self) -> list[Accuracy]:
        """One `Accuracy` per seed (with per-image bits where stored), for paired tests against other trials."""
        bits = self.bits or (None,) * self.count
        return [Accuracy(c, self.n, b, self.eval_set) for c, b in zip(self.correct, bits)]

    def extra(self) -> dict[str, Any]:
        """The stored ``extra`` of the confirmed measurement (JSON-ready; see the module docstring)."""
        lo, hi = self.interval
        out: dict[str, Any] = {
            "seeds": [int(s) for s in self.seeds], "values": list(self.values),
            "correct": [int(c) for c in self.correct], "n": int(self.n), "mean": self.mean, "std": self.std,
            "min": self.min, "max": self.max, "eval_set": self.eval_set, "ci95": [lo, hi], "ci_method": CI_METHOD}
        if self.bits and all(b is not None for b in self.bits):
            out["correct_bits"] = [pack_correct(b) for b in self.bits]
        return out

    def __str__(self) -> str:
        return format_confirmed(self)


def confirmed_accuracy(extra: dict[str, Any] | None) -> ConfirmedAccuracy | None:
    """The `ConfirmedAccuracy` of a stored ``confirmed`` measurement's ``extra``; None when it is not one.

    (`stats.Accuracy.from_extra` is for single-run measurements: here ``correct`` is a list, one per seed.)
    """
    if not extra or not isinstance(extra.get("seeds"), (list, tuple)) or "correct" not in extra or "n" not in extra:
        return None
    n = int(extra["n"])
    raw = extra.get("correct_bits")
    bits: tuple[np.ndarray | None, ...] = ()
    if isinstance(raw, (list, tuple)) and len(raw) == len(extra["seeds"]):
        bits = tuple(unpack_correct(b, n) if b else None for b in raw)
    return ConfirmedAccuracy(tuple(int(s) for s in extra["seeds"]), tuple(int(c) for c in extra["correct"]), n,
                             extra.get("eval_set"), bits)


def format_confirmed(c: ConfirmedAccuracy, decimals: int | None = None) -> str:
    """'91.2% +- 0.4 (3 seeds, 90.8-91.6)': mean +- sample std in percent, with the digits the interval supports."""
    d = decimals_for(c.half_width) if decimals is None else decimals
    sd = max(d, decimals_for(c.std)) if c.std > 0 else d  # the spread and range show their first digit, never '± 0'
    seeds = f"{c.count} seed{'s' if c.count != 1 else ''}"
    return (f"{100 * c.mean:.{d}f}% \u00b1 {100 * c.std:.{sd}f} ({seeds}, {100 * c.min:.{sd}f}-"
            f"{100 * c.max:.{sd}f})")


def confirmed_from_store(store: Any, study: Any) -> dict[int, ConfirmedAccuracy]:
    """Trial number -> its newest confirmed top-1 in a `ResultsStore` study (only confirmed trials appear)."""
    frame = store.measurements_frame(study, kind="accuracy_top1")
    out: dict[int, ConfirmedAccuracy] = {}
    for row in frame[frame["fidelity"] == FIDELITY].itertuples():  # oldest first: the newest wins
        c = confirmed_accuracy(row.extra)
        if c is not None:
            out[int(row.number)] = c
    return out


# ============================================================================= which trials
def select_targets(trials: Sequence[Any], top: int, maximize_cost: bool, baseline: bool = True) -> list[Any]:
    """The trials to confirm, ``top`` at most: the most accurate fine-tuned member of the feasible front, then
    the within-budget trials an exact McNemar test cannot tell apart from it, cheapest first (the ones the
    recommendation may pick instead of it, `recommend.recommend`), then the rest of the front, most accurate
    first (ties: better cost first); then the unreduced baseline when ``baseline`` (never counted in ``top``)."""
    from optuna.trial import TrialState

    from .backend import A_FINETUNED, info
    from .progress import pareto_front
    from .recommend import records_from_trials, tests_against_best

    if top <= 0:
        return []
    by_number = {t.number: t for t in trials}

    def unreduced(t: Any) -> bool:
        return (info(t, "config") or {}).get("method") == "none"

    def finetuned(t: Any) -> bool:
        return A_FINETUNED in t.user_attrs and not unreduced(t)

    sign = -1.0 if maximize_cost else 1.0
    front = [by_number[r.number] for r in pareto_front(list(trials), maximize_cost)]
    front = [t for t in front if finetuned(t)]
    front.sort(key=lambda t: (-t.values[0], sign * t.values[1], t.number))
    order: list[Any] = front[:1]
    if front:
        records = [r for r in records_from_trials([t for t in trials if finetuned(t)], "finetuned")]
        best, tests = tests_against_best(records)
        if best is not None and best.number == front[0].number:
            same = [r for r in records if tests.get(r.number) is not None and not tests[r.number].significant()]
            same.sort(key=lambda r: (r.cost if r.cost is not None else math.inf, r.number))
            order += [by_number[r.number] for r in same]
    order += [t for t in front if t not in order]
    chosen = order[:top]
    if baseline:
        base = [t for t in trials if t.state == TrialState.COMPLETE and unreduced(t) and A_FINETUNED in t.user_attrs]
        chosen += sorted(base, key=lambda t: t.number)[:1]
    return chosen


# ============================================================================= the stage
def seed_run(task: Any, config: Any, seed: int, steps: int) -> Accuracy:
    """One confirmation run, made like a trial's (`objective.run_trial`): a fresh model from ``task``, the
    config applied with the learned predictors initialised from ``seed``, ``steps`` of fine-tune with
    ``seed``, top-1 on the task's fixed evaluation set. With the trial's own seed it repeats the trial."""
    import torch

    from ..reduce import apply

    model = task.new_model()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # learned predictors are initialised from the global RNG
            apply(model, config)
        task.finetune(model, steps, seed=seed)
        acc: Accuracy = task.evaluate(model)["accuracy"]
    finally:
        del model
        if task.device.type == "cuda":
            torch.cuda.empty_cache()
    if not math.isfinite(acc.value):
        raise FloatingPointError(f"accuracy: {acc.value} is not finite")
    return acc


@dataclass(frozen=True)
class ConfirmedTrial:
    number: int
    trial_id: int
    label: str
    role: str  # 'front' or 'baseline'
    accuracy: ConfirmedAccuracy
    runs: int  # fine-tunes run now (0: everything was already stored)


@dataclass
class ConfirmOutcome:
    trials: list[ConfirmedTrial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: int = 0
    seconds: float = 0.0


def _stored(store: Any, study: Any) -> tuple[dict[int, int], dict[int, dict[str, Any]], dict[int, ConfirmedAccuracy]]:
    """(number -> trial_id, trial_id -> newest fine-tuned top-1 row, trial_id -> newest confirmed top-1)."""
    ids = {int(r.number): int(r.trial_id) for r in store.trials_frame(study).itertuples()}
    frame = store.measurements_frame(study, kind="accuracy_top1")
    finetuned: dict[int, dict[str, Any]] = {}
    confirmed: dict[int, ConfirmedAccuracy] = {}
    for row in frame.itertuples():
        if row.fidelity == "finetuned":
            finetuned[int(row.trial_id)] = {"extra": row.extra or {}, "value": row.value,
                                            "provenance": row.provenance}
        elif row.fidelity == FIDELITY:
            c = confirmed_accuracy(row.extra)
            if c is not None:
                confirmed[int(row.trial_id)] = c
    return ids, finetuned, confirmed


def run_confirmation(settings: Any, trials: Sequence[Any], store: Any, study: Any, task: Any, space: Any,
                     deadline: float | None = None, stream: Any = None) -> ConfirmOutcome:
    """Confirm the `select_targets` trials of a finished search; returns what is stored (see the module doc).

    ``settings`` is the `SearchSettings` (``confirm``, ``finetune_steps``, ``seed``, ``progress``), ``trials``
    the final Optuna trials, ``store``/``study`` the results store and its study (already mirrored), ``task``
    the prepared `Task`, ``space`` the `SearchSpace`. No run starts after ``deadline`` (time.time()). A
    KeyboardInterrupt propagates; confirmations finished before it are stored, the current one is not.
    """
    from ..reduce import ReductionConfig
    from .backend import info
    from .objective import config_seed

    cs: ConfirmSettings = settings.confirm
    out = ConfirmOutcome()
    quiet = not settings.progress

    def say(text: str) -> None:
        if not quiet:
            print(f"[confirm] {text}", file=stream or sys.stderr, flush=True)

    if cs.top <= 0:
        return out
    if settings.finetune_steps <= 0:
        out.notes.append("confirmation skipped: finetune_steps = 0 (a zero-shot search has no fine-tune to repeat)")
        say(out.notes[-1])
        return out
    targets = select_targets(trials, cs.top, settings.maximize_cost, cs.baseline)
    if not targets:
        out.notes.append("confirmation skipped: no feasible fine-tuned trial on the front")
        say(out.notes[-1])
        return out
    ids, finetuned, stored = _stored(store, study)
    steps = settings.finetune_steps
    wanted = 1 + cs.seeds
    t0 = time.perf_counter()
    environment = None
    n_front = sum(1 for t in targets if (info(t, "config") or {}).get("method") != "none")
    say(f"re-fine-tuning {n_front} front config(s){' and the baseline' if len(targets) > n_front else ''} with "
        f"{cs.seeds} more seed(s) each ({steps} steps + one evaluation per seed)")
    for t in targets:
        label = info(t, "label", "?")
        role = "baseline" if (info(t, "config") or {}).get("method") == "none" else "front"
        name = f"trial {t.number} ({'unreduced baseline' if role == 'baseline' else label})"
        trial_id = ids.get(t.number)
        own = finetuned.get(trial_id) if trial_id is not None else None
        own_acc = Accuracy.from_extra(own["extra"]) if own else None
        if own_acc is None:
            out.notes.append(f"confirmation of trial {t.number} skipped: its fine-tuned accuracy (n, correct) is "
                             "not in the results store")
            say(out.notes[-1])
            continue
        old = stored.get(trial_id)
        if old is not None and old.count >= wanted:
            say(f"{name}: already confirmed over {old.count} seeds: top-1 {old}")
            out.trials.append(ConfirmedTrial(t.number, trial_id, label, role, old, 0))
            continue
        if deadline is not None and time.time() >= deadline:
            out.notes.append(f"confirmation stopped at trial {t.number}: --timeout reached (rerun the same command "
                             "with a longer one to confirm the rest)")
            say(out.notes[-1])
            break
        config = ReductionConfig.from_dict(dict(info(t, "config")))
        trial_seed = config_seed(space.candidate(config, info(t, "variant", "?")), settings.seed)
        seeds = [derived_seed(trial_seed, k) for k in range(wanted)]
        reuse: dict[int, tuple[int, np.ndarray | None]] = {}
        if old is not None:
            for s, acc in zip(old.seeds, old.accuracies()):
                reuse[s] = (acc.correct, acc.bits)
        counts = [own_acc.correct]
        bits: list[np.ndarray | None] = [own_acc.bits]
        runs = 0
        try:
            for k, seed in enumerate(seeds[1:], start=1):
                if seed in reuse:
                    counts.append(reuse[seed][0])
                    bits.append(reuse[seed][1])
                    continue
                ts = time.perf_counter()
                acc = seed_run(task, config, seed, steps)
                if acc.n != own_acc.n or (own_acc.eval_set and acc.eval_set and acc.eval_set != own_acc.eval_set):
                    raise ValueError(f"eval_set: {acc.eval_set} ({acc.n} images) is not the set trial {t.number} "
                                     f"was evaluated on ({own_acc.eval_set}, {own_acc.n} images)")
                counts.append(acc.correct)
                bits.append(acc.bits)
                runs += 1
                out.runs += 1
                say(f"{name}: seed {k}/{cs.seeds} top-1 {100 * acc.value:.2f}% ({time.perf_counter() - ts:.1f} s)")
        except KeyboardInterrupt:
            say(f"{name}: interrupted; nothing stored for it (rerun the same command to confirm it)")
            raise
        except Exception as exc:  # noqa: BLE001 - a failed confirmation leaves the trial as it is
            out.notes.append(f"confirmation of trial {t.number} failed: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]}")
            print(f"[confirm] {out.notes[-1]}", file=stream or sys.stderr, flush=True)
            continue
        result = ConfirmedAccuracy(tuple(seeds), tuple(counts), own_acc.n, own_acc.eval_set or None,
                                   tuple(bits) if all(b is not None for b in bits) else ())
        if environment is None:
            from ..measure.environment import environment_info

            environment = environment_info(task.device)
        store.add_measurements(trial_id, [{
            "kind": "accuracy_top1", "value": result.mean, "unit": "fraction", "fidelity": FIDELITY,
            "provenance": own.get("provenance"),
            "extra": {**result.extra(), "steps": steps, "trial_seed": trial_seed}}], environment=environment)
        say(f"{name}: top-1 {result} (fine-tuned run alone: {100 * own_acc.value:.2f}%)")
        out.trials.append(ConfirmedTrial(t.number, trial_id, label, role, result, runs))
    out.seconds = time.perf_counter() - t0
    if out.runs:
        say(f"{out.runs} run(s) in {out.seconds:.1f} s ({out.seconds / out.runs:.1f} s each)")
    return out
