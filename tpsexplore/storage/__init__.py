"""Results store of tpsexplore: studies, trials and measurements in SQLite or PostgreSQL (SQLAlchemy 2).

Standalone: imports nothing from the rest of tpsexplore but the leaf `tpsexplore.errors` (one-line messages). Table
layout: docs/schema.md.

    store = ResultsStore("runs/results.db")
    study = store.get_or_create_study("deit_s-35", backbone="deit_s", budget=0.35)
    tid = store.start_trial(study, 0, config.to_dict())
    store.add_measurements(tid, [{"kind": "gmacs", "value": 1.6, "fidelity": "analytic"}], environment=env)
    store.finish_trial(tid, "complete", durations={"measure": 3.2})
    store.trials_frame(study)          # one row per trial, measurements pivoted into columns
"""
from .errors import CorruptDatabaseError, ForeignDatabaseError, SchemaVersionError, StoreError, StudyMismatchError
from .frames import measurement_column
from .schema import FINAL_TRIAL_STATES, SCHEMA_VERSION, TRIAL_STATES
from .store import FIDELITIES, KNOWN_KINDS, ResultsStore, Study

__all__ = [
    "ResultsStore", "Study", "StoreError", "CorruptDatabaseError", "ForeignDatabaseError", "SchemaVersionError",
    "StudyMismatchError",
    "measurement_column", "SCHEMA_VERSION", "TRIAL_STATES", "FINAL_TRIAL_STATES", "KNOWN_KINDS", "FIDELITIES",
]
