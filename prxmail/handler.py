"""Run an external handler command for one message (``prxmail serve --exec``).

Theory of operation
-------------------
The command is given as argv (:func:`parse_exec_command` splits a config string the way
a shell would, but no shell ever runs). The handler gets one JSON object on stdin
(:func:`encode_payload`), its stdout is the reply body, its stderr is kept for the log,
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

A handler that cannot be started at all (not found, not executable) raises
:class:`~prxmail.errors.HandlerError`: that is not the message's fault. Everything the
handler does once running -- non-zero exit, death by signal, too much output -- is a
:class:`HandlerResult` with ``ok`` False, never an exception.

POSIX only (process groups, ``killpg``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Final

import attrs
import trio

from prxmail._validate import parse_exec_command
from prxmail.errors import HandlerError, LocalProtocolError

__all__ = [
    "DEFAULT_KILL_GRACE_SECONDS",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "PIPE_DRAIN_GRACE_SECONDS",
    "STDERR_TAIL_BYTES",
    "HandlerResult",
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
    cancellation propagates. Limit concurrency by holding a ``trio.CapacityLimiter``
    around the call.

    Args:
        argv: Program and arguments (see :func:`parse_exec_command`); no shell.
        payload: The message as a JSON-serialisable mapping, written to stdin.
        max_output_bytes: The most stdout bytes accepted as a reply; more makes the run
            fail (see the module docstring).
        env: The handler's complete environment; ``None`` inherits ours (consider
            :func:`inherit_environment` to leave secrets out).
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
    started = time.perf_counter()
    try:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HandlerError(
            f"cannot start handler {argv[0]!r}: {reason}", argv0=str(argv[0])
        ) from exc
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
