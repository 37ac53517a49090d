"""Optuna side of a search: the storage (journal file or RDB URL), the sampler, and worker liveness.

* Journal file (default, ``DIR/NAME/optuna.journal``): many processes on one machine append to one file
  under an ``fcntl.flock`` lock, so there is no "database is locked" and a process killed with -9 cannot
  leave a stale lock behind (the kernel drops the lock with the process). optuna-dashboard opens the file
  directly (``optuna-dashboard DIR/NAME/optuna.journal``).
* PostgreSQL URL: several machines share one study. SQLite URL: one worker only (checked by the settings).
* Liveness: every running trial records its worker (host, pid, process start time) and a heartbeat time.
  A RUNNING trial whose worker is gone (same host: the pid is dead or reused; other host: no heartbeat for
  `STALE_AFTER_S`) is what a kill -9 leaves behind; `recover` marks it failed and re-queues its config
  (or, when the worker had recorded its trial's end before dying, finishes the trial as recorded).
* Torn journal: a write cut short (full disk, crash, truncation) leaves the journal ending mid-record.
  `open_storage` (and every append) moves such a torn last record aside into ``<journal>.torn-<time>``,
  says so in one line and truncates the journal to its last complete record; a journal damaged anywhere
  else is refused with one line naming the file, line and byte offset (`check_journal`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import BaseJournalFileLock  # the lock interface JournalFileBackend takes
from optuna.trial import FrozenTrial, TrialState

from ..manifest import Storage, StudyLayout, parse_storage
from .spec import SearchSettings

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
        """Append whole records only: a torn tail left by another process is set aside first (so nothing is
        appended onto half a line), and a write that fails part-way (disk full) is cut back off."""
        from optuna.storages.journal._file import get_lock_file

        durable = any(self._durable(log) for log in logs)
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        with get_lock_file(self._lock):
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    note = repair_journal_locked(Path(self._file_path))
                    if note:
                        print(f"[search] {note}", file=sys.stderr)
                    size = os.fstat(fd).st_size
                view = memoryview(data)
                try:
                    while view:
                        view = view[os.write(fd, view):]
                    if durable:
                        os.fsync(fd)
                except OSError:
                    try:  # leave no torn record behind: the caller sees the error, the file its old end
                        os.ftruncate(fd, size)
                    except OSError:
                        pass
                    raise
            finally:
                os.close(fd)


@dataclass(frozen=True)
class TornTail:
    """The last record of a journal, cut short: it starts at byte ``offset`` (line ``line``, 1-based) and
    is ``data``; ``whole`` when it is a complete record that only lacks its line end."""

    offset: int
    line: int
    data: bytes
    whole: bool = False


RECORD_START = b'{"op_code":'
"""How every journal record begins (Optuna writes ``op_code`` first): a torn record begins so too."""


def _journal_record(line: bytes) -> str | None:
    """None if ``line`` is one journal record (a JSON object with an op_code), else what is wrong."""
    try:
        log = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return f"not a journal record ({' '.join(str(e).split())[:100]})"
    if not isinstance(log, dict) or not isinstance(log.get("op_code"), int):
        return "not a journal record (JSON without an op_code)"
    return None


def _torn_record(data: bytes) -> bool:
    """Could ``data`` be the start of a record cut short? (Not random bytes or another file's text.)"""
    return data.startswith(RECORD_START) or (len(data) > 0 and RECORD_START.startswith(data.rstrip(b"\n")))


def check_journal(path: str | os.PathLike[str]) -> TornTail | None:
    """Read ``path`` without changing it: None when every record is whole, the torn last record when only
    the end is cut short, and ValueError (one line naming the file, line and byte offset) for damage
    anywhere else, which cannot be repaired without losing records."""
    path = Path(path)
    if not path.exists():
        return None
    def damaged(number: int, offset: int, why: str) -> ValueError:
        return ValueError(f"storage: journal '{path}' is damaged at line {number} (byte {offset}): {why}; only a "
                          "torn last record can be set aside, so restore the file from a backup or start a new "
                          "study (--out or --study-name)")

    offset, bad, why = 0, None, ""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if bad is not None:  # a bad record followed by more: damage in the middle
                raise damaged(bad.line, bad.offset, why)
            if not line.endswith(b"\n"):  # the end of the file, cut short
                whole = _journal_record(line) is None
                if not whole and not _torn_record(line):
                    raise damaged(number, offset, _journal_record(line) or "")
                return TornTail(offset, number, line, whole=whole)
            why = _journal_record(line) or ""
            if why:
                bad = TornTail(offset, number, line)
            offset += len(line)
    if bad is not None and not _torn_record(bad.data):
        raise damaged(bad.line, bad.offset, why)
    return bad


def _aside_path(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.torn-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.torn-{stamp}.{n}")
        n += 1
    return aside


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def repair_journal_locked(path: Path) -> str | None:
    """Set a torn last record of ``path`` aside; the caller holds the journal lock. Returns the one-line note
    (None when the journal was whole); ValueError (`check_journal`) when it is damaged elsewhere."""
    tail = check_journal(path)
    if tail is None:
        return None
    if tail.whole:  # a complete record whose line end was not written: complete it, lose nothing
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return (f"storage: the last record of journal '{path}' (line {tail.line}) lacked its line end (an "
                "interrupted write); completed it")
    aside = _aside_path(path)
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, tail.data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, tail.offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return (f"storage: journal '{path}' ended in a torn record (line {tail.line}, {len(tail.data)} bytes from byte "
            f"{tail.offset}: an interrupted write); moved it to '{aside}' and resumed from the last complete record")


def repair_journal(path: str | os.PathLike[str]) -> str | None:
    """`repair_journal_locked` under the journal's lock (appending processes wait meanwhile)."""
    lock = FlockLock(os.fspath(path))
    lock.acquire()
    try:
        return repair_journal_locked(Path(path))
    finally:
        lock.release()


def storage_of(settings: SearchSettings) -> Storage:
    """The search's Optuna storage, parsed (`tpsexplore.manifest.parse_storage`; default: the study's journal)."""
    return parse_storage(settings.storage, StudyLayout(settings.study_dir).journal)


def journal_path(settings: SearchSettings) -> Path:
    return storage_of(settings).path


def storage_display(settings: SearchSettings) -> str:
    """The storage as shown to users (passwords hidden)."""
    return storage_of(settings).display


def open_storage(settings: SearchSettings, create: bool = True) -> optuna.storages.BaseStorage:
    """The Optuna storage of a search; ``create=False`` does not create a missing journal file."""
    kind = storage_of(settings).kind
    if kind == "journal":
        path = journal_path(settings)
        if not create:
            if not path.exists():
                return None
            check_journal(path)  # damage in the middle: one line; a torn end is ignored by reads, repaired below
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            note = repair_journal(path) if path.exists() else None
            if note:
                print(f"[search] {note}", file=sys.stderr)
        try:
            return JournalStorage(SearchJournalBackend(str(path)))
        except ValueError as e:  # damaged by someone else since the check
            raise ValueError(f"storage: journal '{path}' cannot be read: {' '.join(str(e).split())[:200]}") from None
    try:
        return optuna.storages.RDBStorage(settings.storage, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # noqa: BLE001 - connection/driver errors become one line
        raise ValueError(f"storage: cannot open {storage_display(settings)!r}: "
                         f"{' '.join(str(e).split())[:300]}") from None


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its stop on the last grid point: that `Study.stop` works only inside
    `Study.optimize` and raises from the search's ask/tell loop, which counts its own trials."""

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        return None


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
            return AskTellGridSampler(grid, seed=seed)
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


def process_parent(pid: int) -> int | None:
    """The parent pid of ``pid`` (field 4 of /proc/pid/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
        return int(text.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
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
    finished: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(t.user_attrs.get(A_WORKER), t.user_attrs.get(A_HEARTBEAT)):
            continue
        recorded = recorded_end(t)
        if recorded is not None:  # the worker recorded the trial's end, then died before telling Optuna
            state, values = recorded
            try:
                if A_END not in t.user_attrs:
                    storage.set_trial_user_attr(t._trial_id, A_END, {"outcome": "complete", "reason": None})
                if storage.set_trial_state_values(t._trial_id, state, values):
                    finished.setdefault(state.name.lower(), []).append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
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
    for state, numbers in finished.items():
        print(f"[search] trial(s) {', '.join(map(str, numbers))} had recorded their end before their worker "
              f"died; marked {state} as recorded", file=sys.stderr)
    return failed, requeued


def recorded_end(t: FrozenTrial) -> tuple[TrialState, list[float] | None] | None:
    """The end a (dead) worker recorded on a RUNNING trial before it could tell Optuna, or None.

    A worker writes the trial's outcome (`A_END`) and then tells Optuna; a kill, a crash or a torn journal
    between the two leaves the trial RUNNING with its results. A complete trial's values are the accuracy
    (`A_FINETUNED`, or `A_ZERO_SHOT` without fine-tuning) and the cost (`A_COST`). Saved weights
    (`A_WEIGHTS`, written right after the fine-tuned evaluation) also mean complete when the outcome record
    itself was lost. Interrupted failures return None: they are re-queued.
    """
    attrs = t.user_attrs
    outcome = end(t, "outcome")
    if outcome is None and A_WEIGHTS in attrs:
        outcome = "complete"
    if outcome == "complete":
        accuracy = attrs.get(A_FINETUNED, attrs.get(A_ZERO_SHOT))
        cost = attrs.get(A_COST)
        if not isinstance(accuracy, (int, float)) or not isinstance(cost, (int, float)):
            return None
        return TrialState.COMPLETE, [float(accuracy), float(cost)]
    if outcome in ("pruned", "infeasible"):
        return TrialState.PRUNED, None
    if outcome == "failed" and not attrs.get(A_INTERRUPTED):
        return TrialState.FAIL, None
    return None
