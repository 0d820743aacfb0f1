"""Header text decoding: RFC 2047 words, raw 8-bit bytes, Message-IDs, paths.

Theory of operation: the stdlib's header decoding is too strict (it drops
unknown charsets) and mail-parser's too slow, so header text is decoded here.
Adjacent encoded words are joined before decoding so split multi-byte
characters survive; unknown charsets and raw 8-bit bytes decode with
replacement characters instead of being dropped; CR/LF or other controls
hidden in encoded words become spaces, so no decoded value can break a log
line or a reply header. Every function is pure and bounded by
:data:`~prxmail.message._bounds.MAX_HEADER_TEXT_CHARS`. Address headers take one
step more (mail-parser's scanner): see :mod:`prxmail.message._mailparser`.
"""

from __future__ import annotations

import binascii
import re

from prxmail.message._bounds import (
    MAX_HEADER_TEXT_CHARS,
    MAX_MESSAGE_ID_CHARS,
    MAX_REFERENCES_KEPT,
)

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


def _path_address(raw: str) -> str:
    """The address inside a Return-Path/Sender value; "" for the null path."""
    value = _fix_raw_bytes(_UNFOLD.sub("", raw)).strip()
    match = re.search(r"<([^<>]*)>", value)
    inner = match.group(1) if match else value
    return "".join(ch for ch in inner if ch.isprintable() and not ch.isspace())[
        :MAX_HEADER_TEXT_CHARS
    ]
