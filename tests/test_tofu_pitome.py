"""ToFu and PiToMe (methods-spec sections 9 and 10): the tensor functions against small references written here,
token counts against the spec, identity at zero reduction, analytic == traced MACs, registry and search space."""
from __future__ import annotations

import math

import optuna
import pytest
import torch
import torch.nn.functional as F

from cli_run import run_cli
from tpsexplore import ReductionConfig, apply, create_backbone, last_info, remove
from tpsexplore.measure.flops import analytic_macs, geometry, geometry_from_model, traced_macs
from tpsexplore.reduce import get_method, merge_ops, ops, token_schedule, track_sources
from tpsexplore.reduce.ops import MergePlan
from tpsexplore.search.space import SearchSpace, SpaceSettings, default_variants, resolve_variants

SMALL = dict(img_size=96, patch_size=16, num_classes=10)  # deit_t widths, 12 blocks, 36 patch tokens


@pytest.fixture(scope="module")
def deit_t_small():
    torch.manual_seed(0)
    return create_backbone("deit_t", weights="random", **SMALL).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def forward(model, x):
    with torch.inference_mode():
        return model(x)


# ----------------------------------------------------------------------------- ToFu: MLERP and pruning
def test_mlerp_merges_along_the_mean_with_the_largest_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 5, generator=g)  # cls, then A = tokens 2, 4, 6 and B = 1, 3, 5 (ToMe's split)
    plan = MergePlan(unm_idx=torch.tensor([[[0]]]), src_idx=torch.tensor([[[1], [2]]]),
                     dst_idx=torch.tensor([[[0], [0]]]), num_protected=1)  # tokens 4 and 6 merge into token 1
    out = merge_ops.mlerp_merge(plan, x)
    group = x[0, [1, 4, 6]]
    mean = group.mean(0)
    largest = group.norm(dim=-1).max()
    expect = torch.stack([x[0, 0], x[0, 2], mean * largest / mean.norm(), x[0, 3], x[0, 5]])
    torch.testing.assert_close(out[0], expect)
    assert torch.equal(out[0, [0, 1, 3, 4]], expect[[0, 1, 3, 4]])  # untouched tokens come back bit for bit
    # the re-implementation's variant divides by the destination's own norm: not norm-preserving
    reimpl = merge_ops.mlerp_merge(plan, x, dst_norm=True)
    torch.testing.assert_close(reimpl[0, 2], mean * largest / x[0, 1].norm())
    assert not math.isclose(reimpl[0, 2].norm().item(), largest.item(), rel_tol=1e-3)


def test_mlerp_preserves_the_largest_norm_of_every_group():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 8, generator=g) * torch.rand(2, 21, 1, generator=g) * 4
    plan = ops.bipartite_soft_matching(torch.randn(2, 21, 4, generator=g), 7, 1)
    out = merge_ops.mlerp_merge(plan, x)
    members = ops.merge_apply(plan, torch.eye(21).expand(2, 21, 21), "amax")  # (B, 14, 21) input tokens of each
    expect_norm = (members * x.norm(dim=-1)[:, None, :]).amax(dim=-1)
    torch.testing.assert_close(out.norm(dim=-1), expect_norm)
    means = (members @ x) / members.sum(-1, keepdim=True)
    cos = F.cosine_similarity(out, means, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))  # along the plain mean of each group


def test_tofu_prune_drops_the_most_redundant_a_tokens():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 9, 6, generator=g)
    metric = torch.randn(1, 9, 4, generator=g)
    r = 2
    k = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    a_tokens, b_tokens = [2, 4, 6, 8], [1, 3, 5, 7]  # ToMe's split with one class token
    best = {a: max(float(k[a] @ k[b]) for b in b_tokens) for a in a_tokens}
    dropped = sorted(a_tokens, key=lambda a: -best[a])[:r]
    plan = ops.bipartite_soft_matching(metric, r, 1)
    out = ops.merge_apply(plan, x, None)
    keep = [0] + [a for a in a_tokens if a not in dropped] + b_tokens
    assert torch.equal(out[0], x[0, keep])
    assert torch.equal(merge_ops.removed_tokens(plan, x)[0], x[0, dropped])


# ----------------------------------------------------------------------------- PiToMe: energy and matching
def elu(z: float) -> float:
    return z if z > 0 else math.exp(z) - 1.0


