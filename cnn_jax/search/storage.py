"""Every call to a study's storage goes through here: retried through outages, bounded in time.

`GuardedStorage` wraps the Optuna storage that `study.open_storage` opens; every method of
Optuna's `BaseStorage` and `BaseHeartbeat` (asking, reporting, telling, heartbeats, reading the
study for the results) runs through one `Guard.call`. A call that fails with a *connection*
error (`is_connection_error`: the server stopped or unreachable, an SQLite file locked or gone)
is retried with backoff (`backoff`); the first failure of an outage prints one line, its end
another. Other errors (a finished trial, a bad value) pass through at once.

- Waiting calls (the default): retried until the outage has lasted `timeout` seconds
  (`--storage_timeout`), then `StorageUnavailable`, whose message is the one line the script
  prints before exiting with `EXIT_STORAGE_UNAVAILABLE` (75, EX_TEMPFAIL).
- Deferring calls (`with guard.deferring():`, used while trials train and by the heartbeat
  thread): during an outage they raise `StorageDown` at once (trying the storage again at most
  once per backoff step), so the caller keeps the report for later and training goes on.

See the table "When the storage goes away" in docs/search.md.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterator

import optuna
from optuna.storages._heartbeat import BaseHeartbeat

EXIT_STORAGE_UNAVAILABLE = 75          # EX_TEMPFAIL (sysexits.h): try again later
DEFAULT_TIMEOUT = 300                  # seconds of outage a worker rides out (--storage_timeout)
MAX_DELAY = 10.0                       # the longest wait between two tries


class StorageDown(Exception):
    """Raised by a deferring call while the storage is unreachable: keep the work, try later."""


class StorageUnavailable(Exception):
    """The storage stayed unreachable for longer than the timeout; the message is one line for the user."""


def backoff(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1` of an outage: 0.5, 1, 2, 4, 8, then 10."""
    return min(0.5 * 2 ** attempt, MAX_DELAY)


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the storage cannot be reached, rather than that the
    request was wrong: a refused or dropped connection, an SQLite database locked or unopenable,
    an I/O error on a storage file. Optuna reports most of them as `StorageInternalError`
    ("An exception is raised during the commit ..."), the cause being SQLAlchemy's."""
    import sqlalchemy.exc as sa
    kinds: list[type] = [sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError,
                         sqlite3.OperationalError, sqlite3.InterfaceError, OSError]
    try:
        import psycopg
        kinds += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:
        pass
    for e in _chain(error):
        if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
            return False
        if isinstance(e, tuple(kinds)) or (isinstance(e, sa.DBAPIError) and e.connection_invalidated):
            return True
    return False


def describe(error: BaseException) -> str:
    """What went wrong underneath `error`, as 'Type: first line': the driver's error where the chain
    holds one (Optuna's own message points the wrong way, SQLAlchemy's pool errors say nothing)."""
    chain = list(_chain(error))
    drivers: list[type] = [sqlite3.Error, OSError]
    try:
        import psycopg
        drivers.append(psycopg.Error)
    except ImportError:
        pass
    said = [e for e in chain if str(e).strip() not in ("", "()")]
    deepest = next((e for e in chain if isinstance(e, tuple(drivers))), None) or (said or chain)[-1]
    lines = str(deepest).strip().splitlines()
    return f"{type(deepest).__name__}: {lines[0][:200]}" if lines else type(deepest).__name__


