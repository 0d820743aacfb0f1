# Theory of operation
# -------------------
#
# The parser turns one complete response (a Frame from the framer: lines plus the
# literals between them) into one event object. It never sees partial input and never
# waits, so it is a plain recursive-descent reader over ``bytes`` with an index.
#
# Grammar: RFC 3501 section 9, with what RFC 9051 and real servers relax. Harmless
# quirks are accepted: several spaces where one is required, NIL where a list is
# expected, ``]`` inside flags and keywords, 8-bit bytes in quoted strings, a status
# line with no text, bare LF line ends (the framer), and the shapes real servers send
# (issue 11): multiparts with no parts, parts without a subtype, message/rfc822 sent as
# a basic part, Exchange's "[Error=...]" text and stray "[COPYUID ...]" lines, Yandex's
# empty section without a value, LIST names starting with "~". Every number is bounded
# by its grammar (MAX_NUMBER, MAX_NUMBER64) before int() sees it. Anything else raises
# RemoteProtocolError with an excerpt, at the boundary of this one response; the framer
# has already found where the next response starts, so the stream never desynchronises.
#
# Speed: FETCH responses dominate a mailbox sync. The common items (UID, FLAGS,
# RFC822.SIZE, BODY[...] literals) are read with precompiled regexes and slicing; only
# ENVELOPE and BODYSTRUCTURE go through the generic nested-list reader.
#
# Nesting depth of parenthesised lists is capped (MAX_NESTING_DEPTH) so a hostile
# server cannot exhaust the Python stack.

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Literal, NoReturn, TypeAlias, cast

from prxmail.errors import RemoteProtocolError
from prxmail.imap._events import (
    Address,
    BodyPart,
    BodyStructure,
    CapabilityData,
    ContinuationRequest,
    EnabledData,
    Envelope,
    ESearchData,
    Event,
    Exists,
    Expunge,
    FetchData,
    FlagsData,
    IdData,
    ListData,
    MultipartBody,
    Recent,
    ResponseCode,
    SearchData,
    SequenceSet,
    StatusResponse,
    TaggedResponse,
    UnknownResponse,
    normalize_section,
)
from prxmail.imap._framer import Frame

__all__ = ["MAX_NESTING_DEPTH", "MAX_NUMBER", "MAX_NUMBER64", "parse_response"]

# Deepest parenthesised nesting accepted. A BODYSTRUCTURE nests two levels per MIME
# level and Dovecot stops parsing MIME at 100 levels; real mail rarely exceeds 10.
# 250 covers every real tree while keeping recursion far from Python's stack limit.
MAX_NESTING_DEPTH = 250

# Largest values of the grammar's number types. RFC 3501 section 9: ``number`` (and
# ``nz-number``) is an unsigned 32-bit integer -- message numbers, UIDs, counts, sizes of
# parts. RFC 7162 / RFC 9051: ``mod-sequence-value`` and ``number64`` are 63-bit. A digit
# string longer than the largest value is refused before int() is called on it, so a
# hostile "* OK [UIDNEXT 999...]" costs one length check, not a quadratic conversion or
# Python's "exceeds the limit for integer string conversion" ValueError.
MAX_NUMBER = 2**32 - 1
MAX_NUMBER64 = 2**63 - 1
_NUMBER64_DIGITS = len(str(MAX_NUMBER64))

Value: TypeAlias = "bytes | bytearray | list[Value] | None"

_ATOM = re.compile(rb'[^\x00-\x20\x7f()"{]+')
_NUMBER = re.compile(rb"[0-9]+")
_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+")
_LITERAL = re.compile(rb"~?\{([0-9]+)\+?\}\Z")
_FETCH_NEXT = re.compile(
    rb" *(?:(\))|([A-Za-z0-9.\-]+)(?:\[([^\]]*)\])?(?:<([0-9]+)>)?(?: +|(?=\))))"
)
_FETCH_START = re.compile(rb"\* ([0-9]+) FETCH \(")
# A response code's name: an atom, which must be followed by a space or "]" -- so
# Exchange's '[Error="Microsoft.Exchange..." ...]' is text, not a code named ERROR.
_CODE_NAME = re.compile(rb"[A-Za-z0-9.\-]+(?=[ \]])")
_SPACES = re.compile(rb" *")

