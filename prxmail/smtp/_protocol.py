# Theory of operation
# -------------------
#
# This module is the whole SMTP client protocol without any I/O, in the manner of
# h11: the caller turns commands into bytes with ``send_*`` methods and writes them
# however it likes; whatever the server sends comes back through ``receive_data``;
# complete replies come out of ``next_reply``.  Nothing here imports trio.
#
# Input is framed before it is parsed.  ``_ReplyFramer`` cuts the byte stream into
# lines and collects the lines of one reply (``250-...`` continues, ``250 ...``
# ends); it owns every size limit, so a hostile server can make us hold at most
# ``MAX_REPLY_BYTES`` of unparsed input.  A reply that breaks the grammar raises
# ``RemoteProtocolError`` with a short excerpt, and the connection is closed: SMTP
# has no resynchronisation point, so guessing would only mis-attribute replies.
#
# Replies are matched to commands by order (RFC 5321 4.1.1 / RFC 2920): every
# command sent is appended to a FIFO of pending commands and every reply pops one.
# This is what makes PIPELINING cheap: the caller may send MAIL, all RCPTs and DATA
# in one write and then read the replies one after the other.
#
# The connection state lives in two tables below, one for "what may be sent now"
# (``_SEND``) and one for "what a reply does to the state" (``_ON_REPLY``).  The
# send table is optimistic -- it moves when a command is written, which is what
# pipelining needs -- and the reply table corrects it when a reply says otherwise
# (DATA refused: back to READY; 421: CLOSED).
#
# Serialisers protect the wire: an address or parameter carrying CR, LF, NUL or any
# other control character never reaches a command line (``LocalProtocolError``),
# and message data is CRLF-normalised and dot-stuffed with bytes.replace (C speed,
# no per-line Python loop) before it goes out.

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import attrs

from prxmail.errors import (
    EXCERPT_LIMIT,
    ConnectionBrokenError,
    LocalProtocolError,
    RemoteProtocolError,
    SMTPPermanentError,
    SMTPReplyError,
    SMTPTransientError,
)

__all__ = [
    "MAX_LINE_LENGTH",
    "MAX_REPLY_BYTES",
    "MAX_REPLY_LINES",
    "MAX_SIZE_DIGITS",
    "Command",
    "Extensions",
    "Reply",
    "SMTPProtocol",
    "State",
    "check_address",
    "decode_challenge",
    "decode_data",
    "encode_data",
    "error_for_reply",
    "mail_options",
    "normalize_crlf",
    "parse_extensions",
]

# RFC 5321 4.5.3.1.5 limits a reply line to 512 octets including CRLF.  Real servers
# exceed that a little (long AUTH lists, vendor banners), so we allow 4 KiB: eight
# times the standard, still small enough that one line cannot hurt us.
MAX_LINE_LENGTH = 4096

# An EHLO reply is the longest legitimate reply and has about a dozen lines; 100
# leaves ample room while keeping a server that streams "250-" lines forever from
# making us collect them forever.
MAX_REPLY_LINES = 100

# Bound on the lines collected for one multi-line reply (the unfinished line is
# bounded by MAX_LINE_LENGTH on its own).  MAX_REPLY_LINES * MAX_LINE_LENGTH would be
# 400 KiB, far more than any real reply needs; 64 KiB keeps a hostile server's worst
# case small.
MAX_REPLY_BYTES = 64 * 1024

# RFC 1870: the SIZE keyword's value is 1*20DIGIT. A longer value, or one that is not
# ASCII digits, is read as "announced, no fixed limit" (0), the same as a bare SIZE.
MAX_SIZE_DIGITS = 20
_SIZE_VALUE = re.compile(rf"[0-9]{{1,{MAX_SIZE_DIGITS}}}")

_CRLF = b"\r\n"
# Code, separator, text; the text may hold neither CR nor NUL.  Matched in place in
# the receive buffer (pos/endpos), so a line is not copied before it is parsed.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)([^\r\x00]*)")
# RFC 3463: class "." subject "." detail, where subject and detail are 1-3 digits.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
# Anything that could end or split a command line, plus the other C0 controls and
# DEL, none of which belong in an address or an ESMTP parameter.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
# RFC 5321 4.1.2 "Domain"/"address-literal": we accept anything printable without
# spaces for the EHLO name; the server decides the rest.
_EHLO_NAME = re.compile(r"[\x21-\x7e]+")


