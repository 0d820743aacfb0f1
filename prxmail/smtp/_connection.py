# Theory of operation
# -------------------
#
# SMTPConnection moves bytes between a trio stream and the sans-I/O SMTPProtocol;
# every protocol decision (what may be sent, what a reply means for the state) is
# made there.  This layer adds what needs I/O: the TLS upgrade, the AUTH dialogue,
# pipelining (write MAIL, RCPTs and DATA at once, then read the replies in order),
# and the rules about a connection that can no longer be trusted.
#
# A connection is "broken" when an operation stopped half-way with commands still
# unanswered (cancellation, a timeout at the caller, a transport error, a protocol
# error), or when the server closed it (EOF, 421).  From then on every call raises
# ConnectionBrokenError: a half-read reply would otherwise be taken as the answer
# to the next command.  An error reply (4xx/5xx) leaves the protocol in step, so
# the connection stays usable.  An operation cancelled before its first byte is
# written changes nothing (each starts with checkpoint_if_cancelled).  No background
# tasks: each call does its I/O inline, and only one task may use a connection at a
# time.
#
# That is one state value, Link (READY, BUSY, BROKEN, CLOSED; trio's _ssl.py is the
# model), read by _check() and changed by _transition() against LINK_TRANSITIONS.
# Transport errors (trio's Broken/ClosedResourceError, OSError such as a refused
# connect) become ConnectionBrokenError in one place, transport_failures().
#
# SMTPSender sits on top: it owns one connection at a time, reuses it for many
# messages, and opens a new one when the old one is broken -- retrying a message
# on a fresh connection only when the old connection failed before any message
# content was written, so a message is never sent twice.

from __future__ import annotations

import base64
import contextlib
import functools
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import attrs
import trio

from prxmail._link import LINK_TRANSITIONS, Link, transport_failures
from prxmail._redact import Redactor
from prxmail._tls import Security, shared_ssl_context
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    LocalProtocolError,
    PrxmailError,
    RemoteProtocolError,
    SMTPPermanentError,
    SMTPReplyError,
    SMTPTransientError,
    TLSError,
)
from prxmail.oauth2._sasl import (
    ERROR_ACKNOWLEDGEMENT,
    decode_error_challenge,
    oauthbearer_initial_response,
    preferred_mechanism,
    xoauth2_initial_response,
)
from prxmail.smtp._protocol import (
    Extensions,
    Reply,
    SMTPProtocol,
    State,
    check_address,
    decode_challenge,
    encode_data,
    error_for_reply,
    mail_options,
    normalize_crlf,
)

__all__ = [
    "IDLE_PROBE_SECONDS",
    "MAX_PIPELINED_MESSAGES",
    "BatchOutcome",
    "MailTransaction",
    "RecipientResult",
    "SMTPConnection",
    "SMTPSender",
    "SendResult",
    "connect_smtp",
    "open_smtp_connection",
    "open_smtp_sender",
]

# Bytes asked of the transport per read.  Replies are small; 64 KiB lets a burst of
# pipelined replies arrive in one read without letting one read buffer much.
RECEIVE_SIZE = 64 * 1024

# How long aclose() waits for the 221 to a courtesy QUIT.  Nothing depends on that
# reply (any message was already accepted or refused), so a server that does not
# answer quickly must not hold the caller's shutdown.
QUIT_GRACE_SECONDS = 2.0

# How many messages send_messages keeps in flight (written, replies not yet read).
# The server queues its replies to them; if it could not write them because we are
# busy writing and not reading, both sides would block.  16 messages with their
# RSET, MAIL, RCPTs and BDAT replies stay far below any socket buffer, as does the
# command cap below for messages with many recipients, while already keeping the
# server from ever waiting for us.  Messages are written half a window at a time
# (one write, one TLS record for 8 small messages), so the other half keeps the
# server busy while we read.  Measured against the test Postfix (500 small
# messages, medians of 3-5 rounds on a loaded 2-CPU machine): one message at a
# time 167 msg/s, 4 -> 225, 16 -> 278; with grouped writes 8/16/32/64 were within
# the run-to-run noise of each other (244-266 in one run, 354-443 in another).
# Past 16 the server's per-message work is the limit, and a larger window only
# means more messages in the "outcome unknown" state when a connection drops.
MAX_PIPELINED_MESSAGES = 16
MAX_PIPELINED_COMMANDS = 256

# SMTPSender checks a connection with NOOP before using it again after this much
# idle time.  With CHUNKING the message goes out in the same write as MAIL, so a
# connection found dead only on reading cannot be retried safely (the message might
# have been taken); a NOOP round trip costs under a millisecond on a live
# connection, and servers drop idle clients after tens of seconds to minutes, so a
# second of idleness is where the check starts paying for itself.  Back-to-back
# sends (a queue being drained) never pay it.
IDLE_PROBE_SECONDS = 1.0

# States in which an interrupted operation leaves the conversation out of step.
_UNSETTLED = frozenset(
    {
        State.GREETING,
        State.STARTTLS,
        State.TLS_HANDSHAKE,
        State.AUTH,
        State.AUTH_CHALLENGE,
        State.DATA,
        State.BODY,
        State.BODY_SENT,
    }
)


@attrs.frozen
class RecipientResult:
    """What the server said to one ``RCPT TO``.

    Attributes:
        address: The recipient address.
        reply: The server's reply to its RCPT command.
    """

    address: str
    reply: Reply

    @property
    def accepted(self) -> bool:
        """True when the server accepted this recipient (2xx)."""
        return self.reply.is_success


@attrs.frozen
class SendResult:
    """The outcome of a message the server accepted for at least one recipient.

    Attributes:
        reply: The server's final reply to the message content (``250 ... queued``).
        recipients: One result per recipient, in the order given.
    """

    reply: Reply
    recipients: tuple[RecipientResult, ...]

    @property
    def accepted(self) -> tuple[str, ...]:
        """Addresses the server accepted."""
        return tuple(r.address for r in self.recipients if r.accepted)

    @property
    def refused(self) -> tuple[RecipientResult, ...]:
        """Recipients the server refused (partial success when not empty)."""
        return tuple(r for r in self.recipients if not r.accepted)


