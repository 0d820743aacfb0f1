"""The watcher: one IMAP session after another, each watching the folder.

Theory of operation: per connection the watcher logs in, SELECTs, records
UIDVALIDITY, re-fetches messages a previous run claimed but never finished, applies
the first-start policy once per folder (and again after a UIDVALIDITY change), then
repeats: flag finished messages ``\\Seen``, catch up with ``UID SEARCH UID last+1:*``
through the fetch pipeline (:mod:`._fetch`), IDLE (or poll) until a push, a wake-up
or the end of the window. IDLE is re-issued every ``config.idle_renewal_secs`` (the
smaller of ``idle_timeout_secs`` and ``keepalive_secs``) and the whole cycle has a hard
deadline, so a connection that died
silently is detected and replaced; after a quiet window the folder is SELECTed again
to notice a UIDVALIDITY change. Failures reconnect with exponential backoff and
jitter (:class:`_Backoff`); a session that made progress (selected the folder,
handed a message on, finished an IDLE cycle) was healthy, so the next retry starts
from :data:`RECONNECT_INITIAL_SECONDS` again -- a flaky link that drops every few
seconds must not push the delay to minutes. Connect failures back off fully, and
refused credentials are retried only every :data:`AUTH_RETRY_SECONDS`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Final

import trio

from prxmail._diagnosis import Diagnosis, diagnose
from prxmail._log import log_event
from prxmail.channel._core import _COMMAND_TIMEOUT, _describe, _time_limit
from prxmail.channel._fetch import _FetchPipeline
from prxmail.config import AuthMethod, FirstStart
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    PrxmailError,
    RemoteProtocolError,
    StateError,
    TLSError,
)
from prxmail.imap import (
    Exists,
    IMAPConnection,
    MailboxState,
    Raw,
    SequenceSet,
    StatusResponse,
    open_imap_connection,
)

# Reconnect backoff: the first retry after a failure comes after about this long, each
# further failure doubles it up to the maximum; jitter takes up to half off so many
# instances do not reconnect in lock-step. A session that stayed up this long, or that
# made progress, is "healthy" and resets the backoff.
RECONNECT_INITIAL_SECONDS: Final = 1.0
RECONNECT_MAX_SECONDS: Final = 300.0
HEALTHY_SESSION_SECONDS: Final = 60.0

# Refused credentials do not fix themselves: retry rarely (the operator may be rotating
# a password) instead of hammering the server, which may lock the account.
AUTH_RETRY_SECONDS: Final = 600.0


class _Backoff:
    """Exponential backoff with jitter for reconnecting."""

    def __init__(self, rng: random.Random) -> None:
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        base = min(RECONNECT_MAX_SECONDS, RECONNECT_INITIAL_SECONDS * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return base * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


# Opens one IMAP session: a greeted connection, TLS set up, not logged in yet; closed
# (logged out) when the block ends. open_mail_channel's connect_imap= replaces the
# real opener, e.g. with open_imap_stream over a scripted peer in tests. Whatever it
# opens, the channel lowers its literal limit to max_message_bytes (_bound_literals).
IMAPConnector = Callable[[], AbstractAsyncContextManager[IMAPConnection]]


class _Watcher(_FetchPipeline):
    """The watcher task of a channel (see the module comment)."""

    _connect_imap: IMAPConnector | None = None
    # Whether the current session got a greeted connection: a failure before that is
    # "cannot connect" (with the doctor's diagnosis), after it "connection lost".
    _imap_connected: bool = False

    def _imap_diagnosis(self, exc: BaseException) -> Diagnosis | None:
        config = self.config
        return diagnose(
            exc, proto="imap", host=config.imap_host, port=config.imap_port, config=config
        )

    def _open_imap(self) -> AbstractAsyncContextManager[IMAPConnection]:
        if self._connect_imap is not None:
            return self._connect_imap()
        config = self.config
        return open_imap_connection(
            config.imap_host,
            config.imap_port,
            security=config.imap_security,
            ssl_context=self._ssl_context,
            # Nothing the channel fetches whole may exceed max_message_bytes (larger
            # messages come as text parts cut at that size), so a literal over it is
            # refused when announced instead of the framer's 256 MiB default.
            max_literal_size=config.max_message_bytes,
        )

    def _bound_literals(self, conn: IMAPConnection) -> None:
        """Refuse literals over max_message_bytes on ``conn``, whoever opened it.

        The default opener already passes that limit, but a connection from
        ``connect_imap=`` comes with whatever its opener chose (open_imap_stream's
        default is the framer's 256 MiB): without this, a server could make the
        channel allocate a 250 MB literal it never fetches whole, then wait up to
        command_timeout_secs for the rest. A lower limit the opener chose is kept.
        """
        conn.max_literal_size = min(conn.max_literal_size, self.config.max_message_bytes)

    async def _run_watcher(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        recovered = await self._store.recover_interrupted(
            max_attempts=self.config.handler_max_attempts, account=self.account
        )
        for key in recovered.failed:
            log_event(logging.ERROR, "message failed: interrupted too often", uid=key.uid)
        if recovered.retried:
            log_event(
                logging.INFO,
                "messages interrupted by a crash will be handled again",
                count=len(recovered.retried),
            )
        await self._load_conversation_state()
        task_status.started()
        backoff = _Backoff(self._rng)
        try:
            while True:
                started = trio.current_time()
                self._progressed = False
                self._fetching = ()
                self._imap_connected = False
                delay: float
                try:
                    await self._session()
                except StateError:
                    raise  # durable state unusable: running on would break the guarantees
                except AuthenticationError as exc:
                    delay = AUTH_RETRY_SECONDS
                    self._set_status(
                        imap="auth-failed",
                        imap_error=_describe(exc),
                        reconnects=self.status.value.reconnects + 1,
                    )
                    found = self._imap_diagnosis(exc)
                    log_event(
                        logging.ERROR,
                        "IMAP login refused: check username and password"
                        if self.config.auth is AuthMethod.PASSWORD
                        else "IMAP login refused: check the OAuth 2 settings (see error)",
                        retry_in=delay,
                        error=str(exc),
                        diagnosis=found.summary if found else None,
                        hint=found.hint if found else None,
                    )
                except (PrxmailError, OSError, trio.TooSlowError) as exc:
                    await self._fetch_failed(exc)
                    healthy = trio.current_time() - started >= HEALTHY_SESSION_SECONDS
                    if healthy or self._progressed:
                        backoff.reset()
                    delay = backoff.next_delay()
                    self._set_status(
                        imap="reconnecting",
                        imap_error=_describe(exc),
                        reconnects=self.status.value.reconnects + 1,
                    )
                    # Only a failed connect is diagnosed: once connected, an errno in
                    # the chain (a reset, a keepalive timeout) says nothing about the
                    # configuration.
                    found = None if self._imap_connected else self._imap_diagnosis(exc)
                    log_event(
                        logging.ERROR if isinstance(exc, TLSError) else logging.WARNING,
                        "IMAP connection lost, reconnecting"
                        if self._imap_connected
                        else "IMAP cannot connect, retrying",
                        retry_in=round(delay, 1),
                        error=_describe(exc),
                        diagnosis=found.summary if found else None,
                        hint=found.hint if found else None,
                    )
                await trio.sleep(delay)
        finally:
            self._message_send.close()

    async def _session(self) -> None:
        config = self.config
        timeout = config.command_timeout_secs
        self._set_status(imap="connecting")
        # Connecting and leaving (LOGOUT) are bounded by this scope's deadline; while
        # the session runs the deadline is lifted (each command has its own).
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        with scope:
            async with self._open_imap() as conn:
                self._imap_connected = True
                scope.deadline = math.inf
                self._bound_literals(conn)
                try:
                    with _time_limit(timeout, "IMAP LOGIN and SELECT", _COMMAND_TIMEOUT):
                        await self._login.imap(conn)
                        box = await conn.select(self.folder)
                    self._progressed = True
                    while True:  # again after each UIDVALIDITY change seen in session
                        box = await self._watch(conn, box)
                finally:
                    scope.deadline = trio.current_time() + timeout
        if scope.cancelled_caught:
            raise trio.TooSlowError(
                f"IMAP connect or logout timed out after {timeout} s ({_COMMAND_TIMEOUT})"
            )

    async def _watch(self, conn: IMAPConnection, box: MailboxState) -> MailboxState:
        """Watch the selected folder; return the new state when its UIDVALIDITY changed."""
        config = self.config
        timeout = config.command_timeout_secs
        if box.uidvalidity is None:
            raise RemoteProtocolError("the server reported no UIDVALIDITY")
        uidvalidity, uidnext = box.uidvalidity, box.uidnext
        mailbox = await self._store.sync_mailbox(self.account, self.folder, uidvalidity)
        self._high_water = mailbox.last_uid
        self._pending_dirty = True
        changed = mailbox.previous_uidvalidity is not None
        if changed:
            log_event(
                logging.WARNING,
                "UIDVALIDITY changed: the folder was re-created; unseen mail in it is"
                " processed again, mail already handled is recognised by Message-ID",
                folder=self.folder,
                old=mailbox.previous_uidvalidity,
                new=uidvalidity,
            )
        await self._sync_deferred()
        await self._process_pending(conn, uidvalidity)
        if not mailbox.initialized:
            unseen = config.first_start is FirstStart.UNSEEN or changed
            if unseen:
                with _time_limit(timeout, "IMAP UID SEARCH UNSEEN", _COMMAND_TIMEOUT):
                    uids = await conn.uid_search(Raw("UNSEEN"))
                await self._process_uids(conn, uidvalidity, uids)
            if uidnext is not None:
                mark = uidnext - 1
            else:
                with _time_limit(timeout, "IMAP UID SEARCH ALL", _COMMAND_TIMEOUT):
                    everything = await conn.uid_search()
                mark = max(everything, default=0)
            initialized = await self._store.mark_initialized(
                self.account, self.folder, uidvalidity, mark
            )
            self._high_water = initialized.last_uid
            log_event(
                logging.INFO,
                "folder initialised",
                folder=self.folder,
                policy="unseen" if unseen else "new",
                last_uid=mark,
            )
        idle = "IDLE" in conn.capabilities
        if not idle:
            log_event(
                logging.WARNING, "server has no IDLE; polling", every=config.poll_interval_secs
            )
        self._set_status(imap_error=None)
        while True:
            await self._flag_seen(conn, uidvalidity)
            await self._catch_up(conn, uidvalidity)
            self._set_status(imap="idle" if idle else "polling")
            quiet = await (self._idle_once(conn) if idle else self._poll_once(conn))
            self._set_status(imap="fetching")
            if quiet:
                # Nothing happened for a whole window: SELECT again. Servers do not all
                # tell a selected session that its folder was re-created (Dovecot keeps
                # serving the old view), and a new UIDVALIDITY must not go unnoticed.
                with _time_limit(timeout, "IMAP SELECT", _COMMAND_TIMEOUT):
                    fresh = await conn.select(self.folder)
                if fresh.uidvalidity != uidvalidity:
                    return fresh
            await self._wake_due()
            await self._process_pending(conn, uidvalidity)

    async def _catch_up(self, conn: IMAPConnection, uidvalidity: int) -> None:
        while True:
            last = self._high_water
            with _time_limit(self.config.command_timeout_secs, "IMAP UID SEARCH", _COMMAND_TIMEOUT):
                found = await conn.uid_search("UID", SequenceSet(((last + 1, None),)))
            # "UID n:*" always matches the highest UID, even when it is below n: one
            # such UID alone is the normal answer when nothing is new. Anything else at
            # or below the mark is the server listing old mail as new; it is ignored
            # (the mark says it was claimed already), but not silently.
            new = [uid for uid in found if uid > last]
            old = [uid for uid in found if uid <= last]
            if len(old) > 1 or (old and new):
                log_event(
                    logging.INFO,
                    "server listed UIDs at or below the high-water mark; ignored",
                    uids=",".join(map(str, old[:20])),
                    high_water=last,
                )
            if not new:
                return
            await self._process_uids(conn, uidvalidity, new)
            if self._high_water <= last:
                # The server listed UIDs it then would not deliver: try again after the
                # next wait instead of spinning on them.
                log_event(
                    logging.WARNING,
                    "server listed messages it did not return; retrying later",
                    uids=",".join(map(str, new[:20])),
                )
                return

    def _wait_window(self) -> float:
        # Back in time for the next deferred message (see _conversations).
        return self._deferred_wait(float(self.config.idle_renewal_secs))

    async def _idle_once(self, conn: IMAPConnection) -> bool:
        """IDLE until a push, a wake-up or the end of the window.

        Returns:
            True when the window ended with nothing happening.
        """
        timeout = self.config.command_timeout_secs
        window = self._wait_window()
        # The whole cycle has a hard deadline: if DONE is not answered in time the
        # connection is dead (a NAT box forgot it) and the TooSlowError reconnects.
        with _time_limit(
            window + 2 * timeout,
            "IMAP IDLE cycle",
            "idle renewal + 2 x command_timeout_secs",
        ):
            async with conn.idle() as session:
                with trio.move_on_after(window) as wait:
                    # Finished messages cancel this scope so their \Seen flags go out.
                    self._wake_scope = wait
                    if self._seen_pending():
                        wait.cancel()
                    try:
                        async for push in session:
                            if isinstance(push, Exists):
                                if self._pushed_at is None:
                                    self._pushed_at = trio.current_time()
                                break
                            if isinstance(push, StatusResponse) and push.status == "BYE":
                                raise ConnectionBrokenError(f"server said BYE: {push.text}")
                    finally:
                        self._wake_scope = None
        self._progressed = True
        return wait.cancelled_caught and trio.current_time() >= wait.deadline

    async def _poll_once(self, conn: IMAPConnection) -> bool:
        """Wait one poll interval (or until woken); returns True when not woken."""
        with trio.move_on_after(self._deferred_wait(self.config.poll_interval_secs)) as wait:
            self._wake_scope = wait
            if self._seen_pending():
                wait.cancel()
            try:
                await trio.sleep_forever()
            finally:
                self._wake_scope = None
        return trio.current_time() >= wait.deadline
