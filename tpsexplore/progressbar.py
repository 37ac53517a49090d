"""The one place progress bars are made: a tqdm bar on a terminal, plain lines at most every 10 s otherwise.

On a terminal tqdm redraws its bar in place with carriage returns. Sent to a log (a pipe, a file, CI) the same
redraws pile up on one line (the proxy pre-training wrote about 28 KB onto a single line), so without a
terminal a bar prints one plain, newline-terminated line at most every ``interval_s`` seconds (default: the
environment variable ``TPSEXPLORE_PROGRESS_INTERVAL``, else 10) and, when it printed any, one closing line. Short
bars in a log therefore print nothing.

`progress_bar` returns an object with the part of tqdm's interface the package uses: iteration, ``update``,
``set_postfix``, ``set_postfix_str``, ``set_description``, ``refresh``, ``write``, ``close``, ``n``, ``total``
and use as a context manager. Standard library only (tqdm is imported for terminals); any layer may use it.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

LOG_INTERVAL_S = 10.0
_MAX_POSTFIX = 120


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, file: IO[str] | None = None, leave: bool = False,
                 interval_s: float | None = None) -> Any:
    """A progress bar on ``file`` (default: the current ``sys.stderr``): tqdm when it is a terminal, else a
    `LineProgress` printing at most one line per ``interval_s`` seconds. ``disable`` gives a silent one."""
    stream = file if file is not None else sys.stderr
    if interval_s is None:
        interval_s = log_interval()
    if not disable and is_terminal(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=stream, interval_s=interval_s,
                        disable=disable)


def log_interval() -> float:
    """Seconds between the lines of a bar in a log: ``$TPSEXPLORE_PROGRESS_INTERVAL`` or 10."""
    text = os.environ.get("TPSEXPLORE_PROGRESS_INTERVAL", "")
    try:
        value = float(text) if text.strip() else LOG_INTERVAL_S
    except ValueError:
        raise ValueError(f"TPSEXPLORE_PROGRESS_INTERVAL: {text!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"TPSEXPLORE_PROGRESS_INTERVAL: {text!r} must be > 0 seconds")
    return value


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """Progress for logs: ``desc: n/total unit (p%), elapsed, ETA, postfix`` lines, at most one per interval."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", file: IO[str] | None = None, interval_s: float = LOG_INTERVAL_S,
                 disable: bool = False) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file, self.interval_s, self.disable = file, float(interval_s), disable
        self.n = 0
        self.postfix = ""
        self.lines = 0
        self.closed = False
        self.start = self._last = time.monotonic()

    # ------------------------------------------------------------------ tqdm's interface
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress: no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int | float = 1) -> None:
        self.n += n
        self._tick()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        self._tick()

    def write(self, s: str, file: IO[str] | None = None) -> None:
        self._print(s, file)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lines and not self.disable:  # a bar that reported progress also reports its end
            self._print(self._line(done=True))

    # ------------------------------------------------------------------ lines
    def _tick(self) -> None:
        now = time.monotonic()
        if self.disable or self.closed or now - self._last < self.interval_s:
            return
        self._last = now
        self.lines += 1
        self._print(self._line())

    def _line(self, done: bool = False) -> str:
        elapsed = time.monotonic() - self.start
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        parts = [f"{count} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts.append(f"{'done in' if done else 'elapsed'} {_clock(elapsed)}")
        if not done and self.total and self.n:
            parts.append(f"ETA {_clock(elapsed / self.n * max(0.0, self.total - self.n))}")
        if self.postfix:
            post = " ".join(self.postfix.split())
            parts.append(post if len(post) <= _MAX_POSTFIX else post[:_MAX_POSTFIX - 3] + "...")
        return f"{self.desc or 'progress'}: " + ", ".join(parts)

    def _print(self, text: str, file: IO[str] | None = None) -> None:
        stream = file or self.file or sys.stderr
        print(text.replace("\r", " "), file=stream, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
