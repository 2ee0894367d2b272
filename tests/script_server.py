"""A fork server for tests/script_runner.py: imports JAX and cnn_jax once, then runs each requested
script in a forked child, a real process of its own with its own exit status, stdout and stderr.

Requests and replies are JSON lines on stdin and stdout. A request names the script, its arguments,
the working directory, the environment, two files for the child's stdout and stderr, and a timeout.
The reply is {"returncode": ..., "timed_out": ...}; a child killed by a signal has returncode -signal,
as subprocess reports it. Nothing here initialises a JAX backend, so forking is safe: each child
starts its backend (and its threads) itself.
"""

import atexit
import json
import os
import runpy
import signal
import sys
import threading
import traceback

import absl.app  # noqa: F401  (the imports are what the server is for)
import jax  # noqa: F401
import matplotlib.figure  # noqa: F401
import optuna  # noqa: F401

import cnn_jax.cli  # noqa: F401
import cnn_jax.engine.evaluation  # noqa: F401
import cnn_jax.run  # noqa: F401
import cnn_jax.search  # noqa: F401
import cnn_jax.sweep  # noqa: F401


def _child(request: dict) -> None:
    """Become the script: its directory first on sys.path, its argv, its environment; exit as Python does."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:   # as the interpreter: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code & 0xFF)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        timed_out = threading.Event()

        def kill(pid=pid):
            timed_out.set()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(request["timeout"], kill)
        timer.start()
        _, status = os.waitpid(pid, 0)
        timer.cancel()
        timer.join()   # no thread but this one when the next child is forked
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(json.dumps({"returncode": returncode, "timed_out": timed_out.is_set()}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
