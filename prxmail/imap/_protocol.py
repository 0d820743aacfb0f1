# Theory of operation
# -------------------
#
# IMAPProtocol is the whole IMAP client protocol without any I/O (h11's Connection and
# imap-next are the models). The I/O layer moves bytes and nothing else:
#
#     proto.send_command("LOGIN", [user, password])   # queues bytes
#     await stream.send_all(proto.data_to_send())
#     while (event := proto.next_event()) is NEED_DATA:
#         proto.receive_data(await stream.receive_some())
#     ... and after every event: send proto.data_to_send() if it is not empty.
#
# Responsibilities, each in one place:
# * framing and size limits: Framer; grammar: parse_response;
# * connection state: the tables in _state.py, applied here when the greeting arrives,
#   when a command completes, on "+" for IDLE, on BYE and on end of stream;
# * synchronising literals: a command with a literal is split into chunks; the core
#   releases the next chunk into data_to_send() only when the server's "+" arrives (and
#   drops the rest if the server answers with a tagged NO/BAD instead). Those "+" are
#   consumed here; the I/O layer only sees the "+" of AUTHENTICATE and IDLE;
# * capabilities: tracked from CAPABILITY responses and [CAPABILITY] codes, forgotten
#   after STARTTLS (a man in the middle may have forged them);
# * STARTTLS: after its tagged OK every byte already buffered is discarded;
# * protocol errors: the first RemoteProtocolError out of next_event moves the core to
#   the ERROR state (the table in _state.py); from then on receive_data, next_event
#   and every send_* raise LocalProtocolError naming that first error, and nothing
#   more is released to data_to_send() -- the SMTP core closes itself the same way.
#
# One command is in flight at a time, except that FETCH / UID FETCH may be pipelined
# behind each other (PIPELINABLE): they change no state, so the state machine stays
# exact, and tagged responses are matched by tag.

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from prxmail.errors import LocalProtocolError, RemoteProtocolError
from prxmail.imap._encoder import Arg, encode_command
from prxmail.imap._events import (
    CapabilityData,
    ConnectionClosed,
    ContinuationRequest,
    EnabledData,
    Event,
    FetchData,
    StatusResponse,
    TaggedResponse,
)
from prxmail.imap._framer import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_LITERAL_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
    Framer,
)
from prxmail.imap._parser import parse_response
from prxmail.imap._state import TRANSITIONS, UNSOLICITED, ConnectionState, check_allowed

__all__ = ["NEED_DATA", "IMAPProtocol", "NeedData"]


# Commands that may be sent while others of this set await their responses: they never
# change the connection state and carry no literals, so pipelining them is safe and
# keeps the server busy between batches of a large fetch.
PIPELINABLE = frozenset({"FETCH", "UID FETCH"})


