"""Attachment file names: a declared name made safe to save as-is.

Theory of operation: a name in a MIME header is attacker text. It is decoded
(RFC 2047 / RFC 2231, 8-bit bytes repaired), reduced to its last path component,
stripped of control, format and reserved characters and of Windows device names,
and cut to :data:`~prxmail.message._bounds.MAX_FILENAME_BYTES` keeping the
extension; a part without a usable name gets ``attachment-N`` plus an extension
from its type, so every listed attachment has a deterministic, safe name.
"""

from __future__ import annotations

import email.message
import unicodedata

from prxmail.message._bounds import MAX_FILENAME_BYTES
from prxmail.message._headers import _WHITESPACE_RUN, _fix_raw_bytes, decode_header_text

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