def reference_pitome(x, metric, size, r, margin, protect, p=1):
    """PiToMe's merge written with Python loops over tokens (spec 10.2): tokens and sizes of one image."""
    k = metric[p:] / metric[p:].norm(dim=-1, keepdim=True)
    sim = (k @ k.T).tolist()
    t = len(sim)
    energy = [sum(elu(sim[i][j] - margin) for j in range(t)) / t for i in range(t)]
    order = sorted(range(t), key=lambda i: -energy[i])
    if protect:
        merge, protected = order[: 2 * r], order[2 * r:]
        a_set, b_set = merge[0::2], merge[1::2]
        src, unm = a_set, []
    else:
        protected, a_set, b_set = [], order[0::2], order[1::2]
        ranked = sorted(a_set, key=lambda a: -max(sim[a][b] for b in b_set))
        src, unm = ranked[:r], ranked[r:]
    xs, ss = x[p:], size[p:]
    total = {b: ss[b] * xs[b] for b in b_set}
    weight = {b: ss[b].clone() for b in b_set}
    for a in src:
        b = max(b_set, key=lambda j: sim[a][j])
        total[b] = total[b] + ss[a] * xs[a]
        weight[b] = weight[b] + ss[a]
    tokens = [x[i] for i in range(p)] + [xs[i] for i in protected + unm] + [total[b] / weight[b] for b in b_set]
    sizes = [size[i] for i in range(p)] + [ss[i] for i in protected + unm] + [weight[b] for b in b_set]
    return torch.stack(tokens), torch.stack(sizes)


def test_pitome_energy_matches_its_definition():
    sim = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = merge_ops.pitome_energy(sim, 0.4)
    expect = [[sum(elu(sim[b, i, j].item() - 0.4) for j in range(6)) / 6 for i in range(6)] for b in range(2)]
    torch.testing.assert_close(got, torch.tensor(expect))


@pytest.mark.parametrize("protect", [False, True])
def test_pitome_merge_matches_a_loop_reference(protect):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 13, 5, generator=g)
    metric = torch.randn(2, 13, 4, generator=g)
    size = torch.randint(1, 4, (2, 13, 1), generator=g).float()
    plan = merge_ops.pitome_matching(metric, 4, 0.3, 1, protect=protect)
    out, new_size = merge_ops.energy_wavg(plan, x, size)
    assert out.shape == (2, 9, 5)
    for b in range(2):
        ref_x, ref_s = reference_pitome(x[b], metric[b], size[b], 4, 0.3, protect)
        torch.testing.assert_close(out[b], ref_x)
        torch.testing.assert_close(new_size[b], ref_s)


def test_pitome_protects_an_isolated_token():
    cluster = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    lone = torch.tensor([[0.0, 0.0, 1.0]])
    metric = torch.cat([torch.tensor([[0.0, 1.0, 0.0]]), cluster[:3], lone, cluster[3:]])[None]  # cls at 0, lone 4
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(2))
    sim = F.normalize(metric[0, 1:], dim=-1) @ F.normalize(metric[0, 1:], dim=-1).T
    energy = merge_ops.pitome_energy(sim[None], 0.5)[0]
    assert energy.argmin().item() == 3  # the lone token (index 4 - 1 prefix) has the lowest energy
    for protect in (True, False):
        r = 3
        plan = merge_ops.pitome_matching(metric, r, 0.5, 1, protect=protect)
        out, size = merge_ops.energy_wavg(plan, x, torch.ones(1, 8, 1))
        ids = merge_ops.energy_apply(plan, torch.arange(8)[None, :, None], None)[0, :, 0].tolist()
        at = ids.index(4)
        assert torch.equal(out[0, at], x[0, 4]) and size[0, at, 0] == 1.0, protect  # never merged
        if protect:
            assert ids[1] == 4  # first after cls: the protected tokens come first
    # ToMe's matching, which has no energy, merges the lone token away at the same r
    plan = ops.bipartite_soft_matching(metric, 3, 1)
    merged = ops.merge_apply(plan, torch.eye(8)[None], "amax")[0]
    assert all(row[4] == 0 or row.sum() > 1 for row in merged)


