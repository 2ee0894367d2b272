"""Hyperparameter search with Optuna: trials asked in batches and trained as vmapped groups.

    space     the search space: `--space` text or a JSON/YAML file -> Optuna distributions
    trials    train K trials of one shape as one vmapped program, evaluating and pruning as it goes
    study     studies and storages: settings, samplers, pruners, heartbeats, the budget of trials
    storage   every storage call retried through outages, up to --storage_timeout (then exit 75)
    worker    the loop that asks, trains and tells, and the trials' run directories
    results   the trials table, the best trial's command line and Optuna's figures
"""
