"""CvT (Wu et al., ICCV 2021, arXiv 2103.15808): CvT-13 and CvT-21 as models of this project.

Written from the paper and the official configurations (``microsoft/CvT`` ``cvt-13-224x224.yaml`` /
``cvt-21-224x224.yaml``; methods-spec 13.2): three stages of dims 64/192/384, heads 1/3/6, MLP ratio 4, depths
1-2-10 (CvT-13) and 1-4-16 (CvT-21). Each stage starts with an overlapping conv embedding (7x7/s4/p2, then
3x3/s2/p1) and a LayerNorm; there is no position embedding. In every block, q, k and v each pass a depthwise 3x3
conv (no bias) and a BatchNorm on the token grid (stride 1 for q, 2 for k and v) before their Linear. The class
token exists only in the last stage; it is split off before the convs and put back in front after them.

Quirks kept from the official code: QuickGELU (x * sigmoid(1.702 x)) instead of GELU; LayerNorm (eps 1e-5)
computed in fp32; the attention scale is dim^-1/2 with the full embedding dim, not the head dim. Output =
head(norm(cls)). Attention runs through torch's fused ``scaled_dot_product_attention`` (with that scale).

Parameter names are those of the official checkpoints (``lib/models/cls_cvt.py``), listed by `official_shapes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, QuickGELU, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._registry import create, image_cfg

__all__ = ["CVT_13", "CVT_21", "ConvolutionalVisionTransformer", "CvTConfig", "official_shapes"]


@dataclass(frozen=True)
class CvTConfig:
    """Architecture of a CvT: one entry per stage (conv embedding, blocks, class token)."""

    embed_dims: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depths: tuple[int, ...] = (1, 2, 10)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0)
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2)
    patch_paddings: tuple[int, ...] = (2, 1, 1)
    cls_token: tuple[bool, ...] = (False, False, True)
    kernel_qkv: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    padding_q: int = 1
    padding_kv: int = 1
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        n = len(self.depths)
        if n == 0 or any(d <= 0 for d in self.depths):
            raise ValueError(f"depths: {self.depths!r}; allowed: one or more positive ints")
        for name in ("embed_dims", "num_heads", "mlp_ratios", "patch_sizes", "patch_strides", "patch_paddings",
                     "cls_token"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"{name}: {value!r} must hold {n} values, one per stage (depths {self.depths})")
        if any(d % h for d, h in zip(self.embed_dims, self.num_heads)):
            raise ValueError(f"num_heads: {self.num_heads!r} do not divide embed_dims {self.embed_dims!r}")
        if any(self.cls_token[:-1]):
            raise ValueError(f"cls_token: {self.cls_token!r}; allowed: a class token in the last stage only")
        if self.stride_q != 1:
            raise ValueError(f"stride_q: {self.stride_q}; allowed: 1 (one query per token)")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def mlp_hidden(self, stage: int) -> int:
        return int(self.embed_dims[stage] * self.mlp_ratios[stage])

    def grids(self, img_size: int | tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid (h, w) of every stage for an input of ``img_size`` (conv output sizes)."""
        size = to_2tuple(img_size)
        out = []
        for k, s, p in zip(self.patch_sizes, self.patch_strides, self.patch_paddings):
            size = tuple((v + 2 * p - k) // s + 1 for v in size)
            out.append(size)
        return out

    def kv_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Grid of the keys/values after the strided depthwise conv."""
        k, s, p = self.kernel_qkv, self.stride_kv, self.padding_kv
        return tuple((v + 2 * p - k) // s + 1 for v in grid)


CVT_13 = CvTConfig(depths=(1, 2, 10))
CVT_21 = CvTConfig(depths=(1, 4, 16))


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (the official CvT's fp16 guard)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ConvProjection(nn.Module):
    """Depthwise conv (no bias) + BatchNorm on the (B, C, H, W) grid, returned as tokens (B, h*w, C)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(grid)).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """CvT attention: conv projections of the grid, then Linear q/k/v, global attention, output Linear.

    ``num_prefix`` class tokens bypass the convs and are put in front of q, k and v.
    """

    def __init__(self, dim: int, num_heads: int, config: CvTConfig, num_prefix: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_prefix = num_prefix
        self.scale = dim ** -0.5  # official: the full dim, not the head dim
        c = config
        self.conv_proj_q = ConvProjection(dim, c.kernel_qkv, c.stride_q, c.padding_q)
        self.conv_proj_k = ConvProjection(dim, c.kernel_qkv, c.stride_kv, c.padding_kv)
        self.conv_proj_v = ConvProjection(dim, c.kernel_qkv, c.stride_kv, c.padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=c.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=c.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=c.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        p = self.num_prefix
        grid = x[:, p:].transpose(1, 2).reshape(b, c, size[0], size[1])
        q, k, v = self.conv_proj_q(grid), self.conv_proj_k(grid), self.conv_proj_v(grid)
        if p:
            prefix = x[:, :p]
            q, k, v = (torch.cat([prefix, t], dim=1) for t in (q, k, v))
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm block: conv attention and a QuickGELU MLP, fp32 LayerNorms."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, config: CvTConfig, num_prefix: int = 0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNormFp32(dim, eps=1e-5)
        self.attn = ConvAttention(dim, num_heads, config, num_prefix)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNormFp32(dim, eps=1e-5)
        self.mlp = Mlp(dim, mlp_hidden, act_layer=QuickGELU)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Overlapping conv embedding (with bias) and a LayerNorm over the tokens."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=padding)
        self.norm = LayerNormFp32(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


class CvTStage(nn.Module):
    """One stage (the official ``VisionTransformer``): conv embedding, optional class token, blocks."""

    def __init__(self, stage: int, in_chans: int, config: CvTConfig, drop_rate: float = 0.0,
                 drop_path_rates: list[float] | None = None) -> None:
        super().__init__()
        c, i = config, stage
        dim = c.embed_dims[i]
        self.patch_embed = ConvEmbed(in_chans, dim, c.patch_sizes[i], c.patch_strides[i], c.patch_paddings[i])
        self.num_prefix = 1 if c.cls_token[i] else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_prefix else None
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates or [0.0] * c.depths[i]
        self.blocks = nn.ModuleList(Block(dim, c.num_heads[i], c.mlp_hidden(i), c, self.num_prefix, rates[j])
                                    for j in range(c.depths[i]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C_in, H, W) -> (grid (B, C, h, w), class token (B, 1, C) or None)."""
        b = x.shape[0]
        tokens, size = self.patch_embed(x)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = self.pos_drop(tokens)
        for blk in self.blocks:
            tokens = blk(tokens, size)
        cls = tokens[:, :self.num_prefix] if self.num_prefix else None
        grid = tokens[:, self.num_prefix:].transpose(1, 2).reshape(b, -1, size[0], size[1])
        return grid, cls


class ConvolutionalVisionTransformer(nn.Module):
    """CvT classifier: ``stage0`` .. ``stage{n-1}``, ``norm`` and ``head`` (official naming).

    ``img_size`` is the input the model is built for (CvT itself takes any size; it has no position embedding).
    """

    def __init__(self, config: CvTConfig = CVT_13, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if not isinstance(config, CvTConfig):
            raise ValueError(f"config: {type(config).__name__}; allowed: a CvTConfig")
        self.config = config
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_stages = config.num_stages
        self.num_prefix_tokens = 1 if config.cls_token[-1] else 0
        self.num_features = self.head_hidden_size = config.embed_dims[-1]
        grids = config.grids(self.img_size)
        if min(min(config.kv_grid(g)) for g in grids) < 1:
            raise ValueError(f"img_size: {self.img_size} is too small for {self.num_stages} CvT stages")
        self.grids = tuple(grids)
        for i in range(self.num_stages):
            d = config.depths[i]
            # official: stochastic depth grows linearly within each stage up to the stage's rate
            rates = [drop_path_rate * k / max(d - 1, 1) for k in range(d)] if i == self.num_stages - 1 else None
            setattr(self, f"stage{i}", CvTStage(i, in_chans if i == 0 else config.embed_dims[i - 1], config,
                                                drop_rate, rates))
        self.norm = LayerNormFp32(config.embed_dims[-1], eps=1e-5)
        self.head = nn.Linear(config.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: truncated normal (std .02) for Linears and class tokens, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, CvTStage) and m.cls_token is not None:
                trunc_normal_(m.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stage{i}.cls_token" for i in range(self.num_stages)}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the final-normed class token (B, C), or the normed mean of the last grid without one."""
        cls = None
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        if cls is not None:
            return self.norm(cls)[:, 0]
        return self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def official_shapes(config: CvTConfig = CVT_13, in_chans: int = 3, num_classes: int = 1000
                    ) -> dict[str, tuple[int, ...]]:
    """Every key of an official CvT checkpoint with its shape (``microsoft/CvT`` ``lib/models/cls_cvt.py``).

    Stage i = 0..2: ``stage{i}.patch_embed.{proj,norm}.{weight,bias}``, ``stage{i}.cls_token`` (last stage only),
    ``stage{i}.blocks.{j}.{norm1,norm2,mlp.fc1,mlp.fc2,attn.proj_q,attn.proj_k,attn.proj_v,attn.proj}.{weight,bias}``,
    ``stage{i}.blocks.{j}.attn.conv_proj_{q,k,v}.conv.weight`` (no bias) and ``...conv_proj_{q,k,v}.bn.{weight,
    bias,running_mean,running_var,num_batches_tracked}``; then ``norm.{weight,bias}`` and ``head.{weight,bias}``.
    Written from the layout, not from a model. ``num_batches_tracked`` has shape ().
    """
    out: dict[str, tuple[int, ...]] = {}

    def linear(key: str, n_in: int, n_out: int, bias: bool = True) -> None:
        out[f"{key}.weight"] = (n_out, n_in)
        if bias:
            out[f"{key}.bias"] = (n_out,)

    def norm(key: str, dim: int) -> None:
        out[f"{key}.weight"] = out[f"{key}.bias"] = (dim,)

    c_in = in_chans
    for i, c in enumerate(config.embed_dims):
        k = config.patch_sizes[i]
        out[f"stage{i}.patch_embed.proj.weight"] = (c, c_in, k, k)
        out[f"stage{i}.patch_embed.proj.bias"] = (c,)
        norm(f"stage{i}.patch_embed.norm", c)
        if config.cls_token[i]:
            out[f"stage{i}.cls_token"] = (1, 1, c)
        for j in range(config.depths[i]):
            p = f"stage{i}.blocks.{j}"
            norm(f"{p}.norm1", c)
            for t in "qkv":
                out[f"{p}.attn.conv_proj_{t}.conv.weight"] = (c, 1, config.kernel_qkv, config.kernel_qkv)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    out[f"{p}.attn.conv_proj_{t}.bn.{name}"] = (c,)
                out[f"{p}.attn.conv_proj_{t}.bn.num_batches_tracked"] = ()
                linear(f"{p}.attn.proj_{t}", c, c, config.qkv_bias)
            linear(f"{p}.attn.proj", c, c)
            norm(f"{p}.norm2", c)
            linear(f"{p}.mlp.fc1", c, config.mlp_hidden(i))
            linear(f"{p}.mlp.fc2", config.mlp_hidden(i), c)
        c_in = c
    norm("norm", config.embed_dims[-1])
    if num_classes > 0:
        linear("head", config.embed_dims[-1], num_classes)
    return out


# ----------------------------------------------------------------------------- timm registry
def _cfg(**kwargs) -> dict:
    return image_cfg("stage0.patch_embed.proj", "mit", 0.875, **kwargs)


default_cfgs = generate_default_cfgs({"cvt_13": _cfg(), "cvt_21": _cfg()})


def _create(variant: str, config: CvTConfig, pretrained: bool, **kwargs) -> ConvolutionalVisionTransformer:
    return create(variant, ConvolutionalVisionTransformer, config, default_cfgs, pretrained, **kwargs)


@register_model
def cvt_13(pretrained: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-13 (20.0 M params, 4.6 GMACs at 224)."""
    return _create("cvt_13", CVT_13, pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs) -> ConvolutionalVisionTransformer:
    """CvT-21 (31.6 M params, 7.2 GMACs at 224)."""
    return _create("cvt_21", CVT_21, pretrained, **kwargs)
