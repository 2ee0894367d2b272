"""One writer per run directory: an exclusive `fcntl.flock` on `<run dir>/.lock`, held for the whole run.

    with lock.hold(workdir):
        ...                      # check, load, train, write: no other process writes here meanwhile

A second process asking for the same directory gets `RunDirInUse`, a one-line ConfigError
naming the directory and the process that holds it, before it has written anything. The
kernel drops a flock when its holder's file descriptor closes, so also when the holder
dies in any way (SIGKILL included): a killed run never blocks the next one.

The lock file records its holder (PID, host, command) for that message. It is removed on
release, and a folder the lock had to create is removed again when nothing else was written
into it, so a run refused early (bad data) leaves no trace. The file's name starts with a dot
and is none of the run's entries (`workdir.RUN_ENTRIES`): it never makes a folder look like
it holds a run, and `--overwrite` leaves it alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from typing import Iterator

from cnn_jax.config import ConfigError
from cnn_jax.rundir.workdir import WriteError

LOCK_FILE = ".lock"


class RunDirInUse(ConfigError):
    """Another process holds the run directory's lock."""


def lock_path(folder: str) -> str:
    return os.path.join(folder, LOCK_FILE)


def holder_record() -> dict[str, object]:
    """What the lock file says about this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)[:300]}


def describe_holder(text: str) -> str:
    """`process 1234 (python experiments/train.py ...)` from a lock file's text, as far as it says."""
    try:
        holder = json.loads(text)
        pid = int(holder["pid"])
    except (ValueError, TypeError, KeyError):
        return "another process"   # the holder has not written its record yet
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"process {pid}{where}{command}"


def _missing_folders(folder: str) -> list[str]:
    """The folders `os.makedirs(folder)` would create, outermost first."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _acquire(path: str) -> int:
    """An open descriptor of `path` holding its exclusive flock; RunDirInUse when another holds it."""
    while True:
        # Read-only: a descriptor open for writing would keep the filesystem from being
        # remounted read-only; a flock needs none.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            folder = os.path.dirname(path)
            raise RunDirInUse(f"{folder} is in use by {describe_holder(text)}: wait for it to finish "
                              "or use another --workdir") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file before it lets go: a lock taken on a removed
        # file guards nothing, so take the file now at the path instead.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def hold(folder: str, create: bool = True) -> Iterator[None]:
    """Hold `folder`'s lock within the block (creating the folder if needed, unless `create` is False:
    then a missing folder is left missing and the block runs unlocked, having nothing to guard)."""
    created = _missing_folders(folder)
    if created and not create:
        yield
        return
    path = lock_path(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = _acquire(path)
    except OSError as e:
        _remove_empty(created)
        raise WriteError(f"cannot take the lock of {folder} ({e.strerror or e}: {e.filename or path}); "
                         "nothing was written there") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(holder_record()))
        except OSError:
            pass   # a full disk: the lock holds all the same, the refusal just names no process
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[str]) -> None:
    """Remove the folders the lock created (innermost first) that nothing else was written into."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            return
