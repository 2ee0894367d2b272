"""Run a script of experiments/ as the tests' subprocess.run would, but forked from a warm server
(tests/script_server.py) that has already imported JAX, cnn_jax, optuna and matplotlib: each run is
still a process of its own (its exit status, stdout, stderr, signals, atexit handlers), minus the
second or two that importing costs. Servers start on first use, in each test process.

A server is started for each environment the tests use, as far as variables read at import time
go (JAX_*, XLA_*, TF_*, PYTHON*, CNN_JAX_MODELS): a child never sees modules imported under other
values (the three used most recently are kept). The rest of the environment, the working
directory and the arguments are the child's own.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO_ROOT, "tests", "script_server.py")
IMPORT_TIME_PREFIXES = ("JAX_", "XLA_", "TF_", "PYTHON", "CNN_JAX_MODELS")

MAX_SERVERS = 3   # the environments used most recently; an older server is stopped
_servers: dict[frozenset, subprocess.Popen] = {}


def _server(env: dict[str, str]) -> subprocess.Popen:
    key = frozenset((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES))
    proc = _servers.pop(key, None)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT, env=env)
        atexit.register(proc.kill)
    _servers[key] = proc   # now the most recent
    while len(_servers) > MAX_SERVERS:
        oldest = _servers.pop(next(iter(_servers)))
        oldest.stdin.close()   # the server's loop ends with its input
        oldest.wait()
    return proc


def run(command: list[str], *, env: dict[str, str] | None = None, cwd: str = REPO_ROOT,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, ...)`; forked when `command` is
    `[sys.executable, <a .py script>, *args]`, a real subprocess otherwise."""
    env = dict(os.environ if env is None else env)
    if len(command) < 2 or command[0] != sys.executable or not str(command[1]).endswith(".py"):
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        request = {"script": os.path.join(cwd, str(command[1])), "args": [str(a) for a in command[2:]],
                   "cwd": cwd, "env": env, "stdout": out, "stderr": err, "timeout": timeout}
        proc = _server(env)
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the script server (tests/script_server.py) ended while running {command[1:]}")
        reply = json.loads(line)
        stdout, stderr = (open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""
                          for path in (out, err))
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)
