"""Composing outgoing mail: threaded replies and fresh messages, as SMTP-ready bytes.

Everything that goes into a header -- the parent's subject, display names, the
configured subject -- comes from outside and is treated as hostile: control
characters (CR and LF above all) become spaces and ``=?`` is broken up before any
of it is written, and the serialised header section is checked again afterwards
to hold exactly the fields we set. The handler's output only ever becomes the
body: a body that starts with ``"Bcc: x"`` is body text, because the header
section is closed before it is written.

The header section is written here, not by the stdlib ``email`` package: the
fields and the shape of each value are known, and the header registry's
parse-then-refold cost milliseconds per reply (see ``_HeaderWriter``). The old
EmailMessage-based writer is kept in the tests as the reference the output is
held to.

Encoding: headers use RFC 2047 encoded words for non-ASCII text (raw UTF-8 only when
an address itself is non-ASCII, which needs SMTPUTF8 anyway -- see
:attr:`OutgoingMessage.smtputf8`); the UTF-8 body is ``7bit`` when it is plain
short-lined ASCII, otherwise quoted-printable or base64, whichever is shorter, so
the message never needs 8BITMIME. Lines end in CRLF. The bytes are *not*
dot-stuffed: that is the SMTP client's job when it sends DATA.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import email.utils
import re
import secrets
import unicodedata
import urllib.parse
from collections.abc import Sequence

import attrs

from prxmail.errors import LocalProtocolError
from prxmail.message import MAX_MESSAGE_ID_CHARS, Address, Message, sanitize_filename

__all__ = [
    "MAX_OUTGOING_ATTACHMENTS",
    "OutgoingAttachment",
    "OutgoingMessage",
    "compose_message",
    "compose_reply",
    "make_message_id",
    "reply_subject",
    "thread_references",
]

# References we write: the thread's first id and the most recent ones. RFC 5322
# 3.6.4 lets a writer trim the list; keeping the root and the recent tail is what
# threading clients need, and 20 ids (~1.2 KB) is well within any server's header
# limits while covering any thread a person follows.
MAX_REFERENCES = 20

# A subject longer than this is cut. RFC 5322 recommends lines of 78 characters;
# subjects fold over several lines, but past a few hundred characters a subject is
# junk (or an attack on someone's mail client) and we do not repeat it.
MAX_SUBJECT_CHARS = 500

# Display names longer than this are cut, for the same reason.
MAX_DISPLAY_NAME_CHARS = 200

# Attachments one message may carry. Mail with more parts than this is not
# correspondence; the bound keeps a runaway handler from building a message that
# every receiving server refuses anyway (many cap MIME parts in the low hundreds).
MAX_OUTGOING_ATTACHMENTS = 100

# A MIME type we write: type "/" subtype, RFC 2045 tokens limited to what real
# registrations use (RFC 6838 4.2 restricted-name characters), lower-cased, and
# at most this long (RFC 6838 caps each half at 127 characters).
_MAX_CONTENT_TYPE_CHARS = 255
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}\Z")
# A file name written as a plain quoted-string parameter: printable ASCII without
# quote, backslash, "%" (RFC 2231 readers may take it for an escape) and never
# shaped like an encoded word. Anything else is written RFC 2231-encoded.
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9 !#$&'()+,\-.;=@\[\]^_`{}~]+\Z")
# Longer plain names are written RFC 2231-encoded too, whose continuations fold:
# 'filename="' + 60 characters + '"' keeps the line within _FOLD_AT octets.
_MAX_PLAIN_FILENAME = 60
# RFC 2231 continuation chunks: at most this many characters of percent-encoded
# value per parameter line, so each folded line (" filename*0*=utf-8''" + chunk
# + ";", 71 octets) stays under _FOLD_AT.
_RFC2231_CHUNK = 50
# UTF-8 bytes per encoded word of a Content-Type name (see _encoded_word_name).
_NAME_WORD_BYTES = 42
# Characters RFC 2231 attribute-char lets stand for themselves.
_RFC2231_SAFE = "!#$&+-.^_`|~"

# Lines of a 7bit body at most this long (RFC 5322 2.1.1 "SHOULD" limit); longer
# lines make us choose quoted-printable, which wraps them.
_SEVEN_BIT_LINE = 78

# Reply prefixes in common languages, with counters ("Re[2]:", "Re(3):") and the
# full-width colon of CJK mailers. Forward markers (Fwd:) are kept on purpose.
_REPLY_PREFIX = re.compile(
    r"^(?:\s*(?:re|aw|sv|antw|antwort|vs|odp|res|ynt|回复|答复|回覆)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a])+\s*",
    re.IGNORECASE,
)
_WHITESPACE_RUN = re.compile(r"\s+")
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ADDR_SPEC = re.compile(r"^[^\s@<>()\[\],;:\\\"]+@[^\s@<>()\[\],;:\\\"]+$")
# Non-empty atoms joined by single dots; the characters are already limited by
# _ADDR_SPEC.
_DOT_ATOM = re.compile(r"[^.]+(?:\.[^.]+)*\Z")
# "<" + printable ASCII but "<" and ">" + ">": an id we can write back.
_ID_TEXT = re.compile(r"<[!-;=?-~]+>\Z")
_LOOKS_ENCODED = re.compile(r"=\?[^?]*\?[A-Za-z]\?.*\?=")

# A display name written as it is: atext words (RFC 5322 3.2.3) separated by single
# spaces; with SMTPUTF8, non-ASCII characters count as atext (RFC 6532 3.2).
_ASCII_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+\Z")
_UTF8_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ \x80-\U0010ffff]+\Z")

# 7bit bodies: printable ASCII and tabs only (with the line-length limit below).
_NOT_SEVEN_BIT = re.compile(r"[^\t\n -~]")
# The bytes quoted-printable writes as they are (for the encoding choice).
_QP_PLAIN = bytes(byte for byte in range(256) if 32 <= byte < 127 or byte in (9, 10))

# Header lines are folded to at most this many octets wherever a word boundary
# allows (RFC 5322 2.1.1 SHOULD); words longer than a line are encoded words
# (text) or addresses and ids, bounded far below the 998-octet MUST.
_FOLD_AT = 78
# RFC 2047 section 2: an encoded word is at most 75 characters.
_MAX_ENCODED_WORD = 75
_ENCODED_WORD_OVERHEAD = len("=?utf-8?q??=")
# Less room than this left on a line starts a new line for an encoded word; it
# holds one 4-byte character in either encoding (12 + 12 for "q").
_MIN_ENCODED_WORD = 24
# RFC 2047 5(3): in "Q" encoded words of a phrase only letters, digits and
# "!*+-/" stand for themselves and "_" stands for a space; the same (safe for
# unstructured text too) is used everywhere.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_TEXT = [
    chr(byte) if byte in _Q_SAFE else "_" if byte == 0x20 else f"={byte:02X}" for byte in range(256)
]
_Q_COST = [len(text) for text in _Q_TEXT]


def _check_content_type(instance: object, attribute: object, value: str) -> None:
    if (
        not isinstance(value, str)
        or len(value) > _MAX_CONTENT_TYPE_CHARS
        or not _CONTENT_TYPE.match(value)
    ):
        raise ValueError(f"content_type {value!r} is not a valid type/subtype MIME type")
    if value.startswith(("multipart/", "message/")):
        # Composite types would let attachment bytes be read as MIME structure
        # (more parts, more headers) by the recipient's client.
        raise ValueError(f"content_type {value!r}: composite types cannot be attached")


def _lower(value: str) -> str:
    return value.strip().lower() if isinstance(value, str) else value


@attrs.frozen
class OutgoingAttachment:
    """A file to attach to an outgoing message.

    Attributes:
        filename: The name shown to the recipient. It is passed through
            :func:`prxmail.message.sanitize_filename` when written (no directory
            parts, no control characters), so it can never add a header or a
            parameter.
        content_type: ``type/subtype``, lower-cased on construction; composite
            types (``multipart/*``, ``message/*``) are refused.
        content: The bytes; always sent base64-encoded.

    Raises:
        ValueError: ``content_type`` is not a valid simple MIME type.
        TypeError: ``content`` is not bytes.
    """

    filename: str
    content_type: str = attrs.field(converter=_lower, validator=_check_content_type)
    content: bytes = attrs.field(repr=False, validator=attrs.validators.instance_of(bytes))


@attrs.frozen
class OutgoingMessage:
    """A composed message, ready to be stored in the outbox and sent.

    Attributes:
        message_id: Its Message-ID, ``"<...@our.domain>"``.
        to: The recipients (header To and envelope).
        subject: The subject as written (before encoding).
        in_reply_to: The parent's Message-ID, or None for fresh mail.
        references: The References chain written, oldest first.
        raw: The complete message, CRLF line ends, not dot-stuffed.
        envelope_sender: The SMTP ``MAIL FROM`` address (``""`` = null path).
        envelope_recipients: The SMTP ``RCPT TO`` addresses.
        smtputf8: True when an address is non-ASCII, so the SMTP server must offer
            SMTPUTF8 (RFC 6531) for this message.
    """

    message_id: str
    to: tuple[Address, ...]
    subject: str
    in_reply_to: str | None
    references: tuple[str, ...]
    raw: bytes = attrs.field(repr=False)
    envelope_sender: str
    envelope_recipients: tuple[str, ...]
    smtputf8: bool = False


# -- helpers ------------------------------------------------------------------------


def _header_text(value: str, limit: int) -> str:
    """Text safe for a header: no control/format characters, single spaces, bounded.

    The stdlib parser (which every reader of our mail may use) *decodes* RFC 2047
    encoded words wherever it finds them, even inside quoted strings. Text reaching
    here is already decoded, so any ``=?`` left is literal: it is broken up so it
    can never be taken for an encoded word.
    """
    # str.isprintable() is False for every character of the categories handled
    # below (Cc, Cf, Cs, Zl, Zp), so printable text skips the per-character scan.
    if value.isprintable():
        cleaned = value
    elif value.isascii():
        # In ASCII, only Cc exists of those categories.
        cleaned = _ASCII_CONTROL.sub(" ", value)
    else:
        cleaned = "".join(
            " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
            for ch in value
            if unicodedata.category(ch) not in ("Cs", "Cf")
        )
    cleaned = _WHITESPACE_RUN.sub(" ", cleaned).strip()[:limit].strip()
    while "=?" in cleaned:
        cleaned = cleaned.replace("=?", "= ?")
    return cleaned


def _check_address(addr: str, what: str) -> str:
    addr = addr.strip()
    if not _ADDR_SPEC.match(addr) or len(addr) > 254:
        raise LocalProtocolError(f"{what} {addr!r} is not a plain user@domain address")
    # After _ADDR_SPEC (no whitespace, so no " "), isprintable() is False exactly
    # when a character is of a category C* or Z*.
    if not addr.isprintable():
        raise LocalProtocolError(f"{what} {addr!r} contains control or space characters")
    return addr


def _ascii_domain(addr: str) -> str:
    domain = addr.rpartition("@")[2].rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise LocalProtocolError(f"cannot use the domain of {addr!r} in a Message-ID") from exc


def _valid_id(message_id: str) -> bool:
    return (
        len(message_id) <= MAX_MESSAGE_ID_CHARS
        and _ID_TEXT.match(message_id) is not None
        # Would be decoded as an encoded word by the stdlib (see _header_text).
        and "=?" not in message_id
    )


def make_message_id(from_address: str) -> str:
    """A fresh Message-ID on the domain of ``from_address``.

    128 random bits from :mod:`secrets`, so ids never collide across processes,
    hosts or restarts (``email.utils.make_msgid`` uses 64 bits of a non-secret
    PRNG plus the time and pid).

    Args:
        from_address: Our address; its domain (IDNA-encoded) becomes the id's right
            side.

    Returns:
        ``"<32 hex digits@domain>"``.

    Raises:
        LocalProtocolError: ``from_address`` is not a plain address.
    """
    domain = _ascii_domain(_check_address(from_address, "from_address"))
    return f"<{secrets.token_hex(16)}@{domain}>"


def reply_subject(subject: str, default_subject: str) -> str:
    """The subject of a reply: ``"Re: "`` once, in front of the original.

    Any chain of reply prefixes (``Re:``, ``RE:``, ``Aw:``, ``Sv:``, ``Antw:``,
    ``Re[2]:``, ``Re(3):``, ``回复`` with a full-width colon ..., in any case and
    with any spacing) is removed first, so the result never reads
    ``"Re: Re: ..."``. Control characters become spaces.

    Args:
        subject: The parent's subject.
        default_subject: Used (without ``"Re: "``) when the parent has no subject.

    Returns:
        The subject, at most :data:`MAX_SUBJECT_CHARS` characters.
    """
    text = _header_text(subject, MAX_SUBJECT_CHARS * 2)
    stripped = _REPLY_PREFIX.sub("", text, count=1).strip()
    if not stripped:
        return _header_text(default_subject, MAX_SUBJECT_CHARS)
    return _header_text("Re: " + stripped, MAX_SUBJECT_CHARS)


def thread_references(parent: Message) -> tuple[str, ...]:
    """The References of a reply to ``parent`` (RFC 5322 section 3.6.4).

    The parent's References (or, without them, its In-Reply-To) followed by the
    parent's Message-ID; duplicates and ids unusable on the wire dropped; when
    longer than :data:`MAX_REFERENCES`, the first (thread root) and the most recent
    ones are kept. A substitute Message-ID (the parent had none) is not written:
    no other mail system knows it.

    Args:
        parent: The message being answered.

    Returns:
        The ids, oldest first.
    """
    base = list(parent.references)
    if not base and parent.in_reply_to:
        base = [parent.in_reply_to]
    if not parent.message_id_missing:
        base = [ident for ident in base if ident != parent.message_id]
        base.append(parent.message_id)
    chain = [ident for ident in dict.fromkeys(base) if _valid_id(ident)]
    if len(chain) > MAX_REFERENCES:
        chain = [chain[0], *chain[-(MAX_REFERENCES - 1) :]]
    return tuple(chain)


def _choose_cte(body: str) -> str:
    # The figures are those of the stdlib encoders: quoted-printable writes a byte
    # outside _QP_PLAIN as "=XX", base64 4 characters per 3 bytes.
    if (
        body.isascii()
        and not _NOT_SEVEN_BIT.search(body)
        and max(map(len, body.split("\n"))) <= _SEVEN_BIT_LINE
    ):
        return "7bit"
    data = body.encode("utf-8")
    escaped = len(data.translate(None, _QP_PLAIN))
    quoted_length = len(data) + 2 * escaped
    base64_length = 4 * ((len(data) + 2) // 3)
    return "quoted-printable" if quoted_length <= base64_length else "base64"


def _normalise_body(body: str) -> str:
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    # Lone surrogates (a handler decoding bytes with surrogateescape) cannot be
    # encoded; they become "?" rather than an exception at send time.
    body = body.encode("utf-8", "replace").decode("utf-8")
    if not body.endswith("\n"):
        body += "\n"
    return body


def _encode_body(text: str, cte: str) -> bytes:
    """The body in ``cte``, CRLF line ends; ``text`` is normalised (LF, final LF)."""
    if cte == "7bit":
        return text.replace("\n", "\r\n").encode("ascii")
    data = text.encode("utf-8")
    if cte == "quoted-printable":
        # istext: LF stays a line break (not "=0A"); lines of at most 76 characters
        # with "=" soft breaks; trailing spaces and tabs, "=", controls and 8-bit
        # bytes are escaped (RFC 2045 6.7).
        encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    else:
        encoded = base64.encodebytes(data)  # lines of 76 characters
    return encoded.replace(b"\n", b"\r\n")


def _mailbox(address: Address, what: str) -> tuple[str, str]:
    """(display name, addr-spec) of ``address``, both safe to write as they are."""
    addr = _check_address(address.addr, what)
    local, _, domain = addr.rpartition("@")
    # RFC 5322 3.4.1: both sides are dot-atoms (the characters _ADDR_SPEC lets
    # through are atext, or UTF-8 under RFC 6532); anything else would need
    # quoting that no recipient address worth answering uses. Something shaped
    # like an encoded word is refused because lenient parsers (the stdlib's among
    # them) decode encoded words even inside an address.
    if not (_DOT_ATOM.match(local) and _DOT_ATOM.match(domain)) or _LOOKS_ENCODED.search(addr):
        raise LocalProtocolError(f"{what} {addr!r} cannot be written in a header")
    return _header_text(address.name, MAX_DISPLAY_NAME_CHARS), addr


def _verify_header_section(raw: bytes, expected: set[str]) -> None:
    """Defence in depth: the header section holds exactly the fields we set."""
    head, separator, _ = raw.partition(b"\r\n\r\n")
    if not separator:
        raise LocalProtocolError("composed message has no header/body separator")
    seen: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or len(line) > 998:
            raise LocalProtocolError("composed header line is malformed or too long")
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if not colon:
            raise LocalProtocolError("composed header section contains a non-header line")
        seen.append(name.decode("ascii", "replace").lower())
    if sorted(seen) != sorted(expected):
        raise LocalProtocolError(f"composed header fields {seen} differ from those set")


# -- the header writer -------------------------------------------------------------
#
# Theory of operation: every field we write is one of a fixed set whose value we
# build from parts we have already made safe (ids checked by _valid_id, addresses
# by _mailbox, text by _header_text: no control characters, single spaces, no
# "=?"). A value is a sequence of words; _HeaderWriter puts them on lines of at
# most _FOLD_AT octets, folding (CRLF + space) only between words, where RFC 5322
# allows folding whitespace. Text that cannot go out as it is -- non-ASCII without
# SMTPUTF8, or a word too long for one line -- becomes RFC 2047 encoded words,
# cut to fit the room left on the line; adjacent encoded words are joined by
# decoders without the whitespace between them, so a run of such words (spaces
# included) is encoded as one text. Nothing is folded right after the colon of a
# text or id field (readers keep that whitespace as part of the value). A line
# longer than _FOLD_AT can only hold an address (at most 254 octets) or an id
# (MAX_MESSAGE_ID_CHARS): both far below the 998-octet limit, which
# _verify_header_section checks again on the bytes.


class _HeaderWriter:
    __slots__ = ("_line", "_parts", "utf8")

    def __init__(self, *, utf8: bool) -> None:
        self._parts: list[str] = []
        # Octets on the current line; 0 on a fresh continuation line, where a
        # word goes whatever its size (there is no better place for it).
        self._line = 0
        self.utf8 = utf8

    def field(self, name: str) -> None:
        if self._parts:
            self._parts.append("\r\n")
        self._parts.append(name + ":")
        self._line = len(name) + 1

    def first_id(self, ident: str) -> None:
        """An id right after the colon, however long: never folded away from it.

        Readers that take the field body as text (the stdlib's among them) keep
        a fold after the colon as a leading space of the id; an id is at most
        MAX_MESSAGE_ID_CHARS, so the line stays within 998 octets.
        """
        self._parts.append(" " + ident)
        self._line += 1 + len(ident)

    def word(self, token: str) -> None:
        size = len(token) if token.isascii() else len(token.encode("utf-8"))
        if self._line and self._line + 1 + size > _FOLD_AT:
            self._parts.append("\r\n")
            self._line = 0
        self._parts.append(" " + token)
        self._line += 1 + size

    def words(self, tokens: Sequence[str]) -> None:
        for token in tokens:
            self.word(token)

    def encoded(self, text: str) -> None:
        """``text`` as encoded words, as many as it takes."""
        start = 0
        while start < len(text):
            room = _FOLD_AT - self._line - 1
            if room < _MIN_ENCODED_WORD and self._line:
                room = _FOLD_AT - 1
            start = self._encoded_word(text, start, min(room, _MAX_ENCODED_WORD))

    def _encoded_word(self, text: str, start: int, room: int) -> int:
        """Write the longest encoded word of ``text[start:]`` of ``room`` characters.

        A word that cannot hold the rest of the text ends after a space when it
        can: decoders that (wrongly, like the stdlib's in a display name) keep the
        whitespace between encoded words then show at worst a doubled space, not
        a space inside a word.
        """
        q_length = b_length = 0
        end = start
        at_space = (start, 0, 0)  # (end, q_length, b_length) after the last space
        while end < len(text):
            code = ord(text[end])
            if code < 0x80:
                q_next, b_next = q_length + _Q_COST[code], b_length + 1
            else:
                octets = 2 if code < 0x800 else 3 if code < 0x10000 else 4
                q_next, b_next = q_length + 3 * octets, b_length + octets
            if _ENCODED_WORD_OVERHEAD + min(q_next, 4 * ((b_next + 2) // 3)) > room:
                if at_space[0] > start:
                    end, q_length, b_length = at_space
                break
            q_length, b_length = q_next, b_next
            end += 1
            if code == 0x20:
                at_space = (end, q_length, b_length)
        # room >= _MIN_ENCODED_WORD holds one character of any size; kept as a
        # guard so that the loop in encoded() always advances.
        end = max(end, start + 1)
        data = text[start:end].encode("utf-8")
        if q_length <= 4 * ((b_length + 2) // 3):
            self.word("=?utf-8?q?" + "".join([_Q_TEXT[byte] for byte in data]) + "?=")
        else:
            self.word("=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?=")
        return end

    def text(self, value: str) -> None:
        """Unstructured text (RFC 5322 3.2.5), from :func:`_header_text`.

        The first word stays on the field's own line: a fold right after the
        colon is whitespace that readers keep at the start of the text. A first
        word too long for that line is encoded, which can be cut to fit.
        """
        if value.isascii() and self._line + 1 + len(value) <= _FOLD_AT:
            self.words(value.split(" "))
            return
        run: list[str] = []  # consecutive words to be encoded together
        first_line = self._line
        for index, token in enumerate(value.split(" ")):
            size = len(token) if token.isascii() else len(token.encode("utf-8"))
            fits = index or first_line + 1 + size <= _FOLD_AT
            if fits and size < _FOLD_AT and (token.isascii() or self.utf8):
                if run:
                    self.encoded(" ".join(run))
                    run = []
                self.word(token)
            else:
                run.append(token)
        if run:
            self.encoded(" ".join(run))

    def mailboxes(self, boxes: Sequence[tuple[str, str]]) -> None:
        """An address list: ``name <addr>`` or ``addr``, comma-separated."""
        for index, (name, addr) in enumerate(boxes):
            comma = "," if index < len(boxes) - 1 else ""
            if not name:
                self.word(addr + comma)
                continue
            ascii_name = name.isascii()
            if ascii_name or self.utf8:
                atoms = _ASCII_PHRASE if ascii_name else _UTF8_PHRASE
                quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
                if atoms.match(name) and all(
                    len(word.encode("utf-8")) < _FOLD_AT for word in name.split(" ")
                ):
                    self.words(name.split(" "))
                elif len(quoted.encode("utf-8")) < _FOLD_AT:
                    self.word(quoted)
                else:
                    self.encoded(name)
            else:
                self.encoded(name)
            self.word(f"<{addr}>{comma}")

    def header_section(self) -> str:
        return "".join(self._parts) + "\r\n\r\n"


# -- MIME parts (html, attachments) -----------------------------------------------
#
# Only used when a message has an HTML alternative or attachments; a text-only
# message is the single text/plain part it always was, byte for byte. Part headers
# are written here from values made safe beforehand (a validated MIME type, a
# sanitised file name, encodings we chose), so nothing from the caller reaches them
# unchecked; each part's content is 7bit, quoted-printable or base64, so the
# message stays 7-bit clean.


def _text_part(text: str, subtype: str) -> bytes:
    """A text/``subtype`` UTF-8 part: headers, blank line, encoded content."""
    normalised = _normalise_body(text)
    cte = _choose_cte(normalised)
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return head.encode("ascii") + _encode_body(normalised, cte)


def _rfc2231_lines(name: str, value: str) -> list[str]:
    """``name*0*=utf-8''...`` parameters (RFC 2231 sections 3 and 4), one per line."""
    encoded = urllib.parse.quote(value.encode("utf-8"), safe=_RFC2231_SAFE)
    chunks: list[str] = []
    while encoded:
        cut = min(_RFC2231_CHUNK, len(encoded))
        # Never split a "%XX" escape between two continuations.
        percent = encoded.rfind("%", max(cut - 2, 0), cut)
        if percent != -1 and cut < len(encoded):
            cut = percent
        chunks.append(encoded[:cut])
        encoded = encoded[cut:]
    if len(chunks) == 1:
        return [f"{name}*=utf-8''{chunks[0]}"]
    charset = "utf-8''"
    return [
        f"{name}*{index}*={charset if index == 0 else ''}{chunk}"
        for index, chunk in enumerate(chunks)
    ]


def _encoded_word_name(value: str) -> str:
    """``value`` as RFC 2047 base64 encoded words inside one quoted string.

    Not allowed by RFC 2047 (5) inside a parameter, but what Outlook, Gmail and
    Thunderbird write and read in ``Content-Type; name=``; readers that know RFC
    2231 use ``filename*`` from Content-Disposition instead.
    """
    words: list[str] = []
    chunk = ""
    for ch in value:
        # 42 bytes encode to 56 base64 characters: 68 with the "=?utf-8?b??=",
        # 76 with ' name="' and the closing quote, within _FOLD_AT.
        if len((chunk + ch).encode("utf-8")) > _NAME_WORD_BYTES:
            words.append(chunk)
            chunk = ""
        chunk += ch
    words.append(chunk)
    encoded = [
        f"=?utf-8?b?{base64.b64encode(word.encode('utf-8')).decode('ascii')}?=" for word in words
    ]
    return '"' + "\r\n ".join(encoded) + '"'


def _attachment_part(attachment: OutgoingAttachment, index: int) -> bytes:
    """An attachment part: validated type, sanitised name, base64 content."""
    filename = sanitize_filename(
        attachment.filename, index=index, content_type=attachment.content_type
    )
    if (
        len(filename) <= _MAX_PLAIN_FILENAME
        and _PLAIN_FILENAME.match(filename)
        and "=?" not in filename
    ):
        type_name = f'name="{filename}"'
        disposition = [f'filename="{filename}"']
    else:
        type_name = f"name={_encoded_word_name(filename)}"
        disposition = _rfc2231_lines("filename", filename)
    head = (
        f"Content-Type: {attachment.content_type};\r\n {type_name}\r\n"
        "Content-Disposition: attachment;\r\n "
        + ";\r\n ".join(disposition)
        + "\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    content = base64.encodebytes(attachment.content).replace(b"\n", b"\r\n")
    return head.encode("ascii") + content


def _make_boundary(parts: Sequence[bytes]) -> str:
    """A random boundary found in none of ``parts`` (RFC 2046 5.1.1).

    128 random bits make a collision practically impossible; the check makes it
    impossible, whatever a 7bit text part contains.
    """
    while True:
        boundary = "=_prxmail_" + secrets.token_hex(16)
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary


def _multipart(subtype: str, parts: Sequence[bytes]) -> tuple[tuple[str, str], bytes]:
    """(Content-Type words, body) of a multipart/``subtype`` holding ``parts``."""
    boundary = _make_boundary(parts)
    delimiter = f"--{boundary}\r\n".encode("ascii")
    # The CRLF in front of a delimiter belongs to the delimiter (RFC 2046 5.1.1),
    # so each part gets one more: its own last line end stays part of its content.
    body = b"".join(delimiter + part + b"\r\n" for part in parts)
    body += f"--{boundary}--\r\n".encode("ascii")
    return (f"multipart/{subtype};", f'boundary="{boundary}"'), body


def _multipart_body(
    text: str, html: str | None, attachments: Sequence[OutgoingAttachment]
) -> tuple[tuple[str, str], bytes]:
    """(Content-Type words, body) for a message with an HTML part or attachments.

    The text comes first in multipart/alternative (RFC 2046 5.1.4: the last part
    is the preferred one, so clients that can show HTML show the HTML), and the
    message part comes first in multipart/mixed, before the attachments.
    """
    main = _text_part(text, "plain")
    if html is not None:
        words, alternative = _multipart("alternative", [main, _text_part(html, "html")])
        if not attachments:
            return words, alternative
        main = f"Content-Type: {words[0]}\r\n {words[1]}\r\n\r\n".encode("ascii") + alternative
    parts = [main]
    parts.extend(
        _attachment_part(attachment, index) for index, attachment in enumerate(attachments, start=1)
    )
    return _multipart("mixed", parts)


# -- composition ----------------------------------------------------------------------


def compose_message(
    *,
    from_address: str,
    to: Address | Sequence[Address],
    subject: str,
    body: str,
    default_subject: str = "",
    from_name: str = "",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str | None = "auto-generated",
    envelope_sender: str | None = None,
    now: _dt.datetime | None = None,
    html: str | None = None,
    attachments: Sequence[OutgoingAttachment] = (),
) -> OutgoingMessage:
    """Compose a message: text/plain UTF-8, with an HTML alternative and attachments.

    Without ``html`` and ``attachments`` the message is a single text/plain part.
    With ``html`` the text and the HTML form a multipart/alternative (text first);
    with attachments the message is multipart/mixed, the text (or the alternative)
    first and each attachment base64-encoded after it.

    Args:
        from_address: Our address, written as From.
        to: The recipient(s).
        subject: The subject (control characters become spaces).
        body: The text; becomes the body and nothing else, whatever it contains.
        default_subject: Used when ``subject`` is empty.
        from_name: Display name for From, may be empty.
        message_id: A pre-allocated Message-ID (``"<...>"``, e.g. stored in the
            outbox before sending); a fresh one from :func:`make_message_id` when
            None.
        in_reply_to: Parent Message-ID for threading, or None.
        references: References chain to write (ids invalid on the wire dropped).
        auto_submitted: The Auto-Submitted value (RFC 3834): ``"auto-generated"``
            for mail an automaton sends on its own, ``"auto-replied"`` for replies,
            None to leave the header out.
        envelope_sender: SMTP MAIL FROM; ``from_address`` when None, ``""`` for
            the null reverse-path.
        now: The Date, an aware datetime; the current time when None.
        html: An HTML version of ``body``, or None. Sent as it is (only line
            ends normalised); it is content, never headers.
        attachments: Files to attach, at most :data:`MAX_OUTGOING_ATTACHMENTS`.

    Returns:
        The composed message.

    Raises:
        LocalProtocolError: An address is not a plain ``user@domain`` (a
            dot-atom on each side, nothing shaped like an encoded word), the
            message id is malformed, there are too many attachments, or the
            result would not be a clean message.
        ValueError: ``now`` is a naive datetime.
        TypeError: An attachment is not an :class:`OutgoingAttachment`.
    """
    attachments = tuple(attachments)
    if len(attachments) > MAX_OUTGOING_ATTACHMENTS:
        raise LocalProtocolError(
            f"{len(attachments)} attachments; at most {MAX_OUTGOING_ATTACHMENTS} are sent"
        )
    if not all(isinstance(item, OutgoingAttachment) for item in attachments):
        raise TypeError("attachments must be OutgoingAttachment instances")
    if html is not None and not isinstance(html, str):
        raise TypeError("html must be a string or None")
    recipients = (to,) if isinstance(to, Address) else tuple(to)
    if not recipients:
        raise LocalProtocolError("a message needs at least one recipient")
    if now is None:
        now = _dt.datetime.now(_dt.UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    sender_box = _mailbox(Address(from_address, from_name), "from_address")
    to_boxes = [_mailbox(r, "recipient") for r in recipients]
    if message_id is None:
        message_id = make_message_id(from_address)
    elif not _valid_id(message_id):
        raise LocalProtocolError(f"message_id {message_id!r} is not a valid <id@domain>")
    if in_reply_to is not None and not _valid_id(in_reply_to):
        in_reply_to = None
    chain = tuple(ident for ident in dict.fromkeys(references) if _valid_id(ident))
    envelope = from_address.strip() if envelope_sender is None else envelope_sender.strip()
    if envelope:
        _check_address(envelope, "envelope_sender")

    smtputf8 = (
        not all(addr.isascii() for _, addr in (sender_box, *to_boxes)) or not envelope.isascii()
    )
    final_subject = _header_text(subject, MAX_SUBJECT_CHARS) or _header_text(
        default_subject, MAX_SUBJECT_CHARS
    )

    writer = _HeaderWriter(utf8=smtputf8)
    writer.field("From")
    writer.mailboxes([sender_box])
    writer.field("To")
    writer.mailboxes(to_boxes)
    writer.field("Date")
    writer.text(email.utils.format_datetime(now))
    writer.field("Message-ID")
    writer.first_id(message_id)
    expected = {"from", "to", "date", "message-id"}
    if final_subject:
        writer.field("Subject")
        writer.text(final_subject)
        expected.add("subject")
    if in_reply_to is not None:
        writer.field("In-Reply-To")
        writer.first_id(in_reply_to)
        expected.add("in-reply-to")
    if chain:
        writer.field("References")
        writer.first_id(chain[0])
        writer.words(chain[1:])
        expected.add("references")
    if auto_submitted is not None:
        writer.field("Auto-Submitted")
        writer.text(_header_text(auto_submitted, 100))
        expected.add("auto-submitted")
    if html is None and not attachments:
        text = _normalise_body(body)
        cte = _choose_cte(text)
        writer.field("Content-Type")
        writer.words(("text/plain;", 'charset="utf-8"'))
        writer.field("Content-Transfer-Encoding")
        writer.word(cte)
        content = _encode_body(text, cte)
        expected.update({"content-type", "content-transfer-encoding"})
    else:
        # A multipart needs no Content-Transfer-Encoding: its parts are all
        # 7-bit clean, and the default (7bit) is then the truth (RFC 2045 6.4).
        content_type, content = _multipart_body(body, html, attachments)
        writer.field("Content-Type")
        writer.words(content_type)
        expected.add("content-type")
    writer.field("MIME-Version")
    writer.word("1.0")
    expected.add("mime-version")

    try:
        head = writer.header_section().encode("utf-8" if smtputf8 else "ascii")
    except UnicodeEncodeError as exc:  # a non-ASCII header without SMTPUTF8: a bug
        raise LocalProtocolError("composed header section is not ASCII") from exc
    raw = head + content
    _verify_header_section(raw, expected)
    return OutgoingMessage(
        message_id=message_id,
        to=recipients,
        subject=final_subject,
        in_reply_to=in_reply_to,
        references=chain,
        raw=raw,
        envelope_sender=envelope,
        envelope_recipients=tuple(addr for _, addr in to_boxes),
        smtputf8=smtputf8,
    )


def compose_reply(
    parent: Message,
    body: str,
    *,
    from_address: str,
    to: Address,
    default_subject: str,
    from_name: str = "",
    message_id: str | None = None,
    envelope_sender: str | None = None,
    now: _dt.datetime | None = None,
    html: str | None = None,
    attachments: Sequence[OutgoingAttachment] = (),
    subject: str | None = None,
) -> OutgoingMessage:
    """Compose the threaded reply to ``parent``.

    Subject ``"Re: "`` + the parent's subject without doubling prefixes
    (:func:`reply_subject`; ``default_subject`` when the parent has none);
    In-Reply-To the parent's Message-ID; References per
    :func:`thread_references`; a fresh Message-ID on our domain; Date; From;
    ``Auto-Submitted: auto-replied``; MIME-Version and a UTF-8 text/plain body.

    Args:
        parent: The message being answered.
        body: The handler's answer; it can never add or change headers.
        from_address: Our address.
        to: The recipient, usually from
            :func:`prxmail.policy.choose_reply_recipient`.
        default_subject: Subject used when the parent has none.
        from_name: Display name for From.
        message_id: A pre-allocated Message-ID, or None for a fresh one.
        envelope_sender: SMTP MAIL FROM; ``from_address`` when None.
        now: The Date (aware); the current time when None.
        html: An HTML version of ``body`` (see :func:`compose_message`).
        attachments: Files to attach (see :func:`compose_message`).
        subject: A subject for the reply, honoured only when the parent has none
            (a thread keeps its subject); ``default_subject`` otherwise.

    Returns:
        The composed reply.

    Raises:
        LocalProtocolError: An address or the message id cannot be written safely.
        ValueError: ``now`` is naive.
        TypeError: An attachment is not an :class:`OutgoingAttachment`.
    """
    in_reply_to = None if parent.message_id_missing else parent.message_id
    fallback = default_subject
    if subject is not None and not _header_text(parent.subject, MAX_SUBJECT_CHARS):
        fallback = subject if _header_text(subject, MAX_SUBJECT_CHARS) else default_subject
    return compose_message(
        from_address=from_address,
        to=to,
        subject=reply_subject(parent.subject, fallback),
        body=body,
        default_subject=default_subject,
        from_name=from_name,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=thread_references(parent),
        auto_submitted="auto-replied",
        envelope_sender=envelope_sender,
        now=now,
        html=html,
        attachments=attachments,
    )