def _recipient_tuple(value: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("recipients must be a sequence of addresses, not a str")
    return tuple(value)


@attrs.frozen
class MailTransaction:
    """One message for :meth:`SMTPConnection.send_messages`.

    Attributes:
        sender: Envelope sender (``""`` for the null sender).
        recipients: Envelope recipients, at least one.
        data: The message, headers and body.
        smtputf8: Flag the message SMTPUTF8 (see :meth:`SMTPConnection.send_message`).
    """

    sender: str
    recipients: tuple[str, ...] = attrs.field(converter=_recipient_tuple)
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    smtputf8: bool = False


@attrs.frozen
class BatchOutcome:
    """What became of one message of :meth:`SMTPConnection.send_messages`.

    Exactly one of ``result`` and ``error`` is set.

    Attributes:
        result: The server accepted the message (for some or all recipients).
        error: Why it was not accepted: an :class:`SMTPReplyError` (refused; the
            code says whether to retry) or :class:`ConnectionBrokenError` /
            :class:`RemoteProtocolError` (the connection failed).
        content_sent: The message content was written.  With a connection error
            this means the outcome is unknown -- the server may have taken it;
            without it, the message certainly was not delivered and may be sent
            again.
    """

    result: SendResult | None = None
    error: PrxmailError | None = None
    content_sent: bool = False

    @property
    def accepted(self) -> bool:
        """True when the server accepted the message."""
        return self.result is not None


def _default_local_hostname() -> str:
    # gethostname() needs no DNS lookup (getfqdn() may block for seconds); a bare
    # host name is what most clients send, and "localhost" is the fallback when
    # the system name is not a valid EHLO argument.
    name = socket.gethostname()
    if name and name.isascii() and all(c.isalnum() or c in "-." for c in name):
        return name
    return "localhost"


class SMTPConnection:
    """An SMTP client connection over any trio stream.

    Build it on a stream you opened (plain TCP for ``STARTTLS``/``PLAIN``, a
    ``trio.SSLStream`` for implicit ``TLS``), then call :meth:`handshake` (or the
    steps :meth:`read_greeting`, :meth:`ehlo`, :meth:`starttls` one by one, as the
    doctor does), :meth:`login`, and :meth:`send_message` as often as needed.
    :func:`open_smtp_connection` does the opening for you.

    Only one task may use a connection at a time.  If a call is interrupted
    half-way (cancelled, timed out, transport error, protocol error) the connection
    is broken and every later call raises :class:`ConnectionBrokenError`.

    Args:
        stream: The transport.
        security: How the stream is (to be) protected.  ``STARTTLS`` makes
            :meth:`handshake` upgrade and :meth:`login` refuse to run without TLS.
        ssl_context: Context for STARTTLS; a verifying default when ``None``.
        server_hostname: The name the server certificate must match (STARTTLS).
        local_hostname: The name sent with EHLO; the system host name by default.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        security: Security = Security.TLS,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_hostname: str | None = None,
    ) -> None:
        self._stream = stream
        self._security = security
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._local_hostname = local_hostname or _default_local_hostname()
        self._proto = SMTPProtocol()
        self._tls_active = isinstance(stream, trio.SSLStream)
        self._greeting: Reply | None = None
        self._link = Link.READY
        self._broken_reason = ""
        self._needs_rset = False
        # Set when message content began to go out in the current send_message; the
        # sender must not retry such a message elsewhere (it may have been accepted).
        self._content_started = False
        self._authenticated = False
        # BDAT stays the default.  A bench run once showed DATA ahead (253 vs 203
        # msg/s), but measured one against the other in the same process and
        # rounds the gap was noise from a loaded machine: Postfix spends the same
        # CPU per message on either (smtpd ~0.3-0.5 ms; cleanup's queue file and
        # delivery dominate), while DATA costs us a second write, a second read
        # and ~50% more client CPU -- and on a real network a second round trip.
        self._use_chunking = True
        self._last_activity = trio.current_time() if _in_trio() else 0.0

    def __repr__(self) -> str:
        state = (
            f"{self._link.value}: {self._broken_reason}"
            if self.is_broken
            else self._proto.state.value
        )
        return f"<SMTPConnection {self._server_hostname or '?'} {self._security.value} {state}>"

    # ----- properties ----------------------------------------------------------

    @property
    def extensions(self) -> Extensions:
        """What the server's last EHLO reply announced."""
        return self._proto.extensions

    @property
    def greeting(self) -> Reply | None:
        """The server's 220 greeting, once read."""
        return self._greeting

    @property
    def tls_active(self) -> bool:
        """True when the stream is encrypted (implicit TLS or after STARTTLS)."""
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        """True after a successful :meth:`login` / :meth:`authenticate_xoauth2`."""
        return self._authenticated

    @property
    def is_broken(self) -> bool:
        """True once the connection cannot be used any more."""
        return self._link in (Link.BROKEN, Link.CLOSED)

    @property
    def use_chunking(self) -> bool:
        """Send messages with BDAT when the server offers CHUNKING and PIPELINING.

        On by default: the whole message then goes out in one write with its
        envelope, one round trip per message instead of two.  Set to ``False``
        to always use DATA.
        """
        return self._use_chunking

    @use_chunking.setter
    def use_chunking(self, value: bool) -> None:
        self._use_chunking = value

    @property
    def idle_seconds(self) -> float:
        """Seconds (trio clock) since the connection last finished talking to the server."""
        return trio.current_time() - self._last_activity

    @property
    def content_started(self) -> bool:
        """True when the last send_message began writing message content.

        After a failure with this set, the server may have accepted the message;
        sending it again could deliver it twice.
        """
        return self._content_started

    @property
    def stream(self) -> trio.abc.Stream:
        """The current transport (a ``trio.SSLStream`` after STARTTLS)."""
        return self._stream

    # ----- plumbing ------------------------------------------------------------

    def _check(self, *, starting: bool = False) -> None:
        """Raise unless the connection can be used (and, with ``starting``, unless a
        new operation may start: no other is running).

        Raises:
            ConnectionBrokenError: broken or closed.
            LocalProtocolError: another operation is running.
        """
        if self._link is Link.BROKEN or self._link is Link.CLOSED:
            raise ConnectionBrokenError(
                f"the SMTP connection is {self._link.value} ({self._broken_reason})"
            )
        if starting and self._link is Link.BUSY:
            raise LocalProtocolError("another task is already using this SMTP connection")

    def _transition(self, new: Link, reason: str = "") -> None:
        """Move to ``new`` (see :data:`LINK_TRANSITIONS`); the only writer of the state."""
        old = self._link
        if old in (Link.BROKEN, Link.CLOSED) and new is not Link.CLOSED:
            return  # sticky: the first cause stays
        if old is Link.READY and new is Link.READY:
            return  # finishing twice changes nothing
        if new not in LINK_TRANSITIONS[old]:
            raise AssertionError(f"SMTP connection cannot go from {old.value} to {new.value}")
        self._link = new
        if new is Link.BROKEN or (new is Link.CLOSED and old is not Link.BROKEN):
            self._broken_reason = reason

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        self._check(starting=True)
        self._transition(Link.BUSY)
        try:
            yield
        except BaseException as exc:
            state = self._proto.state
            if state is State.CLOSED:
                self._transition(Link.BROKEN, "the server closed the connection")
            elif self._proto.pending or state in _UNSETTLED:
                reason = "cancelled" if isinstance(exc, trio.Cancelled) else type(exc).__name__
                self._transition(Link.BROKEN, f"an operation was interrupted half-way ({reason})")
            raise
        finally:
            self._last_activity = trio.current_time()
            if self._proto.state is State.CLOSED:
                self._transition(Link.BROKEN, "the session was closed")
            self._transition(Link.READY)

    async def _write(self, data: bytes) -> None:
        # Not marked broken here: a batch may still read the replies that arrived
        # before the failure (the _operation guard marks it after).
        with transport_failures("SMTP connection lost while sending"):
            await self._stream.send_all(data)

    async def _read_reply(self) -> Reply:
        self._check()
        while True:
            reply = self._proto.next_reply()
            if reply is not None:
                if reply.code == 421:
                    self._transition(
                        Link.BROKEN, f"the server closed the connection: 421 {reply.text}"
                    )
                return reply
            try:
                with transport_failures("SMTP connection lost while receiving"):
                    data = await self._stream.receive_some(RECEIVE_SIZE)
            except ConnectionBrokenError:
                self._transition(Link.BROKEN, "receiving failed")
                raise
            if not data:
                self._transition(Link.BROKEN, "the server closed the connection")
                raise ConnectionBrokenError("the SMTP server closed the connection")
            self._proto.receive_data(data)

    async def _command(self, data: bytes) -> Reply:
        await self._write(data)
        return await self._read_reply()

    # ----- session setup -------------------------------------------------------

    async def read_greeting(self) -> Reply:
        """Read the server's greeting.

        Returns:
            The 220 reply.

        Raises:
            SMTPReplyError: the server greeted with 4xx/5xx (the connection closes).
            TLSError: the implicit TLS handshake failed.
            ConnectionBrokenError, RemoteProtocolError: transport or grammar failure.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            if self._greeting is not None:
                raise LocalProtocolError("the greeting was already read")
            if isinstance(self._stream, trio.SSLStream):
                await self._tls_handshake(self._stream)
            reply = await self._read_reply()
            if reply.is_error:
                raise error_for_reply(reply, "connect")
            self._greeting = reply
            return reply

    async def ehlo(self) -> Extensions:
        """Send EHLO, falling back to HELO when the server refuses EHLO.

        Returns:
            The announced extensions (empty after a HELO fallback).

        Raises:
            SMTPReplyError: the server refused both, or replied 421.
        """
        # Cancelled before anything is written: the connection stays in step.
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            reply = await self._command(self._proto.send_ehlo(self._local_hostname))
            if reply.is_error and reply.code >= 500 and reply.code != 421:
                reply = await self._command(self._proto.send_helo(self._local_hostname))
            if reply.is_error:
                raise error_for_reply(reply)
            return self._proto.extensions

    async def starttls(self) -> None:
        """Upgrade to TLS with STARTTLS and send EHLO again.

        Anything the server sent before the handshake is dropped.

        Raises:
            TLSError: STARTTLS is not offered, was refused, or the handshake failed
                (certificate not trusted, name mismatch).  The connection is broken
                afterwards, except when STARTTLS was merely not offered or refused.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            if self._tls_active:
                raise LocalProtocolError("the connection is already encrypted")
            if not self._proto.extensions.starttls:
                raise TLSError(
                    "the SMTP server does not offer STARTTLS; refusing to continue without "
                    "encryption (use implicit TLS, or the explicit plain-text mode)"
                )
            reply = await self._command(self._proto.send_starttls())
            if reply.is_error:
                raise TLSError(f"the SMTP server refused STARTTLS: {reply.code} {reply.text}")
            self._proto.start_tls()
            context = self._ssl_context
            if context is None:
                context = await trio.to_thread.run_sync(shared_ssl_context, None)
            tls_stream = trio.SSLStream(
                self._stream, context, server_hostname=self._server_hostname
            )
            self._stream = tls_stream
            await self._tls_handshake(tls_stream)
            self._tls_active = True
        await self.ehlo()

    async def _tls_handshake(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            self._transition(Link.BROKEN, "TLS handshake failed")
            cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
            raise TLSError(f"TLS handshake with the SMTP server failed: {cause}") from exc
        except trio.ClosedResourceError as exc:  # pragma: no cover - caller closed it
            self._transition(Link.BROKEN, "TLS handshake failed")
            raise ConnectionBrokenError("the stream was closed during the TLS handshake") from exc
        self._tls_active = True

    async def handshake(self) -> Extensions:
        """Greeting, EHLO, and with ``Security.STARTTLS`` the upgrade and EHLO again.

        Returns:
            The extensions the server announced (after TLS, when upgraded).

        Raises:
            TLSError, SMTPReplyError, ConnectionBrokenError, RemoteProtocolError:
                see the individual steps.
        """
        await self.read_greeting()
        await self.ehlo()
        if self._security is Security.STARTTLS:
            await self.starttls()
        return self._proto.extensions

    # ----- authentication ------------------------------------------------------

    def _check_auth_allowed(self) -> None:
        if not self._tls_active and self._security is not Security.PLAIN:
            raise TLSError(
                "refusing to send credentials without TLS (STARTTLS was required but not "
                "done); choose Security.PLAIN explicitly to allow it"
            )
        if self._authenticated:
            raise LocalProtocolError("already authenticated")
        if self._proto.state is not State.READY:
            raise LocalProtocolError(
                f"AUTH needs a successful EHLO first (state {self._proto.state.value})"
            )

    async def login(self, username: str, password: str) -> None:
        """Authenticate with a password, using AUTH PLAIN or AUTH LOGIN.

        Args:
            username: The login name.
            password: The password; it never appears in errors, logs or reprs.

        Raises:
            TLSError: the connection is not encrypted and plain text was not chosen.
            AuthenticationError: the server refused the credentials, or offers
                neither PLAIN nor LOGIN.
            SMTPTransientError: a temporary failure (4xx), e.g. 454.
        """
        secrets: list[bytes | str] = [password]
        user_b = username.encode("utf-8")
        pass_b = password.encode("utf-8")
        plain_blob = b"\x00" + user_b + b"\x00" + pass_b
        secrets.append(plain_blob)
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            self._check_auth_allowed()
            offered = self._proto.extensions.auth
            if "PLAIN" in offered:
                await self._authenticate("PLAIN", plain_blob, [], secrets)
            elif "LOGIN" in offered:
                await self._authenticate("LOGIN", None, [user_b, pass_b], secrets)
            else:
                shown = ", ".join(sorted(offered)) or "none"
                raise AuthenticationError(
                    f"the SMTP server offers no password mechanism prxmail supports "
                    f"(PLAIN or LOGIN); offered: {shown}",
                    protocol="smtp",
                )

    async def authenticate_xoauth2(self, username: str, token: str) -> None:
        """Authenticate with an OAuth 2 bearer token (AUTH XOAUTH2).

        Args:
            username: The account's address.
            token: An access token obtained elsewhere; it is never shown in errors.

        Raises:
            TLSError, AuthenticationError, SMTPTransientError: as for :meth:`login`.
        """
        blob = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
        secrets: list[bytes | str] = [token, blob]
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            self._check_auth_allowed()
            if "XOAUTH2" not in self._proto.extensions.auth:
                raise AuthenticationError(
                    "the SMTP server does not offer AUTH XOAUTH2", protocol="smtp"
                )
            # After a failure the server sends a 334 with a JSON error; the client
            # answers with an empty line and gets the final 5xx (RFC 7628 3.2.3).
            await self._authenticate("XOAUTH2", blob, [b""], secrets)

    async def authenticate_oauth2(
        self, username: str, token: str, *, host: str | None = None, port: int | None = None
    ) -> None:
        """Authenticate with an OAuth 2 access token: OAUTHBEARER if offered, else XOAUTH2.

        A refusal's JSON error challenge (RFC 7628 §3.2.2) is decoded into the
        :class:`AuthenticationError` message (status, needed scope); the token never is.

        Args:
            username: The account's address.
            token: The access token; it is never shown in errors.
            host: The server's host name, sent in OAUTHBEARER's ``host=``.
            port: The server's port, sent in OAUTHBEARER's ``port=``.

        Raises:
            TLSError, AuthenticationError, SMTPTransientError: as for :meth:`login`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            self._check_auth_allowed()
            mechanism = preferred_mechanism(self._proto.extensions.auth)
            if mechanism is None:
                shown = ", ".join(sorted(self._proto.extensions.auth)) or "none"
                raise AuthenticationError(
                    "the SMTP server offers neither AUTH OAUTHBEARER nor XOAUTH2;"
                    f" offered: {shown}",
                    protocol="smtp",
                )
            if mechanism == "OAUTHBEARER":
                blob = oauthbearer_initial_response(username, token, host=host, port=port)
            else:
                blob = xoauth2_initial_response(username, token)
            secrets: list[bytes | str] = [token, blob]
            challenges: list[bytes] = []
            try:
                await self._authenticate(
                    mechanism, blob, [ERROR_ACKNOWLEDGEMENT[mechanism]], secrets, challenges
                )
            except AuthenticationError as exc:
                errors = [c for c in challenges if c.strip()]
                if not errors:
                    raise
                why = decode_error_challenge(base64.b64encode(errors[-1]), (token,)).message
                raise AuthenticationError(
                    f"{exc}; {why}", protocol="smtp", server_text=exc.server_text, code=exc.code
                ) from exc.__cause__

    async def _authenticate(
        self,
        mechanism: str,
        initial: bytes | None,
        responses: list[bytes],
        secrets: Sequence[bytes | str],
        challenges: list[bytes] | None = None,
    ) -> None:
        try:
            reply = await self._command(self._proto.send_auth(mechanism, initial))
            queue = list(responses)
            while reply.is_intermediate:
                # A non-base64 challenge breaks the protocol.
                challenge = decode_challenge(reply)
                if challenges is not None:
                    challenges.append(challenge)
                if queue:
                    reply = await self._command(self._proto.send_auth_response(queue.pop(0)))
                else:
                    reply = await self._command(self._proto.send_auth_cancel())
        except RemoteProtocolError as exc:
            # The excerpt could hold whatever the server echoed back; rebuild the
            # error without it and without the original as __cause__.
            raise RemoteProtocolError(Redactor(secrets)(str(exc))) from None
        if reply.is_success:
            self._authenticated = True
            return
        text = Redactor(secrets)(reply.text)
        shown = f"{reply.code} {reply.enhanced + ' ' if reply.enhanced else ''}{text}"
        if reply.code < 500:
            raise SMTPTransientError("AUTH", reply.code, text, reply.enhanced)
        # The refusal itself stays reachable as the cause, with the same redacted text.
        refusal = SMTPPermanentError("AUTH", reply.code, text, reply.enhanced)
        raise AuthenticationError(
            f"SMTP authentication ({mechanism}) failed: {shown}",
            protocol="smtp",
            server_text=text,
            code=str(reply.code),
        ) from refusal

    # ----- mail ----------------------------------------------------------------

    async def send_message(
        self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False
    ) -> SendResult:
        """Send one message: MAIL FROM, RCPT TO for each recipient, then the content.

        With PIPELINING and CHUNKING (Postfix, Exim, Gmail...) MAIL, the RCPTs and
        ``BDAT n LAST`` with the content go out in one write: one round trip.  With
        PIPELINING alone the envelope and DATA go in one write, the dot-stuffed
        content after the 354: two round trips.  Otherwise each command waits for
        its reply.  Line endings are normalised to CRLF in every case.

        Args:
            sender: Envelope sender (``""`` for the null sender).
            recipients: Envelope recipients, at least one.
            data: The message, headers and body.
            smtputf8: Flag the message SMTPUTF8 although the envelope is ASCII
                (an RFC 6532 message).  Non-ASCII addresses set it automatically;
                8-bit content sets BODY=8BITMIME.

        Returns:
            The final reply and one result per recipient.  Some refused and some
            accepted is a partial success: check :attr:`SendResult.refused`.

        Raises:
            LocalProtocolError: no recipients, an address with CR/LF/NUL/controls,
                a message over the server's SIZE limit, 8-bit data without 8BITMIME,
                or a non-ASCII address without SMTPUTF8.
            SMTPTransientError, SMTPPermanentError: MAIL refused, every recipient
                refused (command ``"RCPT"``), or DATA/content refused.
            ConnectionBrokenError: the connection was or became unusable.
        """
        if isinstance(recipients, str):
            raise LocalProtocolError("recipients must be a sequence of addresses, not a str")
        if not recipients:
            raise LocalProtocolError("a message needs at least one recipient")
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            self._content_started = False
            if self._proto.state not in (State.READY, State.MAIL, State.RCPT):
                raise LocalProtocolError(
                    f"cannot send mail in state {self._proto.state.value}; call handshake()"
                )
            _check_envelope(sender, recipients)
            ext = self._proto.extensions
            if ext.pipelining and ext.chunking and self._use_chunking:
                content = normalize_crlf(data)
                options = mail_options(
                    data, sender, recipients, ext, wire_size=len(content), smtputf8=smtputf8
                )
                return await self._send_chunked(sender, recipients, content, options)
            content = encode_data(data)
            # RFC 1870 SIZE counts the content as sent, less the ".CRLF" terminator.
            options = mail_options(
                data, sender, recipients, ext, wire_size=len(content) - 3, smtputf8=smtputf8
            )
            if ext.pipelining:
                return await self._send_pipelined(sender, recipients, content, options)
            return await self._send_stepwise(sender, recipients, content, options)

    async def _send_pipelined(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        options: tuple[int | None, bool, bool],
    ) -> SendResult:
        rset = self._needs_rset or self._proto.state is not State.READY
        commands = self._transaction_commands(
            sender, recipients, options, self._proto.send_data, rset=rset
        )
        # From here the server's transaction state is unknown until every reply is
        # read; mark it so an error below makes the next message start with RSET.
        self._needs_rset = True
        await self._write(commands)
        mail_reply, results, data_reply = await self._read_transaction_replies(recipients, rset)
        return await self._finish(mail_reply, results, data_reply, content)

    def _transaction_commands(
        self,
        sender: str,
        recipients: Sequence[str],
        options: tuple[int | None, bool, bool],
        last: Callable[[], bytes],
        *,
        rset: bool,
    ) -> bytes:
        """One pipelined transaction as one write: [RSET], MAIL, every RCPT, then
        ``last()`` (DATA, or BDAT LAST with the content). The protocol core records
        each command as it is encoded, so ``last`` is called after the others."""
        size, eightbit, smtputf8 = options
        proto = self._proto
        parts = [proto.send_rset()] if rset else []
        parts.append(proto.send_mail(sender, size=size, eightbit=eightbit, smtputf8=smtputf8))
        parts.extend(proto.send_rcpt(r) for r in recipients)
        parts.append(last())
        return b"".join(parts)

    async def _read_transaction_replies(
        self, recipients: Sequence[str], rset: bool
    ) -> tuple[Reply, list[RecipientResult], Reply]:
        """The replies to :meth:`_transaction_commands`: MAIL's, each RCPT's, the last."""
        if rset:
            await self._expect_ok(await self._read_reply())
        mail_reply = await self._read_reply()
        self._raise_if_closed(mail_reply)
        results: list[RecipientResult] = []
        for rcpt in recipients:
            reply = await self._read_reply()
            self._raise_if_closed(reply)
            results.append(RecipientResult(rcpt, reply))
        last = await self._read_reply()
        self._raise_if_closed(last)
        return mail_reply, results, last

    async def _send_chunked(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        options: tuple[int | None, bool, bool],
    ) -> SendResult:
        # PIPELINING + CHUNKING: MAIL, every RCPT and "BDAT n LAST" with the whole
        # message go out in one write; one round trip per message.  If MAIL or all
        # RCPTs fail, the server still reads (and drops) the chunk and refuses the
        # BDAT (RFC 3030 2), so the stream stays in step.
        rset = self._needs_rset or self._proto.state is not State.READY
        bdat = functools.partial(self._proto.send_bdat_last, content, crlf_normalized=True)
        commands = self._transaction_commands(sender, recipients, options, bdat, rset=rset)
        self._needs_rset = True
        self._content_started = True
        await self._write(commands)
        mail_reply, results, final = await self._read_transaction_replies(recipients, rset)
        if mail_reply.is_error:
            raise error_for_reply(mail_reply)
        if not any(r.accepted for r in results):
            raise _all_refused(results)
        if final.is_error:
            # RFC 3030: after a refused BDAT the transaction is void; reset it.
            raise error_for_reply(final, "BDAT")
        self._needs_rset = False
        return SendResult(final, tuple(results))

    async def send_messages(self, messages: Sequence[MailTransaction]) -> list[BatchOutcome]:
        """Send several messages, pipelining across them when the server allows.

        With PIPELINING and CHUNKING, each message (RSET, MAIL, RCPTs, BDAT LAST
        and content) is written without waiting for the replies to the ones
        before it, up to :data:`MAX_PIPELINED_MESSAGES` in flight, several
        messages to a write; the server then never waits for the client between
        messages.  Otherwise the messages go one
        by one as with :meth:`send_message`.  A refused message does not stop the
        others.

        Args:
            messages: The messages, sent in order.

        Returns:
            One outcome per message, in order.  After a connection failure the
            remaining messages carry the error, with ``content_sent`` telling
            whether the server may have taken them.

        Raises:
            LocalProtocolError: a message is invalid (see :meth:`send_message`);
                checked for all messages before anything is sent.
            ConnectionBrokenError: the connection was already unusable.
        """
        ext = self._proto.extensions
        prepared: list[tuple[MailTransaction, bytes, tuple[int | None, bool, bool]]] = []
        chunked = ext.pipelining and ext.chunking and self._use_chunking
        for msg in messages:
            _check_envelope(msg.sender, msg.recipients)
            content = normalize_crlf(msg.data) if chunked else b""
            options = mail_options(
                msg.data,
                msg.sender,
                msg.recipients,
                ext,
                wire_size=len(content) if chunked else None,
                smtputf8=msg.smtputf8,
            )
            prepared.append((msg, content, options))
        if not chunked:
            return await self._send_each(messages)
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            if self._proto.state not in (State.READY, State.MAIL, State.RCPT):
                raise LocalProtocolError(
                    f"cannot send mail in state {self._proto.state.value}; call handshake()"
                )
            return await self._send_batch(prepared)

    async def _send_each(self, messages: Sequence[MailTransaction]) -> list[BatchOutcome]:
        outcomes: list[BatchOutcome] = []
        for msg in messages:
            try:
                self._check()
            except ConnectionBrokenError as error:
                outcomes.append(BatchOutcome(error=error))
                continue
            try:
                result = await self.send_message(
                    msg.sender, msg.recipients, msg.data, smtputf8=msg.smtputf8
                )
            except (SMTPReplyError, ConnectionBrokenError, RemoteProtocolError) as exc:
                sent = self._content_started and not isinstance(exc, SMTPReplyError)
                outcomes.append(BatchOutcome(error=exc, content_sent=sent))
            else:
                outcomes.append(BatchOutcome(result=result, content_sent=True))
        return outcomes

    async def _send_batch(
        self, prepared: list[tuple[MailTransaction, bytes, tuple[int | None, bool, bool]]]
    ) -> list[BatchOutcome]:
        proto = self._proto
        outcomes: list[BatchOutcome | None] = [None] * len(prepared)
        # (index, RSET sent first?) of messages written whose replies are unread.
        in_flight: deque[tuple[int, bool]] = deque()
        commands_in_flight = 0
        written = 0
        failure: PrxmailError | None = None
        try:
            while written < len(prepared):
                # Fill the window's free half in one write: one TLS record and one
                # send instead of one per message, and the server reads the group
                # in one go.  The messages still in flight keep it busy meanwhile.
                parts: list[bytes] = []
                while written < len(prepared) and len(in_flight) < MAX_PIPELINED_MESSAGES:
                    msg, content, options = prepared[written]
                    commands = len(msg.recipients) + 2 + 1
                    if in_flight and commands_in_flight + commands > MAX_PIPELINED_COMMANDS:
                        break
                    # Whether the previous transaction succeeded is not known yet
                    # when the next one is written, so every one but a clean first
                    # starts with RSET (cheap, and always valid in a pipelined group).
                    rset = written > 0 or self._needs_rset or proto.state is not State.READY
                    bdat = functools.partial(proto.send_bdat_last, content, crlf_normalized=True)
                    parts.append(
                        self._transaction_commands(
                            msg.sender, msg.recipients, options, bdat, rset=rset
                        )
                    )
                    in_flight.append((written, rset))
                    commands_in_flight += commands - (not rset)
                    written += 1
                self._needs_rset = True
                self._content_started = True
                try:
                    await self._write(b"".join(parts))
                except ConnectionBrokenError as exc:
                    # The server may have answered earlier messages before it went
                    # away: read what it sent (over TLS the stream is broken for
                    # reading too, and the messages stay "unknown").
                    failure = exc
                    break
                # Read until half the window is free again and the next message's
                # commands fit (once all is written, the loop below reads the rest).
                while (
                    in_flight
                    and written < len(prepared)
                    and (
                        len(in_flight) > MAX_PIPELINED_MESSAGES // 2
                        or commands_in_flight + len(prepared[written][0].recipients) + 3
                        > MAX_PIPELINED_COMMANDS
                    )
                ):
                    done, had_rset = in_flight.popleft()
                    outcomes[done] = await self._read_batch_item(prepared[done][0], had_rset)
                    commands_in_flight -= len(prepared[done][0].recipients) + 2 + had_rset
            while in_flight:
                done, had_rset = in_flight.popleft()
                outcomes[done] = await self._read_batch_item(prepared[done][0], had_rset)
        except (ConnectionBrokenError, RemoteProtocolError) as exc:
            # A write failure is the root cause; otherwise the read that failed.
            failure = failure or exc
        if failure is not None:
            self._transition(Link.BROKEN, f"the connection failed during a batch ({failure})")
        return [
            outcome
            if outcome is not None
            else BatchOutcome(
                error=failure or ConnectionBrokenError("no reply"), content_sent=index < written
            )
            for index, outcome in enumerate(outcomes)
        ]

    async def _read_batch_item(self, msg: MailTransaction, had_rset: bool) -> BatchOutcome:
        replies: list[Reply] = []
        for _ in range(len(msg.recipients) + 2 + had_rset):
            reply = await self._read_reply()
            if reply.code == 421:
                # The server is closing: this message was refused (try later), and
                # the messages after it will get no reply (the next read says so).
                return BatchOutcome(error=error_for_reply(reply), content_sent=True)
            replies.append(reply)
        if had_rset and replies[0].is_error:
            return BatchOutcome(error=error_for_reply(replies[0]), content_sent=True)
        mail_reply, *rcpt_replies, final = replies[1:] if had_rset else replies
        results = tuple(
            RecipientResult(a, r) for a, r in zip(msg.recipients, rcpt_replies, strict=True)
        )
        if mail_reply.is_error:
            return BatchOutcome(error=error_for_reply(mail_reply), content_sent=True)
        if not any(r.accepted for r in results):
            return BatchOutcome(error=_all_refused(results), content_sent=True)
        if final.is_error:
            return BatchOutcome(error=error_for_reply(final, "BDAT"), content_sent=True)
        self._needs_rset = False
        return BatchOutcome(result=SendResult(final, results), content_sent=True)

    async def _send_stepwise(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        options: tuple[int | None, bool, bool],
    ) -> SendResult:
        size, eightbit, smtputf8 = options
        proto = self._proto
        if self._needs_rset or proto.state is not State.READY:
            await self._expect_ok(await self._command(proto.send_rset()))
            self._needs_rset = False
        self._needs_rset = True
        mail_reply = await self._command(
            proto.send_mail(sender, size=size, eightbit=eightbit, smtputf8=smtputf8)
        )
        self._raise_if_closed(mail_reply)
        if mail_reply.is_error:
            raise error_for_reply(mail_reply)
        results: list[RecipientResult] = []
        for rcpt in recipients:
            reply = await self._command(proto.send_rcpt(rcpt))
            self._raise_if_closed(reply)
            results.append(RecipientResult(rcpt, reply))
        if not any(r.accepted for r in results):
            raise _all_refused(results)
        data_reply = await self._command(proto.send_data())
        self._raise_if_closed(data_reply)
        return await self._finish(mail_reply, results, data_reply, content)

    async def _finish(
        self,
        mail_reply: Reply,
        results: list[RecipientResult],
        data_reply: Reply,
        content: bytes,
    ) -> SendResult:
        accepted = mail_reply.is_success and any(r.accepted for r in results)
        if data_reply.code == 354 and not accepted:
            # A server that says 354 with no transaction or no recipient is wrong,
            # but the conversation must go on: end the content at once (RFC 2920
            # 3.1) and report the real refusal.
            await self._read_after(self._proto.send_body(b""))
        if mail_reply.is_error:
            raise error_for_reply(mail_reply)
        if not accepted:
            raise _all_refused(results)
        if data_reply.is_error:
            raise error_for_reply(data_reply)
        self._content_started = True
        final = await self._read_after(self._proto.send_body_encoded(content))
        # The reply to the content ends the transaction whatever it says.
        self._needs_rset = False
        self._raise_if_closed(final)
        if final.is_error:
            raise error_for_reply(final, "DATA")
        return SendResult(final, tuple(results))

    async def _read_after(self, data: bytes) -> Reply:
        await self._write(data)
        return await self._read_reply()

    def _raise_if_closed(self, reply: Reply) -> None:
        if reply.code == 421:
            raise error_for_reply(reply)

    async def _expect_ok(self, reply: Reply) -> Reply:
        if reply.is_error:
            raise error_for_reply(reply)
        return reply

    # ----- other commands --------------------------------------------------------

    async def noop(self) -> Reply:
        """Send NOOP (a cheap liveness check).

        Returns:
            The 250 reply.

        Raises:
            SMTPReplyError: an error reply (421: the server is closing).
            ConnectionBrokenError: the connection is unusable.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            return await self._expect_ok(await self._command(self._proto.send_noop()))

    async def rset(self) -> Reply:
        """Send RSET, abandoning any open mail transaction.

        Returns:
            The 250 reply.

        Raises:
            SMTPReplyError, ConnectionBrokenError: as for :meth:`noop`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._operation():
            reply = await self._expect_ok(await self._command(self._proto.send_rset()))
            self._needs_rset = False
            return reply

    async def quit(self) -> Reply:
        """Send QUIT and close the transport.

        Returns:
            The server's reply (normally 221).

        Raises:
            ConnectionBrokenError: the connection was already unusable.
        """
        try:
            with self._operation():
                return await self._command(self._proto.send_quit())
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; idempotent, always closes the transport.

        A usable connection first says QUIT (waiting briefly for the 221).
        """
        if self._link is Link.CLOSED:
            return
        try:
            if (
                self._link is Link.READY
                and not self._proto.pending
                and self._proto.state in (State.CONNECTED, State.READY, State.MAIL, State.RCPT)
            ):
                # BUSY while saying goodbye, so no other task starts an operation.
                self._transition(Link.BUSY)
                with trio.move_on_after(QUIT_GRACE_SECONDS), contextlib.suppress(PrxmailError):
                    await self._command(self._proto.send_quit())
        finally:
            self._transition(Link.CLOSED, "the connection was closed")
            await trio.aclose_forcefully(self._stream)


def _check_envelope(sender: str, recipients: Sequence[str]) -> None:
    # Everything is checked before the first byte is written, so a bad address
    # late in the list cannot leave a half-sent pipelined group behind.
    if not recipients:
        raise LocalProtocolError("a message needs at least one recipient")
    check_address(sender, "sender")
    for rcpt in recipients:
        if not rcpt:
            raise LocalProtocolError("recipient address is empty")
        check_address(rcpt, "recipient")


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _all_refused(results: Sequence[RecipientResult]) -> SMTPReplyError:
    # Transient if any refusal was transient: retrying later may then succeed.
    transient = [r for r in results if r.reply.code < 500]
    first = (transient or list(results))[0].reply
    detail = "; ".join(f"<{r.address}>: {r.reply.code} {r.reply.text}" for r in results)
    cls = SMTPTransientError if transient else SMTPPermanentError
    return cls("RCPT", first.code, f"all recipients refused: {detail}", first.enhanced)


async def connect_smtp(
    host: str,
    port: int,
    *,
    security: Security = Security.TLS,
    ssl_context: ssl.SSLContext | None = None,
    local_hostname: str | None = None,
) -> SMTPConnection:
    """Open a TCP connection, set up TLS as asked, and run the SMTP handshake.

    The caller owns the returned connection and must ``aclose()`` it; prefer
    :func:`open_smtp_connection`.

    Args:
        host: Server name (also the name its certificate must match).
        port: Server port (465 implicit TLS, 587 STARTTLS).
        security: ``TLS`` (default), ``STARTTLS`` (required, never opportunistic),
            or ``PLAIN`` (no encryption; only when chosen explicitly).
        ssl_context: The TLS context; a verifying default when ``None``.
        local_hostname: The EHLO name; the system host name by default.

    Returns:
        A connection that has read the greeting and sent EHLO (after TLS).

    Raises:
        ConnectionBrokenError: the TCP connection failed (the ``OSError`` is its
            cause), or the server broke the session.
        TLSError: TLS could not be set up as required.
        SMTPReplyError, ConnectionBrokenError, RemoteProtocolError: the server
            refused or broke the session.
    """
    context = ssl_context
    if context is None and security is not Security.PLAIN:
        # Loading the system trust store takes tens of ms the first time: not on the loop.
        context = await trio.to_thread.run_sync(shared_ssl_context, None)
    with transport_failures(f"cannot connect to {host}:{port}"):
        tcp = await trio.open_tcp_stream(host, port)
    stream: trio.abc.Stream = tcp
    if security is Security.TLS:
        assert context is not None
        stream = trio.SSLStream(tcp, context, server_hostname=host)
    conn = SMTPConnection(
        stream,
        security=security,
        ssl_context=context,
        server_hostname=host,
        local_hostname=local_hostname,
    )
    try:
        await conn.handshake()
    except BaseException:
        await conn.aclose()
        raise
    return conn


@contextlib.asynccontextmanager
async def open_smtp_connection(
    host: str,
    port: int,
    *,
    security: Security = Security.TLS,
    ssl_context: ssl.SSLContext | None = None,
    local_hostname: str | None = None,
) -> AsyncIterator[SMTPConnection]:
    """Connect, set up TLS, run the handshake; close the connection on exit.

    Args:
        host, port, security, ssl_context, local_hostname: see :func:`connect_smtp`.

    Yields:
        A connection ready for :meth:`SMTPConnection.login` and
        :meth:`SMTPConnection.send_message`.

    Raises:
        As :func:`connect_smtp`.
    """
    conn = await connect_smtp(
        host, port, security=security, ssl_context=ssl_context, local_hostname=local_hostname
    )
    try:
        yield conn
    finally:
        await conn.aclose()


class SMTPSender:
    """Sends many messages over one reused connection, reconnecting when needed.

    The connection is opened on first use.  A connection idle for
    ``IDLE_PROBE_SECONDS`` or more is checked with NOOP first and replaced when the
    server has closed it.  When a reused connection fails before any message
    content was written (EOF, 421, reset), the message is sent again on a new
    connection; once content went out it never is, so a message is never
    delivered twice.  Messages from several tasks are sent one
    after the other.

    Args:
        connect: Opens a new, logged-in connection.  :func:`open_smtp_sender` builds
            one from host, port and credentials.
    """

    def __init__(self, connect: Callable[[], Awaitable[SMTPConnection]]) -> None:
        self._connect = connect
        self._conn: SMTPConnection | None = None
        self._lock = trio.Lock()
        self._closed = False
        self._connections_opened = 0

    def __repr__(self) -> str:
        return f"<SMTPSender connection={self._conn!r}>"

    @property
    def connections_opened(self) -> int:
        """How many connections this sender has opened so far."""
        return self._connections_opened

    async def send_message(
        self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False
    ) -> SendResult:
        """Send one message, opening or re-opening the connection as needed.

        Args:
            sender, recipients, data, smtputf8: as for
                :meth:`SMTPConnection.send_message`.

        Returns:
            As :meth:`SMTPConnection.send_message`.

        Raises:
            As :meth:`SMTPConnection.send_message` and :func:`connect_smtp`;
            ``LocalProtocolError`` after :meth:`aclose`.
        """
        async with self._lock:
            if self._closed:
                raise LocalProtocolError("the SMTP sender is closed")
            while True:
                fresh = False
                if self._conn is None or self._conn.is_broken:
                    await self._drop()
                    self._conn = await self._connect()
                    self._connections_opened += 1
                    fresh = True
                conn = self._conn
                if not fresh and conn.idle_seconds >= IDLE_PROBE_SECONDS:
                    try:
                        await conn.noop()
                    except (ConnectionBrokenError, SMTPReplyError):
                        # Gone while idle (EOF, reset, 421): nothing of this message
                        # was sent, so open a new connection and go on.
                        await self._drop()
                        continue
                try:
                    return await conn.send_message(sender, recipients, data, smtputf8=smtputf8)
                except (ConnectionBrokenError, SMTPTransientError) as exc:
                    stale = (
                        not fresh
                        and conn.is_broken
                        and not conn.content_started
                        and (isinstance(exc, ConnectionBrokenError) or exc.code == 421)
                    )
                    if not stale:
                        raise
                    # The server dropped the idle connection before this message:
                    # nothing of it was delivered, so one retry on a new connection.
                    await self._drop()

    async def send_messages(self, messages: Sequence[MailTransaction]) -> list[BatchOutcome]:
        """Send several messages over the current connection, pipelined.

        The connection is opened, or checked with NOOP after being idle, as for
        :meth:`send_message`; then :meth:`SMTPConnection.send_messages` does the
        work.  Messages whose outcome says ``content_sent=False`` were certainly not
        delivered and may be passed again.

        Args:
            messages: The messages, sent in order.

        Returns:
            One outcome per message, in order.

        Raises:
            LocalProtocolError: a message is invalid, or the sender is closed.
            ConnectionBrokenError, TLSError, SMTPReplyError, AuthenticationError:
                connecting failed.
        """
        async with self._lock:
            if self._closed:
                raise LocalProtocolError("the SMTP sender is closed")
            conn = await self._usable_connection()
            return await conn.send_messages(messages)

    async def _usable_connection(self) -> SMTPConnection:
        while True:
            if self._conn is None or self._conn.is_broken:
                await self._drop()
                self._conn = await self._connect()
                self._connections_opened += 1
                return self._conn
            if self._conn.idle_seconds < IDLE_PROBE_SECONDS:
                return self._conn
            try:
                await self._conn.noop()
            except (ConnectionBrokenError, SMTPReplyError):
                await self._drop()
                continue
            return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()

    async def aclose(self) -> None:
        """Close the current connection (politely, with QUIT); idempotent."""
        self._closed = True
        await self._drop()


@contextlib.asynccontextmanager
async def open_smtp_sender(
    host: str,
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    security: Security = Security.TLS,
    ssl_context: ssl.SSLContext | None = None,
    local_hostname: str | None = None,
    authenticate: Callable[[SMTPConnection], Awaitable[None]] | None = None,
) -> AsyncIterator[SMTPSender]:
    """An :class:`SMTPSender` that connects (and logs in) on demand.

    Args:
        host, port, security, ssl_context, local_hostname: see :func:`connect_smtp`.
        username: Login name; no AUTH when ``None``.
        password: The password for ``username``.
        authenticate: Logs a fresh connection in instead of ``username`` and
            ``password`` (OAuth 2: it fetches a current token for every new
            connection, so a send after the token expired re-authenticates).

    Yields:
        The sender; its connection is closed on exit.
    """
    if (username is None) != (password is None):
        raise LocalProtocolError("username and password go together")
    if authenticate is not None and username is not None:
        raise LocalProtocolError("pass either authenticate or username and password")

    async def connect() -> SMTPConnection:
        conn = await connect_smtp(
            host, port, security=security, ssl_context=ssl_context, local_hostname=local_hostname
        )
        try:
            if authenticate is not None:
                await authenticate(conn)
            elif username is not None and password is not None:
                await conn.login(username, password)
        except BaseException:
            await conn.aclose()
            raise
        return conn

    sender = SMTPSender(connect)
    try:
        yield sender
    finally:
        await sender.aclose()