class Command(enum.Enum):
    """The SMTP commands the client sends; also the key of the state tables."""

    GREETING = "GREETING"  # not a command: the server's opening reply
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    AUTH_RESPONSE = "AUTH response"  # a line sent after a 334 challenge
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BODY = "message data"  # the dot-terminated content after a 354
    BDAT = "BDAT"  # RFC 3030 CHUNKING: size-prefixed content, no 354, no dot-stuffing
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


class State(enum.Enum):
    """Where the client side of the conversation stands."""

    GREETING = "greeting"  # waiting for the 220 banner
    CONNECTED = "connected"  # banner read; EHLO/HELO not yet accepted
    READY = "ready"  # EHLO accepted, no mail transaction open
    STARTTLS = "starttls"  # STARTTLS sent, waiting for 220
    TLS_HANDSHAKE = "tls handshake"  # 220 read: the caller must run the TLS handshake
    AUTH = "auth"  # AUTH sent, waiting for 334 or the final reply
    AUTH_CHALLENGE = "auth challenge"  # 334 read: a response line must be sent
    MAIL = "mail"  # MAIL FROM sent
    RCPT = "rcpt"  # at least one RCPT TO sent
    DATA = "data"  # DATA sent, waiting for 354
    BODY = "body"  # 354 read: the message content must be sent
    BODY_SENT = "body sent"  # content sent, waiting for the final reply
    CLOSED = "closed"  # QUIT answered, 421 received, or a protocol error


# What may be sent in each state, and the state it leads to.  Commands that
# carry no transition (NOOP, RSET in most states) are listed with the state they
# leave behind.
_SEND: dict[State, dict[Command, State]] = {
    State.GREETING: {},
    State.CONNECTED: {
        Command.EHLO: State.CONNECTED,
        Command.HELO: State.CONNECTED,
        Command.NOOP: State.CONNECTED,
        Command.RSET: State.CONNECTED,
        Command.QUIT: State.CONNECTED,
    },
    State.READY: {
        Command.EHLO: State.CONNECTED,
        Command.HELO: State.CONNECTED,
        Command.STARTTLS: State.STARTTLS,
        Command.AUTH: State.AUTH,
        Command.MAIL: State.MAIL,
        Command.RSET: State.READY,
        Command.NOOP: State.READY,
        Command.QUIT: State.READY,
    },
    State.STARTTLS: {},
    State.TLS_HANDSHAKE: {},
    State.AUTH: {},
    State.AUTH_CHALLENGE: {Command.AUTH_RESPONSE: State.AUTH},
    State.MAIL: {
        Command.RCPT: State.RCPT,
        Command.RSET: State.READY,
        Command.NOOP: State.MAIL,
        Command.QUIT: State.MAIL,
    },
    State.RCPT: {
        Command.RCPT: State.RCPT,
        Command.DATA: State.DATA,
        Command.BDAT: State.BODY_SENT,
        Command.RSET: State.READY,
        Command.NOOP: State.RCPT,
        Command.QUIT: State.RCPT,
    },
    State.DATA: {},
    State.BODY: {Command.BODY: State.BODY_SENT},
    # RFC 2920 3.1: message content may be followed by the next transaction in the
    # same pipelined group, so a batch of messages need not wait for each reply.
    State.BODY_SENT: {
        Command.RSET: State.READY,
        Command.MAIL: State.MAIL,
        Command.NOOP: State.BODY_SENT,
        Command.QUIT: State.BODY_SENT,
    },
    State.CLOSED: {},
}

