"""The one thin layer that patches a timm VisionTransformer to reduce tokens.

`apply` swaps the model's class for a subclass whose ``forward_features`` carries a `TokenState`
through the blocks, and attaches a `ReductionStage` module to each block that reduces. Blocks that
neither reduce nor need anything from attention run timm's own ``Block.forward`` (fused attention).
`remove` restores the original class and drops the added modules.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..manifest import Geometry
from . import merge_ops, ops
from .config import SIZE_POLICIES, ReductionConfig, parse_json
from .methods import RATIO_RULES
from .modules import ReductionStage
from .schedule import check_merge_r, pitome_margin, pitome_protects, tofu_merges, token_schedule

Tensor = torch.Tensor
METRIC_POLICIES = ("merge", "bipartite", "energy")  # ToMe, ToFu, PiToMe: the block's head-averaged keys


@dataclass
class ReductionInfo:
    """What the last forward pass did; read with `last_info(model)`.

    token_counts: (attention tokens, MLP tokens) per block, read from shapes (no host sync).
    token_ids: (B, N) original index of each output token (prefix tokens first, patch p at
    num_prefix + p); -1 for EViT's fused token, which stands for many patches.
    sources: (B, N, num_prefix + num_patches) 0/1 map of the input tokens each output token holds,
    only when source tracking is on (`track_sources`).
    decisions / keep_targets: the learned-policy stages' hard keep masks (training) and their targets.
    keep_mask: (B, N) training mask of live tokens for DynamicViT/dTPS, else None.
    stage_sources: sources after each reduction stage (tracking only), keyed by block index.
    """

    token_counts: list[tuple[int, int]] = field(default_factory=list)
    token_ids: Tensor | None = None
    sources: Tensor | None = None
    decisions: list[Tensor] = field(default_factory=list)
    keep_targets: list[float] = field(default_factory=list)
    keep_mask: Tensor | None = None
    stage_sources: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class TokenState:
    """Everything that travels with the tokens from block to block within one forward pass."""

    x: Tensor
    ids: Tensor  # (B, N) long
    num_prefix: int
    size: Tensor | None = None  # ToMe token sizes (B, N, 1)
    source: Tensor | None = None  # (B, N, N0) float when tracking
    mask: Tensor | None = None  # training keep mask over spatial tokens (B, M)
    rollout: Tensor | None = None  # rollout scores of the spatial tokens (B, M)
    embed: Tensor | None = None  # patch embeddings before the position embedding (B, M, C)
    grid_width: int = 0  # patches per row, for spatial positions
    pos_table: Tensor | None = None  # position embedding of each patch (num_patches, C), squeeze_feature only
    attention: Tensor | None = None  # head-mean attention over the spatial tokens (B, M, M), squeeze_similarity
    info: ReductionInfo = field(default_factory=ReductionInfo)


class TokenReductionMixin:
    """Mixed into the patched model's class; ``tps_config`` and ``tps_options`` are set by `apply`."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask: token reduction does not support attention masks or causal attention")
        cfg: ReductionConfig = self.tps_config
        embed = self.patch_embed(x)
        x = self._pos_embed(embed)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        b, n, _ = x.shape
        p = self.num_prefix_tokens
        state = TokenState(x=x, ids=torch.arange(n, device=x.device).expand(b, n), num_prefix=p,
                           grid_width=self.patch_embed.grid_size[1], info=ReductionInfo())  # explicit: compilable
        if self.tps_options.get("track_sources"):
            state.source = torch.eye(n, device=x.device, dtype=torch.float32).expand(b, n, n)
        if cfg.spec is not None and cfg.spec.policy == "similarity" and not cfg.similarity_with_pos \
                and cfg.similarity_placement == "pre":
            state.embed = embed if embed.dim() == 3 else embed.flatten(1, 2)
        if cfg.spec is not None and cfg.spec.policy == "rollout":
            state.rollout = _rollout_scores(self, x)
        if cfg.squeeze_feature != "full":
            state.pos_table = patch_position_table(self)
        keep_attention = _attention_blocks(self) if cfg.squeeze_similarity == "attention" else ()
        for i, blk in enumerate(self.blocks):
            state = _run_block(blk, state, getattr(blk, "tps_stage", None), cfg, self.training, i in keep_attention)
        if state.mask is not None:
            state.info.keep_mask = torch.cat([state.mask.new_ones(b, p), state.mask], dim=1)
        state.info.token_ids = state.ids
        state.info.sources = state.source
        self.tps_last_info = state.info
        return self.norm(state.x)


