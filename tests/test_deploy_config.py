"""Deployment configs that cannot silently go wrong (issue 10, parts 1 and 2): `apply` checks the geometry a config
was searched on and adapts it only when asked (printing the GMACs it now costs), and `load_deployment` / `tpsexplore
export` resolve the trial's real weights through the study, verify their sha256 and refuse, in one line, anything
missing. Real tiny timm ViTs and a real study folder (tests/test_report.py's `make_study`), no mocks."""
from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tpsexplore
from cli_run import run_cli
from test_report import PROXY_DATA, TINY, TRIALS, make_study
from tpsexplore.backbones import create_backbone
from tpsexplore.manifest import StudyLayout, read_manifest
from tpsexplore.measure.flops import analytic_macs, geometry_from_model
from tpsexplore.reduce import ReductionConfig, last_info, method_names, token_schedule
from tpsexplore.reduce.patch import describe_geometry, model_geometry
from tpsexplore.report import load_deployment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEARCHED = "img 32 (16 patch + 1 prefix tokens), depth 4, width 64"  # TINY: what the study searched on
OTHER = dict(TINY, img_size=64)  # the same backbone at 64 px: 64 patch tokens
OTHER_TEXT = "img 64 (64 patch + 1 prefix tokens), depth 4, width 64"


def _model(**kw) -> torch.nn.Module:
    return create_backbone("deit_t", weights="random", num_classes=10, **kw).eval()


def _method_config(method: str) -> ReductionConfig:
    if method == "tome":
        return ReductionConfig("tome", r=3)
    if method == "similarity":
        return ReductionConfig("similarity", (0,), (0.5,))
    return ReductionConfig(method, (1, 2), (0.6,))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("deploy"), model=TINY, data=PROXY_DATA)


@pytest.fixture(scope="module")
def exported(study: Path, tmp_path_factory) -> dict:
    """Trial 1 (eTPS) exported without --weights: the config names the study's own weights file."""
    out = tmp_path_factory.mktemp("exported") / "config.json"
    rc, _, err = run_cli(["export", str(study), "--trial", "1", "-o", str(out)])
    assert rc == 0, err
    return json.loads(out.read_text()) | {"_path": str(out)}


def _deployment(exported: dict, config: ReductionConfig) -> dict:
    """The exported config with another reduction (and its searched GMACs on the study's geometry)."""
    cfg = copy.deepcopy({k: v for k, v in exported.items() if k != "_path"})
    cfg["reduction"] = config.to_dict()
    cfg["gmacs"] = analytic_macs(config, geometry_from_model(_model(**TINY))).gmacs
    return cfg


# ----------------------------------------------------------------------------- the exported config
def test_the_exported_config_records_geometry_cost_proxy_and_weights(study: Path, exported: dict):
    manifest = read_manifest(StudyLayout(study))
    g = exported["geometry"]
    assert {k: g[k] for k in ("num_patches", "num_prefix", "depth", "width", "img_size")} == \
        {"num_patches": 16, "num_prefix": 1, "depth": 4, "width": 64, "img_size": 32}
    assert g == {k: getattr(manifest.geometry, k) for k in g}
    assert exported["proxy"] is True  # the study scored on the digits proxy
    assert exported["gmacs"] == pytest.approx(exported["measurements"]["gmacs@analytic"]["value"], rel=1e-12)
    assert exported["baseline_gmacs"] == manifest.budget.baseline_gmacs
    w = exported["weights"]
    assert w["path"] == "weights/trial_1.safetensors"  # relative to the study folder, not to where export ran
    assert w["sha256"] == hashlib.sha256((study / w["path"]).read_bytes()).hexdigest()
    assert Path(exported["study"]["path"]).is_absolute()


