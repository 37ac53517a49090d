"""`ResultsStore`: the SQLite/PostgreSQL database a search writes its studies, trials and measurements to.

Design:

- A file path means SQLite (WAL journal, ``busy_timeout``, foreign keys on). The store has a single writer
  by design: the search process writes here, while Optuna's own workers use Optuna's storage. Readers
  (notebooks, reports) may open the same file at any time; WAL lets them read while the writer writes.
- A URL (``sqlite:///path``, ``postgresql://user@host/db``) selects the backend explicitly.
- Every public write is one transaction: it either lands completely or not at all.
- Tables are created on first use; the ``meta`` table holds the schema version and a database with another
  (or no) version is refused with one clear line.
- A file that is not a SQLite database, is damaged, holds tables another program wrote, or has another schema
  version is checked read-only (``mode=ro``) first and refused with one line, left byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from sqlalchemy import Engine, URL, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from ..errors import one_line
from .errors import CorruptDatabaseError, ForeignDatabaseError, SchemaVersionError, StoreError, StudyMismatchError
from .frames import TRIAL_COLUMNS, build_measurements_frame, build_trials_frame, measurement_column
from .schema import (DATA_TABLES, META_TABLE, FINAL_TRIAL_STATES, SCHEMA_VERSION, Base, EnvironmentRow, MeasurementRow,
                     Meta, StudyRow, TrialRow, utcnow)

SQLITE_HEADER = b"SQLite format 3\x00"
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
STUDY_FIELDS = ("backbone", "budget", "objectives", "data", "weights", "tpsexplore_version")
MEASUREMENT_KEYS = ("kind", "value", "unit", "batch_size", "dtype", "device", "fidelity", "provenance", "extra")
KNOWN_KINDS = ("gflops", "gmacs", "params", "throughput", "latency", "energy", "accuracy_top1", "accuracy_top5")
"""Common measurement kinds (any name matching ``[A-Za-z0-9_.-]+`` is accepted)."""
FIDELITIES = ("analytic", "traced", "zero_shot", "finetuned")
"""Common fidelities (any name matching ``[A-Za-z0-9_.-]+`` is accepted)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Study:
    """A read-only snapshot of one ``studies`` row."""

    id: int
    name: str
    created: datetime
    backbone: str | None
    budget: float | None
    objectives: tuple[str, ...]
    data: str | None
    weights: str | None
    settings: dict[str, Any] = field(hash=False)
    tpsexplore_version: str | None = None
    schema_version: int = SCHEMA_VERSION