_STATUSES = frozenset((b"OK", b"NO", b"BAD", b"PREAUTH", b"BYE"))
_RFC822_SECTIONS = {b"RFC822": "", b"RFC822.HEADER": "HEADER", b"RFC822.TEXT": "TEXT"}
# Response codes whose data is a number, with the largest value their grammar allows.
_INT_CODES = {
    "UIDNEXT": MAX_NUMBER,
    "UIDVALIDITY": MAX_NUMBER,
    "UNSEEN": MAX_NUMBER,
    "HIGHESTMODSEQ": MAX_NUMBER64,
}


class _Reader:
    """A cursor over one frame: the current line, a position, and the literals."""

    __slots__ = ("_lines", "_literals", "_seg", "line", "pos")

    def __init__(self, frame: Frame) -> None:
        self._lines = frame.lines
        self._literals = frame.literals
        self._seg = 0
        self.line = frame.lines[0]
        self.pos = 0

    def error(self, what: str) -> RemoteProtocolError:
        start = max(0, self.pos - 30)
        return RemoteProtocolError(
            f"malformed server response: {what}", excerpt=self.line[start : start + 80]
        )

    def fail(self, what: str) -> NoReturn:
        raise self.error(what)

    def at_line_end(self) -> bool:
        return self.pos >= len(self.line)

    def peek(self) -> int:
        pos = self.pos
        return self.line[pos] if pos < len(self.line) else -1

    def spaces(self) -> None:
        """At least one space (more are a tolerated quirk)."""
        line = self.line
        pos = self.pos
        if pos >= len(line) or line[pos] != 32:
            self.fail("expected a space")
        pos += 1
        while pos < len(line) and line[pos] == 32:
            pos += 1
        self.pos = pos

    def skip_spaces(self) -> None:
        line = self.line
        pos = self.pos
        while pos < len(line) and line[pos] == 32:
            pos += 1
        self.pos = pos

    def expect(self, char: int) -> None:
        if self.peek() != char:
            self.fail(f"expected {chr(char)!r}")
        self.pos += 1

    def atom(self) -> bytes:
        match = _ATOM.match(self.line, self.pos)
        if match is None:
            self.fail("expected an atom")
        self.pos = match.end()
        return match[0]

    def number(self, limit: int = MAX_NUMBER, *, nonzero: bool = False) -> int:
        """A number of at most ``limit`` (``nz-number`` if ``nonzero``)."""
        match = _NUMBER.match(self.line, self.pos)
        if match is None:
            self.fail("expected a number")
        value = _bounded(match[0], limit, nonzero, self)
        self.pos = match.end()
        return value

    def rest(self) -> bytes:
        rest = self.line[self.pos :]
        self.pos = len(self.line)
        return rest

    def quoted(self) -> bytes:
        line = self.line
        start = self.pos + 1
        end = line.find(b'"', start)
        if end < 0:
            self.fail("unterminated quoted string")
        if line.find(b"\\", start, end) < 0:
            self.pos = end + 1
            return line[start:end]
        out = bytearray()
        pos = start
        n = len(line)
        while pos < n:
            c = line[pos]
            if c == 34:  # "
                self.pos = pos + 1
                return bytes(out)
            if c == 92 and pos + 1 < n:  # backslash escapes the next byte
                pos += 1
                c = line[pos]
            out.append(c)
            pos += 1
        raise self.error("unterminated quoted string")

    def literal(self) -> bytes | bytearray:
        match = _LITERAL.match(self.line, self.pos)
        if match is None or self._seg >= len(self._literals):
            self.fail("malformed literal")
        value = self._literals[self._seg]
        self._seg += 1
        self.line = self._lines[self._seg]
        self.pos = 0
        return value

    def nstring(self) -> bytes | bytearray | None:
        c = self.peek()
        if c == 34:
            return self.quoted()
        if c == 123 or (c == 126 and self.line.startswith(b"{", self.pos + 1)):  # { or ~{
            return self.literal()
        word = self.atom()
        if word.upper() == b"NIL":
            return None
        return word  # an atom where a string belongs: tolerated

    def value(self, depth: int = 0) -> Value:
        """Any value: a parenthesised list, string, literal, NIL or atom."""
        c = self.peek()
        if c == 40:  # (
            if depth >= MAX_NESTING_DEPTH:
                self.fail(f"lists nested deeper than {MAX_NESTING_DEPTH}")
            self.pos += 1
            items: list[Value] = []
            while True:
                self.skip_spaces()
                c = self.peek()
                if c == 41:  # )
                    self.pos += 1
                    return items
                if c < 0:
                    self.fail("unterminated list")
                items.append(self.value(depth + 1))
        if c < 0:
            self.fail("missing value")
        return self.nstring()

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self._seg >= len(self._literals)


