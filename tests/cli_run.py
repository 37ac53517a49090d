"""`tpsexplore ARGV` through the real entry point in this process, its output captured (an exception that escapes
`main`, a traceback for a user, fails the test), and the smoke search of a study file the hierarchical backbones'
tests share."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of ``tpsexplore ARGV`` (arguments converted to str)."""
    from tpsexplore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def smoke_search(study_name: str, tmp_path: Path, allowed: set[str], required: set[str] = frozenset()
                 ) -> tuple[Any, Any, str]:
    """Run ``tpsexplore search --study studies/STUDY_NAME.toml`` (6 trials) and check what every smoke search must
    give: exit 0, 6 trials of which at least 4 complete, their methods within ``allowed`` and including ``required``,
    every reduced trial below 0.9x the baseline's analytic GMACs, every fine-tuned accuracy stored. Returns the
    manifest, the complete trials and the command's stdout + stderr."""
    from tpsexplore.manifest import StudyLayout, read_manifest
    from tpsexplore.storage import ResultsStore

    study = Path(__file__).resolve().parents[1] / "studies" / f"{study_name}.toml"
    rc, out, err = run_cli(["search", "--study", study, "--out", tmp_path])
    assert rc == 0, err[-3000:]
    folder = tmp_path / study_name
    manifest = read_manifest(StudyLayout(folder))
    with ResultsStore(StudyLayout(folder).results_db) as store:
        frame = store.trials_frame(study_name)
    assert len(frame) == 6
    done = frame[frame["state"] == "complete"]
    methods = set(done["method"])
    assert len(done) >= 4 and methods <= allowed and required <= methods, methods
    base = done.loc[done["method"] == "baseline", "gmacs@analytic"].iloc[0]
    reduced = done.loc[done["method"] != "baseline", "gmacs@analytic"]
    assert (reduced < 0.9 * base + 1e-9).all() and done["accuracy_top1@finetuned"].notna().all()
    return manifest, done, out + err
