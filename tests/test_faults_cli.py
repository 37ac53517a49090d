"""The command line as a new user meets it (issue 11, "a CLI that feels finished"): bad flags refused with exit
code 2, one stderr line naming the flag and the value, nothing written; ``--help`` without torch; the shared
data/weights flags of ``search`` and ``profile``; progress that stays readable in a log; the ``methods`` table.

Real parsers, real settings, real subprocesses; no mocks. (Bad profile inputs already covered by
tests/test_backbones_cli.py, and bad search values against an existing study by tests/test_search.py, are not
repeated here.)
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpsexplore.cli import build_parser, flag_names, main
from tpsexplore.progressbar import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
HEAVY = ("torch", "timm", "optuna", "pandas", "seaborn", "sqlalchemy")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# ----------------------------------------------------------------------------- bad input: exit 2, one line
@pytest.fixture
def places(tmp_path, monkeypatch):
    """An --out folder that must never appear, an empty proxy cache that must stay empty, a data folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TPSEXPLORE_CACHE", str(cache))
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    (data / "val" / "a").mkdir(parents=True)
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"not read: the flags are refused first")
    return {"out": tmp_path / "runs", "cache": cache, "data": str(data), "ckpt": str(ckpt),
            "labels": str(tmp_path / "labels.csv")}


SEARCH_CASES = [  # (flags after `search --out OUT`, flag and value the one line must name)
    (["--backbone", "deit_xl"], "--backbone: unknown backbone 'deit_xl'"),
    (["--backbone", "resnet18"], "--backbone: 'resnet18'"),
    (["--methods", "etps,fancy"], "--methods: unknown method 'fancy'"),
    (["--budget", "0"], "--budget: 0.0 is outside (0, 1]"),
    (["--budget", "abc"], "argument --budget: 'abc' is not a number"),
    (["--trials", "0"], "--trials: 0 is not an integer >= 1"),
    (["--trials", "two"], "argument --trials: invalid int value: 'two'"),
    (["--objectives", "accuracy,speed"], "--objectives: 'accuracy,speed'"),
    (["--timeout", "soon"], "--timeout: 'soon' is not a duration"),
    (["--device", "tpu"], "--device: 'tpu'"),
    (["--weights", "best"], "argument --weights: invalid choice: 'best'"),
    (["--data", "/nonexistent/tpsx-data"], "--data: '/nonexistent/tpsx-data' does not exist"),
    (["--checkpoint", "{ckpt}"], "--checkpoint: '{ckpt}' needs --data"),
    (["--labels", "{labels}"], "--labels: '{labels}' needs --data"),
    (["--weights", "random"], "--weights: 'random' needs"),
    (["--data", "{data}", "--weights", "random", "--checkpoint", "{ckpt}"], "--weights: 'random' contradicts"),
    (["--data", "{data}", "--labels", "{labels}"], "--labels: '{labels}' does not exist"),
    (["--budgett", "0.3"], "unrecognized arguments: --budgett 0.3"),
]


