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
# Failure model (trio's SSLStream is the model): if a command is interrupted after its
# first byte was written -- cancelled, timed out by the caller's fail_after, transport
# error, protocol violation -- the connection is marked broken. Every later call raises
# ConnectionBrokenError naming the first cause. aclose() is idempotent and always
# closes the transport. The single exception: waiting for pushes inside IDLE is a safe
# point, because a cancelled receive_some() loses no bytes (TLS 1.3 and trio
# guarantee it) and nothing is half-sent; that is what makes
# "with trio.move_on_after(renew): async for push in idle" work.
#
# Secrets: credentials go to the core as arguments and are never put into an error,
# log line or repr; a server echoing the password back has it replaced by "***".
#
# Memory: responses are received in chunks of RECEIVE_SIZE; a large literal goes
# straight into one preallocated buffer (see _framer.py), so fetching a 100 MB
# message holds about 100 MB.

from __future__ import annotations

import base64
import collections
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Literal

import attrs
import trio

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
)
from prxmail.imap._framer import (
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MAX_LITERAL_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
)
from prxmail.imap._protocol import IMAPProtocol, NeedData
from prxmail.imap._state import ConnectionState
from prxmail.imap._tls import ClientTLSStream

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

# Untagged responses one command may collect (SELECT, NOOP, STORE, SEARCH...). A real
# answer carries at most about one response per message (EXPUNGEs after a NOOP, FETCHes
# after a non-silent STORE); a million covers any real mailbox, and beyond it a server
# is flooding us.
MAX_RESPONSES_PER_COMMAND = 1_000_000

# Most UIDs uid_search() expands from one answer. A SEARCH line is already bounded by
# the framer's line limit (16 MiB, about 2 million UIDs); ESEARCH ranges are compact,
# so "1:4294967295" from a hostile server must not become 4 billion Python ints.
MAX_SEARCH_RESULTS = 2_000_000

# Fetch items are protocol text chosen by the programmer, never by mail data.
_FETCH_ITEM_OK = re.compile(r"[A-Za-z0-9.\-\[\]<> ()]+\Z")
_FLAG_OK = re.compile(r"\\?[^\x00-\x20\x7f(){%*\"\\\]]+\Z")

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


