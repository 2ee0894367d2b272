"""cnn_jax.search.worker and experiments/search.py: training, pruning and telling trials, run
directories, resumption, one-line errors, and several workers on one study.

The worker tests run real processes against one storage: SQLite always (one worker
SIGKILLed mid-trial), PostgreSQL where its server binaries are installed (`.ci/run`
installs Debian's postgresql; the test starts its own server on a free local port).
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import optuna
import pytest
import script_runner
from conftest import default_sigint

from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.rundir import checkpoint
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.search import space as space_lib
from cnn_jax.search import storage as storage_lib
from cnn_jax.search import study as study_lib
from cnn_jax.search import worker as worker_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "experiments", "search.py")
SPACE = "--space=learning_rate=loguniform(1e-3,1e-1) momentum=uniform(0.5,0.95)"


def _flags(mnist_dir, *extra):
    """A tiny search: 256 training images (8 steps of 32) + 64 validation images, one epoch."""
    return [f"--data_dir={mnist_dir}", "--train_subset=320", "--validation_size=64", "--test_subset=100",
            "--batch_size=32", "--conv_filters=8,16", "--num_fc=32", "--optimizer=momentum", "--log_every=4",
            "--nocompilation_cache", SPACE, *extra]


def _env():
    return {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}


def _run(args, timeout=600):
    return script_runner.run([sys.executable, SCRIPT, *args], env=_env(), timeout=timeout)


def _states(url, name="search"):
    study = optuna.load_study(study_name=name, storage=url)
    return study, [t.state for t in study.get_trials()]


# ----------------------------------------------------------------------------- in-process


def test_a_worker_prunes_trials_out_of_their_group_and_tells_the_study(tmp_path, mnist_dir):
    """Grid over two learning rates (one vmapped group); a pruner that stops every trial after its
    first two evaluations: both trials are PRUNED in the study, trained 8 of 16 steps, and keep a
    run directory with a checkpoint of the step they stopped at."""
    base = config_lib.Config(data_dir=mnist_dir, train_subset=320, test_subset=100, batch_size=32,
                             conv_filters=(8, 16), num_fc=32, optimizer="momentum", epochs=2, log_every=4)
    settings = study_lib.Settings(space_lib.parse("learning_rate=0.01,0.05"), base, validation_size=64, eval_every=4)
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    study = study_lib.open_study(storage, "s", settings, "grid", 0,
                                 optuna.pruners.ThresholdPruner(lower=1.1, n_warmup_steps=2))
    lines = []
    report = worker_lib.run_worker(study, storage, settings, str(tmp_path), 2, 2, data.load, 1, max_parallel=4,
                                   print_fn=lines.append)
    assert (report.trained, report.pruned, report.complete) == (2, 2, 0)
    assert any(line.startswith("training trial(s) 0, 1 together") for line in lines)
    assert sorted(t.params["learning_rate"] for t in study.trials) == [0.01, 0.05]   # the grid, once each
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.PRUNED and sorted(t.intermediate_values) == [1, 2]
        run_dir = tmp_path / f"trial_{t.number:05d}"
        result = json.load(open(run_dir / "trial_result.json"))
        assert result["status"] == "pruned" and result["step"] == 8
        assert os.listdir(run_dir / "checkpoints") == ["8"]
        assert t.user_attrs["outcome"] == "pruned"
        # The trial's directory reads as a training run's (what plot.py and evaluate.py read).
        records = workdir_lib.read_metrics(str(run_dir))
        assert [r["kind"] for r in records].count("evaluation") == 2
        assert [r["validation_accuracy"] for r in records if r["kind"] == "epoch"] == [t.intermediate_values[2]]
        _, log = checkpoint.restore_state(str(run_dir), checkpoint.fresh_state(workdir_lib.read_config(str(run_dir))), 8)
        assert log.step == 8 and [r["validation_accuracy"] for r in log.history] == [t.intermediate_values[2]]


def test_a_trial_directory_held_by_another_process_is_refused_and_its_trial_requeued(tmp_path, mnist_dir):
    """One writer per trial directory: a held one stops the worker with the one-line lock error
    before anything is written there, and the asked trial goes back to the queue."""
    base = config_lib.Config(data_dir=mnist_dir, train_subset=320, test_subset=100, batch_size=32,
                             conv_filters=(8, 16), num_fc=32, optimizer="momentum", log_every=4)
    settings = study_lib.Settings(space_lib.parse("learning_rate=0.01"), base, validation_size=64)
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    study = study_lib.open_study(storage, "s", settings, "grid", 0, optuna.pruners.NopPruner())
    held = tmp_path / "trial_00000"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cnn_jax.rundir import lock\n"
                               "with lock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
                               str(held)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(os.listdir(held))
        with pytest.raises(config_lib.ConfigError, match=rf"{held} is in use by process {holder.pid} "):
            worker_lib.run_worker(study, storage, settings, str(tmp_path), 1, 1, data.load, 1, max_parallel=4,
                                  print_fn=lambda line: None)
        assert sorted(os.listdir(held)) == before
    finally:
        holder.kill()
        holder.wait()
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]


def _outage_setup(tmp_path, mnist_dir, timeout, restore=True):
    """A grid of two learning rates (one vmapped group, 4 evaluations each) on SQLite, and a print_fn
    that takes the database file away as the worker starts training (so its first report meets the
    outage) and, with `restore`, puts it back a second after the worker says it is unreachable."""
    base = config_lib.Config(data_dir=mnist_dir, train_subset=320, test_subset=100, batch_size=32,
                             conv_filters=(8, 16), num_fc=32, optimizer="momentum", epochs=2, log_every=4)
    settings = study_lib.Settings(space_lib.parse("learning_rate=0.01,0.02,0.05"), base, validation_size=64,
                                  eval_every=4)
    lines = []
    db, away = tmp_path / study_lib.STUDY_DB, tmp_path / "away.db"
    timers, taken = [], []

    def print_fn(line):
        lines.append(line)
        if line.startswith("training trial(s)") and not taken:   # the first group only
            taken.append(db.rename(away))
        elif "is unreachable" in line and restore:
            timers.append(threading.Timer(1.0, away.rename, [db]))
            timers[-1].start()

    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 30, 60, timeout=timeout,
                                     print_fn=print_fn)   # the guard's lines
    study = study_lib.open_study(storage, "s", settings, "grid", 0, optuna.pruners.NopPruner())
    return settings, storage, study, lines, print_fn, (db, away)


def _check_reported(study, tmp_path):
    """Every trial complete, with the evaluations its run directory recorded reported at their steps."""
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        row = json.load(open(tmp_path / f"trial_{t.number:05d}" / "trial_result.json"))
        assert t.intermediate_values == {ev["evaluation"]: ev["validation_accuracy"] for ev in row["evaluations"]}
        assert len(t.intermediate_values) == 4 and t.value == row["evaluations"][-1]["validation_accuracy"]
        assert t.user_attrs["outcome"] == "complete" and t.user_attrs["test_accuracy"] == row["test_accuracy"]


def test_trials_train_through_a_short_storage_outage_and_are_told_when_it_is_back(tmp_path, mnist_dir):
    """SQLite's file gone while a group trains: its reports wait, the group trains on, and everything
    is told once the file is back: both trials complete, every evaluation reported, one line each
    for the outage's start and end."""
    settings, storage, study, lines, print_fn, _ = _outage_setup(tmp_path, mnist_dir, timeout=60)
    report = worker_lib.run_worker(study, storage, settings, str(tmp_path), 2, 2, data.load, 30, max_parallel=4,
                                   print_fn=print_fn)
    assert (report.trained, report.complete, report.lost) == (2, 2, 0)
    assert len(study.trials) == 2
    _check_reported(study, tmp_path)
    assert [line.split(" (")[0].split(" after")[0] for line in lines if "storage " in line] == [
        f"storage {study_lib.default_storage(str(tmp_path))} is unreachable",
        f"storage {study_lib.default_storage(str(tmp_path))} is reachable again"]


