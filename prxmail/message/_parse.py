"""The message model: one received mail as a frozen value, parsed from raw bytes.

:func:`parse_message` turns the bytes fetched over IMAP into a :class:`Message` that
handlers, the sender policy and reply composition all read. It never trusts the
input: malformed MIME, broken boundaries, unknown or lying charsets, 8-bit bytes in
headers, missing headers and binary garbage all yield a best-effort :class:`Message`
(what went wrong is listed in :attr:`Message.defects`) instead of an exception.

How the work is split:

* `mail-parser <https://pypi.org/project/mail-parser/>`_ parses the MIME tree and
  extracts the text/plain and text/html bodies (it handles charset recovery and
  epilogue rescue for broken boundaries) and the addresses' structure and the date.
* Where it is weak, the stdlib ``email`` package and this module take over: header
  text is decoded here (RFC 2047 encoded words in any charset, adjacent words joined
  before decoding so split multi-byte characters survive, unknown charsets and raw
  8-bit bytes decoded with replacement characters instead of being dropped), CR/LF
  hidden in encoded words is neutralised, and attachments are listed by our own
  bounded walk of the MIME tree so names are deterministic and sanitised and
  oversized content is never decoded.

* Before either sees the bytes, three cheap byte-level passes bound the work that
  hostile input can cause (each described where it is defined): an oversized header
  section is cut down to the fields we read (:data:`MAX_FAST_HEADER_SECTION`), a
  flood of MIME parts is cut (:data:`MAX_BOUNDARY_LINES`), and base64 bodies over the
  attachment limit are replaced by a size marker (:data:`ELIDE_FLOOR_BYTES`) -- a
  50 MB attachment is described exactly without being parsed. Long runs of lines
  the stdlib parser would only copy (a plain body, base64 content) are kept away
  from its line-by-line loop and put back verbatim afterwards (``_parse_tree``).

Parsing is CPU work proportional to the message size; in a trio program use
:func:`parse_message_async`, which runs it in a worker thread.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import functools
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import mailparser  # type: ignore[import-untyped]
import mailparser.const  # type: ignore[import-untyped]
import mailparser.exceptions  # type: ignore[import-untyped]
import mailparser.utils  # type: ignore[import-untyped]
import trio

from prxmail._html import html_to_text

__all__ = [
    "Address",
    "Attachment",
    "Message",
    "decode_header_text",
    "missing_message_id",
    "parse_addresses",
    "parse_message",
    "parse_message_async",
    "parse_message_ids",
    "sanitize_filename",
]

# -- bounds -----------------------------------------------------------------------

# A MIME tree deeper than this is hostile ("multipart bomb"): real mail nests a few
# levels (mixed > alternative > related > forwarded message > ...). Parts below the
# limit are not listed, and the defect is recorded.
MAX_MIME_DEPTH = 32

# Listing attachments costs work per part; a message with ten thousand tiny parts is
# a CPU attack, not correspondence. Parts beyond this are not listed.
MAX_MIME_PARTS = 1000

# Decoded header text (Subject, display names) is cut here. RFC 5322 lines stop at
# 998 octets and real subjects are far shorter; the cap keeps one absurd header from
# ending up in every log line, handler input and reply.
MAX_HEADER_TEXT_CHARS = 4096

# A Message-ID longer than this cannot be a real one and could not be written back
# on one line of our reply's In-Reply-To/References (998 octets per line, RFC 5322
# 2.1.1, and a msg-id cannot be folded). Longer ids are ignored.
MAX_MESSAGE_ID_CHARS = 500

# References kept from an incoming message: the first (thread root) and the most
# recent ones. Threads this long only occur in loops; the bound keeps hostile input
# from making the model (and our replies' headers) large.
MAX_REFERENCES_KEPT = 100

# Authentication-Results headers kept, topmost first. Only the topmost one from the
# configured authserv-id is ever used, and receiving servers add one or two each.
MAX_AUTH_RESULTS = 50

# Attachment file names are cut to this many UTF-8 bytes: the limit of common file
# systems (ext4, NTFS, APFS), so a sanitised name can always be saved as-is.
MAX_FILENAME_BYTES = 255

# The domain of substitute Message-IDs. ".invalid" is reserved (RFC 2606), so a
# substitute can never collide with an id a real mail system generated.
MISSING_ID_DOMAIN = "missing.invalid"


# mail-parser logs a WARNING for every part it does not turn into text ("Email
# content 'octet-stream' not handled"): one line per attachment of every message,
# thousands for a hostile one. Unless the application configured that logger
# itself, only its errors are let through.
_MAILPARSER_LOGGER = logging.getLogger("mailparser")
if _MAILPARSER_LOGGER.level == logging.NOTSET:
    _MAILPARSER_LOGGER.setLevel(logging.ERROR)


# -- the model ----------------------------------------------------------------------


@attrs.frozen
class Address:
    """One mailbox from an address header.

    Attributes:
        addr: The address (``local@domain``) as written, case preserved; ``""`` when
            the header was missing or held no usable mailbox.
        name: The decoded display name, ``""`` when there is none.
    """

    addr: str
    name: str = ""

    @property
    def domain(self) -> str:
        """The lower-cased part after the last ``@``, or ``""`` without one."""
        _, at, domain = self.addr.rpartition("@")
        return domain.lower() if at else ""


@attrs.frozen
class Attachment:
    """An attachment (or inline non-text part) of a message.

    Attributes:
        filename: A sanitised name safe to use as a file name: no directory parts,
            no control or format characters, no leading dots, at most
            :data:`MAX_FILENAME_BYTES` UTF-8 bytes. Parts without a name get
            ``attachment-N`` with an extension from the content type.
        content_type: The lower-cased MIME type, e.g. ``"application/pdf"``.
        size: The decoded size in bytes (estimated from the encoded length when the
            content was over the limit and therefore not decoded).
        content: The decoded bytes, or ``None`` when ``size`` is over the
            ``max_attachment_bytes`` given to :func:`parse_message`.
    """

    filename: str
    content_type: str
    size: int
    content: bytes | None = attrs.field(default=None, repr=False)


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


@attrs.frozen(kw_only=True)
class Message:
    """A received message, decoded and bounded.

    Header-derived text is decoded to ``str`` and never contains CR, LF or other
    control characters. Message-IDs are kept with their angle brackets
    (``"<id@host>"``).

    Attributes:
        uid: The IMAP UID.
        uidvalidity: The UIDVALIDITY of the folder the UID belongs to.
        message_id: The Message-ID; when the message has none (or an unusable one)
            a stable substitute ``"<UIDVALIDITY.UID.prxmail@missing.invalid>"`` that
            is the same every time this mail is parsed.
        message_id_missing: True when :attr:`message_id` is such a substitute.
        from_: The (first) From mailbox; ``Address("")`` when there is none.
        from_all: Every mailbox found in From headers (RFC 5322 allows several;
            the sender policy refuses such mail as ambiguous).
        sender: The Sender address, or ``None``.
        return_path: The Return-Path address the delivering server recorded:
            ``""`` for the null path ``<>`` (a bounce), ``None`` when absent.
        to, cc, reply_to: The mailboxes of those headers.
        subject: The decoded subject, ``""`` when missing.
        date: The Date as an aware datetime in UTC, or ``None`` when missing or
            unparseable.
        in_reply_to: The first Message-ID in In-Reply-To, or ``None``.
        references: The Message-IDs in References, oldest first.
        text: The body as plain text: text/plain parts preferred, otherwise the
            HTML converted to readable text. Lines end in ``"\\n"``. The text of
            attached messages (message/rfc822) follows the main text, as
            mail-parser presents it.
        html: The raw HTML body, or ``None`` when there is none.
        attachments: Attachments and inline non-text parts, in MIME order.
        authentication_results: Raw Authentication-Results values, topmost first.
        auto_submitted: The Auto-Submitted value, or ``None`` when absent.
        precedence: The Precedence value, or ``None``.
        list_id: The List-Id value, or ``None``.
        list_unsubscribe: The List-Unsubscribe value, or ``None``.
        content_type: The lower-cased top-level MIME type.
        size: The size of the raw message in bytes.
        defects: Short names of what was wrong with the input, for logging.
    """

    uid: int = attrs.field(validator=_non_negative)
    uidvalidity: int = attrs.field(validator=_non_negative)
    message_id: str
    message_id_missing: bool = False
    from_: Address = Address("")
    from_all: tuple[Address, ...] = ()
    sender: str | None = None
    return_path: str | None = None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    date: _dt.datetime | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    text: str = attrs.field(default="", repr=False)
    html: str | None = attrs.field(default=None, repr=False)
    attachments: tuple[Attachment, ...] = ()
    authentication_results: tuple[str, ...] = ()
    auto_submitted: str | None = None
    precedence: str | None = None
    list_id: str | None = None
    list_unsubscribe: str | None = None
    content_type: str = "text/plain"
    size: int = 0
    defects: tuple[str, ...] = ()


def missing_message_id(uid: int, uidvalidity: int) -> str:
    """The substitute Message-ID of a message that has none.

    Args:
        uid: The message's IMAP UID.
        uidvalidity: The folder's UIDVALIDITY.

    Returns:
        ``"<UIDVALIDITY.UID.prxmail@missing.invalid>"`` -- stable for the same
        mailbox slot, unique within one folder, never a real mail system's id.
    """
    return f"<{uidvalidity}.{uid}.prxmail@{MISSING_ID_DOMAIN}>"


# -- header text decoding -------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_WHITESPACE_RUN = re.compile(r"\s+")
_UNFOLD = re.compile(r"\r\n|\r|\n")


def _bytes_to_text(data: bytes, charset: str | None = None) -> str:
    """Decode bytes in a declared charset, never raising, never dropping text.

    Unknown or unusable charsets fall back to UTF-8 and then Windows-1252 (the most
    common undeclared 8-bit charset); bytes that fit nowhere become U+FFFD.
    """
    if charset:
        try:
            return data.decode(charset, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _fix_raw_bytes(value: str) -> str:
    """Turn 8-bit header bytes (carried by ``email`` as surrogates) into text."""
    if value.isascii():  # known without a scan: str keeps the flag
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return _bytes_to_text(raw)


def _decode_word_payload(encoding: str, payload: str) -> bytes | None:
    data = payload.encode("ascii", "replace")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    data += b"=" * (-len(data) % 4)
    try:
        decoded = binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        return None
    if payload and not decoded:
        return None  # nothing but invalid characters: not an encoded word
    return decoded


def _decode_encoded_words(value: str) -> str:
    """Decode RFC 2047 encoded words wherever they appear.

    Adjacent words in the same charset are joined *before* decoding, because
    mailers split multi-byte characters across words; white space between two
    encoded words is dropped (RFC 2047 6.2). A word that does not decode stays as
    written.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset: str | None = None

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(_bytes_to_text(bytes(pending), pending_charset))
        pending.clear()
        pending_charset = None

    position = 0
    previous_was_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        if between and not (previous_was_word and not between.strip()):
            flush()
            out.append(between)
        position = match.end()
        charset, encoding, payload = match.groups()
        data = _decode_word_payload(encoding, payload)
        if data is None:
            flush()
            out.append(match.group(0))
            previous_was_word = False
            continue
        charset = charset.lower()
        if pending_charset is not None and charset != pending_charset:
            flush()
        pending_charset = charset
        pending.extend(data)
        previous_was_word = True
    flush()
    out.append(value[position:])
    return "".join(out)


