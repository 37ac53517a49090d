"""Optuna side of a search: the storage (journal file or RDB URL), the sampler, and worker liveness.

* Journal file (default, ``DIR/NAME/optuna.journal``): many processes on one machine append to one file
  under an ``fcntl.flock`` lock, so there is no "database is locked" and a process killed with -9 cannot
  leave a stale lock behind (the kernel drops the lock with the process). optuna-dashboard opens the file
  directly (``optuna-dashboard DIR/NAME/optuna.journal``).
* PostgreSQL URL: several machines share one study. SQLite URL: one worker only (checked by the settings).
* Liveness: every running trial records its worker (host, pid, process start time) and a heartbeat time.
  A RUNNING trial whose worker is gone (same host: the pid is dead or reused; other host: no heartbeat for
  `STALE_AFTER_S`) is what a kill -9 leaves behind; `recover` marks it failed and re-queues its config.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import BaseJournalFileLock  # the lock interface JournalFileBackend takes
from optuna.trial import FrozenTrial, TrialState

from .spec import SearchSettings, storage_kind

STALE_AFTER_S = 300.0
HEARTBEAT_S = 30.0
MAX_RETRIES = 2

# user attribute names written on Optuna trials (the coordinator mirrors them into the results store)
A_ROLE = "tpsx_role"  # baseline | default | sampled
A_RETRY_OF = "tpsx_retry_of"
A_WORKER = "tpsx_worker"
A_HEARTBEAT = "tpsx_heartbeat"
A_PHASE = "tpsx_phase"
A_INFO = "tpsx_info"  # {config, label, variant, gmacs, feasible, constraint}: written once, after sampling
A_RECORD = "tpsx_record"  # {measurements: [...], durations: {phase: s}}: rewritten as the trial goes
A_END = "tpsx_end"  # {outcome: complete|pruned|infeasible|failed, reason}
A_ENVIRONMENT = "tpsx_environment"
A_INTERRUPTED = "tpsx_interrupted"
A_WEIGHTS = "tpsx_weights"
A_ZERO_SHOT = "tpsx_zero_shot_top1"
A_FINETUNED = "tpsx_finetuned_top1"
A_COST = "tpsx_cost"
S_FINGERPRINT = "tpsx_fingerprint"
S_ENQUEUED = "tpsx_enqueued"


def info(t: FrozenTrial, key: str, default: Any = None) -> Any:
    """A field of the trial's sampled config record (`A_INFO`)."""
    return (t.user_attrs.get(A_INFO) or {}).get(key, default)


def record(t: FrozenTrial, key: str, default: Any = None) -> Any:
    """``measurements`` or ``durations`` of the trial (`A_RECORD`)."""
    return (t.user_attrs.get(A_RECORD) or {}).get(key, default)


def end(t: FrozenTrial, key: str, default: Any = None) -> Any:
    """``outcome`` or ``reason`` of a finished trial (`A_END`)."""
    return (t.user_attrs.get(A_END) or {}).get(key, default)


class FlockLock(BaseJournalFileLock):
    """Journal lock through ``fcntl.flock`` on a side file: released by the kernel if the holder dies."""

    def __init__(self, journal_path: str) -> None:
        self._path = journal_path + ".flock"
        self._fd: int | None = None
        self._guard = threading.Lock()

    def acquire(self) -> bool:
        self._guard.acquire()
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._guard.release()
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            if self._guard.locked():
                self._guard.release()


class SearchJournalBackend(JournalFileBackend):
    """Optuna's journal file with an flock lock, fsyncing only the logs that are expensive to redo.

    Every append is written and flushed, so a process killed with -9 loses nothing (the data is in the page
    cache). fsync, which costs milliseconds, is kept for study creation and for completed trials (their
    values cost a fine-tune) and skipped for attribute updates, ask, prune and fail. After an OS crash the
    unsynced tail would show as RUNNING trials, which a resume re-queues. This keeps an infeasible sample
    (attribute writes and a prune) well under 10 ms.
    """

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path, lock_obj=FlockLock(file_path))

    @staticmethod
    def _durable(log: dict[str, Any]) -> bool:
        op = log.get("op_code")
        return op == 0 or (op == 6 and log.get("state") == int(TrialState.COMPLETE))

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        from optuna.storages.journal._file import get_lock_file

        durable = any(self._durable(log) for log in logs)
        with get_lock_file(self._lock):
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                if durable:
                    os.fsync(f.fileno())


def journal_path(settings: SearchSettings) -> Path:
    s = settings.storage
    if s and s.startswith("journal:"):
        return Path(s[len("journal:"):])
    if s:
        return Path(s)
    return settings.study_dir / "optuna.journal"


def storage_display(settings: SearchSettings) -> str:
    """The storage as shown to users (passwords hidden)."""
    if storage_kind(settings.storage) == "journal":
        return str(journal_path(settings))
    from sqlalchemy import make_url

    return make_url(settings.storage).render_as_string(hide_password=True)


