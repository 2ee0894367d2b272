"""Run directories: atomic writes, refusal of a foreign run, resume configs, metrics.jsonl."""

import json
import os

import pytest

from cnn_jax import config as config_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError


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