# ----------------------------------------------------------------------------- counts (spec 9.3, 10)
TOFU_COUNTS = {  # tokens after blocks 0..11, DeiT (N0 = 197), spec 9.3
    0.9: [178, 161, 145, 131, 118, 107, 97, 88, 80, 72, 65, 59],
    0.925: [183, 170, 158, 147, 136, 126, 117, 109, 101, 94, 87, 81],
    0.95: [188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
    0.975: [193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151],
}


def pitome_counts(keep: float, patches: int = 196, depth: int = 12) -> list[int]:
    out, t = [], patches
    for _ in range(depth):
        t -= math.floor(t - t * keep)  # the class token stays out of the count
        out.append(t + 1)
    return out


@pytest.mark.parametrize("keep", sorted(TOFU_COUNTS))
def test_token_counts_follow_the_spec(keep):
    tofu = token_schedule(ReductionConfig("tofu", keep_ratios=(keep,)), 196, 1, 12)
    assert [m for _, m in tofu.blocks] == TOFU_COUNTS[keep]
    assert [a for a, _ in tofu.blocks] == [197] + TOFU_COUNTS[keep][:-1]  # attention runs before the merge
    pitome = token_schedule(ReductionConfig("pitome", keep_ratios=(keep,)), 196, 1, 12)
    assert [m for _, m in pitome.blocks] == pitome_counts(keep)
    if keep == 0.9:
        assert pitome.final_tokens == 60 and tofu.final_tokens == 59  # spec 10: one token more at the end


def test_gmacs_match_the_spec_anchors():
    s, t = geometry("deit_s"), geometry("deit_t")
    tofu = {0.9: (2.60, 0.705), 0.925: (2.99, 0.811), 0.95: (3.45, 0.938), 0.975: (4.02, 1.097)}
    pitome = {0.9: (2.61, 0.715), 0.925: (3.01, 0.826), 0.95: (3.47, 0.952), 0.975: (4.04, 1.115)}
    for method, table in (("tofu", tofu), ("pitome", pitome)):
        for keep, (gs, gt) in table.items():
            cfg = ReductionConfig(method, keep_ratios=(keep,))
            assert analytic_macs(cfg, s).gmacs == pytest.approx(gs, abs=0.006), (method, keep)
            assert analytic_macs(cfg, t).gmacs == pytest.approx(gt, abs=0.0015), (method, keep)


def test_forward_follows_the_schedule_and_the_modes_switch_at_half_depth():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    for method in ("tofu", "pitome"):
        cfg = ReductionConfig(method, keep_ratios=(0.9,))
        apply(model, cfg)
        forward(model, x)
        assert last_info(model).token_counts == list(token_schedule(cfg, 196, 1, 12).blocks), method
    assert [b.tps_stage.mode for b in model.blocks] == ["bipartite"] * 6 + ["protect"] * 6
    assert [b.tps_stage.margin for b in model.blocks] == pytest.approx([0.75 - 0.0625 * i for i in range(12)])
    apply(model, ReductionConfig("tofu", keep_ratios=(0.9,), treatment="squeeze"))
    assert [b.tps_stage.treatment for b in model.blocks] == ["squeeze"] * 7 + ["mlerp"] * 5  # blocks 0-6 prune
    apply(model, ReductionConfig("tofu", keep_ratios=(0.9,)))
    assert [b.tps_stage.treatment for b in model.blocks] == ["drop"] * 7 + ["mlerp"] * 5


# ----------------------------------------------------------------------------- identity, prefix tokens, batches
@pytest.mark.parametrize("name,kw", [
    ("deit_t", SMALL),
    ("deit_tiny_distilled_patch16_224", dict(img_size=96)),  # class + distillation token
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),  # class + 4 registers, LayerScale
])
def test_zero_reduction_is_bit_identical_and_prefix_tokens_stay(name, kw):
    torch.manual_seed(0)
    model = create_backbone(name, weights="random", **kw).eval()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(4))
    ref = forward(model, x)
    p = model.num_prefix_tokens
    for cfg in (ReductionConfig("tofu", keep_ratios=(1.0,)), ReductionConfig("pitome", keep_ratios=(1.0,)),
                ReductionConfig("tofu", (2, 5), (1.0,), treatment="squeeze")):
        apply(model, cfg)
        assert not any(hasattr(b, "tps_stage") for b in model.blocks)
        assert torch.equal(forward(model, x), ref), cfg.label
    for cfg in (ReductionConfig("tofu", keep_ratios=(0.8,)), ReductionConfig("pitome", keep_ratios=(0.8,)),
                ReductionConfig("tofu", keep_ratios=(0.8,), treatment="squeeze")):
        apply(model, cfg)
        out = forward(model, x)
        info = last_info(model)
        assert torch.isfinite(out).all() and not torch.equal(out, ref), cfg.label
        assert torch.equal(info.token_ids[:, :p], torch.arange(p).expand(2, p)), cfg.label  # prefix in place
        assert info.token_counts == list(token_schedule(cfg, model.patch_embed.num_patches, p, 12).blocks)
    remove(model)
    assert torch.equal(forward(model, x), ref)


