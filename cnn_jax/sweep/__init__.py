"""Hyperparameter sweeps: a grid or a list of runs, trained together with `jax.vmap` where shapes allow
(on CPU by default one run at a time: `memory.default_max_parallel`).

A sweep is a list of *settings* (config overrides), one per run, from a grid

    "learning_rate=0.003,0.01,0.03 pool=max,avg seed=0,1,2"        (every combination: 18 runs)

or from a JSON/YAML file holding such a grid (a dict of lists) or a list of run dicts.
Every run gets a run directory named after its settings
(`learning_rate=0.01,pool=max,seed=0`) in the format of `experiments/train.py --workdir`
(config.json, metrics.jsonl, results.json, a final checkpoint), plus `sweep_result.json`,
written last, which marks the run finished.

Runs whose configs differ only in `PER_RUN_FIELDS` (learning rate, weight scale, momentum,
weight decay, seed, ...) compute with arrays of the same shapes, so they form one *group*
trained as one jit-compiled program: the train step of `cnn_jax.engine.step` is `jax.vmap`-ed
over a leading run axis of the train state (params, optimiser state with the run's
hyperparameters, model state, rng) and of the batches. Each run keeps its own initial state,
rng and data order (`data.sources.epoch_permutation(seed, epoch, n)`), so it computes what it
computes alone: bit for bit in a group of one (the run's own program), up to rounding when several
are vmapped together (docs/sweeps.md).
Fields that change shapes or the program (filters, kernels, batch size, pool, optimizer,
...) split runs into separate groups.

The package's modules, each importing only those before it: `spec` (grids, runs, shards),
`memory` (how many runs fit in a group), `group` (grouping, vmapped training), `rundirs` (run
directories), `results` (tables, plot), `seeds` (one config over several seeds, summarised).
"""

from cnn_jax.sweep.group import (DATA_FIELDS, PER_RUN_FIELDS, GroupResult, data_key, group_key, group_runs,
                                 train_group)
from cnn_jax.sweep.memory import (MEMORY_FRACTION, ProgramMemory, auto_max_parallel, default_max_parallel,
                                   describe_grouping, memory_budget, peak_live_bytes, program_memory,
                                   run_memory_bytes, shared_memory_bytes, tree_bytes)
from cnn_jax.sweep.results import (RESULTS_CSV, RESULTS_MD, RESULTS_PLOT, collect_rows, plot_axis, ranked_by,
                                   results_csv, results_figure, results_markdown, summarize, swept_fields,
                                   write_results)
from cnn_jax.sweep.rundirs import (IGNORED_WHEN_RESUMING, OK_ROW_FIELDS, ROW_FIELDS, SWEEP_RESULT_FILE,
                                   VALIDATION_FIELDS, is_finished, pending_runs, read_row, result_row, run_dir,
                                   run_group)
from cnn_jax.sweep.seeds import format_summary, parse_seeds, summarize_seeds, train_seeds
from cnn_jax.sweep.spec import (FIX_SPEC, MAX_RUNS, Run, coerce_value, field_kind, format_value, grid_settings,
                                load_spec_file, make_runs, parse_shard, parse_spec, run_name, shard)
