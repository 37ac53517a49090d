"""Results store: real SQLite files and a real throwaway PostgreSQL server (tests/pg.py), no mocks."""
from __future__ import annotations

import math
import os
import select
import shutil
import signal
import socket
import sqlite3
import tempfile
from datetime import timezone
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from tpsexplore.storage import (SCHEMA_VERSION, CorruptDatabaseError, ForeignDatabaseError, ResultsStore,
                                SchemaVersionError, StoreError, StudyMismatchError, measurement_column)

CONFIG = {"method": "etps", "locations": [1, 4, 7], "keep_ratios": [0.5], "treatment": None, "seed": 0}
ENV = {"cpu": "test-cpu", "torch": "2.x", "cuda": None}


def _fill(store: ResultsStore, name: str):
    """A small study: one complete trial with measurements, one pruned, one left running."""
    study = store.get_or_create_study(name, backbone="deit_s", budget=0.35,
                                      objectives=["accuracy_top1:maximize", "gmacs:minimize"],
                                      data="imagenet-val subset 512", weights="random",
                                      settings={"img_size": 224, "sampler": "tpe"})
    t0 = store.start_trial(study, 0, CONFIG, label="etps k0.5@1,4,7", optuna_trial_id=10, analytic_gmacs=1.61)
    store.add_measurements(t0, [
        {"kind": "gmacs", "value": 1.61, "unit": "GMAC", "fidelity": "analytic", "provenance": "analytic"},
        {"kind": "throughput", "value": 812.5, "unit": "img/s", "batch_size": 64, "dtype": "fp32",
         "device": "cpu", "extra": {"repeats": 3}},
    ], environment=ENV)
    store.add_measurements(t0, [{"kind": "accuracy_top1", "value": 0.61, "fidelity": "finetuned"}],
                           environment=dict(reversed(list(ENV.items()))))  # same content, other key order
    store.finish_trial(t0, "complete", durations={"build": 0.5, "measure": 2.0}, feasible=True,
                       constraint_value=-0.2)
    t1 = store.start_trial(study, 1, {"method": "tome", "r": 8}, worker="w1", host="h1")
    store.add_measurements(t1, [{"kind": "gmacs", "value": 2.0, "fidelity": "analytic"}],
                           environment={**ENV, "cpu": "other"})
    store.finish_trial(t1, "pruned", reason="pruned at step 1")
    t2 = store.start_trial(study, 2, {"method": "none"})
    return study, (t0, t1, t2)


def _check_filled(store: ResultsStore, name: str, ids: tuple[int, int, int]) -> None:
    """What `_fill` wrote reads back the same through every view."""
    t0, t1, t2 = ids
    (study,) = [s for s in store.studies() if s.name == name]
    assert (study.backbone, study.budget, study.objectives) == ("deit_s", 0.35,
                                                               ("accuracy_top1:maximize", "gmacs:minimize"))
    assert study.settings == {"img_size": 224, "sampler": "tpe"} and study.schema_version == SCHEMA_VERSION
    assert study.created.tzinfo is not None

    df = store.trials_frame(name)
    assert list(df.trial_id) == [t0, t1, t2] and list(df.number) == [0, 1, 2]
    assert list(df.state) == ["complete", "pruned", "running"]
    assert list(df.method) == ["etps", "tome", "none"]
    first = df.iloc[0]
    assert first["label"] == "etps k0.5@1,4,7" and first["optuna_trial_id"] == 10
    assert first["config.locations"] == (1, 4, 7) and first["config.keep_ratios"] == (0.5,)
    assert first["time.build"] == 0.5 and first["time.measure"] == 2.0
    assert bool(first["feasible"]) is True and first["analytic_gmacs"] == pytest.approx(1.61)
    assert first["constraint_value"] == pytest.approx(-0.2)
    assert first["duration_s"] >= 0 and first["started"].tzinfo is not None
    assert first["gmacs@analytic"] == pytest.approx(1.61)
    assert first["throughput@bs64/fp32/cpu"] == pytest.approx(812.5)
    assert first["accuracy_top1@finetuned"] == pytest.approx(0.61)
    assert df.iloc[1]["config.r"] == 8 and df.iloc[1]["reason"] == "pruned at step 1"
    assert (df.iloc[1]["worker"], df.iloc[1]["host"]) == ("w1", "h1")
    assert math.isnan(df.iloc[1]["accuracy_top1@finetuned"]) and pd.isna(df.iloc[2]["finished"])

    mf = store.measurements_frame(name)
    assert len(mf) == 4 and set(mf.kind) == {"gmacs", "throughput", "accuracy_top1"}
    thr = mf[mf.kind == "throughput"].iloc[0]
    assert (thr.unit, thr.batch_size, thr.extra, thr.column) == ("img/s", 64, {"repeats": 3},
                                                                 "throughput@bs64/fp32/cpu")
    # the same environment content (any key order) is stored once; a different one gets its own row
    env_ids = mf.set_index("kind").environment_id
    assert env_ids["throughput"] == env_ids["accuracy_top1"]
    assert mf[mf.trial_id == t1].environment_id.iloc[0] != env_ids["throughput"]
    assert store.environment(int(env_ids["throughput"])) == ENV
    assert len(store.measurements_frame(name, trial_id=t0, kind="gmacs")) == 1