# ----------------------------------------------------------------------------- apply checks the geometry
@pytest.mark.parametrize("method", method_names())
def test_another_geometry_is_refused_then_adapted_with_the_printed_gmacs(method: str, exported: dict):
    config = _method_config(method)
    cfg = _deployment(exported, config)
    model = _model(**OTHER)
    with pytest.raises(ValueError) as e:
        tpsexplore.apply(model, cfg)
    msg = str(e.value)
    assert msg.startswith("geometry:") and "\n" not in msg and SEARCHED in msg and OTHER_TEXT in msg, msg
    assert not hasattr(model, "tps_config")  # refused before patching

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpsexplore.apply(model, cfg, adapt=True)
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0] and lines[0].startswith("geometry: adapted"), lines
    adapted = model.tps_config
    if method == "tome":
        assert adapted.r == 12  # r = 3 on 16 patch tokens -> 12 on 64 (an absolute count, scaled by the ratio)
    else:
        assert adapted == config  # keep ratios and locations carry over as they are
    expect = analytic_macs(adapted, geometry_from_model(model)).gmacs
    shown = float(re.search(r"; ([0-9.e+-]+) GMACs", lines[0]).group(1))
    assert shown == pytest.approx(expect, rel=5e-4)
    info = model.tps_adaptation
    assert info.gmacs == pytest.approx(expect, rel=1e-12)
    assert info.factor == pytest.approx(expect / cfg["gmacs"], rel=1e-12)
    assert f"{info.factor:.3g}x the searched" in lines[0]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    sched = token_schedule(adapted, num_patches=64, num_prefix=1, depth=4)
    assert last_info(model).token_counts == list(sched.blocks)
    assert info.tokens == (65, sched.final_tokens)


def test_adapt_keeps_the_cost_fraction_of_tome_close(exported: dict):
    """The issue's case: ToMe's absolute r carried to 4x the tokens kept its r and cost far more of the baseline;
    rescaled, the fraction of the baseline stays near the searched one."""
    cfg = _deployment(exported, ReductionConfig("tome", r=3))
    searched_fraction = cfg["gmacs"] / cfg["baseline_gmacs"]
    model = _model(**OTHER)
    with pytest.warns(UserWarning, match="tome r12"):
        tpsexplore.apply(model, cfg, adapt=True)
    info = model.tps_adaptation
    g = geometry_from_model(model)
    unscaled = analytic_macs(ReductionConfig("tome", r=3), g).gmacs / info.baseline_gmacs
    assert abs(info.gmacs / info.baseline_gmacs - searched_fraction) < abs(unscaled - searched_fraction)


