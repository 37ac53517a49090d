"""Issue 12, parts 1-5: fidelity to the authors' code and the papers' ablations as config options.

Each fix is pinned against a small independent reference written here (loops or plain tensor algebra, never
the code under test): the squeeze's host weight e at every temperature, the official form of dTPS's training
squeeze (predictor gradients), ToMe with register tokens, ToMe without proportional attention; then the ablation
options (TPS Tables 4-6, the similarity-pruning preprint's metric): validation, JSON, labels, the search space,
the study files, and analytic == traced GMACs with Table 5's published values.
"""
from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import timm
import torch
import torch.nn.functional as F

from tpsexplore import ReductionConfig, apply, create_backbone, last_info
from tpsexplore.measure.flops import analytic_macs, geometry, geometry_from_model, traced_macs
from tpsexplore.reduce import ops, token_schedule, track_sources
from tpsexplore.search.space import SearchSpace, SpaceSettings, resolve_variants
from tpsexplore.search.spec import build_settings, load_study_file

ROOT = Path(__file__).resolve().parents[1]
LOC = (3, 6, 9)
ABLATION_STUDIES = ("tps_table4_feature", "tps_table5_similarity", "tps_table6_random", "preprint_metric")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(depth: int = 4, **kw):
    """A DeiT-T-wide ViT on a 4x4 patch grid (17 tokens), random weights."""
    torch.manual_seed(0)
    return create_backbone("deit_t", weights="random", img_size=64, num_classes=10, depth=depth, **kw)


# ----------------------------------------------------------------------------- 1. host weight e
def reference_squeeze(reserved: torch.Tensor, pruned: torch.Tensor, tau: float) -> torch.Tensor:
    """Spec 3.1 with loops, one image: host weight e, pruned weights exp(cos / tau), ties to every host."""
    out = reserved.clone()
    cos = [[float(torch.dot(p, r) / ((p.norm() + 1e-6) * (r.norm() + 1e-6))) / tau for r in reserved]
           for p in pruned]
    for j in range(reserved.shape[0]):
        num, den = math.e * reserved[j], math.e
        for i, row in enumerate(cos):
            if row[j] == max(row):
                num = num + math.exp(row[j]) * pruned[i]
                den += math.exp(row[j])
        out[j] = num / den
    return out


@pytest.mark.parametrize("tau", [0.25, 0.5, 2.0, 4.0])
def test_squeeze_host_weight_is_e_at_every_temperature(tau):
    torch.manual_seed(3)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    kept, rest = [0, 2, 3, 7], [1, 4, 5, 6, 8]
    out, _ = ops.squeeze(x[:, kept], x[:, rest], tau)
    for b in range(2):
        torch.testing.assert_close(out[b], reference_squeeze(x[b, kept], x[b, rest], tau))
    # the training form: a token pruned earlier (8) is neither a host nor squeezed
    keep = torch.zeros(2, 9, dtype=torch.float64)
    keep[:, kept] = 1.0
    prune = 1.0 - keep
    prune[:, 8] = 0.0
    masked = ops.squeeze_masked(x, keep, prune, tau)
    for b in range(2):
        torch.testing.assert_close(masked[b, kept], reference_squeeze(x[b, kept], x[b, [1, 4, 5, 6]], tau))
        torch.testing.assert_close(masked[b, rest], x[b, rest])


# ----------------------------------------------------------------------------- 2. dTPS training gradient
def reference_squeeze_train(x, keep, prune, official: bool):
    """Spec 3.2 on the fixed-length tensor; weights exp(M*S)*M (official) or M*exp(S) (the earlier form)."""
    n = x.shape[1]
    unit = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    s = torch.einsum("bic,bjc->bij", unit, unit)
    blocked = torch.eye(n, dtype=torch.bool)[None] | (keep[:, None, :] < 0.5)
    s = torch.where(blocked, torch.full_like(s, -100.0), s)
    m = (s == s.max(dim=-1, keepdim=True).values).to(x.dtype) * prune[:, :, None]  # rows: pruned, cols: hosts
    w = torch.exp(m * s) * m if official else m * torch.exp(s)
    num = math.e * x + torch.einsum("bij,bic->bjc", w, x)
    return num / (math.e + w.sum(dim=1)[..., None])


