# Theory of operation
# -------------------
#
# IMAPConnection puts the sans-I/O IMAPProtocol on a trio stream. It only moves bytes:
# framing, parsing, state and capability bookkeeping are the core's job. It works over
# any trio.abc.Stream (tests use memory streams; the doctor can hand in a stream it
# opened itself); open_imap_connection() adds TCP, implicit TLS or STARTTLS.
#
# One command runs at a time. A second task calling in while a command runs gets
# LocalProtocolError; there are no background tasks and no locks to wait on.
#
# State (trio's _ssl.py is the model): one Link value says where the connection is --
# READY, BUSY (a command awaits its answer), BROKEN or CLOSED. It is read by one method,
# _check(), and changed by one, _transition(), against the table LINK_TRANSITIONS;
# FetchStream and IdleSession drive a command through the small interface marked below
# and never touch the connection's fields.
#
# Failure model: a command cancelled *before* its first byte is written leaves the
# connection as it was (every command starts with checkpoint_if_cancelled, before
# the core queues anything). If a command is interrupted after that -- cancelled, timed
# out by the caller's fail_after, transport error, protocol violation -- the
# connection is marked broken. Every later call raises ConnectionBrokenError naming
# the first cause. aclose() is idempotent and always closes the transport. The single
# exception: waiting for pushes inside IDLE is a safe point, because a cancelled
# receive_some() loses no bytes (TLS 1.3 and trio guarantee it) and nothing is
# half-sent (an interrupted write breaks the connection where it happens); that is
# what makes "with trio.move_on_after(renew): async for push in idle" work.
#
# Transport errors (trio's Broken/ClosedResourceError, OSError) become
# ConnectionBrokenError in one place, transport_failures().
#
# Secrets: credentials go to the core as arguments and are never put into an error,
# log line or repr; a server echoing the password back has it replaced by "***" --
# in the NO to the login, and (the credentials are kept in a Redactor for the
# connection's life) in every later BYE text, protocol-error excerpt and broken reason.
#
# Memory: responses are received in chunks of RECEIVE_SIZE; a large literal goes
# straight into one preallocated buffer (see _framer.py), so fetching a 100 MB
# message holds about 100 MB. What a command keeps beyond that is bounded in bytes:
# each response is charged its wire size plus RESPONSE_OVERHEAD, the untagged
# responses one command collects may total MAX_UNTAGGED_BYTES_PER_COMMAND and the
# pushes kept for IDLE MAX_PENDING_PUSH_BYTES. While such a budget applies, the
# framer's literal limit is lowered to what is left of it, so an oversized literal
# is refused when it is announced, before anything is allocated; partial fetches
# (BODY[...]<o.n>) likewise cap literals at the n asked for.

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Literal

import attrs
import trio

from prxmail import __version__
from prxmail._link import LINK_TRANSITIONS, Link, transport_failures
from prxmail._log import log_event
from prxmail._redact import Redactor
from prxmail._tls import Security, shared_ssl_context
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    IMAPBadResponse,
    IMAPCommandError,
    IMAPNoResponse,
    LocalProtocolError,
    PrxmailError,
    RemoteProtocolError,
    TLSError,
)
from prxmail.imap._encoder import Arg, Raw, String, encode_mailbox
from prxmail.imap._events import (
    CapabilityData,
    ConnectionClosed,
    ContinuationRequest,
    EnabledData,
    ESearchData,
    Event,
    Exists,
    Expunge,
    FetchData,
    FlagsData,
    IdData,
    ListData,
    Recent,
    SearchData,
    SequenceSet,
    StatusResponse,
    TaggedResponse,
    UnknownResponse,
)
from prxmail.imap._framer import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_LITERAL_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
)
from prxmail.imap._protocol import IMAPProtocol, NeedData
from prxmail.imap._state import ConnectionState
from prxmail.imap._tls import ClientTLSStream
from prxmail.oauth2._sasl import (
    ERROR_ACKNOWLEDGEMENT,
    decode_error_challenge,
    oauthbearer_initial_response,
    preferred_mechanism,
    xoauth2_initial_response,
)

__all__ = [
    "FetchStream",
    "IMAPConnection",
    "IdleSession",
    "MailboxState",
    "open_imap_connection",
    "open_imap_stream",
]

# Bytes asked for per receive_some(). Large reads amortise the per-call cost on bulk
# fetches (TLS hands out at most one 16 KiB record per read anyway); this also bounds
# what one read can add to the receive buffer.
RECEIVE_SIZE = 256 * 1024

# Untagged pushes (EXISTS, EXPUNGE, FETCH flag changes) that arrive outside IDLE are
# kept for the next idle() to report first. They are hints -- the service finds new mail
# by UID SEARCH -- so when more than this many pile up the oldest are dropped, and no
# mail is lost.
MAX_PENDING_PUSHES = 1000

# Bytes (charged as above) the kept pushes may hold, and the most one push may be.
# Real pushes are short lines -- "* 7 EXISTS", a FETCH with FLAGS -- so even
# MAX_PENDING_PUSHES of them with long keyword lists (8 KiB each) fit. A push larger
# than this is not a hint but a server stuffing us (a FETCH with a 100 MB literal while
# we idle): RemoteProtocolError. While idling, literals are capped at this size too.
MAX_PENDING_PUSH_BYTES = 8 * 1024 * 1024

# What keeping one parsed response costs beyond its bytes on the wire: the event
# object, its strings and the list slot. A "* OK" keep-alive measured about 230 bytes
# kept for 6 on the wire (1,000,000 of them held 229 MB), so every response is charged
# at least this much; that way a flood of tiny responses meets the byte bounds below
# as surely as a few huge ones do.
RESPONSE_OVERHEAD = 256

# Bytes (wire size plus RESPONSE_OVERHEAD each) of untagged responses one command may
# collect before its tagged answer (SELECT, NOOP, STORE, SEARCH...). The largest real
# answers are one SEARCH line (bounded by the framer's 16 MiB line limit), a LIST of
# some 100,000 folders (about 35 MB charged) or the EXPUNGEs a NOOP reports after a big
# clean-up (200,000 of them: 54 MB); 64 MiB covers those. Beyond it a server is
# flooding us (untagged FETCH literals before the answer to SEARCH or STARTTLS, endless
# "* OK" during SELECT), and the command fails with RemoteProtocolError instead of
# holding gigabytes. It also implies a count bound: at most 262,144 responses.
MAX_UNTAGGED_BYTES_PER_COMMAND = 64 * 1024 * 1024

# Most UIDs uid_search() expands from one answer. A SEARCH line is already bounded by
# the framer's line limit (16 MiB, about 2 million UIDs); ESEARCH ranges are compact,
# so "1:4294967295" from a hostile server must not become 4 billion Python ints.
MAX_SEARCH_RESULTS = 2_000_000

# Fetch items are protocol text chosen by the programmer, never by mail data.
_FETCH_ITEM_OK = re.compile(r"[A-Za-z0-9.\-\[\]<> ()]+\Z")
# One fetch item (a bracketed section may hold spaces), a BODY section item, and the
# items whose answer cannot be a large literal.
_FETCH_ITEM_SPLIT = re.compile(r"[^\s\[]+(?:\[[^\]]*\](?:<[^>]*>)?)?")
_BODY_ITEM = re.compile(r"BODY(?:\.PEEK)?\[([^\]]*)\](?:<([0-9]+)(?:\.([0-9]+))?>)?", re.I)
_SMALL_FETCH_ITEMS = frozenset({"UID", "FLAGS", "RFC822.SIZE", "INTERNALDATE", "MODSEQ"})
_FLAG_OK = re.compile(r"\\?[^\x00-\x20\x7f(){%*\"\\\]]+\Z")

