"""tpsexplore: profiling and design-space exploration of token reduction in timm vision transformers."""
from .backbones import WeightsUnavailableError, create_backbone
from .reduce import ReductionConfig, apply, last_info, method_names, remove, token_schedule

__version__ = "0.1.0"

__all__ = [
    "ReductionConfig", "WeightsUnavailableError", "__version__", "apply", "create_backbone", "last_info",
    "method_names", "remove", "token_schedule",
]
