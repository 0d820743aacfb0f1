"""The trio IMAP connection against a scripted fake server on memory streams."""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
import trustme

from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    IMAPNoResponse,
    LocalProtocolError,
    RemoteProtocolError,
    TLSError,
)
from prxmail.imap import (
    ConnectionState,
    Exists,
    Expunge,
    FetchData,
    FetchStream,
    IMAPConnection,
    IMAPProtocol,
    MailboxState,
    Raw,
    Security,
    SequenceSet,
    StatusResponse,
    open_imap_stream,
)

GREETING = b"* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN ID ENABLE CONDSTORE] ready\r\n"


class Peer:
    """The server side of a memory stream, driven line by line by a test script."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(bytes(self.buf))
            self.buf += data
        idx = self.buf.index(b"\r\n")
        line = bytes(self.buf[:idx])
        del self.buf[: idx + 2]
        return line

    async def expect(self, want: bytes) -> None:
        got = await self.line()
        assert got == want

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def logout(self, tag: bytes) -> None:
        await self.expect(tag + b" LOGOUT")
        await self.send(b"* BYE bye\r\n" + tag + b" OK Logout completed\r\n")
        await self.stream.aclose()


Script = Callable[[Peer], Awaitable[None]]


async def run(script: Script, body: Callable[[IMAPConnection], Awaitable[None]]) -> None:
    """Run the scripted server beside the client body (plaintext, explicitly chosen)."""
    client, server = trio.testing.memory_stream_pair()
    peer = Peer(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script, peer)
        async with open_imap_stream(client, security=Security.PLAIN) as imap:
            await body(imap)


async def login(peer: Peer, tag: bytes = b"A0001") -> None:
    await peer.expect(tag + b" LOGIN alice secret")
    await peer.send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE CONDSTORE ESEARCH] Logged in\r\n")


SELECT_REPLY = (
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags\r\n"
    b"* 3 EXISTS\r\n"
    b"* 1 RECENT\r\n"
    b"* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"
    b"* OK [UIDNEXT 12] Predicted next UID\r\n"
    b"* OK [HIGHESTMODSEQ 99] Highest\r\n"
)


async def test_session_login_select_search_fetch_store_noop_logout() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX (CONDSTORE)")
        await peer.send(SELECT_REPLY + b"A0002 OK [READ-WRITE] Select completed\r\n")
        await peer.expect(b"A0003 UID SEARCH RETURN (ALL) UID 10:*")
        await peer.send(b'* ESEARCH (TAG "A0003") UID ALL 10:11\r\nA0003 OK done\r\n')
        await peer.expect(b"A0004 UID FETCH 10:11 (UID RFC822.SIZE BODY.PEEK[])")
        await peer.send(
            b"* 2 FETCH (UID 10 RFC822.SIZE 3 BODY[] {3}\r\none)\r\n"
            b"* 1 FETCH (FLAGS (\\Seen))\r\n"  # unsolicited: no UID
            b"* 3 FETCH (UID 11 RFC822.SIZE 3 BODY[] {3}\r\ntwo)\r\n"
            b"A0004 OK Fetch completed\r\n"
        )
        await peer.expect(b"A0005 UID STORE 10:11 +FLAGS.SILENT (\\Seen)")
        await peer.send(b"A0005 OK Store completed\r\n")
        await peer.expect(b"A0006 NOOP")
        await peer.send(b"* 4 EXISTS\r\n* 2 EXPUNGE\r\nA0006 OK NOOP completed\r\n")
        await peer.logout(b"A0007")

    async def body(imap: IMAPConnection) -> None:
        assert imap.state is ConnectionState.NOT_AUTHENTICATED
        await imap.login("alice", "secret")
        assert imap.state is ConnectionState.AUTHENTICATED
        assert "ESEARCH" in imap.capabilities
        box = await imap.select("INBOX", condstore=True)
        assert box == MailboxState(
            name="INBOX",
            exists=3,
            recent=1,
            uidvalidity=1700000000,
            uidnext=12,
            flags=("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"),
            permanent_flags=("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\*"),
            unseen=None,
            highestmodseq=99,
            read_only=False,
        )
        uids = await imap.uid_search("UID", SequenceSet(((10, None),)))
        assert uids == (10, 11)
        got = [
            (m.uid, m.rfc822_size, m.body)
            async for m in imap.uid_fetch(uids, ["UID", "RFC822.SIZE", "BODY.PEEK[]"])
        ]
        assert got == [(10, 3, b"one"), (11, 3, b"two")]
        assert await imap.uid_store(uids, "+FLAGS", ["\\Seen"]) == ()
        assert await imap.noop() == (Exists(4), Expunge(2))

    await run(script, body)


async def test_streaming_fetch_yields_before_the_command_completes() -> None:
    first_seen = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 1:2 (BODY.PEEK[])")
        await peer.send(b"* 1 FETCH (UID 1 BODY[] {1}\r\na)\r\n")
        await first_seen.wait()  # the client has it while the command is still open
        await peer.send(b"* 2 FETCH (UID 2 BODY[] {1}\r\nb)\r\nA0003 OK done\r\n")
        await peer.logout(b"A0004")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        seen = []
        async for msg in imap.uid_fetch([1, 2]):
            seen.append(msg.body)
            first_seen.set()
        assert seen == [b"a", b"b"]

    with trio.fail_after(5):
        await run(script, body)


async def test_leaving_a_fetch_early_drains_it_before_the_next_command() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 EXAMINE INBOX")
        await peer.send(b"A0002 OK [READ-ONLY] done\r\n")
        await peer.expect(b"A0003 UID FETCH 1:3 (FLAGS)")
        await peer.send(
            b"* 1 FETCH (UID 1 FLAGS ())\r\n* 2 FETCH (UID 2 FLAGS ())\r\n"
            b"* 3 FETCH (UID 3 FLAGS ())\r\nA0003 OK done\r\n"
        )
        await peer.expect(b"A0004 NOOP")
        await peer.send(b"A0004 OK done\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        box = await imap.examine()
        assert box.read_only
        async for msg in imap.uid_fetch(range(1, 4), "FLAGS"):
            assert msg.uid == 1
            break
        assert await imap.noop() == ()

    await run(script, body)


async def test_login_failure_never_shows_the_password() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b'A0001 LOGIN alice "hunter 2"')
        await peer.send(b"A0001 NO [AUTHENTICATIONFAILED] bad password hunter 2 for alice\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError) as info:
            await imap.login("alice", "hunter 2")
        err = info.value
        assert err.code == "AUTHENTICATIONFAILED"
        assert "hunter 2" not in str(err)
        assert "hunter 2" not in err.server_text
        assert "***" in err.server_text
        assert imap.state is ConnectionState.NOT_AUTHENTICATED
        assert not imap.broken
        # The server's refusal stays reachable as the cause, redacted like the error.
        cause = err.__cause__
        assert isinstance(cause, IMAPNoResponse)
        assert cause.code == "AUTHENTICATIONFAILED"
        assert "hunter 2" not in str(cause)
        assert "hunter 2" not in cause.text
        assert "hunter 2" not in repr(cause)

    await run(script, body)


async def test_password_needing_a_literal_waits_for_continuation() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 LOGIN alice {7}")
        await peer.send(b"+ go ahead\r\n")
        await peer.expect("pässwd".encode())
        await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1] ok\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "pässwd")
        assert imap.state is ConnectionState.AUTHENTICATED

    await run(script, body)


async def test_authenticate_plain_without_and_with_sasl_ir() -> None:
    token = base64.b64encode(b"\0alice\0secret")

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 AUTHENTICATE PLAIN")
        await peer.send(b"+ \r\n")
        await peer.expect(token)
        await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        await imap.authenticate_plain("alice", "secret")
        assert imap.state is ConnectionState.AUTHENTICATED

    await run(script, body)

    async def script_ir(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
        await peer.expect(b"A0001 AUTHENTICATE PLAIN " + token)
        await peer.send(b"A0001 NO [AUTHENTICATIONFAILED] no " + token + b"\r\n")
        await peer.logout(b"A0002")

    async def body_ir(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError) as info:
            await imap.authenticate_plain("alice", "secret")
        assert token.decode() not in str(info.value.server_text)

    await run(script_ir, body_ir)


async def test_xoauth2_error_challenge_is_answered_with_an_empty_line() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n")
        await peer.expect(b"A0001 AUTHENTICATE XOAUTH2")
        await peer.send(b"+ \r\n")
        sent = base64.b64decode(await peer.line())
        assert sent == b"user=bob\x01auth=Bearer ya29.tok3n\x01\x01"
        await peer.send(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
        await peer.expect(b"")
        await peer.send(b"A0001 NO [AUTHENTICATIONFAILED] invalid token ya29.tok3n\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError, match="invalid token") as info:
            await imap.authenticate_xoauth2("bob", "ya29.tok3n")
        assert "tok3n" not in str(info.value)

    await run(script, body)


async def test_id_and_enable() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b'A0001 ID ("name" "prxmail")')
        await peer.send(b'* ID ("name" "Dovecot")\r\nA0001 OK ID completed\r\n')
        await login(peer, b"A0002")
        await peer.expect(b"A0003 CAPABILITY")
        await peer.send(b"* CAPABILITY IMAP4rev1 ENABLE CONDSTORE\r\nA0003 OK ok\r\n")
        await peer.expect(b"A0004 ENABLE CONDSTORE")
        await peer.send(b"* ENABLED CONDSTORE\r\nA0004 OK Enabled\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        assert await imap.id({"name": "prxmail"}) == {"name": "Dovecot"}
        await imap.login("alice", "secret")
        await imap.capability()
        assert await imap.enable("CONDSTORE") == {"CONDSTORE"}

    await run(script, body)


async def test_failed_select_raises_and_deselects() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b'A0002 SELECT "No such"')
        await peer.send(b"A0002 NO [NONEXISTENT] Mailbox doesn't exist\r\n")
        await peer.logout(b"A0003")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with pytest.raises(IMAPNoResponse) as info:
            await imap.select("No such")
        assert info.value.code == "NONEXISTENT"
        assert imap.mailbox is None
        with pytest.raises(LocalProtocolError, match="not allowed"):
            await imap.uid_search()

    await run(script, body)


async def test_idle_yields_pushes_renews_and_ends_with_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"* 1 EXISTS\r\nA0002 OK done\r\n")
        await peer.expect(b"A0003 IDLE")
        await peer.send(b"+ idling\r\n")
        await trio.sleep(1)
        await peer.send(b"* OK Still here\r\n* 2 EXISTS\r\n* 1 FETCH (FLAGS (\\Seen))\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"A0003 OK Idle completed\r\n")
        # second IDLE: nothing happens, the client renews after its timeout
        await peer.expect(b"A0004 IDLE")
        await peer.send(b"+ idling\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"* 3 EXISTS\r\nA0004 OK Idle completed\r\n")
        await peer.expect(b"A0005 IDLE")
        await peer.send(b"+ idling\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"A0005 OK Idle completed\r\n")
        await peer.logout(b"A0006")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        pushes = []
        async with imap.idle() as idle:
            assert imap.state is ConnectionState.IDLING
            async for push in idle:
                pushes.append(push)
                if len(pushes) == 2:
                    break
        assert pushes == [Exists(2), FetchData(seq=1, flags=("\\Seen",))]
        assert imap.state is ConnectionState.SELECTED
        start = trio.current_time()
        async with imap.idle() as idle:
            with trio.move_on_after(60):
                async for push in idle:
                    pytest.fail(f"unexpected push {push}")
        assert trio.current_time() - start == pytest.approx(60)
        assert not imap.broken
        # the EXISTS sent between DONE and the tagged OK is reported by the next IDLE
        async with imap.idle() as idle:
            async for push in idle:
                assert push == Exists(3)
                break

    await run(script, body)


async def test_bye_during_idle_ends_iteration_and_breaks_connection() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 IDLE")
        await peer.send(b"+ idling\r\n* BYE Server shutting down\r\n")
        await peer.stream.aclose()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        pushes = []
        with pytest.raises(ConnectionBrokenError, match="shutting down"):
            async with imap.idle() as idle:
                pushes.extend([push async for push in idle])
        assert pushes == [StatusResponse("BYE", None, "Server shutting down")]
        with pytest.raises(ConnectionBrokenError):
            await imap.noop()

    await run(script, body)


async def test_cancelled_command_breaks_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 NOOP")
        with pytest.raises((EOFError, trio.ClosedResourceError, trio.BrokenResourceError)):
            await peer.line()  # never answers; the client gives up and closes
        closed.set()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with pytest.raises(trio.TooSlowError), trio.fail_after(10):
            await imap.noop()
        assert imap.broken
        with pytest.raises(ConnectionBrokenError, match="cancelled"):
            await imap.noop()
        with pytest.raises(ConnectionBrokenError):
            async for _ in imap.uid_fetch([1]):
                pass
        await imap.aclose()
        await imap.aclose()  # idempotent

    await run(script, body)
    assert closed.is_set()


async def test_server_bye_mid_command_is_a_clear_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 NOOP")
        await peer.send(b"* BYE Disconnected for inactivity\r\n")
        await peer.stream.aclose()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with pytest.raises(ConnectionBrokenError, match="Disconnected for inactivity"):
            await imap.noop()
        assert imap.state is ConnectionState.LOGOUT
        with pytest.raises(ConnectionBrokenError):
            await imap.capability()

    await run(script, body)


async def test_eof_mid_literal_is_a_clear_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 5 (BODY.PEEK[])")
        await peer.send(b"* 1 FETCH (UID 5 BODY[] {100000}\r\n" + b"x" * 5000)
        await peer.stream.aclose()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        with pytest.raises(ConnectionBrokenError, match="middle of"):
            async for _ in imap.uid_fetch([5]):
                pass
        assert imap.broken

    await run(script, body)


async def test_garbage_greeting() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(RemoteProtocolError, match="greeting"):
        async with open_imap_stream(client, security=Security.PLAIN):
            pass


async def test_bye_greeting() -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(b"* BYE Too many connections\r\n")
    with pytest.raises(ConnectionBrokenError, match="Too many connections"):
        async with open_imap_stream(client, security=Security.PLAIN):
            pass


async def test_concurrent_commands_are_refused() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 NOOP")
        await trio.sleep(0.05)
        await peer.send(b"A0001 OK done\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        errors = []

        async def second() -> None:
            await trio.sleep(0.01)
            try:
                await imap.capability()
            except LocalProtocolError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await imap.noop()
        assert len(errors) == 1
        assert "still running" in str(errors[0])

    await run(script, body)


async def test_credentials_refused_on_unencrypted_connection_unless_plain_chosen() -> None:
    client, server = trio.testing.memory_stream_pair()
    imap = IMAPConnection(client, encrypted=False)
    await server.send_all(GREETING)
    await imap.read_greeting()
    with pytest.raises(TLSError, match="unencrypted"):
        await imap.login("alice", "secret")
    with pytest.raises(TLSError, match="unencrypted"):
        await imap.authenticate_plain("alice", "secret")
    await imap.aclose()


async def test_logindisabled_is_refused_locally() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n")
        await peer.logout(b"A0001")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError, match="LOGINDISABLED"):
            await imap.login("alice", "secret")

    await run(script, body)


async def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.logout(b"A0003")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        with pytest.raises(LocalProtocolError):
            imap.uid_fetch([1], ["BODY[]\r\nA9 DELETE INBOX"])
        with pytest.raises(LocalProtocolError):
            await imap.uid_store([1], "+FLAGS", ["\\Seen) (x"])
        with pytest.raises(LocalProtocolError):
            imap.uid_fetch([])
        with pytest.raises(LocalProtocolError):
            await imap.uid_search(Raw("ALL\r\nA9 LOGOUT"))
        assert not imap.broken

    await run(script, body)


# -- STARTTLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_pair() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("imap.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_starttls_upgrades_and_drops_injected_plaintext(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_pair
    client, server = trio.testing.memory_stream_pair()

    async def script() -> None:
        peer = Peer(server)
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n")
        await peer.expect(b"A0001 STARTTLS")
        # a man in the middle appends a forged capability list in plaintext
        await peer.send(b"A0001 OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN FORGED\r\n")
        tls = trio.SSLStream(server, server_ctx, server_side=True)
        await tls.do_handshake()
        peer = Peer(tls)
        await peer.expect(b"A0002 CAPABILITY")
        await peer.send(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE\r\nA0002 OK ok\r\n")
        await login(peer, b"A0003")
        await peer.expect(b"A0004 LOGOUT")
        await peer.send(b"* BYE\r\nA0004 OK bye\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        async with open_imap_stream(
            client, security=Security.STARTTLS, ssl_context=client_ctx, server_hostname="imap.test"
        ) as imap:
            assert imap.encrypted
            assert "FORGED" not in imap.capabilities
            assert "LOGINDISABLED" not in imap.capabilities
            await imap.login("alice", "secret")


async def test_starttls_not_offered_is_refused(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
    with pytest.raises(TLSError, match="does not offer"):
        async with open_imap_stream(client, security=Security.STARTTLS, ssl_context=tls_pair[1]):
            pytest.fail("must not get here")


async def test_starttls_refused_by_server(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    client, server = trio.testing.memory_stream_pair()

    async def script() -> None:
        peer = Peer(server)
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        await peer.expect(b"A0001 STARTTLS")
        await peer.send(b"A0001 NO TLS unavailable\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(TLSError, match="TLS unavailable"):
            async with open_imap_stream(
                client, security=Security.STARTTLS, ssl_context=tls_pair[1]
            ):
                pytest.fail("must not get here")


async def test_starttls_handshake_failure_wrong_host(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_pair
    client, server = trio.testing.memory_stream_pair()

    async def script() -> None:
        peer = Peer(server)
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        await peer.expect(b"A0001 STARTTLS")
        await peer.send(b"A0001 OK go\r\n")
        tls = trio.SSLStream(server, server_ctx, server_side=True)
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        with pytest.raises(TLSError, match="handshake"):
            async with open_imap_stream(
                client,
                security=Security.STARTTLS,
                ssl_context=client_ctx,
                server_hostname="evil.test",
            ):
                pytest.fail("must not get here")


# -- the client TLS stream -------------------------------------------------------------------


async def test_tls_stream_returns_every_buffered_record_in_one_read(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    from prxmail.imap._tls import ClientTLSStream

    server_ctx, client_ctx = tls_pair
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = ClientTLSStream(client_raw, client_ctx, server_hostname="imap.test")
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    for i in range(50):  # fifty separate TLS records
        await server.send_all(b"record %02d\r\n" % i)
    got = await client.receive_some(1 << 20)
    assert got == b"".join(b"record %02d\r\n" % i for i in range(50))
    await client.send_all(b"hello")
    assert await server.receive_some(100) == b"hello"
    # max_bytes is honoured; the rest comes with the next read
    await server.send_all(b"x" * 100)
    assert await client.receive_some(10) == b"x" * 10
    assert await client.receive_some(1000) == b"x" * 90
    # the peer vanishing without close_notify is an error, not a clean EOF
    await server_raw.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some(100)
    await client.aclose()
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


async def test_tls_stream_clean_close_notify_is_eof(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    from prxmail.imap._tls import ClientTLSStream

    server_ctx, client_ctx = tls_pair
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = ClientTLSStream(client_raw, client_ctx, server_hostname="imap.test")
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.aclose)
        assert await client.receive_some(100) == b""
    assert await client.receive_some(100) == b""
    await client.aclose()


async def collect_uids(stream: FetchStream, into: list[int | None]) -> None:
    async for msg in stream:
        into.append(msg.uid)


async def test_batched_fetch_pipelines_two_commands() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        # two batches arrive before any answer: the client pipelines them
        await peer.expect(b"A0003 UID FETCH 1:2 (FLAGS)")
        await peer.expect(b"A0004 UID FETCH 3,5 (FLAGS)")
        await peer.send(b"* 1 FETCH (UID 1 FLAGS ())\r\n* 2 FETCH (UID 2 FLAGS ())\r\n")
        await peer.send(b"A0003 OK done\r\n")
        # the third batch goes out once the first is complete
        await peer.expect(b"A0005 UID FETCH 7 (FLAGS)")
        await peer.send(b"* 3 FETCH (UID 3 FLAGS ())\r\n* 4 FETCH (UID 5 FLAGS ())\r\n")
        await peer.send(b"A0004 NO [SERVERBUG] half failed\r\n")
        await peer.send(b"* 5 FETCH (UID 7 FLAGS ())\r\nA0005 OK done\r\n")
        await peer.logout(b"A0006")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        seen: list[int | None] = []
        stream = imap.uid_fetch([7, 5, 3, 2, 1], "FLAGS", batch_size=2, pipeline=True)
        with pytest.raises(IMAPNoResponse, match="half failed"):
            await collect_uids(stream, seen)
        assert seen == [1, 2, 3, 5, 7]
        assert not imap.broken

    with trio.fail_after(5):
        await run(script, body)


async def test_stopping_a_batched_fetch_sends_no_more_batches() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 1 (FLAGS)")
        await peer.expect(b"A0004 UID FETCH 2 (FLAGS)")
        await peer.send(b"* 1 FETCH (UID 1 FLAGS ())\r\nA0003 OK done\r\n")
        await peer.send(b"* 2 FETCH (UID 2 FLAGS ())\r\nA0004 OK done\r\n")
        await peer.expect(b"A0005 NOOP")  # no "UID FETCH 3" before it
        await peer.send(b"A0005 OK done\r\n")
        await peer.logout(b"A0006")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        async with imap.uid_fetch([1, 2, 3], "FLAGS", batch_size=1, pipeline=True) as stream:
            async for msg in stream:
                assert msg.uid == 1
                break
        await imap.noop()

    with trio.fail_after(5):
        await run(script, body)


async def test_hostile_literal_claim_breaks_the_connection_without_allocating() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 1 (BODY.PEEK[])")
        await peer.send(b"* 1 FETCH (UID 1 BODY[] {99999999999999}\r\n")
        with pytest.raises((EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
            await peer.line()

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script, Peer(server))
        async with open_imap_stream(
            client, security=Security.PLAIN, max_literal_size=10_000_000
        ) as imap:
            await imap.login("alice", "secret")
            await imap.select()
            with pytest.raises(RemoteProtocolError, match="literal of 99999999999999 bytes"):
                await imap.uid_fetch([1]).__anext__()
            assert imap.broken
            with pytest.raises(ConnectionBrokenError, match="literal"):
                await imap.noop()


async def test_short_password_echoed_by_server_withholds_the_text() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 LOGIN alice abc")
        await peer.send(b"A0001 NO [AUTHENTICATIONFAILED] password abc is wrong\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError) as info:
            await imap.login("alice", "abc")
        assert "abc" not in str(info.value)
        assert "withheld" in info.value.server_text

    await run(script, body)


async def test_flood_of_untagged_responses_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import prxmail.imap._connection as connection_module

    # Room for three "* 1 EXISTS" (12 bytes on the wire, charged with the overhead).
    budget = 3 * (12 + connection_module.RESPONSE_OVERHEAD)
    monkeypatch.setattr(connection_module, "MAX_UNTAGGED_BYTES_PER_COMMAND", budget)

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 NOOP")
        await peer.send(b"* 1 EXISTS\r\n" * 10)
        with pytest.raises((EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
            await peer.line()

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(RemoteProtocolError, match=f"more than {budget} bytes of untagged"):
            await imap.noop()
        assert imap.broken

    await run(script, body)


async def test_batched_fetch_without_pipelining_sends_one_batch_at_a_time() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 1:2 (UID)")
        await peer.send(b"* 1 FETCH (UID 1)\r\n* 2 FETCH (UID 2)\r\nA0003 OK done\r\n")
        await peer.expect(b"A0004 UID FETCH 3 (UID)")
        await peer.send(b"* 3 FETCH (UID 3)\r\nA0004 OK done\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        got = [m.uid async for m in imap.uid_fetch([3, 1, 2], "UID", batch_size=2)]
        assert got == [1, 2, 3]

    with trio.fail_after(5):
        await run(script, body)


async def test_pushes_seen_during_other_commands_reach_the_next_idle_once() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"* 1 EXISTS\r\nA0002 OK done\r\n")
        await peer.expect(b"A0003 NOOP")
        await peer.send(b"* 2 EXISTS\r\nA0003 OK done\r\n")  # returned by noop()
        await peer.expect(b"A0004 UID SEARCH RETURN (ALL) ALL")
        await peer.send(b"* 3 EXISTS\r\nA0004 OK done\r\n")  # kept for the next IDLE
        await peer.expect(b"A0005 IDLE")
        await peer.send(b"+ idling\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"A0005 OK done\r\n")
        await peer.logout(b"A0006")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        assert await imap.noop() == (Exists(2),)
        assert await imap.uid_search() == ()
        async with imap.idle() as idle:
            async for push in idle:
                assert push == Exists(3)
                break

    with trio.fail_after(5):
        await run(script, body)


# -- error tree -----------------------------------------------------------------------------


def test_error_tree_has_protocol_and_refusal_parents() -> None:
    from prxmail import errors
    from prxmail.errors import (
        CommandRefusedError,
        IMAPBadResponse,
        IMAPCommandError,
        ProtocolError,
        SMTPPermanentError,
        SMTPReplyError,
        SMTPTransientError,
    )

    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    for refused in (IMAPNoResponse, IMAPBadResponse, SMTPTransientError, SMTPPermanentError):
        assert issubclass(refused, CommandRefusedError)
    imap_no = IMAPNoResponse("SELECT", "NO", "no such mailbox", "NONEXISTENT")
    smtp_4xx = SMTPTransientError("RCPT", 450, "mailbox busy", "4.2.1")
    for err in (imap_no, smtp_4xx):
        assert isinstance(err, CommandRefusedError)
        assert not isinstance(err, ProtocolError)
    assert (imap_no.command, imap_no.text) == ("SELECT", "no such mailbox")
    assert (smtp_4xx.command, smtp_4xx.text, smtp_4xx.code) == ("RCPT", "mailbox busy", 450)
    # One way to tell a retryable SMTP refusal: its class, not a second flag.
    assert not hasattr(SMTPReplyError, "transient")
    assert isinstance(imap_no, IMAPCommandError)
    assert {"ProtocolError", "CommandRefusedError"} <= set(errors.__all__)


async def test_connect_failure_is_connection_broken_with_the_os_error_as_cause() -> None:
    from prxmail.imap import open_imap_connection

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there any more
    with pytest.raises(ConnectionBrokenError, match="cannot connect") as info:
        async with open_imap_connection("127.0.0.1", port, security=Security.PLAIN):
            pass
    assert isinstance(info.value.__cause__, OSError)


# -- cancellation ---------------------------------------------------------------------------


async def test_command_cancelled_before_its_first_byte_leaves_the_connection_usable() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        # Nothing of the cancelled NOOP, UID FETCH, SELECT or IDLE reached the server:
        # the next command is the next tag.
        await peer.expect(b"A0002 NOOP")
        await peer.send(b"A0002 OK done\r\n")
        await peer.logout(b"A0003")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with trio.CancelScope() as scope:
            scope.cancel()
            await imap.noop()
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            async for _ in imap.uid_fetch([1]):
                pass
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await imap.select("INBOX")
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            async with imap.idle():
                pass
        assert scope.cancelled_caught
        assert not imap.broken
        assert await imap.noop() == ()

    with trio.fail_after(5):
        await run(script, body)


async def test_command_cancelled_after_its_first_byte_breaks_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"* 3 EXISTS\r\n")  # ... and the tagged answer never comes
        with pytest.raises((EOFError, trio.ClosedResourceError, trio.BrokenResourceError)):
            await peer.line()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with trio.move_on_after(5) as scope:
            await imap.select("INBOX")
        assert scope.cancelled_caught
        assert imap.broken
        with pytest.raises(ConnectionBrokenError, match="cancelled"):
            await imap.noop()

    await run(script, body)


# -- byte bounds on what a command keeps ------------------------------------------------------

MiB = 1024 * 1024


async def run_lockstep(
    script: Script,
    body: Callable[[IMAPConnection], Awaitable[None]],
    *,
    security: Security = Security.PLAIN,
    ssl_context: ssl.SSLContext | None = None,
    open_error: str | None = None,
) -> int:
    """Like run(), over a lockstep pair (a send returns only once the client read it, so
    nothing piles up in the pair) and with tracemalloc: returns the peak bytes allocated
    while the client ran. With ``open_error``, opening must fail with a
    RemoteProtocolError matching it."""
    import tracemalloc

    client, server = trio.testing.lockstep_stream_pair()
    peer = Peer(server)
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(script, peer)
            opening = open_imap_stream(client, security=security, ssl_context=ssl_context)
            if open_error is not None:
                with pytest.raises(RemoteProtocolError, match=open_error):
                    await opening.__aenter__()
                await client.aclose()
            else:
                async with opening as imap:
                    await body(imap)
        peak = tracemalloc.get_traced_memory()[1]
        # Shown with -s: the figures docs/reliability.md records.
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        print(f"connection peak {test}: {peak / 2**20:.1f} MiB traced")
        return peak
    finally:
        tracemalloc.stop()


async def send_until_closed(peer: Peer, chunks: Iterator[bytes]) -> int:
    """Send lazily generated chunks until the client hangs up; return bytes sent."""
    sent = 0
    try:
        for chunk in chunks:
            await peer.send(chunk)
            sent += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return sent


def literal_fetches(count: int, size: int, *, first_seq: int = 1) -> Iterator[bytes]:
    """Untagged FETCH responses with a ``size``-byte literal each, made as sent."""
    chunk = b"x" * MiB
    for seq in range(first_seq, first_seq + count):
        yield b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (seq, seq, size)
        left = size
        while left:
            part = chunk[: min(left, MiB)]
            left -= len(part)
            yield part
        yield b")\r\n"


async def test_untagged_literals_before_a_search_answer_are_bounded_in_bytes() -> None:
    import prxmail.imap._connection as connection_module

    budget = connection_module.MAX_UNTAGGED_BYTES_PER_COMMAND
    sent: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID SEARCH RETURN (ALL) ALL")
        # 150 MiB of 1 MiB literals before the answer (the tagged OK never comes).
        sent.append(await send_until_closed(peer, literal_fetches(150, MiB)))

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        # Refused once the budget is spent: the literal that would overrun it is refused
        # as it is announced, before it is allocated.
        with pytest.raises(
            RemoteProtocolError, match=r"literal of 1048576 bytes|bytes of untagged"
        ):
            await imap.uid_search()
        assert imap.broken
        with pytest.raises(ConnectionBrokenError):
            await imap.noop()

    with trio.fail_after(60):
        peak = await run_lockstep(script, body)
    assert budget - 2 * MiB < sent[0] < budget + 2 * MiB
    assert peak < budget + 8 * MiB


async def test_huge_literal_before_the_starttls_answer_is_refused_on_announcement() -> None:
    sent: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
        await peer.expect(b"A0001 STARTTLS")
        # What an on-path attacker can inject before the server's answer: 2 x 100 MiB.
        sent.append(await send_until_closed(peer, literal_fetches(2, 100 * MiB)))

    async def body(imap: IMAPConnection) -> None:
        pytest.fail("the connection must not open")

    with trio.fail_after(60):
        peak = await run_lockstep(
            script,
            body,
            security=Security.STARTTLS,
            ssl_context=ssl.create_default_context(),
            open_error="literal of 104857600 bytes",
        )
    assert sent[0] < 2 * MiB
    assert peak < 4 * MiB


async def test_endless_ok_during_select_is_bounded_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import prxmail.imap._connection as connection_module

    # A smaller budget than the real 64 MiB keeps the test quick under tracemalloc; the
    # charge per line is the real one, so this is the same bound scaled down.
    budget = 8 * MiB
    monkeypatch.setattr(connection_module, "MAX_UNTAGGED_BYTES_PER_COMMAND", budget)
    line = b"* OK still here\r\n"
    per_line = len(line) + connection_module.RESPONSE_OVERHEAD
    most_lines = budget // per_line
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        batch = line * 4096
        for _ in range(1_200_000 // 4096):  # more than the old count bound of 1,000,000
            yield batch

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        sent.append(await send_until_closed(peer, endless()))

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        with pytest.raises(RemoteProtocolError, match="bytes of untagged responses to one SELECT"):
            await imap.select()
        assert imap.broken

    with trio.fail_after(120):
        peak = await run_lockstep(script, body)
    # Refused after the budget's worth of lines, long before a million of them.
    assert sent[0] // len(line) < most_lines + 2 * 4096
    # What the kept lines really take stays within the budget they were charged.
    assert peak < budget + 4 * MiB


async def test_huge_push_while_idling_is_refused_on_announcement() -> None:
    sent: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 IDLE")
        await peer.send(b"+ idling\r\n* 1 EXISTS\r\n")
        sent.append(await send_until_closed(peer, literal_fetches(3, 100 * MiB)))

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        pushes: list[object] = []

        async def idle_on() -> None:
            async with imap.idle() as idle:
                async for push in idle:
                    pushes.append(push)

        with pytest.raises(RemoteProtocolError, match="literal of 104857600 bytes"):
            await idle_on()
        assert pushes == [Exists(1)]
        assert imap.broken

    with trio.fail_after(60):
        peak = await run_lockstep(script, body)
    assert sent[0] < 2 * MiB
    assert peak < 8 * MiB


async def test_pushes_piling_up_before_idle_starts_are_bounded_in_bytes() -> None:
    import prxmail.imap._connection as connection_module

    budget = connection_module.MAX_PENDING_PUSH_BYTES
    sent: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 IDLE")
        # Before the "+": 1 MiB FETCH pushes, each below the push bound, 110 MiB in all.
        sent.append(await send_until_closed(peer, literal_fetches(110, MiB)))

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        with pytest.raises(RemoteProtocolError, match="bytes of unsolicited responses"):
            async with imap.idle():
                pytest.fail("IDLE must not start")
        assert imap.broken

    with trio.fail_after(60):
        peak = await run_lockstep(script, body)
    assert sent[0] < budget + 2 * MiB
    assert peak < budget + 8 * MiB


# -- partial fetches --------------------------------------------------------------------------


async def test_partial_fetch_answered_with_a_bigger_literal_is_refused_on_announcement() -> None:
    sent: list[int] = []

    def answer() -> Iterator[bytes]:
        size = 120 * MiB
        yield b"* 1 FETCH (UID 7 RFC822.SIZE %d BODY[]<0> {%d}\r\n" % (size, size)
        for _ in range(size // MiB):
            yield b"y" * MiB
        yield b")\r\nA0003 OK done\r\n"

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 7 (RFC822.SIZE BODY.PEEK[]<0.1048576>)")
        sent.append(await send_until_closed(peer, answer()))

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        with pytest.raises(RemoteProtocolError, match="more than the limit of 1048576"):
            async for _ in imap.uid_fetch([7], ["RFC822.SIZE", "BODY.PEEK[]<0.1048576>"]):
                pass
        assert imap.broken

    with trio.fail_after(60):
        peak = await run_lockstep(script, body)
    assert sent[0] < 2 * MiB
    assert peak < 4 * MiB


@pytest.mark.parametrize(
    ("items", "answer"),
    [
        # Literal caps cannot apply (the header is fetched whole): checked on arrival.
        (
            ["BODY.PEEK[HEADER]", "BODY.PEEK[1]<0.10>"],
            b"* 1 FETCH (UID 7 BODY[HEADER] {4}\r\nh: v BODY[1]<0> {20}\r\n"
            b"01234567890123456789)\r\n",
        ),
        # A quoted string is no literal: checked on arrival.
        (["BODY.PEEK[]<0.10>"], b'* 1 FETCH (UID 7 BODY[]<0> "0123456789ABCDEF")\r\n'),
        # The section spelled differently by the server is still the one asked for.
        (
            ["BODY.PEEK[header.fields (subject)]<0.5>"],
            b'* 1 FETCH (UID 7 BODY[HEADER.FIELDS  (SUBJECT)]<0> "Subject: x")\r\n',
        ),
    ],
)
async def test_partial_fetch_section_longer_than_asked_is_refused(
    items: list[str], answer: bytes
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 7 (" + " ".join(items).encode() + b")")
        await peer.send(answer + b"A0003 OK done\r\n")
        with pytest.raises((EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
            await peer.line()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        with pytest.raises(RemoteProtocolError, match=r"more than the \d+ asked for"):
            async for _ in imap.uid_fetch([7], items):
                pass
        assert imap.broken

    with trio.fail_after(5):
        await run(script, body)


async def test_partial_fetch_within_its_bounds_and_whole_fetch_are_accepted() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 7 (BODY.PEEK[]<0.10> BODY.PEEK[1])")
        await peer.send(
            b"* 1 FETCH (UID 7 BODY[]<0> {10}\r\n0123456789 BODY[1] {20}\r\n"
            b"01234567890123456789)\r\nA0003 OK done\r\n"
        )
        await peer.logout(b"A0004")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        got = [m async for m in imap.uid_fetch([7], ["BODY.PEEK[]<0.10>", "BODY.PEEK[1]"])]
        assert [dict(m.sections) for m in got] == [
            {"<0>": b"0123456789", "1": b"01234567890123456789"}
        ]
        assert not imap.broken

    with trio.fail_after(5):
        await run(script, body)


async def test_literal_limit_can_be_set_on_an_open_connection() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID FETCH 7 (BODY.PEEK[])")
        await peer.send(b"* 1 FETCH (UID 7 BODY[] {2000}\r\n")
        with pytest.raises((EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
            await peer.line()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        imap.max_literal_size = 1000
        assert imap.max_literal_size == 1000
        with pytest.raises(RemoteProtocolError, match="more than the limit of 1000"):
            async for _ in imap.uid_fetch([7]):
                pass

    with trio.fail_after(5):
        await run(script, body)


async def test_server_ending_idle_by_itself_leaves_the_connection_usable() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 IDLE")
        await peer.send(b"+ idling\r\n* 4 EXISTS\r\nA0003 OK IDLE terminated\r\n")
        await peer.expect(b"A0004 NOOP")
        await peer.send(b"A0004 OK done\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        async with imap.idle() as idle:
            pushes = [push async for push in idle]
        assert pushes == [Exists(4)]
        assert not imap.broken
        assert await imap.noop() == ()

    with trio.fail_after(5):
        await run(script, body)


async def test_pushes_returned_by_idle_skip_keepalives_and_count_bound_drops_oldest() -> None:
    import prxmail.imap._connection as connection_module

    most = connection_module.MAX_PENDING_PUSHES

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 SELECT INBOX")
        await peer.send(b"A0002 OK done\r\n")
        await peer.expect(b"A0003 UID SEARCH RETURN (ALL) ALL")
        # More pushes than are kept: the oldest are dropped (they are hints).
        await peer.send(b"".join(b"* %d EXISTS\r\n" % n for n in range(1, most + 11)))
        await peer.send(b"A0003 OK done\r\n")
        await peer.expect(b"A0004 IDLE")
        await peer.send(b"+ idling\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"A0004 OK done\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        await imap.select()
        await imap.uid_search()
        async with imap.idle() as idle:
            async for push in idle:
                assert push == Exists(11)  # the first ten were dropped
                break

    with trio.fail_after(5):
        await run(script, body)


# -- OAuth 2 and the password choice (issue 13) -------------------------------------------

_CHALLENGE = base64.b64encode(b'{"status":"invalid_token","scope":"mail.imap"}')


async def test_authenticate_oauth2_prefers_oauthbearer_and_decodes_the_challenge() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] hi\r\n")
        line = await peer.line()
        assert line.startswith(b"A0001 AUTHENTICATE OAUTHBEARER ")
        sent = base64.b64decode(line.rsplit(b" ", 1)[1])
        assert sent == b"n,a=bob,\x01host=imap.test\x01port=993\x01auth=Bearer ya29.tok3n\x01\x01"
        await peer.send(b"+ " + _CHALLENGE + b"\r\n")
        # RFC 7628 §3.2.3: the client acknowledges the error with a single %x01.
        await peer.expect(base64.b64encode(b"\x01"))
        await peer.send(b"A0001 NO [AUTHENTICATIONFAILED] bad token ya29.tok3n\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError) as info:
            await imap.authenticate_oauth2("bob", "ya29.tok3n", host="imap.test", port=993)
        text = str(info.value)
        assert "status invalid_token" in text
        assert "needs scope mail.imap" in text
        assert "tok3n" not in text
        assert info.value.code == "AUTHENTICATIONFAILED"

    await run(script, body)


async def test_authenticate_oauth2_falls_back_to_xoauth2() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2] hi\r\n")
        await peer.expect(b"A0001 AUTHENTICATE XOAUTH2")
        await peer.send(b"+ \r\n")
        assert base64.b64decode(await peer.line()) == b"user=bob\x01auth=Bearer tok\x01\x01"
        await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1 IDLE] ok\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        await imap.authenticate_oauth2("bob", "tok")
        assert imap.state is ConnectionState.AUTHENTICATED

    await run(script, body)


async def test_authenticate_oauth2_without_a_mechanism_sends_nothing() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n")
        await peer.logout(b"A0001")

    async def body(imap: IMAPConnection) -> None:
        with pytest.raises(AuthenticationError, match="neither AUTHENTICATE OAUTHBEARER nor"):
            await imap.authenticate_oauth2("bob", "tok")

    await run(script, body)


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (b"IMAP4rev1 AUTH=PLAIN", b"A0001 AUTHENTICATE PLAIN"),
        (b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN AUTH=LOGIN", b"A0001 AUTHENTICATE PLAIN"),
        (b"IMAP4rev1 AUTH=PLAIN AUTH=LOGIN", b"A0001 LOGIN alice secret"),
        (b"IMAP4rev1", b"A0001 LOGIN alice secret"),
    ],
)
async def test_authenticate_password_chooses_login_or_authenticate_plain(
    caps: bytes, expected: bytes
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY " + caps + b"] hi\r\n")
        await peer.expect(expected)
        if b"AUTHENTICATE" in expected:
            await peer.send(b"+ \r\n")
            assert base64.b64decode(await peer.line()) == b"\0alice\0secret"
        await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1] ok\r\n")
        await peer.logout(b"A0002")

    async def body(imap: IMAPConnection) -> None:
        await imap.authenticate_password("alice", "secret")
        assert imap.state is ConnectionState.AUTHENTICATED

    await run(script, body)


async def test_send_client_id_names_prxmail_only_when_the_server_has_id() -> None:
    from prxmail import __version__

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.expect(b"A0001 LOGIN alice secret")
        await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1 ID] Logged in\r\n")
        await peer.expect(f'A0002 ID ("name" "prxmail" "version" "{__version__}")'.encode())
        await peer.send(b'* ID ("name" "Coremail")\r\nA0002 OK ID completed\r\n')
        await peer.logout(b"A0003")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        assert await imap.send_client_id() == {"name": "Coremail"}

    await run(script, body)

    async def script_no_id(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
        await peer.logout(b"A0001")

    async def body_no_id(imap: IMAPConnection) -> None:
        assert await imap.send_client_id() is None

    await run(script_no_id, body_no_id)


LONG_SECRET = "S3cr3tPassw0rd"


async def login_long(peer: Peer) -> None:
    await peer.expect(b"A0001 LOGIN alice " + LONG_SECRET.encode())
    await peer.send(b"A0001 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")


async def test_a_bye_echoing_the_password_is_redacted_in_every_error() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login_long(peer)
        await peer.expect(b"A0002 NOOP")
        await peer.send(f"* BYE you sent: alice {LONG_SECRET}\r\n".encode())
        await peer.stream.aclose()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", LONG_SECRET)
        with pytest.raises(ConnectionBrokenError) as info:
            await imap.noop()
        assert "you sent" in str(info.value)
        assert LONG_SECRET not in str(info.value)
        with pytest.raises(ConnectionBrokenError) as later:
            await imap.noop()
        assert LONG_SECRET not in str(later.value)

    await run(script, body)


async def test_a_malformed_line_echoing_the_password_is_redacted() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login_long(peer)
        await peer.expect(b"A0002 NOOP")
        await peer.send(f"* 1 FETCH ({LONG_SECRET} (((\r\n".encode())
        with pytest.raises((EOFError, trio.ClosedResourceError, trio.BrokenResourceError)):
            await peer.line()

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", LONG_SECRET)
        with pytest.raises(RemoteProtocolError) as info:
            await imap.noop()
        assert LONG_SECRET not in str(info.value)
        assert LONG_SECRET not in repr(info.value)
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or LONG_SECRET not in str(info.value.__context__)
        with pytest.raises(ConnectionBrokenError) as later:
            await imap.noop()
        assert LONG_SECRET not in str(later.value)
        await imap.aclose()

    await run(script, body)


async def test_stray_response_codes_are_ignored_in_commands_and_idle() -> None:
    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await login(peer)
        await peer.expect(b"A0002 NOOP")
        await peer.send(b"* [COPYUID 1 2:3 4:5]\r\nA0002 OK done\r\n")
        await peer.expect(b"A0003 SELECT INBOX")
        await peer.send(b"A0003 OK done\r\n")
        await peer.expect(b"A0004 IDLE")
        await peer.send(b"+ idling\r\n* [COPYUID 1 2 3]\r\n* 4 EXISTS\r\n")
        await peer.expect(b"DONE")
        await peer.send(b"A0004 OK idle done\r\n")
        await peer.logout(b"A0005")

    async def body(imap: IMAPConnection) -> None:
        await imap.login("alice", "secret")
        assert await imap.noop() == ()
        await imap.select()
        async with imap.idle() as idle:
            async for push in idle:
                assert push == Exists(4)
                break

    await run(script, body)


async def test_a_core_in_its_error_state_makes_the_connection_broken() -> None:
    client, server = trio.testing.memory_stream_pair()
    proto = IMAPProtocol()
    proto.receive_data(b"* OK ready\r\n")
    proto.next_event()  # the greeting
    proto.receive_data(b"* 1 FETCH (((\r\n")
    with pytest.raises(RemoteProtocolError):
        proto.next_event()
    assert proto.error is not None
    imap = IMAPConnection(client, encrypted=False, allow_plaintext_login=True, protocol=proto)
    with pytest.raises(ConnectionBrokenError, match="RemoteProtocolError"):
        await imap.noop()
    assert imap.broken
    with pytest.raises(ConnectionBrokenError):
        await imap.capability()
    await imap.aclose()
    await server.aclose()
