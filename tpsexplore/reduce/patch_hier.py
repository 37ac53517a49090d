"""The thin patch layer for hierarchical backbones: token reduction on PVT v1, PVT v2 and CvT (issue 13, spec 13.2).

`apply_hier` swaps the model's class for a subclass whose ``forward_features`` runs each stage either with the
stage's own modules (no reduction in it: bit-identical to the unpatched model) or through `_run_stage`, which
carries a `patch.TokenState` through the blocks and reduces at the blocks holding a `ReductionStage`
(``blk.tps_stage``), reusing the ViT layer's selection, squeeze and merge steps. Which stages reduce, in which
form (physical removal, or keep-the-grid with frozen pruned slots) and by which count rule is
`hier_schedule`'s docstring; the MAC count is `tpsexplore.measure.hier_flops.hier_reduced_macs`.

Per block in the keep-the-grid form (after the stage's first reduction): dense = the frozen grid with the live
tokens scattered back; h = norm1(dense); K/V from h (PVT: SR conv + LayerNorm + kv; CvT: strided depthwise convs +
BatchNorm + proj_k/v, class token in front); q for the live rows only (PVT: q(h[live]); CvT: the stride-1 depthwise
conv runs on the dense grid, then proj_q on the live rows); attention, proj, norm2 and the MLP on the live tokens.
Training with a learned predictor keeps every token and multiplies each residual update by the keep mask, so
pruned tokens are frozen there too (the grid form's eval semantics), while the physical stage trains with
DynamicViT's masked attention as the ViTs do.

PVT v2 (timm ``pvt_v2_*``; no class token, every stage keeps the grid) adds a depthwise 3x3 conv inside every MLP
(``MlpWithDepthwiseConv``: fc1, dwconv on the H x W grid, GELU, fc2). Its cheap path: the live tokens run norm2 and
fc1; their hidden rows are scattered into a hidden grid whose pruned slots are **zero** (a frozen token contributes
nothing to its neighbours' convolution, as the zero padding at the border does); the dwconv runs densely over that
grid (9 MACs per hidden channel and slot: 9 / C of fc1's cost, so a gather of 3 x 3 neighbourhoods per live token
would not pay); the live rows are gathered back for the activation and fc2. Zero, not a cached fc1 value, because
fc1 differs per block: caching would cost the dense fc1 this path saves. Training with a learned predictor
multiplies the hidden grid by the keep mask, the same zeros. Linear SRA (``pvt_v2_*_li``) is refused.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ConvolutionalVisionTransformer, PyramidVisionTransformerV1
from . import ops
from .config import ReductionConfig
from .hier_schedule import HierStageTokens, StagedBlocks, check_hier_merge_r, hier_token_schedule, is_physical
from .modules import ReductionStage
from .patch import ReductionInfo, TokenState, _coerce_config, _merge, _reduce_inter, _reduce_select

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- families
def family_of(model: nn.Module) -> str:
    """'pvt_v1', 'cvt', 'swin' or 'pvt_v2' for a hierarchical backbone; ValueError for anything else."""
    if isinstance(model, PyramidVisionTransformerV1):
        return "pvt_v1"
    if isinstance(model, ConvolutionalVisionTransformer):
        return "cvt"
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, PyramidVisionTransformerV2):
        return "pvt_v2"
    raise ValueError(f"model: {type(model).__name__} is not a hierarchical backbone")


def is_hierarchical_model(model: nn.Module) -> bool:
    try:
        family_of(model)
    except ValueError:
        return False
    return True


def stage_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The blocks of every stage, in order (PVT ``block{s}``, CvT ``stage{i}.blocks``, PVT v2
    ``stages.{i}.blocks``)."""
    if isinstance(model, PyramidVisionTransformerV1):
        return [getattr(model, f"block{i + 1}") for i in range(model.num_stages)]
    if family_of(model) == "pvt_v2":
        return [stage.blocks for stage in model.stages]
    return [getattr(model, f"stage{i}").blocks for i in range(model.num_stages)]