# The literal cap of a partial fetch is never below this: the small items fetched with
# it (INTERNALDATE...) may legally come as literals of a few dozen bytes even when the
# partial asks for fewer. The exact n is still checked on every section that arrives.
PARTIAL_LITERAL_FLOOR = 1024

# UID FETCH commands kept outstanding by a batched uid_fetch(). Two is enough for the
# server never to wait for us between batches; more would only let unread responses
# pile up in socket buffers.
FETCH_PIPELINE_DEPTH = 2

UidSet = SequenceSet | Iterable[int]


@attrs.frozen
class MailboxState:
    """What SELECT/EXAMINE reported about a mailbox.

    Attributes:
        name: The mailbox name as given (not encoded).
        exists: Number of messages.
        recent: Number of messages with the \\Recent flag.
        uidvalidity: UIDVALIDITY; when it changes, every UID stored before is void.
        uidnext: The next UID the server expects to assign (a hint).
        flags: Flags defined in the mailbox.
        permanent_flags: Flags the client can change permanently (``\\*``: new keywords).
        unseen: Sequence number of the first unseen message, if reported.
        highestmodseq: HIGHESTMODSEQ under CONDSTORE.
        read_only: True after EXAMINE or when the server grants read-only access.
    """

    name: str
    exists: int
    recent: int
    uidvalidity: int | None
    uidnext: int | None
    flags: tuple[str, ...]
    permanent_flags: tuple[str, ...]
    unseen: int | None
    highestmodseq: int | None
    read_only: bool


def _uid_set(uids: UidSet) -> SequenceSet:
    if isinstance(uids, SequenceSet):
        return uids
    try:
        return SequenceSet.of(list(uids))
    except ValueError as exc:
        raise LocalProtocolError(str(exc)) from None