class NeedData:
    """Sentinel type: :meth:`IMAPProtocol.next_event` needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class IMAPProtocol:
    """A sans-I/O IMAP4rev1 client connection.

    Args:
        max_line_length: Longest response line accepted.
        max_literal_size: Largest literal (message) accepted.
        max_response_size: Largest response, lines and literals together.
        tag_prefix: Letters put before the command counter in tags.
    """

    def __init__(
        self,
        *,
        max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
        max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        tag_prefix: str = "A",
    ) -> None:
        if not tag_prefix.isalpha() or not tag_prefix.isascii():
            raise ValueError("tag_prefix must be ASCII letters")
        self._framer = Framer(
            max_line_length=max_line_length,
            max_literal_size=max_literal_size,
            max_response_size=max_response_size,
        )
        self._tag_prefix = tag_prefix
        self._counter = 0
        self._out = bytearray()
        self._waiting_chunks: list[bytes] = []
        self._greeting: StatusResponse | None = None
        # Commands awaiting their tagged response, in the order sent: tag -> (keyword,
        # full name). More than one only for pipelined fetches (see PIPELINABLE).
        self._inflight: dict[str, tuple[str, str]] = {}
        self._done_sent = False
        self._closed_reported = False
        # The first RemoteProtocolError; set once, when the state becomes ERROR.
        self._error: RemoteProtocolError | None = None
        self.state = ConnectionState.NOT_AUTHENTICATED
        self.capabilities: frozenset[str] = frozenset()
        self.enabled: frozenset[str] = frozenset()

    # -- properties -------------------------------------------------------------------

    @property
    def greeting(self) -> StatusResponse | None:
        """The server greeting once received."""
        return self._greeting

    @property
    def command_in_progress(self) -> str | None:
        """The name of the command awaiting its tagged response, if any."""
        for keyword, _ in self._inflight.values():
            return keyword
        return None

    @property
    def commands_in_flight(self) -> int:
        """How many commands await their tagged response."""
        return len(self._inflight)

    @property
    def framer(self) -> Framer:
        """The framer (its limits can be read; feed data through receive_data)."""
        return self._framer

    # -- input ------------------------------------------------------------------------

    @property
    def error(self) -> RemoteProtocolError | None:
        """The protocol error that made the connection unusable, if any."""
        return self._error

    def _check_usable(self) -> None:
        error = self._error
        if error is not None:
            raise LocalProtocolError(
                f"the IMAP connection is unusable since the server broke the protocol: {error}"
            ) from error

    def _fail(self, error: RemoteProtocolError) -> None:
        self._error = error
        self._apply_unsolicited("PROTOCOL_ERROR")
        # Nothing queued may reach a server whose stream we no longer understand.
        self._out.clear()
        self._waiting_chunks = []
        self._inflight.clear()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server; ``b""`` signals end of stream.

        Raises:
            LocalProtocolError: data after end of stream, or the connection is
                unusable after a protocol error.
        """
        self._check_usable()
        self._framer.receive_data(data)

    def next_event(self) -> Event | NeedData:
        """Return the next event, or :data:`NEED_DATA`.

        After end of stream at a response boundary this returns
        :class:`ConnectionClosed` (every time it is called).

        Raises:
            RemoteProtocolError: the server broke the protocol. The connection is in
                the ERROR state from then on.
            LocalProtocolError: called again after such an error.
        """
        self._check_usable()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _next_event(self) -> Event | NeedData:
        while True:
            frame = self._framer.next_frame()
            if frame is None:
                if self._framer.eof:
                    self._apply_unsolicited("EOF")
                    self._inflight.clear()
                    return ConnectionClosed()
                return NEED_DATA
            if self._greeting is None:
                try:
                    event = parse_response(frame)
                except RemoteProtocolError as exc:
                    raise RemoteProtocolError(
                        "the server greeting is not IMAP", excerpt=frame.excerpt()
                    ) from exc
                return self._on_greeting(event, frame.excerpt())
            event = parse_response(frame)
            if type(event) is FetchData:  # the hot path: nothing to track
                return event
            if isinstance(event, TaggedResponse):
                return self._on_tagged(event)
            if isinstance(event, ContinuationRequest):
                if self._on_continuation(event):
                    continue
                return event
            if isinstance(event, StatusResponse):
                if event.status == "BYE":
                    self._apply_unsolicited("BYE")
                elif event.status == "PREAUTH":
                    raise RemoteProtocolError("PREAUTH after the greeting")
                self._note_code(event)
            elif isinstance(event, CapabilityData):
                self.capabilities = event.capabilities
            elif isinstance(event, EnabledData):
                self.enabled = self.enabled | event.capabilities
            return event

    def _on_greeting(self, event: Event, excerpt: bytes) -> Event:
        if not isinstance(event, StatusResponse) or event.status not in ("OK", "PREAUTH", "BYE"):
            raise RemoteProtocolError(
                "the server greeting is not OK, PREAUTH or BYE", excerpt=excerpt
            )
        self._greeting = event
        if event.status != "OK":
            self._apply_unsolicited(event.status)
        self._note_code(event)
        return event

    def _on_tagged(self, event: TaggedResponse) -> Event:
        entry = self._inflight.pop(event.tag, None)
        if entry is None:
            raise RemoteProtocolError(
                f"tagged response {event.tag!r} does not match a command in progress "
                f"({', '.join(self._inflight) or 'none'})",
                excerpt=event.tag.encode(),
            )
        command = entry[0]
        new_state = TRANSITIONS.get((self.state, command, event.status))
        if new_state is not None:
            self.state = new_state
        self._waiting_chunks = []
        self._done_sent = False
        if event.code is not None and event.code.name == "CAPABILITY":
            self._note_code(event)
        elif command in ("LOGIN", "AUTHENTICATE") and event.status == "OK":
            # RFC 3501: capabilities may change after login; forget the old list so the
            # caller asks again rather than trusting pre-authentication data.
            self.capabilities = frozenset()
        if command == "STARTTLS" and event.status == "OK":
            # Anything after the OK arrived in plaintext: an attacker may have put it
            # there. It must never be read as if it came over TLS.
            self._framer.discard_buffered()
            self.capabilities = frozenset()
        return event

    def _on_continuation(self, event: ContinuationRequest) -> bool:
        """Handle a "+"; return True if it was consumed here."""
        command = self.command_in_progress
        if command is None:
            raise RemoteProtocolError(
                "continuation request with no command in progress",
                excerpt=event.text.encode()[:80],
            )
        if self._waiting_chunks:
            self._out += self._waiting_chunks.pop(0)
            return True
        if command == "IDLE":
            if self.state is ConnectionState.IDLING:
                raise RemoteProtocolError("second continuation during IDLE")
            self.state = TRANSITIONS[(self.state, "IDLE", "+")]
            return False
        if command == "AUTHENTICATE":
            return False
        raise RemoteProtocolError(
            f"unexpected continuation request during {command}",
            excerpt=event.text.encode()[:80],
        )

    def _apply_unsolicited(self, what: str) -> None:
        new_state = UNSOLICITED.get((self.state, what))
        if new_state is not None:
            self.state = new_state

    def _note_code(self, event: StatusResponse | TaggedResponse) -> None:
        code = event.code
        if code is not None and code.name == "CAPABILITY" and isinstance(code.value, tuple):
            self.capabilities = frozenset(code.value)

    # -- output -----------------------------------------------------------------------

    def send_command(self, name: str, args: Sequence[Arg] = ()) -> str:
        """Queue a command and return its tag.

        Args:
            name: The command, e.g. ``"SELECT"`` or ``"UID FETCH"``.
            args: Its arguments (see :mod:`prxmail.imap._encoder`).

        Returns:
            The tag that its tagged response will carry.

        Raises:
            LocalProtocolError: no greeting yet, another command is in progress, the
                command is not allowed in the current state, an argument cannot be
                sent safely, or the connection is unusable after a protocol error.
        """
        self._check_usable()
        if self._greeting is None:
            raise LocalProtocolError("wait for the server greeting before sending commands")
        full_name = name.upper()
        if self._inflight and (
            full_name not in PIPELINABLE
            or self._waiting_chunks
            or any(n not in PIPELINABLE for _, n in self._inflight.values())
        ):
            raise LocalProtocolError(
                f"cannot send {name}: {self.command_in_progress} is still in progress"
            )
        keyword = name.split(" ", 1)[0].upper()
        check_allowed(self.state, keyword)
        tag = f"{self._tag_prefix}{self._counter + 1:04d}"
        chunks = encode_command(
            tag,
            name,
            args,
            literal_plus="LITERAL+" in self.capabilities,
            literal_minus="LITERAL-" in self.capabilities,
        )
        self._counter += 1
        self._out += chunks[0]
        self._waiting_chunks = chunks[1:]
        self._inflight[tag] = (keyword, full_name)
        return tag

    def send_continuation(self, line: bytes) -> None:
        """Answer an AUTHENTICATE challenge with one line (CRLF added here).

        Raises:
            LocalProtocolError: no AUTHENTICATE in progress, the line has CR/LF/NUL,
                or the connection is unusable after a protocol error.
        """
        self._check_usable()
        if self.command_in_progress != "AUTHENTICATE":
            raise LocalProtocolError("continuation data is only sent during AUTHENTICATE")
        if any(c in line for c in b"\r\n\x00"):
            raise LocalProtocolError("CR, LF and NUL are not allowed in a continuation")
        self._out += line + b"\r\n"

    def send_done(self) -> None:
        """End IDLE (sends ``DONE``); the tagged response of IDLE follows.

        Raises:
            LocalProtocolError: not idling, DONE was already sent, or the connection
                is unusable after a protocol error.
        """
        self._check_usable()
        if self.state is not ConnectionState.IDLING or self._done_sent:
            raise LocalProtocolError("DONE is only sent once, to end IDLE")
        self._done_sent = True
        self._out += b"DONE\r\n"

    @property
    def has_data_to_send(self) -> bool:
        """True if :meth:`data_to_send` would return bytes."""
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes to write to the server now."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out