def test_locations_beyond_the_depth_and_r_schedules_are_refused(exported: dict):
    shallow = _model(**dict(TINY, depth=2))
    cfg = _deployment(exported, ReductionConfig("topk", (1, 2), (0.6,)))
    with pytest.raises(ValueError, match=r"^locations: \[1, 2\] reach beyond the model's depth") as e:
        tpsexplore.apply(shallow, cfg, adapt=True)
    assert "\n" not in str(e.value) and "depth 4" in str(e.value)
    cfg = _deployment(exported, ReductionConfig("tome", r_schedule=(2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"^r_schedule: has 4 entries"):
        tpsexplore.apply(shallow, cfg, adapt=True)
    deeper = _model(**dict(TINY, img_size=64))
    with pytest.warns(UserWarning, match=r"tome r\[8,8,8,8\]"):  # same depth: each entry scaled
        tpsexplore.apply(deeper, cfg, adapt=True)


def test_configs_without_a_geometry_apply_as_before(exported: dict):
    model = _model(**OTHER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpsexplore.apply(model, ReductionConfig("topk", (1, 2), (0.6,)))  # a plain config: no geometry recorded
        same = _model(**TINY)
        tpsexplore.apply(same, exported["_path"])  # the searched geometry: no warning, nothing adapted
    assert not hasattr(same, "tps_adaptation")
    assert model_geometry(same).num_patches == 16 and describe_geometry(model_geometry(same)) == SEARCHED
    # the core's apply adapts too; without the counter the line gives token counts only
    core = _model(**OTHER)
    with pytest.warns(UserWarning, match=r"65 -> \d+ tokens") as rec:
        tpsexplore.reduce.apply(core, _deployment(exported, ReductionConfig("evit", (1,), (0.5,))), adapt=True)
    assert "GMACs" not in str(rec[0].message)


# ----------------------------------------------------------------------------- weights
def test_load_deployment_resolves_the_study_weights_from_any_cwd(study: Path, exported: dict, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither the study's nor the config's folder
    model = load_deployment(exported["_path"])
    saved = load_file(str(study / "weights" / "trial_1.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [list(c) for c in last_info(model).token_counts] == exported["tokens"]


def test_relative_weights_are_resolved_beside_the_config(study: Path, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    rc, out, err = run_cli(["export", str(study), "--trial", "2", "-o", "deploy/c.json", "--weights",
                         "deploy/w.safetensors"])
    assert rc == 0, err
    cfg = json.loads((work / "deploy" / "c.json").read_text())
    assert cfg["weights"]["path"] == "w.safetensors" and "weights w.safetensors" in out
    assert cfg["weights"]["sha256"] == hashlib.sha256((work / "deploy" / "w.safetensors").read_bytes()).hexdigest()
    (work / "deploy").rename(elsewhere / "moved")  # config and weights travel together
    monkeypatch.chdir(elsewhere)
    model = load_deployment(elsewhere / "moved" / "c.json")
    saved = load_file(str(study / "weights" / "trial_2.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_missing_or_changed_weights_are_refused_in_one_line(study: Path, tmp_path):
    cfg_path, w = tmp_path / "c.json", tmp_path / "w.safetensors"
    assert run_cli(["export", str(study), "--trial", "3", "-o", str(cfg_path), "--weights", str(w)])[0] == 0
    w.write_bytes((study / "weights" / "trial_2.safetensors").read_bytes())  # valid weights, not the exported ones
    with pytest.raises(ValueError) as e:
        load_deployment(cfg_path)
    assert str(e.value).startswith("weights:") and "sha256" in str(e.value) and "\n" not in str(e.value)
    w.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_deployment(cfg_path)
    msg = str(e.value)
    assert msg.startswith("weights:") and str(w) in msg and "\n" not in msg, msg
    # a config whose trial kept no weights never yields a randomly initialised model
    cfg = json.loads(cfg_path.read_text())
    cfg["weights"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^weights: config .* names no weights file"):
        load_deployment(cfg_path)


@pytest.fixture(scope="module")
def no_weights_study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("noweights"), model=TINY, data=PROXY_DATA, weights=False,
                      trials=TRIALS[:3], name="bare")


def test_export_faults_exit_2_in_one_line_and_write_nothing(study: Path, no_weights_study: Path, tmp_path):
    w, c = tmp_path / "w.safetensors", tmp_path / "c.json"
    (tmp_path / "adir").mkdir()
    cases = [
        (["export", str(study), "--trial", "1", "-o", str(tmp_path / "adir"), "--weights", str(w)], "out:"),
        (["export", str(study), "--trial", "1", "-o", str(c), "--weights", str(tmp_path / "adir")], "weights:"),
        (["export", str(no_weights_study), "--trial", "1", "-o", str(c), "--weights", str(w)],
         "weights: trial 1"),
    ]
    for argv, start in cases:
        rc, _, err = run_cli(argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and start in err, (argv, err)
        assert not w.exists() and not c.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"] and not any((tmp_path / "adir").iterdir())
    # without --weights such a trial still exports (to apply to your own weights), saying it names none
    rc, out, _ = run_cli(["export", str(no_weights_study), "--trial", "1", "-o", str(c)])
    assert rc == 0 and "no weights" in out and json.loads(c.read_text())["weights"] is None
    with pytest.raises(ValueError, match="names no weights file"):
        load_deployment(c)