class ResultsStore:
    """Results database of tpsexplore studies; see the module docstring and docs/schema.md.

    Args:
        url_or_path: a file path (SQLite) or a SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``).
        busy_timeout_s: how long SQLite waits for a lock held by another connection before failing.
        connect_timeout_s: how long a PostgreSQL connection attempt may take.
        echo: log every SQL statement (debugging).
    """

    def __init__(self, url_or_path: str | os.PathLike[str], *, busy_timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0, echo: bool = False) -> None:
        url, self.display = _resolve_url(url_or_path)
        backend = url.get_backend_name()
        self.backend = backend
        sqlite_file = backend == "sqlite" and url.database not in (None, "", ":memory:")
        if sqlite_file:
            _check_sqlite_file(Path(url.database).expanduser(), self.display, busy_timeout_s)
        kwargs: dict[str, Any] = {"echo": echo}
        if backend == "sqlite":
            kwargs["connect_args"] = {"timeout": busy_timeout_s}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": max(1, int(math.ceil(connect_timeout_s)))}
        try:
            self._engine = create_engine(url, **kwargs)
        except ImportError as e:  # a driver missing: plain postgresql:// URLs need psycopg 3
            raise StoreError(f"results database {self.display!r} cannot be opened: {one_line(e)} (install "
                             "tpsexplore's dependencies: pip install 'psycopg[binary]')") from None
        except ArgumentError as e:
            raise StoreError(f"results database {self.display!r} cannot be opened: {one_line(e)}") from None
        if backend == "sqlite":
            _install_sqlite_hooks(self._engine, busy_timeout_s, wal=sqlite_file)
        try:
            self._init_schema()
        except StoreError:
            self._engine.dispose()
            raise
        except SQLAlchemyError as e:
            self._engine.dispose()
            raise StoreError(f"results database {self.display!r} cannot be opened: {one_line(e)}") from None

    # ------------------------------------------------------------------ plumbing
    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, e.g. for ``pd.read_sql_table('tpsx_trials', store.engine)``."""
        return self._engine

    def close(self) -> None:
        """Release all connections (the store cannot be used afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsStore({self.display!r})"

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success, rolls back on error."""
        with self._engine.connect() as conn:
            conn.execution_options(tpsx_write=True)
            with conn.begin():
                with Session(bind=conn, expire_on_commit=False) as session:
                    yield session
                    session.flush()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as session:
            yield session

    def _init_schema(self) -> None:
        with self._engine.connect() as conn:
            conn.execution_options(tpsx_write=True)
            with conn.begin():
                names = set(inspect(conn).get_table_names())
                if META_TABLE in names:
                    found = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
                    if found != str(SCHEMA_VERSION):
                        raise SchemaVersionError(
                            f"results database {self.display!r} has schema version {found!r}; this tpsexplore "
                            f"reads schema version {SCHEMA_VERSION} only (use a new database file)")
                elif names & set(DATA_TABLES):
                    raise SchemaVersionError(
                        f"results database {self.display!r} has tables {sorted(names & set(DATA_TABLES))} but "
                        "no 'tpsx_meta' table, so it was not written by tpsexplore (use a new database file)")
                Base.metadata.create_all(conn)
                if META_TABLE not in names:
                    version = _package_version() or "unknown"
                    conn.execute(Meta.__table__.insert(), [
                        {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                        {"key": "created_by", "value": f"tpsexplore {version}"},
                        {"key": "created", "value": utcnow().isoformat()},
                    ])

    def schema_version(self) -> int:
        """The schema version recorded in the database's ``meta`` table."""
        with self._read() as s:
            return int(s.scalar(select(Meta.value).where(Meta.key == "schema_version")))

    # ------------------------------------------------------------------ studies
    def get_or_create_study(self, name: str, *, backbone: str | None = None, budget: float | None = None,
                            objectives: Sequence[str] | str | None = None, data: str | None = None,
                            weights: str | None = None, settings: Mapping[str, Any] | None = None,
                            tpsexplore_version: str | None = None) -> Study:
        """Return study ``name``, creating it with these fields if it does not exist.

        For an existing study every field given here (not None, tpsexplore_version aside) must equal the
        stored one, else `StudyMismatchError`. ``settings`` (free JSON) are stored at creation and not
        compared; pass keys that must match to `open_study`.
        """
        name = _check_name(name)
        given = _study_fields(backbone=backbone, budget=budget, objectives=objectives, data=data,
                              weights=weights, tpsexplore_version=tpsexplore_version)
        settings_json = _to_json("settings", dict(settings or {}))
        with self._write() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                row = StudyRow(name=name, settings=settings_json, schema_version=SCHEMA_VERSION,
                               **{k: given.get(k) for k in STUDY_FIELDS if k != "tpsexplore_version"},
                               tpsexplore_version=given.get("tpsexplore_version") or _package_version())
                if row.objectives is None:
                    row.objectives = []
                s.add(row)
                s.flush()
            else:  # the version that created the study is a record, not an identity: resuming may upgrade
                self._check_expected(row, {k: v for k, v in given.items() if k != "tpsexplore_version"})
            return _study(row)

    def open_study(self, name: str, **expected: Any) -> Study:
        """Return the existing study ``name`` after checking ``expected`` against it.

        Keys of ``expected`` are study fields (backbone, budget, objectives, data, weights, tpsexplore_version)
        or keys of its settings JSON; each must equal the stored value, else `StudyMismatchError`.
        """
        name = _check_name(name)
        with self._read() as s:
            row = s.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                existing = s.scalars(select(StudyRow.name).order_by(StudyRow.id)).all()
                raise StoreError(f"study: {name!r} not found in results database {self.display!r}; existing: "
                                 f"{', '.join(existing) or 'none'}")
            fields_ = {k: v for k, v in expected.items() if k in STUDY_FIELDS}
            checked = _study_fields(**fields_, keep_none=True)
            checked.update({k: _to_json(k, v) for k, v in expected.items() if k not in STUDY_FIELDS})
            self._check_expected(row, checked)
            return _study(row)

    def studies(self) -> list[Study]:
        """All studies, oldest first."""
        with self._read() as s:
            return [_study(r) for r in s.scalars(select(StudyRow).order_by(StudyRow.id))]

    def _check_expected(self, row: StudyRow, expected: Mapping[str, Any]) -> None:
        for key, want in expected.items():
            if key in STUDY_FIELDS:
                have = getattr(row, key)
            else:
                have = (row.settings or {}).get(key, "<not set>")
            if not _same(want, have):
                raise StudyMismatchError(
                    f"{key}: {want!r} does not match {have!r} stored for study {row.name!r} in results "
                    f"database {self.display!r}; use another study name or database")

    def _study_row(self, s: Session, study: Study | str | int) -> StudyRow:
        if isinstance(study, Study):
            row = s.get(StudyRow, study.id)
        elif isinstance(study, str):
            row = s.scalar(select(StudyRow).where(StudyRow.name == study))
        elif isinstance(study, int) and not isinstance(study, bool):
            row = s.get(StudyRow, study)
        else:
            raise ValueError(f"study: {study!r} is not a Study, study name or study id")
        if row is None:
            raise StoreError(f"study: {getattr(study, 'name', study)!r} not found in results database "
                             f"{self.display!r}")
        return row

    # ------------------------------------------------------------------ trials
    def start_trial(self, study: Study | str | int, number: int, config: Mapping[str, Any] | Any, *,
                    method: str | None = None, label: str | None = None, worker: str | None = None,
                    host: str | None = None, optuna_trial_id: int | None = None, feasible: bool | None = None,
                    analytic_gmacs: float | None = None, constraint_value: float | None = None,
                    started: datetime | None = None) -> int:
        """Record a running trial and return its id.

        ``config`` is a ReductionConfig dict (or any object with ``to_dict()``); ``method`` and ``label``
        default to the config's. ``number`` is the Optuna trial number, unique within a study. ``worker``
        defaults to ``pid:<pid>``, ``host`` to this machine's hostname.
        """
        number = _check_int("number", number, minimum=0)
        if not isinstance(config, Mapping) and callable(getattr(config, "to_dict", None)):
            if label is None and isinstance(getattr(config, "label", None), str):
                label = config.label
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(f"config: {type(config).__name__} is not a dict (give ReductionConfig.to_dict())")
        config_json = _to_json("config", dict(config))
        if method is None and isinstance(config_json.get("method"), str):
            method = config_json["method"]
        values = {
            "method": _check_str("method", method), "label": _check_str("label", label),
            "worker": _check_str("worker", worker) or f"pid:{os.getpid()}",
            "host": _check_str("host", host) or socket.gethostname(),
            "optuna_trial_id": _check_int("optuna_trial_id", optuna_trial_id, minimum=0),
            "feasible": _check_bool("feasible", feasible),
            "analytic_gmacs": _check_float("analytic_gmacs", analytic_gmacs),
            "constraint_value": _check_float("constraint_value", constraint_value),
        }
        with self._write() as s:
            srow = self._study_row(s, study)
            clash = s.scalar(select(TrialRow).where(TrialRow.study_id == srow.id, TrialRow.number == number))
            if clash is not None:
                raise StoreError(f"number: trial {number} already exists in study {srow.name!r} (state "
                                 f"{clash.state!r}); Optuna trial numbers are unique within a study")
            row = TrialRow(study_id=srow.id, number=number, config=config_json, state="running",
                           started=started or utcnow(), durations={}, **values)
            s.add(row)
            s.flush()
            return row.id

    def finish_trial(self, trial_id: int, state: str, reason: str | None = None,
                     durations: Mapping[str, float] | None = None, *, feasible: bool | None = None,
                     analytic_gmacs: float | None = None, constraint_value: float | None = None,
                     finished: datetime | None = None) -> None:
        """Close a running trial with a final ``state`` (complete/failed/pruned/infeasible).

        ``reason`` says why it stopped (error text, pruning or infeasibility reason). ``durations`` are
        seconds by phase (e.g. ``{"build": 0.3, "measure": 4.1}``), merged into those already stored. The
        keyword fields overwrite the trial's values when given.
        """
        if state not in FINAL_TRIAL_STATES:
            raise ValueError(f"state: {state!r} is not one of {', '.join(FINAL_TRIAL_STATES)}")
        phases = _check_durations(durations)
        updates = {"feasible": _check_bool("feasible", feasible),
                   "analytic_gmacs": _check_float("analytic_gmacs", analytic_gmacs),
                   "constraint_value": _check_float("constraint_value", constraint_value)}
        reason = _check_str("reason", reason, limit=None)
        with self._write() as s:
            row = self._trial_row(s, trial_id)
            if row.state != "running":
                raise StoreError(f"trial_id: trial {row.number} (id {row.id}) is already {row.state!r}; only "
                                 "running trials can be finished")
            row.state = state
            row.reason = reason
            row.finished = finished or utcnow()
            row.durations = {**(row.durations or {}), **phases}
            for key, value in updates.items():
                if value is not None:
                    setattr(row, key, value)

    def mark_running_as_failed(self, study: Study | str | int, reason: str) -> list[int]:
        """Mark the study's running trials failed (resume after a crash or kill -9); return their numbers."""
        reason = _check_str("reason", reason, limit=None)
        if not reason:
            raise ValueError("reason: an empty reason is not allowed; say why the trials are marked failed")
        with self._write() as s:
            srow = self._study_row(s, study)
            rows = s.scalars(select(TrialRow).where(TrialRow.study_id == srow.id, TrialRow.state == "running")
                             .order_by(TrialRow.number)).all()
            now = utcnow()
            for row in rows:
                row.state, row.reason, row.finished = "failed", reason, now
            return [r.number for r in rows]

    def _trial_row(self, s: Session, trial_id: int) -> TrialRow:
        trial_id = _check_int("trial_id", trial_id, minimum=1)
        row = s.get(TrialRow, trial_id)
        if row is None:
            raise StoreError(f"trial_id: {trial_id} not found in results database {self.display!r}")
        return row

    # ------------------------------------------------------------------ measurements
    def add_measurements(self, trial_id: int, measurements: Sequence[Mapping[str, Any]],
                         environment: Mapping[str, Any] | None = None) -> list[int]:
        """Store measurements of a trial (any state) and return their ids.

        Each item has ``kind`` and ``value`` and optionally ``unit``, ``batch_size``, ``dtype``, ``device``,
        ``fidelity``, ``provenance`` (the counter, e.g. ``'fvcore+sdpa'``) and ``extra`` (JSON). All of them
        reference ``environment`` (hardware/software JSON), stored once per distinct content.
        """
        if isinstance(measurements, Mapping) or not isinstance(measurements, Sequence):
            raise ValueError("measurements: expected a list of dicts, got "
                             f"{type(measurements).__name__}")
        items = [_check_measurement(i, m) for i, m in enumerate(measurements)]
        env_json = None if environment is None else _to_json("environment", dict(environment))
        with self._write() as s:
            trow = self._trial_row(s, trial_id)
            env_id = None if env_json is None else _environment_id(s, env_json)
            rows = [MeasurementRow(trial_id=trow.id, environment_id=env_id, **item) for item in items]
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]

    def environment(self, environment_id: int) -> dict[str, Any]:
        """The hardware/software JSON of one environment row."""
        with self._read() as s:
            row = s.get(EnvironmentRow, _check_int("environment_id", environment_id, minimum=1))
            if row is None:
                raise StoreError(f"environment_id: {environment_id} not found in results database "
                                 f"{self.display!r}")
            return dict(row.content)

    # ------------------------------------------------------------------ frames
    def trials_frame(self, study: Study | str | int | None = None) -> pd.DataFrame:
        """One row per trial (all studies, or one), config flattened, measurements pivoted.

        Columns: trial_id, study, number, method, label, state, reason, started, finished, duration_s, worker,
        host, feasible, analytic_gmacs, constraint_value, optuna_trial_id, ``time.<phase>``,
        ``config.<key>`` and one column per measurement type, named by `measurement_column`
        (``accuracy_top1@finetuned``, ``gmacs@analytic``, ``throughput@bs64/fp32/cpu``); repeated
        measurements of one type keep the newest.
        """
        with self._read() as s:
            q = select(TrialRow, StudyRow.name).join(StudyRow)
            mq = select(MeasurementRow.trial_id, MeasurementRow.kind, MeasurementRow.fidelity,
                        MeasurementRow.batch_size, MeasurementRow.dtype, MeasurementRow.device,
                        MeasurementRow.value).join(TrialRow)
            if study is not None:
                sid = self._study_row(s, study).id
                q = q.where(TrialRow.study_id == sid)
                mq = mq.where(TrialRow.study_id == sid)
            trials = [_trial_record(t, name) for t, name in s.execute(q.order_by(StudyRow.id, TrialRow.number))]
            meas = [{"trial_id": m.trial_id, "value": m.value,
                     "column": measurement_column(m.kind, m.fidelity, m.batch_size, m.dtype, m.device)}
                    for m in s.execute(mq.order_by(MeasurementRow.id))]
        return build_trials_frame(trials, meas)

    def measurements_frame(self, study: Study | str | int | None = None, *, trial_id: int | None = None,
                           kind: str | None = None) -> pd.DataFrame:
        """Long format, one row per measurement (optionally of one study, one trial and/or one kind)."""
        with self._read() as s:
            q = (select(MeasurementRow, TrialRow, StudyRow.name, EnvironmentRow.hash)
                 .join(TrialRow, MeasurementRow.trial_id == TrialRow.id).join(StudyRow)
                 .outerjoin(EnvironmentRow, MeasurementRow.environment_id == EnvironmentRow.id))
            if study is not None:
                q = q.where(TrialRow.study_id == self._study_row(s, study).id)
            if trial_id is not None:
                q = q.where(MeasurementRow.trial_id == _check_int("trial_id", trial_id, minimum=1))
            if kind is not None:
                q = q.where(MeasurementRow.kind == kind)
            rows = []
            for m, t, name, env_hash in s.execute(q.order_by(MeasurementRow.id)):
                rows.append({
                    "measurement_id": m.id, "trial_id": t.id, "study": name, "number": t.number,
                    "method": t.method, "label": t.label, "kind": m.kind, "value": m.value, "unit": m.unit,
                    "batch_size": m.batch_size, "dtype": m.dtype, "device": m.device, "fidelity": m.fidelity,
                    "provenance": m.provenance, "extra": m.extra, "environment_id": m.environment_id,
                    "environment_hash": env_hash, "created": m.created,
                    "column": measurement_column(m.kind, m.fidelity, m.batch_size, m.dtype, m.device)})
        return build_measurements_frame(rows)


