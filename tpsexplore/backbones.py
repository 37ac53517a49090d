"""Backbones: short names for the papers' models, weights from the hub, a local checkpoint or random init."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from . import models as _models  # registers pvt_v1_tiny/small and cvt_13/21 with timm

SHORT_NAMES = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "vit_b16": "vit_base_patch16_224",
}
#: Hierarchical backbones (issue 13): Swin-T and PVT v2 from timm, PVT v1 and CvT from tpsexplore.models.
#: They build and are counted; token reduction (`apply`) and the search take all of them (issue 13 part 2).
HIER_SHORT_NAMES = {
    "swin_t": "swin_tiny_patch4_window7_224",
    "pvt_v2_b1": "pvt_v2_b1",
    "pvt_t": "pvt_v1_tiny",
    "pvt_s": "pvt_v1_small",
    "cvt_13": "cvt_13",
    "cvt_21": "cvt_21",
}
WEIGHT_SOURCES = ("pretrained", "checkpoint", "random")


class WeightsUnavailableError(RuntimeError):
    """No weights could be had for a backbone (offline hub, no checkpoint, random init not asked for)."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone: the timm name, where its weights come from, and timm overrides."""

    name: str
    weights: str = "pretrained"
    checkpoint: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.weights == "pretrained":
            object.__setattr__(self, "weights", "checkpoint")
        if self.weights not in WEIGHT_SOURCES:
            raise ValueError(f"weights: {self.weights!r}; allowed: {', '.join(WEIGHT_SOURCES)}")
        if self.weights == "checkpoint" and not self.checkpoint:
            raise ValueError("checkpoint: weights='checkpoint' needs a checkpoint path")

    @property
    def timm_name(self) -> str:
        return resolve_name(self.name)

    def overrides(self) -> dict[str, Any]:
        kw = {"img_size": self.img_size, "patch_size": self.patch_size, "num_classes": self.num_classes}
        return {k: v for k, v in kw.items() if v is not None}


def resolve_name(name: str) -> str:
    """Map a short name (deit_t, deit_s, deit_b, vit_b16; swin_t, pvt_v2_b1, pvt_t, pvt_s, cvt_13, cvt_21) or a
    timm model name to the timm name."""
    timm_name = SHORT_NAMES.get(name) or HIER_SHORT_NAMES.get(name, name)
    if not timm.is_model(timm_name):
        raise ValueError(f"backbone: unknown backbone {name!r}; allowed: "
                         f"{', '.join([*SHORT_NAMES, *HIER_SHORT_NAMES])} or any timm VisionTransformer name "
                         "(e.g. deit3_small_patch16_224)")
    return timm_name


def is_project_model(name: str) -> bool:
    """True when ``name`` (short or timm) is one of tpsexplore.models' (PVT v1, CvT): their own patch embeddings,
    no hub weights, and the hierarchical token reduction takes them."""
    return resolve_name(name) in _models.REGISTERED


def hierarchical_types() -> tuple[type, ...]:
    """Model classes of the hierarchical backbones that build and are counted (Swin, PVT v2, PVT v1, CvT)."""
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    from timm.models.swin_transformer import SwinTransformer

    return (SwinTransformer, PyramidVisionTransformerV2, _models.PyramidVisionTransformerV1,
            _models.ConvolutionalVisionTransformer)


def is_hierarchical(model: torch.nn.Module) -> bool:
    """True for a Swin (timm), PVT v2 (timm), PVT v1 or CvT (tpsexplore.models) model."""
    return isinstance(model, hierarchical_types())


def is_hierarchical_name(name: str) -> bool:
    """True when ``name`` (short or timm) builds a hierarchical backbone (checked on the meta device: no weights)."""
    return is_hierarchical(_meta_model(name)[1])


