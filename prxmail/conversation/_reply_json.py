"""``reply_format = "json"``: the handler's stdout as a validated reply spec.

Theory of operation. The handler prints one JSON object; :func:`parse_json_reply`
turns those bytes into a :class:`ReplySpec` or raises :class:`InvalidReplyError`
with one reason string (the channel records it as the message's failure reason).
Everything is checked before anything is built, so there is never a half-built
reply: the spec holds the attachment bytes already read and bounded, ready for
:func:`prxmail.compose.compose_reply`.

What the handler controls is content only. There is no key for headers or
recipients; unknown keys are an error (a typo such as ``"attachment"`` must not be
silently ignored); file names go through
:func:`prxmail.message.sanitize_filename` when composed and may not hold control
characters here; content types must be a plain ``type/subtype``.

Attachments given by ``path`` are read by this process, so the path is the
dangerous part: a handler steered by a hostile email could name the config file
(with the password) or a device. Therefore a path must be absolute, lie (after
resolving symbolic links) inside one of the ``allowed_roots`` the caller passes --
the directory created for that handler run, say -- and name a regular file; it is
opened without following a final symlink and without blocking (a FIFO cannot hang
us), checked again with ``fstat`` on the open file, and read only up to the limit.
This reads files, so call it in a worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from prxmail.compose import MAX_OUTGOING_ATTACHMENTS, OutgoingAttachment

__all__ = [
    "DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES",
    "MAX_JSON_REPLY_BYTES",
    "InvalidReplyError",
    "ReplySpec",
    "parse_json_reply",
]

# The JSON text accepted at all. The handler's stdout is already bounded by its
# max_output_bytes (1 MiB by default); this bound holds for library callers too
# and keeps json.loads from building a huge object tree. Inline base64 content
# counts against it: larger files go by "path".
MAX_JSON_REPLY_BYTES: Final = 16 * 1024 * 1024

# Decoded attachment bytes per reply, all attachments together. Base64 with line
# breaks grows them by 37%: 7 MiB becomes ~10.05 MB, just below Postfix's default
# message_size_limit (10,240,000 bytes), the smallest limit common servers apply.
DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES: Final = 7 * 1024 * 1024

_TOP_KEYS: Final = frozenset({"body", "html", "attachments", "subject"})
_PATH_KEYS: Final = frozenset({"path", "filename", "content_type"})
_INLINE_KEYS: Final = frozenset({"filename", "content_type", "content_base64"})
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_BASE64_CHARS: Final = re.compile(r"[A-Za-z0-9+/=\s]*\Z")
_DEFAULT_TYPE: Final = "application/octet-stream"


class InvalidReplyError(ValueError):
    """The handler's JSON reply cannot be used; nothing is sent.

    Attributes:
        reason: One line saying what is wrong, for the failure record and the log
            (no file contents, at most a path the handler itself wrote).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class ReplySpec:
    """A validated rich reply.

    Attributes:
        body: The text part.
        html: The HTML alternative, or None.
        attachments: The files, bytes already read.
        subject: The subject to use, only ever set when the message answered had
            none (``original_subject`` was empty); None otherwise.
    """

    body: str
    html: str | None = None
    attachments: tuple[OutgoingAttachment, ...] = ()
    subject: str | None = None


def _fail(reason: str) -> InvalidReplyError:
    return InvalidReplyError(f"invalid JSON reply: {reason}")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where} must be a string, got {type(value).__name__}")
    return value


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}")


def _filename(value: object, where: str) -> str:
    name = _string(value, where).strip()
    if not name:
        raise _fail(f"{where} is empty")
    if _CONTROL.search(name):
        raise _fail(f"{where} contains control characters or line breaks")
    return name