def test_after_a_long_storage_outage_a_rerun_reports_the_finished_trials_and_trains_only_the_rest(tmp_path, mnist_dir):
    """The file stays away past the timeout: the group still finishes (its trials kept in their run
    directories), then the worker stops with StorageUnavailable. With the file back, and trial 1
    meanwhile failed as stale by another worker (and re-queued as trial 2), a rerun tells trial 0
    and trial 1's waiting copy from the run directories and trains only the third grid point."""
    settings, storage, study, lines, print_fn, (db, away) = _outage_setup(tmp_path, mnist_dir, timeout=1,
                                                                          restore=False)
    with pytest.raises(storage_lib.StorageUnavailable, match="longer than --storage_timeout=1 "):
        worker_lib.run_worker(study, storage, settings, str(tmp_path), 3, 2, data.load, 30, max_parallel=4,
                              print_fn=print_fn)
    kept = {p: open(p).read() for p in glob.glob(str(tmp_path / "trial_*" / "trial_result.json"))}
    assert len(kept) == 2
    away.rename(db)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.RUNNING] * 2
    # Another worker fails trial 1 as stale, as fail_stale_trials does, and re-queues it.
    storage.set_trial_state_values(study.trials[1]._trial_id, optuna.trial.TrialState.FAIL)
    storage.get_heartbeat_stale_trial_callback()(study, study.trials[1])
    lines.clear()
    report = worker_lib.run_worker(study, storage, settings, str(tmp_path), 3, 2, data.load, 30, max_parallel=4,
                                   print_fn=print_fn)
    assert (report.reported, report.trained, report.complete) == (2, 1, 1)
    assert [line for line in lines if "reported from its run directory" in line] == [
        "trial 0: complete (finished before the storage went away; reported from its run directory, "
        "not trained again)",
        "trial 2 (the re-queued copy of trial 1): complete (finished before the storage went away; reported "
        "from its run directory, not trained again)"]
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL] + \
        [optuna.trial.TrialState.COMPLETE] * 2
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["learning_rate"] for t in finished) == [0.01, 0.02, 0.05]
    assert finished[1].params == study.trials[1].params
    assert finished[1].user_attrs["run_dir"] == str(tmp_path / "trial_00001")
    assert {p: open(p).read() for p in kept} == kept   # not trained again
    for t in finished:
        row = json.load(open(os.path.join(t.user_attrs["run_dir"], "trial_result.json")))
        assert t.intermediate_values == {ev["evaluation"]: ev["validation_accuracy"] for ev in row["evaluations"]}
        assert len(t.intermediate_values) == 4 and t.value == row["evaluations"][-1]["validation_accuracy"]


