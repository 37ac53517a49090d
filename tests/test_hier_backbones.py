"""Hierarchical backbones (issue 13, part 1): PVT v1 and CvT written here, Swin-T and PVT v2 from timm.

Params and analytic GMACs at 224 against the papers' (spec 13.2, issue 13's table), the closed form equal to the
fvcore trace on real random-init models at small inputs, strict loading of the official checkpoint layouts
(state dicts built in the official naming from a key/shape table written independently of the modules), forward
shapes, and the short names' wiring.
"""
from __future__ import annotations

import re

import pytest
import timm
import torch

from tpsexplore import WeightsUnavailableError
from tpsexplore.backbones import (
    HIER_SHORT_NAMES,
    build_timm_model,
    create_backbone,
    load_checkpoint,
    resolve_name,
    vit_name,
)
from tpsexplore.measure.flops import traced_macs
from tpsexplore.measure.hier_flops import (
    hier_analytic_macs,
    hier_geometry,
    hier_geometry_from_model,
    traced_without_norms,
)
from tpsexplore.models import official_shapes

# (params in M, spec 13.2's GMACs without norms, TPS Table 2's printed GFLOPs) at 224
PAPERS = {"pvt_t": (13.23, 1.93, 1.94), "pvt_s": (24.49, 3.82, 3.83), "cvt_13": (20.00, 4.57, 4.58),
          "cvt_21": (31.62, 7.18, 7.21)}
# per-stage GMACs of the blocks at 224, without norms (spec 13.2, "where the compute is")
STAGES = {"pvt_t": (0.53, 0.51, 0.47, 0.32), "pvt_s": (0.79, 1.02, 1.42, 0.48),
          "cvt_13": (0.45, 0.73, 3.14), "cvt_21": (0.45, 1.46, 5.02)}
SMALL = dict(img_size=64, num_classes=10)


@pytest.mark.parametrize("name", PAPERS)
def test_params_and_gmacs_match_the_papers(name):
    geo = hier_geometry(name)
    params, spec, printed = PAPERS[name]
    assert geo.num_params / 1e6 == pytest.approx(params, abs=0.005)
    bare = hier_analytic_macs(geo, norms=False)
    assert bare.gmacs == pytest.approx(spec, abs=0.005)  # the spec's count, to its last digit
    assert [s / 1e9 for s in bare.stages] == pytest.approx(STAGES[name], abs=0.005)
    assert bare.total - sum(bare.stages) == bare.patch_embed + bare.head and bare.norms == bare.final_norm == 0
    full = hier_analytic_macs(geo)  # fvcore's convention (LayerNorm 5, BatchNorm 2 per element): TPS Table 2
    assert full.gmacs == pytest.approx(printed, abs=0.005)
    assert full.total - bare.total == full.norms + full.final_norm > 0


def test_swin_t_matches_the_published_count():
    geo = hier_geometry("swin_t")
    assert geo.num_params / 1e6 == pytest.approx(28.3, rel=0.01)
    report = hier_analytic_macs(geo)
    assert report.gmacs == pytest.approx(4.49, rel=0.01)
    assert hier_analytic_macs(geo, norms=False).gmacs == pytest.approx(4.49, abs=0.005)  # spec 13.1's baseline
    assert [s.grid for s in geo.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert report.tokens == ((3136, 49), (784, 49), (196, 49), (49, 49))  # 7x7 windows


def test_token_counts_per_stage():
    pvt = hier_analytic_macs(hier_geometry("pvt_s"))
    assert pvt.tokens == ((3136, 49), (784, 49), (196, 49), (50, 50))  # SR to 7x7; the cls stage is global
    cvt = hier_analytic_macs(hier_geometry("cvt_13"))
    assert cvt.tokens == ((3136, 784), (784, 196), (197, 50))  # k/v from a stride-2 conv; cls in stage 2 only
    v2 = hier_geometry("pvt_v2_b1", img_size=96)
    assert v2.img_size == (96, 96) and [s.grid for s in v2.stages] == [(24, 24), (12, 12), (6, 6), (3, 3)]


@pytest.mark.parametrize("name", sorted(HIER_SHORT_NAMES))
def test_analytic_equals_trace(name):
    torch.manual_seed(0)
    model = create_backbone(name, weights="random", **SMALL).eval()
    geo = hier_geometry_from_model(model)
    analytic = hier_analytic_macs(geo)
    traced = traced_macs(model)
    assert traced.input_size == (1, 3, 64, 64)
    assert traced.total == analytic.total, (traced.by_operator, analytic.as_dict())
    assert traced_without_norms(traced) == hier_analytic_macs(geo, norms=False).total
    assert traced.params == geo.num_params
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_trace_at_224_equals_the_paper_count():
    model = create_backbone("pvt_t", weights="random").eval()
    traced = traced_macs(model)
    assert traced.total == hier_analytic_macs(hier_geometry("pvt_t")).total
    assert traced.gmacs == pytest.approx(1.94, abs=0.005)  # TPS Table 2's PVT-T: fvcore's count
    assert traced_without_norms(traced) / 1e9 == pytest.approx(1.93, abs=0.005)  # spec 13.2's


def _random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s, generator=gen) + 0.5
            for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["pvt_t", "pvt_s", "cvt_13", "cvt_21"])
def test_the_models_have_the_official_layout(name):
    with torch.device("meta"):  # names and shapes only: no weights
        model = build_timm_model(resolve_name(name), **SMALL)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(resolve_name(name), **SMALL)


