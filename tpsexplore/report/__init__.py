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
from .build import Report, build_report
from .export import deployment_config, export_trial, load_deployment, select_trial, trial_config
from .frame import StudyData, compare_trials, load_trials, open_study
from .importance import load_optuna_study, param_importances
from .keepmaps import compute_keep_maps, plot_keep_maps
from .pareto import hypervolume, hypervolume_history, pareto_front, pareto_mask, parse_objectives
from .plots import (best_within_budget, method_palette, plot_budget_sweep, plot_hypervolume, plot_importance,
                    plot_method_fronts, plot_published, plot_tradeoff, treatment_groups)
from .published import PUBLISHED, published_points

__all__ = [
    "PUBLISHED", "Report", "StudyData", "best_within_budget", "build_report", "compare_trials", "compute_keep_maps",
    "deployment_config", "export_trial", "hypervolume", "hypervolume_history", "load_deployment",
    "load_optuna_study", "load_trials", "method_palette", "open_study", "param_importances", "pareto_front",
    "pareto_mask", "parse_objectives", "plot_budget_sweep", "plot_hypervolume", "plot_importance",
    "plot_keep_maps", "plot_method_fronts", "plot_published", "plot_tradeoff", "published_points",
    "select_trial", "trial_config", "treatment_groups",
]
