"""tpsexplore: profiling and design-space exploration of token reduction in timm vision transformers.

The public names are imported lazily, so `import tpsexplore.storage` (or a report) does not pay for
torch and timm until a model is touched.
"""
from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ReductionConfig": "tpsexplore.reduce.config",
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

__all__ = ["__version__", "apply", *_EXPORTS]


def apply(model, config, track_sources: bool = False, *, adapt: bool = False):
    """`tpsexplore.reduce.apply`, with the analytic GMACs counter (`tpsexplore.measure.flops`) wired in.

    A deployment config applied to a model of another geometry is refused with one line naming both, unless
    ``adapt=True``: then it is rescaled (keep ratios kept, ToMe's r scaled by the patch-token ratio) and one warning
    line gives the new GMACs and their factor against the searched ones. The counter sits above the core
    (layering), so the package root passes it down.
    """
    from .reduce.patch import apply as _apply

    def gmacs(config):
        from .measure.flops import analytic_macs, geometry_from_model

        return analytic_macs(config, geometry_from_model(model)).gmacs

    return _apply(model, config, track_sources, adapt=adapt, gmacs=gmacs)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, extra=("__version__", "apply"))
