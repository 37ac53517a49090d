"""Token reduction on PVT v2 (issue 13): the keep-the-grid form with the MLP's cheap path, and the smoke searches of
PVT v2 and CvT.

Real random-init timm ``pvt_v2_b1`` at 96 px (grids 24 / 12 / 6 / 3, no class token; global blocks 0-1 / 2-3 / 4-5 /
6-7): zero reduction is bit-identical, per-block token counts follow `reduce.hier_schedule` (numbers worked out by
hand), the reduced forward equals a dense reference written from timm's own modules with masks (pruned tokens
frozen, their hidden rows zero before the depthwise conv), the closed-form count equals the fvcore trace of the
patched model, a learned predictor trains, refusals are one line, and the search space admits each method only where
it can run on every hierarchical family.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tpsexplore.backbones import build_timm_model, create_backbone
from tpsexplore.measure.flops import traced_macs
from tpsexplore.measure.hier_flops import hier_analytic_macs, hier_geometry, hier_geometry_from_model, \
    hier_reduced_macs
from tpsexplore.reduce import ReductionConfig, apply, last_info, ratio_loss, remove
from tpsexplore.reduce.patch_hier import HierReductionMixin

IMG = 96
CONFIGS = [
    ReductionConfig("dtps", (1, 3, 5, 7), (0.5,)),  # a reduction in every stage
    ReductionConfig("dynamicvit", (4, 5), (0.7, 0.5)),
    ReductionConfig("random", (0, 4), (0.5,), treatment="squeeze"),
    ReductionConfig("random", (2, 6), (0.4,)),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("pvt_v2_b1", weights="random", img_size=IMG, num_classes=10).eval()


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def test_zero_reduction_is_bit_identical():
    model, x = _model(), _image()
    cls = type(model)
    with torch.no_grad():
        ref = model(x)
        for cfg in (ReductionConfig(), ReductionConfig("dtps", (2, 5), (1.0,)),
                    ReductionConfig("random", (0, 7), (1.0,))):
            apply(model, cfg)
            assert isinstance(model, HierReductionMixin) and model.tps_family == "pvt_v2"
            assert torch.equal(model(x), ref), cfg.label
            assert last_info(model).token_counts == [(576, 576)] * 2 + [(144, 144)] * 2 + [(36, 36)] * 2 + [(9, 9)] * 2
        remove(model)
        assert type(model) is cls and not any(hasattr(m, "tps_stage") for m in model.modules())
        assert torch.equal(model(x), ref)


def test_token_counts_follow_the_documented_rule():
    # dTPS keep 0.5 at blocks 1, 3, 5, 7 (the second block of every stage): a fresh count per stage, int(M_s * 0.5)
    # live queries of M_s = 576 / 144 / 36 / 9 grid cells, no class token; the grid keeps every slot.
    model = _model()
    apply(model, CONFIGS[0])
    with torch.no_grad():
        assert model(_image()).shape == (2, 10)
    expect = [(576, 576), (288, 288), (144, 144), (72, 72), (36, 36), (18, 18), (9, 9), (4, 4)]
    assert last_info(model).token_counts == expect == list(model.tps_schedule.blocks)
    assert model.forward_features(_image()).shape == (2, 512, 3, 3)  # every stage leaves its whole grid
    # DynamicViT's cumulative rule within stage 2: int(36 * 0.7) = 25, then int(36 * 0.35) = 12
    apply(model, CONFIGS[1])
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts[4:6] == [(25, 25), (12, 12)]
    # random pruning's ceil rule: ceil(576 * 0.3) = 173 live tokens in stage 0 from block 0 on
    apply(model, ReductionConfig("random", (0,), (0.3,)))
    with torch.no_grad():
        model(_image())
    assert last_info(model).token_counts[:3] == [(173, 173), (173, 173), (144, 144)]


def _masked_stage(stage: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A dense reference of one PVT v2 stage reduced at its first block, written from timm's modules: every token
    runs, pruned ones (``keep`` 0) take no update, and their hidden rows are zero before the depthwise conv."""
    if stage.downsample is not None:
        x = stage.downsample(x)
    b, h, w, c = x.shape
    t = x.reshape(b, -1, c)
    m = keep.unsqueeze(-1).to(t.dtype)
    for blk in stage.blocks:
        t = t + blk.attn(blk.norm1(t), (h, w)) * m
        mlp = blk.mlp
        hid = mlp.fc1(blk.norm2(t)) * m
        hid = mlp.dwconv(hid.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        t = t + mlp.fc2(mlp.act(hid)) * m
    return stage.norm(t).reshape(b, h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("block, stage_index", [(4, 2), (6, 3)])  # SR ratio 2 (K/V from a 3x3 grid), then 1
def test_cheap_path_equals_a_dense_masked_reference(block, stage_index):
    model, x = _model(), _image()
    cfg = ReductionConfig("random", (block,), (0.5,))
    apply(model, cfg)
    with torch.enable_grad():  # autograd on: every block's hidden grid is its own tensor
        out_grad = model(x)
    with torch.no_grad():
        out = model(x)  # without autograd the blocks share one hidden-grid buffer: the same numbers
        assert torch.equal(out, out_grad)
        ids = last_info(model).token_ids  # the live slots of the reducing stage (its only reduction)
        n = model.tps_stages[stage_index].num_spatial
        assert ids.shape == (2, -(-n // 2))
        keep = torch.zeros(2, n).scatter(1, ids, 1.0)
        remove(model)
        y = model.patch_embed(x)
        for i, stage in enumerate(model.stages):
            y = _masked_stage(stage, y, keep) if i == stage_index else stage(y)
        ref = model.forward_head(y)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()
    full = _model()(x)
    assert not torch.allclose(out, full, atol=1e-4)  # the reduction does change the output


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_analytic_equals_trace(index):
    cfg = CONFIGS[index]
    model = _model()
    geo = hier_geometry_from_model(model)
    assert hier_reduced_macs(ReductionConfig(), geo) == hier_analytic_macs(geo)
    apply(model, cfg)
    analytic = hier_reduced_macs(cfg, geo)
    traced = traced_macs(model)
    assert traced.total == analytic.total, (cfg.label, traced.by_operator, analytic.as_dict())
    assert analytic.total < hier_analytic_macs(geo).total
    # the depthwise MLP conv stays dense: 9 MACs per hidden channel and grid slot in every block
    dw = sum(st.num_spatial * st.mlp_hidden * 9 * st.depth for st in geo.stages)
    live = sum(2 * nm * st.dim * st.mlp_hidden for st, (_, nm) in
               zip([s for s in geo.stages for _ in range(s.depth)], model.tps_schedule.blocks))
    assert analytic.mlp == dw + live
    # the hidden-grid buffer shared across blocks and stages without autograd changes no number
    x = _image(1)
    ref = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert last_info(model).token_counts == list(model.tps_schedule.blocks)


def test_reduced_config_at_224_is_counted():
    geo = hier_geometry("pvt_v2_b1")  # meta build, 224: grids 56 / 28 / 14 / 7
    base = hier_analytic_macs(geo)
    assert hier_analytic_macs(geo, norms=False).gmacs == pytest.approx(2.1, abs=0.02)  # the PVT v2 paper's b1
    # benchmarks/hier_speed.py's config: DynamicViT keep 0.5 from the first block of every stage
    red = hier_reduced_macs(ReductionConfig("dynamicvit", (0, 2, 4, 6), (0.5,)), geo)
    assert red.total / base.total == pytest.approx(0.652, abs=0.001)
    # TPS's squeeze matches every pruned token against every kept one: quadratic in stage 0's 3136 tokens
    squeezed = hier_reduced_macs(ReductionConfig("dtps", (0, 2, 4, 6), (0.5,)), geo)
    assert squeezed.squeeze > 0.15 * base.total and squeezed.total - squeezed.squeeze == red.total


def test_training_with_a_predictor_runs_backward():
    model = _model()
    apply(model, ReductionConfig("dtps", (3, 5), (0.5,)))
    model.train()
    out = model(_image(4))
    info = last_info(model)
    assert len(info.decisions) == 2 and info.keep_targets == pytest.approx([0.5, 0.5])
    assert len(info.token_counts) == 8
    loss = out.logsumexp(-1).mean() + 2.0 * ratio_loss(model)
    loss.backward()
    predictors = [m.tps_stage.predictor for m in model.modules() if hasattr(m, "tps_stage")]
    assert len(predictors) == 2 and all(p.in_conv[1].weight.grad is not None for p in predictors)


def test_refusals_are_one_line():
    model = _model()
    with pytest.raises(ValueError, match=r"^locations: block 6 lies in a stage that keeps the token grid, where "
                                         r"'etps k0.7@6' cannot run .*etps runs in no stage of PVT v2$"):
        apply(model, ReductionConfig("etps", (6,), (0.7,)))
    with pytest.raises(ValueError, match=r"^method: 'tome' merges tokens without a grid slot, which PVT v2 cannot"):
        apply(model, ReductionConfig("tome", r=2))
    with pytest.raises(ValueError, match=r"^locations: \[8\] out of range; allowed 0..7"):
        apply(model, ReductionConfig("dtps", (8,), (0.7,)))
    assert not isinstance(model, HierReductionMixin)  # a refused apply leaves the model unpatched
    with torch.device("meta"):
        li = build_timm_model("pvt_v2_b2_li")
    with pytest.raises(ValueError, match=r"^model: token reduction does not support PVT v2's linear "
                                         r"spatial-reduction attention \(pvt_v2_\*_li\); allowed: pvt_v2_b0..b5$"):
        apply(li, ReductionConfig("dtps", (3,), (0.7,)))
    apply(model, ReductionConfig("dtps", (3,), (0.7,)))
    with pytest.raises(ValueError, match=r"^x: stage 0 has a 16x16 grid, the reduction was applied for 576 tokens"):
        model(torch.zeros(1, 3, 64, 64))


def test_search_space_admits_each_method_where_it_can_run():
    """Class-attention methods (eTPS, EViT, Top-K) only in PVT v1's last stage (blocks 6-7 of PVT-T), ToMe there
    only, the grid methods anywhere; on CvT and PVT v2 the former are left out."""
    import optuna

    from tpsexplore.search.space import SearchSpace, resolve_variants

    variants = resolve_variants("dtps,dynamicvit,random,etps,evit,topk,tome")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, allowed, cls_first in (("pvt_t", {"dtps", "dynamicvit", "random", "etps", "evit", "topk", "tome"}, 6),
                                     ("cvt_13", {"dtps", "dynamicvit", "random"}, None),
                                     ("pvt_v2_b1", {"dtps", "dynamicvit", "random"}, None)):
        space = SearchSpace(hier_geometry(name), 0.95, variants, max_stages=3)
        assert {v.key for v in space.variants} == allowed, (name, space.excluded)
        for key in ("dtps", "dynamicvit", "random"):
            assert space.first_min[key] == 0
        for key in {"etps", "evit", "topk", "tome"} - allowed:
            assert "no stage of" in space.excluded[key] or "without a grid slot" in space.excluded[key]
        if cls_first is not None:
            assert all(space.first_min[k] == cls_first for k in ("etps", "evit", "topk"))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for params in space.default_params():
            space.from_params(params)  # every default is a config the backbone runs
        for _ in range(60):
            trial = study.ask()
            cand = space.suggest(trial)
            study.tell(trial, 0.0)
            seen.add(cand.config.method)
            if cand.config.spec.policy in ("cls_attn", "merge"):
                assert all(b >= cls_first for b in cand.config.locations), cand.config.label
        assert seen <= allowed and {"dtps", "random"} <= seen


def _smoke(study_name: str, tmp_path: Path) -> tuple[object, object]:
    from cli_run import smoke_search

    manifest, done, text = smoke_search(study_name, tmp_path, {"baseline", "dtps", "random"}, {"dtps"})
    assert "method etps left out" in text and "method tome left out" in text
    return manifest, done


def test_smoke_search_on_pvt_v2(proxy_cache, tmp_path, one_torch_thread):
    """`tpsexplore search` on a tiny-width PVT v2 (studies/smoke_pvt_v2.toml): every trial runs with the grid
    methods, eTPS and ToMe are left out, the geometry reaches the manifest."""
    manifest, _ = _smoke("smoke_pvt_v2", tmp_path)
    assert manifest.backbone == "pvt_v2_b1" and manifest.geometry.num_patches == 256 and manifest.geometry.depth == 6


def test_smoke_search_on_cvt(proxy_cache, tmp_path, one_torch_thread):
    """The same on a tiny-width CvT-13 (studies/smoke_cvt.toml)."""
    manifest, _ = _smoke("smoke_cvt", tmp_path)
    assert manifest.backbone == "cvt_13" and manifest.geometry.num_patches == 256 and manifest.geometry.depth == 4
