"""MAC counts of (token-reduced) timm ViTs: a closed-form count and an fvcore trace that must agree.

Convention (methods-spec section 5, the one all four papers use): "FLOPs" are multiply-accumulates
(1 per MAC), the two attention matmuls QK^T and AV are included, the patch-embedding conv and the head
are included, LayerNorm costs 5 per element (fvcore's affine rule); softmax, GELU, residual adds,
layer scale and gather/scatter/sort carry no MACs.

* `analytic_macs` is the closed form: token counts come from `tpsexplore.reduce.schedule.token_schedule`
  only, the model's dims from a `ViTGeometry` computed once beforehand (`geometry`). No model is built.
* `traced_macs` runs fvcore's `FlopCountAnalysis` on the eval path at batch 1 with extra handles for the
  ops fvcore does not know (see `EXTRA_OP_RULES`), and raises `UncountedOpError` when the trace meets an
  op that is neither handled nor listed in `MAC_FREE_OPS`: it fails loudly rather than undercounting.
  It counts the hierarchical backbones too (Swin, PVT v1/v2, CvT), whose closed form is
  `tpsexplore.measure.hier_flops.hier_analytic_macs`.
* `cross_check` compares the trace with `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per MAC).

What the core's method extras cost (mirrored by `analytic_macs`, seen by the trace), per stage:
predictor (spec 1.1) 5N'C + N'(C^2 + C*C/2 + C/2*C/4 + C/4*2) on the N' alive spatial tokens;
class-attention row N_a*C (the core computes the cls query row q_0 K^T beside fused attention);
EViT fused token removed*C; TPS squeeze 2*Nr*Np*C plus the two L2 norms (Nr+Np)*C (the cosine and the
fusion), only the fusion Nr*Np*C when it matches on the previous attention map (squeeze_similarity
'attention': the map comes from the attention matmuls the block runs anyway, unfused, with the same MACs;
TPS Table 5); ToMe matching Na*Nb*d over the non-prefix A and B sets (`reduce.ops.merge_sets`) plus the
metric norm t*d; similarity scoring Np^2*C plus two norms 2*Np*C for cosine (the core normalises both
operands), Np^2*C for dot, Np^2*C plus one squared norm Np*C for euclidean, and 2*Np*k for the grid
distances when diversity > 0
(what runs; the trace drops the last selection round's distances, which feed nothing: < 0.01%);
attention rollout one unreduced pass of the blocks up to the last attention map (`scoring_pass`, see
`rollout_scoring_macs`) plus the class-row rollout products, (depth-1)*N^2 (`rollout`);
ToFu ToMe's matching on the t tokens of each reducing block, then in its MLERP blocks the L2 norms of all t
tokens plus those of the t - r merged means (`mlerp`; the norms of all t only with mlerp_dst_norm), in its
prune blocks nothing more, or the TPS squeeze with ToFu + squeeze; PiToMe the cosine of its T non-prefix keys
T^2*d plus their norms T*d (`matching`; the energies and the matching reuse it).
L2 norms and cdist are counted as one MAC per squared element.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..reduce.config import ReductionConfig
from ..reduce.methods import RATIO_RULES
from ..reduce.ops import merge_sets
from ..reduce.schedule import Stage, tofu_merges, token_schedule

__all__ = [
    "CrossCheck", "EXTRA_OP_RULES", "MAC_FREE_OPS", "MacReport", "ParamReport", "TracedMacs",
    "UncountedOpError", "ViTGeometry", "analytic_macs", "analytic_params", "bipartite_matching_macs", "cross_check",
    "geometry", "geometry_from_model", "predictor_macs", "predictor_params", "rollout_scoring_macs", "squeeze_macs",
    "traced_macs",
]


# ============================================================================= geometry
@dataclass(frozen=True)
class ViTGeometry:
    """The dims of a timm VisionTransformer that its MAC count depends on.

    attn_dim = num_heads * head_dim (equals embed_dim for DeiT/ViT). final_norm is 'tokens' (LayerNorm on
    every output token, DeiT), 'pooled' (fc_norm on the pooled vector) or 'none'. The *_norm flags mark
    optional LayerNorms inside the blocks (q/k norm, attention scale-norm, MLP norm). num_params is the
    backbone's parameter count.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    num_prefix: int
    patch_size: tuple[int, int]
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    qkv_bias: bool
    num_params: int
    final_norm: str = "tokens"
    norm_pre: bool = False
    patch_norm: bool = False
    qk_norm: bool = False
    attn_norm: bool = False
    mlp_norm: bool = False

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.embed_dim

    @property
    def num_tokens(self) -> int:
        """Tokens entering block 0 (patches plus class/register tokens)."""
        return self.num_patches + self.num_prefix