# -- entry point -----------------------------------------------------------------------


def parse_response(frame: Frame) -> Event:
    """Parse one complete server response.

    Args:
        frame: A frame from :class:`~prxmail.imap._framer.Framer`.

    Returns:
        The event it represents.

    Raises:
        RemoteProtocolError: the response does not follow the grammar.
    """
    reader = _Reader(frame)
    line = reader.line
    match = _FETCH_START.match(line)
    if match is not None:  # the hot path of a mailbox sync
        reader.pos = match.end()
        return _fetch_items(reader, _bounded(match[1], MAX_NUMBER, True, reader))
    if line.startswith(b"*"):
        reader.pos = 1
        reader.spaces()
        return _untagged(reader)
    if line.startswith(b"["):
        return _stray_code(reader)
    if line.startswith(b"+"):
        raw = line[1:]
        if raw.startswith(b" "):
            raw = raw[1:]
        return ContinuationRequest(raw.decode("utf-8", "replace"))
    match = _TAG.match(line)
    if match is None:
        reader.fail("expected '*', '+' or a tag")
    reader.pos = match.end()
    reader.spaces()
    status = reader.atom().upper()
    if status not in (b"OK", b"NO", b"BAD"):
        reader.fail("expected OK, NO or BAD after a tag")
    code, text = _resp_text(reader)
    return TaggedResponse(
        match[0].decode("ascii", "replace"),
        cast(Literal["OK", "NO", "BAD"], status.decode()),
        code,
        text,
    )


def _stray_code(reader: _Reader) -> UnknownResponse:
    # Exchange sends a bare "[COPYUID ...]" line (or "* [COPYUID ...]") during MOVE: a
    # response code outside any response. It carries nothing the caller needs (the
    # tagged OK follows), so it is reported for logging instead of breaking the
    # connection. Anything else that starts with "[" is still an error.
    code = _resp_code(reader)
    if code is None:
        reader.fail("expected '*', '+' or a tag")
    return UnknownResponse(f"[{code.name}]", reader.line)


def _untagged(reader: _Reader) -> Event:
    c = reader.peek()
    if c == 91:  # [
        return _stray_code(reader)
    if 48 <= c <= 57:  # a digit: message data
        start = reader.pos
        number = reader.number()
        reader.spaces()
        keyword = reader.atom().upper()
        if keyword in (b"FETCH", b"EXPUNGE") and not number:
            reader.pos = start
            reader.fail(f"{keyword.decode()} needs a non-zero message number")
        if keyword == b"FETCH":
            reader.spaces()
            return _fetch(reader, number)
        if keyword == b"EXISTS":
            return Exists(number)
        if keyword == b"EXPUNGE":
            return Expunge(number)
        if keyword == b"RECENT":
            return Recent(number)
        return UnknownResponse(keyword.decode("ascii", "replace"), reader.line)
    keyword = reader.atom().upper()
    if keyword in _STATUSES:
        code, text = _resp_text(reader)
        status = cast(Literal["OK", "NO", "BAD", "PREAUTH", "BYE"], keyword.decode())
        return StatusResponse(status, code, text)
    if keyword == b"CAPABILITY":
        return CapabilityData(frozenset(_words(reader.rest())))
    if keyword == b"ENABLED":
        return EnabledData(frozenset(_words(reader.rest())))
    if keyword == b"FLAGS":
        reader.skip_spaces()
        return FlagsData(_flag_list(reader))
    if keyword == b"SEARCH":
        return _search(reader)
    if keyword == b"ESEARCH":
        return _esearch(reader)
    if keyword == b"ID":
        reader.skip_spaces()
        return _id(reader)
    if keyword in (b"LIST", b"LSUB"):
        reader.skip_spaces()
        return _list_data(reader)
    return UnknownResponse(keyword.decode("ascii", "replace"), reader.line)


