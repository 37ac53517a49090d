"""Token reduction on hierarchical backbones (issue 13, part 2): PVT v1 and CvT.

Real random-init models at small inputs (PVT-T and CvT-13 at 96 px: PVT grids 24/12/6/3, CvT 24/12/6): zero
reduction is bit-identical, every block's token counts follow `reduce.hier_schedule` (checked against numbers worked
out by hand from the documented rule), the closed-form count equals the fvcore trace of the patched model for every
supported method and both forms, reduced forwards are finite and change the outputs, training with a learned
predictor runs backward, unsupported placements are refused with one line, and the Table 2 configs reach the
paper's GMACs at 224.
"""
from __future__ import annotations

import pytest
import torch

from tpsexplore.backbones import create_backbone
from tpsexplore.measure.flops import traced_macs
from tpsexplore.measure.hier_flops import hier_analytic_macs, hier_geometry, hier_geometry_from_model, \
    hier_reduced_macs
from tpsexplore.reduce import ReductionConfig, apply, last_info, ratio_loss, remove
from tpsexplore.reduce.hier_schedule import TABLE2_CONFIGS, TABLE2_GMACS
from tpsexplore.reduce.patch_hier import HierReductionMixin

IMG = 96
SMALL = dict(img_size=IMG, num_classes=10)
# global block indices: PVT-T stages are blocks 0-1 / 2-3 / 4-5 / 6-7 (grid form but the last, which is physical);
# CvT-13 stages are blocks 0 / 1-2 / 3-12 (all keep the grid; the class token lives in the last)
CONFIGS = {
    "pvt_t": [
        ReductionConfig("dtps", (5, 6), (0.5,)),  # grid form in stage 2, physical in stage 3
        ReductionConfig("dynamicvit", (2, 3, 7), (0.7, 0.5, 0.6)),
        ReductionConfig("etps", (6,), (0.5,)),
        ReductionConfig("evit", (6, 7), (0.7,)),
        ReductionConfig("topk", (6,), (0.4,)),  # (in the last block it could not change the class token)
        ReductionConfig("tome", r=2),
        ReductionConfig("random", (1, 4), (0.5,), treatment="squeeze"),
    ],
    "cvt_13": [
        ReductionConfig("dtps", (4, 7, 10), (0.7,)),
        ReductionConfig("dynamicvit", (2, 5), (0.5,)),
        ReductionConfig("random", (3,), (0.3,)),
    ],
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(name, weights="random", **SMALL).eval()


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["pvt_t", "cvt_13"])
def test_zero_reduction_is_bit_identical(name):
    model, x = _model(name), _image()
    cls = type(model)
    with torch.no_grad():
        ref = model(x)
        for cfg in (ReductionConfig(), ReductionConfig("dtps", (2, 5), (1.0,)),
                    ReductionConfig("random", (0, 3), (1.0,))):
            apply(model, cfg)
            assert isinstance(model, HierReductionMixin)
            assert torch.equal(model(x), ref), cfg.label
            assert len(last_info(model).token_counts) == sum(model.config.depths)
        remove(model)
        assert type(model) is cls and not any(hasattr(m, "tps_stage") for m in model.modules())
        assert torch.equal(model(x), ref)