def test_one_image_alone_equals_inside_a_batch_and_sources_cover_every_patch(deit_t_small, image):
    x = torch.cat([image, image.flip(-1)])
    for cfg in (ReductionConfig("tofu", keep_ratios=(0.85,)), ReductionConfig("pitome", keep_ratios=(0.85,)),
                ReductionConfig("tofu", keep_ratios=(0.85,), treatment="squeeze", mlerp_dst_norm=True)):
        apply(deit_t_small, cfg)
        batch = forward(deit_t_small, x)
        torch.testing.assert_close(forward(deit_t_small, x[2:3])[0], batch[2], atol=1e-5, rtol=1e-4)
        with torch.inference_mode(), track_sources(deit_t_small):
            deit_t_small(image)
        covered = last_info(deit_t_small).sources[:, 1:, 1:].amax(dim=1).sum(-1)
        if cfg.effective_treatment == "squeeze" or cfg.method == "pitome":
            assert covered.tolist() == [36.0, 36.0], cfg.label  # merging and squeezing lose no patch
        else:
            assert (covered < 36).all(), cfg.label  # ToFu's early blocks prune


def test_fine_tuning_reaches_every_block():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", img_size=64, num_classes=10)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    for cfg in (ReductionConfig("tofu", keep_ratios=(0.8,)), ReductionConfig("pitome", keep_ratios=(0.8,)),
                ReductionConfig("tofu", keep_ratios=(0.8,), treatment="squeeze")):
        apply(model, cfg).train()
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        assert last_info(model).token_counts[-1][1] < 17, cfg.label  # tokens physically removed in training
        for blk in (model.blocks[0], model.blocks[-1]):
            assert blk.attn.qkv.weight.grad is not None and blk.attn.qkv.weight.grad.abs().sum() > 0, cfg.label


# ----------------------------------------------------------------------------- MACs
TRACED_CONFIGS = [
    ReductionConfig("tofu", keep_ratios=(0.9,)),
    ReductionConfig("tofu", keep_ratios=(0.8,), mlerp_dst_norm=True),
    ReductionConfig("tofu", keep_ratios=(0.85,), treatment="squeeze"),
    ReductionConfig("tofu", keep_ratios=(0.85,), treatment="squeeze", squeeze_similarity="attention"),
    ReductionConfig("tofu", keep_ratios=(0.85,), treatment="squeeze", squeeze_feature="content"),
    ReductionConfig("pitome", keep_ratios=(0.9,)),
    ReductionConfig("pitome", (2, 5, 9), (0.7, 0.8, 0.6)),
]


@pytest.mark.parametrize("config", TRACED_CONFIGS, ids=lambda c: c.label)
def test_analytic_equals_traced(deit_t_small, config):
    apply(deit_t_small, config)
    try:
        traced = traced_macs(deit_t_small)
    finally:
        remove(deit_t_small)
    analytic = analytic_macs(config, geometry_from_model(deit_t_small))
    assert analytic.extras > 0
    assert traced.total == analytic.total, (traced.by_operator, analytic.as_dict())


def test_tofu_squeeze_options_change_the_hosts(deit_t_small, image):
    outs = {}
    for kw in ({}, dict(squeeze_feature="position"), dict(squeeze_similarity="attention")):
        apply(deit_t_small, ReductionConfig("tofu", keep_ratios=(0.85,), treatment="squeeze", **kw))
        outs[tuple(kw.values())] = forward(deit_t_small, image)
    apply(deit_t_small, ReductionConfig("tofu", keep_ratios=(0.85,)))
    dropped = forward(deit_t_small, image)
    values = list(outs.values()) + [dropped]
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])