def _describe(exc: BaseException) -> str:
    """A readable reason for a transport failure (trio's own messages are often empty)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLEOFError):
        return "the server closed the connection (without ending TLS cleanly)"
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection was closed locally"
    return str(exc) or type(exc).__name__


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
        self._broken: str | None = None
        self._busy: str | None = None
        self._closed = False
        self._sending = False
        self._bye: StatusResponse | None = None
        self._mailbox: MailboxState | None = None
        self._active_fetch: FetchStream | None = None
        self._pushes: collections.deque[Event] = collections.deque(maxlen=MAX_PENDING_PUSHES)

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
        return self._broken is not None or self._closed

    @property
    def mailbox(self) -> MailboxState | None:
        """The state of the selected mailbox, as SELECT/EXAMINE reported it."""
        return self._mailbox

    @property
    def stream(self) -> trio.abc.Stream:
        """The transport stream (a TLS stream with an ``ssl_object`` once TLS is up)."""
        return self._stream

    def __repr__(self) -> str:
        status = "broken" if self.broken else self._proto.state.value
        return f"<IMAPConnection {status} encrypted={self._encrypted}>"

    # -- plumbing ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ConnectionBrokenError("the IMAP connection is closed")
        if self._broken is not None:
            raise ConnectionBrokenError(f"the IMAP connection is broken: {self._broken}")

    def _mark_broken(self, exc: BaseException) -> None:
        if self._broken is None:
            if isinstance(exc, trio.Cancelled):
                reason = "a command was cancelled (or timed out) before it completed"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self._broken = reason

    async def _send_pending(self) -> None:
        out = self._proto.data_to_send()
        if out:
            self._sending = True
            try:
                await self._stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionBrokenError(
                    f"sending to the server failed: {_describe(exc)}"
                ) from exc
            self._sending = False

    async def _next_event(self) -> Event:
        """The next event; sends whatever the core released on the way."""
        proto = self._proto
        while True:
            try:
                event = proto.next_event()
            except RemoteProtocolError as exc:
                if not proto.framer.eof:
                    raise
                raise ConnectionBrokenError(
                    f"the server closed the connection in the middle of a response: {exc}"
                ) from exc
            if isinstance(event, NeedData):
                await self._send_pending()  # e.g. a literal released by a "+"
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionBrokenError(
                        f"receiving from the server failed: {_describe(exc)}"
                    ) from exc
                proto.receive_data(data)
                continue
            if proto.has_data_to_send:
                await self._send_pending()
            if isinstance(event, ConnectionClosed):
                why = f" ({self._bye.text})" if self._bye is not None else ""
                raise ConnectionBrokenError(f"the server closed the connection{why}")
            if isinstance(event, StatusResponse) and event.status == "BYE":
                self._bye = event
            return event

    def _begin(self, name: str) -> None:
        self._check_usable()
        if self._busy is not None and self._active_fetch is None:
            raise LocalProtocolError(f"cannot start {name}: {self._busy} is still running")

    async def _drain_active_fetch(self) -> None:
        stream = self._active_fetch
        if stream is not None:
            await stream.aclose()

    async def _command(
        self,
        name: str,
        args: Sequence[Arg] = (),
        *,
        secrets: Sequence[str] = (),
        on_continuation: Iterable[bytes] = (),
        keep_pushes: bool = True,
    ) -> tuple[TaggedResponse, list[Event]]:
        """Run one command to completion; return its tagged response and untagged data.

        ``on_continuation`` supplies the lines sent for each "+" (AUTHENTICATE).
        ``keep_pushes=False`` for commands that hand their untagged data to the caller,
        so the next idle() does not report it a second time.
        """
        self._begin(name)
        await self._drain_active_fetch()
        self._proto.send_command(name, args)  # local errors: nothing sent, not broken
        self._busy = name
        responses: list[Event] = []
        answers = iter(on_continuation)
        try:
            await self._send_pending()
            while True:
                event = await self._next_event()
                if isinstance(event, TaggedResponse):
                    break
                if isinstance(event, ContinuationRequest):
                    self._proto.send_continuation(next(answers, b"*"))
                    await self._send_pending()
                    continue
                responses.append(event)
                _check_response_count(len(responses), name)
        except BaseException as exc:
            self._mark_broken(exc)
            raise
        finally:
            self._busy = None
        if keep_pushes:
            self._note_pushes(responses)
        if event.status != "OK":
            raise _command_error(name, attrs.evolve(event, text=Redactor(secrets)(event.text)))
        return event, responses

    def _note_pushes(self, responses: Iterable[Event]) -> None:
        for event in responses:
            if isinstance(event, Exists | Expunge | Recent | FetchData):
                self._pushes.append(event)

    # -- connection setup ---------------------------------------------------------------

    async def read_greeting(self) -> StatusResponse:
        """Wait for the server greeting.

        Returns:
            The greeting (OK or PREAUTH).

        Raises:
            ConnectionBrokenError: the server greeted with BYE or closed the connection.
            RemoteProtocolError: the greeting is garbage.
        """
        self._begin("greeting")
        self._busy = "greeting"
        try:
            event = await self._next_event()
        except BaseException as exc:
            self._mark_broken(exc)
            raise
        finally:
            self._busy = None
        assert isinstance(event, StatusResponse)
        if event.status == "BYE":
            self._broken = f"the server refused the connection: {event.text}"
            raise ConnectionBrokenError(f"the server refused the connection: {event.text}")
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
            self._broken = "STARTTLS is required but the server does not offer it"
            raise TLSError("STARTTLS is required but the server does not offer it")
        try:
            await self._command("STARTTLS")
        except IMAPCommandError as exc:
            self._broken = "STARTTLS was refused"
            raise TLSError(f"the server refused STARTTLS: {exc.text}") from exc
        # trio.SSLStream here (not ClientTLSStream) because callers such as the doctor
        # inspect the upgraded stream as a trio.SSLStream (version(), getpeercert()).
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            self._broken = "the TLS handshake after STARTTLS failed"
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise TLSError(f"TLS handshake after STARTTLS failed: {cause}") from exc
        except BaseException as exc:
            self._mark_broken(exc)
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
            raise self._auth_error(exc, secrets) from None
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

    async def _authenticate(self, mechanism: str, payload: bytes, secrets: Sequence[str]) -> None:
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
        cancel = b"" if mechanism == "XOAUTH2" else b"*"
        try:
            if "SASL-IR" in capabilities:
                tagged, _ = await self._command(
                    "AUTHENTICATE",
                    [Raw(mechanism), Raw(encoded.decode())],
                    secrets=all_secrets,
                    on_continuation=[cancel],
                )
            else:
                tagged, _ = await self._command(
                    "AUTHENTICATE",
                    [Raw(mechanism)],
                    secrets=all_secrets,
                    on_continuation=[encoded, cancel],
                )
        except IMAPCommandError as exc:
            raise self._auth_error(exc, all_secrets) from None
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
                    self._broken = "search result too large"
                    raise RemoteProtocolError(
                        f"search returned more than {MAX_SEARCH_RESULTS} UIDs"
                    )
                found.extend(event.all)
            if len(found) > MAX_SEARCH_RESULTS:
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
        return FetchStream(self, [[uid_set, *tail] for uid_set in sets], depth)

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
        if self._closed:
            return
        try:
            if self._broken is None and self._busy is None:
                # The server may hang up right after its BYE: that is a logout too.
                with contextlib.suppress(ConnectionBrokenError):
                    await self._command("LOGOUT")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the transport at once (idempotent, never raises for a dead peer)."""
        if self._closed:
            return
        self._closed = True
        await trio.aclose_forcefully(self._stream)


