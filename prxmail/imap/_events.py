"""Frozen value objects for everything the IMAP core reports.

The parser turns each complete server response into exactly one of these. They are
``attrs`` frozen classes (h11 ``_events.py`` and wsproto ``events.py`` are the model):
immutable, compared by value, cheap to build on the fetch hot path.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Literal, TypeAlias

import attrs

__all__ = [
    "Address",
    "BodyPart",
    "BodyStructure",
    "CapabilityData",
    "ConnectionClosed",
    "ContinuationRequest",
    "ESearchData",
    "EnabledData",
    "Envelope",
    "Event",
    "Exists",
    "Expunge",
    "FetchData",
    "FlagsData",
    "IdData",
    "MultipartBody",
    "Recent",
    "ResponseCode",
    "SearchData",
    "SequenceSet",
    "StatusResponse",
    "TaggedResponse",
    "UnknownResponse",
    "normalize_section",
    "section_key",
]

Status: TypeAlias = Literal["OK", "NO", "BAD", "PREAUTH", "BYE"]
CodeValue: TypeAlias = "int | str | tuple[str, ...] | None"


@attrs.frozen
class ResponseCode:
    """A bracketed response code such as ``[UIDNEXT 42]``.

    Attributes:
        name: The code atom in upper case (``"UIDNEXT"``, ``"ALERT"``...).
        value: Parsed data: ``int`` for UIDNEXT, UIDVALIDITY, UNSEEN, HIGHESTMODSEQ;
            a tuple of strings for CAPABILITY and PERMANENTFLAGS (capabilities in
            upper case); the raw text for any other code with data; ``None`` without.
    """

    name: str
    value: CodeValue = None


@attrs.frozen
class SequenceSet:
    """A set of message numbers or UIDs in IMAP's compact form (``1:3,7,10:*``).

    Attributes:
        ranges: Inclusive ``(start, end)`` pairs in the order given; ``None`` stands
            for ``*`` (the largest number in use) and, when only one side is ``*``,
            is always ``end``.
    """

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def of(cls, numbers: Iterator[int] | list[int] | tuple[int, ...] | range) -> SequenceSet:
        """Compress numbers into ranges (sorted, duplicates removed).

        Raises:
            ValueError: a number is not a positive 32-bit value, or none were given.
        """
        ordered = sorted(set(numbers))
        if not ordered:
            raise ValueError("a sequence set needs at least one number")
        if ordered[0] < 1 or ordered[-1] > 0xFFFFFFFF:
            raise ValueError("sequence numbers and UIDs are 1..4294967295")
        ranges: list[tuple[int | None, int | None]] = []
        start = prev = ordered[0]
        for n in ordered[1:]:
            if n != prev + 1:
                ranges.append((start, prev))
                start = n
            prev = n
        ranges.append((start, prev))
        return cls(tuple(ranges))

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse ``"1:3,7,10:*"``.

        Raises:
            ValueError: the text is not a sequence set.
        """
        raw = text.decode("ascii") if isinstance(text, bytes) else text
        ranges: list[tuple[int | None, int | None]] = []
        for part in raw.split(","):
            first, sep, last = part.partition(":")
            start = _seq_number(first)
            end = _seq_number(last) if sep else start
            if start is None or (end is not None and start > end):
                start, end = end, start  # "*:5" is "5:*"; ranges are unordered
            ranges.append((start, end))
        return cls(tuple(ranges))

    def __str__(self) -> str:
        parts = []
        for start, end in self.ranges:
            first = "*" if start is None else str(start)
            if end == start:
                parts.append(first)
            else:
                parts.append(f"{first}:{'*' if end is None else end}")
        return ",".join(parts)

    def __iter__(self) -> Iterator[int]:
        """Every number in order; refuses sets with ``*`` (their size is unknown)."""
        for start, end in self.ranges:
            if start is None or end is None:
                raise ValueError("cannot enumerate a sequence set containing '*'")
            yield from range(start, end + 1)

    def __len__(self) -> int:
        total = 0
        for start, end in self.ranges:
            if start is None or end is None:
                raise ValueError("a sequence set containing '*' has no known size")
            total += end - start + 1
        return total


