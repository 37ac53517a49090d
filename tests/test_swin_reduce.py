"""Token reduction on Swin (issue 13): DynamicSwin's cheap form, the per-window form, similarity pruning.

Real random-init timm Swin models: Swin-T's depths and windows at width 32 and 112 px (grids 28 / 14 / 7 / 4, windows
7 / 7 / 7 / 4: shifted windows in stages 0 and 1, one window in stages 2 and 3), so every path runs in seconds. Zero
reduction is bit-identical; the per-block token counts follow `reduce.swin_schedule` (checked against numbers worked
out by hand from the documented rule); the forms' own block code equals timm's block when it keeps every token; the
closed form equals the fvcore trace of the patched model for every form and method; DynamicSwin-T/0.7 counts 4.04
GMACs at 224; training with the predictor runs backward; what cannot run is refused with one line; the search offers
Swin's methods and a smoke search on a tiny Swin runs end to end.
"""
from __future__ import annotations

import pytest
import torch

from tpsexplore.backbones import create_backbone
from tpsexplore.measure.flops import traced_macs
from tpsexplore.measure.hier_flops import hier_analytic_macs, hier_geometry, hier_geometry_from_model, \
    hier_reduced_macs, hier_reduced_params, traced_without_norms
from tpsexplore.reduce import ReductionConfig, apply, last_info, ops, ratio_loss, remove
from tpsexplore.reduce.patch_swin import FastMlp, SwinReductionMixin, _cheap_block, _window_block
from tpsexplore.reduce.schedule import token_schedule
from tpsexplore.reduce.swin_schedule import dynamicswin_config, swin_form

IMG = 112
SMALL = dict(img_size=IMG, num_classes=10, embed_dim=32, num_heads=(1, 2, 4, 8))
# global blocks (Swin-T depths 2-2-6-2): stage 0 = 0-1, stage 1 = 2-3, stage 2 = 4-9, stage 3 = 10-11
CONFIGS = [
    dynamicswin_config(0.7),  # cheap form: DynamicSwin-T/0.7
    dynamicswin_config(0.7, method="dtps"),  # cheap form, pruned tokens squeezed into the kept ones
    ReductionConfig("random", (4, 7), (0.6, 0.3), swin_form="cheap"),
    ReductionConfig("dynamicvit", (1, 2, 6, 10), (0.7,)),  # window form (the default), every stage
    ReductionConfig("random", (0, 3, 5), (0.5,)),
    ReductionConfig("similarity", (0,), (0.6,)),  # pre-transformer: every block of every stage
    ReductionConfig("similarity", (1, 5), (0.5,), similarity_placement="layerwise", similarity_metric="dot"),
]


def _model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("swin_t", weights="random", **{**SMALL, **kw}).eval()


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def test_zero_reduction_is_bit_identical():
    model, x = _model(), _image()
    cls = type(model)
    with torch.no_grad():
        ref = model(x)
        for cfg in (ReductionConfig(), ReductionConfig("random", (0, 5), (1.0,)),
                    ReductionConfig("dynamicvit", (5, 6), (1.0,), swin_form="cheap"),
                    ReductionConfig("similarity", (0,), (1.0,))):
            apply(model, cfg)
            assert isinstance(model, SwinReductionMixin)
            assert torch.equal(model(x), ref), cfg.label
            assert last_info(model).token_counts == [(784, 784)] * 2 + [(196, 196)] * 2 + [(49, 49)] * 6 + \
                [(16, 16)] * 2
        apply(model, CONFIGS[0])
        remove(model)
        assert type(model) is cls and not any(hasattr(m, "tps_stage") or hasattr(m, "tps_fast")
                                              for m in model.modules())
        assert torch.equal(model(x), ref)


