"""Reporting: trial tables, Pareto fronts, figures, the HTML/Markdown report and deployment-config export.

Notebook API::

    from tpsexplore.report import load_trials, pareto_front, plot_tradeoff
    df = load_trials("runs/deit_t_budget035")            # one row per trial, measurements as columns
    front = pareto_front(df[df.within_budget], {"gmacs": "min", "accuracy": "max"})
    fig = plot_tradeoff(df, "gmacs", "accuracy")          # a matplotlib Figure, with 95% interval error bars
    diff = compare_trials("runs/deit_t_budget035", 12, 7)  # paired: Newcombe interval + exact McNemar
    print(format_difference(diff))                        # tpsexplore.stats: '-1.2 pts [-2.0, -0.4], McNemar p=0.003'
    open_study("runs/deit_t_budget035").recommendation    # the report's headline (tpsexplore.search.recommend)

Every plotting function returns a ``matplotlib.figure.Figure`` and changes no global state.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# Imported on first use (PEP 562), so `tpsexplore report --help` (tpsexplore.report.cli) does not pay for torch,
# pandas and matplotlib.
_EXPORTS = {
    "Report": ".build", "build_report": ".build",
    "deployment_config": ".export", "export_trial": ".export", "load_deployment": ".export",
    "select_trial": ".export", "trial_config": ".export", "deployment_weights": ".export", "trial_model": ".export",
    "StudyData": ".frame", "compare_trials": ".frame", "load_trials": ".frame", "open_study": ".frame",
    "load_optuna_study": ".importance", "param_importances": ".importance",
    "compute_keep_maps": ".keepmaps", "plot_keep_maps": ".keepmaps",
    "hypervolume": ".pareto", "hypervolume_history": ".pareto", "pareto_front": ".pareto", "pareto_mask": ".pareto",
    "parse_objectives": ".pareto",
    "best_within_budget": ".plots", "method_palette": ".plots", "plot_budget_sweep": ".plots",
    "plot_hypervolume": ".plots", "plot_importance": ".plots", "plot_method_fronts": ".plots",
    "plot_published": ".plots", "plot_tradeoff": ".plots", "treatment_groups": ".plots",
    "PUBLISHED": ".published", "published_points": ".published",
}

__all__ = [
    "PUBLISHED", "Report", "StudyData", "best_within_budget", "build_report", "compare_trials", "compute_keep_maps",
    "deployment_config", "deployment_weights", "export_trial", "hypervolume", "hypervolume_history", "load_deployment",
    "load_optuna_study", "load_trials", "method_palette", "open_study", "param_importances", "pareto_front",
    "pareto_mask", "parse_objectives", "plot_budget_sweep", "plot_hypervolume", "plot_importance",
    "plot_keep_maps", "plot_method_fronts", "plot_published", "plot_tradeoff", "published_points",
    "select_trial", "trial_config", "treatment_groups", "trial_model",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
