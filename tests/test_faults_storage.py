"""Storage faults, end to end through the CLI: a torn or damaged Optuna journal, another program's (or a corrupt)
SQLite file given as results.db, a process joined to a study leaving stale ``running`` rows, malformed
storage URLs, and a real PostgreSQL server (tests/pg.py) reached with the plain ``postgresql://`` URL the README
shows. Real smoke searches (studies/smoke.toml, a 4-block 64-wide ViT), real journals, real SQLite files and
real second processes; no mocks. Every fault asserts the exit code, one stderr line naming the value, and
byte-identical files where nothing may change."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from tpsexplore.cli import main
from tpsexplore.search.backend import (A_INTERRUPTED, A_WORKER, SearchJournalBackend, check_journal, counted,
                                       repair_journal)
from tpsexplore.storage import ForeignDatabaseError, ResultsStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
FAST = ["--confirm", "0", "--quiet"]  # resumes here test storage, not the confirmation stage
optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "TPSEXPLORE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _trials(journal: Path, name: str = "smoke") -> list:
    storage = JournalStorage(SearchJournalBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _frame(db: Path, name: str = "smoke"):
    with ResultsStore(db) as store:
        return store.trials_frame(name)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def finished(proxy_cache, tmp_path_factory) -> Path:
    """A finished 3-trial smoke study, run in a subprocess (its worker pid is gone, as after any real run)."""
    out = tmp_path_factory.mktemp("finished")
    res = subprocess.run([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(SMOKE), "--out", str(out),
                          "--trials", "3", *FAST], env=_env(proxy_cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "smoke"


def _copy(study_dir: Path, dest: Path) -> Path:
    shutil.copytree(study_dir, dest / "smoke", ignore=shutil.ignore_patterns(".coordinator.lock", "*.flock"))
    return dest / "smoke"


# ============================================================================= torn and damaged journals
def _torn_resumes(finished: Path, tmp_path: Path, capsys, count: int) -> None:
    """``count`` times: cut 1-200 bytes (seeded) off the finished journal, resume with one more trial."""
    original = (finished / "optuna.journal").read_bytes()
    before = {t.number: t.values for t in _trials(finished / "optuna.journal") if t.state == TrialState.COMPLETE}
    assert len(before) == 3
    rng = random.Random(20261129)
    for i in range(count):
        cut = rng.randint(1, 200)
        d = _copy(finished, tmp_path / f"cut{i}")
        journal = d / "optuna.journal"
        journal.write_bytes(original[:-cut])
        tail = check_journal(journal)
        assert tail is not None  # the finished journal ends with a record, so any cut leaves it torn
        capsys.readouterr()
        rc = main(["search", "--study", str(SMOKE), "--out", str(d.parent), "--trials", "4", *FAST])
        err = capsys.readouterr().err
        assert rc == 0, (cut, err[-2000:])
        notes = [line for line in err.splitlines() if "journal '" in line and str(journal) in line]
        assert len(notes) == 1, (cut, err)
        aside = sorted(d.glob("optuna.journal.torn-*"))
        if tail.whole:  # only the line end was cut: the record is completed, nothing set aside
            assert "lacked its line end" in notes[0] and not aside
        else:
            assert "torn record" in notes[0] and len(aside) == 1 and str(aside[0]) in notes[0]
            assert aside[0].read_bytes() == original[tail.offset:len(original) - cut]
        # the journal kept every complete record byte for byte, and still parses
        assert journal.read_bytes()[:tail.offset] == original[:tail.offset]
        assert check_journal(journal) is None
        trials = {t.number: t for t in _trials(journal)}
        for number, values in before.items():  # no completed trial lost
            assert trials[number].state == TrialState.COMPLETE and trials[number].values == values, (cut, number)
        assert counted(list(trials.values())) == 4, (cut, [(t.number, t.state) for t in trials.values()])
        assert not any(t.state == TrialState.RUNNING for t in trials.values())
        frame = _frame(d / "results.db").set_index("number")
        assert (frame["state"] != "running").all()
        for number, values in before.items():
            assert frame.loc[number, "state"] == "complete"
            assert frame.loc[number, "accuracy_top1@finetuned"] == values[0]
        shutil.rmtree(d.parent)


def test_torn_journal_resumes_20_random_cuts_without_losing_a_trial(finished, tmp_path, capsys):
    """Acceptance: 20 seeded cuts of 1-200 bytes; each resume (one trial more, ~1.5 s) reaches the count."""
    _torn_resumes(finished, tmp_path, capsys, count=20)


def test_torn_last_record_is_set_aside_by_the_next_append(finished, tmp_path):
    """A process appending after another one tore the end never glues its record onto the torn line."""
    d = _copy(finished, tmp_path)
    journal = d / "optuna.journal"
    original = journal.read_bytes()
    journal.write_bytes(original[:-40])
    storage = JournalStorage(SearchJournalBackend(str(journal)))
    study = optuna.load_study(study_name="smoke", storage=storage)
    study.set_user_attr("after_the_tear", 1)
    assert check_journal(journal) is None
    assert optuna.load_study(study_name="smoke", storage=JournalStorage(SearchJournalBackend(str(journal)))
                             ).user_attrs["after_the_tear"] == 1
    aside = list(d.glob("optuna.journal.torn-*"))
    assert len(aside) == 1 and original.endswith(aside[0].read_bytes() + original[-40:])
    assert repair_journal(journal) is None  # whole again: nothing to do


@pytest.mark.parametrize("damage", ["middle", "random", "not-a-record"])
def test_damaged_journal_is_refused_naming_file_and_line(finished, tmp_path, capsys, damage):
    d = _copy(finished, tmp_path)
    journal = d / "optuna.journal"
    original = journal.read_bytes()
    lines = original.splitlines(keepends=True)
    if damage == "middle":  # random bytes inside line 3: the records after it cannot be trusted
        bad = lines[:2] + [lines[2][:20] + random.Random(1).randbytes(30) + lines[2][20:]] + lines[3:]
        where = f"line 3 (byte {len(lines[0]) + len(lines[1])})"
    elif damage == "random":
        bad = [random.Random(2).randbytes(4000)]
        where = "line 1 (byte 0)"
    else:  # valid JSON that is not a journal record, at the end: not a torn write either
        bad = lines + [b'["a list"]\n']
        where = f"line {len(lines) + 1} (byte {len(original)})"
    journal.write_bytes(b"".join(bad))
    before = (_sha(journal), _sha(d / "results.db"), sorted(p.name for p in d.iterdir()))
    rc = main(["search", "--study", str(SMOKE), "--out", str(tmp_path), "--trials", "4", *FAST])
    err = _one_line(capsys)
    assert rc == 2 and str(journal) in err and where in err and "damaged" in err, err
    assert (_sha(journal), _sha(d / "results.db"), sorted(p.name for p in d.iterdir())) == before


# ============================================================================= foreign and corrupt SQLite
def _customers_db(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO customers (name) VALUES (?)", [("ada",), ("grace",)])
    conn.close()


def _corrupt_db(path: Path) -> None:
    """A SQLite header followed by random pages: SQLite itself reports the damage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"SQLite format 3\x00" + random.Random(3).randbytes(8192))


