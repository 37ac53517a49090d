"""One-line error messages: the one formatter every layer uses (CLI, storage, manifest, measurement records).

A leaf module (standard library only), so the storage layer and `--help` can import it without pulling in
anything heavy.
"""
from __future__ import annotations


def one_line(exc: BaseException | str, *, with_type: bool = False, limit: int | None = None) -> str:
    """The message of ``exc`` squeezed onto one line.

    A database error is reported by its DBAPI cause (``exc.orig``); a FileNotFoundError names its file when
    the message does not. with_type prefixes the exception's class name (for stored failure records);
    limit truncates.
    """
    if isinstance(exc, BaseException):
        exc = getattr(exc, "orig", None) or exc
    text = " ".join(str(exc).split())
    if isinstance(exc, BaseException):
        filename = getattr(exc, "filename", None)
        if isinstance(exc, FileNotFoundError) and filename and str(filename) not in text:
            text = f"{filename}: {text}"
        text = f"{type(exc).__name__}: {text}" if with_type else (text or type(exc).__name__)
    return text[:limit] if limit is not None else text


def failure_text(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters: how a recorded failure (a measurement, NVML)
    is stored."""
    return one_line(exc, with_type=True, limit=300)
