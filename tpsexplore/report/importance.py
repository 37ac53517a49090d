"""Parameter importance from the study's Optuna storage (Optuna's importance evaluators)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

MIN_TRIALS = 4
"""Fewer complete trials than this give no importance (fANOVA's forest needs a few points to split)."""


@dataclass
class Importances:
    """``values[objective][param]`` (normalised to sum 1 per objective) and a note when there are none."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""
    evaluator: str = ""
    trials: int = 0


def load_optuna_study(storage: str, study_name: str | None = None) -> Any:
    """Load an Optuna study from a journal file path or a database URL (read only), parsed by
    `tpsexplore.manifest.parse_storage`.

    ``study_name`` may be None when the storage holds exactly one study.
    """
    import optuna

    from ..manifest import parse_storage

    parsed = parse_storage(storage)
    if not parsed.is_journal:
        store: Any = parsed.url
    else:
        path = parsed.path
        if not path.is_file():
            raise FileNotFoundError(f"optuna storage: {str(path)!r} does not exist")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API warnings
            store = JournalStorage(JournalFileBackend(str(path)))
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if study_name not in names:
        if len(names) == 1:
            study_name = names[0]
        else:
            raise ValueError(f"optuna study: {study_name!r} not found in {storage!r}; existing: "
                             f"{', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=store)


def objective_names(study: Any, fallback: list[str] | None = None) -> list[str]:
    """Names of the Optuna study's objectives: its metric names, else ``fallback``, else objective_i."""
    n = len(study.directions)
    names = list(getattr(study, "metric_names", None) or [])
    if len(names) != n and fallback and len(fallback) == n:
        names = [str(f).rpartition(":")[0] or str(f) for f in fallback]
    if len(names) != n:
        names = [f"objective_{i}" for i in range(n)]
    return names


def param_importances(study: Any, objectives: list[str] | None = None, seed: int = 0,
                      min_trials: int = MIN_TRIALS) -> Importances:
    """fANOVA importance of each parameter for each objective; a note instead of an error when impossible.

    Only complete trials that sampled parameters count (the enqueued baseline has none). Parameters that not
    every complete trial has (conditional ones such as ``keep_2``) are left out by Optuna; the note says so.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    # trials with no sampled parameters (the enqueued unreduced baseline) would empty the shared search space
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.params]
    out = Importances(evaluator="fANOVA (optuna.importance.FanovaImportanceEvaluator)", trials=len(complete))
    if len(complete) < min_trials:
        out.note = (f"parameter importance skipped: {len(complete)} complete trial(s) in the Optuna study, "
                    f"at least {min_trials} are needed")
        return out
    names = objective_names(study, objectives)
    all_params = sorted({p for t in complete for p in t.params})
    shared = sorted(set.intersection(*(set(t.params) for t in complete)))
    if not shared:
        out.note = "parameter importance skipped: no parameter is shared by all complete trials"
        return out
    problems = []
    for i, name in enumerate(names):
        target = (lambda t, i=i: t.values[i]) if len(names) > 1 else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, evaluator=FanovaImportanceEvaluator(seed=seed), params=shared, target=target)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            problems.append(f"{name}: {' '.join(str(e).split())}")
            continue
        if imp:
            out.values[name] = {k: float(v) for k, v in imp.items()}
    notes = []
    if problems:
        notes.append("importance could not be computed for " + "; ".join(problems))
    if not out.values and not problems:
        notes.append("parameter importance skipped: no parameter varied across all complete trials")
    left_out = [p for p in all_params if p not in shared]
    if left_out and out.values:
        notes.append(f"conditional parameters not present in every trial are left out by Optuna: "
                     f"{', '.join(left_out)}")
    out.note = "; ".join(notes)
    return out
