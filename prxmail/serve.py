"""``prxmail serve``: run the channel from the command line until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import shutil
import signal
import traceback
from pathlib import Path
from typing import TextIO

import trio

from prxmail._log import log_event, setup_logging
from prxmail._redact import config_secrets
from prxmail.channel import collapse_exception_group
from prxmail.config import Config, load_config
from prxmail.errors import ConfigError, PrxmailError
from prxmail.handler import contain_orphans, parse_exec_command
from prxmail.service import serve_mail_channel

__all__ = ["run_serve"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


async def _serve_until_signal(config: Config, argv: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, config, argv, nursery.cancel_scope)
            async for signum in signals:
                log_event(
                    logging.INFO,
                    "shutting down",
                    signal=signal.Signals(signum).name,
                )
                nursery.cancel_scope.cancel()
                break


async def _serve(config: Config, argv: list[str], scope: trio.CancelScope) -> None:
    try:
        await serve_mail_channel(config, exec_command=argv)
    finally:
        scope.cancel()


def _run(config: Config, argv: list[str]) -> None:
    try:
        trio.run(_serve_until_signal, config, argv)
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
) -> int:
    """Load the configuration and run the channel until SIGINT/SIGTERM.

    Args:
        config_path: The configuration file.
        exec_command: Handler command line (overrides ``exec`` in the configuration).
        log_format: ``"human"`` or ``"json"``; ``None`` uses the configuration's
            ``log_format``.
        out, err: Where to print; log lines go to ``err``.

    Returns:
        The process exit status: 0 after a signal, 2 for configuration problems, 1 when
        the service stopped on an error.
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"prxmail: {exc}", file=err)
        return EXIT_CONFIG
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
    for warning in config.warnings:
        log_event(logging.WARNING, f"configuration: {warning}")
    for line in config.describe():
        log_event(logging.INFO, line)
    try:
        # Orphans of our handlers become ours, so nothing they started outlives us.
        with contain_orphans():
            _run(config, argv)
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
