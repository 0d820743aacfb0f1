"""Run an external handler command for one message (``prxmail serve --exec``).

Theory of operation
-------------------
The command is given as argv (:func:`parse_exec_command` splits a config string the way
a shell would, but no shell ever runs). The handler gets one JSON object on stdin
(:func:`encode_payload`), its stdout is the reply (the body, or with ``reply_format =
"json"`` one JSON object that :mod:`prxmail.service` parses), its stderr is kept for the log,
and its exit status says whether it succeeded. Three tasks move the bytes at the same
time -- feeding stdin, reading stdout, reading stderr -- so a handler that writes before
it has read all its input cannot deadlock against us.

Bounds (style rule 8): stdout is read up to the caller's ``max_output_bytes`` (a reply
body; :data:`DEFAULT_MAX_OUTPUT_BYTES`), stderr keeps only its last
:data:`STDERR_TAIL_BYTES`. Output over the stdout limit is a *failure*, not a truncated
reply: cutting an answer off mid-sentence and mailing it is worse than not answering
and logging why. The handler is then stopped at once rather than left to fill a pipe
nobody reads.

Invalid UTF-8 on stdout is decoded with U+FFFD replacement characters and flagged
(:attr:`HandlerResult.stdout_invalid_utf8`): one stray Latin-1 byte in a long answer
should not cost the sender the answer, and the flag lets the caller log a warning.

Lifetime: the handler runs in a new session (``start_new_session=True``), so it and
everything it starts form one process group that we can signal together. The caller owns
the timeout: when the caller's cancel scope fires, the group gets SIGTERM, then SIGKILL
after ``kill_grace`` seconds, and the handler is reaped before the cancellation
propagates -- no zombies, no open pipes. When the handler exits by itself, whatever it
left running in its group (a backgrounded child still holding the pipes) gets
:data:`PIPE_DRAIN_GRACE_SECONDS` to finish writing and is then killed. Signals go to the
group only while its leader is exited-but-not-yet-reaped or alive, so the group id can
never have been reused by an unrelated process.

Escapers: a process group only holds what stays in it. A handler may ``setsid()`` a
child (a daemon, a double fork), which leaves the group and is re-parented away from the
handler, so ``killpg`` misses it and it would outlive both the handler and prxmail. Every
run therefore gets a mark in its environment (:data:`RUN_MARK_ENV` = a random token) that
everything it starts inherits, and when the run ends -- by itself, on timeout, on
cancellation -- every process still carrying that run's mark is SIGKILLed, wherever it
now sits (Linux: found through ``/proc/<pid>/environ``, signalled through a pidfd so a
recycled pid can never be hit), and reaped if it became ours. ``prxmail serve`` also
runs inside :func:`contain_orphans`: it is a child subreaper (``PR_SET_CHILD_SUBREAPER``),
so orphans of its handlers are re-parented to prxmail rather than to init, reaped after
each run, and whatever is left is stopped when serve ends -- even a process that also
replaced its environment. Limits, stated: a descendant that both leaves the session
*and* exec()s with a fresh environment is not tied to its run, only to prxmail, and is
stopped at serve's end, not at its run's; one that changes its uid (setuid binaries)
cannot be read or signalled; one stuck in the kernel (D state) dies only when it leaves
it; and only containment by the OS (a cgroup, e.g. systemd's ``KillMode=control-group``)
is airtight against all of these. Off Linux, only the process group is stopped.

A handler that cannot be started at all (not found, not executable) raises
:class:`~prxmail.errors.HandlerError`: that is not the message's fault. Everything the
handler does once running -- non-zero exit, death by signal, too much output -- is a
:class:`HandlerResult` with ``ok`` False, never an exception.

POSIX only (process groups, ``killpg``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Final

import attrs
import trio

from prxmail._validate import parse_exec_command
from prxmail.errors import HandlerError, LocalProtocolError

__all__ = [
    "DEFAULT_KILL_GRACE_SECONDS",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "PIPE_DRAIN_GRACE_SECONDS",
    "RUN_MARK_ENV",
    "STDERR_TAIL_BYTES",
    "HandlerResult",
    "contain_orphans",
    "encode_payload",
    "inherit_environment",
    "parse_exec_command",
    "run_exec_handler",
]

# A reply is a mail body written for a person: 1 MiB of text is hundreds of pages, far
# beyond any real answer, yet small enough that a configured number of concurrent
# handlers cannot exhaust memory through runaway output.
DEFAULT_MAX_OUTPUT_BYTES: Final = 1024 * 1024

# Only the end of stderr is kept: a Python traceback's last frames and message fit in
# 8 KiB, and the tail is what goes into one log line per failed message.
STDERR_TAIL_BYTES: Final = 8 * 1024

# Bytes asked for per read: the usual pipe buffer size on Linux is 64 KiB, so one read
# usually empties it.
READ_CHUNK_BYTES: Final = 64 * 1024

# Between SIGTERM and SIGKILL: enough for a handler to flush and exit cleanly, short
# enough that a shutdown or timeout is not held up for long.
DEFAULT_KILL_GRACE_SECONDS: Final = 5.0

# After the handler exits, how long something it left behind may keep our pipes open
# before it is killed: output still in flight arrives within milliseconds, a backgrounded
# child holding the pipe would otherwise block us forever.
PIPE_DRAIN_GRACE_SECONDS: Final = 1.0

# The environment variable that ties every process a handler run starts to that run
# (inherited across fork, setsid and exec): its value is a fresh random token per run.
RUN_MARK_ENV: Final = "PRXMAIL_HANDLER_RUN"

# Random bytes per run mark: 128 bits, so no other process carries one by chance.
_RUN_MARK_BYTES: Final = 16

# Leftovers are killed in rounds, because one may fork between our scan and our
# SIGKILL. Each round kills everything it found, so a few rounds end any honest
# process tree; the bound keeps a fork bomb from holding us forever.
SWEEP_ROUNDS: Final = 20

# How long to wait for SIGKILLed leftovers to be gone, for all of them together: a
# SIGKILL takes effect in microseconds unless a process is stuck in the kernel (D state),
# and that cannot be helped by waiting longer.
SWEEP_WAIT_SECONDS: Final = 2.0

# prctl(2) option number from <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER: Final = 36


def encode_payload(payload: Mapping[str, object]) -> bytes:
    """Serialise the message payload for the handler's stdin: one JSON object + newline.

    Non-ASCII text is written as UTF-8 (not ``\\u`` escapes). Should a string contain
    lone surrogates (never valid UTF-8), the whole object is written with ASCII escapes
    instead, which is still valid JSON and loses nothing.

    Args:
        payload: Anything ``json.dumps`` accepts (tuples become arrays).

    Returns:
        The bytes to write.

    Raises:
        LocalProtocolError: the payload is not JSON-serialisable (or contains NaN).
    """
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"handler payload is not JSON-serialisable: {exc}") from exc
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(payload, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


def inherit_environment(*, exclude: Collection[str] = ()) -> dict[str, str]:
    """This process's environment without some variables, for ``env=``.

    Use it to keep secrets away from the handler, e.g. the variable the mail password
    was read from.

    Args:
        exclude: Names of variables to leave out.

    Returns:
        A new dict.
    """
    return {k: v for k, v in os.environ.items() if k not in exclude}


@attrs.frozen
class HandlerResult:
    """What a handler run produced.

    Attributes:
        exit_code: The exit status; negative ``-N`` when killed by signal N.
        stdout: The reply body, decoded as UTF-8. When ``stdout_overflow`` is set it
            holds only the first ``max_output_bytes`` (for the log), not a reply.
        stderr_tail: The last :data:`STDERR_TAIL_BYTES` of stderr, decoded leniently.
        duration: Seconds from start to exit.
        stdout_overflow: stdout exceeded ``max_output_bytes``; the handler was stopped
            and the run counts as failed.
        stdout_invalid_utf8: stdout was not valid UTF-8; bad bytes became U+FFFD.
    """

    exit_code: int
    stdout: str = attrs.field(repr=lambda s: f"<{len(s)} chars>")
    stderr_tail: str
    duration: float
    stdout_overflow: bool = False
    stdout_invalid_utf8: bool = False

    @property
    def ok(self) -> bool:
        """True when the handler exited with status 0 within the output limit."""
        return self.exit_code == 0 and not self.stdout_overflow

    @property
    def reply_body(self) -> str | None:
        """The reply to send: stdout of a successful run, or ``None`` (failed, or
        nothing but white space printed -- the handler chose not to answer)."""
        if not self.ok or not self.stdout.strip():
            return None
        return self.stdout

    @property
    def failure_reason(self) -> str | None:
        """A short, log-friendly reason why the run failed, or ``None`` if it did not."""
        if self.stdout_overflow:
            return "handler output exceeded the size limit"
        if self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = f"signal {-self.exit_code}"
            return f"handler killed by {name}"
        if self.exit_code > 0:
            return f"handler exited with status {self.exit_code}"
        return None


# -- leftovers: what a run started and left behind (Linux /proc) ------------------------


@attrs.define
class _Adoption:
    """This process's handler children, for telling them from adopted orphans.

    ``leaders``: handler leaders started and not yet reaped -- never touched here
    (trio reaps them). ``starting``: starts in flight; zombies are not reaped then,
    because a new leader exists (and may already be a zombie) before its pid is known
    to us. ``active``: :func:`contain_orphans` is in force. ``preexisting``: the
    (pid, start time) of children we had before it was -- not ours to touch.
    """

    leaders: set[int] = attrs.Factory(set)
    starting: int = 0
    active: bool = False
    preexisting: set[tuple[int, int]] = attrs.Factory(set)


_ADOPTION: Final = _Adoption()


def _set_subreaper(on: bool) -> bool:
    if sys.platform != "linux":  # pragma: no cover - Linux only
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0)


@contextlib.contextmanager
def contain_orphans() -> Iterator[bool]:
    """Make this process the reaper of what its handlers abandon, for the block.

    Inside, this process is a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): a
    process a handler ``setsid()``s and abandons is re-parented to us instead of to
    init. Such orphans are reaped after every handler run, and when the block ends
    every child of ours that was not there before it began and is not a running
    handler is SIGKILLed and reaped -- also one that dropped its run's mark. For
    ``prxmail serve``, which owns its process: code in the same process that starts
    children of its own while the block runs would see them stopped at its end.

    Yields:
        True when the subreaper could be set (Linux); False means only the run marks
        and process groups contain handlers.
    """
    if _ADOPTION.active or not _set_subreaper(True):
        yield False
        return
    _ADOPTION.preexisting = set(_child_stats())
    _ADOPTION.active = True
    try:
        yield True
    finally:
        try:
            _stop_adopted()
        finally:
            _ADOPTION.active = False
            _ADOPTION.preexisting = set()
            _set_subreaper(False)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1]), int(rest[19])


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:  # pragma: no cover - no /proc
        return []


def _marked(mark: bytes) -> list[tuple[int, int]]:
    """(pid, start time) of every process whose environment holds ``mark``."""
    found = []
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if mark in environ.split(b"\0"):
            stat = _stat(pid)
            if stat is not None:
                found.append((pid, stat[2]))
    return found


def _children() -> list[int]:
    """Our own child processes (all threads' children)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # pragma: no cover - no /proc
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def _open_same(pid: int, start: int) -> int | None:
    """A pidfd for ``pid`` if it is still the process that started at ``start``.

    The pidfd pins the process: once it is open and the start time still matches, a
    signal sent through it can only reach that process, never a recycled pid.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    stat = _stat(pid)
    if stat is None or stat[2] != start:
        os.close(fd)
        return None
    return fd


def _kill(targets: list[tuple[int, int]], fds: dict[tuple[int, int], int]) -> None:
    for target in targets:
        if target in fds:
            continue
        fd = _open_same(*target)
        if fd is None:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:  # exited meanwhile, or not ours to signal
            os.close(fd)
            continue
        fds[target] = fd


def _wait_gone_and_reap(fds: dict[tuple[int, int], int]) -> None:
    poller = select.poll()
    for fd in fds.values():
        poller.register(fd, select.POLLIN)
    pending = set(fds.values())
    deadline = time.monotonic() + SWEEP_WAIT_SECONDS
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            pending.discard(fd)
            poller.unregister(fd)
    for fd in fds.values():
        if fd not in pending:
            # Ours only if it was re-parented to us (subreaper); init reaps the rest.
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        os.close(fd)


def _sweep_run(mark: bytes) -> int:
    """SIGKILL and reap every process carrying ``mark``; returns how many were killed."""
    if sys.platform != "linux":  # pragma: no cover - /proc and pidfds are Linux
        return 0
    fds: dict[tuple[int, int], int] = {}
    try:
        for _ in range(SWEEP_ROUNDS):
            found = [t for t in _marked(mark) if t not in fds]
            if not found:
                break
            _kill(found, fds)
    finally:
        _wait_gone_and_reap(fds)
    return len(fds)


def _child_stats() -> list[tuple[int, int]]:
    """(pid, start time) of our children that are not handler leaders or zombies."""
    found = []
    for pid in _children():
        stat = _stat(pid)
        if pid not in _ADOPTION.leaders and stat is not None and stat[0] != "Z":
            found.append((pid, stat[2]))
    return found


def _reap_adopted() -> int:
    """Reap exited orphans re-parented to us (only inside contain_orphans)."""
    if not _ADOPTION.active or _ADOPTION.starting:
        return 0
    reaped = 0
    for pid in _children():
        stat = _stat(pid)
        if pid in _ADOPTION.leaders or stat is None or stat[0] != "Z":
            continue
        if (pid, stat[2]) in _ADOPTION.preexisting:
            continue
        with contextlib.suppress(ChildProcessError):
            # WNOHANG on a zombie: returns at once.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            reaped += 1
    return reaped


def _stop_adopted() -> int:
    """Kill and reap every adopted orphan; returns how many were killed."""
    fds: dict[tuple[int, int], int] = {}
    try:
        for _ in range(SWEEP_ROUNDS):
            found = [t for t in _child_stats() if t not in fds and t not in _ADOPTION.preexisting]
            if not found:
                break
            _kill(found, fds)
    finally:
        _wait_gone_and_reap(fds)
    _reap_adopted()
    return len(fds)


async def _sweep(mark: bytes) -> None:
    # Reading /proc is blocking file I/O over every process: off the event loop.
    await trio.to_thread.run_sync(_sweep_run, mark)
    _reap_adopted()


@attrs.define
class _Output:
    limit: int
    stdout: bytearray = attrs.Factory(bytearray)
    stderr: bytearray = attrs.Factory(bytearray)
    stderr_truncated: bool = False
    overflow: bool = False
    open_readers: int = 2
    readers_done: trio.Event = attrs.Factory(trio.Event)

    def reader_finished(self) -> None:
        self.open_readers -= 1
        if self.open_readers == 0:
            self.readers_done.set()


@attrs.define
class _Child:
    """The handler process and whether we may have reaped it.

    ``trio.Process.returncode`` (like ``poll``) reaps an exited child, so it is never
    consulted before the end: reaping is done in exactly one place, and this flag says
    whether that place was reached.
    """

    proc: trio.Process
    reaped: bool = False

    async def reap(self) -> int:
        self.reaped = True  # set first: from now on the pid may be gone
        return await self.proc.wait()


def _signal_group(child: _Child, sig: signal.Signals) -> None:
    # Never after the leader was (possibly) reaped: from then on its pid, and so the
    # group id, may belong to an unrelated process. Before that, even an exited leader
    # is a zombie that keeps the id reserved.
    if child.reaped:
        return
    try:
        if sys.platform == "win32":  # pragma: no cover - POSIX only, best effort
            child.proc.kill()
        else:
            # start_new_session made the handler a group leader: pgid == pid.
            os.killpg(child.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _wait_exited(child: _Child) -> None:
    """Wait for the process to exit *without* reaping it (see _signal_group)."""
    if child.reaped:
        return
    proc = child.proc
    if sys.platform == "linux":
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
            return
    delay = 0.001
    while True:  # pragma: no cover - Linux uses the pidfd above
        try:
            # WNOHANG: this returns at once, it never blocks the event loop.
            exited = os.waitid(  # noqa: ASYNC222
                os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
            )
        except ChildProcessError:
            return
        if exited is not None:
            return
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _stop_group(child: _Child, kill_grace: float) -> None:
    """SIGTERM the handler's group, SIGKILL it after the grace period. Does not reap."""
    _signal_group(child, signal.SIGTERM)
    with trio.move_on_after(kill_grace):
        await _wait_exited(child)
    # Also when the leader obeyed: anything it started and left behind goes too.
    _signal_group(child, signal.SIGKILL)


async def _feed_stdin(stream: trio.abc.SendStream, data: bytes) -> None:
    # The handler may exit or close stdin without reading everything: its call.
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)


