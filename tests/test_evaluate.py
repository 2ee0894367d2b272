"""experiments/evaluate.py and experiments/plot.py on a run saved by experiments/train.py.

The evaluation must print the test accuracy training printed for its last epoch, and
work on a copy of the run directory elsewhere with the data somewhere else (another machine).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import script_runner
from cnn_jax import config as config_lib
from cnn_jax.data import sources
from cnn_jax.rundir import checkpoint, report
from conftest import REPO_ROOT


def script(name):
    return os.path.join(REPO_ROOT, "experiments", name)


@pytest.fixture(scope="module")
def env():
    """The environment of the subprocesses (with the session's shared compilation cache, conftest.py)."""
    return dict(os.environ)


def run(args, env, cwd=REPO_ROOT):
    return script_runner.run([sys.executable, *args], cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(mnist_dir, env, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval") / "run1")
    result = run([script("train.py"), "--pool=max", "--epochs=2", f"--workdir={workdir}", f"--data_dir={mnist_dir}",
                  "--train_subset=1024", "--test_subset=500", "--eval_batch_size=500"], env)
    assert result.returncode == 0, result.stderr
    last_epoch = [line for line in result.stdout.splitlines() if line.startswith("Epoch 1.")][0]
    return workdir, re.search(r"Test_acc (\d\.\d{4})", last_epoch).group(1)


def printed_accuracy(stdout):
    return re.search(r"^Test_acc (\d\.\d{4}) \((\d+)/(\d+); exactly ([\d.]+)\)", stdout, re.M).groups()


def test_evaluate_prints_the_accuracy_training_printed(trained, env):
    workdir, training_acc = trained
    result = run([script("evaluate.py"), f"--workdir={workdir}"], env)
    assert result.returncode == 0, result.stderr
    acc, correct, total, exact = printed_accuracy(result.stdout)
    assert acc == training_acc and total == "500"
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert float(exact) == saved["test_accuracy"] and int(correct) == round(saved["test_accuracy"] * 500)
    assert "checkpoint step 32 (end of epoch 1)" in result.stdout
    lines = result.stdout.splitlines()
    per_class = lines[lines.index("per-class accuracy:") + 1:][:10]
    assert [line.split()[0] for line in per_class] == [str(d) for d in range(10)]
    table = lines[lines.index("confusion matrix (rows: true class, columns: predicted class):") + 2:][:10]
    assert sum(int(v) for row in table for v in row.split()[1:]) == 500
    assert saved["confusion_matrix"] == [[int(v) for v in row.split()[1:]] for row in table]


def test_evaluate_replaces_flip_averaging(trained, env):
    """--tta_flip evaluates the saved params with flip-averaged predictions: what the evaluation
    code gives for them in that config, not what training printed."""
    workdir, training_acc = trained
    result = run([script("evaluate.py"), f"--workdir={workdir}", "--tta_flip"], env)
    assert result.returncode == 0, result.stderr
    assert "test set of 500 images, flip-averaged" in result.stdout
    config, state, _ = checkpoint.restore_run(workdir)
    flipped = config_lib.replace(config, tta_flip=True)
    expected = report.evaluate_test(state.params, state.model_state, sources.load(flipped), flipped)
    _, correct, _, exact = printed_accuracy(result.stdout)
    assert float(exact) == expected["accuracy"] and int(correct) == int(expected["confusion"].trace())
    plain = run([script("evaluate.py"), f"--workdir={workdir}", "--notta_flip"], env)
    assert printed_accuracy(plain.stdout)[0] == training_acc and "flip-averaged" not in plain.stdout
    loss = lambda out: re.search(r"test loss ([\d.]+)", out).group(1)  # noqa: E731
    assert loss(result.stdout) != loss(plain.stdout)   # the mirrored digits move the predictions


def test_evaluate_and_plot_a_run_copied_from_another_machine(trained, env, mnist_dir, tmp_path):
    workdir, training_acc = trained
    copy = str(tmp_path / "from_elsewhere")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("plots"))
    config = json.load(open(os.path.join(copy, "config.json")))
    config["data_dir"] = "/data/on/the/other/machine/mnist"
    json.dump(config, open(os.path.join(copy, "config.json"), "w"))
    other_cwd = str(tmp_path)

    missing = run([script("evaluate.py"), f"--workdir={copy}"], env, cwd=other_cwd)
    assert missing.returncode == 2 and "\n" not in missing.stderr.strip()
    assert "/data/on/the/other/machine/mnist" in missing.stderr and "Traceback" not in missing.stderr

    result = run([script("evaluate.py"), f"--workdir={copy}", f"--data_dir={os.path.abspath(mnist_dir)}"], env,
                 cwd=other_cwd)
    assert result.returncode == 0, result.stderr
    assert printed_accuracy(result.stdout)[0] == training_acc

    plotted = run([script("plot.py"), f"--workdir={copy}", f"--data_dir={os.path.abspath(mnist_dir)}"], env,
                  cwd=other_cwd)
    assert plotted.returncode == 0, plotted.stderr
    written = sorted(os.path.basename(p) for p in plotted.stdout.split())
    assert written == sorted(["learning_curves.png", "conv1_filters.png", "confusion_matrix.png", "misclassified.png"])
    for name in written:
        assert os.path.getsize(os.path.join(copy, "plots", name)) > 10_000


def test_evaluate_without_a_checkpoint_is_one_line(env, tmp_path):
    result = run([script("evaluate.py"), f"--workdir={tmp_path}"], env)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "holds no run (config.json not found)" in result.stderr and "Traceback" not in result.stderr


def test_a_damaged_latest_checkpoint_is_one_line_naming_the_older_one(trained, env, tmp_path):
    workdir, _ = trained
    copy = str(tmp_path / "damaged")
    shutil.copytree(workdir, copy)
    state = os.path.join(copy, "checkpoints", "32", "state")
    for root, _, files in os.walk(state):
        for name in files:
            if name != "_METADATA" and "metadata" not in root:
                open(os.path.join(root, name), "wb").write(b"garbage")
    plots_before = {n: os.path.getmtime(os.path.join(copy, "plots", n)) for n in os.listdir(os.path.join(copy, "plots"))}
    for name in ("evaluate.py", "plot.py"):
        result = run([script(name), f"--workdir={copy}"], env)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert f"{copy}/checkpoints/32: cannot restore" in result.stderr
        assert "damaged" in result.stderr and "other checkpoints here: 16 (choose one with --step" in result.stderr
    assert {n: os.path.getmtime(os.path.join(copy, "plots", n)) for n in os.listdir(os.path.join(copy, "plots"))} \
        == plots_before
    older = run([script("evaluate.py"), f"--workdir={copy}", "--step=16"], env)
    assert older.returncode == 0, older.stderr
    assert "checkpoint step 16 (end of epoch 0)" in older.stdout


@pytest.mark.parametrize("name", ["evaluate.py", "plot.py"])
@pytest.mark.slow
def test_bad_flags_and_workdirs_are_one_line(name, env, tmp_path, trained):
    workdir, _ = trained
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architecture": "resnet50"}')
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text('{"pool": "max",')
    cases = [([], "--workdir must have a value"),
             ([f"--workdir={workdir}", "--stepp=3"], "Unknown command line flag 'stepp'"),
             ([f"--workdir={workdir}", "--step=last"], "flag --step=last"),
             ([f"--workdir={workdir}", "extra"], "unexpected arguments extra"),
             ([f"--workdir={workdir}", "--step=5"], "no checkpoint for step 5; available: 16, 32"),
             ([f"--workdir={tmp_path / 'nowhere'}"], "holds no run (config.json not found)"),
             ([f"--workdir={workdir}/config.json"], "is a file, not a run directory"),
             ([f"--workdir={foreign}"], "config.json: unknown config field(s) architecture"),
             ([f"--workdir={damaged}"], "config.json: not valid JSON"),
             ([f"--workdir={workdir}", "--data_dir=/nowhere/mnist"], "--data_dir=/nowhere/mnist: no such directory")]
    if name == "plot.py":   # the same main_guard and restore_run as evaluate.py: a sample suffices
        cases = cases[1:2] + cases[5:6] + cases[8:9]
    for args, fragment in cases:
        result = run([script(name), *args], env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        assert [line for line in result.stderr.splitlines() if fragment in line] != [], (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (args, result.stderr)


def test_a_closed_stdout_ends_the_script_quietly(trained, env):
    """`evaluate.py ... | head -1`: the reader is gone before the report is printed."""
    workdir, _ = trained
    proc = subprocess.Popen([sys.executable, script("evaluate.py"), f"--workdir={workdir}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    proc.stdout.close()
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 141 and err == "", err


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, files in os.walk(folder) for name in files}


@pytest.mark.parametrize("script_name, damaged_file, data, fragment", [
    ("evaluate.py", "config.json", lambda good: b"\xff\xfe" + good,
     "config.json: not UTF-8 text (byte 0xff at offset 0); the run directory is damaged: restore the file"),
    ("evaluate.py", "checkpoints/32/meta/metadata", lambda good: b"[1]",
     "checkpoints/32/meta: expected a JSON object, found a list of 1 values; the checkpoint is damaged; "
     "other checkpoints here: 16 (choose one with --step"),
    ("plot.py", "metrics.jsonl", lambda good: good.replace(b'"kind": "epoch"', b'"kind": "\xe9poch"', 1),
     "metrics.jsonl: not UTF-8 text (byte 0xe9 at offset"),
], ids=["evaluate_config_latin1", "evaluate_meta_list", "plot_metrics_latin1"])
def test_an_undecodable_or_misshapen_run_file_is_one_line_and_changes_nothing(trained, env, tmp_path, script_name,
                                                                              damaged_file, data, fragment):
    workdir, _ = trained
    copy = str(tmp_path / "damaged")
    shutil.copytree(workdir, copy)
    path = os.path.join(copy, damaged_file)
    good = open(path, "rb").read()
    open(path, "wb").write(data(good))
    before = snapshot(copy)
    result = run([script(script_name), f"--workdir={copy}"], env)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, result.stderr
    assert snapshot(copy) == before   # the plots and every other file are kept as they were