def _pvt_v2_grids(model: nn.Module) -> list[tuple[int, int]]:
    """Each stage's token grid of a PVT v2 at the input size its ``pretrained_cfg`` names (224 by default; set by
    `backbones.build_timm_model`'s img_size); refuses linear SRA with one line."""
    if any(blk.attn.pool is not None for stage in model.stages for blk in stage.blocks):
        raise ValueError("model: token reduction does not support PVT v2's linear spatial-reduction attention "
                         "(pvt_v2_*_li); allowed: pvt_v2_b0..b5")
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:])
    out = []
    for i, stage in enumerate(model.stages):
        conv = (model.patch_embed if i == 0 else stage.downsample).proj
        size = tuple((size[d] + 2 * conv.padding[d] - conv.kernel_size[d]) // conv.stride[d] + 1 for d in range(2))
        out.append(size)
    return out


def hier_stages(model: nn.Module) -> tuple[HierStageTokens, ...]:
    """The `HierStageTokens` of a PVT v1, PVT v2 or CvT model (grid cells, class tokens, blocks, reduction form)."""
    family = family_of(model)
    if family not in ("pvt_v1", "cvt", "pvt_v2"):
        return ()
    grids = _pvt_v2_grids(model) if family == "pvt_v2" else model.grids
    out, first = [], 0
    for i, blocks in enumerate(stage_blocks(model)):
        gh, gw = grids[i]
        if family == "pvt_v2":
            prefix, sr = 0, 0
        elif family == "pvt_v1":
            prefix, sr = (1 if i == model.num_stages - 1 else 0), model.config.sr_ratios[i]
        else:
            prefix, sr = (1 if model.config.cls_token[i] else 0), 0
        out.append(HierStageTokens(gh * gw, prefix, len(blocks), first, is_physical(family, sr, prefix)))
        first += len(blocks)
    return tuple(out)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _pvt_kv(attn: nn.Module, h: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """PVT SRA keys/values (B, heads, Nk, d) from the dense normed tokens: SR conv + LayerNorm where r > 1."""
    b, n, c = h.shape
    src = h
    if attn.sr is not None:
        src = attn.norm(attn.sr(h.transpose(1, 2).reshape(b, c, size[0], size[1])).flatten(2).transpose(1, 2))
    k, v = attn.kv(src).view(b, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


def _pvt_q(attn: nn.Module, h: Tensor, size: tuple[int, int], ids: Tensor | None) -> Tensor:
    """PVT queries of the rows ``ids`` (B, K) of the dense normed tokens (all rows for None)."""
    return _heads(attn.q(h if ids is None else ops.take_rows(h, ids)), attn.num_heads)


def _cvt_grid(attn: nn.Module, h: Tensor, size: tuple[int, int]) -> Tensor:
    b, _, c = h.shape
    return h[:, attn.num_prefix:].transpose(1, 2).reshape(b, c, size[0], size[1])


def _with_prefix(attn: nn.Module, h: Tensor, t: Tensor) -> Tensor:
    return torch.cat([h[:, :attn.num_prefix], t], dim=1) if attn.num_prefix else t


def _cvt_kv(attn: nn.Module, h: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """CvT keys/values from the dense grid: strided depthwise conv + BN, class token in front, then proj_k/v."""
    grid = _cvt_grid(attn, h, size)
    k = _with_prefix(attn, h, attn.conv_proj_k(grid))
    v = _with_prefix(attn, h, attn.conv_proj_v(grid))
    return _heads(attn.proj_k(k), attn.num_heads), _heads(attn.proj_v(v), attn.num_heads)


def _cvt_q(attn: nn.Module, h: Tensor, size: tuple[int, int], ids: Tensor | None) -> Tensor:
    """CvT queries: the stride-1 depthwise conv + BN on the dense grid, then proj_q on the rows ``ids`` only."""
    q = _with_prefix(attn, h, attn.conv_proj_q(_cvt_grid(attn, h, size)))
    return _heads(attn.proj_q(q if ids is None else ops.take_rows(q, ids)), attn.num_heads)


_KV = {"pvt_v1": _pvt_kv, "pvt_v2": _pvt_kv, "cvt": _cvt_kv}
_Q = {"pvt_v1": _pvt_q, "pvt_v2": _pvt_q, "cvt": _cvt_q}


def _drop_path(blk: nn.Module, i: int) -> nn.Module:
    """The block's i-th stochastic depth (timm PVT v2: ``drop_path1/2``; PVT v1, CvT: one ``drop_path``)."""
    return getattr(blk, f"drop_path{i}") if hasattr(blk, f"drop_path{i}") else blk.drop_path


class _Scratch:
    """One forward's reusable memory for PVT v2's hidden grids (`_mlp`). Without autograd every block writes its
    grid into the same buffer (zeroed in place): on CPU a fresh (B, N, hidden) tensor per block costs its page
    faults, about 14% of the reduced model's time (pvt_v2_b1, 224, batch 8, one CPU thread). While autograd records, the
    conv keeps its input for the backward pass, so each block gets its own tensor."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def take(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat buffer of at least ``numel`` elements of ``like``'s dtype and device; None under autograd."""
        if torch.is_grad_enabled():
            return None
        buf = self.buf
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self.buf = buf = like.new_empty(numel)
        return buf


def _mlp(blk: nn.Module, x: Tensor, s: TokenState, size: tuple[int, int], canvas: Tensor | None,
         gate: Tensor | None, scratch: _Scratch | None) -> Tensor:
    """The MLP update of the live tokens ``x``. PVT v2's depthwise-conv MLP runs its cheap path (module
    docstring): fc1 on the live rows, a zero-filled hidden grid (scatter, or the keep mask while training) for the
    dense dwconv, the live rows gathered back for the activation and fc2."""
    mlp = blk.mlp
    if not hasattr(mlp, "dwconv"):
        return mlp(blk.norm2(x))
    h = mlp.fc1(blk.norm2(x))
    b, n, hid = h.shape
    if canvas is not None:  # live rows into a zero grid (pruned slots: zero)
        numel = b * canvas.shape[1] * hid
        h = ops.rows_on_zeros(s.ids, h, canvas.shape[1], scratch.take(numel, h) if scratch is not None else None)
    elif gate is not None:  # training: the same zeros through the keep mask
        h = h * gate.unsqueeze(-1).to(h.dtype)
    h = mlp.dwconv(mlp.relu(h.transpose(1, 2).reshape(b, hid, size[0], size[1]))).flatten(2).transpose(1, 2)
    if canvas is not None:
        h = ops.take_rows(h, s.ids)
    return mlp.drop(mlp.fc2(mlp.drop(mlp.act(h))))


def _scale(family: str, attn: nn.Module) -> float:
    return attn.scale if family == "cvt" else attn.head_dim ** -0.5


# ----------------------------------------------------------------------------- one stage
def _dense(s: TokenState, canvas: Tensor | None) -> Tensor:
    """Every slot of the stage: the live tokens scattered over the frozen ``canvas`` (the live set when None)."""
    if canvas is None:
        return s.x
    return ops.put_rows(canvas, s.ids, s.x)


def _run_stage(family: str, blocks: nn.ModuleList, x: Tensor, size: tuple[int, int], st: HierStageTokens,
               cfg: ReductionConfig, training: bool, info: ReductionInfo, scratch: _Scratch | None = None) -> Tensor:
    """Run one stage's blocks with its reductions. Returns the grid form's dense tokens (every slot, class token
    first), or the physical stage's remaining tokens."""
    stages = [getattr(blk, "tps_stage", None) for blk in blocks]
    if all(r is None for r in stages):  # nothing reduces here: the stage's own blocks, bit for bit
        for blk in blocks:
            x = blk(x, size)
            info.token_counts.append((x.shape[1], x.shape[1]))
        return x
    b, n, _ = x.shape
    p = st.num_prefix
    s = TokenState(x=x, ids=torch.arange(n, device=x.device).expand(b, n), num_prefix=p, grid_width=size[1],
                   info=info)
    canvas: Tensor | None = None  # grid form: every slot, pruned ones frozen (None while all are live)
    for blk, stage in zip(blocks, stages):
        canvas = _block(family, blk, s, stage, cfg, training, size, st.physical, canvas, scratch)
    if s.mask is not None and st.physical:
        info.keep_mask = torch.cat([s.mask.new_ones(b, p), s.mask], dim=1)
    info.token_ids = s.ids
    return s.x if st.physical else _dense(s, canvas)


def _block(family: str, blk: nn.Module, s: TokenState, stage: ReductionStage | None, cfg: ReductionConfig,
           training: bool, size: tuple[int, int], physical: bool, canvas: Tensor | None,
           scratch: _Scratch | None = None) -> Tensor | None:
    """One block with its reduction (before it, or between attention and MLP); returns the new canvas."""
    p = s.num_prefix
    if stage is not None and stage.placement == "inter":
        if not physical and not (training and stage.policy == "predictor"):
            canvas = _dense(s, canvas)  # the pruned tokens stay in the grid with their current values
        _reduce_inter(stage, s, cfg, training)
    need_cls = stage is not None and stage.policy == "cls_attn"
    need_metric = stage is not None and stage.policy == "merge"
    prop = s.size is not None and cfg.prop_attn
    if canvas is None and not (need_cls or need_metric or prop or s.mask is not None):
        s.x = blk(s.x, size)  # the block's own forward: every token live, nothing to collect
        s.info.token_counts.append((s.x.shape[1], s.x.shape[1]))
        return canvas
    attn = blk.attn
    dense = _dense(s, canvas)
    h = blk.norm1(dense)
    k, v = _KV[family](attn, h, size)
    q = _Q[family](attn, h, size, None if canvas is None else s.ids)
    scale = _scale(family, attn)
    bias = s.size.log()[:, None, None, :, 0].to(q.dtype) if prop else None
    gate = None
    if s.mask is not None:
        gate = torch.cat([s.mask.new_ones(s.mask.shape[0], p), s.mask], dim=1)
    if gate is not None and physical:  # DynamicViT training: nobody attends to a dropped token
        out = ops.masked_attention(q, k, v, gate, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    cls_scores = ops.class_attention(q, k, scale, bias)[:, p:] if need_cls else None
    metric = k.mean(dim=1) if need_metric else None
    b, nq = q.shape[0], q.shape[2]
    out = attn.proj(out.transpose(1, 2).reshape(b, nq, -1))
    frozen = gate.unsqueeze(-1).to(out.dtype) if gate is not None and not physical else None
    dp1, dp2 = _drop_path(blk, 1), _drop_path(blk, 2)
    s.x = s.x + (dp1(out) if frozen is None else dp1(out) * frozen)
    if need_cls:
        _reduce_select(stage, s, cls_scores, cfg)
    elif need_metric:
        _merge(stage, s, metric)
    s.info.token_counts.append((nq, s.x.shape[1]))
    update = dp2(_mlp(blk, s.x, s, size, canvas, gate, scratch))
    s.x = s.x + (update if frozen is None else update * frozen)
    return canvas


# ----------------------------------------------------------------------------- forward of each family
def _pvt_forward(model: PyramidVisionTransformerV1, x: Tensor) -> Tensor:
    """PVT v1's forward_features with each stage run by `_run_stage`."""
    cfg: ReductionConfig = model.tps_config
    info = ReductionInfo()
    b = x.shape[0]
    tokens = x
    for i, st in enumerate(model.tps_stages):
        tokens, size = getattr(model, f"patch_embed{i + 1}")(x)
        last = i == model.num_stages - 1
        if last:
            tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = getattr(model, f"pos_drop{i + 1}")(tokens + model._pos_embed(i, size))
        tokens = _run_stage("pvt_v1", getattr(model, f"block{i + 1}"), tokens, size, st, cfg, model.training, info)
        if not last:
            x = tokens.transpose(1, 2).reshape(b, -1, size[0], size[1])
    model.tps_last_info = info
    return model.norm(tokens)


def _cvt_forward(model: ConvolutionalVisionTransformer, x: Tensor) -> Tensor:
    """CvT's forward_features with each stage run by `_run_stage` (a stage without reductions runs itself)."""
    cfg: ReductionConfig = model.tps_config
    info = ReductionInfo()
    cls = None
    for i, st in enumerate(model.tps_stages):
        stage = getattr(model, f"stage{i}")
        b = x.shape[0]
        tokens, size = stage.patch_embed(x)
        if stage.cls_token is not None:
            tokens = torch.cat([stage.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = _run_stage("cvt", stage.blocks, stage.pos_drop(tokens), size, st, cfg, model.training, info)
        p = stage.num_prefix
        cls = tokens[:, :p] if p else None
        x = tokens[:, p:].transpose(1, 2).reshape(b, -1, size[0], size[1])
    model.tps_last_info = info
    if cls is not None:
        return model.norm(cls)[:, 0]
    return model.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)


def _pvt_v2_forward(model: nn.Module, x: Tensor) -> Tensor:
    """timm PVT v2's forward_features (B, C, H, W out) with each stage's blocks run by `_run_stage`."""
    cfg: ReductionConfig = model.tps_config
    info = ReductionInfo()
    x = model.patch_embed(x)  # (B, H, W, C)
    scratch = _Scratch()
    for i, (stage, st) in enumerate(zip(model.stages, model.tps_stages)):
        if stage.downsample is not None:
            x = stage.downsample(x)
        b, h, w, c = x.shape
        if h * w != st.num_spatial:
            raise ValueError(f"x: stage {i} has a {h}x{w} grid, the reduction was applied for {st.num_spatial} "
                             "tokens (the model's pretrained_cfg input_size); build it with that img_size")
        tokens = _run_stage("pvt_v2", stage.blocks, x.reshape(b, -1, c), (h, w), st, cfg, model.training, info,
                            scratch)
        x = stage.norm(tokens).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    model.tps_last_info = info
    return x


_FORWARD = {"pvt_v1": _pvt_forward, "cvt": _cvt_forward, "pvt_v2": _pvt_v2_forward}


class HierReductionMixin:
    """Mixed into the patched model's class; ``tps_config``, ``tps_family`` and ``tps_stages`` are set by
    `apply_hier`."""

    def forward_features(self, x: Tensor) -> Tensor:
        return _FORWARD[self.tps_family](self, x)


def _patched_class(cls: type) -> type:
    if issubclass(cls, HierReductionMixin):
        return cls
    return type(f"TokenReduced{cls.__name__}", (HierReductionMixin, cls), {"_tps_original_class": cls})


# ----------------------------------------------------------------------------- apply / remove
def hier_schedule_of(model: nn.Module, config: ReductionConfig) -> StagedBlocks:
    """The token schedule of ``config`` on ``model`` (validated; one-line ValueError when it cannot run): a
    `HierSchedule` (PVT v1/v2, CvT) or Swin's (`patch_swin.swin_schedule_of`); ``.counts()`` gives (query
    tokens, MLP tokens) per global block."""
    if family_of(model) == "swin":
        from .patch_swin import swin_schedule_of

        return swin_schedule_of(model, config)
    return hier_token_schedule(config, hier_stages(model), family_of(model))


# ----------------------------------------------------------------------------- deployment geometry
def stage_geometry(model: nn.Module) -> dict[str, Any]:
    """``{"family", "img_size", "stages": [{"tokens", "num_prefix", "depth", "width"}, ...]}`` of a
    hierarchical backbone (PVT v1/v2, CvT, Swin; any device, meta included): the token grid cells, class tokens,
    blocks and width of each stage, which a config searched on it needs to run unchanged (its locations are global
    block indices, its counts per stage). A deployment config records it beside the manifest's geometry."""
    family = family_of(model)
    if family == "swin":
        from .patch_swin import swin_stages

        stages, blocks = swin_stages(model), [layer.blocks for layer in model.layers]
    else:
        stages, blocks = hier_stages(model), stage_blocks(model)
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None) or \
        (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"family": family, "img_size": h if h == w else [h, w],  # an int when square, as the manifest's
            "stages": [{"tokens": int(st.num_spatial), "num_prefix": int(st.num_prefix), "depth": int(st.depth),
                        "width": int(blk[0].norm1.normalized_shape[0])} for st, blk in zip(stages, blocks)]}


def describe_stage_geometry(g: dict[str, Any]) -> str:
    """``pvt_v1 img 64x64, stages 256/64/16/4+1 tokens, depths 1-1-2-2, widths 16/32/48/64``: one line."""
    st = g.get("stages") or []
    tokens = "/".join(f"{s['tokens']}{'+' + str(s['num_prefix']) if s['num_prefix'] else ''}" for s in st)
    size = g.get("img_size")
    img = "x".join(str(v) for v in size) if isinstance(size, list) else str(size)
    return (f"{g.get('family', '?')} img {img}, stages {tokens} tokens, depths {'-'.join(str(s['depth']) for s in st)}"
            f", widths {'/'.join(str(s['width']) for s in st)}")


def check_stage_geometry(model: nn.Module, recorded: dict[str, Any], adapt: bool = False) -> None:
    """Refuse (one-line ValueError) a deployment config searched on another hierarchical geometry than ``model``'s.

    ``recorded`` is the config's ``geometry``: its ``stages`` (`stage_geometry`) must equal the model's; a config
    without them (written by hand, or for a ViT) is held to the manifest fields it has (first-stage patch tokens,
    class tokens, total depth, last width). ``adapt`` cannot rescale a hierarchical config (its counts are per
    stage and its locations global blocks), so it is refused too.
    """
    actual = stage_geometry(model)
    st = actual["stages"]
    stages = recorded.get("stages")
    if stages is not None and (not isinstance(stages, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool)
                                        for k in ("tokens", "num_prefix", "depth", "width")) for s in stages)):
        raise ValueError(f"geometry: field 'stages' is {stages!r}, not a list of objects of integer tokens, "
                         "num_prefix, depth and width (one per stage)")
    if stages is not None:
        want = {k: recorded.get(k) for k in ("family", "img_size", "stages")}
        same = want == {k: actual[k] for k in want}
        searched = describe_stage_geometry(recorded)
    else:
        derived = {"num_patches": st[0]["tokens"], "num_prefix": st[-1]["num_prefix"],
                   "depth": sum(s["depth"] for s in st), "width": st[-1]["width"]}
        same = all(recorded.get(k) == v for k, v in derived.items())
        searched = ", ".join(f"{k} {recorded.get(k)}" for k in derived)
    if not same:
        why = "; adapt=True rescales ViT configs only" if adapt else ""
        raise ValueError(f"geometry: the config was searched on {searched}, the model is "
                         f"{describe_stage_geometry(actual)}; build the model with the config's backbone overrides "
                         f"(tpsexplore.load_deployment does){why}")




def apply_hier(model: nn.Module, config, track_sources: bool = False) -> nn.Module:
    """Patch a PVT v1, PVT v2 or CvT model in place to reduce tokens as ``config`` says (see `hier_schedule`).

    Swin goes to `patch_swin.apply_swin` (its own forms, `swin_schedule`). A deployment config's recorded
    geometry is not checked here (hierarchical geometries are not recorded yet); source tracking is refused.
    """
    if family_of(model) == "swin":
        from .patch_swin import apply_swin

        return apply_swin(model, config, track_sources)
    config = _coerce_config(config)[0]
    if track_sources:
        raise ValueError("track_sources: source tracking is not supported on hierarchical backbones")
    sched = hier_schedule_of(model, config)  # validates
    check_hier_merge_r(config, sched)
    if isinstance(model, HierReductionMixin):
        remove_hier(model)
    spec = config.spec
    blocks = [blk for stage in stage_blocks(model) for blk in stage]
    dims = [stage[0].norm1.normalized_shape[0] for stage in stage_blocks(model)]
    if spec is not None:
        for red, target in zip(sched.reductions, sched.targets):  # one module per block that reduces
            si = sched.stage_of(red.block)
            stage = ReductionStage(red.block, red.kept, red.removed, dims[si], sched.stages[si].num_spatial,
                                   spec.policy, config.effective_treatment, spec.placement, config.seed)
            stage.target = target
            blocks[red.block].tps_stage = stage
        ref = next(model.parameters())
        for blk in blocks:
            if hasattr(blk, "tps_stage"):
                blk.tps_stage.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    model.__class__ = _patched_class(type(model))
    model.tps_config = config
    model.tps_family = sched.family
    model.tps_stages = sched.stages
    model.tps_schedule = sched
    model.tps_options = {"track_sources": False}
    return model


def remove_hier(model: nn.Module) -> nn.Module:
    """Undo `apply_hier`: the original class, no added modules, outputs identical to the unpatched model."""
    from .patch_swin import SwinReductionMixin, remove_swin

    if isinstance(model, SwinReductionMixin):
        return remove_swin(model)
    if not isinstance(model, HierReductionMixin):
        return model
    for stage in stage_blocks(model):
        for blk in stage:
            if hasattr(blk, "tps_stage"):
                del blk.tps_stage
    model.__class__ = model._tps_original_class
    for name in ("tps_config", "tps_family", "tps_stages", "tps_schedule", "tps_options", "tps_last_info"):
        if name in model.__dict__:
            delattr(model, name)
    return model
