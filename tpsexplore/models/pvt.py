"""PVT v1 (Wang et al., ICCV 2021, arXiv 2102.12122), tiny and small, as models of this project.

Written from the paper and the official configurations (methods-spec 13.2): four stages of dims 64/128/320/512,
heads 1/2/5/8, MLP ratios 8/8/4/4, spatial-reduction ratios 8/4/2/1, depths 2-2-2-2 (tiny) and 3-4-6-3 (small),
qkv bias, patch embeddings 4x4/s4 then 2x2/s2 (each followed by a LayerNorm, eps 1e-5), one learned position
embedding per stage. Spatial-reduction attention (SRA) takes its keys and values from a strided conv of the grid
(k = s = r) plus a LayerNorm (eps 1e-5); queries are per token. The blocks' LayerNorms use eps 1e-6. The class
token exists only in the last stage (r = 1, so its attention is global); prediction = head(norm(tokens)[:, 0]).

Parameter names are those of the official checkpoints (``whai362/PVT`` ``classification/pvt.py``), listed by
`official_shapes`, so an official state dict loads strictly. Attention runs through torch's fused
``scaled_dot_product_attention``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._registry import create, image_cfg

__all__ = ["PVTConfig", "PVT_SMALL", "PVT_TINY", "PyramidVisionTransformerV1", "official_shapes"]


@dataclass(frozen=True)
class PVTConfig:
    """Architecture of a PVT v1: one entry per stage; the class token sits in the last stage."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    patch_size: int = 4
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        n = len(self.depths)
        for name in ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios"):
            value = getattr(self, name)
            if len(value) != n or any(v <= 0 for v in value):
                raise ValueError(f"{name}: {value!r} must hold {n} positive values, one per stage "
                                 f"(depths {self.depths})")
        if n == 0 or any(d <= 0 for d in self.depths):
            raise ValueError(f"depths: {self.depths!r}; allowed: one or more positive ints")
        bad = [(d, h) for d, h in zip(self.embed_dims, self.num_heads) if d % h]
        if bad:
            raise ValueError(f"num_heads: {self.num_heads!r} do not divide embed_dims {self.embed_dims!r}")
        if self.sr_ratios[-1] != 1:
            raise ValueError(f"sr_ratios: {self.sr_ratios!r}; the last stage carries the class token and must "
                             "have ratio 1 (global attention)")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size: {self.patch_size!r}; allowed: a positive int")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])

    def grids(self, img_size: int | tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid (h, w) of every stage for an input of ``img_size``."""
        h, w = to_2tuple(img_size)
        out = [(h // self.patch_size, w // self.patch_size)]
        for _ in range(1, self.num_stages):
            out.append((out[-1][0] // 2, out[-1][1] // 2))
        return out


PVT_TINY = PVTConfig(depths=(2, 2, 2, 2))
PVT_SMALL = PVTConfig(depths=(3, 4, 6, 3))


class PatchEmbed(nn.Module):
    """Non-overlapping k = s patch conv, then a LayerNorm (PyTorch's default eps, as in the official code)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class SRAttention(nn.Module):
    """Spatial-reduction attention: queries per token, keys/values from the grid reduced by a k = s = r conv.

    With r = 1 there is no conv (plain global attention over every token, the class token included).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        src = x
        if self.sr is not None:  # only in stages without a class token: every token is a grid cell
            grid = x.transpose(1, 2).reshape(b, c, size[0], size[1])
            src = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(src).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with SRA (LayerNorm eps 1e-6, GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, sr_ratio: int, qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SRAttention(dim, num_heads, sr_ratio, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PyramidVisionTransformerV1(nn.Module):
    """PVT v1 classifier. ``img_size`` sizes the position embeddings (other input sizes are resampled bilinearly).

    Stage s (1-based, official naming) has ``patch_embed{s}``, ``pos_embed{s}``, ``pos_drop{s}`` and ``block{s}``;
    then ``norm``, ``cls_token`` and ``head``.
    """

    def __init__(self, config: PVTConfig = PVT_SMALL, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not isinstance(config, PVTConfig):
            raise ValueError(f"config: {type(config).__name__}; allowed: a PVTConfig")
        self.config = config
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_stages = config.num_stages
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = config.embed_dims[-1]
        grids = config.grids(self.img_size)
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"img_size: {self.img_size} is too small for {self.num_stages} stages "
                             f"(patch {config.patch_size}, then 2x2 per stage)")
        self.grids = tuple(grids)
        total = sum(config.depths)
        rates = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]  # no tensor: meta builds too
        first = 0
        for i in range(self.num_stages):
            dim = config.embed_dims[i]
            last = i == self.num_stages - 1
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(in_chans if i == 0 else config.embed_dims[i - 1], dim,
                                                            config.patch_size if i == 0 else 2))
            num_pos = grids[i][0] * grids[i][1] + (1 if last else 0)
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, num_pos, dim)))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dim, config.num_heads[i], config.mlp_hidden(i), config.sr_ratios[i], config.qkv_bias,
                      rates[first + j]) for j in range(config.depths[i])))
            first += config.depths[i]
        self.norm = nn.LayerNorm(config.embed_dims[-1], eps=1e-6)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dims[-1]))
        self.head = nn.Linear(config.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: truncated normal (std .02) for position embeddings, class token and Linears."""
        for i in range(self.num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, stage: int, size: tuple[int, int]) -> torch.Tensor:
        """The stage's position embedding, resampled bilinearly when the grid differs from the built one."""
        pos = getattr(self, f"pos_embed{stage + 1}")
        if tuple(size) == self.grids[stage]:
            return pos
        prefix = 1 if stage == self.num_stages - 1 else 0
        gh, gw = self.grids[stage]
        grid = pos[:, prefix:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=size, mode="bilinear").flatten(2).transpose(1, 2)
        return torch.cat([pos[:, :prefix], grid], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> final-normed tokens of the last stage (B, 1 + h*w, C), class token first."""
        b = x.shape[0]
        for i in range(self.num_stages):
            tokens, size = getattr(self, f"patch_embed{i + 1}")(x)
            if i == self.num_stages - 1:
                tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
            tokens = getattr(self, f"pos_drop{i + 1}")(tokens + self._pos_embed(i, size))
            for blk in getattr(self, f"block{i + 1}"):
                tokens = blk(tokens, size)
            if i != self.num_stages - 1:
                x = tokens.transpose(1, 2).reshape(b, -1, size[0], size[1])
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def official_shapes(config: PVTConfig = PVT_SMALL, img_size: int = 224, in_chans: int = 3,
                    num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every key of an official PVT v1 checkpoint with its shape (``whai362/PVT`` ``classification/pvt.py``).

    Stage s = 1..4: ``patch_embed{s}.{proj,norm}.{weight,bias}``, ``pos_embed{s}`` (the last with one extra,
    leading row for the class token), ``block{s}.{j}.{norm1,attn.q,attn.kv,attn.proj,norm2,mlp.fc1,mlp.fc2}
    .{weight,bias}`` and, where r > 1, ``block{s}.{j}.attn.{sr,norm}.{weight,bias}``; then ``cls_token``,
    ``norm.{weight,bias}`` and ``head.{weight,bias}``. Written from the layout, not from a model, so a test can
    check that the model's names and shapes are the official ones.
    """
    out: dict[str, tuple[int, ...]] = {}
    grids = config.grids(img_size)
    dims = config.embed_dims

    def linear(key: str, n_in: int, n_out: int, bias: bool = True) -> None:
        out[f"{key}.weight"] = (n_out, n_in)
        if bias:
            out[f"{key}.bias"] = (n_out,)

    def norm(key: str, dim: int) -> None:
        out[f"{key}.weight"] = out[f"{key}.bias"] = (dim,)

    for i, c in enumerate(dims):
        s, last = i + 1, i == len(dims) - 1
        k, c_in = (config.patch_size, in_chans) if i == 0 else (2, dims[i - 1])
        out[f"patch_embed{s}.proj.weight"] = (c, c_in, k, k)
        out[f"patch_embed{s}.proj.bias"] = (c,)
        norm(f"patch_embed{s}.norm", c)
        out[f"pos_embed{s}"] = (1, grids[i][0] * grids[i][1] + (1 if last else 0), c)
        r = config.sr_ratios[i]
        for j in range(config.depths[i]):
            p = f"block{s}.{j}"
            norm(f"{p}.norm1", c)
            linear(f"{p}.attn.q", c, c, config.qkv_bias)
            linear(f"{p}.attn.kv", c, 2 * c, config.qkv_bias)
            linear(f"{p}.attn.proj", c, c)
            if r > 1:
                out[f"{p}.attn.sr.weight"] = (c, c, r, r)
                out[f"{p}.attn.sr.bias"] = (c,)
                norm(f"{p}.attn.norm", c)
            norm(f"{p}.norm2", c)
            linear(f"{p}.mlp.fc1", c, config.mlp_hidden(i))
            linear(f"{p}.mlp.fc2", config.mlp_hidden(i), c)
    out["cls_token"] = (1, 1, dims[-1])
    norm("norm", dims[-1])
    if num_classes > 0:
        linear("head", dims[-1], num_classes)
    return out


# ----------------------------------------------------------------------------- timm registry
def _cfg(**kwargs) -> dict:
    return image_cfg("patch_embed1.proj", "apache-2.0", 0.9, **kwargs)


default_cfgs = generate_default_cfgs({"pvt_v1_tiny": _cfg(), "pvt_v1_small": _cfg()})


#: patch_size is not a [model] override here: the 4x4 first embedding is the model's (a proxy's ViT
#: patch_size does not apply)
def _create(variant: str, config: PVTConfig, pretrained: bool, **kwargs) -> PyramidVisionTransformerV1:
    return create(variant, PyramidVisionTransformerV1, config, default_cfgs, pretrained,
                  exclude=frozenset({"patch_size"}), **kwargs)


@register_model
def pvt_v1_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """PVT-Tiny (13.2 M params, 1.9 GMACs at 224)."""
    return _create("pvt_v1_tiny", PVT_TINY, pretrained, **kwargs)


@register_model
def pvt_v1_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformerV1:
    """PVT-Small (24.5 M params, 3.8 GMACs at 224)."""
    return _create("pvt_v1_small", PVT_SMALL, pretrained, **kwargs)