# ----------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_a_search_writes_its_trials_and_results_resumes_and_repeats_with_its_seed(tmp_path, mnist_dir):
    workdir = str(tmp_path / "search")
    args = _flags(mnist_dir, f"--workdir={workdir}", "--trials=3", "--batch=2", "--pruner=median",
                  "--eval_every=4")
    first = _run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "this worker trained 3 trial(s)" in first.stdout
    study, states = _states(study_lib.default_storage(workdir))
    assert sorted(s.name for s in states) == ["COMPLETE"] * 3   # median pruning needs 4 finished trials first
    for t in study.trials:
        run_dir = os.path.join(workdir, f"trial_{t.number:05d}")
        config = json.load(open(os.path.join(run_dir, "config.json")))
        assert config["learning_rate"] == t.params["learning_rate"] and config["momentum"] == t.params["momentum"]
        assert os.listdir(os.path.join(run_dir, "checkpoints"))
        result = json.load(open(os.path.join(run_dir, "trial_result.json")))
        assert result["status"] == "complete" and len(result["evaluations"]) == 2   # steps 4 and 8
        assert t.value == result["evaluations"][-1]["validation_accuracy"]
        assert t.intermediate_values == {1: result["evaluations"][0]["validation_accuracy"], 2: t.value}
    with open(os.path.join(workdir, "trials.csv")) as f:
        assert len(f.read().strip().splitlines()) == 4
    command = open(os.path.join(workdir, "best_command.txt")).read()
    best = study.best_trial
    assert command.startswith("python experiments/train.py ") and "--optimizer=momentum" in command
    assert f"--learning_rate={best.params['learning_rate']!r}" in command
    for name in ("trials.md", "history.png", "importances.png", "parallel_coordinate.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    # The same command again trains nothing; a larger --trials trains only the difference.
    again = _run(args)
    assert again.returncode == 0 and "this worker trained 0 trial(s)" in again.stdout, again.stderr[-2000:]
    more = _run([a if a != "--trials=3" else "--trials=4" for a in args])
    assert more.returncode == 0 and "this worker trained 1 trial(s)" in more.stdout, more.stderr[-2000:]
    # One worker with the same seed repeats the search: the same params and the same values.
    repeat_dir = str(tmp_path / "repeat")
    repeat = _run([a if not a.startswith("--workdir=") else f"--workdir={repeat_dir}" for a in args])
    assert repeat.returncode == 0, repeat.stderr[-2000:]
    theirs = optuna.load_study(study_name="search", storage=study_lib.default_storage(repeat_dir)).trials
    assert [(t.params, t.value) for t in theirs] == [(t.params, t.value) for t in study.trials[:3]]


@pytest.mark.parametrize("extra, message", [
    (["--space=lr=uniform(0.1,1)"], "--space: unknown field 'lr'"),
    (["--space=learning_rate=gauss(1,2)"], "unknown distribution 'gauss'"),
    (["--space=learning_rate=uniform(0.5,0.1)"], "empty range"),
    (["--space=learning_rate=loguniform(0,0.1)"], "a log range must lie above zero"),
    (["--storage=postgresql://nobody:pw@127.0.0.1:9/none"], "--storage=postgresql://nobody:***@127.0.0.1:9/none cannot be opened"),
    (["--storage=sqlite:////no/such/folder/study.db"], "cannot be opened (OperationalError"),
    (["--learning_rate=0.1"], "--learning_rate is given as a flag and searched by --space"),
    (["--sampler=grid"], "--sampler=grid: learning_rate is a float range"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, mnist_dir, extra, message):
    args = _flags(mnist_dir, f"--workdir={tmp_path / 'w'}", *extra)
    spaces = [a for a in extra if a.startswith("--space=")]
    if spaces:
        args = [a for a in args if a != SPACE]
    result = _run(args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_changed_space_in_the_same_search_directory_is_refused(tmp_path, mnist_dir):
    workdir = tmp_path / "w"
    workdir.mkdir()
    storage = study_lib.open_storage(study_lib.default_storage(str(workdir)), 10, 60)
    settings = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-2)"), config_lib.Config())
    study_lib.open_study(storage, "search", settings, "random", 0, optuna.pruners.NopPruner())
    result = _run(_flags(mnist_dir, f"--workdir={workdir}"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: study 'search' exists with another --space: choose another --study_name (or --workdir), "
        "or give the same settings to continue it"]


# ----------------------------------------------------------------------------- several workers


def _worker(args):
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), cwd=REPO_ROOT, preexec_fn=default_sigint)


def _wait_for(process, text, timeout=300):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    process.kill()
    raise AssertionError(f"worker never printed {text!r}:\n{''.join(seen)[-3000:]}")


def _check_exactly(url, total, workdir=None):
    """`total` finished trials, none twice; every failed one re-queued (its params finished in a later trial)."""
    study, states = _states(url)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == total
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                           optuna.trial.TrialState.FAIL) for t in study.trials)
    for failed in (t for t in study.trials if t.state == optuna.trial.TrialState.FAIL):
        if failed.user_attrs.get("outcome") == "surplus":
            continue   # asked in a race and never trained
        retries = [t for t in finished if t.system_attrs.get("failed_trial") == failed.number]
        assert len(retries) == 1 and retries[0].params == failed.params
    if workdir is not None:
        done = sorted(glob.glob(os.path.join(workdir, "trial_*", "trial_result.json")))
        assert len(done) == total
        assert sorted(json.load(open(p))["number"] for p in done) == sorted(t.number for t in finished)
    return study


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_requeued(tmp_path, mnist_dir):
    workdir = str(tmp_path / "shared")
    args = _flags(mnist_dir, f"--workdir={workdir}", "--trials=3", "--batch=2", "--heartbeat_interval=1",
                  "--grace_period=3")
    # The survivor starts once the doomed worker has made the study; the doomed one is killed as
    # soon as it says it starts training (its trials then stay RUNNING, their heartbeat going stale).
    doomed = _worker(args)
    survivor = None
    try:
        _wait_for(doomed, "study 'search'")
        survivor = _worker(args)
        _wait_for(doomed, "training trial(s)")
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait()
        out, _ = survivor.communicate(timeout=600)
    finally:
        for p in (doomed, survivor):
            if p is not None and p.poll() is None:
                p.kill()
    assert survivor.returncode == 0, out[-3000:]
    study = _check_exactly(study_lib.default_storage(workdir), 3)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL and
              t.user_attrs.get("outcome") != "surplus"]
    assert len(failed) >= 1            # the killed worker's trial(s): failed by heartbeat, then re-queued
    # The survivor trained its own trial and, once their heartbeats went stale, the dead worker's.
    assert "this worker trained 3 trial(s)" in out, out[-3000:]
    done = glob.glob(os.path.join(workdir, "trial_*", "trial_result.json"))
    assert len(done) == 3


