"""The study folder's one owner (`tpsexplore.manifest`, issue 11 "one typed study contract"): the layout, the frozen
and versioned manifest a real search writes once, its refusals, the one storage-string parser, the report and export
reading the budget from the manifest, configs read back as `ReductionConfig` JSON, and one proxy checkpoint name."""
from __future__ import annotations

import ast
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import optuna
import pytest

from cli_run import run_cli
from tpsexplore.manifest import (JOURNAL, MANIFEST, MANIFEST_VERSION, RESULTS_DB, Budget, StudyLayout, StudyManifest,
                                 atomic_write, parse_storage, read_manifest)
from tpsexplore.measure.train import ProxyConfig, default_cache_dir, proxy_cache_path, resolve_proxy_config
from tpsexplore.reduce import ReductionConfig
from tpsexplore.report import export_trial, open_study
from tpsexplore.search.backend import S_FINGERPRINT, SearchJournalBackend
from tpsexplore.storage import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
PACKAGE = ROOT / "tpsexplore"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study(proxy_cache, tmp_path_factory) -> dict:
    """A real 4-trial search of the tiny smoke study, with the proxy's lr left to its default (the case where the
    fingerprint and the cache once named different checkpoints)."""
    tmp = tmp_path_factory.mktemp("manifest")
    spec = tmp / "smoke_default_lr.toml"
    text = SMOKE.read_text()
    assert "\nlr = 2e-3\n" in text
    spec.write_text(text.replace("\nlr = 2e-3\n", "\n", 1))  # [proxy] lr: resolved from the width
    args = ["search", "--study", str(spec), "--out", str(tmp / "runs"), "--study-name", "m", "--trials", "4",
            "--confirm", "0", "--quiet"]
    rc, out, err = run_cli(args)
    assert rc == 0, err[-2000:]
    return {"dir": tmp / "runs" / "m", "args": args, "stdout": out}


# ----------------------------------------------------------------------------- what the search writes
def test_search_writes_one_typed_manifest(study):
    layout = StudyLayout(study["dir"])
    m = read_manifest(layout)
    assert m.version == MANIFEST_VERSION and m.study == "m" and m.backbone == "deit_t"
    g = m.geometry
    assert (g.num_patches, g.num_prefix, g.depth, g.width, g.img_size, g.patch_size, g.num_classes) == \
        (16, 1, 4, 64, 32, 8, 10)
    # the budget is decided once, in GMACs too, from the baseline's analytic GMACs in the results store
    with ResultsStore(layout.results_db) as store:
        frame = store.trials_frame("m").set_index("number")
        row = store.open_study("m")
    assert m.budget.fraction == 0.5 and m.budget.baseline_gmacs == pytest.approx(frame.loc[0, "gmacs@analytic"])
    assert m.budget.gmacs == pytest.approx(0.5 * m.budget.baseline_gmacs)
    assert m.objective_specs == ["accuracy_top1@finetuned:maximize", "gmacs@analytic:minimize"] == list(row.objectives)
    assert m.fidelity.accuracy == "finetuned" and m.fidelity.finetune_steps == 4
    assert m.storage.kind == "journal" and m.storage.path == layout.journal and layout.journal.is_file()
    assert m.data.kind == "proxy" and m.data.details["num_classes"] == 10
    assert m.weights.source == "proxy-pretrained" and m.reference is not None and m.seed == 0
    # the store keeps the same manifest, so a bare results database reads the same facts
    assert StudyManifest.from_dict(row.settings["manifest"]) == m
    assert open_study(f"sqlite:///{layout.results_db}").manifest == m
    # the search's closing summary names the layout's files
    assert str(layout.manifest) in study["stdout"] and str(layout.results_db) in study["stdout"]


def test_one_proxy_checkpoint_name(study):
    """The Optuna fingerprint, the manifest and the cache name the same proxy checkpoint (it once named a key taken
    before the lr default was resolved)."""
    m = read_manifest(StudyLayout(study["dir"]))
    ckpt = Path(m.proxy["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == default_cache_dir()
    assert m.weights.checkpoint == str(ckpt) and m.proxy["config"]["lr"] is not None
    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(StudyLayout(study["dir"]).journal)))
    fp = optuna.load_study(study_name="m", storage=storage).user_attrs[S_FINGERPRINT]
    assert ckpt.name in fp["weights"]
    cfg = ProxyConfig(img_size=32, patch_size=8, model_kwargs={"depth": 4, "embed_dim": 64, "num_heads": 2})
    assert cfg.lr is None and resolve_proxy_config("deit_t", cfg).lr == pytest.approx(5e-4 * (192 / 64) ** 2)
    assert proxy_cache_path("deit_t", 0, "c", cfg) == proxy_cache_path("deit_t", 0, "c", resolve_proxy_config("deit_t", cfg))


