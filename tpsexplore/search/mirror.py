"""Copy finished (and running) Optuna trials into the results store: the store's single writer.

Workers write only to the Optuna storage (trial user attributes, see `backend`); the coordinating process
calls `Mirror.sync` every second or so and after the last trial. So results.db has exactly one writer even
with several worker processes (or several machines sharing a PostgreSQL Optuna storage: each machine's
coordinator mirrors the whole study into its own results.db). Re-syncing is idempotent: a trial already
final in the store is skipped, measurements are added once.

A row is ``running`` only while this process (or one of its worker processes) runs the trial: a trial that
runs in another process joined to the study (a second ``tpsexplore search`` on the same journal or
PostgreSQL storage) gets its row once Optuna says it finished, on this process's next sync. Mirroring it
as running instead left the row ``running`` for good whenever this process ended first, which a joining
process always does when the other one runs the study's last trial.
"""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ..storage import ResultsStore, Study
from .backend import A_ENVIRONMENT, A_INFO, A_WORKER, end, info, process_parent, process_start_time, record


def store_state(t: FrozenTrial) -> str | None:
    """Results-store state of a finished Optuna trial (None while it runs)."""
    if t.state == TrialState.COMPLETE:
        return "complete"
    if t.state == TrialState.PRUNED:
        return "infeasible" if end(t, "outcome") == "infeasible" else "pruned"
    if t.state == TrialState.FAIL:
        return "failed"
    return None


def _aware(dt: datetime | None) -> datetime | None:
    """Optuna keeps naive local datetimes; the store wants aware (it stores UTC)."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc) if dt.tzinfo is None else dt


class Mirror:
    """Keeps one results-store study in step with one Optuna study."""

    def __init__(self, store: ResultsStore, study: Study) -> None:
        self.store, self.study = store, study
        self.pid, self.host = os.getpid(), socket.gethostname()
        frame = store.trials_frame(study)
        self.known: dict[int, tuple[int, str]] = {
            int(r.number): (int(r.trial_id), str(r.state)) for r in frame.itertuples()}

    def sync(self, trials: list[FrozenTrial]) -> list[int]:
        """Mirror ``trials``; returns the numbers that became final in the store during this call."""
        done: list[int] = []
        for t in trials:
            if t.state == TrialState.WAITING:
                continue
            final = store_state(t)
            have = self.known.get(t.number)
            if have is not None and have[1] != "running":
                continue
            if final is None and (have is not None or A_INFO not in t.user_attrs or not self.runs_here(t)):
                continue  # running: recorded once its config is known, and only when this process runs it
            if have is None:
                trial_id = self._start(t)
                self.known[t.number] = (trial_id, "running")
            trial_id = self.known[t.number][0]
            if final is None:
                continue
            items = list(record(t, "measurements") or [])
            if items and self.store.measurements_frame(trial_id=trial_id).empty:
                self.store.add_measurements(trial_id, items, environment=t.user_attrs.get(A_ENVIRONMENT))
            reason = end(t, "reason")
            if final == "failed" and not reason:
                reason = "failed: no reason recorded (the worker ended without saying why)"
            self.store.finish_trial(trial_id, final, reason, durations=record(t, "durations") or {},
                                    feasible=info(t, "feasible"),
                                    analytic_gmacs=info(t, "gmacs"),
                                    constraint_value=info(t, "constraint"),
                                    finished=_aware(t.datetime_complete))
            self.known[t.number] = (trial_id, final)
            done.append(t.number)
        return done

    def runs_here(self, t: FrozenTrial) -> bool:
        """Is the RUNNING trial ``t`` run by this process or by one of its worker processes (its children)?"""
        worker: dict[str, Any] = t.user_attrs.get(A_WORKER) or {}
        if worker.get("host") != self.host or not worker.get("pid"):
            return False
        pid = int(worker["pid"])
        if pid == self.pid:
            return True
        start = worker.get("start")
        return process_parent(pid) == self.pid and (start is None or process_start_time(pid) == start)

    def _start(self, t: FrozenTrial) -> int:
        worker: dict[str, Any] = t.user_attrs.get(A_WORKER) or {}
        return self.store.start_trial(
            self.study, t.number, dict(info(t, "config") or {}), method=info(t, "variant"),
            label=info(t, "label"), worker=f"pid:{worker['pid']}" if worker.get("pid") else None,
            host=worker.get("host") or socket.gethostname(), optuna_trial_id=t._trial_id,
            feasible=info(t, "feasible"), analytic_gmacs=info(t, "gmacs"),
            constraint_value=info(t, "constraint"), started=_aware(t.datetime_start))