def test_round_trip_in_sqlite_file_survives_reopen(tmp_path):
    path = tmp_path / "sub" / "results.db"  # missing parent directories are created
    with ResultsStore(path) as store:
        _, ids = _fill(store, "s1")
        _check_filled(store, "s1", ids)
    with ResultsStore(str(path)) as again:  # a fresh engine reads what the first one committed
        _check_filled(again, "s1", ids)
        assert again.schema_version() == SCHEMA_VERSION
        trials = pd.read_sql_table("tpsx_trials", again.engine)  # documented direct pandas access
        assert list(trials.number) == [0, 1, 2] and trials.config[0]["locations"] == [1, 4, 7]
    with ResultsStore(f"sqlite:///{path}") as by_url:
        assert [s.name for s in by_url.studies()] == ["s1"]


def test_sqlite_uses_wal_foreign_keys_and_busy_timeout(tmp_path):
    path = tmp_path / "r.db"
    with ResultsStore(path, busy_timeout_s=7) as store:
        store.get_or_create_study("s")
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 7000
    with sqlite3.connect(path) as raw:  # WAL is a property of the file, seen by any reader
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT value FROM tpsx_meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_trials_frame_pivot_names_newest_value_and_study_filter(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        assert list(store.trials_frame().columns[:3]) == ["trial_id", "study", "number"]  # empty store
        a = store.get_or_create_study("a")
        b = store.get_or_create_study("b")
        ta = store.start_trial(a, 0, {"method": "evit", "locations": [3]})
        tb = store.start_trial(b, 0, {"method": "none"})
        store.add_measurements(ta, [{"kind": "accuracy_top1", "value": 0.5, "fidelity": "zero_shot"},
                                    {"kind": "latency", "value": 3.0, "batch_size": 1, "dtype": "bf16",
                                     "device": "cuda:0"},
                                    {"kind": "params", "value": 22.0}])
        store.add_measurements(ta, [{"kind": "accuracy_top1", "value": 0.55, "fidelity": "zero_shot"}])
        store.add_measurements(tb, [{"kind": "gmacs", "value": 4.6, "fidelity": "traced",
                                     "provenance": "fvcore+sdpa"}])
        df = store.trials_frame()
        assert list(df.study) == ["a", "b"]
        meas_cols = sorted(c for c in df.columns if c in {"accuracy_top1@zero_shot", "latency@bs1/bf16/cuda:0",
                                                          "params", "gmacs@traced"})
        assert meas_cols == ["accuracy_top1@zero_shot", "gmacs@traced", "latency@bs1/bf16/cuda:0", "params"]
        assert df.iloc[0]["accuracy_top1@zero_shot"] == 0.55  # the newest of repeated measurements wins
        assert math.isnan(df.iloc[1]["params"]) and df.iloc[1]["gmacs@traced"] == 4.6
        only_b = store.trials_frame("b")
        assert list(only_b.trial_id) == [tb] and "params" not in only_b.columns
        assert list(store.trials_frame(a).trial_id) == [ta]
    assert measurement_column("throughput", batch_size=64, dtype="fp32", device="cpu") == "throughput@bs64/fp32/cpu"
    assert measurement_column("gmacs", "analytic") == "gmacs@analytic"
    assert measurement_column("accuracy_top1", "finetuned", 128) == "accuracy_top1@finetuned/bs128"


def _corrupt_pages(path: Path) -> None:
    """A real store file whose table pages (all but the first) are overwritten with junk."""
    with ResultsStore(path) as store:
        study = store.get_or_create_study("s", settings={"pad": "x" * 20000})
        for n in range(20):
            store.start_trial(study, n, {"method": "none", "pad": "y" * 500})
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        raw.execute("PRAGMA journal_mode=DELETE")
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = bytes((i * 37 + 11) % 251 for i in range(len(data) - page))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("make", ["text", "pages"])
def test_corrupt_file_is_refused_and_left_untouched(tmp_path, make):
    path = tmp_path / "x.db"
    if make == "text":
        path.write_text("trial,accuracy\n0,0.7\n")
    else:
        _corrupt_pages(path)
    before = path.read_bytes()
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(CorruptDatabaseError) as info:
        ResultsStore(path)
    msg = str(info.value)
    assert msg.startswith(f"results database '{path}' is corrupt or not a SQLite file: ") and "\n" not in msg
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


def test_other_schema_versions_are_refused(tmp_path):
    path = tmp_path / "r.db"
    ResultsStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE tpsx_meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(SchemaVersionError, match=r"schema version '999'; this tpsexplore reads schema version 1"):
        ResultsStore(path)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE tpsx_trials (id INTEGER PRIMARY KEY, x TEXT)")
    with pytest.raises(SchemaVersionError, match="no 'tpsx_meta' table"):
        ResultsStore(foreign)
    unrelated = tmp_path / "unrelated.db"  # another program's database: refused read-only, never written
    with sqlite3.connect(unrelated) as raw:
        raw.execute("CREATE TABLE notes (t TEXT)")
    before = unrelated.read_bytes()
    with pytest.raises(ForeignDatabaseError, match=r"holds tables tpsexplore did not write \(notes\)"):
        ResultsStore(unrelated)
    assert unrelated.read_bytes() == before
    assert not any(p.name.startswith("unrelated.db-") for p in tmp_path.iterdir())  # no -wal / -shm


def test_study_with_other_settings_is_refused(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        study = store.get_or_create_study("main", backbone="deit_s", budget=0.35, settings={"img_size": 224})
        assert store.get_or_create_study("main", backbone="deit_s").id == study.id  # matching: same study
        with pytest.raises(StudyMismatchError) as info:
            store.get_or_create_study("main", backbone="deit_t", budget=0.35)
        assert str(info.value).startswith("backbone: 'deit_t' does not match 'deit_s' stored for study 'main'")
        with pytest.raises(StudyMismatchError, match=r"^budget: 0.5 does not match 0.35"):
            store.open_study("main", backbone="deit_s", budget=0.5)
        with pytest.raises(StudyMismatchError, match=r"^img_size: 384 does not match 224"):
            store.open_study("main", img_size=384)
        assert store.open_study("main", backbone="deit_s", budget=0.35, img_size=224).id == study.id
        with pytest.raises(StoreError, match=r"^study: 'other' not found in results database .*existing: main$"):
            store.open_study("other")
        assert len(store.studies()) == 1


def _as_nobody(fn):
    """Run ``fn()`` in a forked child with root's privileges dropped; return its error message or ''."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                msg = ""
            except Exception as e:  # noqa: BLE001 - the message goes back to the parent
                msg = f"{type(e).__name__}|{e}"
            os.write(write_end, msg.encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 30)
    out = os.read(read_end, 65536).decode() if ready else "timeout"
    os.close(read_end)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return out


def test_unwritable_directory_is_refused(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"^results database '.*/plain-file/r.db': directory '.*' is not writable"):
        ResultsStore(blocker / "r.db")
    with pytest.raises(StoreError, match="is a directory"):
        ResultsStore(tmp_path)

    # pytest's tmp_path lies in a root-only directory, so use one an unprivileged user can reach
    base = Path(tempfile.mkdtemp(prefix="tpsx-ro-"))
    locked = base / "locked"
    locked.mkdir()
    base.chmod(0o755)
    locked.chmod(0o555)
    target = locked / "r.db"
    try:
        if os.geteuid() == 0:  # root writes anywhere: drop privileges in a child to get a real EACCES
            ResultsStore(tmp_path / "warmup.db").close()  # load every module before giving up access
            msg = _as_nobody(lambda: ResultsStore(target))
        else:
            with pytest.raises(StoreError) as info:
                ResultsStore(target)
            msg = f"StoreError|{info.value}"
        assert not target.exists()
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)
    assert msg == f"StoreError|results database '{target}': directory '{locked}' is not writable: Permission denied"


def test_resume_after_kill_marks_running_trials_failed(tmp_path):
    path = tmp_path / "r.db"
    with ResultsStore(path) as store:
        study, (t0, t1, t2) = _fill(store, "s")
    pid = os.fork()
    if pid == 0:  # a search process that dies with kill -9 while two trials run
        try:
            child = ResultsStore(path)
            child.start_trial("s", 3, {"method": "none"})
            child.start_trial("s", 4, {"method": "none"})
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    with ResultsStore(path) as store:
        assert list(store.trials_frame("s").state) == ["complete", "pruned", "running", "running", "running"]
        assert store.mark_running_as_failed(study, "search was killed; resumed") == [2, 3, 4]
        df = store.trials_frame("s")
        assert list(df.state) == ["complete", "pruned", "failed", "failed", "failed"]
        assert set(df.reason[2:]) == {"search was killed; resumed"} and df.finished[2:].notna().all()
        assert store.mark_running_as_failed("s", "again") == []
        with pytest.raises(StoreError, match=r"^trial_id: trial 2 .* is already 'failed'"):
            store.finish_trial(t2, "complete")
        with pytest.raises(StoreError, match=r"^number: trial 3 already exists in study 's'"):
            store.start_trial(study, 3, {"method": "none"})


def test_each_write_is_one_transaction(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        study = store.get_or_create_study("s")
        tid = store.start_trial(study, 0, {"method": "none"})
        with store.engine.begin() as conn:  # the database itself rejects the second row of the batch
            conn.execute(text("CREATE TRIGGER boom BEFORE INSERT ON tpsx_measurements WHEN NEW.kind = 'boom' "
                              "BEGIN SELECT RAISE(ABORT, 'boom rejected'); END"))
        with pytest.raises(SQLAlchemyError, match="boom rejected"):
            store.add_measurements(tid, [{"kind": "gmacs", "value": 1.0}, {"kind": "boom", "value": 2.0}],
                                   environment={"new": "environment"})
        assert store.measurements_frame().empty
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM tpsx_environments")).scalar() == 0
        with pytest.raises(ValueError, match=r"^measurements\[1\].value: 'fast' is not a number$"):
            store.add_measurements(tid, [{"kind": "gmacs", "value": 1.0}, {"kind": "latency", "value": "fast"}])
        assert store.measurements_frame().empty


@pytest.mark.parametrize("call, message", [
    (lambda s, t: s.add_measurements(t, [{"kind": "gmacs", "value": 1, "colour": "red"}]),
     r"^measurements\[0\]: unknown key 'colour'; allowed: kind, value, unit"),
    (lambda s, t: s.add_measurements(t, [{"kind": "gmacs", "value": float("nan")}]),
     r"^measurements\[0\].value: nan is not a finite number$"),
    (lambda s, t: s.add_measurements(t, [{"kind": "acc@x", "value": 1}]),
     r"^measurements\[0\].kind: 'acc@x' is not a name of letters"),
    (lambda s, t: s.finish_trial(t, "done"),
     r"^state: 'done' is not one of complete, failed, pruned, infeasible$"),
    (lambda s, t: s.finish_trial(t, "complete", durations={"measure": -1}),
     r"^durations\['measure'\]: -1 is not a number of seconds >= 0$"),
    (lambda s, t: s.start_trial("s", 1, {"x": float("inf")}), r"^config: not storable as JSON"),
    (lambda s, t: s.add_measurements(999, [{"kind": "gmacs", "value": 1}]), r"^trial_id: 999 not found"),
    (lambda s, t: ResultsStore("mysql://u@h/db"), r"^results database: 'mysql://u@h/db' uses backend 'mysql'"),
])
def test_bad_input_gives_one_line_value_error(tmp_path, call, message):
    with ResultsStore(tmp_path / "r.db") as store:
        tid = store.start_trial(store.get_or_create_study("s"), 0, {"method": "none"})
        with pytest.raises(ValueError, match=message) as info:
            call(store, tid)
        assert "\n" not in str(info.value)
        assert list(store.trials_frame().state) == ["running"]  # nothing was changed by the failed call


def test_unreachable_postgres_fails_fast_with_one_line():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match=rf"^results database 'postgresql://u:\*\*\*@127.0.0.1:{port}/db' cannot "
                                         "be opened: .*") as info:
        ResultsStore(f"postgresql://u:secret@127.0.0.1:{port}/db", connect_timeout_s=3)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_same_api_against_real_postgres(postgres_url):
    with ResultsStore(postgres_url) as store:
        assert store.backend == "postgresql"
        study, ids = _fill(store, "pg-study")
        _check_filled(store, "pg-study", ids)
        with pytest.raises(StudyMismatchError, match="^backbone: 'vit_b16' does not match 'deit_s'"):
            store.get_or_create_study("pg-study", backbone="vit_b16")
        assert store.mark_running_as_failed(study, "resumed") == [2]
        with pytest.raises(ValueError, match=r"^measurements\[1\].value"):
            store.add_measurements(ids[0], [{"kind": "gmacs", "value": 1.0}, {"kind": "gmacs", "value": None}])
    with ResultsStore(postgres_url) as again:  # tables exist now: the schema version is checked, data kept
        assert again.schema_version() == SCHEMA_VERSION
        df = again.trials_frame("pg-study")
        assert list(df.state) == ["complete", "pruned", "failed"]
        assert df.iloc[0]["finished"].tzinfo == timezone.utc
        assert len(pd.read_sql_table("tpsx_measurements", again.engine)) == 4
        with again.engine.begin() as conn:
            conn.execute(text("UPDATE tpsx_meta SET value='0' WHERE key='schema_version'"))
        try:
            with pytest.raises(SchemaVersionError, match="schema version '0'"):
                ResultsStore(postgres_url)
        finally:  # the server is shared by the whole test session
            with again.engine.begin() as conn:
                conn.execute(text(f"UPDATE tpsx_meta SET value='{SCHEMA_VERSION}' WHERE key='schema_version'"))
