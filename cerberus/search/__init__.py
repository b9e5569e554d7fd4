"""Architecture search under the parameter budget: enumerate a design space, or train trials.

- :mod:`~cerberus.search.space`: the :class:`SearchSpace`, read from TOML.
- :mod:`~cerberus.search.enumeration`: count every design exactly with numpy, keep the best.
- :mod:`~cerberus.search.trials`: train sampled designs with Optuna (:func:`run_trials`).
- :mod:`~cerberus.search.study`: the Optuna study, its storage, its trials as records.
- :mod:`~cerberus.search.results`: designs as train configs, the Pareto front, written results.

Importing this package imports neither torch nor optuna (``cerberus --help`` stays fast).
"""

from cerberus.search.enumeration import Candidate, Enumeration, SortKey, count_designs, enumerate_designs
from cerberus.search.results import (
    SearchResult,
    TrialRecord,
    design_config,
    design_slug,
    pareto_front,
    study_pareto,
    write_candidate_configs,
    write_configs,
    write_results,
)
from cerberus.search.space import SearchSpace, final_side, load_space, space_from_dict
from cerberus.search.study import PrunerName, default_storage, leaderboard, open_study, trial_record
from cerberus.search.trials import EventSink, default_out_dir, run_trials, trial_base

__all__ = [
    "Candidate",
    "Enumeration",
    "EventSink",
    "PrunerName",
    "SearchResult",
    "SearchSpace",
    "SortKey",
    "TrialRecord",
    "count_designs",
    "default_out_dir",
    "default_storage",
    "design_config",
    "design_slug",
    "enumerate_designs",
    "final_side",
    "leaderboard",
    "load_space",
    "open_study",
    "pareto_front",
    "run_trials",
    "space_from_dict",
    "study_pareto",
    "trial_base",
    "trial_record",
    "write_candidate_configs",
    "write_configs",
    "write_results",
]