@pytest.mark.parametrize("name", ["pvt_t", "cvt_13"])
def test_official_checkpoint_loads_strictly(tmp_path, name):
    shapes = official_shapes(resolve_name(name), **SMALL)
    state = _random_state(shapes)
    path = tmp_path / "official.pth"
    torch.save({"model": state, "epoch": 300}, path)
    model = create_backbone(name, checkpoint=path, **SMALL)
    own = model.state_dict()
    assert set(own) == set(shapes)
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    del state[next(k for k in shapes if ".attn.proj_k." in k or ".attn.kv." in k)]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"^checkpoint: .* does not fit .*missing \[.*attn\.(kv|proj_k)\.weight"):
        load_checkpoint(model, path)


def _official_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> the official release's (downsample at the end of a stage, plain head)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def _official_pvt_v2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm PVT v2 keys -> the official release's (patch_embed{n}, block{n}.{j}, norm{n}, dwconv.dwconv)."""
    out = {}
    for k, v in state.items():
        k = k.replace("patch_embed.", "patch_embed1.").replace("dwconv.", "dwconv.dwconv.")
        k = re.sub(r"stages\.(\d+)\.downsample", lambda m: f"patch_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        k = re.sub(r"stages\.(\d+)\.norm", lambda m: f"norm{int(m.group(1)) + 1}", k)
        out[k] = v
    return out


@pytest.mark.parametrize("name, to_official", [("swin_t", _official_swin), ("pvt_v2_b1", _official_pvt_v2)])
def test_timm_families_load_their_official_layout(tmp_path, name, to_official):
    torch.manual_seed(0)
    state = create_backbone(name, weights="random", **SMALL).state_dict()
    official = to_official(state)
    assert set(official) != set(state)
    path = tmp_path / "official.pth"
    torch.save(official, path)
    own = create_backbone(name, checkpoint=path, **SMALL).state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_short_names_and_refusals():
    assert resolve_name("swin_t") == "swin_tiny_patch4_window7_224" and resolve_name("pvt_t") == "pvt_v1_tiny"
    for name in ("pvt_v1_tiny", "pvt_v1_small", "cvt_13", "cvt_21"):  # registered, and none of timm's own
        assert timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("tpsexplore.")
    with pytest.raises(ValueError, match=r"^backbone: 'swin_t' \(swin_tiny_patch4_window7_224\) is a hierarchical"):
        vit_name("swin_t")  # the ViT-only paths (profile, the ViT count)
    with pytest.raises(WeightsUnavailableError, match=r"^backbone: no pretrained weights for 'cvt_13'.*checkpoint"):
        create_backbone("cvt_13")
    with pytest.raises(ValueError, match=r"^backbone: pvt_v1_tiny does not take \['patch_size'"):
        create_backbone("pvt_t", weights="random", patch_size=8)
    model = create_backbone("pvt_t", weights="random", **SMALL)
    from tpsexplore.reduce import ReductionConfig, apply

    with pytest.raises(ValueError, match=r"^locations: block 1 lies in a stage that keeps the token grid"):
        apply(model, ReductionConfig("topk", (1,), (0.7,)))  # PVT v1 reduces (part 2); Top-K in its last stage only
    v2 = create_backbone("pvt_v2_b1", weights="random", **SMALL)
    assert v2.pretrained_cfg["input_size"] == (3, 64, 64)


def test_bad_input_is_one_line():
    from torch import nn

    from tpsexplore.models import PVTConfig

    with pytest.raises(ValueError, match=r"^model: Linear is not a supported hierarchical backbone"):
        hier_geometry_from_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^backbone: 'deit_t' builds a VisionTransformer, not a hierarchical"):
        hier_geometry("deit_t")
    with pytest.raises(ValueError, match=r"^sr_ratios: \(8, 4, 2, 2\); the last stage carries the class token"):
        PVTConfig(sr_ratios=(8, 4, 2, 2))
    with pytest.raises(ValueError, match=r"^img_size: \(64, 64\) differs from the \(224, 224\)"):
        with torch.device("meta"):
            hier_geometry_from_model(build_timm_model("pvt_v1_tiny"), img_size=64)


def test_proxy_canvas_per_family():
    """PVT (v1, v2) trains on a 64 px proxy canvas (its last stage keeps a 2 x 2 grid), the others on 56 px; a
    study that sets img_size keeps it."""
    import torch

    from tpsexplore.measure.data import PROXY_IMG_SIZE, PROXY_IMG_SIZE_PVT, proxy_img_size
    from tpsexplore.search.spec import build_settings
    from tpsexplore.search.task import Task

    assert (proxy_img_size("pvt_t"), proxy_img_size("pvt_v2_b1")) == (PROXY_IMG_SIZE_PVT,) * 2 == (64, 64)
    assert proxy_img_size("swin_t") == proxy_img_size("cvt_13") == proxy_img_size("deit_t") == PROXY_IMG_SIZE
    cpu = torch.device("cpu")
    task = Task(build_settings({}, {"backbone": "pvt_t"}), cpu)
    assert task.proxy_cfg.img_size == 64 and task.model_kwargs["img_size"] == 64
    assert [s.num_spatial for s in task.geometry.stages][-1] == 4  # the last stage's 2 x 2 grid
    assert "64x64 pvt_v1_tiny's own stage grids" in task.data_description
    assert Task(build_settings({"proxy": {"img_size": 56}}, {"backbone": "pvt_t"}), cpu).proxy_cfg.img_size == 56