class FetchStream:
    """The async iterator returned by :meth:`IMAPConnection.uid_fetch`.

    With several batches and ``pipeline=True``, up to :data:`FETCH_PIPELINE_DEPTH` UID
    FETCH commands are outstanding at once, so the server works on the next batch
    while this one is read; otherwise one batch follows the other.
    """

    def __init__(self, conn: IMAPConnection, batches: list[list[Arg]], depth: int = 1) -> None:
        self._conn = conn
        self._depth = depth
        self._batches = collections.deque(batches)
        self._outstanding = 0
        self._started = False
        self._finished = False
        self._error: IMAPCommandError | None = None

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
        proto = self._conn._proto
        while self._batches and self._outstanding < self._depth and not self._error:
            proto.send_command("UID FETCH", self._batches.popleft())
            self._outstanding += 1

    async def _start(self) -> None:
        conn = self._conn
        conn._begin("UID FETCH")
        await conn._drain_active_fetch()
        self._queue_commands()  # local errors surface here, before anything is sent
        conn._busy = "UID FETCH"
        conn._active_fetch = self
        self._started = True
        try:
            await conn._send_pending()
        except BaseException as exc:
            self._finish()
            conn._mark_broken(exc)
            raise

    def _finish(self) -> None:
        self._finished = True
        conn = self._conn
        conn._busy = None
        if conn._active_fetch is self:
            conn._active_fetch = None

    async def __anext__(self) -> FetchData:
        if self._finished:
            raise StopAsyncIteration
        conn = self._conn
        if not self._started:
            await self._start()
        else:
            conn._check_usable()
        try:
            while True:
                event = await conn._next_event()
                if type(event) is FetchData:
                    if event.uid is not None:
                        return event
                    conn._pushes.append(event)  # a flag change of another message
                elif isinstance(event, TaggedResponse):
                    self._outstanding -= 1
                    if event.status != "OK" and self._error is None:
                        self._error = _command_error("UID FETCH", event)
                    self._queue_commands()
                    if self._outstanding == 0:
                        break
                    await conn._send_pending()
                else:
                    conn._note_pushes((event,))
        except BaseException as exc:
            self._finish()
            conn._mark_broken(exc)
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
        self._backlog: collections.deque[Event] = collections.deque(maxlen=MAX_PENDING_PUSHES)
        self._ended = False

    async def __aenter__(self) -> IdleSession:
        conn = self._conn
        if "IDLE" not in conn.capabilities:
            raise LocalProtocolError("the server does not support IDLE; poll with noop()")
        conn._begin("IDLE")
        await conn._drain_active_fetch()
        self._backlog.extend(conn._pushes)
        conn._pushes.clear()
        conn._proto.send_command("IDLE")
        conn._busy = "IDLE"
        try:
            await conn._send_pending()
            while True:
                event = await conn._next_event()
                if isinstance(event, ContinuationRequest | TaggedResponse):
                    break
                self._backlog.append(event)
        except BaseException as exc:
            conn._busy = None
            conn._mark_broken(exc)
            raise
        if isinstance(event, TaggedResponse):
            conn._busy = None
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
        conn._check_usable()
        while True:
            try:
                event = await conn._next_event()
            except trio.Cancelled as exc:
                if conn._sending:  # cancelled half-way through a write: unknown state
                    conn._mark_broken(exc)
                raise
            except BaseException as exc:
                conn._mark_broken(exc)
                conn._busy = None
                raise
            if isinstance(event, StatusResponse) and event.status == "BYE":
                self._ended = True
                return event
            if isinstance(event, TaggedResponse):  # the server ended IDLE by itself
                self._ended = True
                conn._busy = None
                raise StopAsyncIteration
            if _is_push(event):
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
                conn._check_usable()
            return
        if self._ended:
            conn._busy = None
            if conn._bye is not None:
                conn._broken = f"the server said BYE: {conn._bye.text}"
                if exc is None:
                    raise ConnectionBrokenError(
                        f"the server ended the connection: {conn._bye.text}"
                    )
            return
        # Pushes the body did not read stay for the next idle(), oldest first.
        conn._pushes.extend(event for event in self._backlog if _is_push(event))
        self._backlog.clear()
        try:
            conn._proto.send_done()
            await conn._send_pending()
            while True:
                event = await conn._next_event()
                if isinstance(event, TaggedResponse):
                    break
                conn._note_pushes((event,))
        except BaseException as exc2:
            conn._mark_broken(exc2)
            if exc is None:
                raise
        finally:
            conn._busy = None