# ----------------------------------------------------------------------------- per block
def patch_position_table(model: VisionTransformer) -> Tensor:
    """The position embedding of every patch, (num_patches, C), in patch order (TPS matching features)."""
    start = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return model.pos_embed[0, start:]


def _attention_blocks(model: VisionTransformer) -> set[int]:
    """Blocks whose attention map a squeeze matches on (squeeze_similarity 'attention'): the block before a
    reduction between blocks, the reducing block itself for a reduction after attention."""
    out = set()
    for i, blk in enumerate(model.blocks):
        stage = getattr(blk, "tps_stage", None)
        if stage is not None and stage.treatment == "squeeze":
            out.add(i - 1 if stage.placement == "inter" else i)
    return out


def _run_block(blk: Block, s: TokenState, stage: ReductionStage | None, cfg: ReductionConfig,
               training: bool, keep_attention: bool = False) -> TokenState:
    p = s.num_prefix
    if stage is not None and stage.placement == "inter":
        _reduce_inter(stage, s, cfg, training)
    need_cls = stage is not None and stage.policy == "cls_attn"
    need_metric = stage is not None and stage.policy in METRIC_POLICIES
    prop = s.size is not None and cfg.prop_attn and cfg.spec.policy in SIZE_POLICIES  # PiToMe: sizes, no bias
    n_attn = s.x.shape[1]
    if not (need_cls or need_metric or prop or s.mask is not None or keep_attention):
        x = blk(s.x)  # timm's own block: fused attention, nothing to collect
        s.info.token_counts.append((n_attn, x.shape[1]))
        s.x = x
        return s
    bias = None
    if prop:  # ToMe proportional attention: + log(size) over the key axis
        bias = s.size.log()[:, None, None, :, 0].to(s.x.dtype)
    maps: list[Tensor] | None = [] if keep_attention else None
    out, cls_scores, metric = _attention(blk.attn, blk.norm1(s.x), bias, need_cls, need_metric, s.mask, p,
                                         maps=maps)
    if maps:
        s.attention = maps[0][:, p:, p:]
    s.x = s.x + blk.drop_path1(blk.ls1(out))
    if need_cls:
        _reduce_select(stage, s, cls_scores, cfg)
    elif stage is not None and stage.policy == "bipartite":
        _tofu(stage, s, metric, cfg)
    elif stage is not None and stage.policy == "energy":
        _pitome(stage, s, metric)
    elif need_metric:
        _merge(stage, s, metric)
    s.info.token_counts.append((n_attn, s.x.shape[1]))
    s.x = s.x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(s.x))))
    return s


def _qkv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, N, head_dim) as timm's Attention makes them, q/k norms applied."""
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attention(attn: Attention, x: Tensor, bias: Tensor | None, need_cls: bool, need_metric: bool,
               mask: Tensor | None, num_prefix: int, *, maps: list[Tensor] | None = None
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """timm Attention's math, also returning class-attention scores or ToMe's key metric when asked.

    ``maps``: a list to receive the head-averaged attention probabilities (B, N, N); the attention then runs
    unfused (the same MACs) so that its map exists.
    """
    b, n, c = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv(attn, x)
    if mask is not None:  # DynamicViT training: full attention matrix with the masked softmax
        policy = torch.cat([mask.new_ones(b, num_prefix), mask], dim=1)
        if maps is None:
            out = ops.masked_attention(q, k, v, policy, attn.scale)
        else:
            a = ops.masked_attention_probs(q, k, policy, attn.scale)
            maps.append(a.mean(dim=1))
            out = a.to(v.dtype) @ v
    elif attn.fused_attn and maps is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            a = a + bias
        a = a.softmax(dim=-1)
        if maps is not None:
            maps.append(a.mean(dim=1))
        out = attn.attn_drop(a) @ v
    cls_scores = ops.class_attention(q, k, attn.scale, bias)[:, num_prefix:] if need_cls else None
    metric = k.mean(dim=1) if need_metric else None
    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), cls_scores, metric


