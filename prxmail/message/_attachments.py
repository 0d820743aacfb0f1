"""Listing attachments: a bounded walk of the MIME tree that decodes only what fits.

Theory of operation: the walk is iterative (no recursion on hostile nesting),
stops at :data:`~prxmail.message._bounds.MAX_MIME_DEPTH` and
:data:`~prxmail.message._bounds.MAX_MIME_PARTS`, and records each cut as a
defect. A part's size comes from its encoded length (or the elision marker
:mod:`prxmail.message._bounds` left) whenever that already shows it is over the
attachment limit, so oversized content is never decoded. Text bodies are not
attachments; an attached message is one attachment, not more parts.
"""

from __future__ import annotations

import email.message
import email.policy
import re

from prxmail.message._bounds import MAX_MIME_DEPTH, MAX_MIME_PARTS, elided_size
from prxmail.message._filenames import _part_filename, sanitize_filename
from prxmail.message._mailparser import decoded_payload
from prxmail.message._model import Attachment

_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")


def _base64_size(payload: str) -> int:
    """Decoded size of base64 text without decoding it."""
    significant = len(payload) - sum(payload.count(ch) for ch in " \t\r\n")
    tail = payload.rstrip()
    padding = len(tail) - len(tail.rstrip("="))
    return max(significant * 3 // 4 - min(padding, 2), 0)


def _leaf_content(
    part: email.message.Message, max_bytes: int, token: str
) -> tuple[int, bytes | None]:
    """(size, content) of a non-multipart part, decoding only when within the limit;
    ``token`` is this parse's elision-marker token."""
    payload = part.get_payload()
    if isinstance(payload, str):
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        elided = elided_size(payload, token) if encoding == "base64" else None
        if elided is not None:
            return elided, None
        if encoding == "base64" and len(payload) * 3 // 4 > max_bytes:
            # (len * 3 // 4 bounds the decoded size: counting is for larger ones.)
            estimate = _base64_size(payload)
            if estimate > max_bytes:
                return estimate, None
        elif len(payload) > 4 * max_bytes + 1024:
            # quoted-printable shrinks at most by 3x; 7bit/8bit not at all.
            return len(payload), None
    try:
        data = decoded_payload(part)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        return 0, None
    return len(data), (data if len(data) <= max_bytes else None)


def _serialised_message(
    part: email.message.Message, max_bytes: int, token: str
) -> tuple[int, bytes | None]:
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
            return _leaf_content(part, max_bytes, token)
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
    root: email.message.Message, max_bytes: int, defects: set[str], token: str
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
            size, content = _serialised_message(part, max_bytes, token)
        else:
            is_body = content_type in ("text/plain", "text/html") and not named_or_attached
            if is_body or content_type.startswith("multipart/"):
                # A multipart whose boundary was never found is one unparsed blob;
                # its text is shown as the body, it is not an attachment.
                continue
            size, content = _leaf_content(part, max_bytes, token)
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