def _is_layer_norm(module: nn.Module | None) -> bool:
    """True for a LayerNorm-like module with parameters (counted 5 per element), False for Identity."""
    if module is None or isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.LayerNorm):
        return True
    raise ValueError(f"model: norm layer {type(module).__name__} is not supported by the MAC count; "
                     "allowed: LayerNorm or Identity")


def model_geometry(model: nn.Module) -> Any:
    """What `analytic_macs` counts a model on: its `ViTGeometry`, or a hierarchical backbone's (PVT v1/v2, CvT,
    Swin) `hier_flops.HierGeometry`; any device, `meta` included."""
    from ..backbones import is_hierarchical

    if is_hierarchical(model):
        from .hier_flops import hier_geometry_from_model

        return hier_geometry_from_model(model)
    return geometry_from_model(model)


def geometry_from_model(model: nn.Module) -> ViTGeometry:
    """Read the geometry of a timm VisionTransformer (patched or not, on any device, `meta` included)."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model: {type(model).__name__} is not a timm VisionTransformer")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("model: attention-pool (map) heads are not supported by the MAC count")
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("model: has no blocks")
    first = blocks[0]
    for i, blk in enumerate(blocks):
        if not isinstance(blk.attn, Attention) or not isinstance(blk.mlp, Mlp):
            raise ValueError(f"model: block {i} uses {type(blk.attn).__name__}/{type(blk.mlp).__name__}; "
                             "the MAC count supports timm's Attention and Mlp")
        if getattr(blk.attn, "gate", None) is not None:
            raise ValueError(f"model: block {i} has a gated attention, not supported by the MAC count")
        if (blk.attn.num_heads, blk.attn.head_dim, blk.mlp.fc1.out_features) != \
                (first.attn.num_heads, first.attn.head_dim, first.mlp.fc1.out_features):
            raise ValueError(f"model: block {i} differs in heads/head_dim/MLP width from block 0")
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != tuple(conv.stride):
        raise ValueError("model: patch embedding must be a non-overlapping Conv2d")
    if isinstance(model.norm, nn.Identity):
        final = "pooled" if _is_layer_norm(getattr(model, "fc_norm", None)) else "none"
    else:
        _is_layer_norm(model.norm)
        final = "tokens"
    head = model.head
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    name = getattr(getattr(model, "tps_backbone", None), "timm_name", None) or \
        (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "") or type(model).__name__
    return ViTGeometry(
        name=name,
        embed_dim=int(model.embed_dim),
        depth=len(blocks),
        num_heads=int(first.attn.num_heads),
        head_dim=int(first.attn.head_dim),
        mlp_hidden=int(first.mlp.fc1.out_features),
        num_patches=int(pe.num_patches),
        num_prefix=int(model.num_prefix_tokens),
        patch_size=tuple(int(v) for v in conv.kernel_size),
        img_size=tuple(int(v) for v in pe.img_size),
        in_chans=int(conv.in_channels),
        num_classes=int(num_classes),
        qkv_bias=first.attn.qkv.bias is not None,
        num_params=sum(p.numel() for n, p in model.named_parameters() if ".tps_stage." not in f".{n}"),
        final_norm=final,
        norm_pre=_is_layer_norm(getattr(model, "norm_pre", None)),
        patch_norm=_is_layer_norm(getattr(pe, "norm", None)),
        qk_norm=_is_layer_norm(first.attn.q_norm),
        attn_norm=_is_layer_norm(getattr(first.attn, "norm", None)),
        mlp_norm=_is_layer_norm(getattr(first.mlp, "norm", None)),
    )


def geometry(backbone_name: str, img_size: int | None = None, patch_size: int | None = None,
             num_classes: int | None = None) -> ViTGeometry:
    """Geometry of a backbone by name (short names too), built on the `meta` device: no weights, no init cost."""
    import timm

    from ..backbones import vit_name

    timm_name = vit_name(backbone_name)  # a non-ViT fails here with one line naming it
    overrides = {k: v for k, v in
                 (("img_size", img_size), ("patch_size", patch_size), ("num_classes", num_classes)) if v is not None}
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **overrides)
    geo = geometry_from_model(model)
    return ViTGeometry(**{**asdict(geo), "name": timm_name})


# ============================================================================= analytic count
@dataclass(frozen=True)
class MacReport:
    """MACs of one forward pass at batch 1, by part. ``blocks`` = qkv + attention + proj + mlp + norms.

    attention holds the QK^T and AV matmuls; norms the LayerNorms inside the blocks (and norm_pre / the
    patch norm). The method extras are zero for methods that do not have them.
    """

    patch_embed: int = 0
    qkv: int = 0
    attention: int = 0
    proj: int = 0
    mlp: int = 0
    norms: int = 0
    final_norm: int = 0
    head: int = 0
    predictor: int = 0
    cls_attention: int = 0
    fuse: int = 0
    squeeze: int = 0
    matching: int = 0
    similarity: int = 0
    diversity: int = 0
    scoring_pass: int = 0
    rollout: int = 0
    mlerp: int = 0
    tokens: tuple[int, ...] = field(default=(), compare=False)

    @property
    def blocks(self) -> int:
        return self.qkv + self.attention + self.proj + self.mlp + self.norms

    @property
    def backbone(self) -> int:
        return self.patch_embed + self.blocks + self.final_norm + self.head

    @property
    def extras(self) -> int:
        """The method's own cost: predictors, scoring, squeeze/fuse/matching, rollout's scoring pass."""
        return (self.predictor + self.cls_attention + self.fuse + self.squeeze + self.matching
                + self.similarity + self.diversity + self.scoring_pass + self.rollout + self.mlerp)

    @property
    def total(self) -> int:
        return self.backbone + self.extras

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def as_dict(self) -> dict[str, Any]:
        """Every part plus blocks/backbone/extras/total/gmacs, JSON-ready."""
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        d.update(blocks=self.blocks, backbone=self.backbone, extras=self.extras, total=self.total, gmacs=self.gmacs)
        return d


def predictor_macs(n: int, dim: int) -> int:
    """DynamicViT predictor (spec 1.1) on n spatial tokens: LayerNorm 5nC + C->C->C/2->C/4->2 Linears."""
    h, q = dim // 2, dim // 4
    return 5 * n * dim + n * (dim * dim + dim * h + h * q + q * 2)


def predictor_params(dim: int) -> int:
    """Parameters of one DynamicViT predictor (LayerNorm + the four Linears with biases)."""
    h, q = dim // 2, dim // 4
    return 2 * dim + (dim * dim + dim) + (dim * h + h) + (h * q + q) + (q * 2 + 2)


def _block_parts(g: ViTGeometry, n_attn: int, n_mlp: int) -> tuple[int, int, int, int, int]:
    """(qkv, attention matmuls, proj, mlp, norms) MACs of one block."""
    c, a, hid = g.embed_dim, g.attn_dim, g.mlp_hidden
    norms = 5 * (n_attn + n_mlp) * c
    if g.qk_norm:
        norms += 10 * n_attn * a
    if g.attn_norm:
        norms += 5 * n_attn * a
    if g.mlp_norm:
        norms += 5 * n_mlp * hid
    return 3 * n_attn * c * a, 2 * n_attn * n_attn * a, n_attn * a * c, 2 * n_mlp * c * hid, norms


def rollout_scoring_macs(g: ViTGeometry) -> int:
    """Attention rollout's scoring pass: what the scores depend on, on all N0 tokens.

    Blocks 0..L-2 run in full; the last block only up to its attention map (LN1, qkv, QK^T), because
    its AV, proj and MLP feed nothing. The trace drops that dead work too (JIT dead-code elimination).
    """
    n0, c, a = g.num_tokens, g.embed_dim, g.attn_dim
    last = 5 * n0 * c + 3 * n0 * c * a + n0 * n0 * a + (10 * n0 * a if g.qk_norm else 0)
    return (g.depth - 1) * sum(_block_parts(g, n0, n0)) + last


def analytic_macs(config: ReductionConfig, geometry: ViTGeometry) -> MacReport:
    """Closed-form MACs (spec section 5) of ``config`` on a ViT of ``geometry``, batch 1, eval path.

    Builds no model; token counts come from `token_schedule` only. A `hier_flops.HierGeometry` (PVT v1, CvT) is
    counted by `hier_flops.hier_reduced_macs` (a `HierMacReport`: the same ``gmacs``, ``total`` and ``as_dict``).
    """
    if not isinstance(geometry, ViTGeometry):
        from .hier_flops import hier_reduced_macs

        return hier_reduced_macs(config, geometry)
    g = geometry
    c = g.embed_dim
    sched = token_schedule(config, num_patches=g.num_patches, num_prefix=g.num_prefix, depth=g.depth)
    qkv = attn = proj = mlp = norms = 0
    for n_attn, n_mlp in sched.blocks:
        b = _block_parts(g, n_attn, n_mlp)
        qkv, attn, proj, mlp, norms = qkv + b[0], attn + b[1], proj + b[2], mlp + b[3], norms + b[4]
    n0 = g.num_tokens
    if g.norm_pre:
        norms += 5 * n0 * c
    if g.patch_norm:
        norms += 5 * g.num_patches * c
    patch = g.num_patches * c * g.in_chans * g.patch_size[0] * g.patch_size[1]
    final = {"tokens": 5 * sched.final_tokens * c, "pooled": 5 * c, "none": 0}[g.final_norm]
    head = c * g.num_classes

    extras = dict.fromkeys(("predictor", "cls_attention", "fuse", "squeeze", "matching", "similarity",
                            "diversity", "scoring_pass", "rollout", "mlerp"), 0)
    spec = config.spec
    if spec is not None:
        treatment = config.effective_treatment
        for st in sched.stages:
            n = st.before
            if spec.count_rule in RATIO_RULES:
                _ratio_merge_extras(extras, config, g, st)
                continue
            if spec.policy == "predictor":
                extras["predictor"] += predictor_macs(n, c)
            elif spec.policy == "cls_attn":
                extras["cls_attention"] += sched.blocks[st.block][0] * g.attn_dim
            elif spec.policy == "similarity":
                extras["similarity"] += n * n * c + {"cosine": 2 * n * c, "dot": 0, "euclidean": n * c}[
                    config.similarity_metric]
                if config.diversity > 0:
                    extras["diversity"] += 2 * n * st.kept
            elif spec.policy == "merge":
                extras["matching"] += bipartite_matching_macs(n + g.num_prefix, g.num_prefix, g.head_dim)
            if treatment == "squeeze":
                extras["squeeze"] += squeeze_macs(config, st.kept, st.removed, c)
            elif treatment == "fuse":
                extras["fuse"] += st.removed * c
        if sched.scoring_pass:
            extras["scoring_pass"] = rollout_scoring_macs(g)
            extras["rollout"] = (g.depth - 1) * n0 ** 2  # class row carried back through the blocks
    return MacReport(patch_embed=patch, qkv=qkv, attention=attn, proj=proj, mlp=mlp, norms=norms,
                     final_norm=final, head=head, tokens=tuple(sched.counts()), **extras)


def bipartite_matching_macs(tokens: int, num_prefix: int, head_dim: int) -> int:
    """ToMe's bipartite matching on ``tokens`` keys (`reduce.ops.bipartite_soft_matching`): the norm of every
    key plus the A x B cosine scores over the non-prefix sets of `reduce.ops.merge_sets`."""
    a_start, b_start = merge_sets(num_prefix)
    return ((tokens - a_start + 1) // 2) * ((tokens - b_start + 1) // 2) * head_dim + tokens * head_dim


def squeeze_macs(config: ReductionConfig, kept: int, removed: int, dim: int) -> int:
    """One TPS squeeze of ``removed`` tokens into ``kept`` ones: the cosine and the fusion, 2*Nr*Np*C, plus the two
    L2 norms (Nr+Np)*C; only the fusion Nr*Np*C when it matches on the attention map (squeeze_similarity)."""
    if config.squeeze_similarity == "attention":
        return kept * removed * dim
    return 2 * kept * removed * dim + (kept + removed) * dim


def _ratio_merge_extras(extras: dict[str, int], config: ReductionConfig, g: ViTGeometry, st: Stage) -> None:
    """The extras of one ToFu or PiToMe block (spec 9.2, 10.2), added into ``extras``."""
    p, d, c = g.num_prefix, g.head_dim, g.embed_dim
    t = st.before + p
    if config.spec.policy == "energy":  # PiToMe: one cosine matrix of the T non-prefix keys
        extras["matching"] += st.before * st.before * d + st.before * d
        return
    extras["matching"] += bipartite_matching_macs(t, p, d)
    if tofu_merges(st.block, g.depth):
        extras["mlerp"] += t * c + (0 if config.mlerp_dst_norm else (t - st.removed) * c)
    elif config.effective_treatment == "squeeze":
        extras["squeeze"] += squeeze_macs(config, st.kept, st.removed, c)


@dataclass(frozen=True)
class ParamReport:
    """Parameter counts: the backbone's and the reduction's predictors'."""

    backbone: int
    predictor: int = 0

    @property
    def total(self) -> int:
        return self.backbone + self.predictor


