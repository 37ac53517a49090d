"""Design-space exploration of token reduction: Optuna search over method x locations x keep ratios.

`tpsexplore search` (``cli``) builds `SearchSettings` (``spec``), samples configs from a `SearchSpace`
(``space``) whose cost is checked analytically before any model is built, runs each trial through
``objective`` (throughput, zero-shot gate, fine-tune) in one or more workers (``runner``), and mirrors the
Optuna trials into the results store from a single writer (``mirror``).
"""
from __future__ import annotations

from ..lazy import lazy_exports

# Imported on first use (PEP 562), so `tpsexplore search --help` (tpsexplore.search.cli) does not pay for torch.
_EXPORTS = {
    "Candidate": ".space", "SearchSpace": ".space", "SpaceSettings": ".space", "Variant": ".space",
    "default_variants": ".space", "resolve_variants": ".space",
    "SearchSettings": ".spec", "build_settings": ".spec", "load_study_file": ".spec",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
