"""MAC counting: closed-form anchors from the spec, fvcore traces of real random-init timm ViTs, and the
agreement of the two for every reduction method."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpsexplore.backbones import create_backbone
from tpsexplore.measure.flops import (
    MacReport,
    UncountedOpError,
    analytic_macs,
    analytic_params,
    cross_check,
    geometry,
    geometry_from_model,
    predictor_params,
    traced_macs,
)
from tpsexplore.reduce.config import ReductionConfig

LOC = (3, 6, 9)


@pytest.fixture(scope="module")
def geo_s():
    return geometry("deit_s")


@pytest.fixture(scope="module")
def geo_t():
    return geometry("deit_t")


@pytest.fixture(scope="module")
def deit_t():
    torch.manual_seed(0)
    return create_backbone("deit_t", weights="random")


# ----------------------------------------------------------------------------- geometry
def test_geometry_reads_dims_without_weights(geo_s):
    assert (geo_s.embed_dim, geo_s.depth, geo_s.num_heads, geo_s.head_dim) == (384, 12, 6, 64)
    assert (geo_s.mlp_hidden, geo_s.num_patches, geo_s.num_prefix) == (1536, 196, 1)
    assert geo_s.patch_size == (16, 16) and geo_s.in_chans == 3 and geo_s.num_classes == 1000
    assert geo_s.qkv_bias and geo_s.final_norm == "tokens" and geo_s.mlp_ratio == 4.0
    assert geo_s.num_params == 22_050_664
    assert geo_s.name == "deit_small_patch16_224"


def test_geometry_from_real_model_matches_meta_build(deit_t, geo_t):
    assert geometry_from_model(deit_t) == geo_t


def test_geometry_of_a_patched_model_leaves_out_predictors(deit_t, geo_t):
    from tpsexplore.reduce import apply, remove

    apply(deit_t, ReductionConfig("dtps", LOC, (0.7,)))
    try:
        assert geometry_from_model(deit_t) == geo_t
        assert sum(p.numel() for p in deit_t.parameters()) == geo_t.num_params + 3 * predictor_params(192)
    finally:
        remove(deit_t)


def test_geometry_overrides_change_the_count():
    g = geometry("deit_t", img_size=160, num_classes=10)
    assert g.num_patches == 100 and g.num_classes == 10 and g.img_size == (160, 160)
    assert analytic_macs(ReductionConfig(), g).total < analytic_macs(ReductionConfig(), geometry("deit_t")).total


def test_geometry_rejects_non_vit():
    with pytest.raises(ValueError, match=r"^model: "):
        geometry_from_model(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"^backbone: "):
        geometry("resnet_does_not_exist")


# ----------------------------------------------------------------------------- analytic anchors (spec 5)
@pytest.mark.parametrize("name, gmacs", [("deit_t", 1.26), ("deit_s", 4.61), ("deit_b", 17.58)])
def test_analytic_baseline(name, gmacs):
    report = analytic_macs(ReductionConfig(), geometry(name))
    assert report.gmacs == pytest.approx(gmacs, abs=0.01)
    assert report.extras == 0 and report.tokens == (197,)


def test_analytic_baseline_parts_deit_t(geo_t):
    r = analytic_macs(ReductionConfig(), geo_t)
    assert r.blocks == 12 * 102_427_392  # spec: 102.4M per block
    assert r.attention == 12 * 2 * 197 * 197 * 192  # QK^T and AV: 14.9M per block
    assert r.patch_embed == 196 * 192 * 768 and r.head == 192 * 1000 and r.final_norm == 5 * 197 * 192
    assert r.total == r.backbone == sum(v for k, v in r.as_dict().items()
                                        if k in MacReport.__dataclass_fields__ and k != "tokens")


@pytest.mark.parametrize("config, gmacs", [
    (ReductionConfig("evit", LOC, (0.7,)), 3.04),
    (ReductionConfig("evit", LOC, (0.7,), treatment="drop"), 3.00),
    (ReductionConfig("dynamicvit", LOC, (0.7,)), 2.99),
    (ReductionConfig("dtps", LOC, (0.7,)), 3.00),
    (ReductionConfig("etps", LOC, (0.7,)), 3.01),
    (ReductionConfig("tome", r=13), 2.71),
    (ReductionConfig("tome", r=8), 3.42),
    (ReductionConfig("tome", r=16), 2.30),
], ids=lambda v: v.label if isinstance(v, ReductionConfig) else str(v))
def test_analytic_method_anchors_deit_s(geo_s, config, gmacs):
    assert analytic_macs(config, geo_s).gmacs == pytest.approx(gmacs, abs=0.01)


def test_analytic_parts_deit_s(geo_s):
    dvit = analytic_macs(ReductionConfig("dynamicvit", LOC, (0.7,)), geo_s)
    assert dvit.tokens == (197, 138, 97, 68)
    assert dvit.backbone / 1e9 == pytest.approx(2.884, abs=0.001)  # spec 1.6: backbone only
    assert dvit.predictor / 1e9 == pytest.approx(0.104, abs=0.001)
    assert dvit.squeeze == 0
    etps = analytic_macs(ReductionConfig("etps", LOC, (0.7,)), geo_s)
    topk = analytic_macs(ReductionConfig("topk", LOC, (0.7,)), geo_s)
    assert etps.tokens == topk.tokens == (197, 139, 98, 69)
    assert (etps.total - topk.total) / 1e9 == pytest.approx(0.011, abs=0.001)
    assert etps.total - topk.total == etps.squeeze
    evit = analytic_macs(ReductionConfig("evit", LOC, (0.7,)), geo_s)
    assert evit.tokens == (197, 140, 100, 72) and evit.fuse > 0


def test_analytic_deit_t_anchors(geo_t):
    assert analytic_macs(ReductionConfig("dtps", LOC, (0.7,)), geo_t).gmacs == pytest.approx(0.81, abs=0.01)
    assert analytic_macs(ReductionConfig("tome", r=13), geo_t).gmacs == pytest.approx(0.734, abs=0.005)


def test_analytic_rollout_pays_a_scoring_pass(geo_s):
    base = analytic_macs(ReductionConfig(), geo_s)
    rnd = analytic_macs(ReductionConfig("random", (0,), (0.7,)), geo_s)
    roll = analytic_macs(ReductionConfig("rollout", (0,), (0.7,)), geo_s)
    assert roll.tokens == rnd.tokens == (139,)
    assert roll.total - rnd.total == roll.scoring_pass + roll.rollout
    assert base.blocks - roll.scoring_pass < base.blocks / 12  # all but the last block's AV/proj/MLP
    assert roll.total > base.total


def test_analytic_params(geo_s):
    assert analytic_params(ReductionConfig(), geo_s).total == geo_s.num_params
    p = analytic_params(ReductionConfig("dtps", LOC, (0.7,)), geo_s)
    assert p.predictor == 3 * predictor_params(384) and p.total == geo_s.num_params + p.predictor
    assert analytic_params(ReductionConfig("dynamicvit", LOC, (1.0, 0.7, 0.7)), geo_s).predictor == \
        2 * predictor_params(384)  # a stage with keep ratio 1 reduces nothing and has no predictor
    assert analytic_params(ReductionConfig("etps", LOC, (0.7,)), geo_s).predictor == 0


def test_analytic_is_cheap(geo_s):
    # guards against building a model (or tracing) per call: a generous bound, not a speed benchmark
    cfg = ReductionConfig("tome", r=13)
    t0 = time.perf_counter()
    for _ in range(200):
        analytic_macs(cfg, geo_s)
    assert (time.perf_counter() - t0) / 200 < 1e-3


# ----------------------------------------------------------------------------- traced count
@pytest.mark.parametrize("name, gmacs", [("deit_t", 1.26), ("deit_s", 4.61), ("deit_b", 17.58)])
def test_traced_baseline(request, name, gmacs):
    model = request.getfixturevalue("deit_t") if name == "deit_t" else create_backbone(name, weights="random")
    traced = traced_macs(model)
    g = geometry_from_model(model)
    assert traced.gmacs == pytest.approx(gmacs, abs=0.01)
    assert traced.total == pytest.approx(analytic_macs(ReductionConfig(), g).total, rel=1e-3)
    assert traced.by_operator["scaled_dot_product_attention"] == 12 * 2 * 197 * 197 * g.embed_dim
    assert traced.params == g.num_params
    assert traced.input_size == (1, 3, 224, 224)


def test_traced_restores_mode_and_rejects_batches(deit_t):
    deit_t.train()
    try:
        traced_macs(deit_t)
        assert deit_t.training
    finally:
        deit_t.eval()
    with pytest.raises(ValueError, match=r"^input_size: "):
        traced_macs(deit_t, (2, 3, 224, 224))


def test_traced_with_overrides_matches_analytic():
    model = create_backbone("deit_t", weights="random", img_size=160, num_classes=10)
    traced = traced_macs(model)
    assert traced.input_size == (1, 3, 160, 160)
    assert traced.total == pytest.approx(analytic_macs(ReductionConfig(), geometry("deit_t", 160, None, 10)).total,
                                         rel=1e-3)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (1, 16, 8)


class _Uncounted(_Conv):
    def forward(self, x):
        t = self.tokens(x)
        return torch.addbmm(t[0], t, t.transpose(1, 2) @ t)  # addbmm has no rule: must not count as 0


class _Free(_Conv):
    def forward(self, x):
        t = self.tokens(x)
        s = F.gelu(t).softmax(-1)
        idx = s.mean(-1).topk(5, dim=-1).indices
        return s.gather(1, idx[..., None].expand(-1, -1, 8)).argsort(-1), t * 2.0


class _Extras(_Conv):
    def forward(self, x):
        t = self.tokens(x)  # (1, 16, 8)
        q = t.view(1, 16, 2, 4).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, q, q)  # 2 * 2 * 16 * 16 * 4
        weighted = (t * t.softmax(1)).sum(1)  # weighted sum: 16 * 8
        n = t.norm(dim=-1)  # 16 * 8
        d = torch.cdist(t, t[:, :3])  # 16 * 3 * 8
        return att, weighted, n, d


CONV_MACS = 16 * 8 * 3 * 4 * 4


def test_unsupported_op_fails_loudly():
    with pytest.raises(UncountedOpError, match=r"aten::addbmm"):
        traced_macs(_Uncounted(), (1, 3, 16, 16))


def test_mac_free_ops_count_nothing():
    assert traced_macs(_Free(), (1, 3, 16, 16)).total == CONV_MACS


def test_extra_rules_count_attention_norms_and_weighted_sums():
    traced = traced_macs(_Extras(), (1, 3, 16, 16))
    ops = traced.by_operator
    assert ops["scaled_dot_product_attention"] == 2 * 2 * 16 * 16 * 4
    assert ops["mul"] == 16 * 8
    assert ops["linalg_vector_norm"] == 16 * 8
    assert ops["cdist"] == 16 * 3 * 8
    assert traced.total == CONV_MACS + sum(v for k, v in ops.items() if k != "conv")


def test_cross_check_with_flop_counter(deit_t):
    cc = cross_check(deit_t)
    assert cc.fvcore_macs == pytest.approx(1.2584e9, rel=1e-3)
    assert 1.0 < cc.ratio < 1.01  # FlopCounterMode skips LayerNorm (0.4% of DeiT-T)


# ----------------------------------------------------------------------------- analytic == traced per method
METHOD_CONFIGS = [
    ReductionConfig("dtps", LOC, (0.7,)),
    ReductionConfig("etps", LOC, (0.7,)),
    ReductionConfig("dynamicvit", LOC, (0.7,)),
    ReductionConfig("evit", LOC, (0.7,)),
    ReductionConfig("topk", LOC, (0.7,)),
    ReductionConfig("topk", LOC, (0.7,), treatment="squeeze"),
    ReductionConfig("tome", r=13),
    ReductionConfig("tome", r=8, r_inflection=-1.0),
    ReductionConfig("similarity", (0,), (0.5,)),
    ReductionConfig("similarity", LOC, (0.7,), similarity_placement="layerwise"),
    ReductionConfig("similarity", LOC, (0.7,), similarity_placement="layerwise", diversity=0.5),
    ReductionConfig("rollout", (0,), (0.7,)),
    ReductionConfig("random", LOC, (0.5,), treatment="squeeze"),
]


def _label(c):
    return c.label + (f" {c.similarity_placement}" if c.method == "similarity" else "") + \
        (f" div{c.diversity:g}" if c.diversity else "")


@pytest.fixture(scope="module")
def traced_t(deit_t):
    """Traced MACs of the DeiT-T model per config (apply, trace, remove)."""
    from tpsexplore.reduce import apply, remove

    cache: dict[ReductionConfig, object] = {}

    def run(config: ReductionConfig):
        if config not in cache:
            apply(deit_t, config)
            try:
                cache[config] = traced_macs(deit_t)
            finally:
                remove(deit_t)
        return cache[config]

    return run


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=_label)
def test_analytic_matches_trace(traced_t, geo_t, config):
    traced = traced_t(config)
    analytic = analytic_macs(config, geo_t)
    assert traced.total == pytest.approx(analytic.total, rel=0.01)
    assert traced.params == analytic_params(config, geo_t).total
    assert traced.total < 2 * analytic_macs(ReductionConfig(), geo_t).total


def test_trace_sees_the_method_extras(traced_t, geo_t):
    # differences between two traces isolate one extra each; they must match the closed form
    cases = [  # (with extra, without, analytic field)
        (ReductionConfig("etps", LOC, (0.7,)), ReductionConfig("topk", LOC, (0.7,)), "squeeze"),
        (ReductionConfig("dtps", LOC, (0.7,)), ReductionConfig("dynamicvit", LOC, (0.7,)), "squeeze"),
        # random with ratios that give DynamicViT's 137/96/67 kept tokens: the difference is the predictors
        (ReductionConfig("dynamicvit", LOC, (0.7,)), ReductionConfig("random", LOC, (137 / 196, 96 / 137, 67 / 96)),
         "predictor"),
        (ReductionConfig("rollout", (0,), (0.7,)), ReductionConfig("random", (0,), (0.7,)), "scoring_pass"),
    ]
    for with_extra, without, part in cases:
        a = analytic_macs(with_extra, geo_t)
        assert a.tokens == analytic_macs(without, geo_t).tokens
        expected = getattr(a, part) + (a.rollout if part == "scoring_pass" else 0)
        assert traced_t(with_extra).total - traced_t(without).total == pytest.approx(expected, rel=0.01), part
