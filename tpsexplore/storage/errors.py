"""Errors of the results store. All are ``ValueError`` subclasses with a one-line message (CLI exit code 2)."""
from __future__ import annotations


class StoreError(ValueError):
    """A results database cannot be used as asked: unwritable, unknown study, trial in the wrong state, ..."""


class CorruptDatabaseError(StoreError):
    """The file is not a SQLite database, or SQLite reports it damaged; the file is left untouched."""


class SchemaVersionError(StoreError):
    """The database was written with another (or no) tpsexplore schema version."""


class StudyMismatchError(StoreError):
    """A study of this name exists with other settings (backbone, budget, ...) than the caller expects."""


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` (or its DBAPI cause) squeezed onto one line."""
    if isinstance(exc, BaseException):
        exc = getattr(exc, "orig", None) or exc
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