async def _read_stdout(
    stream: trio.abc.ReceiveStream,
    out: _Output,
    child: _Child,
    kill_grace: float,
    nursery: trio.Nursery,
) -> None:
    try:
        while chunk := await stream.receive_some(READ_CHUNK_BYTES):
            if out.overflow:
                continue  # keep the pipe moving until the handler is gone
            room = out.limit - len(out.stdout)
            if len(chunk) > room:
                out.stdout += chunk[:room]
                out.overflow = True
                nursery.start_soon(_stop_group, child, kill_grace)
            else:
                out.stdout += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        out.reader_finished()


async def _read_stderr(stream: trio.abc.ReceiveStream, out: _Output) -> None:
    try:
        while chunk := await stream.receive_some(READ_CHUNK_BYTES):
            out.stderr += chunk
            if len(out.stderr) > STDERR_TAIL_BYTES:
                del out.stderr[:-STDERR_TAIL_BYTES]
                out.stderr_truncated = True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        out.reader_finished()


def _decode_stderr_tail(data: bytearray, truncated: bool) -> str:
    if truncated:
        # The cut may have split a UTF-8 sequence: drop its continuation bytes.
        start = 0
        while start < len(data) and start < 3 and 0x80 <= data[start] <= 0xBF:
            start += 1
        data = data[start:]
    return data.decode("utf-8", errors="replace")


