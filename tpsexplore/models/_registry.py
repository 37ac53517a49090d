"""What the project's own timm models share: their pretrained_cfg, their creation and their [model] overrides."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def image_cfg(first_conv: str, license: str, crop_pct: float, **kwargs: Any) -> dict:
    """A 224-px ImageNet pretrained_cfg for a model without hub weights (``url`` empty)."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": first_conv, "classifier": "head", "license": license, **kwargs}


def with_overrides(config: Any, kwargs: dict, exclude: frozenset[str] = frozenset()) -> Any:
    """``config`` (a dataclass) with its fields found in ``kwargs`` (popped from it; lists become tuples), so a
    study's [model] table can build a tiny-width model (e.g. embed_dims, depths, num_heads)."""
    names = {f.name for f in fields(config)} - exclude
    over = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    return replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}) if over else config


def create(variant: str, build: Callable[..., Any], config: Any, default_cfgs: Any, pretrained: bool,
           exclude: frozenset[str] = frozenset(), **kwargs: Any) -> Any:
    """``build(config, **kwargs)`` for a timm entry point: refuses ``pretrained`` in one line (no hub weights),
    drops timm.create_model's own keywords, applies the [model] overrides and sets the pretrained_cfg."""
    if pretrained:
        raise ValueError(f"pretrained: no hub weights for {variant}; load the official checkpoint with "
                         "tpsexplore.backbones.create_backbone(name, checkpoint=PATH)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's own
        kwargs.pop(key, None)
    model = build(with_overrides(config, kwargs, exclude), **kwargs)
    cfg = default_cfgs[variant].default.to_dict()
    cfg.update(architecture=variant, num_classes=model.num_classes, input_size=(model.in_chans, *model.img_size))
    model.pretrained_cfg = model.default_cfg = cfg
    return model