@pytest.mark.slow
def test_sigint_requeues_the_trials_in_training_and_a_rerun_trains_them(tmp_path, mnist_dir):
    workdir = str(tmp_path / "w")
    # 20 epochs (160 steps): the signal lands while the trials train.
    args = _flags(mnist_dir, f"--workdir={workdir}", "--trials=2", "--batch=2", "--epochs=20")
    worker = _worker(args)
    try:
        _wait_for(worker, "training trial(s)")
        worker.send_signal(signal.SIGINT)
        out, _ = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 130, out[-2000:]
    study, states = _states(study_lib.default_storage(workdir))
    interrupted = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["outcome"] for t in interrupted] == ["interrupted"] * 2
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == [t.number for t in interrupted]
    rerun = _run(args)
    assert rerun.returncode == 0 and "this worker trained 2 trial(s)" in rerun.stdout, rerun.stderr[-2000:]
    study = optuna.load_study(study_name="search", storage=study_lib.default_storage(workdir))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in finished) == sorted(t.number for t in waiting)
    assert sorted(str(t.params) for t in finished) == sorted(str(t.params) for t in interrupted)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin():
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


class _Postgres:
    """A PostgreSQL server of the tests' own: its URL, and stop (as a crash: `pg_ctl -m immediate`) and start."""

    def __init__(self, folder, as_user, root, port):
        self.folder, self.as_user, self.root, self.port = folder, as_user, root, port
        self.pgdata = os.path.join(root, "data")
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args, check=True):
        return subprocess.run([*self.as_user, os.path.join(self.folder, "pg_ctl"), "-D", self.pgdata, *args],
                              check=check, capture_output=True)

    def start(self):
        self._pg_ctl("-l", os.path.join(self.root, "log"), "-w", "-o",
                     f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def stop(self, check=True):
        self._pg_ctl("-m", "immediate", "stop", check=check)


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL server on a free 127.0.0.1 port (as user postgres when run as root)."""
    folder = _postgres_bin()
    if folder is None:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                    "(apt-get install postgresql; .ci/run does)")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="cnn_jax_pg_")
    if os.geteuid() == 0:    # postgres refuses to run as root
        import pwd
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = _Postgres(folder, as_user, root, _free_port())
    subprocess.run([*as_user, os.path.join(folder, "initdb"), "-D", server.pgdata, "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    server.start()
    try:
        yield server
    finally:
        server.stop(check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url(postgres_server):
    return postgres_server.url


@pytest.mark.slow
def test_two_workers_complete_exactly_n_trials_on_postgresql(tmp_path, mnist_dir, postgres_url):
    args = _flags(mnist_dir, "--trials=4", "--batch=2", f"--storage={postgres_url}", "--pruner=hyperband",
                  "--heartbeat_interval=1", "--grace_period=5")
    workers = [_worker([*args, f"--workdir={tmp_path / f'machine{i}'}"]) for i in range(2)]
    outputs = []
    try:
        for w in workers:
            outputs.append(w.communicate(timeout=600)[0])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    study = _check_exactly(postgres_url, 4)
    assert len({str(t.params) for t in study.trials}) == len(study.trials)   # the workers' proposals differ
    trained = [int(o.split("this worker trained ")[1].split(" ")[0]) for o in outputs]
    assert sum(trained) == 4
    # Each machine keeps the run directories of the trials it trained.
    dirs = [glob.glob(str(tmp_path / f"machine{i}" / "trial_*" / "trial_result.json")) for i in range(2)]
    assert sorted(len(d) for d in dirs) == sorted(trained)


def _outage_flags(mnist_dir, workdir, server, name, *extra):
    return _flags(mnist_dir, f"--workdir={workdir}", f"--storage={server.url}", f"--study_name={name}",
                  "--epochs=20", "--heartbeat_interval=1", *extra)


@pytest.mark.slow
def test_a_worker_rides_out_its_postgresql_server_stopped_for_a_few_seconds(tmp_path, mnist_dir, postgres_server):
    """The server stopped (as a crash) while a batch trains and started again a few seconds later:
    the worker says so in one line, trains on, tells everything when the server is back, and ends
    with exit status 0 and exactly N complete trials, none failed."""
    args = _outage_flags(mnist_dir, tmp_path / "w", postgres_server, "short_outage", "--trials=2", "--batch=2",
                         "--eval_every=4", "--grace_period=30", "--storage_timeout=120")
    worker = _worker(args)
    try:
        seen = _wait_for(worker, "training trial(s)")
        postgres_server.stop()
        try:
            seen += _wait_for(worker, "is unreachable", timeout=120)
            time.sleep(3)
        finally:
            postgres_server.start()
        out, _ = worker.communicate(timeout=600)
    finally:
        if worker.poll() is None:
            worker.kill()
    out = "".join(seen) + out
    assert worker.returncode == 0, out[-3000:]
    assert "Traceback" not in out and out.count("is unreachable") == 1 and out.count("is reachable again") == 1, out
    assert f"storage {postgres_server.url} is unreachable (OperationalError: " in out
    assert "this worker trained 2 trial(s) (2 complete" in out
    study, states = _states(postgres_server.url, "short_outage")
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    for t in study.trials:   # every evaluation reported, those made during the outage too
        row = json.load(open(tmp_path / "w" / f"trial_{t.number:05d}" / "trial_result.json"))
        assert t.intermediate_values == {ev["evaluation"]: ev["validation_accuracy"] for ev in row["evaluations"]}
        assert len(t.intermediate_values) == 40


@pytest.mark.slow
def test_a_postgresql_outage_longer_than_the_timeout_ends_in_one_line_and_a_rerun_retrains_nothing(
        tmp_path, mnist_dir, postgres_server):
    """Trial 0 complete, trial 1 training when the server stops for good: trial 1 trains to its end,
    then the worker waits --storage_timeout and ends with one line on stderr and exit status 75.
    With the server back, the same command reports trial 1 from its run directory, trains only
    trial 2, and the study holds exactly 3 complete trials, none failed, none trained twice."""
    workdir = tmp_path / "w"
    args = _outage_flags(mnist_dir, workdir, postgres_server, "long_outage", "--trials=3", "--batch=1",
                         "--grace_period=3", "--storage_timeout=2")
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        worker = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=err, text=True,
                                  env=_env(), cwd=REPO_ROOT, preexec_fn=default_sigint)
    try:
        try:
            seen = _wait_for(worker, "trial 0: complete") + _wait_for(worker, "training trial(s) 1")
            postgres_server.stop()
            out, _ = worker.communicate(timeout=300)
        finally:
            if worker.poll() is None:
                worker.kill()
        out = "".join(seen) + out
        lines = open(stderr).read().strip().splitlines()
        assert worker.returncode == storage_lib.EXIT_STORAGE_UNAVAILABLE == 75, out[-3000:] + "\n".join(lines)
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: storage {postgres_server.url} unreachable for ")
        assert "longer than --storage_timeout=2 (OperationalError: " in lines[0]
        assert lines[0].endswith("once it is back, run the same command again to report them and continue the search")
        assert out.count("is unreachable") == 1 and "Traceback" not in out
        kept = {p: open(p).read() for p in glob.glob(str(workdir / "trial_*" / "trial_result.json"))}
        assert sorted(json.loads(text)["number"] for text in kept.values()) == [0, 1]
    finally:
        postgres_server.start()
    rerun = _run(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "trial 1: complete (finished before the storage went away; reported from its run directory" in rerun.stdout
    assert "this worker trained 1 trial(s)" in rerun.stdout and "reported 1 finished by an earlier run" in rerun.stdout
    study, states = _states(postgres_server.url, "long_outage")
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    assert {p: open(p).read() for p in kept} == kept   # trials 0 and 1 not trained again
    assert [t.user_attrs["run_dir"] for t in study.trials] == [str(workdir / f"trial_{n:05d}") for n in range(3)]