def test_extras_are_the_matching_and_the_mlerp_norms():
    g = geometry("deit_t")
    base = analytic_macs(ReductionConfig("tofu", keep_ratios=(0.9,)), g)
    reimpl = analytic_macs(ReductionConfig("tofu", keep_ratios=(0.9,), mlerp_dst_norm=True), g)
    merged_blocks = [st for st in token_schedule(ReductionConfig("tofu", keep_ratios=(0.9,)), 196, 1, 12).stages
                     if st.block > 6]
    assert base.mlerp - reimpl.mlerp == sum((st.before + 1 - st.removed) * 192 for st in merged_blocks)
    assert base.matching == reimpl.matching > 0 and base.squeeze == 0
    pitome = analytic_macs(ReductionConfig("pitome", keep_ratios=(0.9,)), g)
    sched = token_schedule(ReductionConfig("pitome", keep_ratios=(0.9,)), 196, 1, 12)
    assert pitome.matching == sum(st.before ** 2 * 64 + st.before * 64 for st in sched.stages)


# ----------------------------------------------------------------------------- config, registry, CLI
@pytest.mark.parametrize("kwargs,field", [
    (dict(method="tofu", keep_ratios=(0.4,)), "keep_ratios"),
    (dict(method="pitome"), "keep_ratios"),
    (dict(method="pitome", keep_ratios=(0.9, 0.8)), "keep_ratios"),
    (dict(method="tofu", keep_ratios=(0.9,), r=4), "r"),
    (dict(method="pitome", keep_ratios=(0.9,), mlerp_dst_norm=True), "mlerp_dst_norm"),
    (dict(method="pitome", keep_ratios=(0.9,), treatment="squeeze"), "treatment"),
    (dict(method="pitome", keep_ratios=(0.9,), prop_attn=False), "prop_attn"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: [^\n]*$"):
        ReductionConfig(**kwargs)


def test_config_round_trip_label_and_registry():
    cfg = ReductionConfig("tofu", keep_ratios=(0.9,), treatment="squeeze", mlerp_dst_norm=True, temperature=0.5)
    assert ReductionConfig.from_json(cfg.to_json()) == cfg
    assert "mlerp_dst_norm" not in ReductionConfig("tofu", keep_ratios=(0.9,)).to_dict()  # written only when set
    assert cfg.label == "tofu+squeeze k0.9 mlerp=dst"
    assert ReductionConfig("pitome", (3, 6), (0.8,)).label == "pitome k0.8@3,6"
    assert get_method("tofu").count_rule == "ratio" and get_method("pitome").count_rule == "ratio_patches"
    rc, out, _ = run_cli(["methods"])
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert rc == 0 and "mlerp/squeeze" in rows["tofu"] and rows["pitome"].split()[1:3] == ["energy", "merge"]


# ----------------------------------------------------------------------------- search space
def test_default_search_space_samples_tofu_and_pitome():
    assert {"tofu", "pitome", "tofu+squeeze"} <= {v.key for v in default_variants()}
    geo = geometry("deit_t")
    space = SearchSpace(geo, 0.6, resolve_variants("tofu,pitome,tofu+squeeze"))
    assert [v.key for v in space.variants] == ["tofu", "pitome", "tofu+squeeze"] and not space.excluded
    cand = space.from_params({"method": "tofu", "fill": 1.0, "mlerp_dst_norm": True})
    assert cand.config.mlerp_dst_norm and not cand.config.locations and cand.feasible
    assert 0.59 < cand.fraction <= 0.6  # the largest keep ratio (3 decimals) that fits the budget
    bigger = cand.config.with_(keep_ratios=((round(cand.config.keep_ratios[0] * 1000) + 1) / 1000,))
    assert space.cost(bigger) > space.budget_gmacs
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        cand = space.suggest(trial)
        cand.config.validate(12)
        assert cand.feasible and 0.5 <= cand.config.keep_ratios[0] <= 1.0, cand.config.label
        seen.add(cand.variant)
        study.tell(trial, cand.fraction)
    assert seen == {"tofu", "pitome", "tofu+squeeze"}
    grid = SearchSpace(geo, 1.0, resolve_variants("tofu,pitome"),
                       settings=SpaceSettings(grid_locations=((3, 6, 9),), grid_keep_ratios=(0.7,),
                                              sample_options=False))
    reference = grid.cost(ReductionConfig("etps", (3, 6, 9), (0.7,)))
    for method in ("tofu", "pitome"):
        cand = grid.from_params({"method": method, "locations": "3,6,9", "keep": 0.7})
        assert reference * 0.97 < cand.gmacs <= reference  # matched to eTPS at the paper's grid point
