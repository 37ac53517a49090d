"""The thin patch layer for Swin (timm ``SwinTransformer``): token reduction in its two grid-keeping forms.

Which form runs where, and every block's token counts, is `swin_schedule`'s docstring; the MAC count is
`tpsexplore.measure.hier_flops.swin_reduced_macs`. `apply_swin` swaps the model's class for a subclass whose
``forward_features`` runs each stage's blocks: a block that reduces nothing runs timm's own forward (so a zero
reduction is bit-identical to the unpatched model); the others run here:

* **cheap form** (DynamicSwin): at a location the stage's tokens are scored (predictor: log p(keep) from the
  DynamicViT predictor with a plain mean as its global half, as DynamicSwin has it; random: a fixed seeded ranking
  of the grid), the top K kept, the rest split off (gather with a fixed count: no boolean indexing); dTPS squeezes
  the others into the kept tokens there. In each block up to the next location: timm's dense window attention and
  its residual, then ``MLP(LN2(x))`` on the kept tokens and ``fastMlp(x)`` (`FastMlp`) on the others, each added
  to its own tokens and scattered back into the grid.
* **window form**: at a location the grid gets a score map (predictor or random as above, or minus the mean
  similarity of the current tokens; 'pre' similarity pruning scores the patch embeddings once and max-pools the
  map 2 x 2 into each later stage). Each reducing block rolls
  and partitions the grid and the score map as timm does, keeps the top c tokens of every window (gather), runs
  norm1, qkv, attention with the kept pairs' relative-position bias plus shift mask, proj, norm2 and the MLP on
  them, scatters them back into their windows (pruned tokens: unchanged) and reverses the partition and the roll.

Training with the learned predictor keeps every token: a hard Gumbel keep mask (DynamicViT's ratio loss; target
k, not cumulative, in the cheap form, as DynamicSwin's) gates the block's updates, ``m * MLP + (1 - m) * fastMlp``
in the cheap form, and ``m * update`` in the window form (pruned tokens frozen, the eval form's semantics without
its equal counts per window). Random and similarity pruning train on the eval path.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ReductionConfig
from .modules import ReductionStage
from .patch import ReductionInfo, _coerce_config
from .swin_schedule import SwinSchedule, SwinStageTokens, swin_token_schedule

Tensor = torch.Tensor


class FastMlp(nn.Module):
    """DynamicSwin's fast path for the tokens its scorer does not keep: LayerNorm + Linear C -> C (the caller adds
    the residual). The Linear starts at zero, so a fresh fast path is the identity (x + 0): an untrained cheap form
    skips the MLP for those tokens instead of adding noise, and fine-tuning grows the path from there."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


def swin_stages(model: nn.Module) -> tuple[SwinStageTokens, ...]:
    """The `SwinStageTokens` of a timm Swin: each stage's grid, window (timm's, clamped to the grid) and blocks."""
    out, first = [], 0
    for layer in model.layers:
        blocks = list(layer.blocks)
        out.append(SwinStageTokens(tuple(int(v) for v in layer.output_resolution),
                                   tuple(int(v) for v in blocks[0].window_size), len(blocks), first))
        first += len(blocks)
    return tuple(out)


# ----------------------------------------------------------------------------- scoring
def _scores(stage: ReductionStage, flat: Tensor, cfg: ReductionConfig) -> Tensor:
    """Keep scores (B, N) of a stage's tokens (B, N, C) at a location: predictor log p(keep), minus the mean
    similarity (layerwise similarity pruning) or the random ranking."""
    if stage.policy == "predictor":
        return stage.predictor(flat)[..., 0]
    if stage.policy == "similarity":
        return -ops.redundancy_linear(flat, cfg.similarity_metric)
    return stage.random_scores.to(flat.dtype).unsqueeze(0).expand(flat.shape[0], -1)


def _pool_scores(score: Tensor) -> Tensor:
    """A score map (B, H, W) carried through a patch merging: the max of each 2 x 2 cell (odd sides padded)."""
    b, h, w = score.shape
    if h % 2 or w % 2:
        score = F.pad(score, (0, w % 2, 0, h % 2), value=-math.inf)
    return score.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2).amax(dim=(2, 4))


# ----------------------------------------------------------------------------- blocks
def _cheap_block(blk: nn.Module, x: Tensor, keep: Tensor, rest: Tensor) -> Tensor:
    """DynamicSwin's block (eval): dense window attention, full MLP on ``keep``, fast path on ``rest``."""
    b, h, w, c = x.shape
    x = x + blk.drop_path1(blk._attn(blk.norm1(x)))
    flat = x.reshape(b, h * w, c)
    kept = ops.gather_tokens(flat, keep)
    kept = kept + blk.drop_path2(blk.mlp(blk.norm2(kept)))
    others = ops.gather_tokens(flat, rest)
    others = others + blk.tps_fast(others)
    flat = flat.scatter(1, keep.unsqueeze(-1).expand(-1, -1, c), kept)
    flat = flat.scatter(1, rest.unsqueeze(-1).expand(-1, -1, c), others)
    return flat.view(b, h, w, c)


