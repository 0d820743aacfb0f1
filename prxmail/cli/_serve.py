"""``prxmail serve``: run the channel from the command line until SIGINT/SIGTERM.

Exit statuses: 0 after a signal; :data:`EXIT_CONFIG` (2) when the service cannot start
-- a configuration problem, a missing handler, or an error while the channel opens (the
state directory cannot be used, say); 1 when the service stopped on an error after it
had started. A start-up failure is one line on stderr, never a traceback: whoever reads
it (an operator, systemd's journal) must see what to fix at once.
"""

from __future__ import annotations

import functools
import logging
import shutil
import signal
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TextIO

import attrs
import trio

from prxmail._log import account_context, log_event, setup_logging
from prxmail._redact import config_secrets
from prxmail._validate import parse_exec_command
from prxmail.channel import MailChannel, collapse_exception_group
from prxmail.config import Config, ReplyFormat, load_accounts
from prxmail.errors import ConfigError, PrxmailError
from prxmail.handler import contain_orphans
from prxmail.service import serve_mail_channel, serve_mail_channels

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "one_line", "run_serve"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class _StartFailed(Exception):
    """The channel failed before it was serving; ``error`` is why."""

    def __init__(self, error: PrxmailError | OSError) -> None:
        self.error = error
        super().__init__(str(error))


def one_line(error: BaseException) -> str:
    """Describe an error in one line, for a start-up failure on stderr.

    Args:
        error: A :class:`~prxmail.errors.ConfigError` (all its problems, joined with
            ``"; "``), an ``OSError`` (its reason and file name) or any other error.

    Returns:
        The text, without line breaks.
    """
    if isinstance(error, ConfigError):
        where = f" in {error.source}" if error.source else ""
        text = f"invalid configuration{where}: " + "; ".join(error.problems)
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


async def _until_signal(serve: Callable[..., Awaitable[None]], *args: object) -> None:
    """Run ``serve(*args, cancel_scope, task_status=...)`` until SIGINT/SIGTERM.

    Every failure before ``serve`` reported itself started (the state store opened, the
    channels' tasks started) is a start-up failure (:class:`_StartFailed`); connection
    problems come later and are retried by the watchers.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # Beside the start, not after it: a signal while the channel opens (a slow
            # disk under the state store) must still stop it.
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            try:
                await nursery.start(serve, *args, nursery.cancel_scope)
            except BaseExceptionGroup as group:
                failure = collapse_exception_group(group)
                if isinstance(failure, PrxmailError | OSError):
                    raise _StartFailed(failure) from None
                raise
            except (PrxmailError, OSError) as exc:
                raise _StartFailed(exc) from None


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log_event(logging.INFO, "shutting down", signal=signal.Signals(signum).name)
        scope.cancel()
        return


async def _serve(
    config: Config,
    argv: list[str],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[MailChannel] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_mail_channel(config, exec_command=argv, task_status=task_status)
    finally:
        scope.cancel()


def _run(config: Config, argv: list[str]) -> None:
    try:
        trio.run(_until_signal, _serve, config, argv)
    except BaseExceptionGroup as group:
        collapsed = collapse_exception_group(group)
    else:
        return
    raise collapsed


# Frames named in a crash line: the innermost few say where a bug struck; the whole
# stack would not fit the field bound anyway.
CRASH_FRAMES = 4


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-CRASH_FRAMES:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))


def run_serve(
    config_path: Path,
    *,
    exec_command: str | None,
    log_format: str | None,
    out: TextIO,
    err: TextIO,
    reply_format: str | None = None,
) -> int:
    """Load the configuration and run the channel until SIGINT/SIGTERM.

    Args:
        config_path: The configuration file.
        exec_command: Handler command line (overrides ``exec`` in the configuration).
        log_format: ``"human"`` or ``"json"``; ``None`` uses the configuration's
            ``log_format``.
        out, err: Where to print; log lines go to ``err``.
        reply_format: ``"text"`` or ``"json"`` (``--reply-format``); ``None`` uses the
            configuration's ``reply_format``.

    Returns:
        The process exit status: 0 after a signal, 2 when it could not start
        (configuration problems, no handler, the channel failed while opening), 1 when
        the service stopped on an error after it had started.
    """
    try:
        configs = load_accounts(config_path)
    except ConfigError as exc:
        print(f"prxmail: {one_line(exc)}", file=err)
        return EXIT_CONFIG
    if reply_format is not None:
        configs = tuple(
            attrs.evolve(config, reply_format=ReplyFormat(reply_format)) for config in configs
        )
    if len(configs) > 1:
        return _run_accounts(configs, exec_command=exec_command, log_format=log_format, err=err)
    (config,) = configs
    return _run_account(config, exec_command=exec_command, log_format=log_format, err=err)


def _run_account(
    config: Config, *, exec_command: str | None, log_format: str | None, err: TextIO
) -> int:
    """``prxmail serve`` with the one account of the file (as before several existed)."""
    if exec_command is not None:
        try:
            argv = parse_exec_command(exec_command)
        except ValueError as exc:
            print(f"prxmail: --exec: {exc}", file=err)
            return EXIT_CONFIG
    elif config.exec_command is not None:
        argv = list(config.exec_command)
    else:
        print(
            "prxmail: no handler: pass --exec CMD or set exec in [channels_config.email]",
            file=err,
        )
        return EXIT_CONFIG
    if shutil.which(argv[0]) is None:
        print(f"prxmail: handler program {argv[0]!r} not found or not executable", file=err)
        return EXIT_CONFIG
    chosen = log_format if log_format is not None else config.log_format.value
    setup_logging(chosen, stream=err, secrets=config_secrets(config))
    # The account's lines name it; the process's own (start, signal, stop) do not.
    with account_context(config.name):
        for warning in config.warnings:
            log_event(logging.WARNING, f"configuration: {warning}")
        for line in config.describe():
            log_event(logging.INFO, line)
    return _run_logged(functools.partial(_run, config, argv))


def _run_logged(run: Callable[[], None]) -> int:
    """Run the service; its end as an exit status and one log line."""
    try:
        # Orphans of our handlers become ours, so nothing they started outlives us.
        with contain_orphans():
            run()
    except _StartFailed as failed:
        error = failed.error
        log_event(
            logging.ERROR,
            "prxmail could not start",
            error=f"{type(error).__name__}: {one_line(error)}",
        )
        return EXIT_CONFIG
    except PrxmailError as exc:
        log_event(logging.ERROR, "prxmail stopped", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    except Exception as exc:
        # A bug: still one redacted log line (Python's traceback would print the error
        # text raw, secrets and all), with where it happened for the bug report.
        log_event(
            logging.CRITICAL,
            "prxmail crashed",
            error=f"{type(exc).__name__}: {exc}",
            where=_where(exc),
        )
        return EXIT_FAILURE
    log_event(logging.INFO, "prxmail stopped")
    return EXIT_OK


def _account_argv(config: Config, exec_command: str | None) -> list[str] | str:
    """The account's handler argv, or why it has none (one line)."""
    if exec_command is not None:
        try:
            argv = parse_exec_command(exec_command)
        except ValueError as exc:
            return f"--exec: {exc}"
    elif config.exec_command is not None:
        argv = list(config.exec_command)
    else:
        return f"no handler: pass --exec CMD or set exec in the account {config.name!r}"
    if shutil.which(argv[0]) is None:
        return f"handler program {argv[0]!r} not found or not executable"
    return argv