def test_token_counts_follow_the_documented_rule():
    # PVT-T at 96: 576 / 144 / 36 / 9 + cls tokens. dTPS keep 0.5 at block 5 (stage 2's second block: int(36 * 0.5)
    # = 18 live queries, the grid keeps its 36 slots) and at block 6 (stage 3's first: a fresh count,
    # int(9 * 0.5) = 4 + cls, physically removed).
    model = _model("pvt_t")
    apply(model, ReductionConfig("dtps", (5, 6), (0.5,)))
    with torch.no_grad():
        assert model(_image()).shape == (2, 10)
    expect = [(576, 576)] * 2 + [(144, 144)] * 2 + [(36, 36), (18, 18), (5, 5), (5, 5)]
    assert last_info(model).token_counts == expect == list(model.tps_schedule.blocks)
    assert model.forward_features(_image()).shape == (2, 5, 512)  # the physical stage's tokens leave the model
    # eTPS keep 0.5 inside block 6 (attention on 10 tokens, MLP on ceil(0.5 * 9) = 5 + cls), EViT also fuses one
    apply(model, ReductionConfig("etps", (6,), (0.5,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts[6:] == [(10, 6), (6, 6)]
    apply(model, ReductionConfig("evit", (6,), (0.5,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts[6:] == [(10, 7), (7, 7)]
    # CvT-13 at 96: 576 / 144 / 36 + cls. dTPS keep 0.7 at blocks 4 and 7 (stage 2): cumulative int(36 * 0.7) = 25,
    # int(36 * 0.49) = 17 live queries (+ cls); the other blocks run every token.
    cvt = _model("cvt_13")
    apply(cvt, ReductionConfig("dtps", (4, 7), (0.7,)))
    with torch.no_grad():
        cvt(_image())
    counts = last_info(cvt).token_counts
    assert counts == [(576, 576), (144, 144), (144, 144), (37, 37)] + [(26, 26)] * 3 + [(18, 18)] * 6
    assert model.tps_schedule.final_tokens == 7 and cvt.tps_schedule.final_tokens == 37


@pytest.mark.parametrize("name, index", [(n, i) for n in CONFIGS for i in range(len(CONFIGS[n]))])
def test_analytic_equals_trace(name, index):
    cfg = CONFIGS[name][index]
    model = _model(name)
    geo = hier_geometry_from_model(model)
    assert hier_reduced_macs(ReductionConfig(), geo) == hier_analytic_macs(geo)
    apply(model, cfg)
    analytic = hier_reduced_macs(cfg, geo)
    traced = traced_macs(model)
    assert traced.total == analytic.total, (cfg.label, traced.by_operator, analytic.as_dict())
    assert analytic.total < hier_analytic_macs(geo).total
    with torch.no_grad():
        model(_image(1))
    assert last_info(model).token_counts == list(model.tps_schedule.blocks)


@pytest.mark.parametrize("name", ["pvt_t", "cvt_13"])
def test_reduced_forward_is_finite_and_changes_the_output(name):
    model, x = _model(name), _image()
    with torch.no_grad():
        ref = model(x)
        for cfg in CONFIGS[name]:
            apply(model, cfg)
            out = model(x)
            assert out.shape == ref.shape and torch.isfinite(out).all(), cfg.label
            assert not torch.allclose(out, ref, atol=1e-4), cfg.label


@pytest.mark.parametrize("name, cfg", [("pvt_t", ReductionConfig("dtps", (5, 6), (0.5,))),
                                       ("cvt_13", ReductionConfig("dynamicvit", (4, 7), (0.7,)))])
def test_training_with_a_predictor_runs_backward(name, cfg):
    model = _model(name)
    apply(model, cfg)
    model.train()
    out = model(_image(4))
    info = last_info(model)
    assert len(info.decisions) == 2 and info.keep_targets == pytest.approx(
        [0.5, 0.5] if name == "pvt_t" else [0.7, 0.49])
    assert len(info.token_counts) == len(model.tps_schedule.blocks) == sum(model.config.depths)
    loss = out.logsumexp(-1).mean() + 2.0 * ratio_loss(model)
    loss.backward()
    predictors = [m.tps_stage.predictor for m in model.modules() if hasattr(m, "tps_stage")]
    assert len(predictors) == 2 and all(p.in_conv[1].weight.grad is not None for p in predictors)


def test_refusals_are_one_line():
    pvt = _model("pvt_t")
    with pytest.raises(ValueError, match=r"^locations: block 1 lies in a stage that keeps the token grid, where "
                                         r"'topk k0.7@1' cannot run .*allowed there: dtps, dynamicvit, random; "
                                         r"topk runs in blocks 6..7$"):
        apply(pvt, ReductionConfig("topk", (1,), (0.7,)))
    with pytest.raises(ValueError, match=r"^locations: \[5\] lie in stages that keep the token grid; ToMe merges "
                                         r"only in the physical stage \(blocks 6..7\)$"):
        apply(pvt, ReductionConfig("tome", (5, 6), r=1))
    with pytest.raises(ValueError, match=r"^method: 'similarity' is not supported on hierarchical backbones; "
                                         r"allowed: dtps, dynamicvit, etps, evit, topk, tome, random$"):
        apply(pvt, ReductionConfig("similarity", (0,), (0.5,)))
    cvt = _model("cvt_13")
    with pytest.raises(ValueError, match=r"^method: 'tome' merges tokens without a grid slot, which CvT cannot"):
        apply(cvt, ReductionConfig("tome", r=2))
    with pytest.raises(ValueError, match=r"^locations: block 5 .* 'etps k0.7@5' cannot run \(it scores by class "
                                         r"attention, which needs a key per token\).*etps runs in no stage of CvT$"):
        apply(cvt, ReductionConfig("etps", (5,), (0.7,)))
    with pytest.raises(ValueError, match=r"^locations: \[13\] out of range; allowed 0..12"):
        apply(cvt, ReductionConfig("dtps", (13,), (0.7,)))
    with pytest.raises(ValueError, match=r"^swin_form: 'cheap' applies only to Swin backbones; allowed here: 'auto'$"):
        apply(pvt, ReductionConfig("dtps", (6,), (0.7,), swin_form="cheap"))  # (Swin: tests/test_swin_reduce.py)
    assert type(pvt).__name__ == "PyramidVisionTransformerV1"  # a refused apply leaves the model unpatched


@pytest.mark.parametrize("name", sorted(TABLE2_CONFIGS))
def test_table2_configs_reach_the_papers_gmacs(name):
    geo = hier_geometry(name)  # 224, meta build: no weights
    base, target = TABLE2_GMACS[name]
    assert hier_analytic_macs(geo).gmacs == pytest.approx(base, abs=0.005)
    assert hier_reduced_macs(TABLE2_CONFIGS[name], geo).gmacs == pytest.approx(target, abs=0.005)


def test_smoke_search_on_pvt(proxy_cache, tmp_path, one_torch_thread):
    """`tpsexplore search` on a tiny-width PVT v1 (studies/smoke_hier.toml): every trial runs, the hierarchical
    geometry and count reach the manifest and the results store."""
    from cli_run import smoke_search

    manifest, _, _ = smoke_search("smoke_hier", tmp_path, {"baseline", "dtps", "random", "tome"}, {"dtps"})
    assert manifest.backbone == "pvt_t" and manifest.geometry.num_patches == 256 and manifest.geometry.depth == 6
