"""SQLAlchemy 2 ORM tables of the results store (see docs/schema.md).

Four data tables and one ``meta`` table, all prefixed ``tpsx_`` so they can share a PostgreSQL database
with Optuna's own tables (``studies``, ``trials``, ...):

- ``studies``: one row per search (name, backbone, budget, objectives, what data/weights it used).
- ``trials``: one row per evaluated configuration (Optuna trial), its ReductionConfig as JSON and its state.
- ``measurements``: long format, one value per row (kind, fidelity, batch size, dtype, device, ...).
- ``environments``: hardware/software description, deduplicated by a hash of its content.
- ``meta``: key/value pairs; ``schema_version`` guards against reading a database of another layout.

Timestamps are stored as naive UTC (portable between SQLite and PostgreSQL) and read back timezone-aware.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1
"""Bump when a table or column changes; a store refuses databases with another version."""

TRIAL_STATES = ("running", "complete", "failed", "pruned", "infeasible")
FINAL_TRIAL_STATES = TRIAL_STATES[1:]


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Store datetimes as naive UTC; return them timezone-aware (UTC) on every backend."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # naive input is taken as UTC already
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the results-store tables."""


class Meta(Base):
    """Key/value facts about the database itself (``schema_version``, ``created_by``)."""

    __tablename__ = "tpsx_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StudyRow(Base):
    """One search: what was searched (backbone, budget, objectives) and with which data and weights."""

    __tablename__ = "tpsx_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    backbone: Mapped[str | None] = mapped_column(String(200))
    budget: Mapped[float | None] = mapped_column(Float)
    objectives: Mapped[list[str]] = mapped_column(JSON, default=list)
    data: Mapped[str | None] = mapped_column(Text)
    weights: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tpsexplore_version: Mapped[str | None] = mapped_column(String(64))
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)

    trials: Mapped[list["TrialRow"]] = relationship(back_populates="study", cascade="all, delete-orphan",
                                                    passive_deletes=True)


class TrialRow(Base):
    """One evaluated configuration; ``number`` is the Optuna trial number (unique within a study)."""

    __tablename__ = "tpsx_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_trials_study_number"),
        Index("ix_trials_study_state", "study_id", "state"),
        CheckConstraint("state IN ('running', 'complete', 'failed', 'pruned', 'infeasible')",
                        name="ck_trials_state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("tpsx_studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str | None] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16), default="running")
    reason: Mapped[str | None] = mapped_column(Text)
    started: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    durations: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    worker: Mapped[str | None] = mapped_column(String(200))
    host: Mapped[str | None] = mapped_column(String(200))
    feasible: Mapped[bool | None] = mapped_column()
    analytic_gmacs: Mapped[float | None] = mapped_column(Float)
    constraint_value: Mapped[float | None] = mapped_column(Float)
    optuna_trial_id: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[StudyRow] = relationship(back_populates="trials")
    measurements: Mapped[list["MeasurementRow"]] = relationship(
        back_populates="trial", cascade="all, delete-orphan", passive_deletes=True)


class EnvironmentRow(Base):
    """Hardware and software versions a measurement was taken with; ``hash`` is sha256 of canonical JSON."""

    __tablename__ = "tpsx_environments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MeasurementRow(Base):
    """One measured or estimated value of a trial (long format)."""

    __tablename__ = "tpsx_measurements"
    __table_args__ = (
        Index("ix_measurements_trial", "trial_id"),
        Index("ix_measurements_kind_fidelity", "kind", "fidelity"),
        Index("ix_measurements_environment", "environment_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("tpsx_trials.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str | None] = mapped_column(String(32))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(String(32))
    device: Mapped[str | None] = mapped_column(String(200))
    fidelity: Mapped[str | None] = mapped_column(String(64))
    provenance: Mapped[str | None] = mapped_column(String(200))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    environment_id: Mapped[int | None] = mapped_column(ForeignKey("tpsx_environments.id", ondelete="SET NULL"))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    trial: Mapped[TrialRow] = relationship(back_populates="measurements")
    environment: Mapped[EnvironmentRow | None] = relationship()


DATA_TABLES = ("tpsx_studies", "tpsx_trials", "tpsx_measurements", "tpsx_environments")
META_TABLE = "tpsx_meta"