def reference_masked_block(blk, t, policy):
    """A timm block with DynamicViT's masked softmax (spec 1.2), written out."""
    b, n, c = t.shape
    attn = blk.attn
    h = blk.norm1(t)
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1) * attn.scale).float()
    logits = logits - logits.max(dim=-1, keepdim=True).values
    gate = policy[:, None, None, :].float()
    gate = gate + (1.0 - gate) * torch.eye(n)
    e = logits.exp() * gate
    a = ((e + 1e-6 / n) / (e.sum(dim=-1, keepdim=True) + 1e-6)).to(v.dtype)
    t = t + blk.ls1(attn.proj((a @ v).transpose(1, 2).reshape(b, n, c)))
    return t + blk.ls2(blk.mlp(blk.norm2(t)))


def reference_dtps_step(model, x, locs, official):
    """One dTPS training forward (spec 3.2) from the model's own modules, written independently of the patch."""
    t = model._pos_embed(model.patch_embed(x))
    prev = torch.ones(t.shape[0], t.shape[1] - 1, dtype=t.dtype)
    policy = None
    for i, blk in enumerate(model.blocks):
        if i in locs:
            spatial = t[:, 1:]
            hard = F.gumbel_softmax(blk.tps_stage.predictor(spatial, prev), tau=1.0, hard=True)[..., 0]
            keep = hard * prev
            spatial = reference_squeeze_train(spatial, keep, (1.0 - keep) * prev, official)
            t = torch.cat([t[:, :1], spatial], dim=1)
            prev = keep
            policy = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        t = blk(t) if policy is None else reference_masked_block(blk, t, policy)
    return model.forward_head(model.norm(t))


def _predictor_grads(model, locs):
    return [p.grad.clone() for i in locs for p in model.blocks[i].tps_stage.predictor.parameters()]


def test_dtps_training_gradients_follow_the_official_form():
    locs = (1, 3)
    model = tiny(depth=4).double()
    apply(model, ReductionConfig("dtps", locs, (0.6,))).train()
    torch.manual_seed(7)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([1, 5, 2, 7])

    def grads(forward):
        model.zero_grad()
        torch.manual_seed(11)  # the same Gumbel noise in every forward
        F.cross_entropy(forward(), labels).backward()
        return _predictor_grads(model, locs)

    ours = grads(lambda: model(x))
    official = grads(lambda: reference_dtps_step(model, x, locs, official=True))
    earlier = grads(lambda: reference_dtps_step(model, x, locs, official=False))

    def max_rel(a, b):
        return max(float((u - v).abs().max() / v.abs().max().clamp_min(1e-30)) for u, v in zip(a, b))

    assert max_rel(ours, official) < 1e-5
    assert max_rel(earlier, official) > 1e-3  # the test can tell the two forms apart


# ----------------------------------------------------------------------------- 3. ToMe with register tokens
@pytest.fixture(scope="module")
def dinov2_reg():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).eval()