def _decode_stdout(data: bytes) -> tuple[str, bool]:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is not part of the reply
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


async def run_exec_handler(
    argv: Sequence[str],
    payload: Mapping[str, object],
    *,
    max_output_bytes: int,
    env: Mapping[str, str] | None = None,
    kill_grace: float = DEFAULT_KILL_GRACE_SECONDS,
) -> HandlerResult:
    """Run the handler for one message and collect its answer.

    The caller owns the timeout: wrap the call in ``trio.fail_after`` /
    ``trio.move_on_after``. On cancellation the handler's whole process group gets
    SIGTERM, then SIGKILL after ``kill_grace`` seconds, and is reaped before the
    cancellation propagates. However the run ends, every process it started that is
    still running -- also one that left the process group -- is killed before this
    returns (see the module docstring). Limit concurrency by holding a
    ``trio.CapacityLimiter`` around the call.

    Args:
        argv: Program and arguments (see :func:`parse_exec_command`); no shell.
        payload: The message as a JSON-serialisable mapping, written to stdin.
        max_output_bytes: The most stdout bytes accepted as a reply; more makes the run
            fail (see the module docstring).
        env: The handler's complete environment; ``None`` inherits ours (consider
            :func:`inherit_environment` to leave secrets out). :data:`RUN_MARK_ENV` is
            added to it.
        kill_grace: Seconds between SIGTERM and SIGKILL when stopping the handler.

    Returns:
        A :class:`HandlerResult`; check ``ok`` / ``reply_body``. A non-zero exit is a
        result, not an exception.

    Raises:
        HandlerError: the program could not be started (not found, not executable,
            no resources to fork).
        LocalProtocolError: ``argv`` is empty or the payload is not JSON-serialisable.
        ValueError: ``max_output_bytes`` or ``kill_grace`` is negative.
    """
    if not argv or not argv[0]:
        raise LocalProtocolError("the handler command is empty")
    if max_output_bytes < 0:
        raise ValueError("max_output_bytes must not be negative")
    if kill_grace < 0:
        raise ValueError("kill_grace must not be negative")
    data = encode_payload(payload)
    token = secrets.token_hex(_RUN_MARK_BYTES)
    mark = f"{RUN_MARK_ENV}={token}".encode()
    run_env = dict(os.environ if env is None else env)
    run_env[RUN_MARK_ENV] = token
    started = time.perf_counter()
    _ADOPTION.starting += 1
    try:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=run_env,
            start_new_session=True,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HandlerError(
            f"cannot start handler {argv[0]!r}: {reason}", argv0=str(argv[0])
        ) from exc
    else:
        _ADOPTION.leaders.add(proc.pid)
    finally:
        _ADOPTION.starting -= 1
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    out = _Output(limit=max_output_bytes)
    child = _Child(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed_stdin, proc.stdin, data)
            nursery.start_soon(_read_stdout, proc.stdout, out, child, kill_grace, nursery)
            nursery.start_soon(_read_stderr, proc.stderr, out)
            await _wait_exited(child)
            with trio.move_on_after(PIPE_DRAIN_GRACE_SECONDS):
                await out.readers_done.wait()
            # The leader has exited but is not reaped yet, so its group id is still
            # ours: clear out anything it left running (and holding our pipes).
            _signal_group(child, signal.SIGKILL)
            nursery.cancel_scope.cancel()
        exit_code = await child.reap()
    except BaseException:
        with trio.CancelScope(shield=True):
            await _stop_group(child, kill_grace)
            await child.reap()
        raise
    finally:
        with trio.CancelScope(shield=True):
            if child.reaped:
                _ADOPTION.leaders.discard(proc.pid)
            # Whatever left the group (setsid, double fork) still carries the mark.
            await _sweep(mark)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                await stream.aclose()
    duration = time.perf_counter() - started
    stdout, invalid = _decode_stdout(bytes(out.stdout))
    return HandlerResult(
        exit_code=exit_code,
        stdout=stdout,
        stderr_tail=_decode_stderr_tail(out.stderr, out.stderr_truncated),
        duration=duration,
        stdout_overflow=out.overflow,
        stdout_invalid_utf8=invalid,
    )