def _run_accounts(
    configs: tuple[Config, ...], *, exec_command: str | None, log_format: str | None, err: TextIO
) -> int:
    """``prxmail serve`` with several accounts: each one that can start runs apart.

    An account without a usable handler is logged and left out, so that it cannot
    stop the others; only when no account can start is it a start-up failure (2).
    ``--exec`` and ``--reply-format`` apply to every account.
    """
    first = configs[0]
    chosen = log_format if log_format is not None else first.log_format.value
    secrets = [secret for config in configs for secret in config_secrets(config)]
    setup_logging(chosen, stream=err, secrets=secrets)
    runnable: list[Config] = []
    commands: dict[str, list[str]] = {}
    for config in configs:
        with account_context(config.name):
            for warning in config.warnings:
                log_event(logging.WARNING, f"configuration: {warning}")
            argv = _account_argv(config, exec_command)
            if isinstance(argv, str):
                log_event(logging.ERROR, "account not started", error=argv)
                continue
            for line in config.describe():
                log_event(logging.INFO, line)
        runnable.append(config)
        commands[config.name] = argv
    if not runnable:
        log_event(logging.ERROR, "prxmail could not start", error="no account can start")
        return EXIT_CONFIG
    return _run_logged(functools.partial(_run_many, tuple(runnable), commands))


def _run_many(configs: tuple[Config, ...], commands: dict[str, list[str]]) -> None:
    try:
        trio.run(_until_signal, _serve_accounts, configs, commands)
    except BaseExceptionGroup as group:
        collapsed = collapse_exception_group(group)
    else:
        return
    raise collapsed


async def _serve_accounts(
    configs: tuple[Config, ...],
    commands: dict[str, list[str]],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[dict[str, MailChannel]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_mail_channels(configs, exec_commands=commands, task_status=task_status)
    finally:
        scope.cancel()