def test_resume_keeps_the_manifest_written_once(study):
    path = StudyLayout(study["dir"]).manifest
    before = path.read_bytes()
    rc, _, err = run_cli(study["args"])
    assert rc == 0, err[-2000:]
    assert path.read_bytes() == before


def test_configs_read_back_as_reduction_config_json(study):
    data = open_study(study["dir"])
    df = data.trials
    assert "config_json" in df.columns and "config.keep_ratios" in df.columns  # tables keep their columns
    from tpsexplore.report.frame import trial_config

    for _, r in df[df["state"] == "complete"].iterrows():
        cfg = trial_config(r)
        assert cfg == ReductionConfig.from_json(r["config_json"]) and cfg.to_dict() == json.loads(r["config_json"])
        assert r["variant"] == ("baseline" if cfg.method == "none" else r["variant"])
        assert isinstance(cfg.seed, int) and all(isinstance(k, float) for k in cfg.keep_ratios)


# ----------------------------------------------------------------------------- the budget comes from the manifest
def test_report_and_export_read_the_budget_from_the_manifest(study, tmp_path):
    """Rewrite the manifest with a budget whose baseline differs from the baseline trial in results.db: the report
    header, the export and the trials frame all read the manifest's numbers, never the measured baseline."""
    d = tmp_path / "m"
    shutil.copytree(study["dir"], d)
    layout = StudyLayout(d)
    m = read_manifest(layout)
    changed = replace(m, budget=Budget(fraction=0.5, gmacs=m.budget.gmacs * 3, baseline_gmacs=m.budget.baseline_gmacs * 3))
    changed.write(layout)
    data = open_study(d)
    base = data.trials.loc[data.trials["is_baseline"], "gmacs"].iloc[0]
    assert base == pytest.approx(m.budget.baseline_gmacs)  # results.db still says the measured baseline
    assert data.baseline_gmacs == pytest.approx(3 * m.budget.baseline_gmacs) != pytest.approx(base)
    assert data.budget_gmacs == pytest.approx(3 * m.budget.gmacs)
    cfg = export_trial(d, tmp_path / "c.json", pick="max-accuracy")
    assert cfg["study"]["budget"] == asdict(changed.budget)
    from tpsexplore.report.build import provenance

    rows = dict(provenance(data, {}))
    assert f"= {3 * m.budget.gmacs:.4g} GMACs (baseline {3 * m.budget.baseline_gmacs:.4g})" in rows["budget"]


# ----------------------------------------------------------------------------- round trip and refusals
def test_round_trip_and_atomic_write(study, tmp_path):
    m = read_manifest(StudyLayout(study["dir"]))
    assert StudyManifest.from_json(m.to_json()) == m
    assert json.loads(m.to_json())["version"] == MANIFEST_VERSION
    layout = StudyLayout(tmp_path)
    m.write(layout)
    assert read_manifest(layout) == m and [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temp file left
    with pytest.raises(ZeroDivisionError):
        atomic_write(layout.manifest, lambda f: (f.write(b"half"), 1 / 0))
    assert read_manifest(layout) == m and [p.name for p in tmp_path.iterdir()] == [MANIFEST]


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=2), r"field 'version' is 2; this tpsexplore reads manifest version 1"),
    (lambda d: d.pop("version"), r"field 'version' is missing \(written by an older tpsexplore"),
    (lambda d: d["budget"].pop("gmacs"), r"field 'budget.gmacs' is missing"),
    (lambda d: d["budget"].update(gmacs=1.0), r"field 'budget.gmacs' is 1.0, not fraction x baseline_gmacs"),
    (lambda d: d["budget"].update(fraction="half"), r"field 'budget.fraction' is 'half', not a float"),
    (lambda d: d["weights"].update(source="kind"), r"field 'weights.source' is 'kind'; allowed: proxy-pretrained"),
    (lambda d: d["objectives"][1].update(direction="up"), r"field 'objectives.1.direction' is 'up'"),
    (lambda d: d["storage"].update(kind="sqlite", location="sqlite://x:1:2/"), r"field 'storage.location'"),
])
def test_malformed_manifest_is_one_line_naming_file_and_field(study, tmp_path, edit, message):
    layout = StudyLayout(tmp_path)
    d = read_manifest(StudyLayout(study["dir"])).to_dict()
    edit(d)
    layout.manifest.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(layout)
    text = str(err.value)
    assert "\n" not in text and text.startswith("manifest: ") and str(layout.manifest) in text