# Unicode categories Cc (C0 and C1 controls), Zl and Zp (one character each), and
# Cs (surrogates), spelled out: a regex is many times faster than asking
# unicodedata about every character (tests check the sets against unicodedata).
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def _clean_text(value: str) -> str:
    """Header text for display: control characters gone, white space collapsed."""
    cleaned = _LINE_BREAKING.sub(" ", _SURROGATE.sub("", value))
    return _WHITESPACE_RUN.sub(" ", cleaned).strip()[:MAX_HEADER_TEXT_CHARS]


def decode_header_text(raw: str) -> str:
    """Decode an unstructured header value (Subject and the like) for display.

    Args:
        raw: The value as stored by the ``email`` package (8-bit bytes carried as
            surrogates, folds still in).

    Returns:
        The decoded text: RFC 2047 words decoded in their charset (replacement
        characters for undecodable bytes), 8-bit bytes read as UTF-8 or
        Windows-1252, folds and any CR/LF/control characters turned into single
        spaces, at most :data:`MAX_HEADER_TEXT_CHARS` characters.
    """
    # Bound the work before decoding: the raw value may be as large as the message.
    unfolded = _UNFOLD.sub("", raw[: MAX_HEADER_TEXT_CHARS * 8])
    return _clean_text(_decode_encoded_words(_fix_raw_bytes(unfolded)))


# -- structured headers ---------------------------------------------------------------

_MSG_ID = re.compile(r"<([^<>]*)>")


_PRINTABLE_ASCII = re.compile(r"[!-~]+")


def _valid_msg_id(inner: str) -> str | None:
    inner = "".join(inner.split())
    if not inner or len(inner) + 2 > MAX_MESSAGE_ID_CHARS:
        return None
    if not _PRINTABLE_ASCII.fullmatch(inner):
        # Only printable ASCII: anything else cannot be written back into our
        # replies' headers safely (and RFC 5322 msg-ids are ASCII).
        return None
    return f"<{inner}>"