def build_timm_model(timm_name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(timm_name, pretrained=False, **kwargs)``, where ``img_size`` also works for PVT v2.

    PVT v2 takes any input size, so timm has no img_size for it: here it sets the input size the model's
    ``pretrained_cfg`` names (read by the MAC trace and the data pipeline). Options a model does not take fail
    with one line naming them.
    """
    size = None
    module = timm.models.model_entrypoint(timm.models.get_arch_name(timm_name)).__module__
    if "img_size" in kwargs and module == "timm.models.pvt_v2":
        size = kwargs.pop("img_size")
    try:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ValueError(f"backbone: {timm_name} does not take {sorted(kwargs)} "
                         f"({' '.join(str(exc).split())[:200]})") from None
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg = {**(model.pretrained_cfg or {}), "input_size": (model.in_chans, h, w)}
        model.pretrained_cfg = model.default_cfg = cfg
    return model


def _meta_model(name: str) -> tuple[str, torch.nn.Module]:
    """The timm name and the model built on the meta device (no weights, no init cost)."""
    timm_name = resolve_name(name)
    try:
        with torch.device("meta"):
            model = build_timm_model(timm_name)
    except Exception as exc:  # noqa: BLE001 - any failure to build becomes one clear message
        raise ValueError(f"backbone: {name!r} ({timm_name}) cannot be built by timm "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    return timm_name, model


def vit_name(name: str) -> str:
    """`resolve_name`, and check that the model is a timm VisionTransformer (built on the meta device: no
    weights, no init cost), so a ResNet fails with one line naming it before anything is built or written."""
    timm_name, model = _meta_model(name)
    if is_hierarchical(model):
        raise ValueError(f"backbone: {name!r} ({timm_name}) is a hierarchical {type(model).__name__}: it builds "
                         "and is counted, but this takes timm VisionTransformers (token reduction and the search also "
                         "take pvt_t, pvt_s, pvt_v2_b1, cvt_13, cvt_21 and swin_t); allowed: "
                         f"{', '.join(SHORT_NAMES)} or any timm VisionTransformer name")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"backbone: {name!r} builds a {type(model).__name__}, not a timm "
                         f"VisionTransformer; allowed: {', '.join(SHORT_NAMES)} or any timm VisionTransformer name "
                         "(e.g. deit3_small_patch16_224)")
    return timm_name


def hier_name(name: str) -> str:
    """`resolve_name`, and check that the model is a supported hierarchical backbone (meta build)."""
    timm_name, model = _meta_model(name)
    if not is_hierarchical(model):
        raise ValueError(f"backbone: {name!r} builds a {type(model).__name__}, not a hierarchical backbone; "
                         f"allowed: {', '.join(HIER_SHORT_NAMES)} or a timm swin_* / pvt_v2_* name")
    return timm_name


def backbone_name(name: str) -> str:
    """`resolve_name`, and check that the model is a timm VisionTransformer or a hierarchical backbone."""
    timm_name, model = _meta_model(name)
    if not isinstance(model, VisionTransformer) and not is_hierarchical(model):
        raise ValueError(f"backbone: {name!r} builds a {type(model).__name__}, not a timm VisionTransformer "
                         f"or a hierarchical backbone; allowed: {', '.join([*SHORT_NAMES, *HIER_SHORT_NAMES])} "
                         "or any timm VisionTransformer name (e.g. deit3_small_patch16_224)")
    return timm_name


def create_backbone(
    name: str,
    weights: str = "pretrained",
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """Build a timm VisionTransformer, or a hierarchical backbone (swin_t, pvt_v2_b1, pvt_t, pvt_s, cvt_13,
    cvt_21: `apply` and the search take them too, issue 13).

    weights='pretrained' fetches from the timm hub; checkpoint=PATH loads a local .pth/.pt (with or
    without a top-level "model" key) or .safetensors file strictly (official Swin, PVT v1/v2 and CvT layouts
    included); weights='random' must be asked for explicitly. Offline without weights raises
    WeightsUnavailableError naming these options; so does PVT v1 / CvT, which have no hub weights.
    """
    spec = BackboneSpec(name, weights, str(checkpoint) if checkpoint else None, img_size, patch_size, num_classes)
    kwargs = {**spec.overrides(), **timm_kwargs}
    timm_name = backbone_name(name)
    if spec.weights == "pretrained":
        if is_project_model(timm_name):
            raise WeightsUnavailableError(_no_weights(name, timm_name, "no hub weights exist for it (use the "
                                                                       "official checkpoint)"))
        cached = _cached_hub_file(timm_name)
        if cached is not None:  # in the local hub cache: no network needed
            model = build_timm_model(timm_name, **kwargs)
            load_checkpoint(model, cached)
        elif not _hub_reachable():
            raise WeightsUnavailableError(_no_weights(name, timm_name, "the timm hub cannot be reached"))
        else:
            try:
                model = timm.create_model(timm_name, pretrained=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear message
                raise WeightsUnavailableError(_no_weights(name, timm_name, f"download failed: {type(exc).__name__}")) \
                    from None
    else:
        model = build_timm_model(timm_name, **kwargs)
    if not isinstance(model, VisionTransformer) and not is_hierarchical(model):
        raise ValueError(f"backbone: {name!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    if spec.weights == "checkpoint":
        load_checkpoint(model, spec.checkpoint)
    model.tps_backbone = spec  # provenance, read by measurement and export
    return model


def _no_weights(name: str, timm_name: str, why: str) -> str:
    return (f"backbone: no pretrained weights for {name!r} ({timm_name}): {why}. Pass checkpoint=PATH "
            "(.pth, .pt or .safetensors), or ask for weights='random' to start from random init")


def _cached_hub_file(timm_name: str) -> str | None:
    """Path of the pretrained weights in the local Hugging Face cache, if they are there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
    except Exception:  # noqa: BLE001 - no hub id or no huggingface_hub: treat as not cached
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub endpoint, so offline machines fail fast instead of retrying."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        if constants.HF_HUB_OFFLINE:
            return False
    except Exception:  # noqa: BLE001
        return False
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pth/.pt (top-level "model"/"state_dict" keys unwrapped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file: one line naming it
            raise ValueError(f"checkpoint: {str(p)!r} is not a readable .safetensors file "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"checkpoint: {str(p)!r} is not a readable .pth/.pt/.safetensors file "
                         f"({' '.join(str(exc).split())[:200]})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint: {str(p)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Strictly load a checkpoint, listing every missing, unexpected and mis-shaped key on failure."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        try:
            state = checkpoint_filter_fn(state, model)  # resamples pos_embed / patch_embed like timm does
        except Exception:  # noqa: BLE001 - fall through to the strict check below
            pass
    elif is_hierarchical(model):
        state = _official_to_timm(model, state)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_brief(missing)}")
        if unexpected:
            parts.append(f"unexpected {_brief(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {_brief(shapes)}")
        raise ValueError(f"checkpoint: {str(path)!r} does not fit {type(model).__name__}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied: one line naming the file
        raise ValueError(f"checkpoint: {str(path)!r} does not load into {type(model).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


def _official_to_timm(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Swin / PVT v2 checkpoints renamed to timm's layout by timm's own filters (timm-layout files pass
    through). PVT v1 and CvT (tpsexplore.models) use the official names already."""
    from timm.models import pvt_v2, swin_transformer

    if isinstance(model, swin_transformer.SwinTransformer):
        try:
            return swin_transformer.checkpoint_filter_fn(state, model)
        except Exception:  # noqa: BLE001 - a file that does not fit is reported by the strict check
            return state
    if isinstance(model, pvt_v2.PyramidVisionTransformerV2):
        return pvt_v2.checkpoint_filter_fn(state, model)
    return state


def _brief(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ... +' + str(len(items) - n) + ' more' if len(items) > n else ''}]"