def _content_type(value: object, where: str) -> str:
    text = _string(value, where)
    if _CONTROL.search(text):
        raise _fail(f"{where} contains control characters or line breaks")
    try:
        # Validate exactly as the composer will.
        OutgoingAttachment("x", text, b"")
    except ValueError as exc:
        raise _fail(f"{where}: {exc}") from None
    return text.strip().lower()


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _read_file(raw_path: str, where: str, roots: Sequence[Path], limit: int) -> bytes:
    if "\x00" in raw_path or not raw_path:
        raise _fail(f"{where} is not a usable path")
    path = Path(raw_path)
    if not path.is_absolute():
        raise _fail(f"{where} {raw_path!r} is not an absolute path")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _fail(f"{where} {raw_path!r} does not exist or cannot be resolved") from None
    if not _within(resolved, roots):
        raise _fail(f"{where} {raw_path!r} is outside the directories attachments may come from")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise _fail(f"{where} {raw_path!r} cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(f"{where} {raw_path!r} is not a regular file")
        if info.st_size > limit:
            raise _fail(
                f"{where} {raw_path!r} is {info.st_size} bytes, over the {limit}-byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            # One more byte than allowed tells a file that grew while being read.
            chunk = os.read(fd, min(limit + 1 - size, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _fail(f"{where} {raw_path!r} cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise _fail(f"{where} {raw_path!r} is over the {limit}-byte limit")
    return b"".join(chunks)


def _decode_inline(value: object, where: str, limit: int) -> bytes:
    text = _string(value, where)
    # 4 characters per 3 bytes: reject before decoding what cannot fit anyway.
    if len(text) > (limit // 3 + 1) * 4 * 11 // 10 + 64:
        raise _fail(f"{where} decodes to more than the {limit}-byte limit")
    if not _BASE64_CHARS.match(text):
        raise _fail(f"{where} is not base64")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _fail(f"{where} is not valid base64") from None
    if len(data) > limit:
        raise _fail(f"{where} is {len(data)} bytes, over the {limit}-byte limit")
    return data


def _attachment(
    entry: object, index: int, roots: Sequence[Path], per_file: int
) -> OutgoingAttachment:
    where = f"attachments[{index}]"
    if not isinstance(entry, dict):
        raise _fail(f"{where} must be an object")
    if "path" in entry:
        _check_keys(entry, _PATH_KEYS, where)
        raw_path = _string(entry["path"], f"{where}.path")
        content = _read_file(raw_path, f"{where}.path", roots, per_file)
        default_name = raw_path.replace("\\", "/").rsplit("/", 1)[-1]
        name = _filename(entry.get("filename", default_name), f"{where}.filename")
    else:
        _check_keys(entry, _INLINE_KEYS, where)
        missing = sorted(_INLINE_KEYS - set(entry) - {"content_type"})
        if missing:
            raise _fail(f"{where} needs 'path', or 'filename' and 'content_base64'")
        name = _filename(entry["filename"], f"{where}.filename")
        content = _decode_inline(entry["content_base64"], f"{where}.content_base64", per_file)
    content_type = _content_type(entry.get("content_type", _DEFAULT_TYPE), f"{where}.content_type")
    return OutgoingAttachment(name, content_type, content)


def parse_json_reply(
    output: bytes,
    *,
    original_subject: str,
    max_attachment_bytes: int,
    max_total_attachment_bytes: int = DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES,
    allowed_roots: Sequence[str | os.PathLike[str]] = (),
) -> ReplySpec:
    """Parse and validate a handler's JSON reply.

    The object: ``body`` (string, required), ``html`` (string), ``attachments``
    (list of ``{"path": ...}`` -- optionally with ``filename`` and
    ``content_type`` -- or ``{"filename", "content_base64"}`` with an optional
    ``content_type``; the type defaults to ``application/octet-stream``), and
    ``subject`` (string, used only when ``original_subject`` is empty). Nothing
    else.

    Args:
        output: The handler's stdout (UTF-8 JSON; surrounding white space is fine).
        original_subject: The subject of the message answered.
        max_attachment_bytes: The most bytes of any one attachment.
        max_total_attachment_bytes: The most bytes of all attachments together.
        allowed_roots: Directories ``path`` attachments must lie in (after
            resolving links); with none, ``path`` attachments are refused.

    Returns:
        The reply spec, complete.

    Raises:
        InvalidReplyError: Anything is wrong; ``reason`` says what. Nothing is
            partially usable.
    """
    if len(output) > MAX_JSON_REPLY_BYTES:
        raise _fail(f"{len(output)} bytes, more than {MAX_JSON_REPLY_BYTES}")
    try:
        text = output.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("output is not UTF-8") from None
    if not text.strip():
        raise _fail("output is empty")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise _fail(f"not JSON ({detail})") from None
    if not isinstance(obj, dict):
        raise _fail(f"expected one JSON object, got {type(obj).__name__}")
    _check_keys(obj, _TOP_KEYS, "the reply")
    if "body" not in obj:
        raise _fail("'body' is required")
    body = _string(obj["body"], "body")
    html = None if obj.get("html") is None else _string(obj["html"], "html")
    subject = None
    if obj.get("subject") is not None:
        given = _string(obj["subject"], "subject")
        if not original_subject.strip() and given.strip():
            subject = given
    entries = obj.get("attachments", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise _fail("attachments must be a list")
    if len(entries) > MAX_OUTGOING_ATTACHMENTS:
        raise _fail(f"{len(entries)} attachments, at most {MAX_OUTGOING_ATTACHMENTS}")
    roots = []
    for root in allowed_roots:
        try:
            roots.append(Path(root).resolve(strict=True))
        except (OSError, RuntimeError):
            continue
    attachments: list[OutgoingAttachment] = []
    total = 0
    for index, entry in enumerate(entries):
        attachment = _attachment(entry, index, roots, max_attachment_bytes)
        total += len(attachment.content)
        if total > max_total_attachment_bytes:
            raise _fail(
                f"attachments total {total} bytes or more, over the "
                f"{max_total_attachment_bytes}-byte limit"
            )
        attachments.append(attachment)
    return ReplySpec(body=body, html=html, attachments=tuple(attachments), subject=subject)