def parse_message_ids(raw: str) -> list[str]:
    """Extract Message-IDs from a Message-ID, In-Reply-To or References value.

    Args:
        raw: The header value.

    Returns:
        The ids in order, each ``"<...>"``, invalid ones (non-ASCII, too long,
        empty) skipped. A single bare ``id@host`` without brackets is accepted
        as sloppy mailers write it.
    """
    value = _fix_raw_bytes(_UNFOLD.sub(" ", raw))
    found = [ident for ident in map(_valid_msg_id, _MSG_ID.findall(value)) if ident]
    if not found and "<" not in value:
        words = value.split()
        if len(words) == 1 and "@" in words[0]:
            ident = _valid_msg_id(words[0])
            if ident:
                found.append(ident)
    return found


def _bounded_references(ids: list[str]) -> tuple[str, ...]:
    unique = list(dict.fromkeys(ids))
    if len(unique) > MAX_REFERENCES_KEPT:
        unique = [unique[0], *unique[-(MAX_REFERENCES_KEPT - 1) :]]
    return tuple(unique)


def _clean_addr(addr: str) -> str | None:
    addr = _fix_raw_bytes(addr).strip()
    if not addr or _SPACE_OR_CONTROL.search(addr):
        return None
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr or None


# mail-parser's address scanner is the authority on what an address header
# means: it resists display-name tricks such as '"alice@example.com" <evil@x>'
# and 'alice@example.com@evil' that decide the sender policy. It is also slow
# (about 60 us a header), and nearly every header is one of two plain shapes:
# a bare 'local@domain', or 'Plain Words <local@domain>'. Values that fully
# match the deliberately narrow grammar below -- dot-atoms only, one mailbox, no
# quotes, comments, backslashes, commas or extra '<', '>', '@' -- are read
# directly; the result is the one mail-parser gives (tests/unit/test_message.py
# checks this for generated values), and mail-parser reports no defect for them.
# Everything else goes to mail-parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_FAST_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_ATEXT}+(?:\.{_ATEXT}+)*"
_FAST_BARE = re.compile(rf"[ \t]*({_FAST_ADDR_SPEC})[ \t]*")
# The phrase is then split into words, each checked on its own.
_FAST_NAMED = re.compile(rf"([A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.\t -]*)<({_FAST_ADDR_SPEC})>[ \t]*")
_FAST_ATOM = re.compile(rf"{_ATEXT}+")
# mail-parser decodes a word that this matches; the fast path accepts the
# narrower _FAST_ENCODED_WORD (no RFC 2231 language suffix, no characters the
# address scanner treats as structure) and leaves the others to mail-parser.
_ANY_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_FAST_ENCODED_WORD = re.compile(r"=\?[A-Za-z0-9_-]+\?[bBqQ]\?[A-Za-z0-9!#$%&'*+/=^_`{|}~.-]*\?=")
# RFC 2047 2: an encoded word is at most 75 characters; mail-parser reports a
# longer one as a defect, so such names take its path.
_MAX_ENCODED_WORD = 75


def _fast_word_text(word: str) -> str | None:
    """One encoded word decoded as mail-parser decodes it, or None to decline."""
    try:
        pieces = email.header.decode_header(word)
        decoded: list[str] = []
        for data, charset in pieces:
            if isinstance(data, bytes):
                codec = (charset or "ascii").split("*", 1)[0]
                decoded.append(data.decode("utf-8" if codec == "unknown-8bit" else codec))
            else:
                decoded.append(str(data))
    except Exception:
        return None
    text = "".join(decoded)
    if any((ch < " " and ch != "\t") or "\ud800" <= ch <= "\udfff" for ch in text):
        return None
    return text


def _fast_address_pairs(value: str) -> list[tuple[str, str]] | None:
    """The (name, addr) pairs of a value in the narrow grammar, else None.

    For such a value this equals ``mailparser.utils.get_addresses(value,
    decode_names=True)``, with no defects reported.
    """
    bare = _FAST_BARE.fullmatch(value)
    if bare:
        return [("", bare.group(1))]
    named = _FAST_NAMED.fullmatch(value)
    if named is None:
        return None
    phrase = named.group(1)
    pieces: list[str] = []
    run: list[str] | None = None  # decoded adjacent encoded words, joined
    for word in phrase.split():
        if _ANY_ENCODED_WORD.fullmatch(word):
            if len(word) > _MAX_ENCODED_WORD or not _FAST_ENCODED_WORD.fullmatch(word):
                return None
            text = _fast_word_text(word)
            if text is None:
                return None
            if run is None:
                run = []
                pieces.append("")
            run.append(text)
            pieces[-1] = "".join(run)
        elif _FAST_ATOM.fullmatch(word):
            run = None
            pieces.append(word)
        else:
            return None
    if run is not None and not phrase[-1:].isspace():
        # 'Name=?..?=<a@b>': mail-parser decodes a word only before white space.
        return None
    return [(" ".join(pieces), named.group(2))]


def parse_addresses(values: Iterable[str]) -> tuple[Address, ...]:
    """Parse the mailboxes of one or more address header values.

    Args:
        values: Raw header values (8-bit bytes as surrogates allowed).

    Returns:
        Every mailbox with a usable address, display names decoded. Groups are
        flattened; entries without an address are skipped.
    """
    found: list[Address] = []
    for raw in values:
        text = _fix_raw_bytes(_UNFOLD.sub("", raw[: MAX_HEADER_TEXT_CHARS * 8]))
        try:
            pairs = _fast_address_pairs(text)
            if pairs is None:
                pairs = mailparser.utils.get_addresses(text, decode_names=True)
        except Exception:
            # mail-parser's address scanner gave up: the stdlib's is cruder but
            # does not give up.
            try:
                pairs = email.utils.getaddresses([text])
            except Exception:
                pairs = []
        for name, addr in pairs:
            clean = _clean_addr(str(addr))
            if clean is None:
                continue
            found.append(Address(clean, decode_header_text(str(name))))
    return tuple(found)


def _path_address(raw: str) -> str:
    """The address inside a Return-Path/Sender value; "" for the null path."""
    value = _fix_raw_bytes(_UNFOLD.sub("", raw)).strip()
    match = re.search(r"<([^<>]*)>", value)
    inner = match.group(1) if match else value
    return "".join(ch for ch in inner if ch.isprintable() and not ch.isspace())[
        :MAX_HEADER_TEXT_CHARS
    ]


# -- attachments ----------------------------------------------------------------------

_EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "image/gif": ".gif",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "message/rfc822": ".eml",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "text/html": ".html",
    "text/plain": ".txt",
}
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"}
    | {f"com{i}" for i in range(1, 10)}
    | {f"lpt{i}" for i in range(1, 10)}
)
_FILENAME_FORBIDDEN = str.maketrans(dict.fromkeys('<>:"|?*', "_"))
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def sanitize_filename(name: str | None, *, index: int = 1, content_type: str = "") -> str:
    """Make an attachment's declared name safe to use as a file name.

    Args:
        name: The decoded name from the message (may be hostile), or ``None``.
        index: The attachment's 1-based position, for the fallback name.
        content_type: The part's MIME type, for the fallback name's extension.

    Returns:
        The last path component only (``/`` and ``\\`` both separate), Unicode
        NFC, with control/format characters removed, ``<>:"|?*`` replaced by
        ``_``, white space collapsed, leading dots and spaces and trailing dots
        and spaces removed, Windows device names prefixed with ``_``, and cut to
        :data:`MAX_FILENAME_BYTES` UTF-8 bytes keeping the extension. When
        nothing usable is left: ``"attachment-<index><ext>"``.
    """
    cleaned = ""
    if name:
        text = unicodedata.normalize("NFC", _fix_raw_bytes(name))
        text = text.replace("\\", "/").rsplit("/", 1)[-1]
        text = "".join(
            " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
            for ch in text
            if unicodedata.category(ch) not in ("Cf", "Cs", "Co")
        )
        text = _WHITESPACE_RUN.sub(" ", text.translate(_FILENAME_FORBIDDEN))
        cleaned = text.lstrip(". ").rstrip(". ")
    if not cleaned:
        return f"attachment-{index}{_EXTENSIONS.get(content_type, '.bin')}"
    stem, dot, extension = cleaned.rpartition(".")
    if not dot or len(extension) > 16 or not stem:
        stem, extension = cleaned, ""
    if stem.lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    suffix = f".{extension}" if extension else ""
    budget = MAX_FILENAME_BYTES - len(suffix.encode("utf-8"))
    return _truncate_utf8(stem, budget).rstrip(". ") + suffix


def _part_filename(part: email.message.Message) -> str | None:
    try:
        items = [
            (str(key).lower(), str(value))
            for key, value in part.raw_items()
            if str(key).lower() in ("content-disposition", "content-type")
        ]
        if not any(key == "content-disposition" or "name" in value.lower() for key, value in items):
            return None  # get_filename() reads only a filename or name parameter
        raw = dict(items)
        if any(_fix_raw_bytes(value) != value for value in raw.values()):
            # 8-bit bytes in the parameters: the stdlib would turn them into
            # U+FFFD before we see them, so read the name from repaired copies.
            repaired = email.message.Message()
            for key, value in raw.items():
                repaired[key] = _fix_raw_bytes(value)
            name = repaired.get_filename()
        else:
            name = part.get_filename()
    except Exception:
        return None
    if not name:
        return None
    return decode_header_text(str(name))


