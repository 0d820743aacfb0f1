"""Messages over ``max_message_bytes``: deliver their text without loading them whole.

Theory of operation: for a message whose RFC822.SIZE is over the limit, the service
fetches its BODYSTRUCTURE (already known from the size probe), its header section and
only the body parts that carry readable text (``text/plain`` and ``text/html`` parts
that are not attachments, each cut at the limit). :func:`text_sections` picks those
parts and their IMAP section numbers; :func:`build_substitute` glues header and parts
into a small, well-formed ``multipart/mixed`` message that the ordinary parser reads;
:func:`describe_attachments` lists every other part by name, type and estimated size
from the BODYSTRUCTURE alone. Nothing here does I/O or imports trio.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import attrs

from prxmail.imap import BodyPart, BodyStructure, MultipartBody
from prxmail.message import MAX_MIME_PARTS, Attachment, sanitize_filename

__all__ = [
    "OVERSIZE_DEFECT",
    "TextSection",
    "build_substitute",
    "describe_attachments",
    "text_sections",
]

# The defect name added to a message that was described instead of loaded whole.
OVERSIZE_DEFECT = "too-large"

# Text parts fetched per oversized message: a mail with more readable parts than this is
# not correspondence; the bound keeps the number of FETCH sections small.
MAX_TEXT_SECTIONS = 8

# Header fields of the original that describe its (not loaded) body; they are replaced
# by our own multipart/mixed framing in the substitute.
_BODY_FIELDS = re.compile(rb"(?i)^(content-type|content-transfer-encoding|mime-version)\s*:")
_SAFE_PARAM = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


@attrs.frozen
class TextSection:
    """A readable text part of an oversized message.

    Attributes:
        section: The IMAP section number, e.g. ``"1"`` or ``"2.1"``.
        subtype: ``"plain"`` or ``"html"``.
        charset: The declared charset, when it is a plain token.
        encoding: The Content-Transfer-Encoding, lower-cased.
        size: The encoded size the server reported.
    """

    section: str
    subtype: str
    charset: str | None
    encoding: str
    size: int


def _walk(node: BodyStructure, prefix: str, depth: int = 0) -> Iterator[tuple[str, BodyPart]]:
    if depth > 32:  # as message.MAX_MIME_DEPTH: deeper trees are hostile
        return
    if isinstance(node, MultipartBody):
        for index, child in enumerate(node.parts, start=1):
            number = f"{prefix}.{index}" if prefix else str(index)
            yield from _walk(child, number, depth + 1)
        return
    yield (prefix or "1"), node


def _is_attachment(part: BodyPart) -> bool:
    return part.disposition is not None and part.disposition[0].lower() == "attachment"


def text_sections(structure: BodyStructure) -> list[TextSection]:
    """The readable text parts of a message, in MIME order.

    Args:
        structure: The message's BODYSTRUCTURE.

    Returns:
        At most :data:`MAX_TEXT_SECTIONS` ``text/plain`` or ``text/html`` parts that
        are not marked as attachments.
    """
    found: list[TextSection] = []
    for number, part in _walk(structure, ""):
        if part.type != "text" or part.subtype not in ("plain", "html") or _is_attachment(part):
            continue
        charset = part.params.get("charset")
        found.append(
            TextSection(
                section=number,
                subtype=part.subtype,
                charset=charset if charset and _SAFE_PARAM.match(charset) else None,
                encoding=(part.encoding or "7bit").lower(),
                size=part.size,
            )
        )
        if len(found) >= MAX_TEXT_SECTIONS:
            break
    return found


def _decoded_size(part: BodyPart) -> int:
    if (part.encoding or "").lower() == "base64":
        # MIME base64 is written in 76-character lines plus CRLF: 57 bytes per 78.
        return part.size * 57 // 78
    return part.size


def describe_attachments(structure: BodyStructure) -> tuple[Attachment, ...]:
    """Every part that is not readable text, by name, type and estimated size.

    The content is never loaded (``content`` is ``None``); the size is the decoded size
    estimated from the encoded size the server reported.

    Args:
        structure: The message's BODYSTRUCTURE.

    Returns:
        The attachments, in MIME order, at most :data:`MAX_MIME_PARTS`.
    """
    found: list[Attachment] = []
    for number, part in _walk(structure, ""):
        readable = part.type == "text" and part.subtype in ("plain", "html")
        if readable and not _is_attachment(part):
            continue
        content_type = f"{part.type}/{part.subtype}".lower()
        name = None
        if part.disposition is not None:
            name = part.disposition[1].get("filename")
        name = name or part.params.get("name")
        found.append(
            Attachment(
                filename=sanitize_filename(name, index=len(found) + 1, content_type=content_type),
                content_type=content_type,
                size=_decoded_size(part),
                content=None,
            )
        )
        if number and len(found) >= MAX_MIME_PARTS:
            break
    return tuple(found)


def _strip_body_fields(header: bytes) -> bytes:
    kept: list[bytes] = []
    skipping = False
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.strip():
            continue
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = bool(_BODY_FIELDS.match(line))
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)


def build_substitute(
    header: bytes, parts: list[tuple[TextSection, bytes]], *, note: str = ""
) -> bytes:
    """A small well-formed message standing in for an oversized one.

    Args:
        header: The original header section (``BODY.PEEK[HEADER]``).
        parts: Each readable text section with its (possibly cut) encoded body.
        note: Optional text appended as a last ``text/plain`` part, e.g. what was left
            out; empty for none.

    Returns:
        The substitute message: the original header fields except the body-describing
        ones, then a ``multipart/mixed`` body holding the parts with their original
        type, charset and transfer encoding.
    """
    boundary = "prxmail-oversize-" + secrets.token_hex(12)
    out = [_strip_body_fields(header)]
    out.append(b"MIME-Version: 1.0")
    out.append(f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode("ascii"))
    out.append(b"")
    for section, body in parts:
        out.append(f"--{boundary}".encode("ascii"))
        charset = f"; charset={section.charset}" if section.charset else ""
        out.append(f"Content-Type: text/{section.subtype}{charset}".encode("ascii"))
        encoding = section.encoding if _SAFE_PARAM.match(section.encoding) else "8bit"
        out.append(f"Content-Transfer-Encoding: {encoding}".encode("ascii"))
        out.append(b"")
        out.append(body.replace(f"--{boundary}".encode("ascii"), b"- -"))
    if note:
        out.append(f"--{boundary}".encode("ascii"))
        out.append(b"Content-Type: text/plain; charset=utf-8")
        out.append(b"Content-Transfer-Encoding: 8bit")
        out.append(b"")
        out.append(note.encode("utf-8"))
    out.append(f"--{boundary}--".encode("ascii"))
    out.append(b"")
    return b"\r\n".join(out)
