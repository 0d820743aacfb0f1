"""The one-part path: a plain text message's tree built without the stdlib parser.

Theory of operation: most mail between people and an agent is one text/plain part
with a few dozen ASCII header lines. For such a message the stdlib parser's line
loop and mail-parser's walk of the tree (about two thirds of a 4 KB parse) only
rebuild what the bytes already say: a header list and one payload. When the bytes
match the narrow grammar below, :func:`simple_tree` builds that same tree through the
``email`` package's own public calls (``set_raw`` with the pair its compat32 policy
would store, ``set_payload`` with the text the parser would join), and
:func:`~prxmail.message._mailparser.read_simple_mail` reads it with mail-parser's own
header and body code. Anything the grammar does not cover returns ``None`` and takes
the full path; tests/unit/test_message_simple.py checks that both paths give the
same :class:`~prxmail.message.Message` for generated mail inside and just outside it.

The grammar (each condition is one the full parse would otherwise act on):

* A header section of printable ASCII, tabs and line ends, CR only as part of CRLF
  (the stdlib splits lines at a lone CR too), ended by a blank line. Its first line
  is a field ``name:`` with a name of the characters the stdlib's ``headerRE``
  takes; every other line is such a field or a continuation (space or tab first).
  No ``From `` envelope line, no line the stdlib would call a missing separator.
* At most one Content-Type, and it is ``text/plain`` with only ``charset``,
  ``format`` and ``delsp`` parameters of token values (no ``name``, so no file
  name; no RFC 2231 forms). No Content-Type at all is text/plain too.
* No Content-Disposition and no Content-ID: the part is then neither an
  attachment nor an inline named body to mail-parser.

The Content-Transfer-Encoding is not part of the grammar: the parser stores the body
of a one-part message as it was read whatever its encoding, and mail-parser decodes
it from the tree (quoted-printable, base64, charset recovery) the same way on both
paths.
"""

from __future__ import annotations

import email.message
import re

from prxmail.message._bounds import _header_section_end

_HEADER_SECTION_BYTES = re.compile(rb"[\t\x20-\x7e\r\n]*")
# The stdlib's headerRE takes [\041-\071\073-\176]*: -- here at least one character.
_FIELD = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_CONTENT_TYPE = re.compile(
    r"text/plain[ \t]*(?:;[ \t]*(?:charset|format|delsp)=(\"?)[A-Za-z0-9._-]+\1[ \t]*)*",
    re.IGNORECASE,
)
_REFUSED_FIELDS = frozenset({"content-disposition", "content-id"})


def _fields(head: str) -> list[tuple[str, str]] | None:
    """The (name, value) pairs the compat32 policy stores, or None outside the grammar."""
    pairs: list[tuple[str, str]] = []
    lines = head.splitlines(keepends=True)
    if not lines or not _FIELD.match(lines[0]):
        return None
    name = ""
    value: list[str] = []
    for line in lines:
        if line[0] in " \t":
            value.append(line)
            continue
        field = _FIELD.match(line)
        if field is None:
            return None
        if value:
            pairs.append((name, "".join(value).rstrip("\r\n")))
        name = field.group()[:-1]
        value = [line[field.end() :].lstrip(" \t")]
    pairs.append((name, "".join(value).rstrip("\r\n")))
    return pairs


def _simple_content(pairs: list[tuple[str, str]]) -> bool:
    content_type: list[str] = []
    for name, value in pairs:
        key = name.lower()
        if key in _REFUSED_FIELDS:
            return False
        if key == "content-type":
            content_type.append(value)
    if len(content_type) > 1:
        return False
    return not content_type or _CONTENT_TYPE.fullmatch(content_type[0]) is not None


def simple_tree(data: bytes) -> email.message.Message | None:
    """The tree ``email.message_from_bytes(data)`` builds, if ``data`` is in the grammar.

    Args:
        data: The message after the byte-level bounds.

    Returns:
        The one-part tree, or ``None`` when the message is outside the grammar
        described in this module (then only the full parse knows its tree).
    """
    end = _header_section_end(data)
    if end in (0, len(data)):
        return None  # no header section, or no blank line after it
    body = end + (2 if data.startswith(b"\r\n", end) else 1)
    head = data[:end]
    if not _HEADER_SECTION_BYTES.fullmatch(head) or head.count(b"\r") != head.count(b"\r\n"):
        return None
    pairs = _fields(head.decode("ascii"))
    if pairs is None or not _simple_content(pairs):
        return None
    root = email.message.Message()
    for name, value in pairs:
        root.set_raw(name, value)
    # message_from_bytes reads the bytes as ASCII with surrogateescape, and the
    # parser stores everything after the blank line as the payload.
    root.set_payload(data[body:].decode("ascii", "surrogateescape"))
    return root