# What a reply does to the state, per command: (after 2xx, after 3xx, after
# 4xx/5xx).  ``_KEEP`` leaves the state alone: a pipelined MAIL or RCPT reply arrives
# while later commands are still pending, and only the last command of the group
# (DATA) decides where the transaction stands.  ``_INVALID`` marks a reply class the
# command cannot get from a conforming server (a 3xx to MAIL, a 2xx to DATA):
# RemoteProtocolError, since guessing what the server meant could lose or duplicate
# mail.  421 and a refused greeting close the connection whatever the table says.
_KEEP: Final = "keep"
_INVALID: Final = "invalid"
_Outcome = State | Literal["keep", "invalid"]
_ON_REPLY: dict[Command, tuple[_Outcome, _Outcome, _Outcome]] = {
    Command.GREETING: (State.CONNECTED, _INVALID, State.CLOSED),
    Command.EHLO: (State.READY, _INVALID, _KEEP),
    Command.HELO: (State.READY, _INVALID, _KEEP),
    Command.STARTTLS: (State.TLS_HANDSHAKE, _INVALID, State.READY),
    Command.AUTH: (State.READY, State.AUTH_CHALLENGE, State.READY),
    Command.AUTH_RESPONSE: (State.READY, State.AUTH_CHALLENGE, State.READY),
    Command.MAIL: (_KEEP, _INVALID, _KEEP),
    Command.RCPT: (_KEEP, _INVALID, _KEEP),
    Command.DATA: (_INVALID, State.BODY, State.READY),
    Command.BODY: (State.READY, _INVALID, State.READY),
    Command.BDAT: (State.READY, _INVALID, State.READY),
    Command.RSET: (_KEEP, _INVALID, _KEEP),
    Command.NOOP: (_KEEP, _INVALID, _KEEP),
    Command.QUIT: (State.CLOSED, _INVALID, State.CLOSED),
}

# 354 is the only 3xx DATA may get; 334 the only one AUTH may get.
_EXPECTED_3XX = {Command.DATA: 354, Command.AUTH: 334, Command.AUTH_RESPONSE: 334}