def _list_data(reader: _Reader) -> ListData:
    # mailbox-list = "(" [mbx-list-flags] ")" SP (DQUOTE QUOTED-CHAR DQUOTE / nil) SP mailbox
    attributes = _flag_list(reader)
    reader.spaces()
    delimiter = reader.nstring()
    reader.spaces()
    name = reader.nstring()
    # An atom NIL here is the mailbox called "NIL", not a missing name.
    raw_name = b"NIL" if name is None else bytes(name)
    shown = None if delimiter is None else bytes(delimiter).decode("utf-8", "replace")
    return ListData(attributes, shown, raw_name)


def _words(raw: bytes) -> list[str]:
    return [w.decode("ascii", "replace").upper() for w in raw.split()]


def _resp_text(reader: _Reader) -> tuple[ResponseCode | None, str]:
    reader.skip_spaces()
    code = None
    if reader.peek() == 91:  # [
        code = _resp_code(reader)
        reader.skip_spaces()
    return code, reader.rest().decode("utf-8", "replace")


def _resp_code(reader: _Reader) -> ResponseCode | None:
    line = reader.line
    start = reader.pos
    match = _CODE_NAME.match(line, start + 1)
    if match is None:
        return None  # "[" that starts no code: it is part of the text
    name = match[0].decode("ascii").upper()
    pos = match.end()
    data_start = pos + 1 if pos < len(line) and line[pos] == 32 else pos
    if line.startswith(b"(", data_start):
        # A list (PERMANENTFLAGS): flags may contain "]", so find the ")" first.
        close = line.find(b")", data_start)
        end = line.find(b"]", close) if close >= 0 else -1
    else:
        end = line.find(b"]", pos)
    if end < 0:
        return None  # unterminated: treat the bracket as text
    raw = line[data_start:end].strip()
    reader.pos = end + 1
    value: int | str | tuple[str, ...] | None
    limit = _INT_CODES.get(name)
    if limit is not None:
        if not raw.isdigit():
            reader.pos = start
            reader.fail(f"{name} needs a number")
        # Zero is tolerated although UIDNEXT/UIDVALIDITY/UNSEEN are nz-number: some
        # servers send "[UNSEEN 0]" for an empty mailbox, and nothing breaks on it.
        value = _bounded(raw, limit, False, reader)
    elif name == "CAPABILITY":
        value = tuple(_words(raw))
    elif name == "PERMANENTFLAGS":
        value = tuple(f.decode("utf-8", "replace") for f in raw.strip(b"()").split())
    elif raw:
        value = raw.decode("utf-8", "replace")
    else:
        value = None
    return ResponseCode(name, value)


def _flag_list(reader: _Reader) -> tuple[str, ...]:
    line = reader.line
    pos = reader.pos
    if line.startswith(b"(", pos):
        end = line.find(b")", pos)
        if end < 0:
            reader.fail("unterminated flag list")
        reader.pos = end + 1
        return tuple(line[pos + 1 : end].decode("utf-8", "replace").split())
    if line[pos : pos + 3].upper() == b"NIL":  # NIL for an empty list: tolerated
        reader.pos = pos + 3
        return ()
    raise reader.error("expected a flag list")


def _search(reader: _Reader) -> SearchData:
    ids: list[int] = []
    modseq = None
    while True:
        reader.skip_spaces()
        c = reader.peek()
        if c < 0:
            break
        if c == 40:  # (MODSEQ n)
            item = reader.value()
            if (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], bytes)
                and item[0].upper() == b"MODSEQ"
            ):
                modseq = _int(item[1], reader, MAX_NUMBER64)
            continue
        ids.append(reader.number(nonzero=True))
    return SearchData(tuple(ids), modseq)