def test_report_refuses_a_broken_manifest_with_exit_2(study, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(study["dir"], d)
    (d / MANIFEST).write_text('{"version": 1, "study": ')
    before = (d / RESULTS_DB).read_bytes()
    rc, _, err = run_cli(["report", str(d), "-o", str(tmp_path / "rep"), "--quiet"])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(d / MANIFEST) in lines[0] and "not valid JSON" in lines[0]
    assert (d / RESULTS_DB).read_bytes() == before and not (tmp_path / "rep").exists()
    rc, _, err = run_cli(["export", str(d), "-o", str(tmp_path / "c.json")])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "c.json").exists()


# ----------------------------------------------------------------------------- storage strings
@pytest.mark.parametrize("text,kind,display", [
    (None, "journal", "DEFAULT"),
    ("", "journal", "DEFAULT"),
    ("runs/x/optuna.journal", "journal", "runs/x/optuna.journal"),
    ("journal:/tmp/a.log", "journal", "/tmp/a.log"),
    ("sqlite:///study.db", "sqlite", "sqlite:///study.db"),
    ("postgresql://u:secret@db.example:5432/tpsx", "postgresql", "postgresql://u:***@db.example:5432/tpsx"),
    ("postgresql+psycopg://u@localhost/tpsx", "postgresql", "postgresql+psycopg://u@localhost/tpsx"),
    ("postgres://u@h/db", "postgresql", "postgres://u@h/db"),
    ("mysql://u@h/db", "rdb", "mysql://u@h/db"),
])
def test_parse_storage_good(text, kind, display):
    s = parse_storage(text, default_journal="DEFAULT")
    assert s.kind == kind and s.display == display
    assert (s.path is not None) == (kind == "journal") and (s.url is None) == (kind == "journal")
    assert "secret" not in json.dumps(s.to_dict())


@pytest.mark.parametrize("text,message", [
    ("postgresql://u:pw@host:abc/db", r"^storage: 'postgresql://u:\*\*\*@host:abc/db' has a bad port"),
    ("postgresql://u@host:99999/db", r"^storage: 'postgresql://u@host:99999/db' has a bad port"),
    ("postgresql://u@host:0/db", r"has port 0"),
    ("postgresql://", r"names no host or database"),
    ("redis://h/0", r"uses scheme 'redis'; allowed: a journal file"),
    ("study.db", r"is neither a journal file \(\*\.journal\) nor a URL"),
    ("journal:", r"names no journal file"),
    (None, r"none given and no default journal"),
])
def test_parse_storage_bad_is_one_line(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_storage(text)
    assert "\n" not in str(err.value) and "allowed:" in str(err.value) and "pw" not in str(err.value)


def test_search_refuses_a_bad_port_before_writing(tmp_path):
    rc, _, err = run_cli(["search", "--study", str(SMOKE), "--out", str(tmp_path / "runs"),
                       "--storage", "postgresql://u@localhost:5x32/db", "--trials", "1", "--quiet"])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "postgresql://u@localhost:5x32/db" in lines[0] and "port" in lines[0]
    assert "invalid literal" not in err and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- one owner of the layout
def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _help_strings(tree: ast.AST) -> set[int]:
    """String constants inside an argparse ``help=`` (user documentation, like docstrings)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "help":
            ids.update(id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant))
    return ids


def test_only_the_manifest_module_spells_the_study_folder():
    """Acceptance 4: outside tpsexplore/manifest.py no code (docstrings and --help text aside) names the study
    folder's files. tpsexplore.storage is exempt: it is standalone and names only its own database file in a hint."""
    names = (RESULTS_DB, JOURNAL, MANIFEST, "trial_<n>")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() == "manifest.py" or rel.parts[0] == "storage":
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree) | _help_strings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                hits = [n for n in names if n in node.value]
                if hits:
                    offenders.append(f"{rel}:{node.lineno}: {hits[0]}")
            if isinstance(node, ast.JoinedStr):  # f"trial_{n}..." builds a weights file name
                parts = node.values
                for a, b in zip(parts, parts[1:]):
                    if isinstance(a, ast.Constant) and str(a.value).endswith("trial_") and \
                            isinstance(b, ast.FormattedValue) and id(node) not in skip:
                        offenders.append(f"{rel}:{node.lineno}: trial_{{n}}")
    assert not offenders, offenders