def test_tome_keeps_every_register_token_in_place(dinov2_reg):
    model = dinov2_reg
    p, m = model.num_prefix_tokens, model.patch_embed.num_patches
    assert (p, m) == (5, 256)
    cfg = ReductionConfig("tome", r=100)  # more than half the tokens from block 1 on: the cap bites
    apply(model, cfg)
    torch.manual_seed(1)
    with torch.inference_mode(), track_sources(model):
        model(torch.randn(2, 3, 224, 224))
    info = last_info(model)
    assert info.token_counts == list(token_schedule(cfg, m, p, 12).blocks)
    assert [a for a, _ in info.token_counts[:4]] == [261, 161, 83, 44]  # r capped at half the patch tokens
    ids = info.token_ids
    assert ids[:, :p].tolist() == [list(range(p))] * 2  # class + 4 registers, in place
    assert (ids[:, p:] >= p).all()  # no patch token moved into a prefix slot, no register merged away
    prefix_sources = info.sources[:, :p]
    assert torch.equal(prefix_sources, torch.eye(p + m)[:p].expand(2, -1, -1))  # each holds only itself
    assert info.sources[:, p:, :p].sum() == 0
    assert info.sources[:, p:, p:].sum(dim=1).eq(1).all()  # every patch lives in exactly one token


def test_merge_puts_prefix_values_back_in_front():
    torch.manual_seed(2)
    for p in (0, 1, 2, 5):
        x = torch.randn(2, p + 12, 4)
        plan = ops.bipartite_soft_matching(torch.randn(2, p + 12, 3), 6, p)
        merged, size = ops.merge_wavg(plan, x, torch.ones(2, p + 12, 1))
        assert merged.shape == (2, p + 6, 4)
        assert torch.equal(merged[:, :p], x[:, :p]) and (size[:, :p] == 1).all()
        assert size.sum(dim=1).eq(p + 12).all()