def test_form_blocks_equal_timms_block_when_every_token_is_kept():
    """The window form's gather / biased attention / scatter and the cheap form's split are timm's block when
    nothing is pruned (shifted and unshifted windows), so a reduced block differs only by what it prunes."""
    model = _model()
    x = torch.randn(2, 28, 28, 32, generator=torch.Generator().manual_seed(1))
    score = torch.randn(2, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for blk in model.layers[0].blocks:  # block 0 unshifted, block 1 shifted by (3, 3)
            assert torch.allclose(_window_block(blk, x, score, 49), blk(x), atol=1e-5)
            # 20 of 49 per window: exactly 16 windows x 20 tokens per image change, the others stay frozen
            changed = (_window_block(blk, x, score, 20) != x).any(dim=-1)
            assert changed.sum(dim=(1, 2)).tolist() == [16 * 20, 16 * 20]
        blk = model.layers[0].blocks[1]
        blk.tps_fast = FastMlp(32)
        order = score.flatten(1).argsort(dim=1, descending=True)
        assert torch.allclose(_cheap_block(blk, x, order, order[:, :0]), blk(x), atol=1e-5)
        # a fresh fast path is the identity: pruned tokens skip the MLP (x + attention only)
        after_attn = x + blk._attn(blk.norm1(x))
        pruned = _cheap_block(blk, x, order[:, :500], order[:, 500:]).flatten(1, 2)
        assert torch.allclose(ops.gather_tokens(pruned, order[:, 500:]),
                              ops.gather_tokens(after_attn.flatten(1, 2), order[:, 500:]), atol=1e-6)


def test_token_counts_follow_the_documented_rule():
    model = _model()
    # cheap form, DynamicSwin-T/0.7 at 112: stage 2 has 7 x 7 = 49 tokens; not cumulative: int(49 * 0.7) = 34,
    # int(49 * 0.5) = 24, int(49 * 0.3) = 14 through the full MLP from blocks 5, 6, 7 to the stage's end; attention
    # always dense
    apply(model, dynamicswin_config(0.7))
    with torch.no_grad():
        model(_image())
    dense = [(784, 784)] * 2 + [(196, 196)] * 2
    assert last_info(model).token_counts == dense + [(49, 49), (49, 34), (49, 24)] + [(49, 14)] * 3 + [(16, 16)] * 2
    assert sum(isinstance(getattr(b, "tps_fast", None), FastMlp) for b in model.modules()) == 5
    # window form, dynamicvit keep 0.7 at blocks 1, 2, 6, 10: per window int(49 * 0.7) = 34 (16 windows in stage 0,
    # 4 in stage 1, 1 in stage 2), int(16 * 0.7) = 11 in stage 3's one 4 x 4 window; a reduction holds to the end of
    # its stage, the next stage starts with every token
    apply(model, ReductionConfig("dynamicvit", (1, 2, 6, 10), (0.7,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts == [(784, 784), (544, 544), (136, 136), (136, 136)] + [(49, 49)] * 2 + \
        [(34, 34)] * 4 + [(11, 11)] * 2
    # window form, random keep 0.5 at blocks 4 and 7 (ceil of the current count): 25, then ceil(0.5 * 25) = 13
    apply(model, ReductionConfig("random", (4, 7), (0.5,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts[4:10] == [(25, 25)] * 3 + [(13, 13)] * 3
    # similarity before block 0, keep 0.5: ceil(0.5 * 49) = 25 per window in every block, ceil(0.5 * 16) = 8 in
    # stage 3
    apply(model, ReductionConfig("similarity", (0,), (0.5,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts == [(400, 400)] * 2 + [(100, 100)] * 2 + [(25, 25)] * 6 + [(8, 8)] * 2
    assert model.tps_schedule.final_tokens == 16  # the grid is whole again after every stage


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_analytic_equals_trace(index):
    cfg = CONFIGS[index]
    model = _model()
    geo = hier_geometry_from_model(model)
    assert hier_reduced_macs(ReductionConfig(), geo) == hier_analytic_macs(geo)
    base_params = sum(p.numel() for p in model.parameters())
    apply(model, cfg)
    analytic = hier_reduced_macs(cfg, geo)
    traced = traced_macs(model)
    assert traced.total == analytic.total, (cfg.label, traced.by_operator, analytic.as_dict())
    assert hier_reduced_macs(cfg, geo, norms=False).total == traced_without_norms(traced)  # spec 13's convention
    assert analytic.total < hier_analytic_macs(geo).total
    assert hier_reduced_params(cfg, geo).total == traced.params  # predictors and fast paths included
    assert (traced.params > base_params) == (cfg.spec.policy == "predictor" or swin_form(cfg) == "cheap")
    with torch.no_grad():
        out = model(_image(1))
    assert torch.isfinite(out).all() and last_info(model).token_counts == list(model.tps_schedule.blocks)


def test_reduced_forward_changes_the_output():
    model, x = _model(), _image()
    with torch.no_grad():
        ref = model(x)
        for cfg in CONFIGS[2:]:  # (the cheap form's fresh fast path is the identity: see the block test)
            apply(model, cfg)
            out = model(x)
            assert out.shape == ref.shape and not torch.allclose(out, ref, atol=1e-4), cfg.label


def test_dynamicswin_reaches_its_published_count():
    """Spec 13.1: DynamicSwin-T/0.7 (dense attention, fast MLP path, three predictors) is 4.04 GMACs in the spec's
    convention without norms (README 4.0), from the baseline's 4.49."""
    geo = hier_geometry("swin_t")  # 224, meta build
    assert hier_analytic_macs(geo, norms=False).gmacs == pytest.approx(4.49, abs=0.005)
    cfg = dynamicswin_config(0.7)
    assert cfg.locations == (5, 6, 7) and cfg.keep_ratios == (0.7, 0.5, 0.3) and swin_form(cfg) == "cheap"
    report = hier_reduced_macs(cfg, geo, norms=False)
    assert report.gmacs == pytest.approx(4.04, abs=0.005)
    assert report.predictor == 3 * (196 * (384 * 384 + 384 * 192 + 192 * 96 + 96 * 2))  # no norms: Linears only
    # the window form at the same blocks saves attention work too: keep 0.85 costs the same
    window = hier_reduced_macs(ReductionConfig("dynamicvit", (5, 6, 7), (0.85,)), geo)
    assert window.gmacs == pytest.approx(hier_reduced_macs(cfg, geo).gmacs, rel=0.005)


@pytest.mark.parametrize("cfg, targets", [(dynamicswin_config(0.7), [0.7, 0.5, 0.3]),
                                          (ReductionConfig("dynamicvit", (1, 6, 7), (0.7,)), [0.7, 0.7, 0.49])])
def test_training_with_a_predictor_runs_backward(cfg, targets):
    model = _model()
    apply(model, cfg)
    model.train()
    out = model(_image(4))
    info = last_info(model)
    assert len(info.decisions) == 3 and info.keep_targets == pytest.approx(targets)
    loss = out.logsumexp(-1).mean() + 2.0 * ratio_loss(model)
    loss.backward()
    predictors = [m.tps_stage.predictor for m in model.modules() if hasattr(m, "tps_stage")]
    assert len(predictors) == 3 and all(p.in_conv[1].weight.grad is not None for p in predictors)
    fast = [m.tps_fast for m in model.modules() if hasattr(m, "tps_fast")]
    assert all(f.fc.weight.grad is not None for f in fast) and len(fast) == (5 if swin_form(cfg) == "cheap" else 0)


def test_similarity_scores_in_linear_time_equal_the_pairwise_mean():
    f = torch.randn(2, 60, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for metric in ("cosine", "dot"):
        assert torch.allclose(ops.redundancy_linear(f, metric), ops.redundancy(f, metric), atol=1e-12)


def test_refusals_are_one_line():
    model = _model()
    cases = [
        (ReductionConfig("dtps", (3,), (0.7,)), r"^locations: \[3\] lie outside stage 2 \(blocks 4..9\), the only "
                                                r"stage the cheap form \(DynamicSwin\) reduces in$"),
        (ReductionConfig("dtps", (5,), (0.7,), swin_form="window"), r"^swin_form: 'window' runs dynamicvit, random, "
                                                                    r"similarity, not 'dtps'; dtps runs in the "
                                                                    r"'cheap' form$"),
        (ReductionConfig("similarity", (0,), (0.5,), swin_form="cheap"), r"^swin_form: 'cheap' runs dynamicvit, "
                                                                         r"dtps, random, not 'similarity'"),
        (ReductionConfig("random", (2,), (0.5,), treatment="squeeze"), r"^treatment: 'squeeze' is not supported by "
                                                                       r"Swin's window form"),
        (ReductionConfig("etps", (5,), (0.7,)), r"^method: 'etps' is not supported on Swin; allowed: dynamicvit, "
                                                r"dtps, random, similarity$"),
        (ReductionConfig("similarity", (0,), (0.5,), similarity_metric="euclidean"),
         r"^similarity_metric: 'euclidean' is not supported on Swin \(no O\(N C\) form\); allowed: cosine, dot$"),
        (ReductionConfig("similarity", (0,), (0.5,), similarity_with_pos=True), r"^similarity_with_pos: Swin has no "
                                                                                r"position embedding"),
        (ReductionConfig("random", (12,), (0.5,)), r"^locations: \[12\] out of range; allowed 0..11"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            apply(model, cfg)
    assert type(model).__name__ == "SwinTransformer"  # a refused apply leaves the model unpatched
    odd = _model(img_size=96)  # grids 24 / 12 / 6 / 3: stage 0 is not a whole number of 7 x 7 windows
    with pytest.raises(ValueError, match=r"^model: stage 0's 24x24 grid is not a whole number of 7x7 windows"):
        apply(odd, ReductionConfig("random", (1,), (0.5,)))
    apply(odd, dynamicswin_config(0.7))  # the cheap form keeps dense attention: any grid
    with pytest.raises(ValueError, match=r"^swin_form: 'cheap' applies only to Swin backbones; allowed here: "
                                         r"'auto'$"):
        token_schedule(ReductionConfig("dtps", (3,), (0.7,), swin_form="cheap"))


def test_search_space_offers_swins_methods():
    from tpsexplore.search.space import SearchSpace, default_variants

    space = SearchSpace(hier_geometry("swin_t"), 0.65, default_variants(), max_stages=3)
    assert [v.key for v in space.variants] == ["dynamicvit", "similarity", "random"]
    assert space.excluded["dtps"].startswith("locations: [11] lie outside stage 2")  # the cheap form: not searched
    for params in space.default_params():
        cand = space.from_params(params)
        assert swin_form(cand.config) == "window" and cand.gmacs == hier_reduced_macs(cand.config, space.geometry).gmacs
    sim = space.from_params({"method": "similarity", "sim_placement": "pre", "similarity_metric": "dot",
                             "fill": 1.0, "keep_0": 0.7})
    assert sim.config.locations == (0,) and sim.feasible and sim.config.similarity_metric == "dot"


def test_smoke_search_on_swin(proxy_cache, tmp_path, one_torch_thread):
    """`tpsexplore search` on a tiny-width Swin (studies/smoke_swin.toml): every trial runs, Swin's geometry and
    count reach the results store."""
    from cli_run import smoke_search

    manifest, _, _ = smoke_search("smoke_swin", tmp_path, {"baseline", "dynamicvit", "random", "similarity"})
    assert manifest.backbone == "swin_t" and manifest.geometry.num_patches == 256 and manifest.geometry.depth == 5


def test_proxy_lr_of_swin_uses_its_middle_width():
    """Swin's embed_dim is its first of four widths (96 of 96 ... 768): the proxy's width rule takes their geometric
    mean (lr 2.5e-4 on Swin-T), not 96 (2e-3, which stayed at chance on the proxy) or 768 (3.1e-5, too slow)."""
    from tpsexplore.measure.train import ProxyConfig, resolve_proxy_config

    assert resolve_proxy_config("swin_t", ProxyConfig()).lr == pytest.approx(5e-4 * (192 / (96 * 768) ** 0.5) ** 2)
    assert resolve_proxy_config("swin_t", ProxyConfig()).lr == pytest.approx(2.5e-4)
    assert resolve_proxy_config("deit_t", ProxyConfig()).lr == pytest.approx(5e-4)
