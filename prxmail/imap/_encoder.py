# Theory of operation
# -------------------
#
# Commands are built from typed arguments, never from pre-formatted strings, so that data
# can never change the shape of a command:
#
# * ``str``/``bytes`` are IMAP "astrings": sent as an atom when every byte is an
#   ASTRING-CHAR, as a quoted string when it is printable 7-bit ASCII, and as a literal
#   otherwise (8-bit data, or anything with quotes the server might mis-parse).
#   CR and LF therefore never appear on a command line from data: they can only travel
#   inside a literal, whose length is announced. NUL cannot travel at all in IMAP4rev1
#   and is refused with LocalProtocolError.
# * :class:`Raw` is protocol text written by this package (``BODY.PEEK[]``,
#   ``+FLAGS.SILENT``); it is still checked for CR, LF and NUL.
# * ``int`` is a number, :class:`SequenceSet` a sequence set, and a ``list``/``tuple``
#   a parenthesised list of any of these.
#
# The encoder returns the command as chunks. The first is sent at once; each further
# chunk follows a synchronising literal announcement and may only be sent after the
# server's "+" continuation. With LITERAL+ (RFC 7888) every literal is non-synchronising
# and the command is one chunk; with LITERAL- only literals up to 4096 bytes are.

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import TypeAlias

import attrs

from prxmail.errors import LocalProtocolError
from prxmail.imap._events import SequenceSet

__all__ = [
    "Arg",
    "Raw",
    "String",
    "decode_mailbox",
    "encode_command",
    "encode_mailbox",
    "encode_string",
]

# RFC 7888: with LITERAL- only literals up to this size may be non-synchronising.
LITERAL_MINUS_MAX = 4096


@attrs.frozen
class Raw:
    """Protocol text inserted verbatim (checked for CR, LF and NUL only)."""

    text: str


@attrs.frozen
class String:
    """Data that the grammar requires as a string (quoted or literal), never an atom:
    e.g. the field names and values of ID."""

    value: str | bytes


Arg: TypeAlias = "str | bytes | int | Raw | String | SequenceSet | Sequence[Arg]"

# ASTRING-CHAR (RFC 3501): anything but CTL, SP, "(", ")", "{", "%", "*", '"', "\".
_ATOM_SAFE = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+\Z")
_QUOTABLE = re.compile(rb"[\x20-\x7e]*\Z")
_FORBIDDEN_RAW = re.compile(r"[\r\n\x00]")


def encode_string(
    value: str | bytes,
    *,
    literal_plus: bool = False,
    literal_minus: bool = False,
    allow_atom: bool = True,
) -> list[bytes]:
    """Encode an astring, returning chunks as :func:`encode_command` does.

    Raises:
        LocalProtocolError: the value contains NUL.
    """
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if allow_atom and data and _ATOM_SAFE.match(data):
        return [data]
    if _QUOTABLE.match(data):
        return [b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"']
    if b"\x00" in data:
        raise LocalProtocolError("IMAP cannot transmit a string containing NUL")
    if literal_plus or (literal_minus and len(data) <= LITERAL_MINUS_MAX):
        return [b"{%d+}\r\n" % len(data) + data]
    return [b"{%d}\r\n" % len(data), data]


def _encode_arg(arg: Arg, out: list[bytearray], literal_plus: bool, literal_minus: bool) -> None:
    if isinstance(arg, Raw):
        if _FORBIDDEN_RAW.search(arg.text):
            raise LocalProtocolError("CR, LF and NUL are not allowed in a command")
        out[-1] += arg.text.encode("ascii")
    elif isinstance(arg, bool):
        raise LocalProtocolError("a boolean is not an IMAP argument")
    elif isinstance(arg, int):
        if arg < 0:
            raise LocalProtocolError("IMAP numbers are never negative")
        out[-1] += b"%d" % arg
    elif isinstance(arg, SequenceSet):
        out[-1] += str(arg).encode("ascii")
    elif isinstance(arg, str | bytes | String):
        chunks = encode_string(
            arg.value if isinstance(arg, String) else arg,
            literal_plus=literal_plus,
            literal_minus=literal_minus,
            allow_atom=not isinstance(arg, String),
        )
        out[-1] += chunks[0]
        out.extend(bytearray(c) for c in chunks[1:])
    else:
        out[-1] += b"("
        for i, item in enumerate(arg):
            if i:
                out[-1] += b" "
            _encode_arg(item, out, literal_plus, literal_minus)
        out[-1] += b")"


def encode_command(
    tag: str,
    name: str,
    args: Sequence[Arg] = (),
    *,
    literal_plus: bool = False,
    literal_minus: bool = False,
) -> list[bytes]:
    """Serialise one command line, CRLF included.

    Args:
        tag: The command tag.
        name: The command name (``"UID FETCH"`` is fine).
        args: The arguments, each encoded as described in this module's header.
        literal_plus: The server offers LITERAL+.
        literal_minus: The server offers LITERAL-.

    Returns:
        Chunks: send the first at once, each later one after a ``+`` continuation.

    Raises:
        LocalProtocolError: an argument cannot be put on the wire safely.
    """
    if _FORBIDDEN_RAW.search(tag + name) or " " in tag:
        raise LocalProtocolError("bad tag or command name")
    out = [bytearray(f"{tag} {name}".encode("ascii"))]
    for arg in args:
        out[-1] += b" "
        _encode_arg(arg, out, literal_plus, literal_minus)
    out[-1] += b"\r\n"
    return [bytes(chunk) for chunk in out]


# -- mailbox names: modified UTF-7 (RFC 3501 section 5.1.3) ------------------------------


def encode_mailbox(name: str) -> str:
    """Encode a mailbox name in modified UTF-7.

    Returns:
        The 7-bit form to send (then encoded as an astring).
    """
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).rstrip(b"=").replace(b"/", b",")
            out.append("&" + b64.decode("ascii") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode_mailbox(name: str | bytes) -> str:
    """Decode a modified UTF-7 mailbox name; invalid sequences are kept as they are."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        end = text.find("-", i + 1) if char == "&" else -1
        if end < 0:
            out.append(char)
            i += 1
            continue
        chunk = text[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64, validate=True).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(text[i : end + 1])
        i = end + 1
    return "".join(out)
