"""MAC counts of hierarchical backbones (Swin, PVT v1 and v2, CvT): a closed form from a per-stage geometry.

Convention: the one of `tpsexplore.measure.flops` (methods-spec sections 5 and 13). One per multiply-accumulate.
Included: the attention matmuls QK^T and AV, every conv (patch embeddings, Swin's patch merging, PVT's
spatial-reduction conv, CvT's depthwise q/k/v convs, PVT v2's depthwise MLP conv) and the head. Biases are not
counted (fvcore does not). LayerNorm costs 5 per element and BatchNorm 2 per element (eval), fvcore's rules.
Softmax, activations, residual adds, the relative-position-bias and mask adds, the final mean pool, and
roll/pad/gather are free.

Two conventions, one switch (``norms``). With the norms (the default, as for the ViTs) the count is fvcore's and
reproduces the TPS paper's Table 2 to the printed digit: PVT-T 1.94, PVT-S 3.83, CvT-13 4.58, CvT-21 7.21.
Without them (``norms=False``) it is methods-spec 13's closed form: 1.93, 3.82, 4.57, 7.18, Swin-T 4.49 (the
DynamicSwin table). The two differ by the normalisation layers alone (0.010 / 0.017 / 0.019 / 0.028 G).

* `hier_geometry_from_model` reads a `HierGeometry` (dims, grids, windows, reduction ratios) from a built model, on
  any device, `meta` included; `hier_geometry` builds one by name on `meta` (no weights).
* `hier_analytic_macs` is the closed form, per part and per stage; builds no model.
* The trace is `tpsexplore.measure.flops.traced_macs`: it counts these models as they run (norms included;
  `traced_without_norms` drops its norm ops), and tests/test_hier_backbones.py checks that the counts are equal.

* `hier_reduced_macs` counts a token-reduced PVT v1, PVT v2 or CvT (`tpsexplore.reduce.patch_hier`, issue 13 part 2)
  from the token schedule alone; with no reduction it equals `hier_analytic_macs`. A Swin goes to
  `swin_reduced_macs` (`tpsexplore.reduce.patch_swin`: the cheap and the window form, similarity pruning).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = ["HierGeometry", "HierMacReport", "NORM_OPS", "StageGeometry", "hier_analytic_macs", "hier_geometry",
           "hier_geometry_from_model", "hier_reduced_macs", "hier_reduced_params", "hier_reduction_stages",
           "swin_reduced_macs", "swin_reduced_params", "swin_reduction_stages", "traced_without_norms"]


# ============================================================================= geometry
@dataclass(frozen=True)
class StageGeometry:
    """One stage: how it is entered, its token grid, and its blocks' dims and token mixer.

    embed: 'conv' (a conv of ``embed_kernel`` from ``embed_in`` channels, then a LayerNorm if ``embed_norm``) or
    'merge' (Swin's 2x2 patch merging: LayerNorm over 4*embed_in, Linear to dim). The mixer is Swin window
    attention when ``window`` is set (the window after timm's clamp to the grid; the grid is padded up to whole
    windows), CvT's conv projections when ``conv_kernel`` is set (q on the grid, k/v on ``kv_grid``), else PVT's
    spatial-reduction attention with ratio ``sr_ratio`` (1 = global attention). ``mlp_dwconv``: the kernel of
    PVT v2's depthwise conv inside the MLP (0 = none). ``stage_norm``: PVT v2's LayerNorm after the stage.
    """

    dim: int
    depth: int
    num_heads: int
    attn_dim: int
    mlp_hidden: int
    grid: tuple[int, int]
    num_prefix: int = 0
    embed: str = "conv"
    embed_in: int = 3
    embed_kernel: int = 1
    embed_norm: bool = True
    sr_ratio: int = 1
    window: tuple[int, int] = (0, 0)
    conv_kernel: int = 0
    kv_grid: tuple[int, int] = (0, 0)
    mlp_dwconv: int = 0
    stage_norm: bool = False

    @property
    def mixer(self) -> str:
        """'window' (Swin), 'conv_proj' (CvT) or 'sr' (PVT, global attention when sr_ratio is 1)."""
        if self.window[0]:
            return "window"
        return "conv_proj" if self.conv_kernel else "sr"

    @property
    def num_spatial(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """Tokens in every block of the stage: grid cells plus class token(s)."""
        return self.num_spatial + self.num_prefix

    @property
    def num_kv(self) -> int:
        """Keys/values each query attends to (per window for Swin)."""
        if self.mixer == "window":
            return self.window[0] * self.window[1]
        if self.mixer == "conv_proj":
            return self.kv_grid[0] * self.kv_grid[1] + self.num_prefix
        if self.sr_ratio > 1:
            return (self.grid[0] // self.sr_ratio) * (self.grid[1] // self.sr_ratio)
        return self.num_tokens


@dataclass(frozen=True)
class HierGeometry:
    """The dims of a hierarchical backbone its MAC count depends on, at one input size.

    family: 'swin', 'pvt_v1', 'pvt_v2' or 'cvt'. final_norm_tokens: how many tokens the final LayerNorm sees
    (Swin and PVT v1 all of the last stage's, CvT its class token, PVT v2 none: it has per-stage norms).
    """

    name: str
    family: str
    img_size: tuple[int, int]
    in_chans: int
    stages: tuple[StageGeometry, ...]
    final_norm_tokens: int
    num_classes: int
    num_params: int

    @property
    def depth(self) -> int:
        return sum(s.depth for s in self.stages)

    @property
    def embed_dim(self) -> int:
        return self.stages[-1].dim

    # what a study manifest records of a backbone (`tpsexplore.manifest.Geometry`), as for the ViTs
    @property
    def num_patches(self) -> int:
        """Tokens of the first stage's grid (the patch tokens entering the first block)."""
        return self.stages[0].num_spatial

    @property
    def num_prefix(self) -> int:
        """Class tokens of the last stage (the only stage that has one)."""
        return self.stages[-1].num_prefix

    @property
    def num_heads(self) -> int:
        return self.stages[-1].num_heads

    @property
    def patch_size(self) -> tuple[int, int]:
        """Input pixels per first-stage token along each side (the first embedding's stride)."""
        return self.img_size[0] // self.stages[0].grid[0], self.img_size[1] // self.stages[0].grid[1]


def _ln(module: nn.Module | None, where: str) -> bool:
    """True for a LayerNorm (5 MACs per element), False for None/Identity; anything else is refused."""
    if module is None or isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.LayerNorm):
        return True
    raise ValueError(f"model: {where} is a {type(module).__name__}; the MAC count supports LayerNorm or Identity")


def _conv_out(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return tuple((size[d] + 2 * p[d] - k[d]) // s[d] + 1 for d in range(2))


def _square_kernel(conv: nn.Conv2d, where: str) -> int:
    k = conv.kernel_size
    if k[0] != k[1] or conv.dilation != (1, 1):
        raise ValueError(f"model: {where} has kernel {tuple(k)} / dilation {conv.dilation}; the MAC count "
                         "supports square, undilated kernels")
    return int(k[0])


def _swin(model: nn.Module, name: str) -> HierGeometry:
    from timm.models.swin_transformer import PatchMerging

    pe = model.patch_embed
    conv = pe.proj
    stages = []
    for i, layer in enumerate(model.layers):
        blocks = list(layer.blocks)
        b0 = blocks[0]
        if any(tuple(b.window_size) != tuple(b0.window_size) for b in blocks):
            raise ValueError(f"model: stage {i} mixes window sizes; the MAC count needs one per stage")
        if isinstance(layer.downsample, PatchMerging):
            _ln(layer.downsample.norm, f"stage {i} patch merging norm")
            embed = dict(embed="merge", embed_in=int(layer.downsample.dim), embed_kernel=2, embed_norm=True)
        elif i == 0:
            embed = dict(embed="conv", embed_in=int(conv.in_channels), embed_kernel=_square_kernel(conv, "patch_embed"),
                         embed_norm=_ln(getattr(pe, "norm", None), "patch_embed.norm"))
        else:
            raise ValueError(f"model: stage {i} has no patch merging; the MAC count expects one per later stage")
        stages.append(StageGeometry(
            dim=int(b0.norm1.normalized_shape[0]), depth=len(blocks), num_heads=int(b0.attn.num_heads),
            attn_dim=int(b0.attn.qkv.out_features // 3), mlp_hidden=int(b0.mlp.fc1.out_features),
            grid=tuple(int(v) for v in layer.output_resolution), window=tuple(int(v) for v in b0.window_size),
            **embed))
    pool = getattr(model.head, "global_pool", None)
    if pool is not None and hasattr(pool, "is_identity") and pool.is_identity():
        raise ValueError("model: a Swin head without global pooling is not supported by the MAC count")
    final = stages[-1].num_spatial if _ln(model.norm, "norm") else 0
    return HierGeometry(name=name, family="swin", img_size=tuple(int(v) for v in pe.img_size),
                        in_chans=int(conv.in_channels), stages=tuple(stages),
                        final_norm_tokens=final, num_classes=_num_classes(model.head),
                        num_params=_params(model))


def _pvt_v2(model: nn.Module, name: str, img_size: tuple[int, int]) -> HierGeometry:
    size = img_size
    stages = []
    for i, stage in enumerate(model.stages):
        pe = model.patch_embed if i == 0 else stage.downsample
        if pe is None:
            raise ValueError(f"model: stage {i} has no downsampling conv; the MAC count expects one per stage")
        size = _conv_out(size, pe.proj)
        blocks = list(stage.blocks)
        b0 = blocks[0]
        if b0.attn.pool is not None:
            raise ValueError("model: linear spatial-reduction attention (pvt_v2_*_li) is not supported by the "
                             "MAC count")
        sr = b0.attn.sr
        stages.append(StageGeometry(
            dim=int(pe.proj.out_channels), depth=len(blocks), num_heads=int(b0.attn.num_heads),
            attn_dim=int(b0.attn.q.out_features), mlp_hidden=int(b0.mlp.fc1.out_features), grid=size,
            embed="conv", embed_in=int(pe.proj.in_channels), embed_kernel=_square_kernel(pe.proj, f"stage {i} embed"),
            embed_norm=_ln(pe.norm, f"stage {i} embed norm"),
            sr_ratio=_square_kernel(sr, f"stage {i} sr") if sr is not None else 1,
            mlp_dwconv=_square_kernel(b0.mlp.dwconv, f"stage {i} MLP dwconv"),
            stage_norm=_ln(stage.norm, f"stage {i} norm")))
    return HierGeometry(name=name, family="pvt_v2", img_size=img_size, in_chans=int(model.patch_embed.proj.in_channels),
                        stages=tuple(stages), final_norm_tokens=0, num_classes=_num_classes(model.head),
                        num_params=_params(model))


def _pvt_v1(model: nn.Module, name: str) -> HierGeometry:
    c = model.config
    stages = []
    for i in range(model.num_stages):
        k = c.patch_size if i == 0 else 2
        stages.append(StageGeometry(
            dim=c.embed_dims[i], depth=c.depths[i], num_heads=c.num_heads[i], attn_dim=c.embed_dims[i],
            mlp_hidden=c.mlp_hidden(i), grid=tuple(model.grids[i]), num_prefix=1 if i == model.num_stages - 1 else 0,
            embed="conv", embed_in=model.in_chans if i == 0 else c.embed_dims[i - 1], embed_kernel=k,
            sr_ratio=c.sr_ratios[i]))
    return HierGeometry(name=name, family="pvt_v1", img_size=tuple(model.img_size), in_chans=model.in_chans,
                        stages=tuple(stages), final_norm_tokens=stages[-1].num_tokens,
                        num_classes=_num_classes(model.head), num_params=_params(model))


def _cvt(model: nn.Module, name: str) -> HierGeometry:
    c = model.config
    stages = []
    for i in range(model.num_stages):
        grid = tuple(model.grids[i])
        stages.append(StageGeometry(
            dim=c.embed_dims[i], depth=c.depths[i], num_heads=c.num_heads[i], attn_dim=c.embed_dims[i],
            mlp_hidden=c.mlp_hidden(i), grid=grid, num_prefix=1 if c.cls_token[i] else 0, embed="conv",
            embed_in=model.in_chans if i == 0 else c.embed_dims[i - 1], embed_kernel=c.patch_sizes[i],
            conv_kernel=c.kernel_qkv, kv_grid=tuple(c.kv_grid(grid))))
    return HierGeometry(name=name, family="cvt", img_size=tuple(model.img_size), in_chans=model.in_chans,
                        stages=tuple(stages), final_norm_tokens=1 if c.cls_token[-1] else stages[-1].num_spatial,
                        num_classes=_num_classes(model.head), num_params=_params(model))


def _num_classes(head: nn.Module) -> int:
    fc = getattr(head, "fc", head)  # timm's ClassifierHead keeps its Linear in .fc
    return int(fc.out_features) if isinstance(fc, nn.Linear) else 0


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hier_geometry_from_model(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> HierGeometry:
    """Read the geometry of a Swin (timm), PVT v2 (timm), PVT v1 or CvT (tpsexplore.models) model, on any device.

    ``img_size`` is needed only by PVT v2, which takes any input; default: its ``pretrained_cfg`` input size.
    The other families are built for one size: ``img_size``, if given, must be it.
    """
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer

    from ..models import ConvolutionalVisionTransformer, PyramidVisionTransformerV1

    name = getattr(getattr(model, "tps_backbone", None), "timm_name", None) or \
        (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "") or type(model).__name__
    want = None if img_size is None else (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(model, PyramidVisionTransformerV2):
        if want is None:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            want = tuple(cfg.get("input_size", (3, 224, 224))[1:])
        return _pvt_v2(model, name, want)
    if isinstance(model, SwinTransformer):
        geo = _swin(model, name)
    elif isinstance(model, PyramidVisionTransformerV1):
        geo = _pvt_v1(model, name)
    elif isinstance(model, ConvolutionalVisionTransformer):
        geo = _cvt(model, name)
    else:
        raise ValueError(f"model: {type(model).__name__} is not a supported hierarchical backbone; allowed: timm "
                         "SwinTransformer, PyramidVisionTransformerV2, tpsexplore PVT v1 or CvT")
    if want is not None and want != geo.img_size:
        raise ValueError(f"img_size: {want} differs from the {geo.img_size} the model was built for")
    return geo


def hier_geometry(backbone_name: str, img_size: int | None = None, num_classes: int | None = None) -> HierGeometry:
    """Geometry of a hierarchical backbone by name (short names too), built on the `meta` device: no weights."""
    from ..backbones import build_timm_model, hier_name

    timm_name = hier_name(backbone_name)
    overrides = {k: v for k, v in (("img_size", img_size), ("num_classes", num_classes)) if v is not None}
    with torch.device("meta"):
        model = build_timm_model(timm_name, **overrides)
    return replace(hier_geometry_from_model(model), name=timm_name)


# ============================================================================= analytic count
@dataclass(frozen=True)
class HierMacReport:
    """MACs of one forward pass at batch 1, by part, plus the MACs of each stage's blocks (``stages``).

    patch_embed: the stage entries' convs / merge Linears; spatial: PVT's SR convs, CvT's depthwise q/k/v convs;
    norms: every LayerNorm and BatchNorm but the final one (blocks, entries, SR, conv projections, PVT v2's
    stage norms); mlp includes PVT v2's depthwise MLP conv. stages: each stage's blocks (attention, MLP, their norms,
    SR / conv projections: what token reduction can act on; spec 13.2's "where the compute is"), without the
    entry conv and PVT v2's stage norm. tokens: (query tokens, keys per query) of each stage.
    """

    patch_embed: int = 0
    qkv: int = 0
    attention: int = 0
    proj: int = 0
    mlp: int = 0
    spatial: int = 0
    norms: int = 0
    final_norm: int = 0
    head: int = 0
    predictor: int = 0
    cls_attention: int = 0
    fuse: int = 0
    squeeze: int = 0
    matching: int = 0
    similarity: int = 0
    stages: tuple[int, ...] = field(default=(), compare=False)
    tokens: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    @property
    def total(self) -> int:
        return (self.patch_embed + self.qkv + self.attention + self.proj + self.mlp + self.spatial + self.norms
                + self.final_norm + self.head + self.extras)

    @property
    def extras(self) -> int:
        """A token reduction's own cost (`hier_reduced_macs`): predictors, class-attention rows, fuse, squeeze,
        ToMe matching; 0 for the unreduced model."""
        return self.predictor + self.cls_attention + self.fuse + self.squeeze + self.matching + self.similarity

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def as_dict(self) -> dict[str, Any]:
        """Every part plus total/gmacs, JSON-ready."""
        d = asdict(self)
        d["stages"] = list(self.stages)
        d["tokens"] = [list(t) for t in self.tokens]
        d.update(total=self.total, gmacs=self.gmacs)
        return d


def _stage_parts(st: StageGeometry, norms: bool = True) -> tuple[dict[str, int], int]:
    """MACs of one stage by part (closed form, see the module docstring), and those of its blocks alone."""
    c, a, hid = st.dim, st.attn_dim, st.mlp_hidden
    ns, n = st.num_spatial, st.num_tokens
    p = dict.fromkeys(("patch_embed", "qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    if st.embed == "merge":
        p["patch_embed"] = ns * 4 * st.embed_in * c
        p["norms"] += 5 * ns * 4 * st.embed_in
    else:
        p["patch_embed"] = ns * c * st.embed_in * st.embed_kernel ** 2
        p["norms"] += 5 * ns * c if st.embed_norm else 0
    if st.stage_norm:
        p["norms"] += 5 * ns * c
    blk = dict.fromkeys(p, 0)
    blk["norms"] = 2 * 5 * n * c
    blk["mlp"] = 2 * n * c * hid + (ns * hid * st.mlp_dwconv ** 2 if st.mlp_dwconv else 0)
    if st.mixer == "window":
        wh, ww = st.window
        npad = math.ceil(st.grid[0] / wh) * wh * math.ceil(st.grid[1] / ww) * ww  # padded up to whole windows
        blk["qkv"], blk["attention"], blk["proj"] = 3 * npad * c * a, 2 * npad * wh * ww * a, npad * a * c
    elif st.mixer == "conv_proj":
        k2 = st.conv_kernel ** 2
        nkv_sp = st.kv_grid[0] * st.kv_grid[1]
        nk = st.num_kv
        blk["spatial"] = (ns + 2 * nkv_sp) * c * k2  # depthwise convs
        blk["norms"] += 2 * (ns + 2 * nkv_sp) * c  # their BatchNorms (eval: 2 per element)
        blk["qkv"] = n * c * a + 2 * nk * c * a
        blk["attention"], blk["proj"] = 2 * n * nk * a, n * a * c
    else:
        nk = st.num_kv
        if st.sr_ratio > 1:
            if st.num_prefix:
                raise ValueError("model: spatial reduction with a class token is not supported by the MAC count")
            blk["spatial"] = nk * c * c * st.sr_ratio ** 2  # k = s = r conv
            blk["norms"] += 5 * nk * c  # its LayerNorm
        blk["qkv"] = n * c * a + 2 * nk * c * a
        blk["attention"], blk["proj"] = 2 * n * nk * a, n * a * c
    if not norms:
        p["norms"] = blk["norms"] = 0
    for k, v in blk.items():
        p[k] += st.depth * v
    return p, st.depth * sum(blk.values())


def hier_analytic_macs(geometry: HierGeometry, norms: bool = True) -> HierMacReport:
    """Closed-form MACs of the unreduced hierarchical backbone of ``geometry``, batch 1 (builds no model).

    norms=True counts LayerNorm (5 per element) and BatchNorm (2) like fvcore and the ViT count: this equals
    `traced_macs` and reproduces the TPS paper's Table 2 (PVT-T/S 1.94/3.83, CvT-13/21 4.58/7.21). norms=False
    leaves every normalisation layer out, the convention of methods-spec 13 (1.93/3.82/4.57/7.18, Swin-T 4.49);
    it equals the trace less its norm ops (`traced_without_norms`).
    """
    parts = dict.fromkeys(("patch_embed", "qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    per_stage = []
    for st in geometry.stages:
        sp, blocks = _stage_parts(st, norms)
        per_stage.append(blocks)
        for k, v in sp.items():
            parts[k] += v
    c = geometry.embed_dim
    final = 5 * geometry.final_norm_tokens * c if norms else 0
    return HierMacReport(**parts, final_norm=final, head=c * geometry.num_classes,
                         stages=tuple(per_stage), tokens=tuple((s.num_tokens, s.num_kv) for s in geometry.stages))


#: fvcore's names of the normalisation ops, left out by the norms=False convention.
NORM_OPS = ("layer_norm", "batch_norm", "group_norm", "instance_norm")


def traced_without_norms(traced: Any) -> int:
    """A `flops.TracedMacs` total less its normalisation ops: the trace in the norms=False convention."""
    return traced.total - sum(traced.by_operator.get(op, 0) for op in NORM_OPS)


# ============================================================================= reduced models (issue 13, part 2)
def hier_reduction_stages(geometry: HierGeometry) -> tuple[Any, ...]:
    """The `reduce.hier_schedule.HierStageTokens` of ``geometry`` (grid cells, class tokens, blocks, form)."""
    from ..reduce.hier_schedule import HierStageTokens, is_physical

    out, first = [], 0
    for st in geometry.stages:
        out.append(HierStageTokens(st.num_spatial, st.num_prefix, st.depth, first,
                                   is_physical(geometry.family, st.sr_ratio, st.num_prefix)))
        first += st.depth
    return tuple(out)


def _reduced_block(st: StageGeometry, nq: int, nm: int, physical: bool, norms: bool) -> dict[str, int]:
    """MACs of one block with ``nq`` query tokens and ``nm`` MLP tokens (`reduce.patch_hier`'s two forms).

    Physical stage (PVT's last, r = 1): everything runs on the live tokens, keys included (nk = nq). Keep-the-grid
    form: norm1 and the SR conv / depthwise conv projections (with their norms) and K/V run on the dense grid as in
    the unreduced block; q, the attention rows, proj, norm2 and the MLP run on the live tokens, except PVT v2's
    depthwise MLP conv, which runs on the whole (zero-filled) hidden grid.
    """
    c, a, hid = st.dim, st.attn_dim, st.mlp_hidden
    nk = nq if physical else st.num_kv
    p = dict.fromkeys(("qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    p["norms"] = 5 * ((nq if physical else st.num_tokens) + nm) * c
    if st.mixer == "conv_proj":
        k2, kv_sp = st.conv_kernel ** 2, st.kv_grid[0] * st.kv_grid[1]
        p["spatial"] = (st.num_spatial + 2 * kv_sp) * c * k2
        p["norms"] += 2 * (st.num_spatial + 2 * kv_sp) * c
    elif st.mixer == "sr" and st.sr_ratio > 1:
        p["spatial"] = nk * c * c * st.sr_ratio ** 2
        p["norms"] += 5 * nk * c
    elif st.mixer != "sr":
        raise ValueError(f"model: a {st.mixer} stage cannot be token-reduced; allowed: PVT v1, PVT v2 and CvT")
    p["qkv"] = nq * c * a + 2 * nk * c * a
    p["attention"], p["proj"] = 2 * nq * nk * a, nq * a * c
    p["mlp"] = 2 * nm * c * hid + (st.num_spatial * hid * st.mlp_dwconv ** 2 if st.mlp_dwconv else 0)
    if not norms:
        p["norms"] = 0
    return p


def hier_reduced_macs(config: Any, geometry: HierGeometry, norms: bool = True) -> HierMacReport:
    """Closed-form MACs of ``config`` (a `ReductionConfig`) on the PVT v1 / v2 / CvT of ``geometry``, batch 1, eval
    path.

    Token counts come from `tpsexplore.reduce.hier_schedule.hier_token_schedule` only (builds no model); the
    blocks follow `_reduced_block`, the entries and the head are the unreduced model's, the final LayerNorm sees
    the physical stage's remaining tokens (PVT) or the class token (CvT). Extras as for the ViTs
    (`tpsexplore.measure.flops`): the DynamicViT predictor on the live spatial tokens, the class-attention row
    (one query against the block's keys), EViT's fused token, the TPS squeeze, ToMe's matching. With no reduction
    it equals `hier_analytic_macs`; it equals the trace of the patched model (tests/test_hier_reduce.py).
    """
    from ..reduce.hier_schedule import hier_token_schedule
    from .flops import bipartite_matching_macs, predictor_macs, squeeze_macs

    if geometry.family == "swin":
        return swin_reduced_macs(config, geometry, norms)
    sched = hier_token_schedule(config, hier_reduction_stages(geometry), geometry.family)
    base = hier_analytic_macs(geometry, norms)
    parts = dict.fromkeys(("qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    per_stage = []
    g = 0
    for st, hs in zip(geometry.stages, sched.stages):
        total = 0
        for _ in range(st.depth):
            nq, nm = sched.blocks[g]
            blk = _reduced_block(st, nq, nm, hs.physical, norms)
            for k, v in blk.items():
                parts[k] += v
            total += sum(blk.values())
            g += 1
        per_stage.append(total)
    entry = base.norms - sum(_reduced_block(st, st.num_tokens, st.num_tokens, False, norms)["norms"] * st.depth
                             for st in geometry.stages if st.mixer != "window") if norms else 0
    parts["norms"] += entry  # the stage entries' norms, as in the unreduced count
    c = geometry.embed_dim
    final_tokens = sched.final_tokens if geometry.family == "pvt_v1" else geometry.final_norm_tokens
    extras = dict.fromkeys(("predictor", "cls_attention", "fuse", "squeeze", "matching"), 0)
    spec = config.spec
    if spec is not None:
        for red in sched.reductions:
            si = sched.stage_of(red.block)
            st, hs = geometry.stages[si], sched.stages[si]
            dim = st.dim
            if spec.policy == "predictor":
                extras["predictor"] += predictor_macs(red.before, dim)
            elif spec.policy == "cls_attn":
                nq = sched.blocks[red.block][0]
                extras["cls_attention"] += (nq if hs.physical else st.num_kv) * st.attn_dim
            elif spec.policy == "merge":
                extras["matching"] += bipartite_matching_macs(red.before + st.num_prefix, st.num_prefix,
                                                              st.attn_dim // st.num_heads)
            treatment = config.effective_treatment
            if treatment == "squeeze":
                extras["squeeze"] += squeeze_macs(config, red.kept, red.removed, dim)
            elif treatment == "fuse":
                extras["fuse"] += red.removed * dim
    return HierMacReport(patch_embed=base.patch_embed, **parts, final_norm=5 * final_tokens * c if norms else 0,
                         head=base.head, **extras, stages=tuple(per_stage), tokens=base.tokens)


def hier_reduced_params(config: Any, geometry: HierGeometry) -> Any:
    """`flops.ParamReport` of ``config`` on ``geometry``: the backbone's parameters plus one DynamicViT predictor
    (of its stage's width) per learned reduction."""
    from ..reduce.hier_schedule import hier_token_schedule
    from .flops import ParamReport, predictor_params

    spec = config.spec
    extra = 0
    if geometry.family == "swin":
        return ParamReport(backbone=geometry.num_params, predictor=swin_reduced_params(config, geometry))
    if spec is not None and spec.policy == "predictor":
        sched = hier_token_schedule(config, hier_reduction_stages(geometry), geometry.family)
        extra = sum(predictor_params(geometry.stages[sched.stage_of(r.block)].dim) for r in sched.reductions)
    return ParamReport(backbone=geometry.num_params, predictor=extra)


# ============================================================================= Swin (reduce/patch_swin.py)
def swin_reduction_stages(geometry: HierGeometry) -> tuple[Any, ...]:
    """The `reduce.swin_schedule.SwinStageTokens` of a Swin ``geometry`` (grid, window, blocks)."""
    from ..reduce.swin_schedule import SwinStageTokens

    out, first = [], 0
    for st in geometry.stages:
        out.append(SwinStageTokens(st.grid, st.window, st.depth, first))
        first += st.depth
    return tuple(out)


def _swin_block(st: StageGeometry, nq: int, nm: int, per_window: int, form: str, norms: bool) -> dict[str, int]:
    """MACs of one Swin block of a reduced model (`reduce.swin_schedule`'s forms).

    Unreduced (nq = nm = the stage's tokens): `_stage_parts`' block. Window form (``per_window`` c < A kept in
    each of the nW windows, nq = nm = c nW): both norms, qkv, proj and the MLP on the c nW kept tokens, the
    attention 2 nW c^2 a. Cheap form (nm < nq = N): norm1, qkv, window attention and proj dense as unreduced;
    norm2 and the MLP on the nm kept tokens, the fast path (LayerNorm + Linear C -> C) on the N - nm others.
    """
    c, a, hid = st.dim, st.attn_dim, st.mlp_hidden
    n = st.num_spatial
    if (nq, nm) == (n, n):
        p = _stage_parts(replace(st, depth=1, embed="merge", embed_in=0), norms)[0]
        p.pop("patch_embed")
        return p
    p = dict.fromkeys(("qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    if form == "window":
        p["norms"] = 2 * 5 * nq * c
        p["qkv"], p["proj"], p["mlp"] = 3 * nq * c * a, nq * a * c, 2 * nq * c * hid
        p["attention"] = 2 * (nq // per_window) * per_window * per_window * a
    else:
        wh, ww = st.window
        npad = math.ceil(st.grid[0] / wh) * wh * math.ceil(st.grid[1] / ww) * ww
        p["norms"] = 5 * (n + nm + (n - nm)) * c
        p["qkv"], p["attention"], p["proj"] = 3 * npad * c * a, 2 * npad * wh * ww * a, npad * a * c
        p["mlp"] = 2 * nm * c * hid + (n - nm) * c * c
    if not norms:
        p["norms"] = 0
    return p


def swin_reduced_macs(config: Any, geometry: HierGeometry, norms: bool = True) -> HierMacReport:
    """Closed-form MACs of ``config`` on the Swin of ``geometry``, batch 1, eval path (`hier_reduced_macs` for
    Swin). Blocks follow `_swin_block`; the patch embedding, the patch mergings, the final norm and the head are
    the unreduced model's. Extras: the DynamicViT predictor on all the stage's tokens at each reducing location
    (DynamicSwin's scorer sees every token), the TPS squeeze of the cheap form's pruned tokens into its kept
    ones, and similarity scoring's O(N C) redundancy on the patch embeddings: 2 N C for cosine (the norms and one
    product with the sum of the normalised embeddings), 2 N C for dot (the squared norms and that product).
    With no reduction it equals `hier_analytic_macs`; it equals the trace of the patched model
    (tests/test_swin_reduce.py)."""
    from ..reduce.swin_schedule import swin_token_schedule
    from .flops import predictor_macs, squeeze_macs

    sched = swin_token_schedule(config, swin_reduction_stages(geometry))
    base = hier_analytic_macs(geometry, norms)
    parts = dict.fromkeys(("qkv", "attention", "proj", "mlp", "spatial", "norms"), 0)
    per_stage = []
    g = 0
    for st in geometry.stages:
        total = 0
        for _ in range(st.depth):
            blk = _swin_block(st, *sched.blocks[g], sched.per_window[g], sched.form, norms)
            for k, v in blk.items():
                parts[k] += v
            total += sum(blk.values())
            g += 1
        per_stage.append(total)
    block_norms = sum(_swin_block(st, st.num_spatial, st.num_spatial, st.window[0] * st.window[1], "", norms)
                      ["norms"] * st.depth for st in geometry.stages)
    parts["norms"] += base.norms - block_norms  # the patch embedding's and the mergings' norms, as unreduced
    extras = dict.fromkeys(("predictor", "squeeze", "similarity"), 0)
    spec = config.spec
    for red in sched.reductions:
        st = geometry.stages[sched.stage_of(red.block)]
        if spec.policy == "predictor":  # (norms=False: without its LayerNorm, as the trace less its norm ops)
            extras["predictor"] += predictor_macs(red.before, st.dim) - (0 if norms else 5 * red.before * st.dim)
        elif spec.policy == "similarity":
            extras["similarity"] += 2 * red.before * st.dim
        if config.effective_treatment == "squeeze":
            extras["squeeze"] += squeeze_macs(config, red.kept, red.removed, st.dim)
    return HierMacReport(patch_embed=base.patch_embed, **parts, final_norm=base.final_norm, head=base.head,
                         **extras, stages=tuple(per_stage), tokens=base.tokens)


def swin_reduced_params(config: Any, geometry: HierGeometry) -> int:
    """Parameters a reduction adds to a Swin: one DynamicViT predictor per learned reduction (its stage's width)
    and, in the cheap form, one fast MLP (LayerNorm + Linear C -> C) per block whose MLP runs on fewer tokens."""
    from ..reduce.swin_schedule import swin_token_schedule
    from .flops import predictor_params

    sched = swin_token_schedule(config, swin_reduction_stages(geometry))
    spec = config.spec
    extra = 0
    if spec is not None and spec.policy == "predictor":
        extra += sum(predictor_params(geometry.stages[sched.stage_of(r.block)].dim) for r in sched.reductions)
    if sched.form == "cheap":
        g = 0
        for st in geometry.stages:
            for _ in range(st.depth):
                if sched.blocks[g][1] < st.num_spatial:
                    extra += 2 * st.dim + st.dim * st.dim + st.dim
                g += 1
    return extra
