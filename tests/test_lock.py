"""One writer per run directory: the lock refuses a second process in one line, writes nothing,
and dies with its holder (tested with real processes)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cnn_jax.rundir import lock
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from conftest import REPO_ROOT

# Holds the lock of argv[1] until killed; says so on stdout once it holds it.
HOLDER = textwrap.dedent("""
    import sys, time
    from cnn_jax.rundir import lock
    with lock.hold(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(600)
""")


def start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert proc.stdout.readline() == "holding\n"
    return proc


def snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns,
                                                  open(path, "rb").read() if name in files else None)
    return out


def test_a_second_process_is_refused_naming_the_holder_and_changes_nothing(tmp_path):
    folder = str(tmp_path / "run")
    holder = start_holder(folder)
    try:
        before = snapshot(folder)
        with pytest.raises(lock.RunDirInUse) as refused:
            with lock.hold(folder):
                pytest.fail("the lock was taken twice")
        message = str(refused.value)
        assert message == (f"{folder} is in use by process {holder.pid} ({os.path.basename(sys.executable)} "
                           f"-c {folder}): wait for it to finish or use another --workdir")
        assert isinstance(refused.value, ConfigError)
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_does_not_block_the_next_run(tmp_path):
    folder = str(tmp_path / "run")
    holder = start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(lock.lock_path(folder))          # the file stays; its lock died with the holder
    with lock.hold(folder):
        assert str(os.getpid()) in open(lock.lock_path(folder)).read()
    assert not os.path.exists(lock.lock_path(folder))


def test_the_lock_leaves_no_trace_in_a_folder_it_had_to_create(tmp_path):
    folder = tmp_path / "new" / "run"
    with lock.hold(str(folder)):
        assert os.listdir(folder) == [lock.LOCK_FILE]
    assert not (tmp_path / "new").exists()
    with lock.hold(str(folder)):
        open(folder / "config.json", "w").write("{}")
    assert os.listdir(folder) == ["config.json"]
    with lock.hold(str(tmp_path / "missing"), create=False):
        pass
    assert not (tmp_path / "missing").exists()


def test_the_lock_file_is_not_a_run_and_survives_overwrite(tmp_path):
    folder = str(tmp_path)
    with lock.hold(folder):
        assert not workdir_lib.holds_run(folder)
        workdir_lib.check(folder, Config())                  # a fresh folder, not a foreign run
        workdir_lib.start(folder, Config())
        workdir_lib.start(folder, Config(), overwrite=True)
        assert sorted(os.listdir(folder)) == [lock.LOCK_FILE, "config.json"]


def test_a_read_only_folder_is_one_line_and_nothing_is_written(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the read-only filesystem case is in test_run")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(workdir_lib.WriteError, match=r"cannot take the lock of .*Permission denied.* "
                                                         r"nothing was written there"):
            with lock.hold(str(tmp_path / "run")):
                pass
    finally:
        os.chmod(tmp_path, 0o700)


def test_describe_holder_copes_with_an_empty_or_foreign_file():
    assert lock.describe_holder("") == "another process"
    assert lock.describe_holder("not json") == "another process"
    assert lock.describe_holder('{"pid": 7, "host": "elsewhere", "command": "python x.py"}') == (
        "process 7 on elsewhere (python x.py)")
