"""Every ```python snippet in README.md runs, against real things the test makes: a tiny study written by
`tpsexplore search` (the smoke study, 2 trials), a random-init DeiT-S checkpoint and a config file.

The README's placeholders are names the reader sets first (``STUDY``, ``CHECKPOINT``, ``CONFIG``, documented at
the top of its Python section); the test sets them the same way, runs each snippet in a fresh namespace with
the working directory in a temporary folder, and fails on the first exception.
"""
from __future__ import annotations

import contextlib
import io
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMOKE = ROOT / "studies" / "smoke.toml"
PLACEHOLDERS = ("STUDY", "CHECKPOINT", "CONFIG")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


SNIPPETS = _blocks("python")


@pytest.fixture(scope="module")
def names(proxy_cache, tmp_path_factory):
    """Values of the README's placeholders: a real tiny study, checkpoint and config."""
    import torch
    from safetensors.torch import save_file

    import tpsexplore
    from tpsexplore.cli import main

    base = tmp_path_factory.mktemp("readme")
    torch.set_num_threads(1)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["search", "--study", str(SMOKE), "--out", str(base / "runs"), "--trials", "2", "--confirm", "0",
                   "--quiet"])
    assert rc == 0, err.getvalue()[-2000:]
    model = tpsexplore.create_backbone("deit_s", weights="random")
    ckpt = base / "deit_s.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    config = base / "config.json"
    tpsexplore.ReductionConfig("topk", locations=(3, 6, 9), keep_ratios=(0.7,)).to_json(config)
    return {"STUDY": str(base / "runs" / "smoke"), "CHECKPOINT": str(ckpt), "CONFIG": str(config)}


def test_the_readme_has_the_snippets_and_documents_their_placeholders():
    assert len(SNIPPETS) >= 4
    text = README.read_text()
    for name in PLACEHOLDERS:
        assert f"- `{name}`:" in text, f"placeholder {name} is not documented"
    used = {n for n in PLACEHOLDERS for s in SNIPPETS if re.search(rf"\b{n}\b", s)}
    assert used == set(PLACEHOLDERS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_python_snippet_runs(index, names, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = compile(SNIPPETS[index], f"README.md python snippet {index}", "exec")
    namespace = {"__name__": "__readme__", **names}
    exec(code, namespace)  # noqa: S102 - the README's own code, run as a reader would
    if "token_counts" in SNIPPETS[index]:  # the printed counts are the ones the comment promises
        out = capsys.readouterr().out
        assert "(197, 197)" in out and "(69, 69)" in out, out


def test_the_readme_names_the_real_tables_the_dashboard_and_the_exit_codes():
    text = README.read_text()
    from tpsexplore.storage import schema

    tables = set(re.findall(r"read_sql_table\(\"(\w+)\"", text)) | set(re.findall(r"FROM (\w+)", text))
    real = {t.name for t in schema.Base.metadata.sorted_tables}
    assert tables and tables <= real, tables - real
    assert 'pip install -e ".[dashboard]"' in text and "optuna-dashboard runs/" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("optuna-dashboard") for dep in extras["dashboard"])
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in text
    # still exactly one set-up command, one test command and the main job
    first = _blocks("bash")[0].strip().splitlines()
    assert [ln.split("#")[1].strip().split(":")[0] for ln in first] == ["set-up", "tests", "the main job"]
    assert text.count("bash .ci/setup") == 1 and text.count("-m pytest") == 1