@pytest.mark.parametrize("flags,needle", SEARCH_CASES, ids=[" ".join(c[0])[:40] for c in SEARCH_CASES])
def test_search_bad_flag_exits_2_with_one_line_and_writes_nothing(places, capsys, flags, needle):
    flags = [f.format(**places) for f in flags]
    rc = main(["search", "--out", str(places["out"]), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tpsexplore search: error: "), err
    assert needle.format(**places) in err, err
    assert not places["out"].exists()
    assert not any(places["cache"].iterdir())


PROFILE_CASES = [
    (["--weights", "random"], "--weights: 'random' needs --data"),
    (["--checkpoint", "{ckpt}"], "--checkpoint: '{ckpt}' needs --data"),
    (["--data", "{data}", "--checkpoint", "/nonexistent/w.pth"], "--checkpoint: '/nonexistent/w.pth' does not exist"),
    (["--weights", "checkpoint"], "argument --weights: invalid choice: 'checkpoint'"),
    (["--locations", "3,x"], "argument --locations: expected comma-separated integers, got '3,x'"),
]


@pytest.mark.parametrize("flags,needle", PROFILE_CASES, ids=[" ".join(c[0])[:40] for c in PROFILE_CASES])
def test_profile_bad_data_or_weights_exits_2_with_one_line(places, capsys, flags, needle):
    flags = [f.format(**places) for f in flags]
    json_out = places["out"] / "p.json"
    rc = main(["profile", "--backbone", "deit_t", "--json", str(json_out), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle.format(**places) in err, err
    assert not places["out"].exists() and not any(places["cache"].iterdir())


def test_export_unknown_pick_rule_is_refused_before_the_study_is_opened(tmp_path, capsys):
    study = tmp_path / "study"  # does not exist: the rule is checked first
    out = tmp_path / "c.json"
    assert main(["export", str(study), "--pick", "best", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pick: 'best' is not a rule; allowed: max-accuracy, recommended" in err
    assert not out.exists() and not study.exists()


def test_offline_weights_error_names_the_flags_not_python_keywords(tmp_path):
    """The backbone layer says ``checkpoint=PATH`` / ``weights='random'``; the CLI user reads the flags."""
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    (data / "val" / "a").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "tpsexplore.cli", "profile", "--backbone", "deit_t", "--data",
                          str(data), "--finetune-steps", "0"], capture_output=True, text=True, cwd=tmp_path,
                         env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "no-hf-cache"),
                                  TPSEXPLORE_CACHE=str(tmp_path / "cache")), timeout=120)
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no pretrained weights for 'deit_t'" in err
    assert "--checkpoint PATH" in err and "--weights random" in err
    assert "checkpoint=" not in err and "weights=" not in err


def test_flag_names_maps_fields_given_as_flags_and_keeps_study_file_keys():
    parser, _ = build_parser()
    search = next(a for a in parser._actions if a.dest == "command").choices["search"]
    assert flag_names("max_stages: 5 is outside 1..4", search, ["--max-stages", "5"]) == \
        "--max-stages: 5 is outside 1..4"
    assert flag_names("max_stages: 5 is outside 1..4", search, ["--max-stages=5"]).startswith("--max-stages: ")
    assert flag_names("budget: 0.0 is outside (0, 1]", search, ["--bud", "0"]).startswith("--budget: ")  # prefix
    # the value came from a study file: its key stays, so the user knows where to look
    assert flag_names("budget: 2.0 is outside (0, 1]", search, ["--study", "x.toml"]) == \
        "budget: 2.0 is outside (0, 1]"
    assert flag_names("space.fill_min: -1 ...", search, ["--study", "x.toml"]) == "space.fill_min: -1 ..."
    assert flag_names("dataset.labels: 'l.csv' does not exist", search, ["--labels", "l.csv"],
                      {"dataset.labels": "labels"}) == "--labels: 'l.csv' does not exist"
    assert flag_names("no weights: pass checkpoint=PATH or weights='random'", search, []) == \
        "no weights: pass --checkpoint PATH or --weights random"


# ----------------------------------------------------------------------------- help: fast, light
def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, tpsexplore.cli as c; c.build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "", f"building the parser imported {res.stdout.strip()}"


@pytest.mark.parametrize("command", ["", "methods", "profile", "search", "report", "export"])
def test_every_help_exits_0_without_heavy_imports(command):
    argv = [c for c in [command] if c] + ["--help"]
    code = ("import sys, contextlib, io\nfrom tpsexplore.cli import main\nbuf = io.StringIO()\n"
            f"try:\n    with contextlib.redirect_stdout(buf):\n        main({argv!r})\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules), '|', len(buf.getvalue()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    heavy, _, length = res.stdout.partition("|")
    assert heavy.strip() == "" and int(length) > 100, res.stdout


def test_export_help_lists_every_pick_rule(capsys):
    from tpsexplore.report.export import PICK_RULES

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for rule in PICK_RULES:
        assert rule in text


def test_search_and_profile_share_the_data_and_weights_flags():
    parser, _ = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices

    def options(p):
        return {a.dest: (tuple(a.option_strings), a.choices, a.default, a.help) for a in p._actions
                if a.dest in ("data", "labels", "weights", "checkpoint")}

    assert options(subs["search"]) == options(subs["profile"])
    assert set(options(subs["search"])) == {"data", "labels", "weights", "checkpoint"}
    assert options(subs["search"])["weights"][1] == ("pretrained", "random")


def test_methods_prints_a_table_with_a_header(capsys):
    from tpsexplore.reduce.methods import METHODS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["method", "policy", "treatment"] and "description" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert [ln.split()[0] for ln in lines[2:]] == list(METHODS)
    starts = [lines[0].index(h) for h in ("policy", "treatment")]
    for ln in lines[2:]:  # columns line up under the header
        assert all(ln[s - 2:s] == "  " for s in starts), ln


def test_argparse_errors_are_one_line_and_exit_2():
    res = subprocess.run([sys.executable, "-m", "tpsexplore.cli", "nosuchcommand"], capture_output=True, text=True,
                         cwd=ROOT)
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1 and "'nosuchcommand'" in err, err


# ----------------------------------------------------------------------------- progress in logs
def test_line_progress_prints_at_most_one_line_per_interval():
    buf = io.StringIO()  # not a terminal
    bar = progress_bar(total=1000, desc="train", unit="step", file=buf, interval_s=0.2)
    assert isinstance(bar, LineProgress)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.1:
        bar.update(1)
        bar.set_postfix(loss=f"{1.0:.3f}", refresh=False)
        time.sleep(0.002)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert 3 <= len(lines) <= 1.1 / 0.2 + 1 + 1, lines  # interval lines + the closing line
    assert all(ln.startswith("train: ") and len(ln) < 200 for ln in lines), lines
    assert "loss=1.000" in lines[0] and "done in" in lines[-1]


def test_short_bars_in_a_log_print_nothing_and_the_default_interval_is_10s(monkeypatch):
    monkeypatch.delenv("TPSEXPLORE_PROGRESS_INTERVAL", raising=False)
    buf = io.StringIO()
    bar = progress_bar(range(500), desc="evaluate", file=buf)
    assert bar.interval_s == 10.0
    assert sum(1 for _ in bar) == 500 and buf.getvalue() == ""
    assert progress_bar(range(3), disable=True, file=buf).disable and buf.getvalue() == ""


def test_a_search_logged_to_a_pipe_has_short_lines_and_no_carriage_returns(tmp_path):
    """A fresh proxy pre-training plus a 2-trial smoke search, stderr to a pipe, one progress line per 0.05 s
    (the smoke pre-training takes about a second on an idle machine: a longer interval would print no line)."""
    interval = 0.05
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(SMOKE), "--out",
                          str(tmp_path / "runs"), "--trials", "2", "--confirm", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, timeout=300,
                         env=_env(TPSEXPLORE_CACHE=str(tmp_path / "cache"),
                                  TPSEXPLORE_PROGRESS_INTERVAL=str(interval)))
    wall = time.monotonic() - t0
    err = res.stderr.decode()
    assert res.returncode == 0, err[-3000:]
    assert "\r" not in err
    lines = err.splitlines()
    assert max(len(ln) for ln in lines) <= 300, max(lines, key=len)
    bar_lines = [ln for ln in lines if re.match(r"^[\w .-]+: \d+(\.\d+)?(/\d+)? \w+", ln)]
    assert any(ln.startswith("proxy") or "pretrain" in ln or "train" in ln for ln in bar_lines), lines[:20]
    # each bar: at most one line per interval plus its closing line; bars run one after another
    assert len(bar_lines) <= 2 * wall / interval + 1, (len(bar_lines), wall)
