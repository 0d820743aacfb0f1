"""The ``prxmail`` command line: ``serve`` and ``doctor``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from prxmail import __version__
from prxmail.doctor import run_doctor
from prxmail.serve import run_serve

__all__ = ["main"]

CONFIG_ENV = "PRXMAIL_CONFIG"
DEFAULT_CONFIG = "prxmail.toml"


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
        "--reply-format",
        choices=("text", "json"),
        default=None,
        help="what the handler prints: the reply text, or one JSON object with body, html,"
        " attachments, subject (default: reply_format from the configuration, else text)",
    )
    serve.add_argument(
        "--log-format",
        choices=("human", "json"),
        default=None,
        help="log line format (default: log_format from the configuration, else human)",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit status.
    """
    args = _build_parser().parse_args(argv)
    path = _config_path(args.config)
    if args.command == "serve":
        return run_serve(
            path,
            exec_command=args.exec_command,
            log_format=args.log_format,
            reply_format=args.reply_format,
            out=sys.stdout,
            err=sys.stderr,
        )
    return run_doctor(path, as_json=args.json, out=sys.stdout)
