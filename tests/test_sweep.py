"""Sweeps: spec parsing and its errors, grouping, vmapped runs equal to runs alone, resume, shards,
results tables and plot, and the command line end to end (all on small real MNIST subsets)."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest
import script_runner
from conftest import default_sigint
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax import models, sweep
from cnn_jax.engine import evaluation, optim, program as program_lib, step, train
from cnn_jax.engine import state as state_lib
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from test_readers import PROPERTY, damaged, json_values, value_or_one_line_error

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- specification


def test_grid_spec_expands_to_every_combination_with_typed_values():
    grid = sweep.parse_spec("learning_rate=0.003,0.01,0.03 pool=max,avg seed=0,1,2")
    assert grid == {"learning_rate": [0.003, 0.01, 0.03], "pool": ["max", "avg"], "seed": [0, 1, 2]}
    settings = sweep.grid_settings(grid)
    assert len(settings) == 18
    assert settings[0] == {"learning_rate": 0.003, "pool": "max", "seed": 0}
    assert settings[1] == {"learning_rate": 0.003, "pool": "max", "seed": 1}
    assert settings[-1] == {"learning_rate": 0.03, "pool": "avg", "seed": 2}
    assert all(isinstance(s["seed"], int) and isinstance(s["learning_rate"], float) for s in settings)


def test_list_valued_and_boolean_flags_parse():
    grid = sweep.parse_spec("conv_filters=20:50,8:16 conv_kernels=3:5 debug=false,true")
    assert grid == {"conv_filters": [(20, 50), (8, 16)], "conv_kernels": [(3, 5)], "debug": [False, True]}


def test_run_names_are_the_sorted_settings():
    assert sweep.run_name({"seed": 0, "pool": "max", "learning_rate": 0.01}) == \
        "learning_rate=0.01,pool=max,seed=0"
    assert sweep.run_name({"conv_filters": (20, 50), "weight_scale": 1e-05}) == \
        "conv_filters=20:50,weight_scale=1e-05"


@pytest.mark.parametrize("spec, named", [
    ("lerning_rate=0.1", "'lerning_rate'"),                 # unknown flag
    ("learning_rate=0.1,abc", "learning_rate='abc'"),       # bad value
    ("seed=0,1.5", "seed='1.5'"),                           # an int flag given a fraction
    ("pool=max seed=", "'seed='"),                          # empty list
    ("seed=0,,1", "'seed=0,,1'"),                           # empty value
    ("learning_rate", "'learning_rate'"),                   # no '='
    ("seed=0 seed=1", "seed is given twice"),
    ("seed=0,1,0", "seed lists 0 twice"),
    ("conv_filters=20:x", "conv_filters='20:x'"),
    ("learning_rate=nan", "learning_rate='nan'"),
    ("optimizer=adam,seed_sgd", "--sweep: optimizer=seed_sgd was renamed: use optimizer=sgd"),
    ("", "--sweep is empty"),
])
def test_malformed_spec_is_one_line_naming_the_part(spec, named):
    with pytest.raises(ConfigError) as info:
        sweep.grid_settings(sweep.parse_spec(spec))
    message = str(info.value)
    assert named in message and "\n" not in message


def test_values_that_fail_validation_name_the_run_and_flag():
    settings = sweep.grid_settings(sweep.parse_spec("learning_rate=0.01,-1 pool=max,mean"))
    with pytest.raises(ConfigError, match=r"run learning_rate=0.01,pool=mean: --pool='mean' is not allowed"):
        sweep.make_runs(Config(), settings)
    with pytest.raises(ConfigError, match=r"run learning_rate=-1.0,pool=max: --learning_rate=-1.0"):
        sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("learning_rate=-1 pool=max")))


def test_spec_files_hold_a_grid_or_a_list_of_runs(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"learning_rate": [0.01, 0.1], "conv_filters": [[8, 16]], "seed": 3}))
    assert sweep.load_spec_file(str(grid)) == [
        {"learning_rate": 0.01, "conv_filters": (8, 16), "seed": 3},
        {"learning_rate": 0.1, "conv_filters": (8, 16), "seed": 3}]
    runs = tmp_path / "runs.yaml"
    runs.write_text("- {pool: avg, learning_rate: 1}\n- {pool: max, batch_size: 32}\n")
    assert sweep.load_spec_file(str(runs)) == [{"pool": "avg", "learning_rate": 1.0},
                                               {"pool": "max", "batch_size": 32}]


@pytest.mark.parametrize("name, text, named", [
    ("bad.yaml", "learning_rate: [0.1\n", "not valid YAML"),
    ("bad.json", "{\"seed\": [0, 1],}", "not valid JSON"),
    ("empty.json", "[]", "expected a grid"),
    ("scalar.yaml", "3\n", "expected a grid"),
    ("entry.yaml", "- seed: 1\n- 7\n", "run 1 must be a non-empty mapping"),
    ("unknown.yaml", "- {sead: 1}\n", "unknown flag 'sead'"),
    ("value.json", "{\"batch_size\": [32, \"big\"]}", "batch_size='big'"),
    ("nolist.json", "{\"seed\": []}", "seed has no values"),
    ("renamed.json", "{\"init\": [\"he\", \"seed\"]}", "init=seed was renamed: use init=normal"),
])
def test_malformed_spec_files_are_refused(tmp_path, name, text, named):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        sweep.load_spec_file(str(path))
    assert named in str(info.value) and name in str(info.value) and "\n" not in str(info.value)


def test_shards_partition_the_runs():
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("seed=0,1,2,3,4,5,6")))
    shards = [sweep.shard(runs, i, 3) for i in range(3)]
    assert [r.config.seed for r in shards[0]] == [0, 3, 6]
    assert [r.config.seed for r in shards[2]] == [2, 5]
    assert sorted(r.name for s in shards for r in s) == sorted(r.name for r in runs)
    assert sweep.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            sweep.parse_shard(bad)


# ----------------------------------------------------------------------------- grouping


def test_runs_differing_only_in_shape_free_values_share_a_group():
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec(
        "learning_rate=0.001,0.01 pool=max,avg seed=0,1 weight_scale=0.01,0.1")))
    groups = sweep.group_runs(runs, max_parallel=100)
    assert len(groups) == 2 and [len(g) for g in groups] == [8, 8]
    assert {r.config.pool for r in groups[0]} == {"max"} and {r.config.pool for r in groups[1]} == {"avg"}
    for shape_changing in ("batch_size=32,64", "conv_filters=8:16,20:50", "optimizer=adam,sgd",
                           "num_fc=64,128", "init=he,normal"):
        runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec(shape_changing + " seed=0,1")))
        assert [len(g) for g in sweep.group_runs(runs, 100)] == [2, 2], shape_changing


def test_max_parallel_splits_a_group_into_near_equal_chunks():
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("seed=0,1,2,3,4")))
    assert [len(g) for g in sweep.group_runs(runs, 2)] == [2, 2, 1]
    assert [len(g) for g in sweep.group_runs(runs, 4)] == [3, 2]
    assert [len(g) for g in sweep.group_runs(runs, lambda config: 1)] == [1] * 5


def test_auto_max_parallel_follows_the_memory_estimate():
    small, big = Config(), config_lib.replace(Config(), conv_filters=(64, 128), eval_batch_size=4000)
    assert sweep.run_memory_bytes(big) > 2 * sweep.run_memory_bytes(small)
    budget = 10 * sweep.run_memory_bytes(small) + sweep.shared_memory_bytes(small)
    assert sweep.auto_max_parallel(small, budget) == 10
    assert sweep.auto_max_parallel(big, budget) < 10
    assert sweep.auto_max_parallel(small, 1) == 1


def test_peak_live_bytes_frees_each_value_after_its_last_use():
    x = jax.ShapeDtypeStruct((1000,), jnp.float32)

    def chain(x):          # each value dies at the next equation: two arrays live at once
        for _ in range(10):
            x = x * 2.0 + 1.0
        return x

    def kept(x):           # every value lives to the end: eleven arrays
        values = [x]
        for _ in range(10):
            values.append(values[-1] * 2.0)
        return sum(v.sum() for v in values)

    assert sweep.peak_live_bytes(jax.make_jaxpr(chain)(x).jaxpr) == 2 * 4000
    assert sweep.peak_live_bytes(jax.make_jaxpr(kept)(x).jaxpr) >= 10 * 4000
    # A jitted call holds its body's peak while it runs.
    assert sweep.peak_live_bytes(jax.make_jaxpr(lambda x: jax.jit(kept)(x) + 1.0)(x).jaxpr) >= 10 * 4000


def test_the_default_group_holds_many_runs_and_its_estimate_bounds_xlas_own_figure():
    """The default config's per-run estimate lies within [1x, 4x] of what XLA's compiled train step
    holds (arguments, outputs, temporaries), and a 4 GiB budget holds a real group of it."""
    config = model.validate(Config())
    optimizer = optim.make_optimizer(config, 1)
    state = state_lib.abstract(config, optimizer)
    batch = (jax.ShapeDtypeStruct((config.batch_size, *config.input_shape), jnp.float32),
             jax.ShapeDtypeStruct((config.batch_size,), jnp.int32))
    compiled = jax.jit(step.make_train_step(config, optimizer)).lower(state, batch).compile()
    stats = compiled.memory_analysis()
    xla_bytes = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    assert xla_bytes <= sweep.run_memory_bytes(config) <= 4 * xla_bytes
    assert sweep.auto_max_parallel(config, 4 << 30) >= 16


def test_the_estimate_follows_every_family_and_where_evaluation_runs(monkeypatch, request):
    models.register("tiny", "test_models")   # the family defined in tests/test_models.py
    request.addfinalizer(lambda: models.unregister("tiny"))   # registered for this test only
    for family in ("cnn", "vgg", "resnet", "tiny"):
        config = model.validate(config_lib.replace(Config(), model=family))
        memory = sweep.program_memory(config)
        assert memory.state > 0, family
        doubled = sweep.program_memory(config_lib.replace(config, batch_size=2 * config.batch_size))
        assert 1.5 * memory.train_step < doubled.train_step < 2.5 * memory.train_step, family
        assert doubled.eval_batch == memory.eval_batch, family
    # Evaluated one after another (CPU), a group holds one evaluation; together, one per run.
    config = Config()
    memory = sweep.program_memory(config)
    monkeypatch.setattr(evaluation, "runs_evaluated_together", lambda: False)
    assert sweep.run_memory_bytes(config) == memory.state + memory.train_step
    assert sweep.shared_memory_bytes(config) == memory.eval_batch
    monkeypatch.setattr(evaluation, "runs_evaluated_together", lambda: True)
    assert sweep.run_memory_bytes(config) == memory.state + max(memory.train_step, memory.eval_batch)
    assert sweep.shared_memory_bytes(config) == 0


# ----------------------------------------------------------------------------- vectorised training


@pytest.fixture(scope="module")
def small_dataset(mnist):
    import dataclasses
    return dataclasses.replace(mnist, train_images=mnist.train_images[:256], train_labels=mnist.train_labels[:256],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


@pytest.fixture(scope="module")
def tiny_dataset(small_dataset):
    import dataclasses
    return dataclasses.replace(small_dataset, train_images=small_dataset.train_images[:64],
                               train_labels=small_dataset.train_labels[:64])


# Two runs of a vmapped group and the same runs alone, 4 momentum steps (2 epochs of 2 batches). The
# vmapped program sums in another order than the runs alone, and how that rounds depends on the CPU;
# few steps keep the result linear in that rounding, so the params are compared per leaf relative
# to each leaf's update (tests/numerics.py), not elementwise.
GROUP = [{"learning_rate": 0.05, "momentum": 0.9, "seed": 0}, {"learning_rate": 0.02, "momentum": 0.5, "seed": 3},
         {"learning_rate": 1e30, "seed": 1}]


def _group_configs():
    base = config_lib.replace(Config(), optimizer="momentum", schedule="warmup_cosine", batch_size=32,
                              epochs=2, log_every=2, eval_batch_size=128)
    return [config_lib.replace(base, **values) for values in GROUP]


def _start(config):
    from cnn_jax import model
    import jax
    return model.init(jax.random.key(config.seed), config)[0]


def _run_params(params, i):
    return {layer: {name: np.asarray(v[i]) for name, v in values.items()} for layer, values in params.items()}


@pytest.fixture(scope="module")
def group_and_alone(tiny_dataset):
    configs = _group_configs()
    logs = {0: [], 1: [], 2: []}
    result = sweep.train_group(configs, tiny_dataset, on_log=lambda i, r: logs[i].append(r))
    alone = [train.fit(configs[i], tiny_dataset) for i in (0, 1)]
    return configs, result, logs, alone


def _without_times(history):
    return [{k: v for k, v in record.items() if k not in ("epoch_time", "images_per_second")} for record in history]


def test_a_group_of_one_trains_the_program_the_run_trains_alone(small_dataset):
    """What the CPU's default group size (one) trains: the digits of `train.py` for the same run,
    every epoch record and every parameter bit for bit, whatever its per-run values."""
    config = config_lib.replace(Config(), optimizer="adam", learning_rate=0.004, seed=2, batch_size=32, epochs=2,
                                log_every=2)
    result = sweep.train_group([config], small_dataset)
    alone, history = train.fit(config, small_dataset)
    assert _without_times(result.histories[0]) == _without_times(history)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(result.states[0].params)),
                                                    jax.tree.leaves(jax.device_get(alone.params))))


def test_runs_one_after_another_reuse_one_program_and_keep_their_own_digits(small_dataset):
    """A sweep trained one run at a time builds (and compiles) its program once: the next run of
    the same key draws its own state and trains the same program, with the digits it has alone."""
    base = config_lib.replace(Config(), optimizer="adam", batch_size=32, epochs=1, log_every=2)
    configs = [config_lib.replace(base, learning_rate=lr, seed=s) for lr, s in ((0.001, 0), (0.004, 3))]
    programs = {}
    results = [sweep.train_group([c], small_dataset, programs=programs) for c in configs]
    assert len(programs) == 1
    program, = programs.values()
    again, _ = program_lib.build([configs[1]], small_dataset, results[1].steps_per_epoch, programs=programs)
    assert again is program and len(programs) == 1
    for config, result in zip(configs, results):
        alone, history = train.fit(config, small_dataset)
        assert _without_times(result.histories[0]) == _without_times(history)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(result.states[0].params)),
                                                        jax.tree.leaves(jax.device_get(alone.params))))
    assert _without_times(results[0].histories[0]) != _without_times(results[1].histories[0])


def test_a_vmapped_group_stays_within_rounding_of_its_runs_alone_over_a_whole_run(small_dataset):
    """A vmapped program sums in another order than the runs alone (batched kernels), so on CPU its
    digits differ; over a whole short run (2 epochs of Adam) the difference stays a rounding-level
    drift: losses within 2% and accuracies within 2 test images of 200."""
    base = config_lib.replace(Config(), optimizer="adam", batch_size=32, epochs=2, log_every=2)
    configs = [config_lib.replace(base, learning_rate=lr, seed=i) for i, lr in enumerate((0.001, 0.004))]
    result = sweep.train_group(configs, small_dataset)
    for i, config in enumerate(configs):
        _, history = train.fit(config, small_dataset)
        mine, theirs = result.histories[i][-1], history[-1]
        for key in ("moving_loss", "train_loss", "test_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=0.02), key
        assert abs(mine["test_accuracy"] - theirs["test_accuracy"]) <= 2 / 200


def test_vmapped_runs_match_the_same_runs_trained_alone(group_and_alone):
    """Per-run learning rate (through a traced warmup-cosine schedule), momentum and seed
    (init and data order); a diverging run in the group is marked and does not disturb the others."""
    configs, result, logs, alone = group_and_alone
    assert result.diverged[:2] == [None, None]
    diverged = re.match(r"(loss became (nan|inf|-inf)|parameters or optimiser state became non-finite) at step \d+ "
                        r"\(epoch ([01])\); lower --learning_rate$", result.diverged[2])
    assert diverged, result.diverged[2]
    assert len(result.histories[2]) == int(diverged.group(3))    # only the epochs finished before it diverged
    assert [r["step"] for r in logs[0]] == [2, 4]
    for i in (0, 1):
        params, history = alone[i][0].params, alone[i][1]
        assert len(history) == len(result.histories[i]) == 2
        for mine, theirs in zip(result.histories[i], history):
            for key in ("moving_loss", "train_loss", "test_loss"):
                np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, err_msg=key)
            for key, n in (("train_accuracy", 64), ("test_accuracy", 200)):
                assert abs(mine[key] - theirs[key]) <= 1 / n, key   # at most one borderline example
            assert mine["step"] == theirs["step"]
        numerics.assert_updates_close(_run_params(result.state.params, i), params, _start(configs[i]),
                                      what=f"run {i}")
    # The two good runs really differ (different seeds and hyperparameters).
    assert result.histories[0][-1]["train_loss"] != result.histories[1][-1]["train_loss"]


def test_the_comparison_fails_a_swapped_run_or_a_scaled_gradient(group_and_alone, tiny_dataset, monkeypatch):
    """The comparison above is not loose: a run swapped with another in the group fails it, and so
    does a run whose gradient is scaled by 1.01 (the same run with a 1.01x loss)."""
    configs, result, _, alone = group_and_alone
    with pytest.raises(AssertionError, match="above"):
        numerics.assert_updates_close(_run_params(result.state.params, 1), alone[0][0].params, _start(configs[0]),
                                      what="swapped")
    loss_fn = step.loss_fn
    monkeypatch.setattr(step, "loss_fn", lambda *args: (lambda loss, m: (1.01 * loss, m))(*loss_fn(*args)))
    scaled = train.fit(configs[0], tiny_dataset)[0].params
    with pytest.raises(AssertionError, match="above"):
        numerics.assert_updates_close(scaled, alone[0][0].params, _start(configs[0]), what="gradient x 1.01")


# ----------------------------------------------------------------------------- run dirs and results


def test_pending_runs_skip_finished_and_refuse_another_config(tmp_path):
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("seed=0,1,2")))
    workdir_lib.start(sweep.run_dir(str(tmp_path), runs[0]), runs[0].config)        # finished
    workdir_lib.write_json(os.path.join(sweep.run_dir(str(tmp_path), runs[0]), sweep.SWEEP_RESULT_FILE),
                           sweep.result_row(runs[0], [], "diverged", "loss became nan", 1.0, 3))
    workdir_lib.start(sweep.run_dir(str(tmp_path), runs[1]), runs[1].config)        # interrupted
    todo, done = sweep.pending_runs(str(tmp_path), runs)
    assert [r.name for r in done] == ["seed=0"] and [r.name for r in todo] == ["seed=1", "seed=2"]
    # The same sweep with another base config must not be mixed into these run directories...
    changed = sweep.make_runs(config_lib.replace(Config(), epochs=2), [{"seed": 0}])
    with pytest.raises(ConfigError, match=r"seed=0 holds a run with another config \(--epochs=2"):
        sweep.pending_runs(str(tmp_path), changed)
    # ... but fields that do not change the computation may differ.
    same = sweep.make_runs(config_lib.replace(Config(), log_every=7, eval_batch_size=10), [{"seed": 0}])
    assert sweep.pending_runs(str(tmp_path), same)[1] == same


def _row(lr, pool, seed, acc, status="ok"):
    return {"name": sweep.run_name({"learning_rate": lr, "pool": pool, "seed": seed}),
            "settings": {"learning_rate": lr, "pool": pool, "seed": seed}, "status": status,
            "message": "" if status == "ok" else "loss became nan at step 3 (epoch 0)",
            "epochs": 1 if status == "ok" else 0,
            "train_loss": 0.1 if status == "ok" else None, "train_accuracy": acc + 0.01 if acc else None,
            "test_loss": 0.2 if status == "ok" else None, "test_accuracy": acc, "moving_loss": 0.3,
            "time_s": 12.5, "group_size": 2}


ROWS = [_row(0.01, "max", 0, 0.97), _row(0.01, "max", 1, 0.99), _row(0.1, "max", 0, 0.90),
        _row(0.1, "max", 1, 0.92), _row(0.01, "avg", 0, 0.95), _row(0.01, "avg", 1, 0.96),
        _row(1.0, "avg", 0, None, "diverged"), _row(1.0, "avg", 1, 0.50)]


def test_summary_is_over_seeds_and_sorted_by_test_accuracy():
    summary = sweep.summarize(ROWS)
    assert [(e["settings"]["learning_rate"], e["settings"]["pool"]) for e in summary] == \
        [(0.01, "max"), (0.01, "avg"), (0.1, "max"), (1.0, "avg")]
    best = summary[0]
    assert best["test_accuracy_mean"] == pytest.approx(0.98)
    assert best["test_accuracy_std"] == pytest.approx(np.std([0.97, 0.99], ddof=1))
    assert best["seeds"] == [0, 1] and best["runs"] == best["ok"] == 2
    last = summary[-1]   # one of its two seeds diverged: the mean is over the finished one
    assert (last["runs"], last["ok"], last["test_accuracy_mean"], last["test_accuracy_std"]) == (2, 1, 0.5, None)


def test_results_files_hold_every_run_the_summary_and_a_plot(tmp_path):
    import matplotlib
    backend = matplotlib.get_backend()
    sweep.write_results(str(tmp_path), ROWS)
    assert matplotlib.get_backend() == backend   # library code leaves the process's backend alone
    with open(tmp_path / sweep.RESULTS_CSV) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8
    assert table[1]["learning_rate"] == "0.01" and table[1]["seed"] == "1"
    assert float(table[1]["test_accuracy"]) == 0.99 and table[6]["status"] == "diverged"
    assert [r["epochs_done"] for r in table[5:7]] == ["1", "0"]
    markdown = (tmp_path / sweep.RESULTS_MD).read_text()
    assert "| 0.01 | max | 2 | 0.9800 | 0.0141 |" in markdown
    assert markdown.index("| 0.01 | max | 2 |") < markdown.index("| 0.1 | max | 2 |")
    png = (tmp_path / sweep.RESULTS_PLOT).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sweep.plot_axis(ROWS) == "learning_rate"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]     # atomic writes leave no temporaries


def test_results_csv_keeps_a_swept_epochs_apart_from_the_epochs_done():
    rows = [dict(_row(0.01, "max", 0, None, "diverged"), settings={"epochs": 3}, name="epochs=3")]
    header, line = list(csv.reader(io.StringIO(sweep.results_csv(rows))))
    assert len(header) == len(set(header))
    assert (line[header.index("epochs")], line[header.index("epochs_done")]) == ("3", "0")


def test_plot_axis_prefers_a_numeric_swept_value():
    rows = [{"settings": {"pool": p, "seed": s, "batch_size": b}} for p in ("max", "avg")
            for s in (0, 1) for b in (32, 64)]
    assert sweep.plot_axis(rows) == "batch_size"
    assert sweep.plot_axis([{"settings": {"pool": p, "seed": s}} for p in ("max", "avg") for s in (0, 1)]) == "pool"
    assert sweep.plot_axis([{"settings": {"seed": s}} for s in (0, 1)]) == "seed"


# ----------------------------------------------------------------------------- command line


def _sweep_cli(*args: str) -> subprocess.CompletedProcess:
    return script_runner.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "sweep.py"), *args])


@pytest.mark.slow
def test_command_line_shards_resume_and_summarize(tmp_path, mnist_dir):
    workdir = str(tmp_path / "sweep")
    common = [f"--data_dir={mnist_dir}", "--train_subset=128", "--test_subset=100", "--batch_size=32",
              "--eval_batch_size=128", f"--workdir={workdir}", "--max_parallel=2",
              "--sweep=learning_rate=0.001,0.003 seed=0,1"]
    first = _sweep_cli(*common, "--shard=0/2")
    assert first.returncode == 0, first.stderr
    assert "sweep of 4 runs (shard 0/2: 2 of them): 0 already finished, 2 to train in 1" in first.stdout
    names = sorted(n for n in os.listdir(workdir) if "=" in n)
    assert names == ["learning_rate=0.001,seed=0", "learning_rate=0.003,seed=0"]
    run = os.path.join(workdir, names[0])
    assert {"config.json", "metrics.jsonl", "results.json", "sweep_result.json", "checkpoints"} <= set(os.listdir(run))
    config = workdir_lib.read_config(run)
    assert (config.learning_rate, config.seed, config.train_subset) == (0.001, 0, 128)
    epochs = [r for r in workdir_lib.read_metrics(run) if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["step"] == 4
    with open(os.path.join(run, "results.json")) as f:
        assert json.load(f)["test_accuracy"] == epochs[0]["test_accuracy"]
    finished_at = os.path.getmtime(os.path.join(run, "sweep_result.json"))

    # The full sweep again: the first shard's runs are skipped, the other two trained.
    second = _sweep_cli(*common)
    assert second.returncode == 0, second.stderr
    assert "sweep of 4 runs: 2 already finished, 2 to train" in second.stdout
    assert os.path.getmtime(os.path.join(run, "sweep_result.json")) == finished_at
    with open(os.path.join(workdir, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {r["status"] for r in table} == {"ok"}

    os.remove(os.path.join(workdir, "results.csv"))
    summary = _sweep_cli(f"--workdir={workdir}", "--summarize")
    assert summary.returncode == 0, summary.stderr
    assert "4 finished runs (4 ok, 0 diverged)" in summary.stdout
    assert os.path.exists(os.path.join(workdir, "results.csv"))

    # A malformed spec is refused before anything runs or is written.
    before = sorted(os.listdir(workdir))
    bad = _sweep_cli(*common[:-1], "--sweep=learning_rate=0.001,fast seed=0,1")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: --sweep: learning_rate='fast' is not a valid float"]
    assert sorted(os.listdir(workdir)) == before


def test_a_crash_while_writing_the_results_keeps_the_previous_tables(tmp_path, monkeypatch):
    sweep.write_results(str(tmp_path), ROWS[:4])
    before = {name: (tmp_path / name).read_bytes() for name in (sweep.RESULTS_CSV, sweep.RESULTS_MD, sweep.RESULTS_PLOT)}

    def crash(src, dst):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        sweep.write_results(str(tmp_path), ROWS)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(before)          # no half-written temporaries


@pytest.mark.slow
def test_command_line_bad_flags_and_workdirs_are_one_line(tmp_path):
    training_run = str(tmp_path / "run")
    workdir_lib.start(training_run, Config())
    before = sorted(os.listdir(training_run))
    cases = [
        (["--sweep=seed=0,1", "--sweeps=x"], "Unknown command line flag 'sweeps'"),
        (["--sweep=seed=0,1"], "--workdir is required"),
        ([f"--workdir={tmp_path}/s", "--sweep=seed=0,1", "--seed=3"], "--seed is given as a flag and swept"),
        ([f"--workdir={tmp_path}/s", f"--sweep_file={tmp_path}/none.yaml"], "none.yaml: cannot read"),
        ([f"--workdir={training_run}/config.json", "--sweep=seed=0,1"], "is a file, not a sweep directory"),
        ([f"--workdir={training_run}", "--sweep=seed=0,1"], "holds a training run (config.json), not a sweep"),
        ([f"--workdir={tmp_path}/s", "--sweep=seed=0,1", "--data_dir=/nowhere/mnist"],
         "--data_dir=/nowhere/mnist: no such directory"),
        ([f"--workdir={tmp_path}/s", "--sweep=seed=0,1", "--validation_size=-1"],
         "--validation_size=-1 is not allowed: give 0 or a positive count"),
    ]
    for args, fragment in cases:
        result = _sweep_cli(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("Pass --helpshort")]
        assert len(lines) == 1 and fragment in lines[0], (args, result.stderr)
    assert sorted(os.listdir(training_run)) == before and not os.path.exists(tmp_path / "s")


@pytest.mark.slow
def test_command_line_sigint_keeps_finished_runs_and_a_rerun_finishes_the_rest(tmp_path, mnist_dir):
    import signal
    workdir = str(tmp_path / "sweep")
    args = [sys.executable, os.path.join(REPO_ROOT, "experiments", "sweep.py"), f"--data_dir={mnist_dir}",
            "--train_subset=128", "--test_subset=100", "--batch_size=32", "--eval_batch_size=128",
            "--epochs=30",   # 120 steps a run: the signal lands while the second run trains
            f"--workdir={workdir}", "--sweep=seed=0,1", "--max_parallel=1"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),   # the rerun reuses the program
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
                            preexec_fn=default_sigint)
    for line in proc.stdout:
        if line.startswith("group 2/2:"):
            proc.send_signal(signal.SIGINT)
            break
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["error: interrupted by SIGINT; the files already written are complete "
                                        "(a sweep continues where it stopped when run again)"]
    assert sweep.is_finished(os.path.join(workdir, "seed=0")) and not sweep.is_finished(os.path.join(workdir, "seed=1"))
    rerun = script_runner.run(args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "sweep of 2 runs: 1 already finished, 1 to train" in rerun.stdout
    with open(os.path.join(workdir, "results.csv")) as f:
        assert [(r["name"], r["status"]) for r in csv.DictReader(f)] == [("seed=0", "ok"), ("seed=1", "ok")]


def test_a_run_whose_optimiser_state_overflows_is_marked_diverged_and_the_others_kept(small_dataset, tmp_path):
    """Adam at lr 1e6 keeps finite params but overflows its state: that run is diverged (its
    checkpoint could not be written), the other run of the group finishes with its results."""
    base = config_lib.replace(Config(), batch_size=32, eval_batch_size=200, train_eval="running")
    runs = sweep.make_runs(base, [{"learning_rate": 0.001}, {"learning_rate": 1e6}])
    rows = sweep.run_group(str(tmp_path), runs, small_dataset, print_fn=lambda line: None)
    assert [r["status"] for r in rows] == ["ok", "diverged"]
    assert rows[1]["message"].startswith("parameters or optimiser state became non-finite at step")
    assert rows[0]["test_accuracy"] > 0.3
    assert sorted(sweep.collect_rows(str(tmp_path)), key=lambda r: r["name"]) == sorted(rows, key=lambda r: r["name"])


def test_a_validation_split_is_evaluated_each_epoch_and_kept_in_the_rows(small_dataset, tmp_path):
    """With a validation split each epoch's record and the row hold the accuracy on the held-out
    images (what `evaluate` gives for the run's final params), besides the test accuracy."""
    from cnn_jax.data import sources as data
    from cnn_jax.engine import evaluation, state
    base = config_lib.replace(Config(), optimizer="momentum", batch_size=32, eval_batch_size=200,
                              train_eval="running", epochs=2)
    train_part, val_x, val_y = data.hold_out(small_dataset, 64)
    configs = [config_lib.replace(base, learning_rate=lr) for lr in (0.05, 0.001)]
    result = sweep.train_group(configs, train_part, validation=(val_x, val_y))
    assert result.steps_per_epoch == 6   # 192 of the 256 images train
    for i, config in enumerate(configs):
        run = state.unstack(result.state, i)
        alone = evaluation.evaluate(run.params, run.model_state, val_x, val_y, config)
        assert [r["epoch"] for r in result.histories[i]] == [0, 1]
        assert result.histories[i][-1]["validation_accuracy"] == pytest.approx(float(alone["accuracy"]))
        assert result.histories[i][-1]["validation_loss"] == pytest.approx(float(alone["loss"]), rel=1e-5)
        assert "test_accuracy" in result.histories[i][-1]
    runs = sweep.make_runs(base, [{"learning_rate": 0.05}])
    row = sweep.run_group(str(tmp_path), runs, train_part, print_fn=lambda line: None, validation=(val_x, val_y))[0]
    assert row["validation_size"] == 64
    assert row["validation_accuracy"] == pytest.approx(result.histories[0][-1]["validation_accuracy"])
    assert sweep.collect_rows(str(tmp_path)) == [row]


def test_a_finished_run_is_not_mixed_with_a_sweep_holding_out_another_validation_split(tmp_path):
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("seed=0,1")))
    path = sweep.run_dir(str(tmp_path), runs[0])
    workdir_lib.start(path, runs[0].config)
    workdir_lib.write_json(os.path.join(path, sweep.SWEEP_RESULT_FILE),
                           sweep.result_row(runs[0], [], "diverged", "loss became nan", 1.0, 2, validation_size=500))
    assert [r.name for r in sweep.pending_runs(str(tmp_path), runs, validation_size=500)[1]] == ["seed=0"]
    with pytest.raises(ConfigError, match=r"seed=0 was trained with --validation_size=500, not 0; give the same"):
        sweep.pending_runs(str(tmp_path), runs)
    # A row written before sweeps held out validation images reads as "none held out".
    old = {k: v for k, v in _row(0.01, "max", 0, 0.97).items()}
    workdir_lib.write_json(os.path.join(path, sweep.SWEEP_RESULT_FILE), old)
    row = sweep.read_row(os.path.join(path, sweep.SWEEP_RESULT_FILE))
    assert (row["validation_size"], row["validation_accuracy"], row["validation_loss"]) == (0, None, None)