def _esearch(reader: _Reader) -> ESearchData:
    reader.skip_spaces()
    tag = None
    if reader.peek() == 40:
        corr = reader.value()
        if isinstance(corr, list) and len(corr) == 2 and isinstance(corr[1], bytes | bytearray):
            tag = bytes(corr[1]).decode("ascii", "replace")
    fields: dict[str, object] = {}
    uid = False
    while True:
        reader.skip_spaces()
        if reader.at_line_end():
            break
        name = reader.atom().upper()
        if name == b"UID":
            uid = True
            continue
        reader.spaces()
        value = reader.value()
        if name in (b"MIN", b"MAX", b"COUNT", b"MODSEQ"):
            limit = MAX_NUMBER64 if name == b"MODSEQ" else MAX_NUMBER
            fields[name.decode().lower()] = _int(value, reader, limit)
        elif name == b"ALL":
            if not isinstance(value, bytes):
                reader.fail("ESEARCH ALL needs a sequence set")
            try:
                fields["all"] = SequenceSet.parse(value)
            except (ValueError, UnicodeDecodeError):
                reader.fail("ESEARCH ALL needs a sequence set")
    return ESearchData(
        tag=tag,
        uid=uid,
        min=cast("int | None", fields.get("min")),
        max=cast("int | None", fields.get("max")),
        count=cast("int | None", fields.get("count")),
        all=cast("SequenceSet | None", fields.get("all")),
        modseq=cast("int | None", fields.get("modseq")),
    )


def _id(reader: _Reader) -> IdData:
    value = reader.value()
    if value is None:
        return IdData(None)
    if not isinstance(value, list) or len(value) % 2:
        reader.fail("ID needs NIL or a list of name/value pairs")
    fields: dict[str, str | None] = {}
    for i in range(0, len(value), 2):
        fields[_text(value[i]) or ""] = _text(value[i + 1])
    return IdData(fields)


# -- FETCH -------------------------------------------------------------------------------


def _fetch(reader: _Reader, seq: int) -> FetchData:
    reader.expect(40)
    return _fetch_items(reader, seq)


def _fetch_items(reader: _Reader, seq: int) -> FetchData:
    uid = rfc822_size = modseq = None
    flags = None
    internaldate = None
    envelope = None
    bodystructure = None
    sections: dict[str, bytes | bytearray | None] = {}
    extra: dict[str, object] = {}
    next_item = _FETCH_NEXT.match
    while True:
        # One regex per item: spaces, then ")" or "NAME[section]<origin>" and spaces.
        match = next_item(reader.line, reader.pos)
        if match is None:
            reader.skip_spaces()
            if reader.at_line_end():
                reader.fail("unterminated FETCH item list")
            reader.fail("expected a FETCH item name and a space")
        reader.pos = match.end()
        if match[1] is not None:  # ")"
            break
        name = match[2].upper()
        section = match[3]
        if section is not None:
            key = normalize_section(section.decode("utf-8", "replace"))
            if match[4] is not None:
                key += f"<{_bounded(match[4], MAX_NUMBER, False, reader)}>"
            if name == b"BODY":
                c = reader.line[reader.pos : reader.pos + 1]
                if c == b")":
                    # Yandex leaves out the value of an empty section ("BODY[2] )"):
                    # the section was there and held nothing.
                    sections[key] = b""
                else:
                    sections[key] = reader.literal() if c == b"{" else reader.nstring()
            else:  # BINARY[...], BINARY.SIZE[...]
                extra[f"{name.decode()}[{key}]"] = reader.value()
        elif name == b"UID":
            uid = reader.number(nonzero=True)
        elif name == b"FLAGS":
            flags = _flag_list(reader)
        elif name == b"RFC822.SIZE":
            # number64 in RFC 9051: IMAP4rev2 servers may hold messages over 4 GiB.
            rfc822_size = reader.number(MAX_NUMBER64)
        elif name in _RFC822_SECTIONS:
            sections[_RFC822_SECTIONS[name]] = reader.nstring()
        elif name == b"MODSEQ":
            item = reader.value()
            if not isinstance(item, list) or len(item) != 1:
                reader.fail("MODSEQ needs a parenthesised number")
            modseq = _int(item[0], reader, MAX_NUMBER64)
        elif name == b"INTERNALDATE":
            raw = reader.nstring()
            internaldate = _internaldate(raw, reader)
        elif name == b"ENVELOPE":
            envelope = _envelope(reader.value(), reader)
        elif name in (b"BODYSTRUCTURE", b"BODY"):
            bodystructure = _body(reader.value(), reader, 0)
        else:
            extra[name.decode("ascii", "replace")] = reader.value()
    return FetchData(
        seq=seq,
        uid=uid,
        flags=flags,
        rfc822_size=rfc822_size,
        internaldate=internaldate,
        envelope=envelope,
        bodystructure=bodystructure,
        sections=sections,
        modseq=modseq,
        extra=extra,
    )


