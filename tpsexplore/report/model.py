"""Rebuilding a study's model for one trial: the backbone description, the reduced model and its weights."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..backbones import (build_timm_model, create_backbone, is_hierarchical_name, read_state_dict,
                         resolve_name)
from ..manifest import StudyManifest
from ..reduce import ReductionConfig, apply

TIMM_KEYS = ("img_size", "patch_size", "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "in_chans")
#: keys of a backbone description that are not ``create_backbone`` overrides
DESCRIPTION_KEYS = ("name", "timm_name", "weights")


def is_hierarchical_backbone(backbone: dict[str, Any]) -> bool:
    """True when a backbone description names a hierarchical backbone (PVT v1/v2, CvT, Swin; meta build)."""
    return is_hierarchical_name(backbone.get("timm_name") or backbone["name"])


def backbone_description(manifest: StudyManifest) -> dict[str, Any]:
    """``{"name", "timm_name", "img_size", "patch_size", "num_classes", ..., "weights"}`` from the study's manifest:
    its timm overrides, completed by its geometry, and the starting weights' provenance.

    A hierarchical backbone (PVT v1/v2, CvT, Swin) keeps every override the study built it with (the manifest's
    ``model_kwargs``: embed_dims, num_heads, depths, mlp_ratios, img_size, ...) and no ViT patch_size: its own
    patch embeddings set the token grids."""
    g = manifest.geometry
    out: dict[str, Any] = {"name": manifest.backbone, "timm_name": manifest.timm_name}
    if is_hierarchical_name(manifest.timm_name or manifest.backbone):
        out.update({"img_size": g.img_size, "num_classes": g.num_classes})
        out.update({k: v for k, v in manifest.model_kwargs.items() if k not in DESCRIPTION_KEYS and v is not None})
    else:
        out.update({"img_size": g.img_size, "patch_size": g.patch_size, "num_classes": g.num_classes})
        out.update({k: v for k, v in manifest.model_kwargs.items() if k in TIMM_KEYS and v is not None})
    w = manifest.weights
    out["weights"] = {k: v for k, v in {"source": w.source, "checkpoint": w.checkpoint, "note": w.note}.items()
                      if v is not None}
    return out


def timm_overrides(backbone: dict[str, Any]) -> dict[str, Any]:
    """The timm ``create_model`` keyword overrides of a backbone description: the ViT keys (`TIMM_KEYS`), or for a
    hierarchical backbone every key but name, timm_name and weights (the study's ``model_kwargs`` as recorded)."""
    if is_hierarchical_backbone(backbone):
        return {k: v for k, v in backbone.items() if k not in DESCRIPTION_KEYS and v is not None}
    return {k: backbone[k] for k in TIMM_KEYS if backbone.get(k) is not None}


def overrides_from_state(state: dict[str, torch.Tensor], num_prefix: int = 1) -> dict[str, Any]:
    """img_size, patch_size, num_classes, depth and embed_dim read from a ViT state dict's shapes."""
    out: dict[str, Any] = {}
    w = state.get("patch_embed.proj.weight")
    if w is not None:
        out["patch_size"] = int(w.shape[-1])
        out["embed_dim"] = int(w.shape[0])
        out["in_chans"] = int(w.shape[1])
    pos = state.get("pos_embed")
    if pos is not None and "patch_size" in out:
        n = int(pos.shape[1]) - num_prefix
        side = math.isqrt(max(n, 0))
        if side * side == n:
            out["img_size"] = side * out["patch_size"]
    head = state.get("head.weight")
    if head is not None:
        out["num_classes"] = int(head.shape[0])
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if blocks:
        out["depth"] = max(blocks) + 1
    return out


def meta_model(backbone: dict[str, Any]) -> torch.nn.Module:
    """The model of a backbone description on the meta device (no weights, no init cost); one-line ValueError when
    its overrides do not build it."""
    with torch.device("meta"):
        return build_timm_model(backbone.get("timm_name") or resolve_name(backbone["name"]), **timm_overrides(backbone))


def backbone_geometry(backbone: dict[str, Any]) -> Any:
    """The `ViTGeometry` of a backbone description, or the `hier_flops.HierGeometry` of a hierarchical one (built on
    the meta device: no weights, no init cost). Either one is what `measure.flops.analytic_macs` counts on."""
    from ..measure.flops import model_geometry

    return model_geometry(meta_model(backbone))


def with_weight_geometry(backbone: dict[str, Any], weights: str | Path) -> dict[str, Any]:
    """``backbone`` with img_size, patch_size, num_classes, depth and embed_dim it lacks read from ``weights`` (a
    ViT's; a hierarchical backbone's description carries every override the study used and is returned as it is)."""
    from safetensors import safe_open

    if is_hierarchical_backbone(backbone):
        return dict(backbone)

    p = Path(weights)
    if p.suffix == ".safetensors":
        with safe_open(str(p), framework="pt") as fh:
            shapes = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()
                      if k in ("patch_embed.proj.weight", "pos_embed", "head.weight") or k.startswith("blocks.")}
    else:
        shapes = read_state_dict(p)
    out = dict(backbone)
    for key, value in overrides_from_state(shapes).items():
        if out.get(key) is None and key in ("img_size", "patch_size", "num_classes", "depth", "embed_dim"):
            out[key] = value
    return out


def build_model(backbone: dict[str, Any], config: ReductionConfig | dict | str | None = None,
                weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A timm ViT or a hierarchical backbone (PVT v1/v2, CvT, Swin) from a backbone description, reduced by
    ``config``, with ``weights`` when given.

    Weights saved by a search hold the patched model's state (predictors included), so the config is
    applied before they are loaded; a plain backbone checkpoint (no predictor keys) loads too, and then the
    predictors keep their initialisation. Every other key must match in name and shape (one-line ValueError).
    Without weights the model is randomly initialised. A deployment config's recorded geometry is checked by
    `apply` (ViT and hierarchical alike).
    """
    kwargs = timm_overrides(backbone)
    state = None
    if weights is not None:
        state = read_state_dict(weights)
        if not is_hierarchical_backbone(backbone):  # a ViT's geometry can be read from its state dict's shapes
            for key, value in overrides_from_state(state).items():
                if key in ("img_size", "patch_size", "num_classes", "depth", "embed_dim"):
                    kwargs.setdefault(key, value)
    model = create_backbone(backbone.get("timm_name") or backbone["name"], weights="random", **kwargs)
    if config is not None:
        apply(model, config)
    if state is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in state and ".tps_stage." not in f".{k}"]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        parts = [f"{what} {keys[:4]}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("shape mismatch", shapes)) if keys]
        if parts:
            raise ValueError(f"weights: {str(weights)!r} does not fit {backbone.get('timm_name')} {kwargs}: "
                             + ", ".join(parts))
        model.load_state_dict(state, strict=False)  # only the predictors of a plain backbone checkpoint are absent
    return model.to(device).eval()