# ----------------------------------------------------------------------------- reductions
def _reduce_inter(stage: ReductionStage, s: TokenState, cfg: ReductionConfig, training: bool) -> None:
    """Reduce before the block runs (DynamicViT, dTPS, similarity, rollout, random)."""
    p = s.num_prefix
    spatial = s.x[:, p:]
    if stage.policy == "predictor":
        if training:
            _predictor_train(stage, s, cfg)
            return
        scores = stage.predictor(spatial)[..., 0]
    elif stage.policy == "similarity":
        feats = s.embed if (s.embed is not None and stage.block_index == 0) else spatial
        scores = -ops.redundancy(feats, cfg.similarity_metric)
    elif stage.policy == "rollout":
        scores = s.rollout
    elif stage.policy == "random":
        scores = stage.random_scores[(s.ids[:, p:] - p).clamp_min(0)].to(spatial.dtype)
    else:  # pragma: no cover - guarded by the registry
        raise ValueError(f"policy: {stage.policy!r} cannot reduce between blocks")
    _reduce_select(stage, s, scores, cfg)


def _reduce_select(stage: ReductionStage, s: TokenState, scores: Tensor, cfg: ReductionConfig) -> None:
    """Keep the top ``stage.kept`` spatial tokens by score and treat the rest (drop, fuse or squeeze)."""
    p = s.num_prefix
    prefix, spatial = s.x[:, :p], s.x[:, p:]
    if stage.policy == "similarity" and cfg.diversity > 0:
        keep, rest = ops.diverse_topk(scores, stage.kept, _grid_coords(s), cfg.diversity)
    else:
        keep, rest = ops.split_by_score(scores, stage.kept)
    kept = ops.gather_tokens(spatial, keep)
    ids = ops.gather_tokens(s.ids[:, p:], keep)
    src = ops.gather_tokens(s.source[:, p:], keep) if s.source is not None else None
    if stage.treatment == "squeeze":
        kept, weight = ops.squeeze(kept, ops.gather_tokens(spatial, rest), cfg.temperature,
                                   _squeeze_similarity(s, cfg, spatial, keep, rest))
        if src is not None:
            moved = (weight > 0).float() @ ops.gather_tokens(s.source[:, p:], rest)
            src = (src + moved).clamp_max(1.0)
    elif stage.treatment == "fuse":
        weights = ops.gather_tokens(scores, rest)
        kept = torch.cat([kept, ops.fuse_tokens(ops.gather_tokens(spatial, rest), weights)], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), -1)], dim=1)
        if src is not None:
            fused = ops.gather_tokens(s.source[:, p:], rest).amax(dim=1, keepdim=True)
            src = torch.cat([src, fused], dim=1)
    if s.rollout is not None:
        s.rollout = ops.gather_tokens(s.rollout, keep)
    s.x = torch.cat([prefix, kept], dim=1)
    s.ids = torch.cat([s.ids[:, :p], ids], dim=1)
    if src is not None:
        s.source = torch.cat([s.source[:, :p], src], dim=1)
        s.info.stage_sources[stage.block_index] = s.source


def _predictor_train(stage: ReductionStage, s: TokenState, cfg: ReductionConfig) -> None:
    """DynamicViT/dTPS training: Gumbel hard decisions, masks instead of removal, squeeze for dTPS."""
    p = s.num_prefix
    spatial = s.x[:, p:]
    prev = s.mask if s.mask is not None else spatial.new_ones(spatial.shape[:2])
    log_probs = stage.predictor(spatial, prev)
    keep = ops.gumbel_keep(log_probs) * prev
    if stage.treatment == "squeeze":
        prune = (1.0 - keep) * prev
        spatial = ops.squeeze_masked(spatial, keep, prune, cfg.temperature, _squeeze_similarity(s, cfg, spatial))
        s.x = torch.cat([s.x[:, :p], spatial], dim=1)
    s.info.decisions.append(keep)
    s.info.keep_targets.append(stage.target)
    s.mask = keep