def test_with_validation_accuracies_the_summary_ranks_on_them_not_on_test():
    rows = [{**_row(0.01, "max", 0, 0.99), "validation_accuracy": 0.90},
            {**_row(0.1, "max", 0, 0.95), "validation_accuracy": 0.97}]
    assert sweep.ranked_by(ROWS) == "test_accuracy" and sweep.ranked_by(rows) == "validation_accuracy"
    assert [e["settings"]["learning_rate"] for e in sweep.summarize(rows)] == [0.1, 0.01]
    assert [e["settings"]["learning_rate"] for e in sweep.summarize(ROWS)][0] == 0.01
    markdown = sweep.results_markdown(rows, plot_name=None)
    assert "sorted by mean validation accuracy" in markdown
    assert "| 0.1 | max | 1 | 0.9700 | 0.9500 |" in markdown
    assert "val acc" not in sweep.results_markdown(ROWS, plot_name=None)


# ----------------------------------------------------------------------------- reading files back

GOOD_SPEC_JSON = b'{"learning_rate": [0.003, 0.01], "pool": ["max", "avg"], "conv_filters": [[8, 16]], "seed": 0}\n'
GOOD_SPEC_YAML = b"- {learning_rate: 0.01, pool: max}\n- {learning_rate: 0.1, seed: 1, conv_filters: [8, 16]}\n"