def _masked_block(blk: nn.Module, x: Tensor, mask: Tensor, cheap: bool) -> Tensor:
    """Training with a learned predictor: every token runs, the (B, N) keep mask gates the updates."""
    b, h, w, c = x.shape
    m = mask.to(x.dtype).view(b, h, w, 1)
    attn = blk.drop_path1(blk._attn(blk.norm1(x)))
    x = x + (attn if cheap else attn * m)
    update = blk.drop_path2(blk.mlp(blk.norm2(x)))
    if cheap:
        return x + update * m + blk.tps_fast(x) * (1.0 - m)
    return x + update * m


def _window_bias(blk: nn.Module) -> Tensor:
    """The block's attention bias per window (nW or 1, heads, A, A): relative position bias plus shift mask."""
    bias = blk.attn._get_rel_pos_bias()  # (1, heads, A, A)
    if blk.attn_mask is not None:
        bias = bias + blk.attn_mask.unsqueeze(1).to(bias.dtype)
    return bias


def _window_block(blk: nn.Module, x: Tensor, score: Tensor, per_window: int) -> Tensor:
    """One block on the top ``per_window`` tokens of each of its windows by ``score`` (B, H, W); the others stay."""
    b, h, w, c = x.shape
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    area = wh * ww
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        score = torch.roll(score, shifts=(-sh, -sw), dims=(1, 2))
    nw = (h // wh) * (w // ww)
    win = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, area, c)
    sw_ = score.view(b, h // wh, wh, w // ww, ww).permute(0, 1, 3, 2, 4).reshape(b * nw, area)
    idx = sw_.topk(per_window, dim=1).indices  # (B nW, c)
    t = ops.gather_tokens(win, idx)
    attn = blk.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(blk.norm1(t)).reshape(b * nw, per_window, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = _window_bias(blk).unsqueeze(0).expand(b, nw, heads, area, area)
    ix = idx.view(b, nw, 1, per_window, 1)
    bias = bias.gather(3, ix.expand(b, nw, heads, per_window, area))
    bias = bias.gather(4, ix.transpose(3, 4).expand(b, nw, heads, per_window, per_window))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(b * nw, heads, per_window, per_window),
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b * nw, per_window, -1)))
    t = t + blk.drop_path1(out)
    t = t + blk.drop_path2(blk.mlp(blk.norm2(t)))
    win = win.scatter(1, idx.unsqueeze(-1).expand(-1, -1, c), t)
    x = win.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x


# ----------------------------------------------------------------------------- one stage
def _run_stage(blocks: nn.Module, x: Tensor, first: int, sched: SwinSchedule, cfg: ReductionConfig,
               training: bool, info: ReductionInfo, score: Tensor | None) -> Tensor:
    """Run one stage's blocks with its reductions (module docstring); ``score``: the similarity map, if any."""
    b, h, w, c = x.shape
    n = h * w
    cheap = sched.form == "cheap"
    split: tuple[Tensor, Tensor] | None = None  # cheap form: (kept, others) indices
    mask: Tensor | None = None  # training with a predictor: the keep mask
    for j, blk in enumerate(blocks):
        g = first + j
        stage = getattr(blk, "tps_stage", None)
        if stage is not None:
            flat = x.reshape(b, n, c)
            if training and stage.policy == "predictor":
                log_probs = stage.predictor(flat)
                mask = ops.gumbel_keep(log_probs)
                info.decisions.append(mask)
                info.keep_targets.append(stage.target)
                if stage.treatment == "squeeze":
                    x = ops.squeeze_masked(flat, mask, 1.0 - mask, cfg.temperature).view(b, h, w, c)
            else:
                scores = _scores(stage, flat, cfg)
                if cheap:
                    keep, rest = ops.split_by_score(scores, stage.kept)
                    if stage.treatment == "squeeze":
                        kept = ops.squeeze(ops.gather_tokens(flat, keep), ops.gather_tokens(flat, rest),
                                           cfg.temperature)[0]
                        x = flat.scatter(1, keep.unsqueeze(-1).expand(-1, -1, c), kept).view(b, h, w, c)
                    split = (keep, rest)
                else:
                    score = scores.view(b, h, w)
        nq, nm = sched.blocks[g]
        if (nq, nm) == (n, n):
            x = blk(x)  # timm's own block: nothing reduced here
        elif mask is not None:
            x = _masked_block(blk, x, mask, cheap)
        elif cheap:
            x = _cheap_block(blk, x, *split)
        else:
            x = _window_block(blk, x, score, sched.per_window[g])
        info.token_counts.append((nq, nm))
    return x


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """timm Swin's forward_features with each stage's blocks run by `_run_stage`."""
    cfg: ReductionConfig = model.tps_config
    sched: SwinSchedule = model.tps_schedule
    info = ReductionInfo()
    x = model.patch_embed(x)  # (B, H, W, C)
    score = None
    if cfg.spec is not None and cfg.spec.policy == "similarity" and cfg.similarity_placement == "pre" \
            and sched.reductions:
        b, h, w, c = x.shape
        score = -ops.redundancy_linear(x.reshape(b, h * w, c), cfg.similarity_metric).view(b, h, w)
    first = 0
    for i, layer in enumerate(model.layers):
        x = layer.downsample(x)
        if score is not None and i > 0:
            score = _pool_scores(score)
        x = _run_stage(layer.blocks, x, first, sched, cfg, model.training, info, score)
        first += len(layer.blocks)
    model.tps_last_info = info
    return model.norm(x)


