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
  A message of one plain text part in a narrow grammar (``._simple``) skips the
  stdlib parser and mail-parser's walk altogether; its tree is built directly.

Parsing is CPU work proportional to the message size; a trio program runs it in
a worker thread (the channel does: see :mod:`prxmail.channel._fetch`).

Theory of operation of this module: :func:`parse_message` only assembles. The
byte-level bounds (:mod:`._bounds`) run first, then the speed layer builds the
stdlib tree (:mod:`._speed`), mail-parser reads the bodies behind its fence
(:mod:`._mailparser`), and headers (:mod:`._headers`), addresses and attachments
(:mod:`._attachments`) are read from the tree into a :class:`~._model.Message`.
"""

from __future__ import annotations

import datetime as _dt
import email.message
import email.parser
import email.policy
import email.utils
import functools

from prxmail._html import html_to_text
from prxmail.message._attachments import _content_type, _list_attachments
from prxmail.message._bounds import (
    _WANTED_HEADERS,
    MAX_AUTH_RESULTS,
    _bound_header_section,
    _bound_part_count,
    _elide_large_base64,
    new_elision_token,
)
from prxmail.message._headers import (
    _bounded_references,
    _fix_raw_bytes,
    _path_address,
    decode_header_text,
    parse_message_ids,
)
from prxmail.message._mailparser import parse_addresses, read_mail, read_simple_mail
from prxmail.message._model import Address, Attachment, Message, missing_message_id
from prxmail.message._simple import simple_tree
from prxmail.message._speed import _parse_tree


def _normalise_newlines(text: str) -> str:
    # NUL is never text, and it truncates strings in the C programs handlers use.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    return _fix_raw_bytes(text)


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
    from trio code run it in a worker thread (``trio.to_thread.run_sync``) unless
    the message is known to be small and plain.

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
    # Per parse: only markers this parse wrote are read back as sizes.
    token = new_elision_token()
    data = _elide_large_base64(data, max_attachment_bytes, token)
    defects: set[str] = set()
    if trimmed:
        defects.add("header-section-trimmed")
    if cut:
        defects.add("too-many-parts")
    plain: tuple[str, ...] = ()
    html_parts: tuple[str, ...] = ()
    unmanaged: tuple[str, ...] = ()
    root: email.message.Message | None = None
    lenient_date: _dt.datetime | None = None
    # One text/plain part in the narrow grammar of ._simple: its tree is built
    # directly; everything else takes the stdlib parser (see ._speed).
    simple = simple_tree(data)
    if simple is not None:
        parts = read_simple_mail(simple)
    else:
        parts = read_mail(functools.partial(_parse_tree, data))
    if parts is None:
        # The MIME tree could not be walked (a nesting bomb) or mail-parser gave
        # up: keep the headers, give up on the body, under one stable name.
        defects.add("body-unparsed")
    else:
        root = parts.tree
        plain, html_parts, unmanaged = parts.plain, parts.html, parts.unmanaged
        defects.update(parts.defects)
        lenient_date = parts.date

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

    if "body-unparsed" in defects or (simple is not None and root is simple):
        # The one-part grammar admits no file name, disposition or Content-ID:
        # its one text/plain part is the body, never an attachment.
        attachments: tuple[Attachment, ...] = ()
    else:
        try:
            attachments = _list_attachments(root, max_attachment_bytes, defects, token)
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