def _internaldate(raw: bytes | bytearray | None, reader: _Reader) -> datetime.datetime | None:
    if raw is None:
        return None
    text = bytes(raw).decode("ascii", "replace").strip()
    try:
        return datetime.datetime.strptime(text, "%d-%b-%Y %H:%M:%S %z")
    except ValueError:
        reader.fail(f"bad INTERNALDATE {text[:40]!r}")


def _text(value: Value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return None
    return bytes(value).decode("utf-8", "replace")


def _bounded(digits: bytes | bytearray, limit: int, nonzero: bool, reader: _Reader) -> int:
    """The value of an ASCII digit string, refused above ``limit`` (or 0 if ``nonzero``).

    Longer strings than the 63-bit maximum are refused by length alone: int() is never
    called on them (leading zeros that long are no real server's output).
    """
    if len(digits) <= _NUMBER64_DIGITS:
        value = int(digits)
        if value <= limit and (value or not nonzero):
            return value
    kind = "a non-zero number" if nonzero else "a number"
    # The start of the line names the response ("* OK [UIDNEXT 99..."), which says
    # more than a window of digits would.
    raise RemoteProtocolError(
        f"malformed server response: expected {kind} of at most {limit}, got {len(digits)} digits",
        excerpt=reader.line[:60],
    )


def _int(value: Value, reader: _Reader, limit: int = MAX_NUMBER) -> int:
    if isinstance(value, bytes | bytearray) and value.isdigit():
        return _bounded(value, limit, False, reader)
    raise reader.error("expected a number")


def _opt_int(value: Value, reader: _Reader) -> int | None:
    """A number where the grammar wants one but some servers send NIL or junk."""
    if isinstance(value, bytes | bytearray) and value.isdigit():
        return _bounded(value, MAX_NUMBER, False, reader)
    return None


def _list(value: Value) -> list[Value]:
    return value if isinstance(value, list) else []


def _addresses(value: Value) -> tuple[Address, ...]:
    out = []
    for item in _list(value):
        parts = _list(item)
        if len(parts) < 4:
            continue
        out.append(Address(_text(parts[0]), _text(parts[1]), _text(parts[2]), _text(parts[3])))
    return tuple(out)


def _envelope(value: Value, reader: _Reader) -> Envelope:
    items = _list(value)
    if len(items) < 10:
        reader.fail("ENVELOPE needs 10 fields")
    return Envelope(
        date=_text(items[0]),
        subject=_text(items[1]),
        from_=_addresses(items[2]),
        sender=_addresses(items[3]),
        reply_to=_addresses(items[4]),
        to=_addresses(items[5]),
        cc=_addresses(items[6]),
        bcc=_addresses(items[7]),
        in_reply_to=_text(items[8]),
        message_id=_text(items[9]),
    )


def _params(value: Value) -> Mapping[str, str]:
    items = _list(value)
    params: dict[str, str] = {}
    for i in range(0, len(items) - 1, 2):
        name = _text(items[i])
        if name is not None:
            params[name.lower()] = _text(items[i + 1]) or ""
    return params


def _disposition(value: Value) -> tuple[str, Mapping[str, str]] | None:
    items = _list(value)
    if not items:
        return None
    kind = _text(items[0])
    if kind is None:
        return None
    return kind.lower(), _params(items[1] if len(items) > 1 else None)


def _language(value: Value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return tuple(t for t in (_text(v) for v in value) if t is not None)
    return (bytes(value).decode("utf-8", "replace"),)


def _is_number(value: Value) -> bool:
    return isinstance(value, bytes | bytearray) and value.isdigit()


def _multipart(parts: list[BodyStructure], ext: list[Value]) -> MultipartBody:
    # NIL (or nothing) where the subtype belongs: RFC 2046 5.1.3 reads an unknown
    # multipart subtype as "mixed".
    subtype = (_text(ext[0]) if ext else None) or "mixed"
    return MultipartBody(
        parts=tuple(parts),
        subtype=subtype.lower(),
        params=_params(ext[1]) if len(ext) > 1 else {},
        disposition=_disposition(ext[2]) if len(ext) > 2 else None,
        language=_language(ext[3]) if len(ext) > 3 else None,
        location=_text(ext[4]) if len(ext) > 4 else None,
    )


def _body(value: Value, reader: _Reader, depth: int) -> BodyStructure:
    # Real servers bend this grammar (issue 11 item 13); each shape below is read
    # into the closest faithful structure rather than refusing the whole response:
    # * a multipart with zero parts, "("MIXED")" or "("MIXED" ("BOUNDARY" "x") NIL
    #   NIL NIL)" -- a string that is not followed by a subtype string;
    # * the same with NIL for its media type, "(NIL "MIXED" ...)" in under 7 fields;
    # * a basic part whose Content-Type had no subtype, sent without the subtype
    #   field: "("X-ZIP" NIL NIL NIL "BASE64" 1234 ...)" (the size, a number, sits
    #   one field early);
    # * a message/rfc822 part sent as a basic part, without envelope, body and line
    #   count (see _basic).
    items = _list(value)
    if not items:
        reader.fail("empty BODYSTRUCTURE")
    first = items[0]
    if isinstance(first, list):
        parts: list[BodyStructure] = []
        i = 0
        while i < len(items) and isinstance(items[i], list):
            parts.append(_body(items[i], reader, depth + 1))
            i += 1
        return _multipart(parts, items[i:])
    second = items[1] if len(items) > 1 else None
    if not isinstance(second, bytes | bytearray):
        if len(items) >= 6 and _is_number(items[5]) and not _is_number(items[4]):
            return _basic([first, None, *items[1:]], reader, depth)
        if len(items) <= 5:
            return _multipart([], items)
    elif first is None and len(items) < 7:
        return _multipart([], items[1:])
    if len(items) < 7:
        reader.fail("a body part needs at least 7 fields")
    return _basic(items, reader, depth)


def _basic(items: list[Value], reader: _Reader, depth: int) -> BodyPart:
    mtype = (_text(items[0]) or "").lower()
    subtype = (_text(items[1]) or "").lower()
    lines = None
    envelope = None
    inner = None
    rest = items[7:]
    if (
        mtype == "message"
        and subtype in ("rfc822", "global")
        and rest
        # The full form has an envelope (a list) first; NIL envelope and body are
        # taken as the full form only when a line count follows them. Otherwise the
        # server sent the part as a basic one and what follows is extension data.
        and (isinstance(rest[0], list) or (len(rest) >= 3 and _is_number(rest[2])))
    ):
        envelope = _envelope(rest[0], reader) if isinstance(rest[0], list) else None
        inner = (
            _body(rest[1], reader, depth + 1)
            if len(rest) > 1 and isinstance(rest[1], list)
            else None
        )
        lines = _opt_int(rest[2], reader) if len(rest) > 2 else None
        rest = rest[3:]
    elif mtype == "text" and rest:
        lines = _opt_int(rest[0], reader)
        rest = rest[1:]
    return BodyPart(
        type=mtype,
        subtype=subtype,
        params=_params(items[2]),
        id=_text(items[3]),
        description=_text(items[4]),
        encoding=(_text(items[5]) or "").lower() or None,
        size=_opt_int(items[6], reader) or 0,
        lines=lines,
        envelope=envelope,
        body=inner,
        md5=_text(rest[0]) if rest else None,
        disposition=_disposition(rest[1]) if len(rest) > 1 else None,
        language=_language(rest[2]) if len(rest) > 2 else None,
        location=_text(rest[3]) if len(rest) > 3 else None,
    )
