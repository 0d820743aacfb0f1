"""Pieces the bench suites share: running one contender in a child process, and timing
prxmail's state-store calls from outside for the ``--breakdown`` runs."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> [calls, wall seconds as the caller waited, seconds inside the call]
Stats = dict[str, list[float]]


def run_child(
    module: str,
    mode: str,
    spec: dict[str, Any],
    *,
    timeout: float,
    prefix: Sequence[str] = (),
    interpreter_args: Sequence[str] = ("-m",),
) -> dict[str, Any]:
    """Run ``python -m MODULE MODE`` with ``spec`` as JSON on stdin; return the last JSON
    line it printed (a profiler in ``prefix`` may print lines of its own after it).

    Raises:
        RuntimeError: the child failed; the message carries the end of its stderr.
    """
    cmd = [*prefix, sys.executable, *interpreter_args, module, mode]
    proc = subprocess.run(
        cmd,
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.get('contender', module)} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
    result: dict[str, Any] = json.loads(line)
    return result


def add_sample(stats: Stats, name: str, wall: float, inside: float) -> None:
    entry = stats.setdefault(name, [0.0, 0.0, 0.0])
    entry[0] += 1
    entry[1] += wall
    entry[2] += inside


@contextlib.contextmanager
def timed_store_calls(on_call: Callable[[str, float, float], None]) -> Iterator[None]:
    """Call ``on_call(method name, wall, inside)`` after every ``AsyncStateStore`` call
    made while the block runs.

    Every call goes through ``AsyncStateStore._run`` with a ``functools.partial`` of the
    store method: wall time as the trio task waits (the hop to the worker thread and
    back included) and time inside the method. This wraps a private name: it is for
    instrumented runs, never the timed ones. ``on_call`` runs in the calling task, so
    it sees that task's context (the account, for instance).
    """
    import prxmail.state

    store_class = prxmail.state.AsyncStateStore
    original_run = store_class._run

    async def timed_run(self: Any, fn: Callable[[], Any]) -> Any:
        inside = [0.0]

        def timed() -> Any:
            t = time.perf_counter()
            try:
                return fn()
            finally:
                inside[0] = time.perf_counter() - t

        t0 = time.perf_counter()
        try:
            return await original_run(self, timed)
        finally:
            method = getattr(fn, "func", fn)
            on_call(getattr(method, "__name__", "?"), time.perf_counter() - t0, inside[0])

    store_class._run = timed_run  # type: ignore[method-assign]
    try:
        yield
    finally:
        store_class._run = original_run  # type: ignore[method-assign]


@contextlib.contextmanager
def timed_state_store(stats: Stats) -> Iterator[Stats]:
    """Time every ``AsyncStateStore`` call while the block runs, into ``stats`` (rows
    ``store.METHOD``; see :func:`timed_store_calls`)."""

    def record(name: str, wall: float, inside: float) -> None:
        add_sample(stats, "store." + name, wall, inside)

    with timed_store_calls(record):
        yield stats
