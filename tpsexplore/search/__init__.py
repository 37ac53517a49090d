"""Design-space exploration of token reduction: Optuna search over method x locations x keep ratios.

`tpsexplore search` (``cli``) builds `SearchSettings` (``spec``), samples configs from a `SearchSpace`
(``space``) whose cost is checked analytically before any model is built, runs each trial through
``objective`` (throughput, zero-shot gate, fine-tune) in one or more workers (``runner``), and mirrors the
Optuna trials into the results store from a single writer (``mirror``).
"""
from .space import Candidate, SearchSpace, SpaceSettings, Variant, default_variants, resolve_variants
from .spec import SearchSettings, build_settings, load_study_file

__all__ = ["Candidate", "SearchSettings", "SearchSpace", "SpaceSettings", "Variant", "build_settings",
           "default_variants", "load_study_file", "resolve_variants"]
