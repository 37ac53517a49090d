"""The deployment hand-off for hierarchical backbones (PVT v1, CvT): a real smoke search of each
(studies/smoke_hier.toml, studies/smoke_cvt.toml; the baseline and one reduced trial) -> `tpsexplore export -o
config.json` and `--format onnx`
through the CLI -> the config records the per-stage token schedule, the analytic GMACs and the stage geometry;
`load_deployment` rebuilds the searched model with the trial's weights (predictors included); onnxruntime's logits
match the eager model's; a config whose geometry does not fit the model is refused with one line; the report skips
the ViT keep maps with a one-line reason. Real search, real models (tiny widths), real onnxruntime; no mocks."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from safetensors.torch import load_file  # noqa: E402

from cli_run import run_cli  # noqa: E402
from tpsexplore import apply, deploy  # noqa: E402
from tpsexplore.backbones import create_backbone  # noqa: E402
from tpsexplore.measure.flops import analytic_macs  # noqa: E402
from tpsexplore.measure.hier_flops import hier_geometry_from_model  # noqa: E402
from tpsexplore.reduce import ReductionConfig  # noqa: E402
from tpsexplore.reduce.patch_hier import hier_schedule_of, stage_geometry  # noqa: E402
from tpsexplore.report import load_deployment  # noqa: E402
from tpsexplore.report.export import model_config_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONNX_TOL = 1e-4  # as the ViT export tests
PT2_TOL = 1e-5
#: family -> (study file, study name, the one method searched: dTPS has predictor weights, random pruning none)
STUDIES = {"pvt_v1": ("smoke_hier.toml", "smoke_hier", "dtps"), "cvt": ("smoke_cvt.toml", "smoke_cvt", "random")}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(STUDIES))
def hand_off(request, proxy_cache, tmp_path_factory) -> dict:
    """A smoke study searched for real (baseline + one fine-tuned reduced trial), its trial 1 exported through the
    CLI as config.json and as model.onnx (with model.onnx.json beside it)."""
    family = request.param
    toml, name, method = STUDIES[family]
    out = tmp_path_factory.mktemp(f"hier-{family}")
    torch.set_num_threads(1)
    rc, _, err = run_cli(["search", "--study", str(ROOT / "studies" / toml), "--out", str(out), "--trials", "2",
                          "--confirm", "0", "--finetune-steps", "2", "--methods", method, "--quiet"])
    assert rc == 0, err[-2000:]
    study = out / name
    assert (study / "weights" / "trial_1.safetensors").is_file()
    config = out / "config.json"
    rc, stdout, err = run_cli(["export", str(study), "--trial", "1", "-o", str(config)])
    assert rc == 0 and not err, err
    onnx_path = out / "model.onnx"
    rc, stdout, err = run_cli(["export", str(study), "--trial", "1", "--format", "onnx", "-o", str(onnx_path)])
    assert rc == 0, err
    assert "as onnx (dynamic batch)" in stdout
    return {"family": family, "study": study, "method": method, "config": config, "onnx": onnx_path,
            "model": tomllib.loads((ROOT / "studies" / toml).read_text())["model"]}


def test_the_config_records_the_stage_schedule_gmacs_and_geometry(hand_off: dict):
    cfg = json.loads(hand_off["config"].read_text())
    assert cfg["reduction"]["method"] == hand_off["method"] and cfg["trial"] == 1
    backbone = cfg["backbone"]
    assert "patch_size" not in backbone  # no ViT overrides for a backbone with its own patch embeddings
    for key, value in hand_off["model"].items():  # the study's [model] overrides, as the search built the model
        assert backbone[key] == value, key
    model = load_deployment(hand_off["config"])
    config = ReductionConfig.from_dict(cfg["reduction"])
    full = [[st["tokens"] + st["num_prefix"]] * 2 for st in cfg["geometry"]["stages"] for _ in range(st["depth"])]
    assert cfg["tokens"] == [list(b) for b in hier_schedule_of(model, config).counts()] != full
    assert cfg["geometry"]["family"] == hand_off["family"]
    assert {k: cfg["geometry"][k] for k in ("family", "img_size", "stages")} == stage_geometry(model)
    assert [s["width"] for s in cfg["geometry"]["stages"]] == hand_off["model"]["embed_dims"]
    gmacs = analytic_macs(config, hier_geometry_from_model(model)).gmacs
    assert cfg["gmacs"] == pytest.approx(gmacs, rel=1e-12)
    assert cfg["measurements"]["gmacs@analytic"]["value"] == pytest.approx(gmacs, rel=1e-9)  # what the search counted
    assert gmacs < cfg["baseline_gmacs"]


def test_load_deployment_rebuilds_the_trial_and_onnxruntime_matches_it(hand_off: dict):
    model = load_deployment(model_config_path(hand_off["onnx"]))
    state = load_file(str(hand_off["study"] / "weights" / "trial_1.safetensors"))
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in state)  # strict: the trial's weights
    assert any(".tps_stage." in k for k in state) == (hand_off["method"] == "dtps")  # predictor weights loaded too
    images = deploy.example_input(model, 3, seed=1)  # another batch than the export traced with: dynamic
    with torch.no_grad():
        eager = model(images)
    got = deploy.run_onnx(deploy.onnxruntime_session(hand_off["onnx"]), images)
    torch.testing.assert_close(got, eager, atol=ONNX_TOL, rtol=0)
    assert not torch.allclose(eager[0], eager[1])  # a real forward, not a constant


def test_a_config_of_another_geometry_is_refused_with_one_line(hand_off: dict, tmp_path: Path):
    cfg = json.loads(hand_off["config"].read_text())
    cfg["geometry"]["stages"][-1]["depth"] += 1
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as exc:
        load_deployment(bad, weights=hand_off["study"] / "weights" / "trial_1.safetensors")
    msg = str(exc.value)
    assert msg.startswith("geometry: the config was searched on ") and "\n" not in msg
    # a model built with other widths than the study's refuses the (unchanged) config in `apply`, even with adapt
    kw = dict(hand_off["model"], num_classes=cfg["backbone"]["num_classes"])
    kw["embed_dims"] = [2 * d for d in kw["embed_dims"]]
    other = create_backbone(cfg["backbone"]["name"], weights="random", **kw)
    for adapt in (False, True):
        with pytest.raises(ValueError, match=r"^geometry: .*widths") as exc:
            apply(other, str(hand_off["config"]), adapt=adapt)
        assert "\n" not in str(exc.value)


def test_the_report_skips_keep_maps_with_a_one_line_reason(hand_off: dict):
    from tpsexplore.report.build import _keep_maps_figure
    from tpsexplore.report.frame import open_study

    entry, why = _keep_maps_figure(open_study(hand_off["study"]), 2, 2)
    assert entry is None and "hierarchical backbone" in why and "\n" not in why
    assert "Error" not in why and "could not be rebuilt" not in why


@pytest.mark.slow
def test_pt2_export_matches_eager(hand_off: dict, tmp_path: Path):
    path = tmp_path / "model.pt2"
    rc, _, err = run_cli(["export", str(hand_off["study"]), "--trial", "1", "--format", "pt2", "-o", str(path)])
    assert rc == 0, err
    model = load_deployment(model_config_path(path))
    images = deploy.example_input(model, 3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(deploy.load_pt2(path).module()(images), model(images), atol=PT2_TOL, rtol=0)
