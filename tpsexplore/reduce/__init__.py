"""Token reduction for timm vision transformers: pure tensor ops plus one thin patching layer."""
from .config import ReductionConfig
from .methods import METHODS, MethodSpec, get_method, method_names
from .patch import ReductionInfo, apply, last_info, ratio_loss, remove, track_sources
from .schedule import TokenSchedule, token_schedule

__all__ = [
    "METHODS", "MethodSpec", "ReductionConfig", "ReductionInfo", "TokenSchedule", "apply", "get_method",
    "last_info", "method_names", "ratio_loss", "remove", "token_schedule", "track_sources",
]
