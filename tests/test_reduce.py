"""The token-reduction core on real timm models (random init): counts, equations, identity, training."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tpsexplore import ReductionConfig, apply, create_backbone, last_info, remove
from tpsexplore.reduce import ops, ratio_loss, token_schedule, track_sources
from tpsexplore.reduce.methods import METHODS
from tpsexplore.reduce.patch import _attention
from tpsexplore.reduce.schedule import distinct_counts

ALL = list(METHODS)
TINY = dict(img_size=64, patch_size=16, num_classes=10)  # deit_t width/depth on a 4x4 grid


def config_for(method: str, keep: float = 0.7, **kw) -> ReductionConfig:
    if method == "tome":
        return ReductionConfig("tome", r=13 if keep < 1 else 0)
    if method == "similarity":
        kw.setdefault("similarity_placement", "layerwise")
    return ReductionConfig(method, (3, 6, 9), (keep,), **kw)


def counts(model) -> list[int]:
    """Distinct token counts through the blocks after the last forward."""
    return distinct_counts(last_info(model).token_counts)


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return create_backbone("deit_s", weights="random").eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


# ----------------------------------------------------------------------------- counts (spec tables)
@pytest.mark.parametrize("method,expected", [
    ("dynamicvit", [197, 138, 97, 68]),
    ("dtps", [197, 138, 97, 68]),
    ("evit", [197, 140, 100, 72]),
    ("topk", [197, 139, 98, 69]),
    ("etps", [197, 139, 98, 69]),
    ("similarity", [197, 139, 98, 69]),
    ("rollout", [197, 139, 98, 69]),
    ("random", [197, 139, 98, 69]),
])
def test_deit_s_token_counts_match_spec(deit_s, image, method, expected):
    apply(deit_s, config_for(method))
    with torch.inference_mode():
        deit_s(image)
    assert counts(deit_s) == expected
    assert counts(deit_s) == token_schedule(config_for(method)).counts()


def test_deit_s_counts_intra_block_attention_runs_on_full_set(deit_s, image):
    apply(deit_s, config_for("evit"))
    with torch.inference_mode():
        deit_s(image)
    assert last_info(deit_s).token_counts[3] == (197, 140)  # block 3: attention 197, MLP 140
    apply(deit_s, config_for("dtps"))
    with torch.inference_mode():
        deit_s(image)
    assert last_info(deit_s).token_counts[3] == (138, 138)  # inter-block: block 3 already reduced


def test_tome_r13_ends_with_41_tokens(deit_s, image):
    apply(deit_s, ReductionConfig("tome", r=13))
    with torch.inference_mode():
        deit_s(image)
    info = last_info(deit_s)
    assert [a for a, _ in info.token_counts] == list(range(197, 41, -13))
    assert info.token_counts[-1][1] == 41


def test_keep_05_counts(deit_s, image):
    apply(deit_s, ReductionConfig("evit", (3, 6, 9), (0.5,)))
    with torch.inference_mode():
        deit_s(image)
    assert counts(deit_s) == [197, 100, 52, 28]
    apply(deit_s, ReductionConfig("dynamicvit", (3, 6, 9), (0.5,)))
    with torch.inference_mode():
        deit_s(image)
    assert counts(deit_s) == [197, 99, 50, 25]


def test_similarity_pre_transformer_prunes_before_block0(deit_s, image):
    apply(deit_s, ReductionConfig("similarity", (0,), (0.7,)))
    with torch.inference_mode():
        deit_s(image)
    assert last_info(deit_s).token_counts[0] == (1 + 138, 1 + 138)


# ----------------------------------------------------------------------------- identity
@pytest.mark.parametrize("name,kw", [
    ("deit_t", {}),
    ("deit_s", {}),
    ("deit3_small_patch16_224", dict(img_size=96)),  # LayerScale
    ("vit_b16", dict(img_size=64)),  # ViT-B/16-shaped
    ("deit_tiny_distilled_patch16_224", dict(img_size=96)),  # distillation token
    ("vit_tiny_patch16_224", dict(img_size=64, num_classes=10)),  # a tiny ViT
])
def test_reducing_nothing_gives_unpatched_outputs(name, kw):
    torch.manual_seed(0)
    model = create_backbone(name, weights="random", **kw).eval()
    x = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    with torch.inference_mode():
        ref = model(x)
        apply(model, ReductionConfig())
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        for method in ALL:
            apply(model, config_for(method, keep=1.0))
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0, msg=f"{method} at keep 1.0")
        remove(model)
        assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")
        assert not any(hasattr(b, "tps_stage") for b in model.blocks)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_reimplementation_matches_timm(fused):
    torch.manual_seed(0)
    model = create_backbone("deit3_small_patch16_224", weights="random", img_size=64).eval()
    attn = model.blocks[2].attn
    attn.fused_attn = fused
    x = torch.randn(2, 17, 384)
    with torch.inference_mode():
        ref = attn(x)
        out, cls_scores, metric = _attention(attn, x, None, True, True, None, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cls_scores.shape == (2, 16) and torch.all(cls_scores >= 0) and float(cls_scores.sum(-1).max()) <= 1.0
    assert metric.shape == (2, 17, 64)


def test_distilled_model_keeps_both_prefix_tokens():
    torch.manual_seed(0)
    model = create_backbone("deit_tiny_distilled_patch16_224", weights="random", img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    for method in ALL:
        apply(model, config_for(method) if method != "tome" else ReductionConfig("tome", r=4))
        with torch.inference_mode():
            out = model(x)
        ids = last_info(model).token_ids
        assert out.shape == (2, 1000)
        assert torch.equal(ids[:, :2], torch.tensor([[0, 1], [0, 1]])), method  # cls and dist stay in front


# ----------------------------------------------------------------------------- squeeze equations
def test_squeeze_host_choice_and_e_weight():
    reserved = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    pruned = torch.tensor([[[2.0, 0.2], [0.1, 3.0], [1.0, 0.1]]])
    out, weight = ops.squeeze(reserved, pruned)
    assert (weight > 0).int().argmax(1).tolist() == [[0, 1, 0]]  # nearest by cosine, not by distance
    s = ops.cosine_similarity(pruned, reserved)
    w0, w2 = s[0, 0, 0].exp(), s[0, 2, 0].exp()
    expect0 = (math.e * reserved[0, 0] + w0 * pruned[0, 0] + w2 * pruned[0, 2]) / (math.e + w0 + w2)
    torch.testing.assert_close(out[0, 0], expect0)  # many pruned tokens into one host
    w1 = s[0, 1, 1].exp()
    torch.testing.assert_close(out[0, 1], (math.e * reserved[0, 1] + w1 * pruned[0, 1]) / (math.e + w1))
    torch.testing.assert_close(out[0, 2], reserved[0, 2])  # no match: untouched


def test_squeeze_host_keeps_largest_weight_and_ties_go_to_every_host():
    reserved = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    pruned = torch.tensor([[[3.0, 0.0]]])
    out, weight = ops.squeeze(reserved, pruned)
    assert (weight > 0).tolist() == [[[True], [True]]]
    expect = (math.e * reserved[0, 0] + math.e * pruned[0, 0]) / (2 * math.e)
    torch.testing.assert_close(out[0], expect.expand(2, 2))


def test_squeeze_masked_matches_split_form():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4)
    keep = torch.tensor([[1.0, 0, 1, 0, 1, 0]])
    prune = torch.tensor([[0.0, 1, 0, 1, 0, 0]])  # token 5 was pruned earlier: untouched, never a host
    out = ops.squeeze_masked(x, keep, prune)
    split, _ = ops.squeeze(x[:, [0, 2, 4]], x[:, [1, 3]])
    torch.testing.assert_close(out[:, [0, 2, 4]], split)
    torch.testing.assert_close(out[:, [1, 3, 5]], x[:, [1, 3, 5]])


def test_evit_fused_token_is_unnormalised_weighted_sum():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    weights = torch.tensor([[0.1, 0.2]])
    torch.testing.assert_close(ops.fuse_tokens(tokens, weights), torch.tensor([[[0.7, 1.0]]]))


def test_tome_merge_is_size_weighted_and_protects_cls():
    x = torch.tensor([[[9.0], [1.0], [1.1], [5.0], [5.2]]])  # cls, then two near pairs
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [1.0, 0.9]]])
    plan = ops.bipartite_soft_matching(metric, 1, num_protected=1)
    merged, size = ops.merge_wavg(plan, x, torch.ones(1, 5, 1))
    assert merged.shape == (1, 4, 1) and merged[0, 0, 0] == 9.0  # cls first, never a source
    assert sorted(size.flatten().tolist()) == [1.0, 1.0, 1.0, 2.0]


def test_source_maps_account_for_every_patch(deit_s, image):
    for method in ("etps", "dtps", "evit", "tome"):
        apply(deit_s, config_for(method))
        with torch.inference_mode(), track_sources(deit_s):
            deit_s(image)
        info = last_info(deit_s)
        covered = info.sources[:, 1:, 1:].amax(dim=1).sum(-1)
        assert covered.tolist() == [196.0, 196.0], method  # squeeze/fuse/merge lose no patch
        assert set(info.stage_sources) == ({3, 6, 9} if method != "tome" else set(range(12)))
    apply(deit_s, config_for("topk"))
    with torch.inference_mode(), track_sources(deit_s):
        deit_s(image)
    assert last_info(deit_s).sources[:, 1:, 1:].sum(-1).eq(1).all()  # plain pruning: one patch per token


# ----------------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("method", ALL)
def test_one_image_alone_equals_inside_a_batch(method):
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY).eval()
    torch.manual_seed(2)
    x = torch.randn(4, 3, 64, 64)
    cfg = ReductionConfig("tome", r=3) if method == "tome" else ReductionConfig(
        method, (1, 5), (0.6,), **({"similarity_placement": "layerwise", "diversity": 0.3}
                                   if method == "similarity" else {}))
    apply(model, cfg)
    with torch.inference_mode():
        batch = model(x)
        alone = model(x[2:3])
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_training_path_masks_and_sends_gradients_to_predictors(method):
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY)
    apply(model, ReductionConfig(method, (1, 3), (0.5,))).train()
    out = model(torch.randn(4, 3, 64, 64))
    info = last_info(model)
    assert info.token_counts[-1] == (17, 17)  # training keeps all tokens, masked
    assert info.keep_mask.shape == (4, 17) and len(info.decisions) == 2
    loss = out.logsumexp(-1).mean() + 2.0 * ratio_loss(model)
    loss.backward()
    for i in (1, 3):
        grad = model.blocks[i].tps_stage.predictor.out_conv[-2].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    model.eval()
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    assert last_info(model).token_counts[-1] == (1 + 4, 1 + 4)  # eval physically removes: int(16*.25)


def test_ratio_loss_matches_definition():
    d1 = torch.tensor([[1.0, 1, 0, 0], [1.0, 0, 0, 0]])
    d2 = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    got = ops.ratio_loss_terms([d1, d2], [0.5, 0.25])
    expect = (((0.5 - 0.5) ** 2 + (0.25 - 0.5) ** 2) / 2 + ((0.25 - 0.25) ** 2 + (0 - 0.25) ** 2) / 2) / 2
    assert got.item() == pytest.approx(expect)


def test_etps_trains_with_physical_removal():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY)
    apply(model, ReductionConfig("etps", (1, 3), (0.5,))).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert last_info(model).token_counts[-1] == (5, 5)
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ----------------------------------------------------------------------------- inference modes
def test_autocast_bf16_and_inference_mode():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    for method in ALL:
        apply(model, config_for(method).with_(locations=(1, 3, 5)) if method != "tome"
              else ReductionConfig("tome", r=2))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), method


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY).eval()
    apply(model, ReductionConfig("etps", (1, 3), (0.5,)))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=False)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,field", [
    (dict(method="nope"), "method"),
    (dict(method="evit", locations=(6, 3), keep_ratios=(0.7,)), "locations"),
    (dict(method="evit", locations=(3,), keep_ratios=(1.3,)), "keep_ratios"),
    (dict(method="evit", locations=(3,), keep_ratios=(0.0,)), "keep_ratios"),
    (dict(method="evit", locations=(3, 6), keep_ratios=(0.7, 0.7, 0.7)), "keep_ratios"),
    (dict(method="evit", locations=(), keep_ratios=(0.7,)), "locations"),
    (dict(method="dtps", locations=(3,), keep_ratios=(0.7,), treatment="fuse"), "treatment"),
    (dict(method="tome", keep_ratios=(0.7,)), "keep_ratios"),
    (dict(method="tome", r=-1), "r"),
    (dict(method="etps", locations=(3,), keep_ratios=(0.7,), temperature=0), "temperature"),
    (dict(method="similarity", locations=(3,), keep_ratios=(0.7,)), "locations"),
    (dict(method="evit", locations=(3,), keep_ratios=(0.7,), r=4), "r"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ReductionConfig(**kwargs)


def test_location_beyond_depth_is_rejected_at_apply(deit_s):
    with pytest.raises(ValueError, match=r"^locations: \[3, 12\] out of range; allowed 0..11"):
        apply(deit_s, ReductionConfig("evit", (3, 12), (0.7,)))


def test_config_json_round_trip(tmp_path):
    cfg = ReductionConfig("similarity", (2, 5), (0.6, 0.8), treatment="squeeze",
                          similarity_placement="layerwise", diversity=0.2, seed=3)
    assert ReductionConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"reduction": cfg.to_dict(), "backbone": {"timm_name": "deit_tiny_patch16_224"}}))
    assert ReductionConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match="^bogus: unknown ReductionConfig field"):
        ReductionConfig.from_dict({"method": "evit", "bogus": 1})
    tome = ReductionConfig("tome", r=8, r_inflection=-1.0)
    assert ReductionConfig.from_json(tome.to_json()) == tome
    assert tome.merge_schedule(12)[0] == 16 and tome.merge_schedule(12)[-1] == 0


def test_apply_accepts_exported_json_and_warns_on_other_backbone(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", **TINY).eval()
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"reduction": ReductionConfig("etps", (1,), (0.5,)).to_dict(),
                                "backbone": {"timm_name": "deit_small_patch16_224"}}))
    with pytest.warns(UserWarning, match="backbone: the config was exported for deit_small_patch16_224"):
        apply(model, str(path))
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
    assert last_info(model).token_counts[1] == (17, 9)