@pytest.mark.parametrize("make, needle", [(_customers_db, "holds tables tpsexplore did not write (customers)"),
                                          (_corrupt_db, "is corrupt or not a SQLite file")])
@pytest.mark.parametrize("command", ["search", "report", "export", "api"])
def test_foreign_or_corrupt_results_db_is_refused_read_only(proxy_cache, tmp_path, capsys, make, needle, command):
    db = tmp_path / "out" / "smoke" / "results.db"
    make(db)
    before, listing = _sha(db), sorted(os.listdir(db.parent))
    if command == "api":
        with pytest.raises(ValueError) as info:
            ResultsStore(db)
        err = str(info.value)
        assert len(err.splitlines()) == 1
        if make is _customers_db:
            assert isinstance(info.value, ForeignDatabaseError)
    else:
        args = {"search": ["search", "--study", str(SMOKE), "--out", str(tmp_path / "out"), *FAST],
                "report": ["report", str(db), "-o", str(tmp_path / "report")],
                "export": ["export", str(db), "-o", str(tmp_path / "deploy.json")]}[command]
        rc = main(args)
        err = _one_line(capsys)
        assert rc == 2, err
    assert needle in err and str(db) in err, err
    assert _sha(db) == before and sorted(os.listdir(db.parent)) == listing  # no -wal, -shm, journal, ...
    assert not (tmp_path / "report").exists() and not (tmp_path / "deploy.json").exists()


# ============================================================================= malformed storage URLs
@pytest.mark.parametrize("url, needle", [("postgresql://me:secret@db.example:notaport/tpsx", "port"),
                                         ("postgresql://me@db.example:0/tpsx", "port 0"),
                                         ("mongodb://me@db.example/tpsx", "scheme 'mongodb'")])
def test_malformed_storage_url_is_one_line(tmp_path, capsys, url, needle):
    rc = main(["search", "--study", str(SMOKE), "--out", str(tmp_path), "--storage", url, *FAST])
    err = _one_line(capsys)
    assert rc == 2 and needle in err and "storage" in err and "secret" not in err, err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError) as info:
        ResultsStore(url)
    assert len(str(info.value).splitlines()) == 1 and "secret" not in str(info.value)


# ============================================================================= a second process on one study
HOLDER = textwrap.dedent("""
    import os, sys, optuna
    from optuna.storages import JournalStorage
    from tpsexplore.search.backend import (A_END, A_INFO, A_RECORD, A_WORKER, SearchJournalBackend,
                                           worker_identity)
    study = optuna.load_study(study_name="smoke", storage=JournalStorage(SearchJournalBackend(sys.argv[1])))
    src = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE][-1]
    trial = study.ask()
    trial.set_user_attr(A_WORKER, worker_identity())
    trial.set_user_attr(A_INFO, src.user_attrs[A_INFO])
    print(trial.number, os.getpid(), flush=True)
    sys.stdin.readline()  # runs until the test says so
    trial.set_user_attr(A_RECORD, src.user_attrs[A_RECORD])
    trial.set_user_attr(A_END, {"outcome": "complete", "reason": None})
    study.tell(trial, values=src.values)
""")


