"""Backbones timm 1.0.31 lacks, written from their papers and official configurations (methods-spec 13.2).

Importing this package registers them with timm's registry: ``pvt_v1_tiny``, ``pvt_v1_small`` (PVT v1) and
``cvt_13``, ``cvt_21`` (CvT), so ``timm.create_model`` builds them. Their parameter names are the official
checkpoints' (see each module's ``official_shapes``). No hub weights exist for them: load the official files
with ``tpsexplore.backbones.create_backbone(name, checkpoint=PATH)``. Built on torch and timm only.
"""
from __future__ import annotations

from . import cvt, pvt
from .cvt import CVT_13, CVT_21, ConvolutionalVisionTransformer, CvTConfig
from .pvt import PVT_SMALL, PVT_TINY, PVTConfig, PyramidVisionTransformerV1

#: timm names registered by this package, with the official checkpoint layout each one loads.
REGISTERED = ("pvt_v1_tiny", "pvt_v1_small", "cvt_13", "cvt_21")


def official_shapes(name: str, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000
                    ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official checkpoint of a registered model (``name`` as in `REGISTERED`)."""
    configs = {"pvt_v1_tiny": PVT_TINY, "pvt_v1_small": PVT_SMALL, "cvt_13": CVT_13, "cvt_21": CVT_21}
    if name not in configs:
        raise ValueError(f"name: {name!r}; allowed: {', '.join(REGISTERED)}")
    if name.startswith("pvt"):
        return pvt.official_shapes(configs[name], img_size, in_chans, num_classes)
    return cvt.official_shapes(configs[name], in_chans, num_classes)


__all__ = ["CVT_13", "CVT_21", "ConvolutionalVisionTransformer", "CvTConfig", "PVTConfig", "PVT_SMALL", "PVT_TINY",
           "PyramidVisionTransformerV1", "REGISTERED", "official_shapes"]