def _seq_number(text: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit() or len(text) > 10:
        raise ValueError(f"not a sequence number: {text!r}")
    value = int(text)
    if not 0 < value <= 0xFFFFFFFF:
        raise ValueError(f"sequence number out of range: {text!r}")
    return value


# One header field name in a HEADER.FIELDS list: a quoted string (group 1) or an atom
# (group 2). No backslash escapes: field names never need them, and without them the
# scan is linear even on a hostile spec full of quotes.
_FIELD_NAME = re.compile(r'"([^"]*)"|([^ ()"]+)')
# A partial-fetch suffix as requested ("<0.1024>") or as answered ("<0>"); 19 digits
# bound it to 63 bits so int() stays cheap whatever the caller passes.
_PARTIAL = re.compile(r"<([0-9]{1,19})(?:\.[0-9]{1,19})?>\Z")


# A session asks for the same few sections in every FETCH, so the normal form of a
# field list is cached. Bounded both ways, so a hostile server sending endless
# distinct specs holds at most 128 entries of 512 characters.
_SECTION_CACHE_ENTRIES = 128
_SECTION_CACHE_MAX_LENGTH = 512


def normalize_section(section: str) -> str:
    """A section spec (the text between the brackets) in its one canonical spelling.

    Upper case; in a ``HEADER.FIELDS`` / ``HEADER.FIELDS.NOT`` list the field names
    unquoted and separated by single spaces. Anything else is only upper-cased, so
    keys of the other sections are what they always were.

    Args:
        section: The section spec, e.g. ``'header.fields ("To" cc)'``.

    Returns:
        Its canonical spelling, e.g. ``"HEADER.FIELDS (TO CC)"``.
    """
    key = section.upper()
    if "FIELDS" not in key:
        return key
    if len(key) <= _SECTION_CACHE_MAX_LENGTH:
        return _normalize_fields_cached(key)
    return _normalize_fields(key)


def _normalize_fields(key: str) -> str:
    trimmed = key.rstrip(" ")
    opening = key.find("(")
    if opening < 0 or not trimmed.endswith(")"):
        return key
    prefix = key[:opening].rstrip(" ")
    if not prefix.endswith(("HEADER.FIELDS", "HEADER.FIELDS.NOT")):
        return key
    names = [
        m[1] if m[1] is not None else m[2]
        for m in _FIELD_NAME.finditer(key, opening + 1, len(trimmed) - 1)
    ]
    return f"{prefix} ({' '.join(names)})"


_normalize_fields_cached = functools.lru_cache(maxsize=_SECTION_CACHE_ENTRIES)(_normalize_fields)


def section_key(spec: str) -> str:
    """The key under which :attr:`FetchData.sections` stores a requested section.

    Section specs are case-insensitive and header field names may be sent as atoms or
    quoted strings, so servers answer ``BODY.PEEK[HEADER.FIELDS ("Content-Type")]``
    in several spellings; the parser files each under :func:`normalize_section` of
    what the server sent, and this maps the requested spelling to the same key. A
    partial suffix is reduced to its origin (``<0.1024>`` becomes ``<0>``), as the
    server names it.

    Args:
        spec: The text between the brackets of the fetch item, optionally followed
            by ``<origin>`` or ``<origin.length>``: ``"1.MIME"``,
            ``'HEADER.FIELDS ("To")'``, ``"1<0.4096>"``.

    Returns:
        The key, e.g. ``"HEADER.FIELDS (CONTENT-TYPE)"``.
    """
    partial = _PARTIAL.search(spec)
    if partial is None:
        return normalize_section(spec)
    return f"{normalize_section(spec[: partial.start()])}<{int(partial[1])}>"


# -- responses -----------------------------------------------------------------------


@attrs.frozen
class TaggedResponse:
    """The completion of a command: ``A1 OK [code] text``."""

    tag: str
    status: Literal["OK", "NO", "BAD"]
    code: ResponseCode | None
    text: str


@attrs.frozen
class StatusResponse:
    """An untagged ``* OK/NO/BAD/PREAUTH/BYE [code] text`` (greetings included)."""

    status: Status
    code: ResponseCode | None
    text: str


@attrs.frozen
class ContinuationRequest:
    """``+ text``: the server waits for more of the current command.

    Attributes:
        text: The text after ``+ `` (for AUTHENTICATE: the base64 challenge).
    """

    text: str


@attrs.frozen
class CapabilityData:
    """``* CAPABILITY ...``: capability names in upper case."""

    capabilities: frozenset[str]


@attrs.frozen
class EnabledData:
    """``* ENABLED ...`` (RFC 5161): the extensions now enabled, in upper case."""

    capabilities: frozenset[str]


@attrs.frozen
class FlagsData:
    """``* FLAGS (...)``: the flags defined in the selected mailbox."""

    flags: tuple[str, ...]


@attrs.frozen
class Exists:
    """``* n EXISTS``: the mailbox now holds ``count`` messages."""

    count: int


@attrs.frozen
class Recent:
    """``* n RECENT``."""

    count: int


@attrs.frozen
class Expunge:
    """``* n EXPUNGE``: message sequence number ``seq`` was removed."""

    seq: int


@attrs.frozen
class SearchData:
    """``* SEARCH n...`` (with ``(MODSEQ m)`` under CONDSTORE)."""

    ids: tuple[int, ...]
    modseq: int | None = None


@attrs.frozen
class ESearchData:
    """``* ESEARCH`` (RFC 4731) result.

    Attributes:
        tag: The tag of the command it answers, when given.
        uid: True if the numbers are UIDs.
        min, max, count: The requested aggregates, when returned.
        all: The matching numbers, when returned.
        modseq: The highest mod-sequence of the matches (CONDSTORE).
    """

    tag: str | None
    uid: bool
    min: int | None = None
    max: int | None = None
    count: int | None = None
    all: SequenceSet | None = None
    modseq: int | None = None


@attrs.frozen
class IdData:
    """``* ID (...)`` (RFC 2971): the server's identification, or ``None`` for NIL."""

    fields: Mapping[str, str | None] | None


@attrs.frozen
class ListData:
    """One mailbox from a LIST (or LSUB) response.

    Attributes:
        attributes: Name attributes such as ``\\HasNoChildren`` or ``\\Noselect``.
        delimiter: The hierarchy delimiter, or ``None`` for a flat namespace.
        raw_name: The mailbox name as sent (modified UTF-7, RFC 3501 section 5.1.3).
    """

    attributes: tuple[str, ...]
    delimiter: str | None
    raw_name: bytes

    @property
    def selectable(self) -> bool:
        """False for ``\\Noselect`` / ``\\NonExistent`` entries (RFC 3501, RFC 5258)."""
        return not any(a.lower() in ("\\noselect", "\\nonexistent") for a in self.attributes)


@attrs.frozen
class UnknownResponse:
    """An untagged response this client does not interpret (STATUS, NAMESPACE, ...).

    A stray response code outside any response (Exchange sends ``[COPYUID ...]`` on
    a line of its own during MOVE) is reported here too, named after the code in
    brackets (``"[COPYUID]"``), so the caller can log it and carry on.

    Attributes:
        name: Its keyword in upper case, or ``"[CODE]"`` for a stray response code.
        line: The first line of the response, for logging or custom parsing.
    """

    name: str
    line: bytes


@attrs.frozen
class ConnectionClosed:
    """The server closed the connection (end of stream) at a response boundary."""


# -- FETCH ---------------------------------------------------------------------------


@attrs.frozen
class Address:
    """One address of an ENVELOPE."""

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None

    @property
    def email(self) -> str | None:
        """``mailbox@host``, or ``None`` for group syntax markers."""
        if self.mailbox is None or self.host is None:
            return None
        return f"{self.mailbox}@{self.host}"


@attrs.frozen
class Envelope:
    """The ENVELOPE fetch item (RFC 3501 section 7.4.2); strings as the server sent
    them, still RFC 2047 encoded."""

    date: str | None
    subject: str | None
    from_: tuple[Address, ...]
    sender: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    in_reply_to: str | None
    message_id: str | None


@attrs.frozen
class BodyPart:
    """A single (non-multipart) body part of a BODYSTRUCTURE.

    Attributes:
        type, subtype: Lower-cased MIME type, e.g. ``"text"``, ``"plain"``.
        params: Content-Type parameters, names lower-cased.
        size: Size in octets of the encoded body.
        lines: Line count for ``text/*`` and ``message/rfc822``.
        envelope, body: For ``message/rfc822``: the inner message.
        disposition: e.g. ``("attachment", {"filename": "a.pdf"})``.
    """

    type: str
    subtype: str
    params: Mapping[str, str]
    id: str | None
    description: str | None
    encoding: str | None
    size: int
    lines: int | None = None
    envelope: Envelope | None = None
    body: BodyStructure | None = None
    md5: str | None = None
    disposition: tuple[str, Mapping[str, str]] | None = None
    language: tuple[str, ...] | None = None
    location: str | None = None


@attrs.frozen
class MultipartBody:
    """A ``multipart/*`` node of a BODYSTRUCTURE."""

    parts: tuple[BodyStructure, ...]
    subtype: str
    params: Mapping[str, str] = attrs.field(factory=dict)
    disposition: tuple[str, Mapping[str, str]] | None = None
    language: tuple[str, ...] | None = None
    location: str | None = None

    @property
    def type(self) -> str:
        """Always ``"multipart"``."""
        return "multipart"


BodyStructure: TypeAlias = "BodyPart | MultipartBody"


@attrs.frozen
class FetchData:
    """One ``* n FETCH (...)`` response.

    Attributes:
        seq: Message sequence number.
        uid: UID, when the server included it (always for UID FETCH).
        flags: Flags, when fetched (or pushed after a change).
        rfc822_size: RFC822.SIZE.
        internaldate: INTERNALDATE, timezone-aware.
        envelope: ENVELOPE.
        bodystructure: BODYSTRUCTURE or BODY.
        sections: Fetched body sections, keyed by :func:`section_key` of the
            section text the server sent (``""`` for ``BODY[]``, ``"HEADER"``,
            ``"1.MIME"``, ``"HEADER.FIELDS (FROM TO)"``, with ``"<origin>"`` appended
            for partial fetches); :meth:`section` looks one up by the spelling that
            was requested. ``RFC822``, ``RFC822.HEADER`` and ``RFC822.TEXT`` appear as
            ``""``, ``"HEADER"`` and ``"TEXT"``. Values are ``None`` for NIL and
            ``b""`` for a value the server left out; large ones may be ``bytearray``.
        modseq: MODSEQ (CONDSTORE).
        extra: Items this client does not interpret, by name, raw.
    """

    seq: int
    uid: int | None = None
    flags: tuple[str, ...] | None = None
    rfc822_size: int | None = None
    internaldate: datetime.datetime | None = None
    envelope: Envelope | None = None
    bodystructure: BodyStructure | None = None
    sections: Mapping[str, bytes | bytearray | None] = attrs.field(factory=dict)
    modseq: int | None = None
    extra: Mapping[str, object] = attrs.field(factory=dict)

    @property
    def body(self) -> bytes | bytearray | None:
        """The whole message (``BODY[]`` / ``RFC822``), if fetched."""
        return self.sections.get("")

    def section(self, spec: str) -> bytes | bytearray | None:
        """A fetched section, looked up by the spelling used in the request.

        Args:
            spec: The text between the brackets of the fetch item, with its partial
                suffix if any: ``'HEADER.FIELDS ("Content-Type")'``, ``"1<0.4096>"``.

        Returns:
            The section's bytes; ``None`` if it was not returned or was NIL.
        """
        return self.sections.get(section_key(spec))


Event: TypeAlias = (
    "TaggedResponse | StatusResponse | ContinuationRequest | CapabilityData | EnabledData"
    " | FlagsData | Exists | Recent | Expunge | SearchData | ESearchData | IdData"
    " | FetchData | ListData | UnknownResponse | ConnectionClosed"
)
