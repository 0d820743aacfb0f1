"""The IMAP client against the real private Dovecot (tests/mailservers.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import pytest
import trio

from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    IMAPNoResponse,
    RemoteProtocolError,
)
from prxmail.imap import (
    ConnectionState,
    Exists,
    IMAPConnection,
    MailboxState,
    Security,
    SequenceSet,
    StatusResponse,
    decode_mailbox,
    encode_mailbox,
    open_imap_connection,
)
from prxmail.imap._encoder import String
from tests.mailservers import MailServers, User

pytestmark = pytest.mark.integration


def make_message(subject: str, body: bytes = b"Hello there.\r\n") -> bytes:
    return (
        b"From: Alice <alice@prxmail.test>\r\n"
        b"To: someone@prxmail.test\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@prxmail.test>\r\n"
        b"Date: Tue, 24 Nov 2026 04:00:00 +0000\r\n"
        b"\r\n" + body
    )


def fresh_user(servers: MailServers) -> User:
    return servers.add_user("imap" + uuid.uuid4().hex[:10])


def connect(
    servers: MailServers, security: Security = Security.TLS
) -> AbstractAsyncContextManager[IMAPConnection]:
    """A connection to the private Dovecot (implicit TLS by default), not logged in."""
    port = servers.imap_plain_port if security is not Security.TLS else servers.imap_tls_port
    return open_imap_connection(
        servers.host,
        port,
        security=security,
        ssl_context=servers.ssl_context(),
        server_hostname="localhost",
    )


@contextlib.asynccontextmanager
async def open_inbox(
    servers: MailServers, user: User
) -> AsyncIterator[tuple[IMAPConnection, MailboxState]]:
    """The set-up most tests share: implicit TLS, logged in as ``user``, INBOX
    selected. (A context manager, not a fixture: most tests deliver mail first.)"""
    async with connect(servers) as imap:
        await imap.login(user.address, user.password)
        box = await imap.select()
        yield imap, box


async def deliver(servers: MailServers, user: User, *messages: bytes) -> None:
    await trio.to_thread.run_sync(servers.deliver_to_maildir, user, list(messages))


async def test_login_select_search_fetch_store_over_tls(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    await deliver(mail_servers, user, make_message("one"), make_message("two"))
    async with open_imap_connection(
        mail_servers.host,
        mail_servers.imap_tls_port,
        ssl_context=mail_servers.ssl_context(),
        server_hostname="localhost",
    ) as imap:
        assert imap.encrypted
        server_id = await imap.id({"name": "prxmail-tests"})
        assert server_id is not None
        await imap.login(user.address, user.password)
        assert imap.state is ConnectionState.AUTHENTICATED
        assert "IDLE" in imap.capabilities
        box = await imap.select("INBOX", condstore=True)
        assert box.exists == 2
        assert box.uidvalidity is not None
        assert box.uidnext == 3
        assert box.highestmodseq is not None
        assert not box.read_only
        uids = await imap.uid_search()
        assert uids == (1, 2)
        assert await imap.uid_search("UID", SequenceSet(((2, None),))) == (2,)
        assert await imap.uid_search("SUBJECT", "two") == (2,)
        got = [
            msg
            async for msg in imap.uid_fetch(
                uids, ["UID", "FLAGS", "RFC822.SIZE", "BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[]"]
            )
        ]
        assert [m.uid for m in got] == [1, 2]
        assert got[0].envelope is not None
        assert got[0].envelope.subject == "one"
        assert got[1].body is not None
        assert b"Subject: two" in got[1].body
        assert got[1].rfc822_size == len(got[1].body)
        assert got[0].bodystructure is not None
        assert got[0].bodystructure.type == "text"
        assert "\\Seen" not in (got[0].flags or ())
        await imap.uid_store([1], "+FLAGS", ["\\Seen"])
        [flags] = [m.flags async for m in imap.uid_fetch([1], "FLAGS")]
        assert flags is not None
        assert "\\Seen" in flags
        assert await imap.uid_search("UNSEEN") == (2,)
        with pytest.raises(IMAPNoResponse):
            await imap.select("Does-Not-Exist")
        assert imap.state is ConnectionState.AUTHENTICATED


async def test_wrong_password(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_imap_connection(
        mail_servers.host,
        mail_servers.imap_tls_port,
        ssl_context=mail_servers.ssl_context(),
        server_hostname="localhost",
    ) as imap:
        with pytest.raises(AuthenticationError) as info:
            await imap.login(user.address, "wrong-" + user.password)
        assert user.password not in str(info.value)
        assert info.value.code == "AUTHENTICATIONFAILED"
        # Dovecot's NO is kept as the cause, without the password.
        cause = info.value.__cause__
        assert isinstance(cause, IMAPNoResponse)
        assert cause.code == "AUTHENTICATIONFAILED"
        assert user.password not in str(cause)
        # the connection stays usable: the right password still works
        await imap.authenticate_plain(user.address, user.password)
        assert imap.state is ConnectionState.AUTHENTICATED


async def test_starttls_then_login(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_imap_connection(
        mail_servers.host,
        mail_servers.imap_plain_port,
        security=Security.STARTTLS,
        ssl_context=mail_servers.ssl_context(),
        server_hostname="localhost",
    ) as imap:
        assert imap.encrypted
        assert "LOGINDISABLED" not in imap.capabilities
        await imap.login(user.address, user.password)
        box = await imap.select()
        assert box.exists == 0


async def test_login_refused_on_plain_port_without_starttls(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_imap_connection(
        mail_servers.host, mail_servers.imap_plain_port, security=Security.PLAIN
    ) as imap:
        assert not imap.encrypted
        assert "LOGINDISABLED" in imap.capabilities
        with pytest.raises(AuthenticationError, match="LOGINDISABLED"):
            await imap.login(user.address, user.password)
        assert imap.state is ConnectionState.NOT_AUTHENTICATED


async def test_tls_to_the_wrong_host_name_is_refused(mail_servers: MailServers) -> None:
    from prxmail.errors import TLSError

    with pytest.raises(TLSError):
        async with open_imap_connection(
            mail_servers.host,
            mail_servers.imap_tls_port,
            ssl_context=mail_servers.ssl_context(),
            server_hostname="not-this-host.test",
        ):
            pytest.fail("connected despite a certificate for another name")


async def test_fetch_large_message(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    body = line * (30 * 1024 * 1024 // len(line))
    message = make_message("big", body)
    await deliver(mail_servers, user, make_message("small"), message)
    async with open_inbox(mail_servers, user) as (imap, _):
        sizes = {}
        digests = {}
        async for msg in imap.uid_fetch([1, 2], ["RFC822.SIZE", "BODY.PEEK[]"]):
            assert msg.uid is not None
            assert msg.body is not None
            sizes[msg.uid] = (msg.rfc822_size, len(msg.body))
            digests[msg.uid] = hashlib.sha256(msg.body).hexdigest()
        assert sizes[2] == (len(message), len(message))
        assert digests[2] == hashlib.sha256(message).hexdigest()


async def test_partial_fetch_and_literal_limit_against_dovecot(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    message = make_message("sized", line * (3 * 1024 * 1024 // len(line)))
    await deliver(mail_servers, user, message)
    async with open_inbox(mail_servers, user) as (imap, _):
        # A real server keeps to the n asked for; the check lets its answer through.
        got = [m async for m in imap.uid_fetch([1], ["RFC822.SIZE", "BODY.PEEK[]<0.1000>"])]
        assert [(m.rfc822_size, m.sections["<0>"]) for m in got] == [(len(message), message[:1000])]
        # A command cancelled before its first byte leaves the session as it was.
        with trio.CancelScope() as scope:
            scope.cancel()
            await imap.noop()
        assert scope.cancelled_caught
        assert not imap.broken
        # With a literal limit below the message (what the channel sets from
        # max_message_bytes) the whole message is refused as it is announced.
        imap.max_literal_size = 1024 * 1024
        with pytest.raises(RemoteProtocolError, match="literal of"):
            async for _ in imap.uid_fetch([1], ["BODY.PEEK[]"]):
                pass
        assert imap.broken


async def idle_until_exists(imap: IMAPConnection) -> Exists:
    async with imap.idle() as idle:
        async for push in idle:
            if isinstance(push, Exists):
                return push
    raise AssertionError("IDLE ended without EXISTS")


async def test_idle_wakes_up_within_a_second_of_a_delivery(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_inbox(mail_servers, user) as (imap, _):
        delivered_at: list[float] = []
        woke: list[tuple[float, Exists]] = []

        async def waiter() -> None:
            push = await idle_until_exists(imap)
            woke.append((time.monotonic(), push))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.5)  # IDLE is established
                delivered_at.append(time.monotonic())
                await deliver(mail_servers, user, make_message("ping"))
        [(when, push)] = woke
        assert push == Exists(1)
        assert when - delivered_at[0] < 1.0
        assert await imap.uid_search() == (1,)


async def test_idle_renewed(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_inbox(mail_servers, user) as (imap, _):
        renewals = 0
        seen = None
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:

                async def deliver_later() -> None:
                    await trio.sleep(2.2)
                    await deliver(mail_servers, user, make_message("after renewals"))

                nursery.start_soon(deliver_later)
                while seen is None:
                    async with imap.idle() as idle:
                        with trio.move_on_after(0.7):  # the renewal interval, shortened
                            async for push in idle:
                                if isinstance(push, Exists):
                                    seen = push
                                    break
                    if seen is None:
                        renewals += 1
                        assert await imap.noop() is not None  # usable between IDLEs
        assert renewals >= 2
        assert seen == Exists(1)
        assert not imap.broken


async def idle_until_closed(imap: IMAPConnection, pushes: list[object]) -> None:
    async with imap.idle() as idle:
        pushes.extend([push async for push in idle])


async def test_server_restart_surfaces_as_connection_broken(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with open_inbox(mail_servers, user) as (imap, _):
        pushes: list[object] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, mail_servers.restart_dovecot)
                with pytest.raises(ConnectionBrokenError) as info:
                    await idle_until_closed(imap, pushes)
        assert imap.broken
        assert "closed the connection" in str(info.value) or "BYE" in str(info.value)
        assert all(isinstance(p, StatusResponse) and p.status == "BYE" for p in pushes)
        with pytest.raises(ConnectionBrokenError):
            await imap.noop()
    # and a new connection works once the server is back
    async with connect(mail_servers) as imap:
        await imap.login(user.address, user.password)
        assert (await imap.select()).exists == 0


@pytest.mark.skipif(os.environ.get("PRXMAIL_SKIP_SLOW") == "1", reason="slow test skipped")
async def test_many_messages_in_batches(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    messages = [make_message(f"m{i}", b"x" * 4000 + b"\r\n") for i in range(300)]
    await deliver(mail_servers, user, *messages)
    async with open_inbox(mail_servers, user) as (imap, box):
        assert box.exists == 300
        uids = await imap.uid_search()
        fetched = []
        for i in range(0, len(uids), 128):
            async for msg in imap.uid_fetch(uids[i : i + 128], ["BODY.PEEK[]"]):
                fetched.append(msg.body)
        assert fetched == messages
        # the same through uid_fetch(batch_size=...): in order, batch after batch
        batched = [msg async for msg in imap.uid_fetch(uids, ["BODY.PEEK[]"], batch_size=64)]
        assert [m.uid for m in batched] == list(uids)
        assert [m.body for m in batched] == messages
        # pipelined: Dovecot may interleave two batches, but nothing is lost or doubled
        piped = [
            msg async for msg in imap.uid_fetch(uids, ["BODY.PEEK[]"], batch_size=64, pipeline=True)
        ]
        assert sorted(m.uid or 0 for m in piped) == list(uids)
        by_uid = {m.uid: m.body for m in piped}
        assert [by_uid[u] for u in uids] == messages


async def test_list_mailboxes(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    async with connect(mail_servers) as imap:
        await imap.login(user.address, user.password)
        await imap._command("CREATE", [String(encode_mailbox("Entwürfe"))])
        boxes = await imap.list_mailboxes()
        names = {decode_mailbox(box.raw_name) for box in boxes}
        assert {"INBOX", "Entwürfe"} <= names
        assert all(box.delimiter in ("/", ".") for box in boxes)
        only_inbox = await imap.list_mailboxes("", "INBOX")
        assert [box.raw_name for box in only_inbox] == [b"INBOX"]