def _squeeze_similarity(s: TokenState, cfg: ReductionConfig, spatial: Tensor, keep: Tensor | None = None,
                        rest: Tensor | None = None) -> Tensor | None:
    """The squeeze's similarity when an ablation changes it (None: the cosine of the tokens, the default).

    With ``keep``/``rest`` (B, K) and (B, M - K) indices: pruned x reserved (B, M - K, K), for the split form;
    without them: all x all (B, M, M), for the masked training form. squeeze_similarity 'attention' reads the
    attention map the previous attention step left in ``s.attention`` (and clears it); squeeze_feature matches
    on x - p or p, p being the position embedding of each token's original patch (``s.ids``).
    """
    if cfg.squeeze_similarity == "attention":
        a, s.attention = s.attention, None
        if keep is None:
            return a
        rows = ops.gather_tokens(a, rest)  # (B, Np, M): the pruned tokens as queries
        return rows.gather(2, keep.unsqueeze(1).expand(-1, rest.shape[1], -1))
    if cfg.squeeze_feature == "full":
        return None
    p = s.num_prefix
    pos = s.pos_table[(s.ids[:, p:] - p).clamp_min(0)].to(spatial.dtype)  # (B, M, C)
    feats = spatial - pos if cfg.squeeze_feature == "content" else pos
    if keep is None:
        return ops.cosine_similarity(feats, feats)
    return ops.cosine_similarity(ops.gather_tokens(feats, rest), ops.gather_tokens(feats, keep))


