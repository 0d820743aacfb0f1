"""Validators the configuration needs, free of prxmail's runtime dependencies.

Theory of operation: :mod:`prxmail.config` must load without the handler runner, the
sender policy or the message model (and so without trio and mail-parser), because a
configuration is checked long before any of them runs -- by ``prxmail doctor``, by a
library user's own tooling, by ``prxmail serve`` before its event loop starts. The pure
checks those modules need *and* config needs live here; the modules re-export them, so
``prxmail.handler.parse_exec_command`` and ``prxmail.policy.validate_sender_entry`` keep
working. This module imports only the standard library.
"""

from __future__ import annotations

import re
import shlex
from typing import Final

__all__ = [
    "ALLOW_ALL",
    "parse_exec_command",
    "validate_sender_entry",
]

ALLOW_ALL: Final = "*"

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Longest domain name DNS allows (RFC 1035 section 2.3.4, in text form).
_MAX_DOMAIN_CHARS: Final = 253


def parse_exec_command(cmd: str) -> list[str]:
    """Split a handler command line shell-like into argv; no shell will run it.

    Quotes and backslashes work as in a POSIX shell; nothing else does (no ``$VAR``,
    globs, pipes, ``;`` or redirections -- they arrive as literal arguments).

    Args:
        cmd: The command line, e.g. ``'python3 /opt/bot/answer.py --lang "de CH"'``.

    Returns:
        The argument vector; ``argv[0]`` is the program.

    Raises:
        ValueError: empty command, unbalanced quotes, a trailing backslash, a NUL
            character, or an empty program name.
    """
    if "\x00" in cmd:
        raise ValueError("the handler command contains a NUL character")
    if not cmd.strip():
        raise ValueError("the handler command is empty")
    try:
        argv = shlex.split(cmd, comments=False, posix=True)
    except ValueError as exc:
        raise ValueError(
            f"cannot split the handler command {cmd!r}: {exc}"
            " (check for an unbalanced quote or a trailing backslash)"
        ) from None
    if not argv or not argv[0]:
        raise ValueError(f"the handler command {cmd!r} has an empty program name")
    return argv


def _check_domain(domain: str, entry: str) -> None:
    if domain.startswith(".") or domain.endswith("."):
        raise ValueError(f"{entry!r}: the domain may not start or end with a dot")
    if len(domain) > _MAX_DOMAIN_CHARS:
        raise ValueError(f"{entry!r}: the domain is longer than {_MAX_DOMAIN_CHARS} characters")
    for label in domain.split("."):
        if not label:
            raise ValueError(f"{entry!r}: the domain has an empty label ('..')")
        if label.isascii() and not _DOMAIN_LABEL.match(label):
            raise ValueError(
                f"{entry!r}: {label!r} is not a valid domain label "
                "(letters, digits and inner hyphens, at most 63)"
            )
        if not label.isascii() and not all(ch.isalnum() or ch == "-" for ch in label):
            raise ValueError(f"{entry!r}: {label!r} is not a valid domain label")


def validate_sender_entry(entry: str) -> str:
    """Check and normalise one ``allowed_senders`` entry.

    Args:
        entry: ``"*"``, ``"@example.com"`` or ``"user@example.com"`` (any case,
            surrounding white space allowed).

    Returns:
        The entry trimmed and lower-cased.

    Raises:
        ValueError: The entry could never match a sender; the message says why and
            what to write instead (``"*@company.com"`` -> use ``"@company.com"``,
            ``"company.com"`` -> use ``"@company.com"``, a lone ``"@"``, white
            space inside, two ``@``, display names or brackets, bad domains).
        TypeError: The entry is not a string.
    """
    if not isinstance(entry, str):
        raise TypeError(f"expected a string, got {type(entry).__name__}")
    value = entry.strip().lower()
    if not value:
        raise ValueError("empty entry (to allow nobody, leave the list empty)")
    if value == ALLOW_ALL:
        return value
    if any(ch.isspace() for ch in value):
        raise ValueError(f"{entry!r} contains white space; give one bare address per entry")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{entry!r} contains control characters")
    if "*" in value:
        raise ValueError(
            f"{entry!r}: wildcards are not supported; write '@company.com' to allow a "
            "whole domain or '*' to allow everybody"
        )
    if any(ch in value for ch in '<>,;"()[]\\'):
        raise ValueError(f"{entry!r}: give the bare address (user@example.com), nothing else")
    if "@" not in value:
        raise ValueError(
            f"{entry!r} is neither an address nor a domain entry; "
            f"write '@{value}' to allow everybody at that domain"
        )
    if value.count("@") > 1:
        raise ValueError(f"{entry!r} contains more than one '@'")
    local, _, domain = value.partition("@")
    if not domain:
        raise ValueError(f"{entry!r}: nothing after '@'; write '@example.com' or 'user@host'")
    _check_domain(domain, entry)
    if local and (local.startswith(".") or local.endswith(".") or ".." in local):
        raise ValueError(f"{entry!r}: the part before '@' has misplaced dots")
    return value
