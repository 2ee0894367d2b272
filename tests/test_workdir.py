"""Run directories: atomic writes, refusal of a foreign run, resume configs, metrics.jsonl."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from test_readers import PROPERTY, damaged, json_values, value_or_one_line_error


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "a.json")
    workdir_lib.write_json(path, {"x": 1})
    workdir_lib.write_json(path, {"x": [1, 2]})
    assert json.load(open(path)) == {"x": [1, 2]} and os.listdir(tmp_path) == ["a.json"]


def test_a_crash_during_a_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    workdir_lib.write_json(path, {"good": True})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        workdir_lib.write_json(path, {"good": False})
    assert json.load(open(path)) == {"good": True} and os.listdir(tmp_path) == ["config.json"]


def test_non_finite_values_are_refused_before_anything_is_written(tmp_path):
    path = str(tmp_path / "results.json")
    workdir_lib.write_json(path, {"accuracy": 0.5})
    with pytest.raises(ValueError):
        workdir_lib.write_json(path, {"accuracy": float("nan")})
    assert json.load(open(path)) == {"accuracy": 0.5}


def test_config_round_trips_and_damage_is_one_line(tmp_path):
    config = config_lib.replace(Config(), conv_filters=(8, 16), pool="avg")
    workdir_lib.start(str(tmp_path), config)
    assert workdir_lib.read_config(str(tmp_path)) == config
    open(tmp_path / "config.json", "w").write('{"pool": "max",')
    with pytest.raises(ConfigError, match="config.json: not valid JSON") as error:
        workdir_lib.read_config(str(tmp_path))
    assert "\n" not in str(error.value)
    open(tmp_path / "config.json", "w").write('{"pool": "maximum"}')
    with pytest.raises(ConfigError, match="config.json: --pool='maximum'"):
        workdir_lib.read_config(str(tmp_path))


def test_check_refuses_a_foreign_run_unless_resume_or_overwrite(tmp_path):
    workdir = str(tmp_path / "run")
    config = Config()
    workdir_lib.check(workdir, config)                       # new folder: fine, nothing created
    assert not os.path.exists(workdir)
    workdir_lib.start(workdir, config)
    with pytest.raises(ConfigError, match="already holds a run"):
        workdir_lib.check(workdir, config_lib.replace(config, pool="avg"))
    with pytest.raises(ConfigError, match="exclude each other"):
        workdir_lib.check(workdir, config, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match=r"--pool=avg \(the run has max\) cannot change"):
        workdir_lib.check(workdir, config_lib.replace(config, pool="avg"), resume=True)
    workdir_lib.check(workdir, config_lib.replace(config, epochs=5, log_every=7), resume=True)
    workdir_lib.check(workdir, config_lib.replace(config, pool="avg"), overwrite=True)
    open(tmp_path / "file", "w").close()
    with pytest.raises(ConfigError, match="is a file"):
        workdir_lib.check(str(tmp_path / "file"), config)


def test_resume_config_applies_only_resumable_flags(tmp_path):
    workdir = str(tmp_path)
    stored = config_lib.replace(Config(), pool="avg", epochs=2)
    workdir_lib.start(workdir, stored)
    given = config_lib.replace(Config(), epochs=4)            # what the flags give: defaults + --epochs
    assert workdir_lib.resume_config(workdir, given, ["epochs"]) == config_lib.replace(stored, epochs=4)
    with pytest.raises(ConfigError, match="--pool=max"):
        workdir_lib.resume_config(workdir, given, ["epochs", "pool"])
    assert workdir_lib.resume_config(str(tmp_path / "fresh"), given, ["epochs"]) == given


def test_overwrite_deletes_only_the_runs_own_files(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.start(workdir, Config())
    os.makedirs(tmp_path / "checkpoints" / "10")
    open(tmp_path / "metrics.jsonl", "w").write("{}\n")
    open(tmp_path / "notes.txt", "w").write("mine")
    workdir_lib.start(workdir, config_lib.replace(Config(), pool="avg"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "notes.txt"]
    assert workdir_lib.read_config(workdir).pool == "avg"


def test_metrics_log_rewrites_atomically_and_drops_records_after_the_resumed_step(tmp_path):
    workdir = str(tmp_path)
    log = workdir_lib.MetricsLog(workdir, flush_seconds=3600)
    for step in (10, 20, 30):
        log.append({"kind": "train", "step": step, "loss": 1.0 / step})
    assert workdir_lib.read_metrics(workdir) == []              # buffered until a flush
    log.flush()
    assert [r["step"] for r in workdir_lib.read_metrics(workdir)] == [10, 20, 30]
    resumed = workdir_lib.MetricsLog(workdir, keep_until_step=20)
    assert [r["step"] for r in workdir_lib.read_metrics(workdir)] == [10, 20]
    resumed.append({"kind": "train", "step": 30, "loss": 0.5})
    resumed.flush()
    assert workdir_lib.read_metrics(workdir)[-1] == {"kind": "train", "step": 30, "loss": 0.5}
    assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
    workdir_lib.MetricsLog(workdir)                              # a fresh run starts an empty file
    assert workdir_lib.read_metrics(workdir) == []


def test_a_damaged_metrics_line_is_one_line_naming_file_and_line(tmp_path):
    workdir = str(tmp_path)
    good = '{"kind": "train", "step": 1, "loss": 2.5}\n'
    open(tmp_path / "metrics.jsonl", "w").write(good + '\n{"kind": "tra\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl: line 3: not valid JSON .* delete that line") as error:
        workdir_lib.read_metrics(workdir)
    assert "\n" not in str(error.value)
    open(tmp_path / "metrics.jsonl", "w").write(good + '[1, 2]\n')
    with pytest.raises(ConfigError, match="line 2: expected a JSON object, found a list of 2 values"):
        workdir_lib.read_metrics(workdir)


def test_a_file_given_as_workdir_is_named(tmp_path):
    open(tmp_path / "notes.txt", "w").write("mine")
    with pytest.raises(ConfigError, match=r"notes.txt is a file, not a run directory"):
        workdir_lib.read_config(str(tmp_path / "notes.txt"))


GOOD_CONFIG = json.dumps(config_lib.to_dict(Config()), indent=2).encode() + b"\n"
GOOD_METRICS = (b'{"kind": "train", "step": 10, "epoch": 0, "loss": 0.5, "moving_loss": 0.6, "images_per_second": 9.5}\n'
                b'{"kind": "epoch", "epoch": 0, "step": 20, "moving_loss": 0.4, "train_loss": 0.3, '
                b'"train_accuracy": 0.9, "test_loss": 0.35, "test_accuracy": 0.88, "epoch_time": 1.5}\n')


@pytest.mark.parametrize("data, fragment", [
    (b"", "config.json: empty; the run directory is damaged: restore the file from a copy, or start a new --workdir"),
    (GOOD_CONFIG[:40], "config.json: not valid JSON ("),
    (GOOD_CONFIG.replace(b'"max"', b'"m\xe4x"'), "config.json: not UTF-8 text (byte 0xe4 at offset"),
    (b"\xff\xfe{\x00}\x00", "config.json: not UTF-8 text (byte 0xff at offset 0)"),
    (b"<html>", "config.json: not valid JSON (Expecting value: column 1)"),
    (b"[1, 2]", "config.json: expected a JSON object of config fields, found a list of 2 values; the run"),
    (b'"pool"', "config.json: expected a JSON object of config fields, found the string 'pool'"),
    (GOOD_CONFIG.replace(b'"batch_size": 64', b'"batch_size": "x"'),
     "config.json: --batch_size='x' is not allowed: it must be an integer of at most 2147483647; correct the "
     "file, or start a new --workdir"),
    (GOOD_CONFIG.replace(b'"batch_size": 64', b'"batch_size": [1]'), "config.json: --batch_size=[1] is not allowed"),
    (GOOD_CONFIG.replace(b'"learning_rate": 0.001', b'"learning_rate": NaN'), "NaN is not a JSON number"),
    (GOOD_CONFIG.replace(b'"data_dir": ""', b'"data_dir": null'), "config.json: --data_dir=None is not allowed"),
    (b'{"architecture": "resnet50"}', "config.json: unknown config field(s) architecture; correct the file"),
], ids=["empty", "truncated", "latin1", "utf16", "html", "list", "string", "batch_size_text", "batch_size_list",
        "nan", "data_dir_null", "unknown_field"])
def test_a_damaged_config_json_is_one_line_naming_it(tmp_path, data, fragment):
    (tmp_path / "config.json").write_bytes(data)
    with pytest.raises(ConfigError) as error:
        workdir_lib.read_config(str(tmp_path))
    assert str(error.value).startswith(str(tmp_path / "config.json")) and fragment in str(error.value), error.value
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("line, fragment", [
    (b"\xff\n", f"metrics.jsonl: not UTF-8 text (byte 0xff at offset {len(GOOD_METRICS)})"),
    (b'{"kind": "train", "step": 30, "lo', "metrics.jsonl: line 3: not valid JSON (Unterminated string"),
    (b"[1, 2]\n", "line 3: expected a JSON object, found a list of 2 values"),
    (b'{"step": 30, "loss": 0.5}\n', 'line 3: no "kind" field'),
    (b'{"kind": "eval", "step": 30}\n', 'line 3: "kind" is \'eval\', not one of "train", "epoch"'),
    (b'{"kind": "train", "loss": 0.5}\n', 'line 3: no "step" field'),
    (b'{"kind": "train", "step": "30", "loss": 0.5}\n', 'line 3: "step" is \'30\', not a whole number >= 0'),
    (b'{"kind": "train", "step": 30, "loss": NaN}\n', "line 3: not valid JSON (NaN is not a JSON number)"),
    (b'{"kind": "train", "step": 30, "loss": null}\n', 'line 3: "loss" is None, not a finite number'),
    (b'{"kind": "epoch", "step": 30, "epoch": 1, "train_loss": 0.3}\n', 'line 3: no "train_accuracy" field'),
], ids=["latin1", "truncated", "list", "no_kind", "other_kind", "no_step", "step_text", "nan", "loss_null",
        "epoch_fields"])
def test_a_damaged_metrics_file_is_one_line_naming_file_line_and_field(tmp_path, line, fragment):
    (tmp_path / "metrics.jsonl").write_bytes(GOOD_METRICS + line)
    with pytest.raises(ConfigError) as error:
        workdir_lib.read_metrics(str(tmp_path))
    message = str(error.value)
    assert message.startswith(str(tmp_path / "metrics.jsonl")) and fragment in message, message
    assert message.endswith("delete that line (or the file, losing the curves)") and "\n" not in message


def test_good_metrics_are_read_whole(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(GOOD_METRICS + b"\n")
    assert workdir_lib.read_metrics(str(tmp_path)) == [json.loads(line) for line in GOOD_METRICS.splitlines()]


def test_a_search_trials_metrics_with_validation_epochs_and_evaluations_are_read(tmp_path):
    lines = [{"kind": "train", "step": 4, "loss": 0.9},
             {"kind": "evaluation", "evaluation": 1, "step": 8, "epoch": 0, "validation_loss": 0.5,
              "validation_accuracy": 0.8},
             {"kind": "epoch", "epoch": 0, "step": 8, "train_loss": 0.6, "train_accuracy": 0.7,
              "validation_loss": 0.5, "validation_accuracy": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert workdir_lib.read_metrics(str(tmp_path)) == lines
    assert [workdir_lib.held_out_split(r) for r in lines[1:]] == ["validation", "validation"]
    assert workdir_lib.EPOCH_RECORD.accepts(lines[2])
    # An epoch record without a held-out split's loss and accuracy is still refused.
    for damaged_line in ({k: v for k, v in lines[2].items() if k != "validation_loss"},
                         {k: v for k, v in lines[2].items() if not k.startswith("validation_")}):
        assert not workdir_lib.EPOCH_RECORD.accepts(damaged_line)
        (tmp_path / "metrics.jsonl").write_text(json.dumps(damaged_line) + "\n")
        with pytest.raises(ConfigError, match='line 1: no "validation_loss" field'):
            workdir_lib.read_metrics(str(tmp_path))


@PROPERTY
@given(data=damaged(GOOD_CONFIG) | st.binary(max_size=200))
def test_any_bytes_as_config_json_give_a_config_or_one_line(tmp_path, data):
    (tmp_path / "config.json").write_bytes(data)
    config = value_or_one_line_error(lambda: workdir_lib.read_config(str(tmp_path)), tmp_path / "config.json")
    assert config is None or model.validate(config) == config


@PROPERTY
@given(value=json_values | st.dictionaries(st.sampled_from(config_lib.field_names()), json_values, max_size=4))
def test_any_json_value_as_config_json_gives_a_config_or_one_line(tmp_path, value):
    (tmp_path / "config.json").write_text(json.dumps(value))
    config = value_or_one_line_error(lambda: workdir_lib.read_config(str(tmp_path)), tmp_path / "config.json")
    assert config is None or model.validate(config) == config


@PROPERTY
@given(data=damaged(GOOD_METRICS) | st.binary(max_size=200))
def test_any_bytes_as_metrics_give_records_or_one_line(tmp_path, data):
    (tmp_path / "metrics.jsonl").write_bytes(data)
    records = value_or_one_line_error(lambda: workdir_lib.read_metrics(str(tmp_path)), tmp_path / "metrics.jsonl")
    for record in records or []:
        assert record["kind"] in ("train", "epoch", "evaluation") and isinstance(record["step"], int)


@settings(PROPERTY, max_examples=30)   # a figure per example: fewer
@given(lines=st.lists(json_values | st.fixed_dictionaries(
    {"kind": st.sampled_from(["train", "epoch", "evaluation"])},
    optional={name: json_values | st.integers(0, 99) | st.floats(0, 1)
              for name in ("step", "epoch", "loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                           "validation_loss", "validation_accuracy")}),
    max_size=4))
def test_any_json_lines_as_metrics_give_records_the_plots_draw_or_one_line(tmp_path, lines):
    from cnn_jax.rundir import plots
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = value_or_one_line_error(lambda: workdir_lib.read_metrics(str(tmp_path)), tmp_path / "metrics.jsonl")
    if records:   # what the readers of the records do: the learning curves, a resumed run's log
        plots.learning_curves_figure(records)
        workdir_lib.MetricsLog(str(tmp_path), keep_until_step=50).flush()
