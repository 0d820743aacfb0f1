# Theory of operation
# -------------------
#
# IMAP server output is a sequence of responses. Each response is one or more CRLF
# terminated lines; a line that ends in a literal announcement (``{n}``, ``{n+}`` or
# ``~{n}``) is followed by exactly ``n`` raw bytes and then the response continues with
# another line. The framer does nothing but cut the byte stream into such complete
# responses ("frames"); it never interprets the grammar. That is the only place where
# sizes are checked, so a hostile or broken server meets a hard limit here and cannot
# make us buffer without bound (the model is imap-codec's fragmentizer and h11's
# receive buffer).
#
# Data flow: the unread input is one immutable ``bytes`` object plus a read position.
# ``next_frame`` finds the next line with ``bytes.find`` (resuming where the last
# unsuccessful search stopped, so a slow trickle of bytes is scanned once) and takes
# lines and literals by slicing -- exactly one copy each, no per-byte Python work.
# ``receive_data`` keeps only the unread tail when new data arrives, so each byte is
# copied into the buffer at most once more; the tail is at most one partial response
# below DIRECT_LITERAL_THRESHOLD plus one line, never a whole big literal.
#
# Large literals (a 100 MB message) are not accumulated in the receive buffer: as soon
# as the announcement is seen, one bytearray of the announced size is allocated and the
# incoming bytes are copied straight into it. The message then exists in memory once,
# plus at most one receive chunk, and that same bytearray is handed to the parser.

from __future__ import annotations

import re

from prxmail.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MAX_LITERAL_SIZE",
    "DEFAULT_MAX_RESPONSE_SIZE",
    "DIRECT_LITERAL_THRESHOLD",
    "Frame",
    "Framer",
]

# One response line (without its literals). The longest legitimate lines are SEARCH
# results and FLAGS/ESEARCH data of a big mailbox, all on one line: a million UIDs of up
# to 8 digits is about 9 MB. RFC 7162 suggests clients accept at least 8 KB; we allow far
# more because refusing a real server's SEARCH is worse than buffering 16 MiB once.
DEFAULT_MAX_LINE_LENGTH = 16 * 1024 * 1024

# One literal, i.e. in practice one message body. Common providers cap messages at
# 25-50 MB; self-hosted servers often allow more. 256 MiB keeps big-but-real messages
# fetchable while a claim of "{999999999999}" is refused before any allocation.
DEFAULT_MAX_LITERAL_SIZE = 256 * 1024 * 1024

# Everything one response may add up to (lines plus literals). A FETCH of one message
# with several sections may carry a few literals; twice the literal limit allows that
# without letting a server chain literals forever.
DEFAULT_MAX_RESPONSE_SIZE = 2 * DEFAULT_MAX_LITERAL_SIZE

# Literals at least this big are received straight into a preallocated bytearray of
# the announced size instead of the shared receive buffer. Below it, slicing the buffer
# is cheaper than an extra allocation; above it, avoiding a second copy matters.
DIRECT_LITERAL_THRESHOLD = 64 * 1024

# A literal announcement at the very end of a line: {n}, {n+} (LITERAL+ echoed by some
# servers) or ~{n} (RFC 3516 literal8). 20 digits is more than any size we accept.
_LITERAL_AT_END = re.compile(rb"~?\{([0-9]{1,20})\+?\}\Z")


class Frame:
    """One complete server response, cut into lines and literals.

    ``lines[i]`` (without CRLF) ends with the announcement of ``literals[i]`` for every
    ``i < len(literals)``; the last line has no literal after it. So ``len(lines) ==
    len(literals) + 1`` always.
    """

    __slots__ = ("lines", "literals")

    def __init__(self, lines: list[bytes], literals: list[bytes | bytearray]) -> None:
        self.lines = lines
        self.literals = literals

    def __repr__(self) -> str:
        sizes = [len(lit) for lit in self.literals]
        return f"Frame(lines={self.lines!r}, literal_sizes={sizes!r})"

    def excerpt(self) -> bytes:
        """The start of the first line, for error messages."""
        return self.lines[0][:80]