# ---------------------------------------------------------------------- opening
def _resolve_url(url_or_path: str | os.PathLike[str]) -> tuple[URL, str]:
    """(SQLAlchemy URL, text to show in messages); a plain path becomes a SQLite URL."""
    if isinstance(url_or_path, os.PathLike) or (isinstance(url_or_path, str) and "://" not in url_or_path):
        text = os.fspath(url_or_path)
        if not text:
            raise ValueError("results database: an empty path is not allowed; give a file path or URL")
        return URL.create("sqlite", database=text), text
    if not isinstance(url_or_path, str):
        raise ValueError(f"results database: {url_or_path!r} is not a path or URL")
    try:
        url = make_url(url_or_path)
        port = url.port
    except (ArgumentError, ValueError) as e:  # ValueError: a port that is not a number
        raise ValueError(f"results database: {_hide_password(url_or_path)!r} is not a valid URL ({one_line(e)}); "
                         "give a file path, sqlite:///path or postgresql://user@host:port/db") from None
    display = url.render_as_string(hide_password=True)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"results database: {display!r} has port {port}; a port is a number 1-65535")
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ValueError(f"results database: {display!r} uses backend {url.get_backend_name()!r}; allowed: "
                         "a file path, sqlite:///path or postgresql://user@host/db")
    return url, display


