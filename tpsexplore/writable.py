"""Check an output path before anything is written: one line naming the flag, the path and why it fails.

A leaf module (standard library only): the search checks its study directory and the report and export their
outputs with the same walk to the nearest existing folder and the same real probe.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (absolute)."""
    probe = path.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; raises the OSError when that fails (a real probe:
    os.access says yes to root on read-only mounts and /proc)."""
    fd, name = tempfile.mkstemp(prefix=".tpsx-probe-", dir=folder)
    os.close(fd)
    os.unlink(name)


def _probe_dir(folder: Path, flag: str, target: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"{flag}: {str(target)!r} cannot be written: {str(folder)!r} is not a directory")
    try:
        probe(folder)
    except OSError as e:
        raise ValueError(f"{flag}: {str(target)!r} cannot be written ({e.strerror or e} in {str(folder)!r}); "
                         "choose a writable location") from None


def check_output_file(path: str | os.PathLike[str], flag: str = "out") -> Path:
    """``path`` is a file that can be created or replaced: not a directory, in a writable folder."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag}: {str(p)!r} is a directory; give a file name such as config.json")
    if p.exists() and not p.is_file():
        raise ValueError(f"{flag}: {str(p)!r} is not a regular file")
    _probe_dir(p.parent if p.parent.exists() else nearest_existing(p.parent), flag, p)
    return p


def check_output_dir(path: str | os.PathLike[str], flag: str = "out") -> Path:
    """``path`` is a directory (existing or to be created) that can be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: {str(p)!r} is a file; give a directory")
    _probe_dir(p if p.exists() else nearest_existing(p), flag, p)
    return p
