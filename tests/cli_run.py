"""`tpsexplore ARGV` through the real entry point in this process, its output captured: the one helper the test
files share (an exception that escapes `main`, a traceback for a user, fails the test)."""
from __future__ import annotations

import contextlib
import io


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of ``tpsexplore ARGV`` (arguments converted to str)."""
    from tpsexplore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