def _hide_password(url: str) -> str:
    """``url`` with the password of ``user:password@`` replaced by ``***``, even when the rest does not parse."""
    return re.sub(r"^([^:/]+://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _check_sqlite_file(path: Path, display: str, busy_timeout_s: float) -> None:
    """Refuse directories, unwritable places and non-SQLite or damaged files without writing to them."""
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as e:
        raise StoreError(f"results database {display!r} cannot be accessed: {e.strerror or one_line(e)}") from None
    if is_dir:
        raise StoreError(f"results database {display!r} is a directory; give a file path such as "
                         f"'{path / 'results.db'}'")
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tpsx-write-probe-"):
            pass
    except OSError as e:
        raise StoreError(f"results database {display!r}: directory '{parent}' is not writable: "
                         f"{e.strerror or one_line(e)}") from None
    if not exists or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as e:
        raise StoreError(f"results database {display!r} cannot be read: {e.strerror or one_line(e)}") from None
    if header != SQLITE_HEADER:
        raise CorruptDatabaseError(f"results database {display!r} is corrupt or not a SQLite file: it starts "
                                   f"with {header!r}, not {SQLITE_HEADER!r}")
    if not os.access(path, os.W_OK):
        raise StoreError(f"results database {display!r} is read-only; make it writable or use another file")
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)
        try:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if problems == ["ok"] and META_TABLE in tables:
                row = conn.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'").fetchone()
                version = row[0] if row else None
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or \
                type(e) is sqlite3.DatabaseError:
            raise CorruptDatabaseError(f"results database {display!r} is corrupt or not a SQLite file: "
                                       f"{one_line(e)}") from None
        raise StoreError(f"results database {display!r} cannot be opened: {one_line(e)}") from None
    if problems != ["ok"]:
        raise CorruptDatabaseError(f"results database {display!r} is corrupt or not a SQLite file: "
                                   f"{one_line('; '.join(map(str, problems)))}")
    _check_tables(tables, version, display)