def analytic_params(config: ReductionConfig, geometry: ViTGeometry) -> ParamReport:
    """Backbone parameters (from the geometry) plus one DynamicViT predictor per learned stage."""
    if not isinstance(geometry, ViTGeometry):  # PVT v1, CvT: predictors of each stage's width
        from .hier_flops import hier_reduced_params

        return hier_reduced_params(config, geometry)
    spec = config.spec
    n_pred = 0
    if spec is not None and spec.policy == "predictor":
        sched = token_schedule(config, geometry.num_patches, geometry.num_prefix, geometry.depth)
        n_pred = len(sched.stages)
    return ParamReport(backbone=geometry.num_params, predictor=n_pred * predictor_params(geometry.embed_dim))


# ============================================================================= traced count
class UncountedOpError(RuntimeError):
    """The trace met an op with no MAC rule that is not known to be MAC-free."""


#: Ops known to carry no MACs under the convention (elementwise, activations, softmax, reductions without
#: products, indexing/selection, shape and creation ops). fvcore's own ignore list comes on top.
MAC_FREE_OPS: frozenset[str] = frozenset({
    # elementwise arithmetic and activations
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::div", "aten::div_",
    "aten::neg", "aten::exp", "aten::exp_", "aten::log", "aten::log_", "aten::log1p", "aten::sqrt",
    "aten::rsqrt", "aten::pow", "aten::abs", "aten::sign", "aten::reciprocal", "aten::sigmoid",
    "aten::sigmoid_", "aten::tanh", "aten::gelu", "aten::gelu_", "aten::elu", "aten::silu", "aten::silu_",
    "aten::hardswish", "aten::clamp_min", "aten::clamp_min_", "aten::clamp_max", "aten::clamp_max_",
    "aten::minimum", "aten::maximum", "aten::where", "aten::masked_fill_", "aten::lerp",
    "aten::round", "aten::ceil", "aten::trunc",
    "aten::pad",  # Swin pads its grid to whole windows (hierarchical backbones, measure/hier_flops.py)
    # softmax and reductions without products
    "aten::softmax", "aten::log_softmax", "aten::_softmax", "aten::sum", "aten::mean", "aten::amax",
    "aten::amin", "aten::min", "aten::argmax", "aten::argmin", "aten::cumsum", "aten::any", "aten::all",
    # comparison and logic
    "aten::lt", "aten::le", "aten::ne", "aten::logical_not", "aten::logical_and", "aten::logical_or",
    "aten::isnan", "aten::isinf",
    # selection, ordering, gather/scatter
    "aten::topk", "aten::sort", "aten::argsort", "aten::scatter", "aten::scatter_", "aten::scatter_add",
    "aten::scatter_add_", "aten::scatter_reduce", "aten::scatter_reduce_", "aten::index_select",
    "aten::index_copy", "aten::index_copy_", "aten::index_add", "aten::index_add_", "aten::index_put",
    "aten::take_along_dim", "aten::masked_select",
    "aten::diagonal", "aten::diag", "aten::tril", "aten::triu", "aten::one_hot",
    # shape, copy and creation
    "aten::expand_as", "aten::repeat", "aten::repeat_interleave", "aten::clone", "aten::alias",
    "aten::lift_fresh", "aten::detach_", "aten::fill_", "aten::zero_", "aten::eye", "aten::ones_like",
    "aten::new_ones", "aten::empty_like", "aten::empty_strided", "aten::scalar_tensor", "aten::tensor",
    "aten::movedim", "aten::unflatten", "aten::numel", "aten::dim", "aten::linspace", "aten::meshgrid",
    "aten::div_floor", "aten::feature_dropout", "aten::alpha_dropout", "aten::_unsafe_view", "aten::as_strided",
    # randomness (seeded selection)
    "aten::rand", "aten::randn", "aten::rand_like", "aten::randn_like", "aten::randperm", "aten::bernoulli",
    "aten::multinomial", "aten::uniform_", "aten::normal_",
})


