"""Bounds on the work hostile input can cause, applied to the raw bytes first.

Theory of operation: every limit of the message model is a named constant here,
and three cheap byte-level passes run before any parser sees the bytes, each
cutting away what only hostile mail holds -- an oversized header section is cut
down to the fields we read (:data:`MAX_FAST_HEADER_SECTION`), a flood of MIME parts
is cut (:data:`MAX_BOUNDARY_LINES`), and base64 bodies over the attachment limit
are replaced by a size marker (:data:`ELIDE_FLOOR_BYTES`), so a 50 MB attachment is
described exactly without being parsed. Nothing here imports a parser.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

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
# The marker carries a random token made for each parse (ELISION_TOKEN_BYTES), and is
# honoured only with that token: a sender who writes "PRXMAILELIDED999999999Z" as a
# base64 body must not make it report a 999,999,999-byte attachment.
_ELIDED = re.compile(r"^\s*PRXMAILELIDED([0-9a-f]{32})(\d{1,15})Z\s*$")
# 16 random bytes (32 hex digits): unguessable, and short next to any body it replaces.
ELISION_TOKEN_BYTES = 16
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


def new_elision_token() -> str:
    """A fresh token for one parse's elision markers (see :data:`_ELIDED`).

    Returns:
        :data:`ELISION_TOKEN_BYTES` random bytes as lower-case hex.
    """
    return secrets.token_hex(ELISION_TOKEN_BYTES)


def elided_size(payload: str, token: str) -> int | None:
    """The size recorded by this parse's marker, when ``payload`` is one.

    Args:
        payload: A base64 part's payload as the MIME parser saw it.
        token: The token :func:`_elide_large_base64` wrote in this parse.

    Returns:
        The decoded size the marker stands for, or ``None`` when the payload is not
        a marker of this parse (a forged one is an ordinary, tiny payload).
    """
    match = _ELIDED.match(payload)
    if match is None or not secrets.compare_digest(match.group(1), token):
        return None
    return int(match.group(2))


def _elide_large_base64(data: bytes, max_bytes: int, token: str) -> bytes:
    """Replace large base64 (non-text) bodies by a size marker carrying ``token``,
    without copying them."""
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
        pieces += [data[last:start], b"PRXMAILELIDED%s%dZ\r\n" % (token.encode(), size)]
        last = end
    if not pieces:
        return data
    pieces.append(data[last:])
    return b"".join(pieces)
