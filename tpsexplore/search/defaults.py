"""Defaults and choices of a search that the command line shows in ``--help``.

Standard library only: `tpsexplore.search.spec` (which imports torch through the search space) takes them from
here, so building the CLI's parser stays fast.
"""
from __future__ import annotations

from ..measure.options import WEIGHTS  # noqa: F401  (the settings' ``weights`` choices; stdlib only)

OBJECTIVES = {
    "accuracy,gflops": (("accuracy", "maximize"), ("gflops", "minimize")),
    "accuracy,throughput": (("accuracy", "maximize"), ("throughput", "maximize")),
    "accuracy,latency": (("accuracy", "maximize"), ("latency", "minimize")),
}
DEFAULT_TRIALS = 16  # with pre-training and confirmation: the main job within 15 minutes on 2 idle cores
DEFAULT_FINETUNE_STEPS = 40
DEFAULT_BUDGET = 0.35
DEFAULT_BACKBONE = "deit_t"
#: ``--confirm TOPxSEEDS``: re-fine-tune TOP configs (the most accurate of the front, then the cheapest
#: ones a paired test cannot tell from it: `confirm.select_targets`) with SEEDS more seeds each.
CONFIRM_TOP = 2
CONFIRM_SEEDS = 1