class SwinReductionMixin:
    """Mixed into the patched Swin's class; ``tps_config`` and ``tps_schedule`` are set by `apply_swin`."""

    def forward_features(self, x: Tensor) -> Tensor:
        return _forward(self, x)


def _patched_class(cls: type) -> type:
    if issubclass(cls, SwinReductionMixin):
        return cls
    return type(f"TokenReduced{cls.__name__}", (SwinReductionMixin, cls), {"_tps_original_class": cls})


# ----------------------------------------------------------------------------- apply / remove
def swin_schedule_of(model: nn.Module, config: ReductionConfig) -> SwinSchedule:
    """The token schedule of ``config`` on a Swin ``model`` (validated; one-line ValueError when it cannot run)."""
    return swin_token_schedule(config, swin_stages(model))


def apply_swin(model: nn.Module, config, track_sources: bool = False) -> nn.Module:
    """Patch a timm Swin in place to reduce tokens as ``config`` says (`swin_schedule`); source tracking is
    refused. Adds a `ReductionStage` (``blk.tps_stage``) at each reducing location and, in the cheap form, a
    `FastMlp` (``blk.tps_fast``) to each block whose MLP runs on fewer tokens."""
    config = _coerce_config(config)[0]
    if track_sources:
        raise ValueError("track_sources: source tracking is not supported on hierarchical backbones")
    if any(getattr(blk, "dynamic_mask", False) for layer in model.layers for blk in layer.blocks):
        raise ValueError("model: token reduction does not support Swin's dynamic_mask; allowed: the default "
                         "precomputed shift mask")
    sched = swin_schedule_of(model, config)
    if isinstance(model, SwinReductionMixin):
        remove_swin(model)
    blocks = [blk for layer in model.layers for blk in layer.blocks]
    spec = config.spec
    for red, target in zip(sched.reductions, sched.targets):
        if spec.policy == "similarity" and config.similarity_placement == "pre":
            continue  # scored once on the patch embeddings: no module
        st = sched.stages[sched.stage_of(red.block)]
        stage = ReductionStage(red.block, red.kept, red.removed, blocks[red.block].norm1.normalized_shape[0],
                               st.num_spatial, spec.policy, config.effective_treatment, "inter", config.seed)
        stage.target = target
        blocks[red.block].tps_stage = stage
    if sched.form == "cheap":
        for g, blk in enumerate(blocks):
            if sched.blocks[g][1] < sched.stages[sched.stage_of(g)].num_spatial:
                blk.tps_fast = FastMlp(blk.norm1.normalized_shape[0])
    ref = next(model.parameters())
    for blk in blocks:
        for name in ("tps_stage", "tps_fast"):
            if hasattr(blk, name):
                getattr(blk, name).to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    model.__class__ = _patched_class(type(model))
    model.tps_config = config
    model.tps_family = "swin"
    model.tps_stages = sched.stages
    model.tps_schedule = sched
    model.tps_options = {"track_sources": False}
    return model


def remove_swin(model: nn.Module) -> nn.Module:
    """Undo `apply_swin`: the original class, no added modules, outputs identical to the unpatched model."""
    if not isinstance(model, SwinReductionMixin):
        return model
    for layer in model.layers:
        for blk in layer.blocks:
            for name in ("tps_stage", "tps_fast"):
                if hasattr(blk, name):
                    delattr(blk, name)
    model.__class__ = model._tps_original_class
    for name in ("tps_config", "tps_family", "tps_stages", "tps_schedule", "tps_options", "tps_last_info"):
        if name in model.__dict__:
            delattr(model, name)
    return model
