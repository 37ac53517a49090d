"""Errors of the results store. All are ``ValueError`` subclasses with a one-line message (CLI exit code 2)."""
from __future__ import annotations


class StoreError(ValueError):
    """A results database cannot be used as asked: unwritable, unknown study, trial in the wrong state, ..."""


class CorruptDatabaseError(StoreError):
    """The file is not a SQLite database, or SQLite reports it damaged; the file is left untouched."""


class ForeignDatabaseError(StoreError):
    """The SQLite file holds tables another program wrote; it is refused before any write, left untouched."""


class SchemaVersionError(StoreError):
    """The database was written with another (or no) tpsexplore schema version."""


class StudyMismatchError(StoreError):
    """A study of this name exists with other settings (backbone, budget, ...) than the caller expects."""


