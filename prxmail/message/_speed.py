"""The speed layer: the stdlib parser's tree, built without its line-by-line loop.

Theory of operation: see the comment block below. The result is always the tree
``email.message_from_bytes`` builds; any doubt (a marker not found exactly once,
an unexpected error) falls back to the full parse. Reading and writing a part's
stored payload goes through :mod:`prxmail.message._mailparser`, which fences the
stdlib's private ``_payload``.
"""

from __future__ import annotations

import email
import email.message
import re
from collections.abc import Iterator

from prxmail.message._bounds import _ELIDE_CHECK_CHUNK, _header_section_end
from prxmail.message._mailparser import stored_payload

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
        payload = stored_payload(root)
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
            payload = stored_payload(part)
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