def _shape(value: Any) -> list[int] | None:
    try:
        sizes = value.type().sizes()
    except Exception:  # noqa: BLE001 - non-tensor values have no sizes
        return None
    return list(sizes) if sizes is not None else None


def _numel(value: Any) -> int:
    s = _shape(value)
    if s is None:
        raise UncountedOpError("model: an op's tensor shape is unknown in the trace; cannot count its MACs")
    return math.prod(s)


def _matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """matmul/mm/bmm with any broadcasting: numel(out) * contraction length."""
    a = _shape(inputs[0])
    if a is None:
        raise UncountedOpError("model: a matmul operand has an unknown shape in the trace")
    return _numel(outputs[0]) * a[-1]


def _baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """baddbmm(input, b1, b2): the batched product b1 @ b2 (the scaled add carries no MACs)."""
    b1 = _shape(inputs[1])
    if b1 is None:
        raise UncountedOpError("model: a baddbmm operand has an unknown shape in the trace")
    return _numel(outputs[0]) * b1[-1]


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """scaled_dot_product_attention: QK^T (Nq*Nk*d) + AV (Nq*Nk*dv) per batch and head."""
    q, k, v = (_shape(x) for x in inputs[:3])
    if q is None or k is None or v is None:
        raise UncountedOpError("model: scaled_dot_product_attention operands have unknown shapes")
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _vector_norm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """L2 (vector) norm: one multiply-accumulate per input element."""
    return _numel(inputs[0])