@attrs.frozen
class Reply:
    """One complete SMTP reply.

    Attributes:
        code: The three-digit reply code.
        lines: The text of each line, without code, separator or CRLF.
        enhanced: The RFC 3463 enhanced status code of the first line (``"2.1.0"``)
            when the server sent one, else ``None``.
        command: The command this reply answers.
    """

    code: int = attrs.field(validator=[attrs.validators.ge(200), attrs.validators.le(599)])
    lines: tuple[str, ...] = attrs.field(validator=attrs.validators.min_len(1))
    command: Command
    enhanced: str | None = None

    @property
    def text(self) -> str:
        """All lines joined with newlines, enhanced codes removed."""
        if self.enhanced is None:
            return "\n".join(self.lines)
        prefix = self.enhanced
        return "\n".join(
            line[len(prefix) :].lstrip(" ") if line.startswith(prefix) else line
            for line in self.lines
        )

    @property
    def is_success(self) -> bool:
        """True for 2xx replies."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """True for 3xx replies (354 after DATA, 334 during AUTH)."""
        return 300 <= self.code < 400

    @property
    def is_error(self) -> bool:
        """True for 4xx and 5xx replies."""
        return self.code >= 400


def error_for_reply(reply: Reply, command: str | None = None) -> SMTPReplyError:
    """Build the error that stands for a 4xx or 5xx reply.

    Args:
        reply: The error reply.
        command: The command name to report; defaults to the reply's command.

    Returns:
        :class:`SMTPTransientError` for 4xx, :class:`SMTPPermanentError` for 5xx.
    """
    name = command if command is not None else reply.command.value
    cls = SMTPTransientError if reply.code < 500 else SMTPPermanentError
    return cls(name, reply.code, reply.text, reply.enhanced)


@attrs.frozen
class Extensions:
    """What the server announced in its EHLO reply.

    Attributes:
        size: The SIZE limit in bytes (``0`` means "announced, no fixed limit"), or
            ``None`` when SIZE was not announced.
        pipelining: PIPELINING (RFC 2920).
        eightbitmime: 8BITMIME (RFC 6152).
        smtputf8: SMTPUTF8 (RFC 6531).
        starttls: STARTTLS (RFC 3207).
        chunking: CHUNKING, the BDAT command (RFC 3030).
        enhancedstatuscodes: ENHANCEDSTATUSCODES (RFC 2034).
        auth: Upper-case SASL mechanism names offered with AUTH.
        keywords: Every keyword announced, upper-case, mapped to its parameters.
    """

    size: int | None = None
    pipelining: bool = False
    eightbitmime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    chunking: bool = False
    enhancedstatuscodes: bool = False
    auth: frozenset[str] = frozenset()
    keywords: Mapping[str, str] = attrs.field(factory=dict)


def parse_extensions(reply: Reply) -> Extensions:
    """Read the extensions out of a successful EHLO reply.

    The first line is the server's greeting name; every later line is a keyword
    optionally followed by parameters.  Unknown or malformed lines are kept in
    ``keywords`` or skipped -- an odd extension line is no reason to refuse a server.

    Args:
        reply: The 250 reply to EHLO.

    Returns:
        The announced extensions.
    """
    keywords: dict[str, str] = {}
    auth: set[str] = set()
    size: int | None = None
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        # Some old servers announce "AUTH=LOGIN PLAIN"; accept it as AUTH.
        if keyword.startswith("AUTH="):
            params = keyword[5:] + " " + params
            keyword = "AUTH"
        if not keyword:
            continue
        params = params.strip()
        keywords[keyword] = params if keyword not in keywords else keywords[keyword] + " " + params
        if keyword == "AUTH":
            auth.update(mech.upper() for mech in params.split())
        elif keyword == "SIZE":
            token = params.split()[0] if params.split() else ""
            # str.isdigit() would accept "²" or Arabic-Indic digits (the text is
            # decoded UTF-8) and int() would then raise: only ASCII digits count.
            size = int(token) if _SIZE_VALUE.fullmatch(token) else 0
    return Extensions(
        size=size,
        pipelining="PIPELINING" in keywords,
        eightbitmime="8BITMIME" in keywords,
        smtputf8="SMTPUTF8" in keywords,
        starttls="STARTTLS" in keywords,
        chunking="CHUNKING" in keywords,
        enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
        auth=frozenset(auth),
        keywords=keywords,
    )


def normalize_crlf(data: bytes) -> bytes:
    """Make every line ending CRLF and end the data with one (content for BDAT).

    Bare LF and bare CR both become CRLF (RFC 5321 2.3.8 forbids them on the wire).

    Args:
        data: The message in any line-ending convention.

    Returns:
        The message with CRLF line endings, ending in CRLF unless empty.
    """
    # Already CRLF throughout (the usual case: every CR and every LF is part of a
    # CRLF pair): three counting passes, no copy of a possibly large message.
    crlf = data.count(b"\r\n")
    if not (data.count(b"\n") == crlf and data.count(b"\r") == crlf):
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        data = data.replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def encode_data(data: bytes) -> bytes:
    """Turn message bytes into the wire form of SMTP DATA content.

    Line endings become CRLF (bare LF and bare CR alike, as RFC 5321 2.3.8 forbids
    them on the wire), every line starting with "." gets another "." (RFC 5321
    4.5.2), and the terminating ``.CRLF`` is appended.  Works with bytes.replace so
    a multi-megabyte body costs a few C passes, not a Python loop per line.

    Args:
        data: The message, headers and body, in any line-ending convention.

    Returns:
        The bytes to send after the 354 reply, including the final ``.\\r\\n``.
    """
    data = normalize_crlf(data)
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def decode_data(wire: bytes) -> bytes:
    """Undo :func:`encode_data` (for servers and tests): unstuff and drop the ``.``.

    Args:
        wire: DATA content including the terminating ``.\\r\\n``.

    Returns:
        The message with CRLF line endings.

    Raises:
        ValueError: the content is not terminated by ``.\\r\\n`` on its own line.
    """
    if wire == b".\r\n":
        return b""
    if not wire.endswith(b"\r\n.\r\n"):
        raise ValueError("DATA content must end with CRLF . CRLF")
    body = wire[: -len(b".\r\n")]
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def check_address(address: str, what: str) -> None:
    if _UNSAFE_ADDRESS.search(address):
        raise LocalProtocolError(
            f"{what} address contains a control character, space or angle bracket: {address!r}"
        )
    if len(address) > 512:
        # RFC 5321 4.5.3.1.3: a path is at most 256 octets; 512 allows for SMTPUTF8.
        raise LocalProtocolError(f"{what} address is longer than 512 characters")


def _check_param(value: str, what: str) -> None:
    if _UNSAFE.search(value):
        raise LocalProtocolError(f"{what} contains a control character: {value!r}")


def _excerpt(data: bytes | bytearray) -> bytes:
    return bytes(data[:EXCERPT_LIMIT])


class _ReplyFramer:
    """Splits received bytes into complete replies; owns the size limits."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._code = b""  # the code of the reply being collected, b"" between replies
        self._lines: list[bytes] = []
        self._reply_bytes = 0
        # Where to resume the search for CRLF, so a reply that arrives one byte at
        # a time is not rescanned from the start each time (quadratic otherwise).
        self._scan_from = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data
        # Reject an over-long unfinished line as soon as it is one, rather than
        # when the caller next asks for a reply.  Complete lines are checked in
        # next_reply; the caller drains replies after every read, so the buffer of
        # complete lines is bounded by one read.
        self._check_unfinished_line()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def discard(self) -> int:
        dropped = len(self._buffer)
        self._buffer.clear()
        self._code = b""
        self._lines.clear()
        self._reply_bytes = 0
        self._scan_from = 0
        return dropped

    def _check_unfinished_line(self) -> None:
        if self._buffer.find(b"\n", self._scan_from) >= 0:
            return
        self._scan_from = len(self._buffer)
        if len(self._buffer) > MAX_LINE_LENGTH:
            raise RemoteProtocolError(
                f"reply line longer than {MAX_LINE_LENGTH} bytes", excerpt=_excerpt(self._buffer)
            )

    def next_reply(self) -> tuple[int, list[bytes]] | None:
        """Return (code, raw texts) of the next complete reply, or None for more data."""
        buffer = self._buffer
        # Lines are parsed where they lie; the consumed prefix is dropped once, when
        # the reply is complete or the complete lines run out.
        start = 0
        end = buffer.find(b"\n", self._scan_from)
        while end >= 0:
            if end + 1 - start > MAX_LINE_LENGTH:
                raise RemoteProtocolError(
                    f"reply line longer than {MAX_LINE_LENGTH} bytes",
                    excerpt=_excerpt(buffer[start : end + 1]),
                )
            # RFC 5321 wants CRLF; bare LF is tolerated (several servers and proxies
            # send it), a CR elsewhere in the line is not.
            stop = end - 1 if end > start and buffer[end - 1] == 0x0D else end
            match = _REPLY_LINE.fullmatch(buffer, start, stop)
            if match is None:
                raise RemoteProtocolError(
                    "malformed SMTP reply line", excerpt=_excerpt(buffer[start : end + 1])
                )
            code, sep, text = match.groups()
            if not self._code:
                self._code = code
            elif code != self._code:
                raise RemoteProtocolError(
                    "reply code changed inside a multi-line reply",
                    excerpt=_excerpt(buffer[start : end + 1]),
                )
            self._lines.append(text)
            self._reply_bytes += end + 1 - start
            if len(self._lines) > MAX_REPLY_LINES or self._reply_bytes > MAX_REPLY_BYTES:
                raise RemoteProtocolError(
                    f"reply longer than {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes",
                    excerpt=_excerpt(buffer[start : end + 1]),
                )
            start = end + 1
            if sep != b"-":
                del buffer[:start]
                self._scan_from = 0
                lines, self._lines, self._reply_bytes = self._lines, [], 0
                code, self._code = self._code, b""
                return int(code), lines
            end = buffer.find(b"\n", start)
        if start:
            del buffer[:start]
            self._scan_from = 0
        self._check_unfinished_line()
        return None