def _check_response_count(count: int, command: str) -> None:
    if count > MAX_RESPONSES_PER_COMMAND:
        raise RemoteProtocolError(
            f"more than {MAX_RESPONSES_PER_COMMAND} responses to one {command}"
        )


def _command_error(command: str, event: TaggedResponse) -> IMAPCommandError:
    code = event.code.name if event.code is not None else None
    if event.status == "NO":
        return IMAPNoResponse(command, "NO", event.text, code)
    return IMAPBadResponse(command, "BAD", event.text, code)


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
        max_line_length, max_literal_size, max_response_size: Framer limits.

    Yields:
        A ready :class:`IMAPConnection` (capabilities known). On leaving the block it
        is logged out if still healthy, and always closed.

    Raises:
        TLSError: TLS could not be set up as required.
        ConnectionBrokenError: the server refused the connection or closed it.
        RemoteProtocolError: the server's greeting is not IMAP.
    """
    context = ssl_context if ssl_context is not None else shared_ssl_context()
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
        max_line_length, max_literal_size, max_response_size: Framer limits.

    Yields:
        An :class:`IMAPConnection`, logged out and closed when the block ends.

    Raises:
        ConnectionBrokenError: the TCP connection failed or the server hung up.
        TLSError: TLS could not be established as required.
        RemoteProtocolError: the server does not speak IMAP.
    """
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionBrokenError(f"cannot connect to {host}:{port}: {exc}") from exc
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
