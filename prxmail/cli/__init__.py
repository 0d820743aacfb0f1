"""The ``prxmail`` command line: one table of subcommands (``serve``, ``doctor``, ``auth``, ...).

Each subcommand is one :class:`Command` in :data:`COMMANDS`: its name, its help, a
function that adds its arguments and a function that runs it and returns the exit
status. A new subcommand (``prxmail auth``, later ``status``/``outbox``/``messages``) is
one more entry; ``main`` never changes. The runners import their machinery when they
run, so ``prxmail --version`` and ``--help`` load neither trio nor the state store.

The library runner (the channel plus an external handler, for programs that embed it)
is :mod:`prxmail.service`; the command-line runner of ``prxmail serve`` around it is
:mod:`prxmail.cli._serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prxmail import __version__

__all__ = ["COMMANDS", "CONFIG_ENV", "DEFAULT_CONFIG", "Command", "main"]

CONFIG_ENV = "PRXMAIL_CONFIG"
DEFAULT_CONFIG = "prxmail.toml"

_CONFIG_HELP = (
    f"configuration file (TOML with a [channels_config.email] table);"
    f" default: ${CONFIG_ENV} or ./{DEFAULT_CONFIG}"
)


@dataclass(frozen=True)
class Command:
    """One ``prxmail`` subcommand.

    Attributes:
        name: The word on the command line.
        help: One line for ``prxmail --help``.
        description: The paragraph at the top of ``prxmail NAME --help``.
        add_arguments: Adds the subcommand's own arguments to its parser.
        run: Runs the subcommand with the parsed arguments; returns the exit status.
        takes_config: Whether the subcommand has ``-c/--config`` (resolved into
            ``args.config_path`` before ``run`` is called).
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    takes_config: bool = True


def config_path(value: str | None) -> Path:
    """The configuration file to use.

    Args:
        value: The ``-c/--config`` argument, if given.

    Returns:
        ``value``, else ``$PRXMAIL_CONFIG``, else ``./prxmail.toml``.
    """
    if value:
        return Path(value)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exec",
        dest="exec_command",
        metavar="CMD",
        help="handler command (split shell-like, run without a shell); it gets the message"
        " as JSON on stdin and its stdout becomes the reply",
    )
    parser.add_argument(
        "--reply-format",
        choices=("text", "json"),
        default=None,
        help="what the handler prints: the reply text, or one JSON object with body, html,"
        " attachments, subject (default: reply_format from the configuration, else text)",
    )
    parser.add_argument(
        "--log-format",
        choices=("human", "json"),
        default=None,
        help="log line format (default: log_format from the configuration, else human)",
    )


def _run_serve(args: argparse.Namespace) -> int:
    # Imported here, not at the top: --version and --help must not load trio.
    from prxmail.cli._serve import run_serve  # noqa: PLC0415

    return run_serve(
        args.config_path,
        exec_command=args.exec_command,
        log_format=args.log_format,
        reply_format=args.reply_format,
        out=sys.stdout,
        err=sys.stderr,
    )


def _doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--account", metavar="NAME", help="check only this account (default: every account)"
    )


def _run_doctor(args: argparse.Namespace) -> int:
    from prxmail.doctor import run_doctor  # noqa: PLC0415 (see _run_serve)

    return run_doctor(args.config_path, as_json=args.json, out=sys.stdout, account=args.account)


def _auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flow",
        choices=("device", "loopback"),
        default=None,
        help="device: print a URL and a code to enter on any device; loopback: open a URL"
        " in a browser on this machine (default: device where the provider allows it)",
    )
    parser.add_argument(
        "--device-url",
        metavar="URL",
        help="the device authorization endpoint (default: the provider preset's)",
    )
    parser.add_argument(
        "--authorize-url",
        metavar="URL",
        help="the authorization endpoint for the loopback flow (default: the preset's)",
    )


def _run_auth(args: argparse.Namespace) -> int:
    from prxmail.cli._auth import run_auth  # noqa: PLC0415 (see _run_serve)

    return run_auth(
        args.config_path,
        flow=args.flow,
        device_url=args.device_url,
        authorize_url=args.authorize_url,
        out=sys.stdout,
        err=sys.stderr,
    )


def _ops_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--account",
        metavar="NAME",
        help="the account: its name ('default' for a single-account configuration) or"
        " its key (user@imap.host:port)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _positive_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"not an id: {value!r}")
    return number


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _ops_common(parser)


