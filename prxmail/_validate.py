"""Validators the configuration needs, free of prxmail's runtime dependencies.

Theory of operation: :mod:`prxmail.config` must load without the handler runner, the
sender policy or the message model (and so without trio and mail-parser), because a
configuration is checked long before any of them runs -- by ``prxmail doctor``, by a
library user's own tooling, by ``prxmail serve`` before its event loop starts. The pure
checks those modules need *and* config needs live here; the modules re-export them, so
``prxmail.handler.parse_exec_command`` and ``prxmail.policy.validate_sender_entry`` keep
working. This module imports only the standard library.

Files named by the configuration (the configuration itself, password files, the CA
file) are read by :func:`read_regular_file`: opened without blocking, refused unless
they are regular files, and read up to a stated size. A FIFO would otherwise block the
``open`` forever, and ``/dev/zero`` would be read until memory runs out.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from pathlib import Path
from typing import Final

__all__ = [
    "ALLOW_ALL",
    "FileProblem",
    "parse_exec_command",
    "read_regular_file",
    "validate_sender_entry",
]

ALLOW_ALL: Final = "*"

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Longest domain name DNS allows (RFC 1035 section 2.3.4, in text form).
_MAX_DOMAIN_CHARS: Final = 253
# Bytes asked for per read() of a configuration file: one page-cache-friendly chunk;
# the loop stops at the caller's limit anyway.
_READ_CHUNK_BYTES: Final = 64 * 1024

_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileProblem(ValueError):
    """A file named in the configuration cannot be used.

    The message is the reason alone (``"No such file or directory"``, ``"a FIFO (named
    pipe), not a regular file"``, ``"larger than 65536 bytes"``), for the caller to put
    after the path and the key; never any of the file's content.
    """


def read_regular_file(path: Path, *, limit: int) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes without ever blocking.

    The file is opened with ``O_NONBLOCK`` (so a FIFO without a writer does not block
    the open), checked with ``fstat`` on the open descriptor (so the check and the read
    see the same file), and read with a bound (so a file that grows while it is read,
    or lies about its size, still cannot exhaust memory).

    Args:
        path: The file.
        limit: The most bytes the file may hold.

    Returns:
        The file's content.

    Raises:
        FileProblem: the file cannot be opened, is not a regular file (directory, FIFO,
            device, socket), or holds more than ``limit`` bytes.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileProblem(exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
            raise FileProblem(f"{kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(_READ_CHUNK_BYTES, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise FileProblem(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise FileProblem(f"larger than {limit} bytes")
    return b"".join(chunks)


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
