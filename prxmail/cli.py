"""The ``prxmail`` command line: ``serve`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from prxmail import __version__
from prxmail.config import Config, load_config
from prxmail.errors import ConfigError

__all__ = ["main"]

CONFIG_ENV = "PRXMAIL_CONFIG"
DEFAULT_CONFIG = "prxmail.toml"

# Exit statuses, as documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # also what argparse uses for usage errors
EXIT_NOT_AVAILABLE = 3


def _config_path(value: str | None) -> Path:
    if value:
        return Path(value)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prxmail",
        description="An email channel for agents: IMAP IDLE in, threaded SMTP replies out.",
    )
    parser.add_argument("--version", action="version", version=f"prxmail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config_help = (
        f"configuration file (TOML with a [channels_config.email] table);"
        f" default: ${CONFIG_ENV} or ./{DEFAULT_CONFIG}"
    )
    serve = sub.add_parser(
        "serve",
        help="run the channel until SIGINT/SIGTERM",
        description="Watch the mailbox over IMAP IDLE, hand each accepted message to the"
        " handler and send its answer as a threaded reply.",
    )
    serve.add_argument("-c", "--config", metavar="FILE", help=config_help)
    serve.add_argument(
        "--exec",
        dest="exec_command",
        metavar="CMD",
        help="handler command (split shell-like, run without a shell); it gets the message"
        " as JSON on stdin and its stdout becomes the reply",
    )
    serve.add_argument(
        "--log-format", choices=("human", "json"), default="human", help="log line format"
    )

    doctor = sub.add_parser(
        "doctor",
        help="check every step from config to a working mailbox",
        description="Check the configuration, the IMAP and SMTP servers, the sender policy"
        " and the state directory, and say what to fix.",
    )
    doctor.add_argument("-c", "--config", metavar="FILE", help=config_help)
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _describe(config: Config) -> list[str]:
    senders = ", ".join(config.allowed_senders) or "nobody (allowed_senders is empty)"
    return [
        f"watch folder {config.imap_folder!r} on {config.imap_host}:{config.imap_port}"
        f" ({config.imap_security.value}) as {config.username}",
        f"send replies through {config.smtp_host}:{config.smtp_port}"
        f" ({config.smtp_security.value}) as {config.smtp_username},"
        f" From: {config.from_address}",
        f"answer mail from: {senders}",
        f"re-issue IDLE every {config.idle_timeout_secs} s; keep state in {config.state_dir}",
    ]


def _print_config_error(exc: ConfigError, out: TextIO) -> None:
    print(f"prxmail: {exc}", file=out)


def _serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        _print_config_error(exc, err)
        return EXIT_CONFIG
    for warning in config.warnings:
        print(f"prxmail: warning: {warning}", file=err)
    print("prxmail serve: configuration is valid. The channel would:", file=out)
    for line in _describe(config):
        print(f"  - {line}", file=out)
    if args.exec_command:
        print(f"  - run the handler: {args.exec_command}", file=out)
    print(
        "prxmail serve: the mail service is not part of this release yet; nothing was started.",
        file=err,
    )
    return EXIT_NOT_AVAILABLE


def _doctor(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = _config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            result = {
                "ok": False,
                "steps": [{"step": "config", "status": "fail", "problems": list(exc.problems)}],
            }
            print(json.dumps(result, indent=2), file=out)
        else:
            print(f"FAIL config: {path}", file=out)
            for problem in exc.problems:
                print(f"     {problem}", file=out)
        return EXIT_FAILURE
    if args.json:
        result = {
            "ok": True,
            "steps": [{"step": "config", "status": "pass", "warnings": list(config.warnings)}],
            "not_checked": ["imap", "smtp", "state"],
        }
        print(json.dumps(result, indent=2), file=out)
    else:
        print(f"PASS config: {path}", file=out)
        for warning in config.warnings:
            print(f"WARN config: {warning}", file=out)
        for line in _describe(config):
            print(f"     {line}", file=out)
        print("SKIP network checks: not part of this release yet", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit status.
    """
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args, sys.stdout, sys.stderr)
    return _doctor(args, sys.stdout, sys.stderr)