def reference_tome_one_cls(metric, x, r):
    """ToMe's own split for one class token (spec 4.2): A = 0, 2, 4.. with cls, B = 1, 3, ..; cls row -inf."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
    out = []
    for i in range(x.shape[0]):
        xa, xb = x[i, ::2], x[i, 1::2].clone()
        for s in src[i].tolist():
            xb[node_idx[i, s]] += xa[s]
        out.append(torch.cat([xa[unm[i]], xb]))
    return torch.stack(out)


def test_tome_with_one_class_token_merges_as_before():
    torch.manual_seed(4)
    metric, x = torch.randn(3, 17, 8), torch.randn(3, 17, 5)
    plan = ops.bipartite_soft_matching(metric, 5, 1)
    torch.testing.assert_close(ops.merge_apply(plan, x), reference_tome_one_cls(metric, x, 5))


def test_tome_traced_matches_analytic_with_registers(dinov2_reg):
    cfg = ReductionConfig("tome", r=20)
    apply(dinov2_reg, cfg)
    traced = traced_macs(dinov2_reg)
    analytic = analytic_macs(cfg, geometry_from_model(dinov2_reg))
    assert traced.total == pytest.approx(analytic.total, rel=1e-3)


# ----------------------------------------------------------------------------- 4. proportional attention
def reference_tome_forward(model, x, r, prop):
    """ToMe on a one-class-token ViT (spec 4.1-4.2), unfused attention; with or without + log(size)."""
    t = model._pos_embed(model.patch_embed(x))
    size = torch.ones(t.shape[0], t.shape[1], 1)
    for blk in model.blocks:
        b, n, c = t.shape
        attn = blk.attn
        q, k, v = attn.qkv(blk.norm1(t)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) * attn.scale
        if prop:
            logits = logits + size.log()[:, None, None, :, 0]
        t = t + attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
        rr = min(r, (n - 1) // 2)
        merged = reference_tome_one_cls(k.mean(1), torch.cat([t * size, size], dim=-1), rr)
        t, size = merged[..., :-1] / merged[..., -1:], merged[..., -1:]
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


def test_tome_without_proportional_attention_matches_reference():
    model = tiny(depth=4).eval()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        apply(model, ReductionConfig("tome", r=3, prop_attn=False))
        off = model(x)
        apply(model, ReductionConfig("tome", r=3))
        on = model(x)
        ref_off = reference_tome_forward(model, x, 3, prop=False)
        ref_on = reference_tome_forward(model, x, 3, prop=True)
    torch.testing.assert_close(off, ref_off, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(on, ref_on, atol=1e-5, rtol=1e-4)
    assert (off - on).abs().max() > 1e-3  # the switch changes the output


# ----------------------------------------------------------------------------- 5. ablation options: config
@pytest.mark.parametrize("kwargs,field", [
    (dict(method="tome", r=4, prop_attn="no"), "prop_attn"),
    (dict(method="etps", locations=(3,), keep_ratios=(0.7,), prop_attn=False), "prop_attn"),
    (dict(method="etps", locations=(3,), keep_ratios=(0.7,), squeeze_feature="keys"), "squeeze_feature"),
    (dict(method="topk", locations=(3,), keep_ratios=(0.7,), squeeze_feature="content"), "squeeze_feature"),
    (dict(method="evit", locations=(3,), keep_ratios=(0.7,), squeeze_similarity="attention"), "squeeze_similarity"),
    (dict(method="dtps", locations=(0, 3), keep_ratios=(0.7,), squeeze_similarity="attention"), "squeeze_similarity"),
    (dict(method="etps", locations=(3,), keep_ratios=(0.7,), squeeze_similarity="attention",
          squeeze_feature="position"), "squeeze_feature"),
    (dict(method="similarity", locations=(0,), keep_ratios=(0.7,), similarity_metric="l1"), "similarity_metric"),
    (dict(method="random", locations=(0,), keep_ratios=(0.7,), similarity_metric="dot"), "similarity_metric"),
])
def test_bad_ablation_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ReductionConfig(**kwargs)


def test_ablation_options_json_and_label_only_when_not_default():
    plain = ReductionConfig("etps", LOC, (0.7,))
    assert not {"prop_attn", "squeeze_feature", "squeeze_similarity", "similarity_metric"} & set(plain.to_dict())
    assert plain.label == "etps k0.7@3,6,9"
    cases = [
        (ReductionConfig("etps", LOC, (0.7,), squeeze_feature="content"), "etps k0.7@3,6,9 feat=content"),
        (ReductionConfig("dtps", LOC, (0.7,), squeeze_similarity="attention"), "dtps k0.7@3,6,9 sim=attention"),
        (ReductionConfig("similarity", (0,), (0.7,), similarity_metric="dot"), "similarity k0.7@0 metric=dot"),
        (ReductionConfig("tome", r=13, prop_attn=False), "tome r13 noprop"),
        (ReductionConfig("random", LOC, (0.7,), treatment="squeeze", squeeze_feature="position"),
         "random+squeeze k0.7@3,6,9 feat=position"),
    ]
    for cfg, label in cases:
        assert cfg.label == label
        assert ReductionConfig.from_json(cfg.to_json()) == cfg
        assert len(cfg.to_dict()) == len(plain.to_dict()) + 1


# ----------------------------------------------------------------------------- 5. ablation options: behaviour
@pytest.mark.parametrize("cfg", [
    ReductionConfig("etps", (1, 2), (0.5,), squeeze_feature="content"),
    ReductionConfig("dtps", (1, 2), (0.5,), squeeze_feature="position"),
    ReductionConfig("etps", (1, 2), (0.5,), squeeze_similarity="attention"),
    ReductionConfig("dtps", (1, 2), (0.5,), squeeze_similarity="attention"),
    ReductionConfig("random", (1, 2), (0.5,), treatment="squeeze", squeeze_similarity="attention"),
    ReductionConfig("similarity", (1,), (0.5,), similarity_placement="layerwise", similarity_metric="euclidean"),
    ReductionConfig("similarity", (0,), (0.5,), similarity_metric="dot"),
], ids=lambda c: c.label)
def test_ablation_options_change_the_output_and_train(cfg):
    model = tiny(depth=4).eval()
    torch.manual_seed(6)
    x = torch.randn(2, 3, 64, 64)
    published = ReductionConfig(cfg.method, cfg.locations, cfg.keep_ratios, treatment=cfg.treatment,
                                similarity_placement=cfg.similarity_placement)
    torch.manual_seed(0)  # the same predictor weights for both (dTPS)
    apply(model, published)
    with torch.inference_mode():
        ref = model(x)
    torch.manual_seed(0)
    apply(model, cfg)
    with torch.inference_mode():
        out = model(x)
    assert last_info(model).token_counts == list(token_schedule(cfg, 16, 1, 4).blocks)
    assert (out - ref).abs().max() > 1e-4
    model.train()
    model(x).logsumexp(-1).mean().backward()  # the training path runs and reaches the first block
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_matching_features_use_each_tokens_own_patch_position():
    model = tiny(depth=4).eval()
    apply(model, ReductionConfig("etps", (1, 2), (0.5,), squeeze_feature="position"))
    table = model.pos_embed[0, 1:]
    # position matching of the reserved/pruned tokens equals matching their original patches' embeddings
    spatial = torch.randn(1, 16, 192)
    keep, rest = torch.tensor([[3, 9, 0, 12]]), torch.tensor([[1, 2, 15]])
    from tpsexplore.reduce.patch import TokenState, _squeeze_similarity

    ids = torch.cat([torch.zeros(1, 1, dtype=torch.long), 1 + torch.randperm(16)[None]], dim=1)
    s = TokenState(x=torch.cat([torch.zeros(1, 1, 192), spatial], dim=1), ids=ids, num_prefix=1, pos_table=table)
    sim = _squeeze_similarity(s, model.tps_config, spatial, keep, rest)
    o = ids[0, 1:] - 1
    expect = F.cosine_similarity(table[o[rest[0]]][:, None], table[o[keep[0]]][None], dim=-1, eps=0)
    torch.testing.assert_close(sim[0], expect, atol=1e-5, rtol=1e-5)


def test_random_policy_composes_with_squeeze():
    model = tiny(depth=4).eval()
    torch.manual_seed(8)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        apply(model, ReductionConfig("random", (1, 2), (0.5,), seed=3))
        drop = model(x)
        counts, ids = last_info(model).token_counts, last_info(model).token_ids
        apply(model, ReductionConfig("random", (1, 2), (0.5,), treatment="squeeze", seed=3))
        squeeze = model(x)
    assert last_info(model).token_counts == counts and torch.equal(last_info(model).token_ids, ids)  # same picks
    assert (drop - squeeze).abs().max() > 1e-4


# ----------------------------------------------------------------------------- 5. GMACs (Table 5 and the rest)
@pytest.fixture(scope="module")
def deit_t():
    torch.manual_seed(0)
    return create_backbone("deit_t", weights="random")


@pytest.mark.parametrize("method,similarity,gmacs", [
    ("dtps", "cosine", 0.810), ("dtps", "attention", 0.807), ("etps", "cosine", 0.821), ("etps", "attention", 0.818),
])
def test_table5_gmacs_analytic_and_traced(deit_t, method, similarity, gmacs):
    cfg = ReductionConfig(method, LOC, (0.7,), squeeze_similarity=similarity)
    analytic = analytic_macs(cfg, geometry("deit_t"))
    assert analytic.gmacs == pytest.approx(gmacs, abs=0.001)
    apply(deit_t, cfg)
    assert traced_macs(deit_t).total == pytest.approx(analytic.total, rel=1e-4)


@pytest.mark.parametrize("cfg", [
    ReductionConfig("etps", (1, 2), (0.5,), squeeze_feature="content"),
    ReductionConfig("dtps", (1, 2), (0.5,), squeeze_feature="position"),
    ReductionConfig("random", (1, 2), (0.5,), treatment="squeeze", squeeze_similarity="attention"),
    ReductionConfig("similarity", (0,), (0.5,), similarity_metric="euclidean"),
    ReductionConfig("similarity", (1, 2), (0.5,), similarity_placement="layerwise", similarity_metric="dot"),
    ReductionConfig("tome", r=3, prop_attn=False),
], ids=lambda c: c.label)
def test_ablation_options_traced_equals_analytic(cfg):
    model = tiny(depth=4)
    apply(model, cfg)
    assert traced_macs(model).total == pytest.approx(analytic_macs(cfg, geometry_from_model(model)).total, rel=1e-4)


def test_metric_costs_differ_as_documented():
    g = geometry("deit_t")
    n, c = 196, 192
    cost = {m: analytic_macs(ReductionConfig("similarity", (0,), (0.7,), similarity_metric=m), g).similarity
            for m in ("cosine", "euclidean", "dot")}
    assert cost == {"cosine": n * n * c + 2 * n * c, "euclidean": n * n * c + n * c, "dot": n * n * c}


# ----------------------------------------------------------------------------- 5. search space and studies
def test_space_samples_the_ablation_options():
    space = SearchSpace(geometry("deit_t"), 0.5, resolve_variants(["etps", "similarity", "tome"]), 3)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen: dict[str, set] = {"squeeze_feature": set(), "squeeze_similarity": set(), "similarity_metric": set(),
                            "prop_attn": set()}
    for _ in range(60):
        trial = study.ask()
        cfg = space.suggest(trial).config
        for name in seen:
            seen[name].add(getattr(cfg, name))
        study.tell(trial, [0.5, 0.5])
    assert seen == {"squeeze_feature": {"full", "content", "position"}, "squeeze_similarity": {"cosine", "attention"},
                    "similarity_metric": {"cosine", "euclidean", "dot"}, "prop_attn": {True, False}}
    defaults = {c.variant: c.config for c in (space.from_params(p) for p in space.default_params())}
    for cfg in defaults.values():  # the enqueued published defaults use the published options
        assert (cfg.squeeze_feature, cfg.squeeze_similarity, cfg.similarity_metric, cfg.prop_attn) == \
            ("full", "cosine", "cosine", True)


def test_grid_options_are_validated():
    with pytest.raises(ValueError, match=r"^space.grid_options.squeeze_feature: 'keys'; allowed"):
        SpaceSettings(grid_locations=((3,),), grid_keep_ratios=(0.7,), grid_options={"squeeze_feature": ["keys"]})
    with pytest.raises(ValueError, match=r"^space.grid_options.r: unknown option"):
        SpaceSettings(grid_locations=((3,),), grid_keep_ratios=(0.7,), grid_options={"r": [1]})
    with pytest.raises(ValueError, match=r"^space.grid_options: needs grid mode"):
        SpaceSettings(grid_options={"seed": [0, 1]})


@pytest.mark.parametrize("name", ABLATION_STUDIES)
def test_ablation_study_files_enumerate_their_grid(name):
    settings = build_settings(load_study_file(name))
    assert settings.sampler.name == "grid" and not settings.gate.enabled and settings.confirm.top == 0
    space = SearchSpace(geometry(settings.backbone), settings.budget, resolve_variants(settings.methods),
                        settings.max_stages, settings.space, settings.seed)
    grid = space.grid_space()
    points = [dict(zip(grid, values)) for values in _product(list(grid.values()))]
    assert settings.trials == len(points) + 1  # every grid point once, plus the baseline
    configs = [space.from_params(p).config for p in points]
    assert len(set(configs)) == len(configs)  # no grid point repeats another
    option = next(k for k in settings.space.grid_options if k not in ("seed", "similarity_placement")) \
        if set(settings.space.grid_options) - {"seed", "similarity_placement"} else None
    if option:
        assert {getattr(c, option) for c in configs} == set(settings.space.grid_options[option])
    if name == "preprint_metric":
        assert {(c.similarity_placement, c.locations) for c in configs} == {("pre", (0,))}


def _product(lists):
    import itertools

    return itertools.product(*lists)