def _merge_count(stage: ReductionStage, s: TokenState) -> int:
    """Tokens a merging stage removes here: its count, at most half of the non-prefix tokens (one matching)."""
    return min(stage.removed, (s.x.shape[1] - s.num_prefix) // 2)


def _size_weighted(stage: ReductionStage, s: TokenState, plan: Any, wavg: Callable, move: Callable) -> None:
    """Apply a merge plan with sizes (ToMe, PiToMe): ``wavg(plan, x, size)`` merges the tokens, ``move(plan, t,
    reduce)`` carries the token ids and source maps along."""
    size = s.size if s.size is not None else s.x.new_ones(s.x.shape[0], s.x.shape[1], 1)
    s.x, s.size = wavg(plan, s.x, size)
    s.ids = move(plan, s.ids.unsqueeze(-1), None)[..., 0]
    if s.source is not None:
        s.source = move(plan, s.source, "amax")
        s.info.stage_sources[stage.block_index] = s.source


def _merge(stage: ReductionStage, s: TokenState, metric: Tensor) -> None:
    """ToMe: bipartite soft matching on head-averaged keys, then the size-weighted merge."""
    r = _merge_count(stage, s)
    if r > 0:
        _size_weighted(stage, s, ops.bipartite_soft_matching(metric, r, s.num_prefix), ops.merge_wavg,
                       ops.merge_apply)


def _tofu(stage: ReductionStage, s: TokenState, metric: Tensor, cfg: ReductionConfig) -> None:
    """ToFu (spec 9): ToMe's matching on the keys; the matched sources are dropped (``drop``, ToFu's early
    blocks), squeezed into their most similar kept token (``squeeze``: ToFu + squeeze, early blocks only, with
    the squeeze options) or MLERP-merged into their match (``mlerp``, the later blocks). No sizes: ToFu has no
    proportional attention, and its merges are unweighted."""
    p = s.num_prefix
    r = _merge_count(stage, s)
    if r <= 0:
        return
    plan = ops.bipartite_soft_matching(metric, r, p)
    source = s.source
    if stage.treatment == "mlerp":
        x = merge_ops.mlerp_merge(plan, s.x, cfg.mlerp_dst_norm)
        if source is not None:
            source = ops.merge_apply(plan, source, "amax")
    else:
        x = ops.merge_apply(plan, s.x, None)  # the sources are gone
        if source is not None:
            source = ops.merge_apply(plan, source, None)
        if stage.treatment == "squeeze":  # TPS's squeeze of the pruned tokens into the kept non-prefix ones
            similarity = None
            if cfg.squeeze_feature != "full" or cfg.squeeze_similarity != "cosine":
                pos = torch.arange(s.x.shape[1], device=s.x.device).expand(s.x.shape[0], -1).unsqueeze(-1)
                keep = ops.merge_apply(plan, pos, None)[:, p:, 0] - p  # spatial index of each kept token
                rest = merge_ops.removed_tokens(plan, pos)[..., 0] - p
                similarity = _squeeze_similarity(s, cfg, s.x[:, p:], keep, rest)
            kept, weight = ops.squeeze(x[:, p:], merge_ops.removed_tokens(plan, s.x), cfg.temperature, similarity)
            x = torch.cat([x[:, :p], kept], dim=1)
            if source is not None:
                moved = (weight > 0).float() @ merge_ops.removed_tokens(plan, s.source)
                source = torch.cat([source[:, :p], (source[:, p:] + moved).clamp_max(1.0)], dim=1)
    s.x = x
    s.ids = ops.merge_apply(plan, s.ids.unsqueeze(-1), None)[..., 0]
    if source is not None:
        s.source = source
        s.info.stage_sources[stage.block_index] = source


def _pitome(stage: ReductionStage, s: TokenState, metric: Tensor) -> None:
    """PiToMe (spec 10): energy-ordered matching on the keys (prefix tokens left out), isolated tokens protected
    in the later blocks, size-weighted merge. The sizes only weight the merges: PiToMe's DeiT patch has no
    proportional attention."""
    r = _merge_count(stage, s)
    if r > 0:
        plan = merge_ops.pitome_matching(metric, r, stage.margin, s.num_prefix, protect=stage.mode == "protect")
        _size_weighted(stage, s, plan, merge_ops.energy_wavg, merge_ops.energy_apply)


def _grid_coords(s: TokenState) -> Tensor:
    """(row, col) patch-grid positions of the current spatial tokens (fused tokens at -1, -1)."""
    ids = s.ids[:, s.num_prefix:] - s.num_prefix
    return torch.stack([ids.div(s.grid_width, rounding_mode="floor"), ids.remainder(s.grid_width)], dim=-1)


def _rollout_scores(model: VisionTransformer, x: Tensor) -> Tensor:
    """The full scoring pass of attention rollout: unreduced blocks with explicit attention maps."""
    attentions = []
    last = len(model.blocks) - 1
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        b, n, _ = h.shape
        q, k, v = _qkv(attn, h)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attentions.append(a)
        if i == last:  # the scores need only this attention map; the rest of the block feeds nothing
            break
        out = (a @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
        x = x + blk.ls1(attn.proj(attn.norm(out)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return ops.attention_rollout(attentions, model.num_prefix_tokens).detach()


# ----------------------------------------------------------------------------- apply / remove
def _patched_class(cls: type) -> type:
    """A subclass of the model's class with the reducing forward_features (one per original class)."""
    if issubclass(cls, TokenReductionMixin):
        return cls
    return type(f"TokenReduced{cls.__name__}", (TokenReductionMixin, cls), {"_tps_original_class": cls})


def apply(model: VisionTransformer, config: ReductionConfig | dict | str | Path,
          track_sources: bool = False, *, adapt: bool = False,
          gmacs: Callable[[ReductionConfig], float] | None = None) -> VisionTransformer:
    """Patch ``model`` in place to reduce tokens as ``config`` says, and return it.

    ``config`` may be a ReductionConfig, its dict, JSON text, or a path to a JSON file. A deployment config
    exported by ``tpsexplore export`` records the geometry it was searched on (``geometry``: patch and prefix
    tokens, depth, width, image size): on a model of another geometry `apply` refuses with one line naming both,
    unless ``adapt`` is true. Adapting keeps the keep ratios, rescales ToMe's r (and r_schedule) by the ratio of
    patch tokens, refuses locations beyond the model's depth, and warns one line with the new cost and its
    factor against the searched one (`Adaptation`, also kept as ``model.tps_adaptation``). ``gmacs`` counts a
    config's GMACs on this model for that line (`tpsexplore.apply` passes the analytic counter of
    `tpsexplore.measure.flops`, which sits above this layer); without it the line gives token counts only.
    A config without a recorded geometry (a plain ReductionConfig) applies as it is; a different backbone name
    on the same geometry gives a warning. Re-applying replaces the previous reduction.
    """
    data = _deployment_data(config)
    config, expected_backbone, searched, cost = _coerce_config(config if data is None else data)
    if not isinstance(model, VisionTransformer):
        from .patch_hier import apply_hier, check_stage_geometry, is_hierarchical_model

        if is_hierarchical_model(model):  # PVT v1/v2, CvT (reduce/patch_hier.py), Swin (patch_swin.py)
            if searched is not None:
                check_stage_geometry(model, data["geometry"], adapt)
            _warn_backbone(model, expected_backbone)
            return apply_hier(model, config, track_sources)
        raise ValueError(f"model: {type(model).__name__} is not a timm VisionTransformer or a supported "
                         "hierarchical backbone (PVT v1, PVT v2, CvT, Swin)")
    _check_supported(model)
    depth = len(model.blocks)
    p = model.num_prefix_tokens
    num_patches = model.patch_embed.num_patches
    adaptation = None
    if searched is not None:
        actual = model_geometry(model)
        if not same_geometry(searched, actual):
            if not adapt:
                raise ValueError(f"geometry: the config was searched on {describe_geometry(searched)}, the model is "
                                 f"{describe_geometry(actual)}; apply(model, config, adapt=True) rescales it (keep "
                                 "ratios kept, ToMe r scaled by the patch-token ratio)")
            adaptation = Adaptation(searched, actual, config, adapt_config(config, searched, actual),
                                    cost.get("gmacs"), cost.get("baseline_gmacs"))
            config = adaptation.config
    sched = token_schedule(config, num_patches=num_patches, num_prefix=p, depth=depth)  # validates the config
    check_merge_r(config, num_patches, depth)  # a ToMe r no block can merge is refused, not clamped silently
    if adaptation is not None:
        adaptation.tokens = (p + num_patches, sched.final_tokens)
        adaptation.searched_tokens = _final_tokens(adaptation.original, searched)
        if gmacs is not None:
            adaptation.gmacs = float(gmacs(config))
            adaptation.baseline_gmacs = float(gmacs(ReductionConfig()))
        warnings.warn(adaptation.describe(), stacklevel=2)
    else:
        _warn_backbone(model, expected_backbone)
    if config.squeeze_feature != "full" and (getattr(model, "pos_embed", None) is None
                                             or getattr(model, "dynamic_img_size", False)):
        raise ValueError(f"squeeze_feature: {config.squeeze_feature!r} needs a learned position embedding of "
                         "fixed size; this model has none (or resizes it per image); allowed here: 'full'")
    if isinstance(model, TokenReductionMixin):
        remove(model)
    spec = config.spec
    if spec is not None:
        if spec.policy == "merge":
            stages = {st.block: st for st in sched.stages}
            rs = config.merge_schedule(depth)
            for i, blk in enumerate(model.blocks):
                if rs[i] > 0:
                    st = stages.get(i)
                    blk.tps_stage = ReductionStage(i, st.kept if st else 0, rs[i], model.embed_dim, num_patches,
                                                   "merge", "merge", "intra")
        elif spec.count_rule in RATIO_RULES:  # ToFu, PiToMe: the blocks that remove tokens, with their mode
            for st in sched.stages:
                treatment = config.effective_treatment
                if spec.policy == "bipartite":  # ToFu: MLERP after depth // 2; up to it, drop (its own) or squeeze
                    if tofu_merges(st.block, depth):
                        treatment = "mlerp"
                    elif treatment == "mlerp":
                        treatment = "drop"
                stage = ReductionStage(st.block, st.kept, st.removed, model.embed_dim, num_patches, spec.policy,
                                       treatment, spec.placement)
                if spec.policy == "energy":
                    stage.mode = "protect" if pitome_protects(st.block, depth) else "bipartite"
                    stage.margin = pitome_margin(st.block, depth)
                model.blocks[st.block].tps_stage = stage
        else:
            stages = {st.block: st for st in sched.stages}
            for j, i in enumerate(config.locations):
                st = stages.get(i)
                if st is None:  # keep ratio 1 at this stage: it reduces nothing
                    continue
                stage = ReductionStage(i, st.kept, st.removed, model.embed_dim, num_patches, spec.policy,
                                       config.effective_treatment, spec.placement, config.seed)
                stage.target = math.prod(config.stage_keep_ratios[: j + 1])  # cumulative ratio-loss target
                model.blocks[i].tps_stage = stage
        ref = next(model.parameters())
        for blk in model.blocks:
            if hasattr(blk, "tps_stage"):
                blk.tps_stage.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    model.__class__ = _patched_class(type(model))
    model.tps_config = config
    model.tps_options = {"track_sources": track_sources}
    model.tps_schedule = sched
    if adaptation is not None:
        model.tps_adaptation = adaptation
    return model


def remove(model: VisionTransformer) -> VisionTransformer:
    """Undo `apply`: the original class, no added modules, outputs identical to the unpatched model."""
    if not isinstance(model, TokenReductionMixin):
        from .patch_hier import remove_hier

        return remove_hier(model)  # a hierarchical model (or an unpatched one, returned as it is)
    for blk in model.blocks:
        if hasattr(blk, "tps_stage"):
            del blk.tps_stage
    model.__class__ = model._tps_original_class
    for name in ("tps_config", "tps_options", "tps_schedule", "tps_last_info", "tps_adaptation"):
        if name in model.__dict__:
            delattr(model, name)
    return model


def last_info(model: VisionTransformer) -> ReductionInfo:
    """Bookkeeping of the last forward pass of a patched model."""
    info = getattr(model, "tps_last_info", None)
    if info is None:
        raise ValueError("model: no reduction info; apply() a config and run a forward pass first")
    return info


def ratio_loss(model: VisionTransformer) -> Tensor:
    """DynamicViT's ratio loss (unweighted, 1/S sum over learned stages) for the last training forward."""
    info = getattr(model, "tps_last_info", None)
    if info is None or not info.decisions:
        return next(model.parameters()).new_zeros(())
    return ops.ratio_loss_terms(info.decisions, info.keep_targets)


class track_sources:
    """Context manager: record which input patches each token holds (for keep maps and tests)."""

    def __init__(self, model: VisionTransformer) -> None:
        self.model = model

    def __enter__(self) -> VisionTransformer:
        self._old = self.model.tps_options.get("track_sources", False)
        self.model.tps_options["track_sources"] = True
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.tps_options["track_sources"] = self._old


def _check_supported(model: VisionTransformer) -> None:
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ValueError(f"model: block {i} is a {type(blk).__name__}; token reduction supports timm's Block")
        if not isinstance(blk.attn, Attention):
            raise ValueError(f"model: block {i} attention is a {type(blk.attn).__name__}; "
                             "token reduction supports timm's Attention")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("model: attention-pool heads are not supported")


def _warn_backbone(model: torch.nn.Module, expected_backbone: str | None) -> None:
    """Warn when a deployment config exported for one backbone name is applied to a model of another name."""
    if not expected_backbone:
        return
    actual_name = getattr(getattr(model, "tps_backbone", None), "timm_name", None) or \
        (getattr(model, "default_cfg", None) or {}).get("architecture")
    if actual_name and actual_name != expected_backbone:
        warnings.warn(f"backbone: the config was exported for {expected_backbone}, the model is {actual_name}",
                      stacklevel=3)


def _deployment_data(config) -> dict[str, Any] | None:
    """The parsed dict of whatever `apply` was given (a dict, JSON text or a JSON file), None for a
    ReductionConfig."""
    if isinstance(config, ReductionConfig):
        return None
    if isinstance(config, dict):
        return config
    text = str(config)
    source = "config"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"config: {text!r} does not exist")
        text, source = path.read_text(), text
    return parse_json(text, source)


def _coerce_config(config) -> tuple[ReductionConfig, str | None, Geometry | None, dict[str, float]]:
    """(config, backbone name, searched geometry, searched costs) of whatever `apply` was given; the last three
    only for a deployment config (a dict with ``reduction``)."""
    data = _deployment_data(config)
    if data is None:
        return config, None, None, {}
    backbone, geometry, cost = None, None, {}
    if isinstance(data.get("reduction"), dict):
        backbone = (data.get("backbone") or {}).get("timm_name") if isinstance(data.get("backbone"), dict) \
            else data.get("backbone")
        geometry = read_geometry(data.get("geometry"))
        for key in ("gmacs", "baseline_gmacs"):
            value = data.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
                cost[key] = float(value)
        data = data["reduction"]
    return ReductionConfig.from_dict(data), backbone, geometry, cost


# ----------------------------------------------------------------------------- geometry
GEOMETRY_KEYS = ("num_patches", "num_prefix", "depth", "width", "img_size")
"""What must match for a config to run as searched: patch and prefix tokens, depth, width, image size."""


def model_geometry(model: VisionTransformer) -> Geometry:
    """The `tpsexplore.manifest.Geometry` of a timm VisionTransformer (patched or not)."""
    pe = model.patch_embed
    head = getattr(model, "head", None)
    return Geometry(num_patches=int(pe.num_patches), num_prefix=int(model.num_prefix_tokens),
                    depth=len(model.blocks), width=int(model.embed_dim), img_size=int(pe.img_size[0]),
                    patch_size=int(pe.patch_size[0]), num_classes=int(getattr(head, "out_features", 0) or 0),
                    num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0)


def read_geometry(data: Any) -> Geometry | None:
    """The ``geometry`` of a deployment config (None when it records none); a malformed one is one line."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"geometry: {data!r} is not an object of {', '.join(f.name for f in fields(Geometry))}")
    values = {}
    for f in fields(Geometry):
        v = data.get(f.name, 0 if f.name not in GEOMETRY_KEYS else None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and f.name in GEOMETRY_KEYS
                                                                       and f.name != "num_prefix"):
            raise ValueError(f"geometry: field {f.name!r} is {v!r}, not a positive integer")
        values[f.name] = v
    return Geometry(**values)


def same_geometry(a: Geometry, b: Geometry) -> bool:
    """True when a config searched on ``a`` runs unchanged on ``b`` (`GEOMETRY_KEYS` agree)."""
    return all(getattr(a, k) == getattr(b, k) for k in GEOMETRY_KEYS)


def describe_geometry(g: Geometry) -> str:
    """``img 56 (49 patch + 1 prefix tokens), depth 4, width 64``: a geometry on one line."""
    return (f"img {g.img_size} ({g.num_patches} patch + {g.num_prefix} prefix tokens), depth {g.depth}, "
            f"width {g.width}")


def adapt_config(config: ReductionConfig, searched: Geometry, actual: Geometry) -> ReductionConfig:
    """``config`` searched on ``searched`` for a model of ``actual``: keep ratios as they are (they are relative),
    ToMe's r and r_schedule scaled by the patch-token ratio (r is an absolute count; at least 1 where it was
    positive), locations checked against the new depth. One-line ValueError when it cannot carry over."""
    depth = actual.depth
    where = f"searched on depth {searched.depth}; the model has {depth} blocks"
    if config.locations and max(config.locations) >= depth:
        raise ValueError(f"locations: {list(config.locations)} reach beyond the model's depth ({where}); allowed "
                         f"0..{depth - 1}, so this config cannot be adapted")
    if config.spec is None or config.spec.policy != "merge":
        return config
    ratio = actual.num_patches / searched.num_patches

    def scale(r: int) -> int:
        return 0 if r <= 0 else max(1, int(math.floor(r * ratio + 0.5)))

    if config.r_schedule:
        if len(config.r_schedule) != depth:
            raise ValueError(f"r_schedule: has {len(config.r_schedule)} entries, one per searched block ({where}); "
                             "it cannot be adapted to another depth")
        return config.with_(r_schedule=tuple(scale(r) for r in config.r_schedule))
    return config.with_(r=scale(config.r))


def _final_tokens(config: ReductionConfig, g: Geometry) -> int:
    return token_schedule(config, g.num_patches, g.num_prefix, g.depth).final_tokens


@dataclass
class Adaptation:
    """What ``apply(model, config, adapt=True)`` changed: the searched and the model's geometry, the config as
    searched and as it now runs, the tokens (input, final) on both, and the GMACs: searched (from the deployment
    config) and now (when counted), each with its unreduced baseline."""

    searched: Geometry
    actual: Geometry
    original: ReductionConfig
    config: ReductionConfig
    searched_gmacs: float | None = None
    searched_baseline_gmacs: float | None = None
    gmacs: float | None = None
    baseline_gmacs: float | None = None
    tokens: tuple[int, int] = (0, 0)
    searched_tokens: int = 0

    @property
    def factor(self) -> float | None:
        """GMACs now / GMACs searched (None when either is unknown)."""
        if self.gmacs is None or not self.searched_gmacs:
            return None
        return self.gmacs / self.searched_gmacs

    def describe(self) -> str:
        """The one warning line."""
        line = (f"geometry: adapted {self.original.label!r} searched on {describe_geometry(self.searched)} to the "
                f"model's {describe_geometry(self.actual)} as {self.config.label!r}: {self.tokens[0]} -> "
                f"{self.tokens[1]} tokens (searched {self.searched.num_patches + self.searched.num_prefix} -> "
                f"{self.searched_tokens})")
        if self.gmacs is not None:
            line += f"; {self.gmacs:.4g} GMACs"
            if self.baseline_gmacs:
                line += f" = {self.gmacs / self.baseline_gmacs:.2f}x this model's baseline"
            if self.factor is not None:
                line += f", {self.factor:.3g}x the searched {self.searched_gmacs:.4g} GMACs"
                if self.searched_baseline_gmacs:
                    line += f" ({self.searched_gmacs / self.searched_baseline_gmacs:.2f}x its baseline)"
        return line