def _cdist_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """cdist (B, P, M) x (B, R, M): one squared-difference accumulate per pair and coordinate."""
    a = _shape(inputs[0])
    if a is None:
        raise UncountedOpError("model: cdist operands have unknown shapes")
    return _numel(outputs[0]) * a[-1]


_WEIGHTED_SUM_REDUCTIONS = ("aten::sum", "aten::mean")


def _mul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """Elementwise mul is free, unless its product feeds a sum/mean: then it is a weighted sum (1 MAC/elem)."""
    out = outputs[0]
    if any(use.user.kind() in _WEIGHTED_SUM_REDUCTIONS for use in out.uses()):
        return _numel(out)
    return 0


#: Handles added to fvcore's defaults (which cover linear, addmm, conv, einsum, layer_norm, ...).
EXTRA_OP_RULES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::matmul": _matmul_macs,
    "aten::mm": _matmul_macs,
    "aten::bmm": _matmul_macs,
    "aten::baddbmm": _baddbmm_macs,
    "aten::linalg_vector_norm": _vector_norm_macs,
    "aten::norm": _vector_norm_macs,
    "aten::frobenius_norm": _vector_norm_macs,
    "aten::cdist": _cdist_macs,
    "aten::mul": _mul_macs,
    "aten::mul_": _mul_macs,
}