class Guard:
    """Runs storage calls, retrying connection errors; one shared outage state for all threads.

    `name` (the storage's URL, password masked) appears in every line; `print_fn` gets the line
    when an outage starts and when it ends; `check` runs before each try (e.g. that an SQLite
    file is there) and raises a connection error when the storage cannot be used."""

    def __init__(self, name: str, timeout: float = DEFAULT_TIMEOUT,
                 print_fn: Callable[[str], None] = lambda line: print(line, flush=True),
                 check: Callable[[], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.name, self.timeout, self._print, self._check = name, float(timeout), print_fn, check
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._local = threading.local()
        self._down_since: float | None = None     # when the first failed call of the outage began
        self._attempts = 0                         # failed tries in this outage
        self._next_try = 0.0                       # deferring calls skip the storage until then
        self._cause = ""
        self._up_since = -float("inf")             # when the last outage ended (never: -inf)
        self.outages = 0

    # ------------------------------------------------------------------ state

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def up_for(self) -> float:
        """Seconds since the storage came back from the last outage (infinity if it never went away)."""
        return self._clock() - self._up_since

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Within the block, this thread's calls raise `StorageDown` during an outage instead of waiting."""
        previous = getattr(self._local, "deferring", False)
        self._local.deferring = True
        try:
            yield
        finally:
            self._local.deferring = previous

    def _failed(self, started: float, error: BaseException) -> tuple[float, float]:
        """Record a failed try that began at `started`: (the outage's age, seconds to wait before the
        next try, no later than the outage's deadline)."""
        with self._lock:
            now = self._clock()
            if self._down_since is None:
                self._down_since, self._attempts, self._cause = started, 0, describe(error)
                self.outages += 1
                self._print(f"storage {self.name} is unreachable ({self._cause}); retrying for up to "
                            f"{self.timeout:g} s (--storage_timeout); trials keep training, their results "
                            "are told when it is back")
            self._next_try = now + backoff(self._attempts)
            self._attempts += 1
            age = now - self._down_since
            return age, max(0.0, min(self._next_try, self._down_since + self.timeout) - now)

    def _succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            now = self._clock()
            self._print(f"storage {self.name} is reachable again after {now - self._down_since:.0f} s")
            self._down_since, self._up_since = None, now

    def unavailable(self, age: float) -> StorageUnavailable:
        return StorageUnavailable(
            f"storage {self.name} unreachable for {age:.0f} s, longer than --storage_timeout={self.timeout:g} "
            f"({self._cause}); the finished trials it was not told are kept in their run directories: "
            "once it is back, run the same command again to report them and continue the search")

    # ------------------------------------------------------------------ calls

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, retried through an outage (see the class and module docstrings)."""
        deferring = getattr(self._local, "deferring", False)
        while True:
            if deferring and self._down_since is not None:
                if self._clock() < self._next_try:
                    raise StorageDown(self._cause)
            started = self._clock()
            try:
                if self._check is not None:
                    self._check()
                result = fn(*args, **kwargs)
            except Exception as e:
                if not is_connection_error(e):
                    raise
                age, wait = self._failed(started, e)
                if deferring:
                    raise StorageDown(self._cause) from None
                if age >= self.timeout:
                    raise self.unavailable(age) from None
                self._sleep(wait)
                continue
            self._succeeded()
            return result


def _forward(name: str) -> Callable[..., Any]:
    def method(self: "GuardedStorage", *args: Any, **kwargs: Any) -> Any:
        return self.guard.call(getattr(self.inner, name), *args, **kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The wrapped storage's `{name}`, through the guard."
    return method


_FORWARDED = sorted({name for base in (optuna.storages.BaseStorage, BaseHeartbeat)
                     for name, value in vars(base).items() if callable(value) and not name.startswith("__")})


class _GuardedBase(optuna.storages.BaseStorage, BaseHeartbeat):
    pass


for _name in _FORWARDED:
    setattr(_GuardedBase, _name, _forward(_name))
abc.update_abstractmethods(_GuardedBase)


class GuardedStorage(_GuardedBase):
    """An Optuna storage (and heartbeat) whose every call goes through `guard` to `inner`."""

    def __init__(self, inner: optuna.storages.BaseStorage, guard: Guard, grace_period: float = 0.0):
        self.inner, self.guard, self.grace_period = inner, guard, grace_period

    def set_trial_state_values(self, trial_id: int, state: optuna.trial.TrialState,
                               values: Any = None) -> bool:
        """As the wrapped storage's, except that a try retried after a lost connection that finds the
        trial already in `state` (the lost try was committed) counts as done."""
        retried = [False]

        def attempt() -> bool:
            try:
                return self.inner.set_trial_state_values(trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                if retried[0] and self.inner.get_trial(trial_id).state == state:
                    return True
                raise
            except Exception as e:
                retried[0] = retried[0] or is_connection_error(e)
                raise

        return self.guard.call(attempt)

    def __getattr__(self, name: str) -> Any:   # e.g. RDBStorage's engine or url
        if name in ("inner", "guard"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def guard_of(storage: Any) -> Guard:
    """The guard of a `GuardedStorage` (Optuna may wrap it no further), or a guard that never waits."""
    guard = getattr(storage, "guard", None)
    return guard if isinstance(guard, Guard) else Guard("storage", timeout=0.0)


def sqlite_check(url: str) -> Callable[[], None] | None:
    """For an SQLite file URL, a check that the file exists (SQLite would make an empty one, and a
    study written there would be lost); None for other URLs."""
    if not url.startswith("sqlite:///") or url in ("sqlite://", "sqlite:///:memory:"):
        return None
    path = url[len("sqlite:///"):].split("?")[0]

    def check() -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"the database file {path} is missing")
    return check