class Framer:
    """Cuts a byte stream from an IMAP server into :class:`Frame` objects.

    Args:
        max_line_length: Longest accepted line, CRLF excluded.
        max_literal_size: Largest accepted literal.
        max_response_size: Largest accepted response, lines and literals together.

    Raises (from :meth:`next_frame`):
        RemoteProtocolError: a limit was exceeded or the stream ended mid-response.
    """

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
    ) -> None:
        if min(max_line_length, max_literal_size, max_response_size) < 1:
            raise ValueError("framer limits must be positive")
        self.max_line_length = max_line_length
        self.max_literal_size = max_literal_size
        self.max_response_size = max_response_size
        self._data = b""  # received bytes; those before _pos are consumed
        self._pos = 0
        self._scanned = 0  # absolute offset up to which _data holds no LF after _pos
        self._eof = False
        # The response being assembled.
        self._lines: list[bytes] = []
        self._literals: list[bytes | bytearray] = []
        self._size = 0
        # Literal being received: -1 when reading a line.
        self._literal_size = -1
        self._direct: bytearray | None = None
        self._direct_view: memoryview | None = None
        self._direct_filled = 0

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the server; ``b""`` means the server closed.

        Raises:
            LocalProtocolError: data after end of stream (the caller's mistake).
        """
        if self._eof:
            if data:
                raise LocalProtocolError("received data after end of stream")
            return
        if not data:
            self._eof = True
            return
        unread = len(self._data) - self._pos
        view = self._direct_view
        if view is not None and not unread:
            # Straight into the preallocated literal: the hot path of a big fetch.
            filled = self._direct_filled
            take = min(len(data), len(view) - filled)
            view[filled : filled + take] = memoryview(data)[:take]
            self._direct_filled = filled + take
            if take < len(data):
                self._data = bytes(memoryview(data)[take:])
                self._pos = self._scanned = 0
            return
        if not unread:
            self._data = data if isinstance(data, bytes) else bytes(data)
            self._scanned -= self._pos
        else:
            self._data = self._data[self._pos :] + data
            self._scanned -= self._pos
        self._pos = 0
        self._scanned = max(self._scanned, 0)

    @property
    def eof(self) -> bool:
        """True once the server closed its side."""
        return self._eof

    @property
    def at_boundary(self) -> bool:
        """True when no partial response is buffered."""
        return self._pos >= len(self._data) and not self._lines and self._literal_size < 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame (a rough figure)."""
        return len(self._data) - self._pos + self._size + self._direct_filled

    def discard_buffered(self) -> int:
        """Drop every byte received so far (after STARTTLS) and return how many.

        A man in the middle can inject plaintext responses right behind the server's
        STARTTLS OK; they must never be read as if they came over TLS.
        """
        dropped = self.buffered
        self._data = b""
        self._pos = self._scanned = 0
        self._reset_frame()
        return dropped

    # -- output -----------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """Return the next complete response, or ``None`` if more data is needed.

        At end of stream with nothing pending this also returns ``None``; check
        :attr:`eof`.

        Raises:
            RemoteProtocolError: a limit was exceeded or the stream ended in the middle
                of a response.
        """
        data = self._data
        pos = self._pos
        lines = self._lines
        while True:
            if self._literal_size >= 0:
                size = self._literal_size
                if self._direct is None and len(data) - pos >= size:
                    # Small literal, all here: the common case of a fetch.
                    self._literals.append(data[pos : pos + size])
                    pos += size
                else:
                    self._pos = pos
                    literal = self._take_literal()
                    if literal is None:
                        return None
                    data = self._data
                    pos = self._pos
                    self._literals.append(literal)
                self._literal_size = -1
            idx = data.find(b"\n", pos if pos > self._scanned else self._scanned)
            if idx < 0:
                self._pos = pos
                if len(data) - pos > self.max_line_length:
                    raise RemoteProtocolError(
                        f"server sent a line longer than {self.max_line_length} bytes",
                        excerpt=data[pos : pos + 80],
                    )
                self._scanned = len(data)
                if self._eof and not self.at_boundary:
                    raise RemoteProtocolError(
                        "server closed the connection in the middle of a response",
                        excerpt=data[pos : pos + 80] or (lines[0] if lines else b""),
                    )
                return None
            if idx - pos > self.max_line_length:
                self._pos = pos
                raise RemoteProtocolError(
                    f"server sent a line longer than {self.max_line_length} bytes",
                    excerpt=data[pos : pos + 80],
                )
            end = idx - 1 if idx > pos and data[idx - 1] == 13 else idx  # bare LF is fine
            line = data[pos:end]
            self._size += end - pos + 2
            pos = idx + 1
            if self._size > self.max_response_size:
                self._pos = pos
                self._check_size(line)
            lines.append(line)
            if line.endswith(b"}"):
                length = len(line)
                match = _LITERAL_AT_END.search(line, length - 24 if length > 24 else 0)
                if match is not None:
                    self._pos = pos
                    self._start_literal(int(match[1]), line)
                    continue
            self._pos = pos
            frame = Frame(lines, self._literals)
            self._lines = []
            self._literals = []
            self._size = 0
            return frame

    # -- internals --------------------------------------------------------------------

    def _reset_frame(self) -> None:
        self._lines = []
        self._literals = []
        self._size = 0
        self._literal_size = -1
        self._direct = None
        self._direct_view = None
        self._direct_filled = 0

    def _check_size(self, line: bytes) -> None:
        if self._size > self.max_response_size:
            raise RemoteProtocolError(
                f"server sent a response larger than {self.max_response_size} bytes",
                excerpt=self._lines[0] if self._lines else line,
            )

    def _start_literal(self, size: int, line: bytes) -> None:
        if size > self.max_literal_size:
            raise RemoteProtocolError(
                f"server announced a literal of {size} bytes, "
                f"more than the limit of {self.max_literal_size}",
                excerpt=line[-80:],
            )
        self._size += size
        self._check_size(line)
        self._literal_size = size
        if size >= DIRECT_LITERAL_THRESHOLD:
            self._direct = bytearray(size)
            self._direct_view = memoryview(self._direct)
            self._direct_filled = 0

    def _take_literal(self) -> bytes | bytearray | None:
        size = self._literal_size
        direct = self._direct
        if direct is None:
            if self._eof:
                raise RemoteProtocolError(
                    "server closed the connection in the middle of a literal",
                    excerpt=self._lines[0],
                )
            return None  # small literal not complete yet (the caller checked)
        view = self._direct_view
        assert view is not None
        unread = len(self._data) - self._pos
        if unread:
            take = min(unread, size - self._direct_filled)
            view[self._direct_filled : self._direct_filled + take] = memoryview(self._data)[
                self._pos : self._pos + take
            ]
            self._direct_filled += take
            self._pos += take
        if self._direct_filled < size:
            if self._eof:
                raise RemoteProtocolError(
                    "server closed the connection in the middle of a literal",
                    excerpt=self._lines[0],
                )
            return None
        view.release()
        self._direct = None
        self._direct_view = None
        self._direct_filled = 0
        return direct