class _PushBuffer:
    """Pushes kept for later, bounded by count (oldest dropped: they are hints) and by
    bytes (:data:`MAX_PENDING_PUSH_BYTES`; over it the server is stuffing us)."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[Event, int]] = collections.deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, event: Event, cost: int) -> None:
        if len(self._items) >= MAX_PENDING_PUSHES:
            _, dropped = self._items.popleft()
            self.bytes -= dropped
        _check_push_bytes(self.bytes + cost)
        self._items.append((event, cost))
        self.bytes += cost

    def move_to(self, other: _PushBuffer, *, pushes_only: bool = False) -> None:
        for event, cost in self._items:
            if not pushes_only or _is_push(event):
                other.append(event, cost)
        self.clear()

    def popleft(self) -> Event:
        event, cost = self._items.popleft()
        self.bytes -= cost
        return event

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class IMAPConnection:
    """An IMAP4rev1 client connection over a trio stream.

    Normally obtained from :func:`open_imap_connection` or :func:`open_imap_stream`,
    which read the greeting and set up TLS first.

    Args:
        stream: A connected stream (already TLS-wrapped when ``encrypted``).
        encrypted: Whether the stream is protected by TLS.
        allow_plaintext_login: Allow sending credentials without TLS (only when the
            user chose ``Security.PLAIN``).
        protocol: A preconfigured :class:`IMAPProtocol` (for custom limits).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        encrypted: bool,
        allow_plaintext_login: bool = False,
        protocol: IMAPProtocol | None = None,
    ) -> None:
        self._stream = stream
        self._proto = protocol if protocol is not None else IMAPProtocol()
        self._encrypted = encrypted
        self._allow_plaintext_login = allow_plaintext_login
        self._link = Link.READY
        self._command_name: str | None = None  # what BUSY is busy with
        self._owner: FetchStream | None = None  # a fetch that holds BUSY between reads
        self._broken_reason = ""
        self._bye: StatusResponse | None = None
        self._mailbox: MailboxState | None = None
        self._pushes = _PushBuffer()
        # The framer's literal limit as configured; budgets lower it for a while.
        self._literal_limit = self._proto.framer.max_literal_size
        # Bytes fed to the core and bytes of it consumed by the events returned so far:
        # the difference per event is what it cost on the wire.
        self._received = 0
        self._consumed = 0
        # The credentials sent so far: a server may echo them back in a BYE or a
        # malformed line, so every text this connection puts into an error goes
        # through this redactor (_scrub), not only the NO to the login itself.
        self._secrets: list[str] = []
        self._redactor: Redactor | None = None

    # -- public state -------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        """The server's capabilities (upper case) as last reported."""
        return self._proto.capabilities

    @property
    def state(self) -> ConnectionState:
        """The protocol state."""
        return self._proto.state

    @property
    def greeting(self) -> StatusResponse | None:
        """The server greeting."""
        return self._proto.greeting

    @property
    def encrypted(self) -> bool:
        """True if the transport is TLS."""
        return self._encrypted

    @property
    def broken(self) -> bool:
        """True once the connection can no longer be used."""
        return self._link in (Link.BROKEN, Link.CLOSED)

    @property
    def mailbox(self) -> MailboxState | None:
        """The state of the selected mailbox, as SELECT/EXAMINE reported it."""
        return self._mailbox

    @property
    def stream(self) -> trio.abc.Stream:
        """The transport stream (a TLS stream with an ``ssl_object`` once TLS is up)."""
        return self._stream

    @property
    def max_literal_size(self) -> int:
        """The largest literal (in practice: message) accepted from the server.

        A larger one is refused when announced, before anything is allocated, with
        :class:`RemoteProtocolError` (the connection is then broken). Settable, e.g. to
        a program's own message size bound; must be at least 1.
        """
        return self._literal_limit

    @max_literal_size.setter
    def max_literal_size(self, value: int) -> None:
        if value < 1:
            raise ValueError("max_literal_size must be at least 1")
        self._literal_limit = value
        if self._link is Link.READY:
            self._proto.framer.max_literal_size = value

    def __repr__(self) -> str:
        status = "broken" if self.broken else self._proto.state.value
        return f"<IMAPConnection {status} encrypted={self._encrypted}>"

    # -- state: one check, one transition -----------------------------------------------

    def _check(self, starting: str | None = None) -> None:
        """Raise unless the connection can be used (and, with ``starting``, unless
        that command may start now: nothing but a fetch being read is in progress).

        Raises:
            ConnectionBrokenError: broken or closed.
            LocalProtocolError: another command is running.
        """
        error = self._proto.error
        if error is not None and self._link not in (Link.BROKEN, Link.CLOSED):
            # The core refuses everything after a protocol error; say so as broken.
            self._transition(Link.BROKEN, reason=self._scrub(f"RemoteProtocolError: {error}"))
        link = self._link
        if link is Link.CLOSED:
            raise ConnectionBrokenError("the IMAP connection is closed")
        if link is Link.BROKEN:
            raise ConnectionBrokenError(f"the IMAP connection is broken: {self._broken_reason}")
        if starting is not None and link is Link.BUSY and self._owner is None:
            raise LocalProtocolError(
                f"cannot start {starting}: {self._command_name} is still running"
            )

    def _transition(
        self,
        new: Link,
        *,
        command: str | None = None,
        owner: FetchStream | None = None,
        reason: str = "",
    ) -> None:
        """Move to ``new`` (see :data:`LINK_TRANSITIONS`); the only writer of the state."""
        old = self._link
        if old in (Link.BROKEN, Link.CLOSED) and new is not Link.CLOSED:
            return  # sticky: the first cause stays
        if new is Link.READY and (old is Link.READY or owner is not self._owner):
            return  # finished already, or a fetch finishing after another command began
        if new not in LINK_TRANSITIONS[old]:
            raise AssertionError(f"IMAP connection cannot go from {old.value} to {new.value}")
        self._link = new
        if new is Link.BUSY:
            self._command_name = command
            self._owner = owner
        else:
            self._command_name = None
            self._owner = None
            self._proto.framer.max_literal_size = self._literal_limit
        if new is Link.BROKEN:
            self._broken_reason = reason

    def _fail(self, exc: BaseException) -> None:
        """Mark the connection broken because ``exc`` interrupted a command."""
        if isinstance(exc, trio.Cancelled):
            reason = "a command was cancelled (or timed out) before it completed"
        else:
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
        self._transition(Link.BROKEN, reason=reason)

    def _remember_secrets(self, secrets: Sequence[str]) -> None:
        # LOGIN also passes "user password" (for the NO text); the password alone
        # covers it, and an error that keeps the user name readable is more useful.
        combined = {s for s in secrets if any(s.endswith(" " + t) for t in secrets if t)}
        fresh = [s for s in secrets if s and s not in combined and s not in self._secrets]
        if fresh:
            self._secrets += fresh
            self._redactor = Redactor(self._secrets)

    def _scrub(self, text: str) -> str:
        """``text`` without the credentials this connection sent."""
        return text if self._redactor is None else self._redactor(text)

    # -- the interface FetchStream and IdleSession drive a command through --------------

    async def _prepare(self, name: str) -> None:
        """Everything before a command's bytes are queued: honour a pending cancel
        (so it leaves the connection usable), check the state, drain a fetch."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check(name)
        owner = self._owner
        if owner is not None:
            await owner.aclose()
            self._check(name)

    def _queue(self, name: str, args: Sequence[Arg] = ()) -> None:
        """Queue a command in the core (local errors surface here, nothing is sent)."""
        self._proto.send_command(name, args)

    def _queue_done(self) -> None:
        self._proto.send_done()

    def _cap_literals(self, limit: int) -> None:
        """Refuse literals over ``limit`` (at most the configured limit) for now."""
        self._proto.framer.max_literal_size = max(0, min(self._literal_limit, limit))

    def _keep_push(self, event: Event, cost: int) -> None:
        if isinstance(event, Exists | Expunge | Recent | FetchData):
            self._pushes.append(event, cost)

    def _take_pushes(self, into: _PushBuffer) -> None:
        self._pushes.move_to(into)

    def _return_pushes(self, pushes: _PushBuffer) -> None:
        pushes.move_to(self._pushes, pushes_only=True)

    def _bye_text(self) -> str | None:
        return self._bye.text if self._bye is not None else None

    async def _send_pending(self) -> None:
        out = self._proto.data_to_send()
        if out:
            try:
                with transport_failures("sending to the server failed"):
                    await self._stream.send_all(out)
            except BaseException as exc:
                # Half a command may be on the wire: whatever the caller does next,
                # the conversation is out of step (IDLE's safe point relies on this).
                self._fail(exc)
                raise

    async def _next_sized(self) -> tuple[Event, int]:
        """The next event and its cost (wire bytes plus :data:`RESPONSE_OVERHEAD`);
        sends whatever the core released on the way."""
        proto = self._proto
        while True:
            echoed: RemoteProtocolError | ConnectionBrokenError | None = None
            try:
                event = proto.next_event()
            except RemoteProtocolError as exc:
                text = str(exc)
                clean = self._scrub(text)
                if not proto.framer.eof:
                    if clean == text:
                        raise
                    # The excerpt echoes a credential: only the redacted text leaves,
                    # raised below so the original is not even its __context__.
                    echoed = RemoteProtocolError(clean)
                else:
                    closed = ConnectionBrokenError(
                        f"the server closed the connection in the middle of a response: {clean}"
                    )
                    if clean == text:
                        raise closed from exc
                    echoed = closed
            if echoed is not None:
                raise echoed
            if isinstance(event, NeedData):
                await self._send_pending()  # e.g. a literal released by a "+"
                with transport_failures("receiving from the server failed"):
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                self._received += len(data)
                proto.receive_data(data)
                continue
            consumed = self._received - proto.framer.buffered
            cost = consumed - self._consumed + RESPONSE_OVERHEAD
            self._consumed = consumed
            if proto.has_data_to_send:
                await self._send_pending()
            if isinstance(event, ConnectionClosed):
                why = f" ({self._bye.text})" if self._bye is not None else ""
                raise ConnectionBrokenError(f"the server closed the connection{why}")
            if isinstance(event, StatusResponse) and event.status == "BYE":
                # Stored and returned redacted: its text ends up in errors and logs.
                event = attrs.evolve(event, text=self._scrub(event.text))
                self._bye = event
            return event, cost

    async def _next_event(self) -> Event:
        event, _ = await self._next_sized()
        return event

    # -- one command --------------------------------------------------------------------

    async def _command(
        self,
        name: str,
        args: Sequence[Arg] = (),
        *,
        secrets: Sequence[str] = (),
        on_continuation: Iterable[bytes] = (),
        keep_pushes: bool = True,
        challenges: list[str] | None = None,
    ) -> tuple[TaggedResponse, list[Event]]:
        """Run one command to completion; return its tagged response and untagged data.

        ``on_continuation`` supplies the lines sent for each "+" (AUTHENTICATE); the
        text of each "+" is appended to ``challenges`` when given (an OAuth 2 error
        challenge carries the server's reason).
        ``keep_pushes=False`` for commands that hand their untagged data to the caller,
        so the next idle() does not report it a second time.
        """
        await self._prepare(name)
        self._queue(name, args)  # local errors: nothing sent, not broken
        self._remember_secrets(secrets)
        self._transition(Link.BUSY, command=name)
        responses: list[Event] = []
        costs: list[int] = []
        kept = 0
        answers = iter(on_continuation)
        try:
            self._cap_literals(MAX_UNTAGGED_BYTES_PER_COMMAND)
            await self._send_pending()
            while True:
                event, cost = await self._next_sized()
                if isinstance(event, TaggedResponse):
                    break
                if isinstance(event, ContinuationRequest):
                    if challenges is not None:
                        challenges.append(event.text)
                    self._proto.send_continuation(next(answers, b"*"))
                    await self._send_pending()
                    continue
                kept += cost
                _check_untagged_bytes(kept, name)
                if _stray_code(event):
                    continue  # charged to the budget above, but not kept
                responses.append(event)
                costs.append(cost)
                self._cap_literals(MAX_UNTAGGED_BYTES_PER_COMMAND - kept)
        except BaseException as exc:
            self._fail(exc)
            raise
        self._transition(Link.READY)
        if keep_pushes:
            try:
                for response, cost in zip(responses, costs, strict=True):
                    self._keep_push(response, cost)
            except RemoteProtocolError as exc:
                self._fail(exc)
                raise
        if event.status != "OK":
            raise _command_error(name, attrs.evolve(event, text=Redactor(secrets)(event.text)))
        return event, responses

    # -- connection setup ---------------------------------------------------------------

    async def read_greeting(self) -> StatusResponse:
        """Wait for the server greeting.

        Returns:
            The greeting (OK or PREAUTH).

        Raises:
            ConnectionBrokenError: the server greeted with BYE or closed the connection.
            RemoteProtocolError: the greeting is garbage.
        """
        self._check("greeting")
        self._transition(Link.BUSY, command="greeting")
        try:
            event = await self._next_event()
        except BaseException as exc:
            self._fail(exc)
            raise
        assert isinstance(event, StatusResponse)
        if event.status == "BYE":
            reason = f"the server refused the connection: {event.text}"
            self._transition(Link.BROKEN, reason=reason)
            raise ConnectionBrokenError(reason)
        self._transition(Link.READY)
        return event

    async def capability(self) -> frozenset[str]:
        """Ask the server for its capabilities (CAPABILITY).

        Returns:
            Capability names, upper case.

        Raises:
            ConnectionBrokenError, RemoteProtocolError, IMAPCommandError.
        """
        await self._command("CAPABILITY")
        return self._proto.capabilities

    async def _ensure_capabilities(self) -> frozenset[str]:
        if not self._proto.capabilities:
            await self.capability()
        return self._proto.capabilities

    async def starttls(
        self, ssl_context: ssl.SSLContext, *, server_hostname: str | None = None
    ) -> None:
        """Upgrade the connection with STARTTLS (required: no fallback).

        Args:
            ssl_context: Client context (verification on).
            server_hostname: Name the certificate must match.

        Raises:
            TLSError: STARTTLS not offered, refused, or the handshake failed. The
                connection is broken afterwards.
        """
        if self._encrypted:
            raise LocalProtocolError("the connection is already encrypted")
        capabilities = await self._ensure_capabilities()
        if "STARTTLS" not in capabilities:
            self._transition(
                Link.BROKEN, reason="STARTTLS is required but the server does not offer it"
            )
            raise TLSError("STARTTLS is required but the server does not offer it")
        try:
            await self._command("STARTTLS")
        except IMAPCommandError as exc:
            self._transition(Link.BROKEN, reason="STARTTLS was refused")
            raise TLSError(f"the server refused STARTTLS: {exc.text}") from exc
        # trio.SSLStream here (not ClientTLSStream) because callers such as the doctor
        # inspect the upgraded stream as a trio.SSLStream (version(), getpeercert()).
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            self._transition(Link.BROKEN, reason="the TLS handshake after STARTTLS failed")
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise TLSError(f"TLS handshake after STARTTLS failed: {cause}") from exc
        except BaseException as exc:
            self._fail(exc)
            raise
        self._stream = tls
        self._encrypted = True
        await self.capability()

    # -- authentication -----------------------------------------------------------------

    def _check_credentials_allowed(self) -> None:
        if not self._encrypted and not self._allow_plaintext_login:
            raise TLSError(
                "refusing to send credentials over an unencrypted connection "
                "(choose Security.PLAIN explicitly to allow it)"
            )

    async def _after_login(self, tagged: TaggedResponse) -> None:
        if tagged.code is None or tagged.code.name != "CAPABILITY":
            await self.capability()

    def _auth_error(self, exc: IMAPCommandError, secrets: Sequence[str]) -> AuthenticationError:
        text = Redactor(secrets)(exc.text)
        return AuthenticationError(
            f"the IMAP server refused the login: {text}",
            protocol="imap",
            server_text=text,
            code=exc.code,
        )

    async def login(self, username: str, password: str) -> None:
        """Log in with LOGIN.

        Args:
            username: Login name.
            password: Password (sent as a literal if it needs one; never logged).

        Raises:
            TLSError: the connection is not encrypted and plain text was not chosen.
            AuthenticationError: the server refused the credentials (or LOGINDISABLED).
            LocalProtocolError: not in the not-authenticated state.
        """
        self._check_credentials_allowed()
        capabilities = await self._ensure_capabilities()
        if "LOGINDISABLED" in capabilities:
            raise AuthenticationError(
                "the server does not allow LOGIN on this connection (LOGINDISABLED); "
                "use TLS or STARTTLS",
                protocol="imap",
                code="LOGINDISABLED",
            )
        secrets = (password, username + " " + password)
        try:
            tagged, _ = await self._command("LOGIN", [username, password], secrets=secrets)
        except IMAPCommandError as exc:
            # The cause is kept for the traceback; _command built its text redacted.
            raise self._auth_error(exc, secrets) from exc
        await self._after_login(tagged)

    async def authenticate_plain(self, username: str, password: str, authzid: str = "") -> None:
        """Log in with AUTHENTICATE PLAIN (RFC 4616), using SASL-IR when offered.

        Raises:
            TLSError, AuthenticationError, LocalProtocolError: as for :meth:`login`.
        """
        payload = f"{authzid}\0{username}\0{password}".encode()
        await self._authenticate("PLAIN", payload, (password,))

    async def authenticate_xoauth2(self, username: str, token: str) -> None:
        """Log in with AUTHENTICATE XOAUTH2 and an OAuth 2 access token.

        Raises:
            TLSError, AuthenticationError, LocalProtocolError: as for :meth:`login`.
        """
        payload = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()
        await self._authenticate("XOAUTH2", payload, (token,))

    async def authenticate_password(self, username: str, password: str) -> None:
        """Log in with a password the way the server wants it.

        AUTHENTICATE PLAIN when the server advertises ``LOGINDISABLED`` or offers
        ``AUTH=PLAIN`` without ``AUTH=LOGIN`` (servers that list only SASL PLAIN may
        have LOGIN switched off without saying so); LOGIN otherwise, as before.

        Args:
            username: Login name.
            password: Password (never logged).

        Raises:
            TLSError, AuthenticationError, LocalProtocolError: as for :meth:`login`.
        """
        capabilities = await self._ensure_capabilities()
        plain = "AUTH=PLAIN" in capabilities
        if plain and ("LOGINDISABLED" in capabilities or "AUTH=LOGIN" not in capabilities):
            await self.authenticate_plain(username, password)
        else:
            await self.login(username, password)

    async def authenticate_oauth2(
        self, username: str, token: str, *, host: str | None = None, port: int | None = None
    ) -> None:
        """Log in with an OAuth 2 access token: OAUTHBEARER if offered, else XOAUTH2.

        A refusal's JSON error challenge (RFC 7628 §3.2.2) is decoded into the
        :class:`AuthenticationError` message (status, needed scope); the token never is.

        Args:
            username: The mailbox address.
            token: The access token.
            host: The server's host name, sent in OAUTHBEARER's ``host=``.
            port: The server's port, sent in OAUTHBEARER's ``port=``.

        Raises:
            TLSError, LocalProtocolError: as for :meth:`login`.
            AuthenticationError: the server offers neither mechanism, or refused the
                token (the message says why, from the challenge).
        """
        capabilities = await self._ensure_capabilities()
        offered = [c[5:] for c in capabilities if c.startswith("AUTH=")]
        mechanism = preferred_mechanism(offered)
        if mechanism is None:
            raise AuthenticationError(
                "the IMAP server offers neither AUTHENTICATE OAUTHBEARER nor XOAUTH2",
                protocol="imap",
            )
        if mechanism == "OAUTHBEARER":
            payload = oauthbearer_initial_response(username, token, host=host, port=port)
        else:
            payload = xoauth2_initial_response(username, token)
        challenges: list[str] = []
        ack = base64.b64encode(ERROR_ACKNOWLEDGEMENT[mechanism])
        try:
            await self._authenticate(mechanism, payload, (token,), ack=ack, challenges=challenges)
        except AuthenticationError as exc:
            errors = [c for c in challenges if c.strip()]
            if not errors:
                raise
            why = decode_error_challenge(errors[-1], (token,)).message
            raise AuthenticationError(
                f"{exc}; {why}", protocol="imap", server_text=exc.server_text, code=exc.code
            ) from exc.__cause__

    async def send_client_id(self) -> Mapping[str, str | None] | None:
        """Send prxmail's name and version with ID (RFC 2971), if the server offers ID.

        Some servers (NetEase 163/126) refuse SELECT until a client identifies
        itself; elsewhere it is harmless.

        Returns:
            The server's identification; ``None`` if it sent NIL or has no ID.
        """
        if "ID" not in await self._ensure_capabilities():
            return None
        return await self.id({"name": "prxmail", "version": __version__})

    async def _authenticate(
        self,
        mechanism: str,
        payload: bytes,
        secrets: Sequence[str],
        *,
        ack: bytes | None = None,
        challenges: list[str] | None = None,
    ) -> None:
        self._check_credentials_allowed()
        capabilities = await self._ensure_capabilities()
        if f"AUTH={mechanism}" not in capabilities:
            raise AuthenticationError(
                f"the server does not offer AUTHENTICATE {mechanism}",
                protocol="imap",
                code=None,
            )
        encoded = base64.b64encode(payload)
        all_secrets = (*secrets, encoded.decode())
        # After the credentials, any further "+" is an error challenge (XOAUTH2 sends
        # one with JSON details); an empty line / "*" makes the server finish with NO.
        cancel = ack if ack is not None else b"" if mechanism == "XOAUTH2" else b"*"
        try:
            if "SASL-IR" in capabilities:
                tagged, _ = await self._command(
                    "AUTHENTICATE",
                    [Raw(mechanism), Raw(encoded.decode())],
                    secrets=all_secrets,
                    on_continuation=[cancel],
                    challenges=challenges,
                )
            else:
                tagged, _ = await self._command(
                    "AUTHENTICATE",
                    [Raw(mechanism)],
                    secrets=all_secrets,
                    on_continuation=[encoded, cancel],
                    challenges=challenges,
                )
        except IMAPCommandError as exc:
            raise self._auth_error(exc, all_secrets) from exc
        await self._after_login(tagged)

    async def id(self, fields: Mapping[str, str] | None = None) -> Mapping[str, str | None] | None:
        """Exchange identification (RFC 2971 ID).

        Args:
            fields: Our identification, e.g. ``{"name": "prxmail"}``; ``None`` sends NIL.

        Returns:
            The server's identification, or ``None`` if it sent NIL.
        """
        arg: Arg = (
            [String(item) for pair in fields.items() for item in pair] if fields else Raw("NIL")
        )
        _, responses = await self._command("ID", [arg])
        for event in responses:
            if isinstance(event, IdData):
                return event.fields
        return None

    async def enable(self, *capabilities: str) -> frozenset[str]:
        """ENABLE extensions (RFC 5161), e.g. ``"CONDSTORE"``.

        Returns:
            The extensions the server reports as enabled.
        """
        if "ENABLE" not in await self._ensure_capabilities():
            raise LocalProtocolError("the server does not support ENABLE")
        _, responses = await self._command("ENABLE", [Raw(c) for c in capabilities])
        enabled: frozenset[str] = frozenset()
        for event in responses:
            if isinstance(event, EnabledData):
                enabled |= event.capabilities
        return enabled

    # -- mailboxes ----------------------------------------------------------------------

    async def select(
        self, mailbox: str = "INBOX", *, readonly: bool = False, condstore: bool = False
    ) -> MailboxState:
        """SELECT (or EXAMINE when ``readonly``) a mailbox.

        Args:
            mailbox: Its name (non-ASCII names are encoded as modified UTF-7).
            readonly: Use EXAMINE: nothing is changed, not even \\Recent.
            condstore: Ask for CONDSTORE data (HIGHESTMODSEQ) if the server offers it.

        Returns:
            The mailbox state.

        Raises:
            IMAPNoResponse: no such mailbox or not permitted (the connection then has no
                mailbox selected).
        """
        command = "EXAMINE" if readonly else "SELECT"
        args: list[Arg] = [encode_mailbox(mailbox)]
        if condstore and "CONDSTORE" in self._proto.capabilities:
            args.append([Raw("CONDSTORE")])
        self._mailbox = None
        tagged, responses = await self._command(command, args, keep_pushes=False)
        exists = recent = 0
        flags: tuple[str, ...] = ()
        permanent: tuple[str, ...] = ()
        codes: dict[str, object] = {}
        for event in responses:
            if isinstance(event, Exists):
                exists = event.count
            elif isinstance(event, Recent):
                recent = event.count
            elif isinstance(event, FlagsData):
                flags = event.flags
            elif isinstance(event, StatusResponse) and event.code is not None:
                codes[event.code.name] = event.code.value
        if tagged.code is not None:
            codes[tagged.code.name] = tagged.code.value
        value = codes.get("PERMANENTFLAGS")
        if isinstance(value, tuple):
            permanent = value

        def number(name: str) -> int | None:
            found = codes.get(name)
            return found if isinstance(found, int) else None

        state = MailboxState(
            name=mailbox,
            exists=exists,
            recent=recent,
            uidvalidity=number("UIDVALIDITY"),
            uidnext=number("UIDNEXT"),
            flags=flags,
            permanent_flags=permanent,
            unseen=number("UNSEEN"),
            highestmodseq=number("HIGHESTMODSEQ"),
            read_only=readonly or "READ-ONLY" in codes,
        )
        self._pushes.clear()  # pushes about the previous mailbox mean nothing now
        self._mailbox = state
        return state

    async def examine(self, mailbox: str = "INBOX") -> MailboxState:
        """EXAMINE: select read-only. See :meth:`select`."""
        return await self.select(mailbox, readonly=True)

    # -- messages -----------------------------------------------------------------------

    async def uid_search(self, *criteria: Arg) -> tuple[int, ...]:
        """UID SEARCH (with ESEARCH's compact answer when offered).

        Args:
            criteria: Search keys as typed arguments; strings are sent as astrings
                (quoted or literal when needed), so use :class:`SequenceSet` or
                :class:`Raw` for sequence sets: ``uid_search("UID",
                SequenceSet(((101, None),)))`` finds UIDs from 101 up. Defaults to ALL.
                Note that IMAP's ``n:*`` always includes the highest UID, even when it
                is below ``n``: filter the result when looking for new mail.

        Returns:
            Matching UIDs in ascending order.

        Raises:
            IMAPCommandError: the server refused the search.
        """
        keys: list[Arg] = list(criteria) if criteria else [Raw("ALL")]
        esearch = "ESEARCH" in self._proto.capabilities
        if esearch:
            keys = [Raw("RETURN (ALL)"), *keys]
        _, responses = await self._command("UID SEARCH", keys)
        found: list[int] = []
        for event in responses:
            if isinstance(event, SearchData):
                found.extend(event.ids)
            elif isinstance(event, ESearchData) and event.all is not None:
                try:
                    size = len(event.all)
                except ValueError:
                    raise RemoteProtocolError("ESEARCH returned '*' in a result") from None
                if size + len(found) > MAX_SEARCH_RESULTS:
                    self._transition(Link.BROKEN, reason="search result too large")
                    raise RemoteProtocolError(
                        f"search returned more than {MAX_SEARCH_RESULTS} UIDs"
                    )
                found.extend(event.all)
            if len(found) > MAX_SEARCH_RESULTS:
                self._transition(Link.BROKEN, reason="search result too large")
                raise RemoteProtocolError(f"search returned more than {MAX_SEARCH_RESULTS} UIDs")
        return tuple(sorted(set(found)))

    def uid_fetch(
        self,
        uids: UidSet,
        items: Sequence[str] | str = ("BODY.PEEK[]",),
        *,
        changedsince: int | None = None,
        batch_size: int | None = None,
        pipeline: bool = False,
    ) -> FetchStream:
        """UID FETCH, yielding each result as it arrives.

        Use ``async for msg in conn.uid_fetch(uids, ["BODY.PEEK[]", "RFC822.SIZE"])``
        (or ``async with`` around it to stop early cleanly). The command is sent on the
        first iteration. Leaving the loop early is allowed: the remaining results are
        read and discarded before the next command.

        Args:
            uids: UIDs as a :class:`SequenceSet` or any iterable of ints.
            items: Fetch items (protocol text, e.g. ``"BODY.PEEK[]"``,
                ``"BODYSTRUCTURE"``, ``"RFC822.SIZE"``, ``"FLAGS"``).
            changedsince: CONDSTORE CHANGEDSINCE modifier.
            batch_size: Split the UIDs into UID FETCH commands of at most this many
                UIDs each, sent one after the other (results in ascending UID order
                with servers that answer in order, as Dovecot does). ``None``: one
                command.
            pipeline: With ``batch_size``, keep two commands in flight so the server
                works on the next batch while this one is read (faster). Servers may
                then interleave the batches' results (Dovecot does), so the order
                across batches is not guaranteed.

        Returns:
            An async iterator of :class:`FetchData` (each carries ``uid``).

        Raises:
            LocalProtocolError: bad items or an empty UID set.
            RemoteProtocolError: (while iterating) a partial fetch ``BODY[s]<o.n>``
                was answered with more than ``n`` octets (RFC 3501 6.4.5), or a literal
                over :attr:`max_literal_size` was announced; the connection is broken.
        """
        names = [items] if isinstance(items, str) else list(items)
        if not names or not all(_FETCH_ITEM_OK.match(item) for item in names):
            raise LocalProtocolError(f"invalid fetch items: {names!r}")
        if batch_size is not None and batch_size < 1:
            raise LocalProtocolError("batch_size must be at least 1")
        sets: list[SequenceSet]
        if batch_size is None or isinstance(uids, SequenceSet):
            sets = [_uid_set(uids)]
        else:
            ordered = sorted(set(uids))
            sets = [
                _uid_set(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)
            ] or [_uid_set(ordered)]
        tail: list[Arg] = [Raw("(" + " ".join(names) + ")")]
        if changedsince is not None:
            tail.append([Raw("CHANGEDSINCE"), changedsince])
        depth = FETCH_PIPELINE_DEPTH if pipeline else 1
        partials, cap = _partial_limits(names)
        return FetchStream(
            self,
            [[uid_set, *tail] for uid_set in sets],
            depth,
            partials=partials,
            literal_cap=cap,
        )

    async def uid_store(
        self,
        uids: UidSet,
        action: Literal["+FLAGS", "-FLAGS", "FLAGS"],
        flags: Sequence[str],
        *,
        silent: bool = True,
        unchangedsince: int | None = None,
    ) -> tuple[FetchData, ...]:
        """UID STORE flags, e.g. ``uid_store([7], "+FLAGS", ["\\\\Seen"])``.

        Args:
            uids: The messages.
            action: Add, remove or replace flags.
            flags: Flag names (system flags with their backslash).
            silent: Use ``.SILENT`` (the server then reports no new flags).
            unchangedsince: CONDSTORE UNCHANGEDSINCE modifier.

        Returns:
            The FETCH responses the server sent (new flags unless silent).

        Raises:
            LocalProtocolError: an invalid flag name.
            IMAPCommandError: the server refused.
        """
        if action not in ("+FLAGS", "-FLAGS", "FLAGS"):
            raise LocalProtocolError(f"invalid STORE action {action!r}")
        for flag in flags:
            if not _FLAG_OK.match(flag):
                raise LocalProtocolError(f"invalid flag name {flag!r}")
        args: list[Arg] = [_uid_set(uids)]
        if unchangedsince is not None:
            args.append([Raw("UNCHANGEDSINCE"), unchangedsince])
        args.append(Raw(action + (".SILENT" if silent else "")))
        args.append([Raw(flag) for flag in flags])
        _, responses = await self._command("UID STORE", args, keep_pushes=False)
        return tuple(event for event in responses if isinstance(event, FetchData))

    async def list_mailboxes(self, reference: str = "", pattern: str = "*") -> tuple[ListData, ...]:
        """LIST: the mailboxes matching ``pattern`` under ``reference``.

        Args:
            reference: The reference name (usually empty).
            pattern: A mailbox pattern; ``*`` matches across hierarchy levels, ``%``
                within one level.

        Returns:
            One :class:`ListData` per mailbox, in the server's order. Decode names for
            display with :func:`decode_mailbox`.

        Raises:
            IMAPCommandError: the server refused the LIST.
        """
        _, responses = await self._command(
            "LIST",
            [String(encode_mailbox(reference)), String(encode_mailbox(pattern))],
            keep_pushes=False,
        )
        return tuple(event for event in responses if isinstance(event, ListData))

    async def noop(self) -> tuple[Event, ...]:
        """NOOP: lets the server report changes.

        Returns:
            The untagged responses received (EXISTS, EXPUNGE, FETCH...).
        """
        _, responses = await self._command("NOOP", keep_pushes=False)
        return tuple(responses)

    def idle(self) -> IdleSession:
        """IDLE (RFC 2177) as an async context manager yielding server pushes.

        ::

            async with conn.idle() as idle:
                with trio.move_on_after(29 * 60):   # renew before the server's timeout
                    async for push in idle:          # Exists, Expunge, FetchData, BYE...
                        if isinstance(push, Exists):
                            break

        Leaving the block sends DONE and waits for the server to end IDLE. Cancelling
        the wait for a push (as above) is safe; cancelling while entering or leaving
        breaks the connection like any interrupted command.

        Returns:
            An :class:`IdleSession`.
        """
        return IdleSession(self)

    async def logout(self) -> None:
        """LOGOUT, then close the transport. Errors during LOGOUT are not raised if the
        server simply closes the connection first."""
        if self._link is Link.CLOSED:
            return
        try:
            if self._link is Link.READY:
                # The server may hang up right after its BYE: that is a logout too.
                with contextlib.suppress(ConnectionBrokenError):
                    await self._command("LOGOUT")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the transport at once (idempotent, never raises for a dead peer)."""
        if self._link is Link.CLOSED:
            return
        self._transition(Link.CLOSED)
        await trio.aclose_forcefully(self._stream)


class FetchStream:
    """The async iterator returned by :meth:`IMAPConnection.uid_fetch`.

    With several batches and ``pipeline=True``, up to :data:`FETCH_PIPELINE_DEPTH` UID
    FETCH commands are outstanding at once, so the server works on the next batch
    while this one is read; otherwise one batch follows the other.

    When every item that can carry a literal is a partial fetch (``BODY[...]<o.n>``),
    literals larger than the largest ``n`` are refused as they are announced, and a
    section longer than its ``n`` is a :class:`RemoteProtocolError` (RFC 3501 6.4.5:
    the server returns at most ``n`` octets).
    """

    def __init__(
        self,
        conn: IMAPConnection,
        batches: list[list[Arg]],
        depth: int = 1,
        *,
        partials: Mapping[str, int] | None = None,
        literal_cap: int | None = None,
    ) -> None:
        self._conn = conn
        self._depth = depth
        self._batches = collections.deque(batches)
        self._outstanding = 0
        self._started = False
        self._finished = False
        self._error: IMAPCommandError | None = None
        self._partials: Mapping[str, int] = partials or {}
        self._literal_cap = literal_cap

    def __aiter__(self) -> FetchStream:
        return self

    async def __aenter__(self) -> FetchStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.aclose()

    def _queue_commands(self) -> None:
        while self._batches and self._outstanding < self._depth and not self._error:
            self._conn._queue("UID FETCH", self._batches.popleft())
            self._outstanding += 1

    async def _start(self) -> None:
        conn = self._conn
        await conn._prepare("UID FETCH")
        self._queue_commands()  # local errors surface here, before anything is sent
        conn._transition(Link.BUSY, command="UID FETCH", owner=self)
        self._started = True
        if self._literal_cap is not None:
            conn._cap_literals(self._literal_cap)
        try:
            await conn._send_pending()
        except BaseException as exc:
            conn._fail(exc)
            self._finish()
            raise

    def _finish(self) -> None:
        self._finished = True
        self._conn._transition(Link.READY, owner=self)

    def _check_partials(self, event: FetchData) -> None:
        for key, value in event.sections.items():
            section, _, origin = key.partition("<")
            limit = self._partials.get(_section_key(section))
            if limit is not None and value is not None and len(value) > limit:
                raise RemoteProtocolError(
                    f"the server answered a partial fetch of BODY[{section}]<{origin[:-1]}."
                    f"{limit}> with {len(value)} bytes, more than the {limit} asked for",
                    excerpt=key.encode(),
                )

    async def __anext__(self) -> FetchData:
        if self._finished:
            raise StopAsyncIteration
        conn = self._conn
        if not self._started:
            await self._start()
        else:
            conn._check()
        try:
            while True:
                event, cost = await conn._next_sized()
                if type(event) is FetchData:
                    if event.uid is not None:
                        if self._partials:
                            self._check_partials(event)
                        return event
                    conn._keep_push(event, cost)  # a flag change of another message
                elif isinstance(event, TaggedResponse):
                    self._outstanding -= 1
                    if event.status != "OK" and self._error is None:
                        self._error = _command_error("UID FETCH", event)
                    self._queue_commands()
                    if self._outstanding == 0:
                        break
                    await conn._send_pending()
                else:
                    conn._keep_push(event, cost)
        except BaseException as exc:
            conn._fail(exc)
            self._finish()
            raise
        self._finish()
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop early: send no further batches, read and discard what is on its way."""
        if not self._started or self._finished:
            self._finished = True
            return
        self._batches.clear()
        try:
            async for _ in self:
                pass
        except IMAPCommandError:
            pass  # the caller stopped reading; a late NO is not theirs to handle


class IdleSession:
    """An IDLE in progress; see :meth:`IMAPConnection.idle`."""

    def __init__(self, conn: IMAPConnection) -> None:
        self._conn = conn
        # Pushes that arrived before IDLE was accepted; bounded like the connection's
        # own push buffer, and for the same reason (they are hints).
        self._backlog = _PushBuffer()
        self._ended = False

    async def __aenter__(self) -> IdleSession:
        conn = self._conn
        if "IDLE" not in conn.capabilities:
            raise LocalProtocolError("the server does not support IDLE; poll with noop()")
        await conn._prepare("IDLE")
        conn._queue("IDLE")
        conn._transition(Link.BUSY, command="IDLE")
        try:
            conn._take_pushes(self._backlog)
            # Pushes are small; a literal bigger than the whole push budget is not one.
            conn._cap_literals(MAX_PENDING_PUSH_BYTES)
            await conn._send_pending()
            while True:
                event, cost = await conn._next_sized()
                if isinstance(event, ContinuationRequest | TaggedResponse):
                    break
                self._backlog.append(event, cost)
        except BaseException as exc:
            conn._fail(exc)
            raise
        if isinstance(event, TaggedResponse):
            conn._transition(Link.READY)
            raise _command_error("IDLE", event)
        return self

    def __aiter__(self) -> IdleSession:
        return self

    async def __anext__(self) -> Event:
        """The next push: Exists, Expunge, Recent, FetchData, or a BYE StatusResponse
        (after which iteration stops). Keep-alive ``* OK`` lines are skipped."""
        while self._backlog:
            event = self._backlog.popleft()
            if _is_push(event):
                return event
        if self._ended:
            raise StopAsyncIteration
        conn = self._conn
        conn._check()
        while True:
            try:
                event, cost = await conn._next_sized()
                _check_push_bytes(cost)
            except trio.Cancelled:
                # Waiting for a push is the safe point: a cancelled read loses no bytes,
                # and an interrupted write has already broken the connection.
                raise
            except BaseException as exc:
                conn._fail(exc)
                raise
            if isinstance(event, StatusResponse) and event.status == "BYE":
                self._ended = True
                return event
            if isinstance(event, TaggedResponse):  # the server ended IDLE by itself
                self._ended = True
                conn._transition(Link.READY)
                raise StopAsyncIteration
            if _is_push(event) and not _stray_code(event):
                return event

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn.broken:
            if exc is None:
                conn._check()
            return
        if self._ended:
            bye = conn._bye_text()
            if bye is not None:
                conn._transition(Link.BROKEN, reason=f"the server said BYE: {bye}")
                if exc is None:
                    raise ConnectionBrokenError(f"the server ended the connection: {bye}")
            conn._transition(Link.READY)
            return
        try:
            # Pushes the body did not read stay for the next idle(), oldest first.
            conn._return_pushes(self._backlog)
            conn._queue_done()
            await conn._send_pending()
            while True:
                event, cost = await conn._next_sized()
                if isinstance(event, TaggedResponse):
                    break
                conn._keep_push(event, cost)
        except BaseException as exc2:
            conn._fail(exc2)
            if exc is None:
                raise
        conn._transition(Link.READY)


def _section_key(section: str) -> str:
    """A body section as both sides may spell it: upper case, single spaces."""
    return " ".join(section.upper().split())


def _partial_limits(names: Sequence[str]) -> tuple[dict[str, int], int | None]:
    """What the fetch items bound: the ``n`` of each partial section (sections also
    fetched whole are unbounded), and the literal cap when every item that can carry
    a literal is partial (else ``None``)."""
    partial: dict[str, int] = {}
    whole: set[str] = set()
    capped = True
    for item in names:
        for atom in _FETCH_ITEM_SPLIT.findall(item.strip("() ")):
            match = _BODY_ITEM.fullmatch(atom)
            if match is None:
                if atom.upper() not in _SMALL_FETCH_ITEMS:
                    capped = False
                continue
            key = _section_key(match[1])
            if match[3] is None:
                whole.add(key)
                capped = False
            else:
                partial[key] = max(partial.get(key, 0), int(match[3]))
    for key in whole:
        partial.pop(key, None)
    cap = max(PARTIAL_LITERAL_FLOOR, *partial.values()) if capped and partial else None
    return partial, cap


def _check_untagged_bytes(kept: int, command: str) -> None:
    if kept > MAX_UNTAGGED_BYTES_PER_COMMAND:
        raise RemoteProtocolError(
            f"more than {MAX_UNTAGGED_BYTES_PER_COMMAND} bytes of untagged responses "
            f"to one {command}"
        )


def _check_push_bytes(cost: int) -> None:
    if cost > MAX_PENDING_PUSH_BYTES:
        raise RemoteProtocolError(
            f"the server pushed more than {MAX_PENDING_PUSH_BYTES} bytes of unsolicited responses"
        )


def _command_error(command: str, event: TaggedResponse) -> IMAPCommandError:
    code = event.code.name if event.code is not None else None
    if event.status == "NO":
        return IMAPNoResponse(command, "NO", event.text, code)
    return IMAPBadResponse(command, "BAD", event.text, code)


def _stray_code(event: Event) -> bool:
    """Whether ``event`` is a stray response code on a line of its own (Exchange's
    ``[COPYUID ...]`` during MOVE): logged at DEBUG and otherwise ignored."""
    if isinstance(event, UnknownResponse) and event.name.startswith("["):
        log_event(logging.DEBUG, "stray IMAP response code ignored", line=event.line[:200])
        return True
    return False


def _is_push(event: Event) -> bool:
    if isinstance(event, StatusResponse):
        return event.status != "OK" or event.code is not None
    return not isinstance(event, CapabilityData | ContinuationRequest)


# -- openers ------------------------------------------------------------------------------


@asynccontextmanager
async def open_imap_stream(
    stream: trio.abc.Stream,
    *,
    security: Security = Security.TLS,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
    max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
) -> AsyncIterator[IMAPConnection]:
    """Speak IMAP over a stream you opened: greeting, then TLS as chosen.

    Args:
        stream: A connected stream. With ``Security.TLS`` it is wrapped in TLS unless
            it already is a ``trio.SSLStream`` (or this package's TLS stream).
        security: ``TLS`` (implicit), ``STARTTLS`` (required upgrade) or ``PLAIN``
            (no encryption; only when explicitly chosen).
        ssl_context: Client TLS context; default: system trust store, verification on.
        server_hostname: Name the certificate must match.
        max_line_length, max_literal_size, max_response_size: Framer limits. A
            program with its own message size bound should pass it as
            ``max_literal_size`` (it can also be changed later through
            :attr:`IMAPConnection.max_literal_size`).

    Yields:
        A ready :class:`IMAPConnection` (capabilities known). On leaving the block it
        is logged out if still healthy, and always closed.

    Raises:
        TLSError: TLS could not be set up as required.
        ConnectionBrokenError: the server refused the connection or closed it.
        RemoteProtocolError: the server's greeting is not IMAP.
    """
    # Loading the system trust store takes tens of ms the first time: not on the loop.
    context = (
        ssl_context
        if ssl_context is not None
        else await trio.to_thread.run_sync(shared_ssl_context, None)
    )
    encrypted = isinstance(stream, trio.SSLStream | ClientTLSStream)
    if security is Security.TLS and not encrypted:
        stream = ClientTLSStream(stream, context, server_hostname=server_hostname)
        encrypted = True
    conn = IMAPConnection(
        stream,
        encrypted=encrypted,
        allow_plaintext_login=security is Security.PLAIN,
        protocol=IMAPProtocol(
            max_line_length=max_line_length,
            max_literal_size=max_literal_size,
            max_response_size=max_response_size,
        ),
    )
    try:
        try:
            await conn.read_greeting()
        except ConnectionBrokenError as exc:
            cause = exc.__cause__
            if (
                isinstance(stream, trio.SSLStream | ClientTLSStream)
                and isinstance(cause, trio.BrokenResourceError)
                and isinstance(cause.__cause__, ssl.SSLError)
            ):
                raise TLSError(f"TLS handshake failed: {cause.__cause__}") from exc
            raise
        if security is Security.STARTTLS and not encrypted:
            if conn.state is not ConnectionState.NOT_AUTHENTICATED:
                raise TLSError("the server pre-authenticated the session: STARTTLS impossible")
            await conn.starttls(context, server_hostname=server_hostname)
        else:
            await conn._ensure_capabilities()
        yield conn
        if not conn.broken:
            # A failed goodbye changes nothing: the transport is closed below.
            with contextlib.suppress(PrxmailError):
                await conn.logout()
    finally:
        await conn.aclose()


@asynccontextmanager
async def open_imap_connection(
    host: str,
    port: int = 993,
    *,
    security: Security = Security.TLS,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
    max_literal_size: int = DEFAULT_MAX_LITERAL_SIZE,
    max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
) -> AsyncIterator[IMAPConnection]:
    """Connect to an IMAP server and yield a ready connection (not logged in).

    ::

        async with open_imap_connection("imap.example.com") as imap:
            await imap.login(user, password)
            box = await imap.select("INBOX")

    Args:
        host: Server host name or address.
        port: TCP port (993 for implicit TLS, 143 for STARTTLS).
        security: ``Security.TLS`` (default), ``Security.STARTTLS`` (required, never
            opportunistic) or ``Security.PLAIN`` (no encryption, explicit opt-in).
        ssl_context: Client context; default verifies against the system trust store.
        server_hostname: Name to verify in the certificate; default ``host``.
        max_line_length, max_literal_size, max_response_size: Framer limits. A
            program with its own message size bound should pass it as
            ``max_literal_size`` (it can also be changed later through
            :attr:`IMAPConnection.max_literal_size`).

    Yields:
        An :class:`IMAPConnection`, logged out and closed when the block ends.

    Raises:
        ConnectionBrokenError: the TCP connection failed or the server hung up.
        TLSError: TLS could not be established as required.
        RemoteProtocolError: the server does not speak IMAP.
    """
    with transport_failures(f"cannot connect to {host}:{port}"):
        tcp = await trio.open_tcp_stream(host, port)
    async with open_imap_stream(
        tcp,
        security=security,
        ssl_context=ssl_context,
        server_hostname=server_hostname if server_hostname is not None else host,
        max_line_length=max_line_length,
        max_literal_size=max_literal_size,
        max_response_size=max_response_size,
    ) as conn:
        yield conn