def _base64_size(payload: str) -> int:
    """Decoded size of base64 text without decoding it."""
    significant = len(payload) - sum(payload.count(ch) for ch in " \t\r\n")
    tail = payload.rstrip()
    padding = len(tail) - len(tail.rstrip("="))
    return max(significant * 3 // 4 - min(padding, 2), 0)


# Base64 bodies whose decoded size is over both the attachment limit and this
# floor are cut out of the raw bytes before the MIME parser sees them, leaving a
# marker with their size. The stdlib parser holds several copies of what it parses
# (the lines, the joined payload, the decoded text): a 50 MB attachment cost about
# 300 MB and seconds, for content that would be dropped anyway. Below the floor
# the saving is not worth the scan.
ELIDE_FLOOR_BYTES = 64 * 1024

_TEXT_BODY_TYPE = re.compile(rb"(?im)^content-type:[ \t]*text/(?:plain|html)\b")
_BASE64_CTE = re.compile(rb"(?im)^content-transfer-encoding:[ \t]*base64[ \t]*\r?$")
_BASE64_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n \t"
_ELIDED = re.compile(r"^\s*PRXMAILELIDED(\d{1,15})Z\s*$")
# The region is checked in slices so the check never copies more than this.
_ELIDE_CHECK_CHUNK = 1024 * 1024


def _body_end(data: bytes, start: int) -> int:
    """Where a body starting at ``start`` ends: the next boundary-like or blank line."""
    ends = [data.find(marker, start) for marker in (b"\n--", b"\n\r\n", b"\n\n")]
    found = [end + 1 for end in ends if end >= 0]
    return min(found) if found else len(data)


def _only_base64(data: bytes, start: int, end: int) -> bool:
    for offset in range(start, end, _ELIDE_CHECK_CHUNK):
        chunk = data[offset : min(offset + _ELIDE_CHECK_CHUNK, end)]
        if chunk.translate(None, _BASE64_BYTES):
            return False
    return True


def _body_starts(data: bytes) -> Iterator[tuple[int, int]]:
    """(blank line start, body start) of every blank line, by plain byte search.

    A regex for ``\r?\n\r?\n`` would be tried at every offset of a 70 MB
    message; ``bytes.find`` skips ahead in C. The next hit of each spelling is
    cached, so every byte is searched at most twice.
    """
    next_crlf = data.find(b"\n\r\n")
    next_lf = data.find(b"\n\n")
    while next_crlf >= 0 or next_lf >= 0:
        if next_lf < 0 or 0 <= next_crlf < next_lf:
            found, body = next_crlf, next_crlf + 3
            next_crlf = data.find(b"\n\r\n", body)
        else:
            found, body = next_lf, next_lf + 2
            next_lf = data.find(b"\n\n", body)
        yield found, body


_HEADER_LINE = re.compile(rb"^(?:[!-9;-~]+[ \t]*:|[ \t]|--)")
# A part's header block is small; anything longer is body text with a blank line.
_MAX_HEADER_BLOCK = 64 * 1024


def _is_header_block(block: bytes) -> bool:
    if len(block) > _MAX_HEADER_BLOCK:
        return False
    lines = [line for line in block.replace(b"\r\n", b"\n").split(b"\n") if line]
    return all(_HEADER_LINE.match(line) for line in lines)


def _elide_large_base64(data: bytes, max_bytes: int) -> bytes:
    """Replace large base64 (non-text) bodies by a size marker, without copying them."""
    floor = max(max_bytes, ELIDE_FLOOR_BYTES)
    if len(data) <= floor:
        return data
    pieces: list[bytes] = []
    last = 0
    for blank, start in _body_starts(data):
        if start < last:
            continue
        end = _body_end(data, start)
        if end - start <= floor:
            continue
        boundary = data.rfind(b"\n--", last, blank)
        headers = data[boundary + 1 if boundary >= 0 else last : blank + 1]
        if not _is_header_block(headers):
            continue  # a blank line inside a body, not the start of a part's body
        if _TEXT_BODY_TYPE.search(headers) or not _BASE64_CTE.search(headers):
            continue  # text stays (it is delivered whatever its size), and so does non-base64
        if not _only_base64(data, start, end):
            continue
        spaces = sum(data.count(ch, start, end) for ch in (b"\n", b"\r", b" ", b"\t"))
        tail = data[max(start, end - 8) : end].rstrip()
        padding = min(len(tail) - len(tail.rstrip(b"=")), 2)
        size = (end - start - spaces) * 3 // 4 - padding
        if size <= max_bytes:
            continue
        pieces += [data[last:start], b"PRXMAILELIDED%dZ\r\n" % size]
        last = end
    if not pieces:
        return data
    pieces.append(data[last:])
    return b"".join(pieces)


def _leaf_content(part: email.message.Message, max_bytes: int) -> tuple[int, bytes | None]:
    """(size, content) of a non-multipart part, decoding only when within the limit."""
    payload = part.get_payload()
    if isinstance(payload, str):
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        elided = _ELIDED.match(payload) if encoding == "base64" else None
        if elided:
            return int(elided.group(1)), None
        if encoding == "base64" and len(payload) * 3 // 4 > max_bytes:
            # (len * 3 // 4 bounds the decoded size: counting is for larger ones.)
            estimate = _base64_size(payload)
            if estimate > max_bytes:
                return estimate, None
        elif len(payload) > 4 * max_bytes + 1024:
            # quoted-printable shrinks at most by 3x; 7bit/8bit not at all.
            return len(payload), None
    try:
        data = _decoded_payload(part)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        return 0, None
    return len(data), (data if len(data) <= max_bytes else None)


def _stored_payload(part: email.message.Message) -> object:
    # get_payload() would decode 8-bit text; the parser stores it as read, and
    # set_payload(str) stores it back the same way.
    return vars(part).get("_payload")


def _decoded_payload(part: email.message.Message) -> object:
    """``part.get_payload(decode=True)``, with less copying for base64.

    The stdlib splits base64 text into a list of lines and joins them (for a
    20 MB attachment, 260,000 objects and two more copies) before decoding. Its
    decoder (``email._encoded_words.decode_b``) returns ``a2b_base64`` of the
    joined text whenever the length is a multiple of four and that decodes; the
    same call on the text with its line ends deleted gives the same bytes. Other
    cases take the stdlib path. (Decoding defects it would note on the part are
    not noted here: they are read only before this runs, by mail-parser.)
    """
    payload = _stored_payload(part)
    if (
        isinstance(payload, str)
        and payload.isascii()
        and str(part.get("content-transfer-encoding", "")).lower() == "base64"
    ):
        joined = payload.encode("ascii").translate(None, b"\r\n")
        if len(joined) % 4 == 0:
            try:
                return binascii.a2b_base64(joined)
            except binascii.Error:
                pass
    return part.get_payload(decode=True)


def _serialised_message(part: email.message.Message, max_bytes: int) -> tuple[int, bytes | None]:
    """(size, content) of an attached message/*, as its serialised bytes."""
    payload = part.get_payload()
    try:
        if isinstance(payload, list):
            data = b"".join(
                sub.as_bytes(policy=email.policy.compat32)
                for sub in payload
                if isinstance(sub, email.message.Message)
            )
        else:
            return _leaf_content(part, max_bytes)
    except Exception:
        return 0, None
    return len(data), (data if len(data) <= max_bytes else None)


def _content_type(part: email.message.Message) -> str:
    try:
        value = part.get_content_type().lower()
    except Exception:
        return "application/octet-stream"
    return value if _MIME_TYPE.match(value) else "application/octet-stream"


def _list_attachments(
    root: email.message.Message, max_bytes: int, defects: set[str]
) -> tuple[Attachment, ...]:
    found: list[Attachment] = []
    stack: list[tuple[email.message.Message, int]] = [(root, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_MIME_PARTS:
            defects.add("too-many-parts")
            break
        content_type = _content_type(part)
        try:
            disposition = part.get_content_disposition()
        except Exception:
            disposition = None
        filename = _part_filename(part)
        named_or_attached = disposition == "attachment" or filename is not None
        if part.is_multipart():
            if content_type.startswith("message/") and (named_or_attached or depth == 0):
                pass  # an attached message is one attachment, not more parts
            elif content_type.startswith("message/") and content_type != "message/rfc822":
                # delivery-status and friends: header blocks, not content.
                pass
            else:
                if depth >= MAX_MIME_DEPTH:
                    defects.add("mime-too-deep")
                    continue
                children = part.get_payload()
                if isinstance(children, list):
                    stack.extend(
                        (child, depth + 1)
                        for child in reversed(children)
                        if isinstance(child, email.message.Message)
                    )
                continue
            if depth == 0:
                continue
            size, content = _serialised_message(part, max_bytes)
        else:
            is_body = content_type in ("text/plain", "text/html") and not named_or_attached
            if is_body or content_type.startswith("multipart/"):
                # A multipart whose boundary was never found is one unparsed blob;
                # its text is shown as the body, it is not an attachment.
                continue
            size, content = _leaf_content(part, max_bytes)
        found.append(
            Attachment(
                filename=sanitize_filename(
                    filename, index=len(found) + 1, content_type=content_type
                ),
                content_type=content_type,
                size=size,
                content=content,
            )
        )
    return tuple(found)


# -- feeding the stdlib parser less -------------------------------------------------
#
# The stdlib parser handles its input line by line in Python, about 1.5 us a line:
# the 2,600 base64 lines of a 200 KB attachment cost 4 ms, most of the parse. Yet
# it only ever passes some runs of lines through verbatim into a payload (or a
# preamble or epilogue), so each such run is replaced by one marker line before
# parsing and put back, verbatim, where its marker ended up. The tree is then the
# one the full parse builds. Two kinds of run qualify:
#
# * The whole body of a message whose top-level type is not multipart/* or
#   message/*: the parser makes all input after the header section the root's
#   payload, whatever it holds. A marker found anywhere but there (the header
#   section ended elsewhere, or the type was multipart after all) means the
#   message is parsed again in full.
# * A run of lines made only of base64 characters: such a line holds no ':', no
#   leading space or '-', and is not empty, so it is never a header, a
#   continuation, a boundary or a separator; in every state the parser reads it
#   as content, exactly as it reads the marker line.
#
# A marker is used only when the input does not already contain the marker text,
# and every marker must be found exactly once, or the message is parsed in full.

_RUN_MARKER = "PRXMAILRUN"
_RUN_MARKER_FOUND = re.compile(_RUN_MARKER + r"(\d+)Z")
# Shorter runs are not worth a marker (each line saved is about 1.5 us).
_MIN_MARKED_RUN_BYTES = 2048
_RUN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_MAYBE_COMPOSITE = re.compile(rb"(?i)multipart|message/")


def _is_inert_run(data: bytes, start: int, end: int) -> bool:
    if end - start < _MIN_MARKED_RUN_BYTES:
        return False
    # Only base64 characters and line ends, and no empty line as the parser
    # splits lines (at CRLF, CR or LF): that would be a separator. The run
    # starts at a line start, so an empty first line shows too. The check goes
    # by slices of about _ELIDE_CHECK_CHUNK, each ending after an LF, to bound
    # the copies and lists without splitting a line end between two slices.
    offset = start
    while offset < end:
        cut = data.find(b"\n", min(offset + _ELIDE_CHECK_CHUNK, end), end)
        stop = end if cut < 0 else cut + 1
        chunk = data[offset:stop]
        if chunk.translate(None, _RUN_BYTES) or not all(chunk.splitlines()):
            return False
        offset = stop
    return True


def _base64_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the bodies made only of base64 lines, as described above.

    Each stretch between two boundary-like lines ("\n--") is one part: its
    body starts after its first blank line and ends before the blank lines
    preceding the next boundary-like line.
    """
    position = 0
    while position < len(data):
        following = data.find(b"\n--", position)
        stop = len(data) if following < 0 else following + 1
        crlf = data.find(b"\n\r\n", position, stop)
        lf = data.find(b"\n\n", position, stop if crlf < 0 else crlf)
        blanks = [(i, 3) for i in (crlf,) if i >= 0] + [(i, 2) for i in (lf,) if i >= 0]
        if blanks:
            blank, length = min(blanks)
            start, end = blank + length, stop
            while end > start and data[end - 1] in b"\r\n":
                end -= 1
            if _is_inert_run(data, start, end):
                yield start, end
        position = stop + 2  # past "--": a boundary line holds no blank line


def _mark_runs(data: bytes) -> tuple[bytes, dict[str, str], str | None]:
    """Replace the runs described above by marker lines.

    Returns:
        The marked input, each marker's original text, and the marker of the
        whole-body run (None when the body was not marked as a whole).
    """
    if len(data) < _MIN_MARKED_RUN_BYTES or _RUN_MARKER.encode() in data:
        return data, {}, None
    end = _header_section_end(data)
    if 0 < end < len(data) and not _MAYBE_COMPOSITE.search(data, 0, end):
        body = end + (2 if data.startswith(b"\r\n", end) else 1)
        if len(data) - body >= _MIN_MARKED_RUN_BYTES:
            marker = f"{_RUN_MARKER}0Z"
            text = data[body:].decode("ascii", "surrogateescape")
            return data[:body] + marker.encode(), {marker: text}, marker
    pieces: list[bytes] = []
    runs: dict[str, str] = {}
    last = 0
    for start, stop in _base64_runs(data):
        marker = f"{_RUN_MARKER}{len(runs)}Z"
        runs[marker] = data[start:stop].decode("ascii")
        pieces += [data[last:start], marker.encode()]
        last = stop
    if not runs:
        return data, {}, None
    pieces.append(data[last:])
    return b"".join(pieces), runs, None


def _restore_runs(
    root: email.message.Message, runs: dict[str, str], whole_body: str | None
) -> bool:
    """Put the marked runs back; False when one was not found exactly once."""
    if whole_body is not None:
        payload = _stored_payload(root)
        if (
            root.get_content_maintype() in ("multipart", "message")
            or not isinstance(payload, str)
            or payload.count(whole_body) != 1
            or len(_RUN_MARKER_FOUND.findall(payload)) != 1
        ):
            return False
        root.set_payload(payload.replace(whole_body, runs[whole_body]))
        return True
    pending = dict(runs)

    def put_back(match: re.Match[str]) -> str:
        text = pending.pop(match.group(0), None)
        if text is None:
            raise LookupError(match.group(0))  # a marker seen twice
        return text

    try:
        for part in root.walk():
            payload = _stored_payload(part)
            if isinstance(payload, str) and _RUN_MARKER in payload:
                part.set_payload(_RUN_MARKER_FOUND.sub(put_back, payload))
            for name in ("preamble", "epilogue"):
                value = getattr(part, name)
                if isinstance(value, str) and _RUN_MARKER in value:
                    setattr(part, name, _RUN_MARKER_FOUND.sub(put_back, value))
    except LookupError:
        return False
    return not pending


def _parse_tree(data: bytes) -> email.message.Message:
    """``email.message_from_bytes(data)``, without walking long runs line by line."""
    try:
        marked, runs, whole_body = _mark_runs(data)
    except Exception:  # never expected; the full parse is always right
        marked, runs, whole_body = data, {}, None
    if runs:
        root = email.message_from_bytes(marked)
        try:
            restored = _restore_runs(root, runs, whole_body)
        except Exception:
            restored = False
        if restored:
            return root
    return email.message_from_bytes(data)


# -- the parser -----------------------------------------------------------------------

# mail-parser exposes one header's addresses through these names; its _reset()
# runs the address scanner on every value of them.
_MAILPARSER_ADDRESS_HEADERS = frozenset(mailparser.const.ADDRESSES_HEADERS)


class _MailParser(mailparser.MailParser):  # type: ignore[misc]
    """``mailparser.MailParser`` without the work :func:`parse_message` never reads.

    Private methods of mail-parser are overridden (``_make_mail``,
    ``_build_header_index``, ``_reset``) and private attributes set
    (``_mail``, ``_header_index``, ``_address_headers``); results are unchanged,
    and tests/unit/test_message.py fails if a new mail-parser release stops
    calling them (the speed-up would be lost) or if results differ from the
    plain class.

    * ``parse()`` ends by building ``.mail`` and ``.mail_partial``, two dicts of
      every header with their addresses parsed again: about a sixth of a small
      message's parse. Here they are built when first read.
    * ``_reset()`` runs the address scanner on every value of every address
      header, for ``.mail`` and for its defect list. Values in the fast grammar
      (see :func:`_fast_address_pairs`) give the same pairs and no defect, so
      they are hidden from that loop and their pairs filled in after it.
    """

    _mail: dict[str, Any] | None
    _mail_partial: dict[str, Any] | None

    def _build_header_index(self) -> dict[str, list[Any]]:
        index: dict[str, list[Any]] = super()._build_header_index()
        self._fast_addresses: dict[str, tuple[list[Any], list[tuple[str, str]]]] = {}
        for header in _MAILPARSER_ADDRESS_HEADERS & index.keys():
            values = index[header]
            pairs = [_fast_address_pairs(v) if isinstance(v, str) else None for v in values]
            first = pairs[0]
            if first is not None and None not in pairs:
                self._fast_addresses[header] = (values, first)
                del index[header]
        return index

    def _reset(self) -> None:
        self._fast_addresses = {}
        super()._reset()
        for header, (values, first) in self._fast_addresses.items():
            self._header_index[header] = values
            self._address_headers[header] = first

    def _make_mail(self, complete: bool = True) -> None:
        return None  # built by the properties below when first read

    @property
    def mail(self) -> dict[str, Any]:
        """All headers and parts as a dict, as ``MailParser.mail``."""
        if self._mail is None:
            self._mail = mailparser.MailParser._make_mail(self)
        return self._mail

    @property
    def mail_partial(self) -> dict[str, Any]:
        """The main headers and parts as a dict, as ``MailParser.mail_partial``."""
        if self._mail_partial is None:
            self._mail_partial = mailparser.MailParser._make_mail(self, complete=False)
        return self._mail_partial


def _normalise_newlines(text: str) -> str:
    # NUL is never text, and it truncates strings in the C programs handlers use.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    return _fix_raw_bytes(text)


_WANTED_HEADERS = frozenset(
    {
        "authentication-results",
        "auto-submitted",
        "cc",
        "date",
        "from",
        "in-reply-to",
        "list-id",
        "list-unsubscribe",
        "message-id",
        "precedence",
        "references",
        "reply-to",
        "return-path",
        "sender",
        "subject",
        "to",
    }
)
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "reply-to", "sender"})

# A header section up to this size is parsed as it is. mail-parser decodes every
# field (superlinearly in the number of encoded words: a 1 MB subject took 28 s)
# and parses every Received field (50,000 of them took 12 s), so a larger section
# -- only ever seen in hostile mail -- is first cut down to the fields we read,
# each at most MAX_RAW_FIELD_BYTES long.
MAX_FAST_HEADER_SECTION = 32 * 1024
MAX_RAW_FIELD_BYTES = 8 * 1024
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def _mail_parser(data: bytes) -> _MailParser:
    """What ``mailparser.MailParser.from_bytes(data)`` gives, with the tree of
    :func:`_parse_tree`.

    Raises:
        MailParserRecursionError: The MIME tree nests too deeply to walk (as
            mail-parser's own constructors raise it).
    """
    try:
        return _MailParser(_parse_tree(data))
    except RecursionError as exc:
        raise mailparser.exceptions.MailParserRecursionError(
            "Message nesting too deep to parse"
        ) from exc


def _header_section_end(data: bytes) -> int:
    """Offset of the blank line ending the header section (len(data) if none)."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    # The second search stops where the first hit: a message with CRLF line ends
    # has no "\n\n", and looking for one would read all of it.
    crlf = data.find(b"\n\r\n")
    lf = data.find(b"\n\n", 0, len(data) if crlf < 0 else crlf)
    found = [i + 1 for i in (crlf, lf) if i >= 0]
    return min(found) if found else len(data)


def _cut_field(name: str, field: bytes) -> bytes | None:
    if len(field) <= MAX_RAW_FIELD_BYTES:
        return field
    head = field[:MAX_RAW_FIELD_BYTES]
    if name in _ADDRESS_HEADERS:
        # Never cut inside an address: "boss@example.com.evil.example" cut short
        # would be a different, valid address.
        comma = head.rfind(b",")
        return head[:comma] + b"\r\n" if comma > 0 else None
    space = max(head.rfind(b" "), head.rfind(b"\t"))
    return (head[:space] if space > 0 else head) + b"\r\n"


def _bound_header_section(data: bytes) -> tuple[bytes, bool]:
    """Cut an oversized header section down to the fields we use (see above)."""
    end = _header_section_end(data)
    if end <= MAX_FAST_HEADER_SECTION:
        return data, False
    kept: list[bytes] = []
    name = ""
    field: list[bytes] = []

    def flush() -> None:
        if field and (
            name in _WANTED_HEADERS or name.startswith("content-") or name == "mime-version"
        ):
            cut = _cut_field(name, b"".join(field))
            if cut is not None:
                kept.append(cut)
        field.clear()

    position = 0
    while position < end:
        newline = data.find(b"\n", position, end)
        line_end = end if newline < 0 else newline + 1
        line = data[position:line_end]
        if line[:1] in (b" ", b"\t") and field:
            if sum(map(len, field)) <= MAX_RAW_FIELD_BYTES:
                field.append(line)
        else:
            match = _FIELD_NAME.match(line)
            if match is None:
                break  # not a header line: the body starts here, as the parser will see it
            flush()
            name = match.group(1).decode("ascii").lower()
            field.append(line)
        position = line_end
    flush()
    return b"".join(kept) + data[position:], True


# mail-parser walks and decodes every MIME part (about 0.6 ms each); 10,000 tiny
# parts took 6 s. A message with more boundary-like lines ("\n--") than this is
# cut before the next one: real mail has a few dozen, and text that happens to
# start many lines with "--" only loses its tail beyond this many.
MAX_BOUNDARY_LINES = 2 * MAX_MIME_PARTS


def _bound_part_count(data: bytes) -> tuple[bytes, bool]:
    if data.count(b"\n--") <= MAX_BOUNDARY_LINES:
        return data, False
    position = -1
    for _ in range(MAX_BOUNDARY_LINES + 1):
        position = data.find(b"\n--", position + 1)
    return data[: position + 1], True


def _header_index(msg: email.message.Message) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        key = str(name).strip().lower()
        if key in _WANTED_HEADERS:
            index.setdefault(key, []).append(str(value))
    return index


def _first_text(index: dict[str, list[str]], name: str) -> str | None:
    values = index.get(name)
    if not values:
        return None
    return decode_header_text(values[0])


def _parse_date(raw: str | None, fallback: _dt.datetime | None) -> _dt.datetime | None:
    parsed: _dt.datetime | None = None
    if raw:
        try:
            parsed = email.utils.parsedate_to_datetime(_fix_raw_bytes(raw))
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed = None
    if parsed is None:
        parsed = fallback
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.UTC)
    return parsed.astimezone(_dt.UTC)


def _check_arguments(raw: object, uid: int, uidvalidity: int, max_attachment_bytes: int) -> None:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError(f"raw must be bytes, got {type(raw).__name__}")
    for label, number in (
        ("uid", uid),
        ("uidvalidity", uidvalidity),
        ("max_attachment_bytes", max_attachment_bytes),
    ):
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {number!r}")


def parse_message(raw: bytes, *, uid: int, uidvalidity: int, max_attachment_bytes: int) -> Message:
    """Parse one raw RFC 5322 message into a :class:`Message`.

    Runs in the calling thread and takes time proportional to the message size;
    from trio code call :func:`parse_message_async` instead.

    Args:
        raw: The message exactly as fetched (``BODY.PEEK[]``).
        uid: Its IMAP UID.
        uidvalidity: The UIDVALIDITY of its folder (for the substitute Message-ID).
        max_attachment_bytes: Attachments whose decoded size is above this keep
            their name, type and size but have ``content=None``; their encoded
            text is never decoded.

    Returns:
        The message. Malformed input never raises: it yields a best-effort
        message whose :attr:`Message.defects` says what was wrong (for example
        ``"body-unparsed"`` when the MIME structure could not be walked at all,
        then ``text`` is empty but the headers are still read).

    Raises:
        TypeError: ``raw`` is not bytes.
        ValueError: ``uid``, ``uidvalidity`` or ``max_attachment_bytes`` is
            negative or not an integer.
    """
    _check_arguments(raw, uid, uidvalidity, max_attachment_bytes)
    size = len(raw)
    data, trimmed = _bound_header_section(bytes(raw))
    data, cut = _bound_part_count(data)
    data = _elide_large_base64(data, max_attachment_bytes)
    defects: set[str] = set()
    if trimmed:
        defects.add("header-section-trimmed")
    if cut:
        defects.add("too-many-parts")
    plain: list[str] = []
    html_parts: list[str] = []
    unmanaged: list[str] = []
    root: email.message.Message | None = None
    lenient_date: _dt.datetime | None = None
    try:
        parsed = _mail_parser(data)
    except MemoryError:
        raise
    except Exception as exc:
        # The MIME tree could not be walked (a nesting bomb raises
        # MailParserRecursionError): keep the headers, give up on the body.
        defects.add("body-unparsed")
        defects.add(type(exc).__name__)
    else:
        root = parsed.message
        plain = [str(p) for p in parsed.text_plain]
        html_parts = [str(p) for p in parsed.text_html]
        unmanaged = [str(p) for p in parsed.text_not_managed]
        defects.update(str(d) for d in parsed.defects_categories)
        if isinstance(parsed.date, _dt.datetime):
            # mail-parser reads many broken date formats the stdlib refuses.
            lenient_date = parsed.date

    if root is None:
        try:
            root = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        except Exception:
            root = email.message.Message()
            defects.add("headers-unparsed")

    index = _header_index(root)

    ids = parse_message_ids(index["message-id"][0]) if index.get("message-id") else []
    message_id = ids[0] if ids else missing_message_id(uid, uidvalidity)

    from_all = parse_addresses(index.get("from", []))
    if not from_all:
        defects.add("no-from")
    in_reply_to_ids = parse_message_ids(" ".join(index.get("in-reply-to", [])))
    references = parse_message_ids(" ".join(index.get("references", [])))

    return_path: str | None = None
    if index.get("return-path"):
        return_path = _path_address(index["return-path"][0])
    sender: str | None = None
    if index.get("sender"):
        senders = parse_addresses(index["sender"][:1])
        sender = senders[0].addr if senders else _path_address(index["sender"][0])

    html = "\n".join(html_parts) if html_parts else None
    if plain:
        text = "\n\n".join(_normalise_newlines(p).strip("\n") for p in plain)
    elif html is not None:
        text = html_to_text(html)
    elif (
        unmanaged
        and not root.is_multipart()
        and _content_type(root).split("/")[0] in ("multipart", "text")
    ):
        # A broken multipart (boundary never found) or a text/* body other than
        # plain/html ends up here as one blob: showing it raw beats showing
        # nothing. Parts of an intact multipart are never shown this way (they
        # may be decoded binaries).
        text = "\n\n".join(_normalise_newlines(p).strip("\n") for p in unmanaged)
    else:
        text = ""
    if html is not None:
        html = _normalise_newlines(html)

    if "body-unparsed" in defects:
        attachments: tuple[Attachment, ...] = ()
    else:
        try:
            attachments = _list_attachments(root, max_attachment_bytes, defects)
        except RecursionError:
            attachments = ()
            defects.add("mime-too-deep")

    return Message(
        uid=uid,
        uidvalidity=uidvalidity,
        message_id=message_id,
        message_id_missing=not ids,
        from_=from_all[0] if from_all else Address(""),
        from_all=from_all,
        sender=sender,
        return_path=return_path,
        to=parse_addresses(index.get("to", [])),
        cc=parse_addresses(index.get("cc", [])),
        reply_to=parse_addresses(index.get("reply-to", [])),
        subject=_first_text(index, "subject") or "",
        date=_parse_date(index["date"][0] if index.get("date") else None, lenient_date),
        in_reply_to=in_reply_to_ids[0] if in_reply_to_ids else None,
        references=_bounded_references(references),
        text=text,
        html=html,
        attachments=attachments,
        authentication_results=tuple(
            decode_header_text(v) for v in index.get("authentication-results", [])
        )[:MAX_AUTH_RESULTS],
        auto_submitted=_first_text(index, "auto-submitted"),
        precedence=_first_text(index, "precedence"),
        list_id=_first_text(index, "list-id"),
        list_unsubscribe=_first_text(index, "list-unsubscribe"),
        content_type=_content_type(root),
        size=size,
        defects=tuple(sorted(defects)),
    )


async def parse_message_async(
    raw: bytes,
    *,
    uid: int,
    uidvalidity: int,
    max_attachment_bytes: int,
    limiter: trio.CapacityLimiter | None = None,
) -> Message:
    """:func:`parse_message` in a worker thread, so the event loop keeps running.

    Parsing cannot be interrupted: if the calling scope is cancelled, the call
    still waits for the thread to finish (a parse is bounded by the message size)
    and then raises ``trio.Cancelled``.

    Args:
        raw: The message exactly as fetched.
        uid: Its IMAP UID.
        uidvalidity: The UIDVALIDITY of its folder.
        max_attachment_bytes: See :func:`parse_message`.
        limiter: Bounds how many parses run at once (each holds a decoded copy of
            its message in memory); trio's default thread limiter when ``None``.

    Returns:
        The parsed message.

    Raises:
        TypeError, ValueError: As :func:`parse_message`.
    """
    work = functools.partial(
        parse_message,
        raw,
        uid=uid,
        uidvalidity=uidvalidity,
        max_attachment_bytes=max_attachment_bytes,
    )
    return await trio.to_thread.run_sync(work, limiter=limiter)