@dataclass(frozen=True)
class TracedMacs:
    """MACs counted by tracing one forward pass (batch 1, eval, no_grad).

    by_operator: MACs per op name; by_module: per top-level child of the model, with 'other' for ops the
    patched forward runs outside any child (class-attention row, squeeze, fuse, matching, rollout).
    params: every parameter of the model, predictors included.
    """

    total: int
    by_operator: dict[str, int]
    by_module: dict[str, int]
    params: int
    input_size: tuple[int, ...]

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def _input_for(model: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    if input_size is None:
        pe = getattr(model, "patch_embed", None)
        cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if pe is not None and hasattr(pe, "img_size"):
            input_size = (1, pe.proj.in_channels, *pe.img_size)
        elif cfg_size is not None:  # hierarchical backbones (PVT v1/v2, CvT): the size they were built for
            input_size = (1, *cfg_size)
        else:
            raise ValueError("input_size: required for a model without patch_embed or pretrained_cfg input_size")
    size = tuple(input_size)
    if len(size) != 4 or any(not isinstance(v, int) or v <= 0 for v in size):
        raise ValueError(f"input_size: {input_size!r} must be four positive ints (1, C, H, W)")
    if size[0] != 1:
        raise ValueError(f"input_size: batch {size[0]} is not allowed; MACs are counted per image at batch 1")
    ref = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(size, generator=gen).to(device=ref.device, dtype=ref.dtype)


def traced_macs(model: nn.Module, input_size: tuple[int, ...] | None = None) -> TracedMacs:
    """Count MACs with fvcore on the eval path at batch 1 (default input: the model's own image size).

    Raises UncountedOpError naming every op the trace met that has no MAC rule and is not in
    `MAC_FREE_OPS`. The model's train/eval mode is restored afterwards. The JIT trace drops dead work
    (ops whose results feed nothing), so this counts what the output depends on; `cross_check` counts
    everything executed, and a ratio below 1 there flags dead work.
    """
    x = _input_for(model, input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's import and the JIT tracer warn about deprecations
            from fvcore.nn import FlopCountAnalysis

            fa = FlopCountAnalysis(model, x)
            fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            for name, rule in EXTRA_OP_RULES.items():
                fa.set_op_handle(name, rule)
            total = int(fa.total())
            unknown = {op: n for op, n in fa.unsupported_ops().items() if op not in MAC_FREE_OPS}
            if unknown:
                listed = ", ".join(f"{op} x{n}" for op, n in sorted(unknown.items()))
                raise UncountedOpError(
                    f"model: the trace met ops with no MAC rule: {listed}; add a rule to "
                    "tpsexplore.measure.flops.EXTRA_OP_RULES, or to MAC_FREE_OPS if they carry no MACs")
            by_op = {k: int(v) for k, v in fa.by_operator().items() if v}
            mods = fa.by_module()
            children = {name: int(mods.get(name, 0)) for name, _ in model.named_children()}
    finally:
        model.train(was_training)
    by_module = {k: v for k, v in children.items() if v}
    by_module["other"] = total - sum(children.values())
    return TracedMacs(total=total, by_operator=by_op, by_module=by_module,
                      params=sum(p.numel() for p in model.parameters()), input_size=tuple(x.shape))


@dataclass(frozen=True)
class CrossCheck:
    """fvcore's traced MACs against FlopCounterMode's (its FLOPs / 2) and their ratio.

    FlopCounterMode counts only matmul-like ops (mm, bmm, addmm, conv, attention), not LayerNorm or L2
    norms, so the ratio sits slightly above 1 (about 1.002 for DeiT-S).
    """

    fvcore_macs: int
    flop_counter_macs: int

    @property
    def ratio(self) -> float:
        return self.fvcore_macs / self.flop_counter_macs if self.flop_counter_macs else math.inf


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """FlopCounterMode formula (shapes in, FLOPs out): 2 FLOPs per MAC of QK^T and AV."""
    return 2 * math.prod(query_shape[:-1]) * key_shape[-2] * (query_shape[-1] + value_shape[-1])


def _flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils import flop_counter as fc

    custom = {}
    # the CPU fused-attention kernel has no formula in torch's registry (torch 2.14): add one
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in fc.flop_registry:
        custom[cpu_sdpa] = _sdpa_flops
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def cross_check(model: nn.Module, input_size: tuple[int, ...] | None = None) -> CrossCheck:
    """Trace with fvcore and run under FlopCounterMode; return both MAC totals (ratio = fvcore / torch)."""
    traced = traced_macs(model, input_size)
    return CrossCheck(fvcore_macs=traced.total, flop_counter_macs=_flop_counter_macs(model, _input_for(model, input_size)))