def _check_tables(tables: set[str], version: str | None, display: str) -> None:
    """Refuse, before anything is written, a SQLite database that another program (or another schema
    version) wrote: its tables must be ours only (``tpsx_*``, with ``tpsx_meta`` naming this version)."""
    ours = {META_TABLE, *DATA_TABLES}
    foreign = sorted(n for n in tables if n not in ours and not n.startswith("sqlite_"))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignDatabaseError(f"results database {display!r} holds tables tpsexplore did not write ({shown}); "
                                   "it is left untouched: give a new file path")
    if tables & set(DATA_TABLES) and META_TABLE not in tables:
        raise SchemaVersionError(f"results database {display!r} has tables {sorted(tables & set(DATA_TABLES))} but no "
                                 f"{META_TABLE!r} table, so it was not written by tpsexplore (use a new database file)")
    if META_TABLE in tables and version != str(SCHEMA_VERSION):
        raise SchemaVersionError(f"results database {display!r} has schema version {version!r}; this tpsexplore "
                                 f"reads schema version {SCHEMA_VERSION} only (use a new database file)")


def _install_sqlite_hooks(engine: Engine, busy_timeout_s: float, *, wal: bool) -> None:
    """Pragmas on every connection, and explicit BEGIN (IMMEDIATE for writes) instead of pysqlite's own."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # transactions are begun by _on_begin below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys = ON")
        if wal:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("tpsx_write") else "BEGIN")


def _package_version() -> str | None:
    try:
        return metadata.version("tpsexplore")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------- rows -> records
def _study(row: StudyRow) -> Study:
    return Study(id=row.id, name=row.name, created=row.created, backbone=row.backbone, budget=row.budget,
                 objectives=tuple(row.objectives or ()), data=row.data, weights=row.weights,
                 settings=dict(row.settings or {}), tpsexplore_version=row.tpsexplore_version,
                 schema_version=row.schema_version)


def _trial_record(t: TrialRow, study_name: str) -> dict[str, Any]:
    duration = (t.finished - t.started).total_seconds() if t.finished and t.started else None
    return {"trial_id": t.id, "study": study_name, "number": t.number, "method": t.method, "label": t.label,
            "state": t.state, "reason": t.reason, "started": t.started, "finished": t.finished,
            "duration_s": duration, "worker": t.worker, "host": t.host, "feasible": t.feasible,
            "analytic_gmacs": t.analytic_gmacs, "constraint_value": t.constraint_value,
            "optuna_trial_id": t.optuna_trial_id, "config": t.config, "durations": t.durations}


def _environment_id(s: Session, content: dict[str, Any]) -> int:
    digest = hashlib.sha256(_canonical(content).encode()).hexdigest()
    found = s.scalar(select(EnvironmentRow.id).where(EnvironmentRow.hash == digest))
    if found is not None:
        return found
    try:
        with s.begin_nested():  # another writer may insert the same environment concurrently (PostgreSQL)
            row = EnvironmentRow(hash=digest, content=content)
            s.add(row)
        return row.id
    except IntegrityError:
        return s.scalar(select(EnvironmentRow.id).where(EnvironmentRow.hash == digest))


# ---------------------------------------------------------------------- validation
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    for attr in ("item", "tolist"):  # numpy scalars/arrays, 0-d tensors
        fn = getattr(obj, attr, None)
        if callable(fn):
            try:
                return fn()
            except (ValueError, RuntimeError, TypeError):
                continue
    raise TypeError(f"a {type(obj).__name__} cannot be stored as JSON")


def _to_json(name: str, value: Any) -> Any:
    """``value`` normalised by a JSON round trip (tuples -> lists); ValueError naming ``name`` if impossible."""
    try:
        text = json.dumps(value, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: not storable as JSON ({one_line(e)}; NaN/inf and objects are not "
                         "allowed)") from None
    return json.loads(text)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise ValueError(f"name: {name!r} is not a study name (a non-empty string of at most 200 characters)")
    return name


def _check_str(name: str, value: Any, *, limit: int | None = 200) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: {value!r} is not a string")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{name}: {value[:40]!r}... is longer than {limit} characters")
    return value


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value.__index__())
        else:
            raise ValueError(f"{name}: {value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value} is below the minimum {minimum}")
    return int(value)


def _check_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name}: {value!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: {out} is not a finite number")
    return out


def _check_bool(name: str, value: Any) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ValueError(f"{name}: {value!r} is not True, False or None")
    return bool(value)


def _check_durations(durations: Mapping[str, Any] | None) -> dict[str, float]:
    if durations is None:
        return {}
    if not isinstance(durations, Mapping):
        raise ValueError(f"durations: {type(durations).__name__} is not a dict of phase -> seconds")
    out = {}
    for phase, seconds in durations.items():
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"durations: phase name {phase!r} is not a non-empty string")
        value = _check_float(f"durations[{phase!r}]", seconds)
        if value is None or value < 0:
            raise ValueError(f"durations[{phase!r}]: {seconds!r} is not a number of seconds >= 0")
        out[phase] = value
    return out


def _check_measurement(index: int, item: Any) -> dict[str, Any]:
    where = f"measurements[{index}]"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: {type(item).__name__} is not a dict")
    unknown = sorted(set(item) - set(MEASUREMENT_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(MEASUREMENT_KEYS)}")
    for key in ("kind", "value"):
        if item.get(key) is None:
            raise ValueError(f"{where}.{key}: missing; every measurement needs kind and value")
    kind, fidelity = item["kind"], item.get("fidelity")
    for key, value in (("kind", kind), ("fidelity", fidelity)):
        if value is not None and (not isinstance(value, str) or not _NAME_RE.match(value)):
            raise ValueError(f"{where}.{key}: {value!r} is not a name of letters, digits, '_', '.' or '-' "
                             f"(e.g. {', '.join(KNOWN_KINDS[:3] if key == 'kind' else FIDELITIES[:3])})")
    if kind in TRIAL_COLUMNS or kind.startswith(("config.", "time.")):
        raise ValueError(f"{where}.kind: {kind!r} would clash with a trials_frame column; choose another name")
    out = {"kind": kind, "fidelity": fidelity,
           "value": _check_float(f"{where}.value", item["value"]),
           "batch_size": _check_int(f"{where}.batch_size", item.get("batch_size"), minimum=1),
           "extra": _to_json(f"{where}.extra", dict(item.get("extra") or {}))}
    for key in ("unit", "dtype", "device", "provenance"):
        out[key] = _check_str(f"{where}.{key}", item.get(key))
    return out


def _study_fields(*, keep_none: bool = False, **values: Any) -> dict[str, Any]:
    """Validated, normalised study fields; drops the None ones unless ``keep_none``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            if keep_none:
                out[key] = None
            continue
        if key == "budget":
            value = _check_float("budget", value)
        elif key == "objectives":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, Sequence) or not all(isinstance(o, str) and o for o in items):
                raise ValueError(f"objectives: {value!r} is not a list of names such as "
                                 "['accuracy_top1:maximize', 'gmacs:minimize']")
            value = list(items)
        else:
            value = _check_str(key, value, limit=None if key in ("data", "weights") else 200)
        out[key] = value
    return out


def _same(want: Any, have: Any) -> bool:
    if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
        return math.isclose(want, have, rel_tol=1e-12, abs_tol=0.0)
    return want == have
