"""Token reduction for timm vision transformers: pure tensor ops plus one thin patching layer."""
from .config import ReductionConfig
from .methods import METHODS, MethodSpec, get_method, method_names
from .patch import Adaptation, ReductionInfo, adapt_config, apply, last_info, model_geometry, ratio_loss, remove, \
    track_sources
from .schedule import TokenSchedule, token_schedule

__all__ = [
    "Adaptation", "METHODS", "MethodSpec", "ReductionConfig", "ReductionInfo", "TokenSchedule", "adapt_config", "apply",
    "get_method", "last_info", "method_names", "model_geometry", "ratio_loss", "remove", "token_schedule",
    "track_sources",
]
