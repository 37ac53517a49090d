"""The papers' published (top-1, GMACs) points for DeiT-T and DeiT-S on ImageNet-1k (methods-spec 1.6, 2.3, 3.5, 4.4).

They are drawn only beside a study that ran on ImageNet data with DeiT-T or DeiT-S: a proxy task or another
backbone has a different accuracy scale, so putting these points next to it would mislead. The papers'
"GFLOPs" are multiply-accumulates (spec section 5), the same unit as the studies' ``gmacs``.
The ViT-B/16 similarity-pruning table (spec 8.3) is left out: its numbers are not self-consistent (8.4).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

PUBLISHED_BACKBONES = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224"}


@dataclass(frozen=True)
class PublishedPoint:
    """One operating point reported by a paper or its README (top-1 in %, GMACs at 224x224, batch 1)."""

    backbone: str  # short name: deit_t or deit_s
    method: str  # tpsexplore method name ('none' for the unreduced model)
    setting: str  # the paper's knob, e.g. 'rho=0.7' or 'r=13'
    top1: float
    gmacs: float
    source: str


_P = PublishedPoint
PUBLISHED: tuple[PublishedPoint, ...] = (
    # DeiT-S
    _P("deit_s", "none", "DeiT-S", 79.8, 4.6, "DeiT / TPS paper baseline (spec 3.5)"),
    _P("deit_s", "dynamicvit", "rho=0.9", 79.8, 4.0, "DynamicViT README (spec 1.6)"),
    _P("deit_s", "dynamicvit", "rho=0.8", 79.8, 3.4, "DynamicViT README (spec 1.6)"),
    _P("deit_s", "dynamicvit", "rho=0.7", 79.32, 2.9, "DynamicViT README (spec 1.6)"),
    *(_P("deit_s", "evit", f"kappa={k}", a, g, "EViT README, fused (spec 2.3)")
      for k, a, g in ((0.9, 79.8, 4.0), (0.8, 79.8, 3.5), (0.7, 79.5, 3.0), (0.6, 78.9, 2.6), (0.5, 78.5, 2.3))),
    *(_P("deit_s", "topk", f"kappa={k}", a, g, "EViT README, no fusion (spec 2.3)")
      for k, a, g in ((0.9, 79.9, 4.0), (0.8, 79.7, 3.5), (0.7, 79.4, 3.0), (0.6, 79.1, 2.6), (0.5, 78.4, 2.3))),
    _P("deit_s", "dtps", "rho=0.7", 80.1, 3.0, "TPS paper (spec 3.5)"),
    _P("deit_s", "etps", "rho=0.7", 79.7, 3.0, "TPS paper (spec 3.5)"),
    *(_P("deit_s", "tome", f"r={r}", a, g, "ToMe paper, trained (spec 4.4)")
      for r, a, g in ((8, 79.7, 3.4), (13, 79.4, 2.7), (16, 79.1, 2.3))),
    # DeiT-T
    _P("deit_t", "none", "DeiT-T", 71.8, 1.3, "ToMe README baseline (spec 4.4); GMACs from the timm card"),
    *(_P("deit_t", "tome", f"r={r}", a, g, "ToMe paper, trained (spec 4.4)")
      for r, a, g in ((8, 71.7, 0.9), (12, 71.4, 0.8), (16, 70.7, 0.6))),
)


def published_backbone(backbone: str | None) -> str | None:
    """The short name (deit_t/deit_s) when ``backbone`` (short or timm name) has published points, else None."""
    if not backbone:
        return None
    name = str(backbone).split(".")[0]
    for short, timm_name in PUBLISHED_BACKBONES.items():
        if name in (short, timm_name):
            return short
    return None


def published_points(backbone: str | None = None) -> pd.DataFrame:
    """Published points as a DataFrame (columns of `PublishedPoint`), optionally of one backbone only."""
    rows = [asdict(p) for p in PUBLISHED]
    df = pd.DataFrame(rows)
    if backbone is not None:
        short = published_backbone(backbone)
        df = df[df["backbone"] == short] if short else df.iloc[0:0]
    return df.reset_index(drop=True)


def baseline_at_chance(baseline: "pd.Series | None", data: object = None) -> str | None:
    """Why the papers' points must not be drawn beside this baseline: its top-1 is 0% or not above chance
    (its 95% interval reaches 1 / classes), i.e. the weights do not fit the data; None when it is fine.

    ``baseline`` is the report's baseline row (``accuracy`` and ``accuracy_lo`` as fractions); ``data`` the
    study's data description (``num_classes``; ImageNet-1k's 1,000 when absent)."""
    if baseline is None:
        return None
    acc = baseline.get("accuracy")
    if acc is None or pd.isna(acc):
        return None
    classes = (data.get("num_classes") if isinstance(data, dict) else None) or 1000
    chance = 1.0 / float(classes)
    lo = baseline.get("accuracy_lo")
    lo = float(acc) if lo is None or pd.isna(lo) else float(lo)
    if float(acc) > 0.0 and lo > chance:
        return None
    return (f"the unreduced baseline scores {100.0 * float(acc):.1f}% top-1, not above chance "
            f"({100.0 * chance:.3g}% for {int(classes)} classes): its weights do not fit this data, so the papers' "
            "ImageNet points are not drawn beside it")