class SMTPProtocol:
    """The client side of an SMTP conversation, without I/O.

    Usage: feed everything read from the server to :meth:`receive_data`, call
    :meth:`next_reply` until it returns ``None``, and write whatever the ``send_*``
    methods return.  The object starts waiting for the server's greeting.

    Attributes:
        state: The current :class:`State`.
        extensions: What the last successful EHLO announced (empty before).
    """

    def __init__(self) -> None:
        self.state = State.GREETING
        self.extensions = Extensions()
        self._framer = _ReplyFramer()
        self._pending: deque[Command] = deque([Command.GREETING])
        self._closed_reason: str | None = None

    # ----- input ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many commands still wait for their reply."""
        return len(self._pending)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the server.

        Args:
            data: Any chunk of the server's output; ``b""`` is not allowed (EOF is
                the transport's business: the connection is broken).

        Raises:
            RemoteProtocolError: an unfinished line already exceeds the limits.
        """
        if data:
            try:
                self._framer.feed(data)
            except RemoteProtocolError:
                self._close("protocol error")
                raise

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or ``None`` when more data is needed.

        Raises:
            RemoteProtocolError: the server broke the reply grammar, exceeded a
                limit, or replied when no command was pending, or gave a reply class
                the command does not allow.  The protocol is closed afterwards.
        """
        try:
            framed = self._framer.next_reply()
        except RemoteProtocolError:
            self._close("protocol error")
            raise
        if framed is None:
            return None
        code, raw_lines = framed
        texts = tuple([raw.decode("utf-8", "replace") for raw in raw_lines])
        if not self._pending:
            self._close("unsolicited reply")
            raise RemoteProtocolError(
                "reply received when no command was pending",
                excerpt=(str(code) + texts[0]).encode()[:EXCERPT_LIMIT],
            )
        command = self._pending.popleft()
        enhanced = None
        # Parsed whether or not ENHANCEDSTATUSCODES was announced (the greeting and
        # EHLO reply come before we know), but only trusted when its class agrees
        # with the reply code, so ordinary text starting with digits is not taken.
        match = _ENHANCED.match(texts[0])
        if match is not None and match.group(1) == str(code)[0]:
            enhanced = match.group(0).rstrip(" ")
        reply = Reply(code=code, lines=texts, command=command, enhanced=enhanced)
        self._apply_reply(reply)
        return reply

    def _apply_reply(self, reply: Reply) -> None:
        code, command = reply.code, reply.command
        if code == 421 or (command is Command.GREETING and code >= 400):
            # RFC 5321 3.8: 421 means the server is closing the transmission channel,
            # whatever command it answers; a 4xx/5xx greeting means "go away".
            self._close(f"server replied {code}")
            return
        on_2xx, on_3xx, on_error = _ON_REPLY[command]
        if code < 300:
            outcome = on_2xx
            if command is Command.EHLO:
                self.extensions = parse_extensions(reply)
            elif command is Command.HELO:
                self.extensions = Extensions()
        elif code < 400:
            outcome = on_3xx if _EXPECTED_3XX.get(command) == code else _INVALID
        else:
            outcome = on_error
        if outcome == _INVALID:
            self._close("invalid reply")
            raise RemoteProtocolError(
                f"{code} is not a valid reply to {command.value}",
                excerpt=f"{code} {reply.lines[0]}".encode()[:EXCERPT_LIMIT],
            )
        # Only the reply to the last command sent moves the state: replies to
        # earlier commands of a pipelined group arrive after the optimistic send
        # side has already moved on (e.g. the next MAIL after a BDAT LAST).
        if isinstance(outcome, State) and (not self._pending or outcome is State.CLOSED):
            self.state = outcome
        if self.state is State.CLOSED:
            self._close("QUIT" if command is Command.QUIT else f"server replied {code}")

    def _close(self, reason: str) -> None:
        self.state = State.CLOSED
        self._closed_reason = reason
        self._pending.clear()

    # ----- output --------------------------------------------------------------

    def _send(self, command: Command, line: bytes) -> bytes:
        if self.state is State.CLOSED:
            raise ConnectionBrokenError(
                f"the SMTP connection is closed ({self._closed_reason or 'closed'})"
            )
        following = _SEND[self.state].get(command)
        if following is None:
            raise LocalProtocolError(f"cannot send {command.value} in state {self.state.value}")
        self.state = following
        self._pending.append(command)
        return line

    def send_ehlo(self, hostname: str) -> bytes:
        """Encode ``EHLO hostname``.

        Raises:
            LocalProtocolError: the name is empty or has spaces or controls, or EHLO
                is not allowed in the current state.
        """
        return self._send(Command.EHLO, b"EHLO " + _ehlo_name(hostname) + _CRLF)

    def send_helo(self, hostname: str) -> bytes:
        """Encode ``HELO hostname`` (the fallback when EHLO is refused)."""
        return self._send(Command.HELO, b"HELO " + _ehlo_name(hostname) + _CRLF)

    def send_starttls(self) -> bytes:
        """Encode ``STARTTLS``."""
        return self._send(Command.STARTTLS, b"STARTTLS\r\n")

    def start_tls(self) -> int:
        """Record that the TLS handshake is about to run (after the 220 to STARTTLS).

        Everything received but not yet consumed came before the handshake and is
        dropped (RFC 3207 5: a man in the middle could have injected it in clear
        text).  The extensions are forgotten; the client must send EHLO again.

        Returns:
            How many buffered bytes were dropped.

        Raises:
            LocalProtocolError: not in the TLS handshake state.
        """
        if self.state is not State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"no STARTTLS was accepted (state {self.state.value})")
        self.extensions = Extensions()
        self.state = State.CONNECTED
        return self._framer.discard()

    def send_auth(self, mechanism: str, initial_response: bytes | None = None) -> bytes:
        """Encode ``AUTH mechanism [initial-response]``.

        Args:
            mechanism: The SASL mechanism name, e.g. ``"PLAIN"``.
            initial_response: Raw bytes to send base64-encoded on the same line
                (RFC 4954 4); ``b""`` is sent as ``=``.

        Raises:
            LocalProtocolError: the mechanism name is not a plain token.
        """
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", mechanism):
            raise LocalProtocolError(f"invalid SASL mechanism name {mechanism!r}")
        line = b"AUTH " + mechanism.upper().encode("ascii")
        if initial_response is not None:
            line += b" " + (base64.b64encode(initial_response) or b"=")
        return self._send(Command.AUTH, line + _CRLF)

    def send_auth_response(self, response: bytes) -> bytes:
        """Encode one response line to a 334 challenge (base64 of ``response``)."""
        return self._send(Command.AUTH_RESPONSE, base64.b64encode(response) + _CRLF)

    def send_auth_cancel(self) -> bytes:
        """Encode ``*``, which abandons an AUTH exchange (RFC 4954 4)."""
        return self._send(Command.AUTH_RESPONSE, b"*\r\n")

    def send_mail(
        self,
        sender: str,
        *,
        size: int | None = None,
        eightbit: bool = False,
        smtputf8: bool = False,
        params: Iterable[str] = (),
    ) -> bytes:
        """Encode ``MAIL FROM:<sender>`` with its ESMTP parameters.

        Args:
            sender: The envelope sender; ``""`` for the null reverse-path.
            size: Add ``SIZE=`` (only when the server announced SIZE).
            eightbit: Add ``BODY=8BITMIME``.
            smtputf8: Add ``SMTPUTF8``.
            params: Further raw ``KEY=VALUE`` parameters.

        Raises:
            LocalProtocolError: the address or a parameter could break the command
                line, or MAIL is not allowed now.
        """
        check_address(sender, "sender")
        words = [b"MAIL FROM:<" + sender.encode("utf-8") + b">"]
        if size is not None:
            words.append(b"SIZE=%d" % size)
        if eightbit:
            words.append(b"BODY=8BITMIME")
        if smtputf8:
            words.append(b"SMTPUTF8")
        for param in params:
            _check_param(param, "MAIL parameter")
            words.append(param.encode("utf-8"))
        return self._send(Command.MAIL, b" ".join(words) + _CRLF)

    def send_rcpt(self, recipient: str, *, params: Iterable[str] = ()) -> bytes:
        """Encode ``RCPT TO:<recipient>``.

        Raises:
            LocalProtocolError: the address is empty or could break the command line,
                or RCPT is not allowed now.
        """
        if not recipient:
            raise LocalProtocolError("recipient address is empty")
        check_address(recipient, "recipient")
        words = [b"RCPT TO:<" + recipient.encode("utf-8") + b">"]
        for param in params:
            _check_param(param, "RCPT parameter")
            words.append(param.encode("utf-8"))
        return self._send(Command.RCPT, b" ".join(words) + _CRLF)

    def send_data(self) -> bytes:
        """Encode ``DATA``."""
        return self._send(Command.DATA, b"DATA\r\n")

    def send_body(self, data: bytes) -> bytes:
        """Encode message content after a 354 (see :func:`encode_data`)."""
        return self._send(Command.BODY, encode_data(data))

    def send_body_encoded(self, wire: bytes) -> bytes:
        """Like :meth:`send_body` for content already passed through :func:`encode_data`.

        Raises:
            LocalProtocolError: ``wire`` does not end with the ``.CRLF`` terminator.
        """
        if not (wire == b".\r\n" or wire.endswith(b"\r\n.\r\n")):
            raise LocalProtocolError("encoded message content must end with CRLF . CRLF")
        return self._send(Command.BODY, wire)

    def send_bdat_last(self, content: bytes, *, crlf_normalized: bool = False) -> bytes:
        """Encode ``BDAT <size> LAST`` followed by the whole message (RFC 3030).

        Unlike DATA there is no 354 to wait for, so with PIPELINING the message can
        go out in the same write as MAIL and RCPT, and no dot-stuffing is needed.

        Args:
            content: The message; line endings are normalised to CRLF here.
            crlf_normalized: ``content`` already went through :func:`normalize_crlf`
                (saves passes over a large message).

        Raises:
            LocalProtocolError: BDAT is not allowed now (no RCPT sent yet).
        """
        if not crlf_normalized:
            content = normalize_crlf(content)
        return self._send(Command.BDAT, b"BDAT %d LAST\r\n" % len(content) + content)

    def send_rset(self) -> bytes:
        """Encode ``RSET``."""
        return self._send(Command.RSET, b"RSET\r\n")

    def send_noop(self) -> bytes:
        """Encode ``NOOP``."""
        return self._send(Command.NOOP, b"NOOP\r\n")

    def send_quit(self) -> bytes:
        """Encode ``QUIT``."""
        return self._send(Command.QUIT, b"QUIT\r\n")