@pytest.mark.parametrize("name, data, fragment", [
    ("grid.json", b"", "empty; write a grid (a mapping of flag to list of values) or a list of runs"),
    ("grid.yaml", b"\n\n", "empty; write a grid"),
    ("grid.json", GOOD_SPEC_JSON[:30], "not valid JSON (Expecting ',' delimiter: column 31)"),
    ("grid.json", GOOD_SPEC_JSON.replace(b"max", b"m\xe4x"), "not UTF-8 text (byte 0xe4 at offset 44)"),
    ("grid.yaml", b"\xff\xfeseed: [1]", "not UTF-8 text (byte 0xff at offset 0)"),
    ("grid.yaml", "seed: [1, 2]\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    ("grid.json", b'{"seed": [0, 1], "learning_rate": [NaN]}', "NaN is not a JSON number"),
    ("grid.yaml", b"learning_rate: [.nan]\n", "learning_rate=nan is not a finite number"),
    ("grid.json", b'{"learning_rate": [1e999]}', "learning_rate=inf is not a finite number"),
    ("grid.yaml", b"learning_rate: [1" + b"0" * 400 + b"]\n", "learning_rate=1000000000000000"),
    ("grid.json", b'"seed"', "expected a grid or a non-empty list of at most 100000 runs, found the string 'seed'"),
    ("grid.json", b"null", "found null"),
    ("grid.yaml", b"seed: {0: 1}\n", "has a key 0 that is not a string"),
    ("grid.json", b'{"seed": {"0": 1}}', "seed is {'0': 1}; give a value or a list of values"),
    ("grid.yaml", b"seed: 2024-01-01\n", "holds datetime.date(2024, 1, 1), a date"),
    ("grid.json", b'{"seed": [[0]]}', "seed=[0] is not a valid int"),
    ("grid.json", json.dumps({f: list(range(10)) for f in ("seed", "epochs", "num_fc", "batch_size", "log_every",
                                                           "conv_stride")}).encode(),
     "the grid has 1000000 runs, more than 100000"),
    ("runs.json", json.dumps([{"seed": 1}] * 100_001).encode(), "non-empty list of at most 100000 runs"),
    ("runs.json", b'[{"seed": 1}, {"x" : 1}]', "run 1: unknown flag 'x'"),
    ("runs.json", b'[{"\\n": 1}]', "run 0: unknown flag '\\n'"),
], ids=["empty_json", "empty_yaml", "truncated", "latin1", "utf16_bom", "utf16", "nan_json", "nan_yaml", "inf",
        "huge_float", "string", "null", "int_key", "dict_values", "date", "nested_list", "huge_grid", "many_runs",
        "unknown_flag", "newline_flag"])
def test_unusable_spec_files_are_one_line_naming_the_file_and_the_fix(tmp_path, name, data, fragment):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        sweep.load_spec_file(str(path))
    message = str(info.value)
    assert message.startswith(f"--sweep_file={path}") and fragment in message, message
    assert len(message.splitlines()) == 1 and len(message) < 700


def _settings_or_one_line_error(path):
    """`load_spec_file` and the checks experiments/sweep.py makes next (runs built and validated)."""
    settings_list = value_or_one_line_error(lambda: sweep.load_spec_file(str(path)), path)
    if settings_list is not None:
        runs = value_or_one_line_error(lambda: sweep.make_runs(Config(), settings_list, f"--sweep_file={path}"),
                                       path)
        for run in runs or []:
            assert model.validate(run.config) == run.config


@PROPERTY
@given(data=damaged(GOOD_SPEC_JSON) | st.binary(max_size=200), suffix=st.sampled_from([".json", ".yaml"]))
def test_any_bytes_as_a_spec_file_give_runs_or_one_line(tmp_path, data, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(data)
    _settings_or_one_line_error(path)


@PROPERTY
@given(data=damaged(GOOD_SPEC_YAML), suffix=st.sampled_from([".json", ".yaml"]))
def test_a_damaged_yaml_list_of_runs_gives_runs_or_one_line(tmp_path, data, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(data)
    _settings_or_one_line_error(path)


SPEC_FIELDS = st.sampled_from(["learning_rate", "seed", "pool", "conv_filters", "debug", "batch_size", "sead"])


@PROPERTY
@given(value=json_values | st.dictionaries(SPEC_FIELDS, json_values | st.lists(json_values, max_size=3), max_size=3)
       | st.lists(st.dictionaries(SPEC_FIELDS, json_values, max_size=3), max_size=3),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_any_json_value_as_a_spec_file_gives_runs_or_one_line(tmp_path, value, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text(json.dumps(value))
    _settings_or_one_line_error(path)


def test_a_damaged_sweep_result_is_one_line_naming_it_and_how_to_retrain(tmp_path):
    good = _row(0.01, "max", 0, 0.97)
    run = tmp_path / good["name"]
    run.mkdir()
    path = run / sweep.SWEEP_RESULT_FILE
    for data, fragment in [
        (b"", "empty"),
        (b"\xff" + json.dumps(good).encode(), "not UTF-8 text (byte 0xff at offset 0)"),
        (json.dumps(good).encode()[:50], "not valid JSON"),
        (b"[]", "expected a JSON object, found a list of 0 values"),
        (json.dumps({k: v for k, v in good.items() if k != "status"}).encode(), 'no "status" field'),
        (json.dumps({**good, "status": "done"}).encode(), '"status" is \'done\', not one of "ok", "diverged"'),
        (json.dumps({**good, "test_accuracy": None}).encode(), '"test_accuracy" is None, not a finite number'),
        (json.dumps({**good, "time_s": "12"}).encode(), '"time_s" is \'12\', not a finite number'),
        (json.dumps({**good, "settings": [1]}).encode(), '"settings" is [1], not a JSON object'),
        (json.dumps({**good, "settings": {"lr": 0.1}}).encode(), "settings: unknown flag 'lr'"),
        (json.dumps({**good, "settings": {"seed": "x"}}).encode(), "settings: seed='x' is not a valid int"),
    ]:
        path.write_bytes(data)
        with pytest.raises(ConfigError) as info:
            sweep.collect_rows(str(tmp_path))
        message = str(info.value)
        assert message.startswith(str(path)) and fragment in message, message
        assert message.endswith(f"delete it: the run then counts as unfinished and running the sweep again trains "
                                f"it (or delete its folder {run})") and "\n" not in message
    path.write_text(json.dumps({**good, "settings": {"learning_rate": 1, "conv_filters": [8, 16]}}))
    assert sweep.collect_rows(str(tmp_path))[0]["settings"] == {"learning_rate": 1.0, "conv_filters": [8, 16]}


@PROPERTY
@given(data=damaged(json.dumps(_row(0.01, "max", 0, 0.97)).encode()) | st.binary(max_size=100))
def test_any_bytes_as_a_sweep_result_give_a_row_or_one_line(tmp_path, data):
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / sweep.SWEEP_RESULT_FILE).write_bytes(data)
    value_or_one_line_error(lambda: sweep.collect_rows(str(tmp_path)), tmp_path / "run" / sweep.SWEEP_RESULT_FILE)


@settings(PROPERTY, max_examples=50)   # the tables and a figure per example: fewer
@given(changes=st.lists(st.dictionaries(st.sampled_from(sorted(_row(0.1, "max", 0, 0.9)))
                                        | st.sampled_from(["status", "test_accuracy", "test_loss", "train_accuracy"]),
                                        st.none() | json_values | st.sampled_from(["ok", "diverged"]), max_size=3),
                        min_size=1, max_size=3),
       settings_values=st.lists(st.dictionaries(SPEC_FIELDS, json_values, max_size=2)
                                | st.sampled_from([{}, {"seed": 1}, {"learning_rate": 0.1, "pool": "avg"}]),
                                min_size=3, max_size=3))
def test_any_json_in_sweep_results_gives_tables_or_one_line(tmp_path, changes, settings_values):
    """What --summarize does: read every finished run's row, then write the tables and the plot."""
    for i, change in enumerate(changes):
        row = {**_row(0.01 * (i + 1), "max", i, 0.9), "settings": settings_values[i], **change}
        (tmp_path / f"run{i}").mkdir(exist_ok=True)
        (tmp_path / f"run{i}" / sweep.SWEEP_RESULT_FILE).write_text(json.dumps(row))
    import matplotlib.pyplot as plt
    try:
        value_or_one_line_error(lambda: sweep.write_results(str(tmp_path)))
    finally:
        plt.close("all")


def test_command_line_undecodable_spec_results_and_run_configs_are_one_line(tmp_path):
    """No training: each file is read, and refused, before any data is loaded."""
    spec = tmp_path / "spec.yaml"
    spec.write_bytes("learning_rate: [0.01, 0.1]\nseed: [0, 1]\n".encode("utf-16"))
    sweep_dir = tmp_path / "sweep"
    good = _row(0.01, "max", 0, 0.97)
    (sweep_dir / good["name"]).mkdir(parents=True)
    workdir_lib.write_json(str(sweep_dir / good["name"] / sweep.SWEEP_RESULT_FILE), good)
    sweep.write_results(str(sweep_dir))
    damaged_row = sweep_dir / "learning_rate=0.1,pool=max,seed=0" / sweep.SWEEP_RESULT_FILE
    damaged_row.parent.mkdir()
    damaged_row.write_bytes(b"\xff" + json.dumps({**good, "name": damaged_row.parent.name}).encode())
    run_config = sweep_dir / "seed=5" / workdir_lib.CONFIG_FILE
    run_config.parent.mkdir()
    run_config.write_bytes(b'{"seed": "\xb5"}')
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    cases = [
        ([f"--workdir={tmp_path}/new", f"--sweep_file={spec}"],
         f"--sweep_file={spec}: not UTF-8 text (byte 0xff at offset 0); write a grid"),
        ([f"--workdir={sweep_dir}", "--summarize"],
         f"{damaged_row}: not UTF-8 text (byte 0xff at offset 0); delete it: the run then counts as unfinished"),
        ([f"--workdir={sweep_dir}", "--sweep=seed=5", "--data_dir=/nowhere"],
         f"{run_config}: not UTF-8 text (byte 0xb5 at offset 10); the run directory is damaged"),
    ]
    for args, fragment in cases:
        result = _sweep_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, (args, result.stderr)
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before   # tables kept
    assert not (tmp_path / "new").exists()


def test_a_damaged_result_of_a_finished_run_stops_the_sweep_before_anything_trains(tmp_path):
    runs = sweep.make_runs(Config(), sweep.grid_settings(sweep.parse_spec("seed=0,1")))
    for run in runs:
        workdir_lib.start(sweep.run_dir(str(tmp_path), run), run.config)
    result = os.path.join(sweep.run_dir(str(tmp_path), runs[1]), sweep.SWEEP_RESULT_FILE)
    open(result, "wb").write(b'{"name": "seed=1", "status": "o\xff"}')
    with pytest.raises(ConfigError, match=f"^{re.escape(result)}: not UTF-8 text"):
        sweep.pending_runs(str(tmp_path), runs)
    workdir_lib.write_json(result, sweep.result_row(runs[1], [], "diverged", "loss became nan", 1.0, 2))
    assert sweep.pending_runs(str(tmp_path), runs) == ([runs[0]], [runs[1]])


def test_a_run_directory_another_process_holds_is_refused_and_nothing_written(small_dataset, tmp_path):
    """Each run directory is locked for its group's training; the sweep directory is not (workers share it)."""
    from cnn_jax.rundir import lock
    from test_lock import start_holder
    runs = sweep.make_runs(config_lib.replace(Config(), batch_size=32, train_eval="running"),
                           [{"seed": 0}, {"seed": 1}])
    held = sweep.run_dir(str(tmp_path), runs[1])
    holder = start_holder(held)
    try:
        with pytest.raises(lock.RunDirInUse, match=f"{held} is in use by process {holder.pid} "):
            sweep.run_group(str(tmp_path), runs, small_dataset, print_fn=lambda line: None)
        # seed=0's directory, made for its lock, is gone again; seed=1 holds only its holder's lock.
        assert os.listdir(tmp_path) == [runs[1].name] and os.listdir(held) == [lock.LOCK_FILE]
        with lock.hold(str(tmp_path)):   # a worker does not hold the shared sweep directory
            pass
    finally:
        holder.kill()
        holder.wait()


def test_the_training_techniques_are_sweepable_and_split_groups_unless_per_run():
    """Read inside the compiled step, the techniques' fields split groups (seeds stay together);
    the weight decay they give sgd / momentum stays a per-run hyperparameter."""
    base = config_lib.replace(Config(), optimizer="momentum", sgd_weight_decay="l2")
    grid = sweep.parse_spec("label_smoothing=0,0.1 mixup_alpha=0,0.2 weight_decay=1e-4,5e-4 seed=0,1")
    runs = sweep.make_runs(base, sweep.grid_settings(grid))
    groups = sweep.group_runs(runs, 100)
    assert len(runs) == 16 and len(groups) == 4 and all(len(g) == 4 for g in groups)
    assert sweep.parse_spec("tta_flip=true,false random_erasing_fill=zero")["tta_flip"] == [True, False]