def _run_status(args: argparse.Namespace) -> int:
    from prxmail.cli._ops import run_status  # noqa: PLC0415 (see _run_serve)

    return run_status(
        args.config_path, account=args.account, as_json=args.json, out=sys.stdout, err=sys.stderr
    )


def _outbox_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "retry", "drop"))
    parser.add_argument("id", nargs="?", type=_positive_id, metavar="ID", help="an outbox item")
    parser.add_argument(
        "--all", dest="every", action="store_true", help="retry: every queued and failed item"
    )
    parser.add_argument("--reason", metavar="TEXT", help="drop: why (stored with the drop)")
    _ops_common(parser)


def _run_outbox(args: argparse.Namespace) -> int:
    from prxmail.cli._ops import run_outbox  # noqa: PLC0415 (see _run_serve)

    return run_outbox(
        args.config_path,
        action=args.action,
        item_id=args.id,
        every=args.every,
        reason=args.reason,
        account=args.account,
        as_json=args.json,
        out=sys.stdout,
        err=sys.stderr,
    )


def _messages_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "retry", "release"))
    parser.add_argument(
        "id", nargs="?", type=_positive_id, metavar="ID", help="a message id from list"
    )
    parser.add_argument(
        "--status",
        # Kept in step with prxmail.cli._ops.MESSAGE_LIST_STATUSES (not imported: it
        # would load the state store for --help).
        choices=("failed", "held", "deferred", "rejected"),
        help="list: only messages in this status",
    )
    _ops_common(parser)


def _run_messages(args: argparse.Namespace) -> int:
    from prxmail.cli._ops import run_messages  # noqa: PLC0415 (see _run_serve)

    return run_messages(
        args.config_path,
        action=args.action,
        item_id=args.id,
        status=args.status,
        account=args.account,
        as_json=args.json,
        out=sys.stdout,
        err=sys.stderr,
    )


COMMANDS: tuple[Command, ...] = (
    Command(
        name="serve",
        help="run the channel until SIGINT/SIGTERM",
        description="Watch the mailbox over IMAP IDLE, hand each accepted message to the"
        " handler and send its answer as a threaded reply.",
        add_arguments=_serve_arguments,
        run=_run_serve,
    ),
    Command(
        name="doctor",
        help="check every step from config to a working mailbox",
        description="Check the configuration, the IMAP and SMTP servers, the sender policy"
        " and the state directory, and say what to fix.",
        add_arguments=_doctor_arguments,
        run=_run_doctor,
    ),
    Command(
        name="auth",
        help="get the first OAuth 2 refresh token (device or browser flow)",
        description="Run the provider's OAuth 2 flow for the configured account and write"
        " the refresh token to oauth2_refresh_token_file (mode 0600).",
        add_arguments=_auth_arguments,
        run=_run_auth,
    ),
    Command(
        name="status",
        help="show what the running service is doing, per account",
        description="Show the IMAP state, last connection and errors, message and outbox"
        " counts and the last handled message, from the state the running service"
        " keeps current; says so when the service is not running.",
        add_arguments=_status_arguments,
        run=_run_status,
    ),
    Command(
        name="outbox",
        help="list, retry or drop queued and failed replies",
        description="list: queued and permanently failed replies; retry ID|--all: due now"
        " (a running service sends within seconds); drop ID [--reason TEXT]: never send.",
        add_arguments=_outbox_arguments,
        run=_run_outbox,
    ),
    Command(
        name="messages",
        help="list failed/held/deferred/rejected mail, retry or release it",
        description="list [--status S]: messages an operator may act on; retry ID: hand a"
        " failed message to the handler again; release ID: let a held thread go on.",
        add_arguments=_messages_arguments,
        run=_run_messages,
    ),
)


def _build_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prxmail",
        description="An email channel for agents: IMAP IDLE in, threaded SMTP replies out.",
    )
    parser.add_argument("--version", action="version", version=f"prxmail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        each = sub.add_parser(command.name, help=command.help, description=command.description)
        if command.takes_config:
            each.add_argument("-c", "--config", metavar="FILE", help=_CONFIG_HELP)
        command.add_arguments(each)
        each.set_defaults(run=command.run, takes_config=command.takes_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The process exit status of the subcommand.

    Raises:
        SystemExit: For ``--help``, ``--version`` and usage errors (argparse's way).
    """
    args = _build_parser(COMMANDS).parse_args(argv)
    if args.takes_config:
        args.config_path = config_path(args.config)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