def _ehlo_name(hostname: str) -> bytes:
    if not _EHLO_NAME.fullmatch(hostname) or len(hostname) > 255:
        raise LocalProtocolError(f"invalid EHLO/HELO name {hostname!r}")
    return hostname.encode("ascii")


def mail_options(
    data: bytes,
    sender: str,
    recipients: Iterable[str],
    ext: Extensions,
    *,
    wire_size: int | None = None,
    smtputf8: bool = False,
) -> tuple[int | None, bool, bool]:
    """Decide the MAIL FROM parameters a message needs.

    Args:
        data: The message bytes.
        sender: The envelope sender.
        recipients: The envelope recipients.
        ext: The server's extensions.
        wire_size: The size of the content as it goes on the wire (CRLF line
            endings, dot-stuffed); ``len(data)`` when not given.
        smtputf8: Flag the message SMTPUTF8 even with an ASCII envelope (an
            RFC 6532 message whose headers must not be downgraded).

    Returns:
        ``(size, eightbit, smtputf8)`` for :meth:`SMTPProtocol.send_mail`.

    Raises:
        LocalProtocolError: the message is larger than the server's SIZE limit,
            has 8-bit data and the server lacks 8BITMIME, or needs SMTPUTF8 (non-ASCII
            addresses, or asked for) and the server lacks it.
    """
    size = None
    if ext.size is not None:
        size = len(data) if wire_size is None else wire_size
        if ext.size and size > ext.size:
            raise LocalProtocolError(
                f"message of {size} bytes exceeds the server's SIZE limit of {ext.size} bytes"
            )
    eightbit = not data.isascii()
    if eightbit and not ext.eightbitmime:
        raise LocalProtocolError(
            "message has 8-bit data but the server does not offer 8BITMIME; "
            "encode it (quoted-printable/base64) first"
        )
    # SMTPUTF8 is flagged when the envelope needs it (or the caller asks), not
    # merely because a header holds raw UTF-8: a flagged message must find SMTPUTF8
    # on every later hop or bounce (Postfix in front of Dovecot 2.3 LMTP does
    # exactly that), while raw UTF-8 headers under BODY=8BITMIME are delivered
    # everywhere in practice -- the choice smtplib and aiosmtplib make too.
    needs_utf8 = smtputf8 or not sender.isascii() or not all(r.isascii() for r in recipients)
    if needs_utf8 and not ext.smtputf8:
        raise LocalProtocolError(
            "non-ASCII envelope address (or SMTPUTF8 asked for) but the server does not "
            "offer SMTPUTF8"
        )
    return size, eightbit, needs_utf8


def decode_challenge(reply: Reply) -> bytes:
    """Decode the base64 text of a 334 challenge.

    Raises:
        RemoteProtocolError: the challenge is not valid base64.
    """
    text = reply.lines[0].strip()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(
            "334 challenge is not base64", excerpt=text.encode()[:EXCERPT_LIMIT]
        ) from None