def test_joined_process_keeps_no_stale_running_row(finished, proxy_cache, tmp_path, capsys):
    """A second `search` on the same journal ends while a trial runs in another process: its results.db
    must not keep that trial `running` (it did, forever); once the trial finishes, the next sync records it."""
    d = _copy(finished, tmp_path / "a")
    journal = d / "optuna.journal"
    # through a shell, so that the holder is not a child of this process (which runs the joined search and
    # counts its children as its own workers)
    holder = subprocess.Popen(["/bin/sh", "-c", '"$0" -c "$1" "$2"; rc=$?; exit $rc', sys.executable, HOLDER,
                               str(journal)], env=_env(proxy_cache), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        number, pid = map(int, holder.stdout.readline().split())
        running = [t for t in _trials(journal) if t.state == TrialState.RUNNING]
        assert [t.number for t in running] == [number]
        assert running[0].user_attrs[A_WORKER]["pid"] == pid != holder.pid
        joined = ["search", "--study", str(SMOKE), "--out", str(tmp_path / "b"), "--storage", str(journal),
                  "--trials", "4", *FAST]
        assert main(joined) == 0  # 3 complete + 1 running: the budget is used up, it only mirrors
        frame = _frame(tmp_path / "b" / "smoke" / "results.db")
        assert (frame["state"] != "running").all(), frame[["number", "state"]]
        assert sorted(frame["number"]) == [0, 1, 2]
        holder.stdin.write("finish\n")
        holder.stdin.flush()
        assert holder.wait(timeout=120) == 0, holder.stderr.read()[-2000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert main(joined) == 0
    trials = {t.number: t for t in _trials(journal)}
    frame = _frame(tmp_path / "b" / "smoke" / "results.db").set_index("number")
    assert sorted(frame.index) == [0, 1, 2, number]
    for n, row in frame.iterrows():  # every row follows Optuna's state
        assert row["state"] == trials[n].state.name.lower(), (n, row["state"], trials[n].state)
    assert frame.loc[number, "accuracy_top1@finetuned"] == trials[number].values[0]
    capsys.readouterr()


# ============================================================================= PostgreSQL
def _wait(pred, proc: subprocess.Popen, timeout: float = 240.0):
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"search ended early (rc {proc.returncode}): {proc.stderr.read()[-1500:]}")
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    proc.kill()
    pytest.fail("timed out waiting for the search")


def test_postgresql_plain_url_search_and_a_second_process_joins(proxy_cache, postgres_url, tmp_path):
    assert postgres_url.startswith("postgresql://") and "+" not in postgres_url.split("://")[0]  # README form
    name = "pg_join"
    study_file = tmp_path / "slow.toml"  # trials of ~1 s, so that the second process joins a running study
    study_file.write_text(SMOKE.read_text().replace("window_s = 0.02\nwindows = 1", "window_s = 0.1\nwindows = 2"))
    base = [sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study_file), "--storage", postgres_url,
            "--study-name", name, *FAST]
    # the first process stops at 4 trials and the second at 6, so the second surely runs trials of its own
    first = subprocess.Popen([*base, "--out", str(tmp_path / "a"), "--trials", "4"], env=_env(proxy_cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    storage = optuna.storages.RDBStorage(postgres_url)  # one connection pool for all the polling below

    def started() -> bool:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            return False
        return any(t.state == TrialState.COMPLETE for t in trials)

    try:
        _wait(started, first)
    except BaseException:
        storage.engine.dispose()
        raise
    second = subprocess.Popen([*base, "--out", str(tmp_path / "b"), "--trials", "6"], env=_env(proxy_cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err_b = second.communicate(timeout=600)
    _, err_a = first.communicate(timeout=600)
    assert first.returncode == 0, err_a[-2000:]
    assert second.returncode == 0, err_b[-2000:]
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    storage.engine.dispose()
    done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get(A_INTERRUPTED)]
    assert len(done) == 6 and not any(t.state == TrialState.RUNNING for t in trials)
    pids = {t.user_attrs[A_WORKER]["pid"] for t in done if A_WORKER in t.user_attrs}
    assert pids == {first.pid, second.pid}, pids  # both ran trials of the one study
    by_number = {t.number: t for t in trials}
    numbers = []
    for side in ("a", "b"):  # each process's results.db mirrors the study; no row is left running
        frame = _frame(tmp_path / side / name / "results.db", name)
        assert not (frame["state"] == "running").any(), (side, frame[["number", "state"]])
        assert all(row.state == by_number[row.number].state.name.lower() for row in frame.itertuples())
        numbers.append(set(frame["number"]))
    # the process that ended last saw every trial finish, the other process's included
    assert {t.number for t in done} in ({n for n in numbers[0]}, {n for n in numbers[1]}), numbers