def open_storage(settings: SearchSettings, create: bool = True) -> optuna.storages.BaseStorage:
    """The Optuna storage of a search; ``create=False`` does not create a missing journal file."""
    kind = storage_kind(settings.storage)
    if kind == "journal":
        path = journal_path(settings)
        if not create and not path.exists():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(SearchJournalBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(settings.storage, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # noqa: BLE001 - connection/driver errors become one line
        raise ValueError(f"storage: cannot open {storage_display(settings)!r}: "
                         f"{' '.join(str(e).split())[:300]}") from None


def make_sampler(settings: SearchSettings, salt: int = 0, grid: dict[str, list[Any]] | None = None
                 ) -> optuna.samplers.BaseSampler:
    """Multivariate TPE with group decomposition and constant liar (default).

    Why TPE: with < 1,000 trials (tens on a CPU) it models the good region from few points, handles the
    conditional space (each method has its own parameters; ``group=True`` fits them per method), honours
    ``trial.set_constraint`` (infeasible trials are ranked below feasible ones, c-TPE), supports several
    objectives (non-dominated sorting + hypervolume in its split), and ``constant_liar`` keeps parallel
    workers from proposing the same point. NSGA-II needs generations of ~population_size trials before it
    improves on random search, which is most of a small budget. ``grid`` (the paper study: every method x
    location set x keep ratio) uses Optuna's GridSampler, which visits each point once.
    """
    seed = (settings.seed * 1_000_003 + salt) % (2 ** 31)
    s = settings.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.name == "grid":
            if not grid:
                raise ValueError("sampler.name: 'grid' needs a grid space ([space] grid_locations, grid_keep_ratios "
                                 "and sample_options = false)")
            return optuna.samplers.GridSampler(grid, seed=seed)
        if s.name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
        if s.name == "gp":  # models only the params every completed trial has (Optuna's intersection space)
            return optuna.samplers.GPSampler(n_startup_trials=s.n_startup_trials, seed=seed,
                                             warn_independent_sampling=False)
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=s.n_startup_trials, seed=seed)


# ----------------------------------------------------------------------------- liveness
def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity(index: int = 0) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid), "index": index}


def worker_alive(worker: dict[str, Any] | None, heartbeat: float | None, now: float | None = None) -> bool:
    """Is the worker that runs a trial still there? (unknown workers count as alive until stale)."""
    now = time.time() if now is None else now
    if worker and worker.get("host") == socket.gethostname() and worker.get("pid"):
        pid = int(worker["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start = process_start_time(pid)
        return start is None or worker.get("start") is None or start == worker.get("start")
    return heartbeat is None or now - float(heartbeat) < STALE_AFTER_S


class Heartbeat:
    """Background thread writing the running trial's heartbeat time every `HEARTBEAT_S` seconds."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tpsx-heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._storage.set_trial_user_attr(self._trial_id, A_HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - the trial may have finished meanwhile
                return


def counted(trials: list[FrozenTrial]) -> int:
    """Trials that use up the --trials budget: finished or running, except interrupted ones (re-queued)."""
    n = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get(A_INTERRUPTED):
            n += 1
    return n


def retries_first(study: optuna.Study) -> optuna.Study:
    """Make ``study.ask()`` pop re-queued (interrupted) configs before other waiting trials.

    Optuna pops waiting trials oldest first, so a retry enqueued on resume would wait behind the enqueued
    defaults and could be starved by --trials. This replaces the study object's own pop (a private Optuna
    method, same contract: claim a WAITING trial by setting it RUNNING, return its id or None).
    """
    storage, study_id = study._storage, study._study_id

    def pop() -> int | None:
        waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        waiting = sorted(waiting, key=lambda t: (t.user_attrs.get(A_RETRY_OF) is None, t.number))
        for t in waiting:
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return t._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    if hasattr(study, "_pop_waiting_trial_id"):
        study._pop_waiting_trial_id = pop
    return study


def role(t: FrozenTrial) -> str:
    return t.user_attrs.get(A_ROLE, "sampled")


def recover(study: optuna.Study) -> tuple[list[int], list[int]]:
    """Fail RUNNING trials whose worker is gone and re-queue interrupted configs (once per trial, at most
    `MAX_RETRIES` times along a chain). Returns (numbers failed now, numbers re-queued)."""
    storage = study._storage
    failed: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(t.user_attrs.get(A_WORKER), t.user_attrs.get(A_HEARTBEAT)):
            continue
        phase = t.user_attrs.get(A_PHASE, "unknown phase")
        try:
            storage.set_trial_user_attr(t._trial_id, A_END, {
                "outcome": "failed", "reason": f"interrupted: the worker process ended during '{phase}' (killed or "
                                              "crashed); the config is re-queued"})
            storage.set_trial_user_attr(t._trial_id, A_INTERRUPTED, True)
            if storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(A_RETRY_OF) for t in trials if t.user_attrs.get(A_RETRY_OF) is not None}
    by_number = {t.number: t for t in trials}
    requeued: list[int] = []
    for t in trials:
        if t.state != TrialState.FAIL or not t.user_attrs.get(A_INTERRUPTED) or t.number in retried:
            continue
        depth, cur = 0, t
        while cur is not None and cur.user_attrs.get(A_RETRY_OF) is not None:
            depth += 1
            cur = by_number.get(cur.user_attrs[A_RETRY_OF])
        if depth >= MAX_RETRIES:
            continue
        study.enqueue_trial(dict(t.params), user_attrs={A_ROLE: role(t), A_RETRY_OF: t.number})
        requeued.append(t.number)
    return failed, requeued
