"""tpsexplore: profiling and design-space exploration of token reduction in timm vision transformers.

The public names are imported lazily, so `import tpsexplore.storage` (or a report) does not pay for
torch and timm until a model is touched.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ReductionConfig": "tpsexplore.reduce.config",
    "apply": "tpsexplore.reduce.patch",
    "remove": "tpsexplore.reduce.patch",
    "last_info": "tpsexplore.reduce.patch",
    "track_sources": "tpsexplore.reduce.patch",
    "token_schedule": "tpsexplore.reduce.schedule",
    "method_names": "tpsexplore.reduce.methods",
    "create_backbone": "tpsexplore.backbones",
    "WeightsUnavailableError": "tpsexplore.backbones",
    "load_trials": "tpsexplore.report",
    "pareto_front": "tpsexplore.report",
    "export_trial": "tpsexplore.report",
    "load_deployment": "tpsexplore.report",
    "build_report": "tpsexplore.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tpsexplore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
