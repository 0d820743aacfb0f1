"""The trio SMTP connection over memory streams against a scripted fake server."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing
import trustme

from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    LocalProtocolError,
    RemoteProtocolError,
    SMTPPermanentError,
    SMTPTransientError,
    TLSError,
)
from prxmail.smtp import (
    IDLE_PROBE_SECONDS,
    MAX_PIPELINED_MESSAGES,
    MailTransaction,
    Security,
    SMTPConnection,
    SMTPSender,
    decode_data,
    open_smtp_connection,
)
from prxmail.smtp._connection import MAX_PIPELINED_COMMANDS

PASSWORD = "s3cret-Pa55"
SERVER_NAME = "mail.test"


@attrs.define
class FakeServer:
    """A small SMTP server speaking over one stream, scriptable at exact points.

    It reads command lines, answers them in order (so pipelined commands work), and
    records what it saw: the commands, which commands arrived in the same read, and
    each message it accepted.
    """

    pipelining: bool = True
    chunking: bool = False
    starttls: bool = False
    auth: str = "PLAIN LOGIN"
    size: int | None = 1_000_000
    tls_context: ssl.SSLContext | None = None
    implicit_tls: bool = False
    refuse: frozenset[str] = frozenset({"refused@x.test"})
    refuse_temp: frozenset[str] = frozenset()
    refuse_sender: frozenset[str] = frozenset()
    greeting: bytes = b"220 mail.test ESMTP fake\r\n"
    ehlo_refused: bool = False
    echo_secret_on_failure: bool = False
    after_starttls_inject: bytes = b""
    # Hook: called with each command line; may return bytes to send instead of the
    # normal reply, or the string "close" to drop the connection, or "hang".
    override: Callable[[str], bytes | str | None] | None = None
    commands: list[str] = attrs.Factory(list)
    chunks: list[list[str]] = attrs.Factory(list)
    messages: list[tuple[str, list[str], bytes]] = attrs.Factory(list)
    ehlo_count: int = 0
    bdat_count: int = 0
    tls_done: bool = False
    closed: bool = False

    def ehlo_reply(self) -> bytes:
        lines = ["mail.test"]
        if self.pipelining:
            lines.append("PIPELINING")
        if self.size is not None:
            lines.append(f"SIZE {self.size}")
        if self.starttls and not self.tls_done:
            lines.append("STARTTLS")
        if self.auth and (self.tls_done or not self.starttls):
            lines.append(f"AUTH {self.auth}")
        if self.chunking:
            lines.append("CHUNKING")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        out = b"".join(f"250-{line}\r\n".encode() for line in lines[:-1])
        return out + f"250 {lines[-1]}\r\n".encode()

    async def serve(self, stream: trio.abc.Stream) -> None:
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        if self.implicit_tls:
            assert self.tls_context is not None
            stream = trio.SSLStream(stream, self.tls_context, server_side=True)
        await stream.send_all(self.greeting)
        if not self.greeting.startswith(b"220"):
            return
        buf = b""
        sender = ""
        rcpts: list[str] = []
        auth_state: list[str] = []
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            chunk: list[str] = []
            self.chunks.append(chunk)
            out = b""
            while b"\r\n" in buf or (auth_state and auth_state[0] == "BDAT"):
                if auth_state and auth_state[0] == "BDAT":
                    want = int(auth_state[1])
                    if len(buf) < want:
                        break
                    content, buf = buf[:want], buf[want:]
                    auth_state.clear()
                    self.bdat_count += 1
                    action = self.override("<content>") if self.override else None
                    if action == "close":
                        return
                    if action == "hang":
                        await stream.send_all(out)
                        await trio.sleep_forever()
                    if isinstance(action, bytes):
                        out += action
                    elif not sender or not rcpts:
                        out += b"503 5.5.1 Error: no valid recipients\r\n"
                    else:
                        self.messages.append((sender, list(rcpts), content))
                        out += b"250 2.0.0 Ok: queued as Y\r\n"
                    sender, rcpts = "", []
                    continue
                if auth_state and auth_state[0] == "DATA":
                    end = buf.find(b"\r\n.\r\n")
                    if buf.startswith(b".\r\n"):
                        end, wire = 0, b".\r\n"
                    elif end < 0:
                        break
                    else:
                        wire = buf[: end + 5]
                    buf = buf[len(wire) :]
                    auth_state.clear()
                    action = self.override("<content>") if self.override else None
                    if action == "close":
                        return
                    if action == "hang":
                        await trio.sleep_forever()
                    if isinstance(action, bytes):
                        out += action
                        continue
                    self.messages.append((sender, list(rcpts), decode_data(wire)))
                    out += b"250 2.0.0 Ok: queued as X\r\n"
                    continue
                line_b, buf = buf.split(b"\r\n", 1)
                line = line_b.decode("utf-8")
                self.commands.append(line)
                chunk.append(line)
                action = self.override(line) if self.override else None
                if action == "close":
                    await stream.send_all(out)
                    return
                if action == "hang":
                    await stream.send_all(out)
                    await trio.sleep_forever()
                if isinstance(action, bytes):
                    out += action
                    if action.startswith(b"421"):
                        await stream.send_all(out)
                        return
                    continue
                if auth_state and auth_state[0] == "XOAUTH2-FAIL":
                    auth_state.clear()
                    out += b"535 5.7.8 Username and Password not accepted\r\n"
                    continue
                if auth_state and auth_state[0] == "LOGIN-USER":
                    auth_state[:] = ["LOGIN-PASS", base64.b64decode(line).decode()]
                    out += b"334 UGFzc3dvcmQ6\r\n"
                    continue
                if auth_state and auth_state[0] == "LOGIN-PASS":
                    user = auth_state[1]
                    auth_state.clear()
                    out += self._auth_result(user, base64.b64decode(line).decode(), line)
                    continue
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    self.ehlo_count += 1
                    out += b"502 5.5.2 no EHLO\r\n" if self.ehlo_refused else self.ehlo_reply()
                elif verb == "HELO":
                    out += b"250 mail.test\r\n"
                elif verb == "STARTTLS":
                    await stream.send_all(out + b"220 2.0.0 Ready\r\n" + self.after_starttls_inject)
                    out = b""
                    assert self.tls_context is not None
                    stream = trio.SSLStream(stream, self.tls_context, server_side=True)
                    await stream.do_handshake()
                    self.tls_done = True
                    buf = b""
                elif verb == "AUTH":
                    parts = line.split(" ")
                    if parts[1] == "PLAIN":
                        _, user, password = base64.b64decode(parts[2]).decode().split("\x00")
                        out += self._auth_result(user, password, parts[2])
                    elif parts[1] == "XOAUTH2":
                        blob = base64.b64decode(parts[2]).decode()
                        if blob == "user=user\x01auth=Bearer good-token\x01\x01":
                            out += b"235 2.7.0 Accepted\r\n"
                        else:
                            auth_state[:] = ["XOAUTH2-FAIL"]
                            out += b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n"
                    elif parts[1] == "LOGIN":
                        auth_state[:] = ["LOGIN-USER"]
                        out += b"334 VXNlcm5hbWU6\r\n"
                    else:
                        out += b"504 5.5.4 unsupported\r\n"
                elif verb == "MAIL":
                    sender = line[line.index("<") + 1 : line.index(">")]
                    rcpts = []
                    if sender in self.refuse_sender:
                        sender = ""
                        out += b"553 5.7.1 sender refused\r\n"
                    else:
                        out += b"250 2.1.0 Ok\r\n"
                elif verb == "RCPT":
                    rcpt = line[line.index("<") + 1 : line.index(">")]
                    if not sender:
                        out += b"503 5.5.1 need MAIL\r\n"
                    elif rcpt in self.refuse:
                        out += f"550 5.1.1 <{rcpt}>: Recipient address rejected\r\n".encode()
                    elif rcpt in self.refuse_temp:
                        out += b"450 4.2.0 try later\r\n"
                    else:
                        rcpts.append(rcpt)
                        out += b"250 2.1.5 Ok\r\n"
                elif verb == "BDAT":
                    size_text, last = line.split(" ")[1:3]
                    assert last == "LAST"
                    auth_state[:] = ["BDAT", size_text]
                elif verb == "DATA":
                    if not rcpts:
                        out += b"554 5.5.1 Error: no valid recipients\r\n"
                    else:
                        auth_state[:] = ["DATA"]
                        out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
                elif verb == "RSET":
                    sender, rcpts = "", []
                    out += b"250 2.0.0 Ok\r\n"
                elif verb == "NOOP":
                    out += b"250 2.0.0 Ok\r\n"
                elif verb == "QUIT":
                    await stream.send_all(out + b"221 2.0.0 Bye\r\n")
                    return
                else:
                    out += b"502 5.5.2 Error: command not recognized\r\n"
            if out:
                await stream.send_all(out)

    def _auth_result(self, user: str, password: str, raw: str) -> bytes:
        if user == "user" and password == PASSWORD:
            return b"235 2.7.0 Authentication successful\r\n"
        if self.echo_secret_on_failure:
            return f"535-5.7.8 bad {password} for {user}\r\n535 5.7.8 raw {raw}\r\n".encode()
        return b"535 5.7.8 Error: authentication failed: bad password\r\n"


@attrs.frozen
class TLSPair:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> TLSPair:
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TLSPair(server, client)


@asynccontextmanager
async def connected(
    server: FakeServer,
    *,
    security: Security = Security.PLAIN,
    client_ctx: ssl.SSLContext | None = None,
    handshake: bool = True,
) -> AsyncIterator[SMTPConnection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        stream: trio.abc.Stream = client_stream
        if security is Security.TLS:
            assert client_ctx is not None
            stream = trio.SSLStream(client_stream, client_ctx, server_hostname=SERVER_NAME)
        conn = SMTPConnection(
            stream,
            security=security,
            ssl_context=client_ctx,
            server_hostname=SERVER_NAME,
            local_hostname="client.test",
        )
        try:
            if handshake:
                await conn.handshake()
            yield conn
        finally:
            await conn.aclose()
            nursery.cancel_scope.cancel()


MESSAGE = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"


async def test_pipelined_send_two_round_trips() -> None:
    server = FakeServer()
    async with connected(server) as conn:
        assert conn.greeting is not None
        assert conn.greeting.code == 220
        assert conn.extensions.pipelining
        await conn.login("user", PASSWORD)
        assert conn.authenticated
        result = await conn.send_message("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
        assert result.reply.code == 250
        assert result.accepted == ("b@x.test", "c@x.test")
        assert result.refused == ()
    assert server.messages == [("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)]
    # MAIL, both RCPTs and DATA arrived in one read: one write, pipelined.
    mail = f"MAIL FROM:<a@x.test> SIZE={len(MESSAGE) + 1}"  # +1: the stuffed dot
    assert [mail, "RCPT TO:<b@x.test>", "RCPT TO:<c@x.test>", "DATA"] in server.chunks
    assert server.commands[-1] == "QUIT"  # aclose() says goodbye


async def test_many_messages_one_connection_and_line_endings() -> None:
    server = FakeServer()
    async with connected(server) as conn:
        for i in range(20):
            body = f"Subject: {i}\n\n.line {i}\nbare\rcr\n".encode()
            await conn.send_message("a@x.test", ["b@x.test"], body)
    assert len(server.messages) == 20
    assert server.messages[3][2] == b"Subject: 3\r\n\r\n.line 3\r\nbare\r\ncr\r\n"
    assert server.commands.count("EHLO client.test") == 1


async def test_stepwise_without_pipelining() -> None:
    server = FakeServer(pipelining=False)
    async with connected(server) as conn:
        result = await conn.send_message("a@x.test", ["b@x.test", "refused@x.test"], MESSAGE)
        assert result.accepted == ("b@x.test",)
        (refused,) = result.refused
        assert refused.address == "refused@x.test"
        assert refused.reply.code == 550
        assert refused.reply.enhanced == "5.1.1"
    assert all(len(chunk) <= 1 for chunk in server.chunks)
    assert len(server.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_recipients_refused_then_next_message_works(pipelining: bool) -> None:
    server = FakeServer(pipelining=pipelining, refuse_temp=frozenset({"later@x.test"}))
    async with connected(server) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("a@x.test", ["refused@x.test"], MESSAGE)
        assert info.value.command == "RCPT"
        assert info.value.code == 550
        assert info.value.enhanced == "5.1.1"
        assert "refused@x.test" in info.value.text
        # Mixed permanent + temporary refusals: retrying later may work -> transient.
        with pytest.raises(SMTPTransientError):
            await conn.send_message("a@x.test", ["refused@x.test", "later@x.test"], MESSAGE)
        result = await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert result.accepted == ("b@x.test",)
    # The transaction left open by the refusals was reset before the next MAIL.
    mails = [i for i, c in enumerate(server.commands) if c.startswith("MAIL")]
    assert server.commands[mails[1] - 1] == "RSET"
    assert server.commands[mails[2] - 1] == "RSET"
    assert len(server.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refused_sender(pipelining: bool) -> None:
    server = FakeServer(pipelining=pipelining, refuse_sender=frozenset({"bad@x.test"}))
    async with connected(server) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("bad@x.test", ["b@x.test"], MESSAGE)
        assert info.value.command == "MAIL"
        assert info.value.code == 553
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert [m[0] for m in server.messages] == ["a@x.test"]


async def test_content_refused_is_reported_as_data() -> None:
    refuse = [True]

    def hook(line: str) -> bytes | None:
        if line == "<content>" and refuse:
            refuse.clear()
            return b"554 5.6.0 Message rejected as spam\r\n"
        return None

    server = FakeServer(override=hook)
    async with connected(server) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert info.value.command == "DATA"
        assert info.value.enhanced == "5.6.0"
        assert info.value.text == "Message rejected as spam"
        assert conn.content_started
        # The transaction ended with that reply: the next message needs no RSET.
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert "RSET" not in server.commands
    assert len(server.messages) == 1


async def test_local_errors_send_nothing() -> None:
    server = FakeServer(size=100, auth="")
    async with connected(server) as conn:
        before = list(server.commands)
        with pytest.raises(LocalProtocolError, match="SIZE"):
            await conn.send_message("a@x.test", ["b@x.test"], b"x" * 101)
        with pytest.raises(LocalProtocolError):
            await conn.send_message("a@x.test", ["b@x.test\r\nRCPT TO:<evil@x.test>"], b"x")
        with pytest.raises(LocalProtocolError):
            await conn.send_message("a@x.test\n", ["b@x.test"], b"x")
        with pytest.raises(LocalProtocolError):
            await conn.send_message("a@x.test", [], b"x")
        with pytest.raises(LocalProtocolError):
            await conn.send_message("a@x.test", "b@x.test", b"x")
        assert server.commands == before
        # The connection is still fine afterwards.
        await conn.send_message("a@x.test", ["b@x.test"], b"x")
    assert len(server.messages) == 1


async def test_login_plain_and_login_mechanisms() -> None:
    for auth in ("PLAIN LOGIN", "LOGIN"):
        server = FakeServer(auth=auth)
        async with connected(server) as conn:
            await conn.login("user", PASSWORD)
        expected = "AUTH PLAIN" if "PLAIN" in auth else "AUTH LOGIN"
        assert any(c.startswith(expected) for c in server.commands)


@pytest.mark.parametrize("auth", ["PLAIN", "LOGIN"])
async def test_wrong_password_never_shows_secret(auth: str) -> None:
    server = FakeServer(auth=auth, echo_secret_on_failure=True)
    wrong = "Wr0ng-Secret-Value"
    async with connected(server) as conn:
        with pytest.raises(AuthenticationError) as info:
            await conn.login("user", wrong)
        exc = info.value
        assert exc.code == "535"
        assert exc.protocol == "smtp"
        secret_forms = [
            wrong,
            base64.b64encode(wrong.encode()).decode().rstrip("="),
            base64.b64encode(b"\x00user\x00" + wrong.encode()).decode().rstrip("="),
        ]
        # The refusal is kept as the cause (for tracebacks), redacted the same way.
        cause = exc.__cause__
        assert isinstance(cause, SMTPPermanentError)
        assert cause.code == 535
        shown = " ".join(
            [str(exc), exc.server_text, repr(exc), repr(conn), str(cause), repr(cause), cause.text]
        )
        for form in secret_forms:
            assert form not in shown
        assert "bad" in exc.server_text  # the server's words are kept otherwise
        # The connection stays usable: a correct login works next.
        await conn.login("user", PASSWORD)


async def test_xoauth2() -> None:
    server = FakeServer(auth="XOAUTH2 PLAIN")
    async with connected(server) as conn:
        with pytest.raises(AuthenticationError) as info:
            await conn.authenticate_xoauth2("user", "bad-token")
        assert "bad-token" not in str(info.value)
        assert info.value.code == "535"
        await conn.authenticate_xoauth2("user", "good-token")
        assert conn.authenticated
    # After the 334 error challenge the client answered with an empty line.
    assert "" in server.commands


async def test_no_supported_mechanism() -> None:
    server = FakeServer(auth="CRAM-MD5 GSSAPI")
    async with connected(server) as conn:
        with pytest.raises(AuthenticationError, match="CRAM-MD5"):
            await conn.login("user", PASSWORD)
    assert not any(c.startswith("AUTH") for c in server.commands)


async def test_plain_login_refused_without_tls_unless_plain_chosen() -> None:
    server = FakeServer()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(client_stream, security=Security.STARTTLS, local_hostname="c.test")
        await conn.read_greeting()
        await conn.ehlo()
        with pytest.raises(TLSError, match="without TLS"):
            await conn.login("user", PASSWORD)
        await conn.aclose()
    assert not any(c.startswith("AUTH") for c in server.commands)


async def test_starttls_upgrade(tls: TLSPair) -> None:
    server = FakeServer(starttls=True, tls_context=tls.server)
    async with connected(server, security=Security.STARTTLS, client_ctx=tls.client) as conn:
        assert conn.tls_active
        assert isinstance(conn.stream, trio.SSLStream)
        assert not conn.extensions.starttls
        assert "PLAIN" in conn.extensions.auth  # only offered after TLS
        await conn.login("user", PASSWORD)
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert server.ehlo_count == 2
    assert server.tls_done
    assert len(server.messages) == 1


async def test_starttls_drops_injected_plaintext(tls: TLSPair) -> None:
    # A man in the middle appends a reply after the 220, in clear text, hoping the
    # client takes it as the (encrypted) EHLO answer.
    server = FakeServer(
        starttls=True,
        tls_context=tls.server,
        after_starttls_inject=b"250-evil\r\n250 AUTH PLAIN\r\n",
    )
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(
            client_stream,
            security=Security.STARTTLS,
            ssl_context=tls.client,
            server_hostname=SERVER_NAME,
            local_hostname="c.test",
        )
        await conn.read_greeting()
        await conn.ehlo()
        # The injected bytes arrive in the same read as the 220; they are dropped
        # and the EHLO answer comes from inside TLS.
        await conn.starttls()
        assert conn.tls_active
        assert "EVIL" not in conn.extensions.keywords
        assert conn.extensions.pipelining
        assert server.ehlo_count == 2
        await conn.login("user", PASSWORD)
        await conn.aclose()


async def test_starttls_not_offered_is_refused(tls: TLSPair) -> None:
    server = FakeServer(starttls=False, tls_context=tls.server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(client_stream, security=Security.STARTTLS, ssl_context=tls.client)
        with pytest.raises(TLSError, match="does not offer STARTTLS"):
            await conn.handshake()
        with pytest.raises(TLSError):
            await conn.login("user", PASSWORD)
        await conn.aclose()
    assert not any(c.startswith(("AUTH", "STARTTLS")) for c in server.commands)


async def test_starttls_refused_by_server_blocks_auth(tls: TLSPair) -> None:
    server = FakeServer(
        starttls=True,
        tls_context=tls.server,
        override=lambda line: b"454 4.7.0 TLS not available\r\n" if line == "STARTTLS" else None,
    )
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(client_stream, security=Security.STARTTLS, ssl_context=tls.client)
        with pytest.raises(TLSError, match="refused STARTTLS: 454"):
            await conn.handshake()
        assert not conn.tls_active
        with pytest.raises(TLSError):
            await conn.login("user", PASSWORD)
        await conn.aclose()
    assert not any(c.startswith("AUTH") for c in server.commands)


async def test_starttls_untrusted_certificate(tls: TLSPair) -> None:
    server = FakeServer(starttls=True, tls_context=tls.server)
    untrusting = ssl.create_default_context()  # the test CA is not in it
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(
            client_stream,
            security=Security.STARTTLS,
            ssl_context=untrusting,
            server_hostname=SERVER_NAME,
        )
        with pytest.raises(TLSError, match="certificate"):
            await conn.handshake()
        assert conn.is_broken
        with pytest.raises(ConnectionBrokenError):
            await conn.noop()
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_implicit_tls(tls: TLSPair) -> None:
    server = FakeServer(implicit_tls=True, tls_context=tls.server)
    async with connected(server, security=Security.TLS, client_ctx=tls.client) as conn:
        assert conn.tls_active
        await conn.login("user", PASSWORD)
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert len(server.messages) == 1


async def test_implicit_tls_wrong_hostname(tls: TLSPair) -> None:
    server = FakeServer(implicit_tls=True, tls_context=tls.server)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, server_stream)
        stream = trio.SSLStream(client_stream, tls.client, server_hostname="other.test")
        conn = SMTPConnection(stream, security=Security.TLS)
        with pytest.raises(TLSError):
            await conn.handshake()
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_ehlo_refused_falls_back_to_helo() -> None:
    server = FakeServer(ehlo_refused=True)
    async with connected(server) as conn:
        assert not conn.extensions.pipelining
        await conn.send_message("a@x.test", ["b@x.test"], b"Subject: x\r\n\r\nascii\r\n")
    assert "HELO client.test" in server.commands
    assert len(server.messages) == 1


async def test_refused_greeting() -> None:
    server = FakeServer(greeting=b"554 5.7.1 no service for you\r\n")
    async with connected(server, handshake=False) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.handshake()
        assert info.value.code == 554
        assert conn.is_broken


async def test_421_breaks_connection() -> None:
    server = FakeServer(
        override=lambda line: (
            b"421 4.3.2 Service shutting down\r\n" if line.startswith("MAIL") else None
        )
    )
    async with connected(server) as conn:
        with pytest.raises(SMTPTransientError) as info:
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert info.value.code == 421
        assert conn.is_broken
        with pytest.raises(ConnectionBrokenError):
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        with pytest.raises(ConnectionBrokenError):
            await conn.noop()


async def test_server_closes_mid_transaction() -> None:
    server = FakeServer(override=lambda line: "close" if line.startswith("RCPT") else None)
    async with connected(server) as conn:
        with pytest.raises(ConnectionBrokenError, match="closed"):
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert conn.is_broken
        with pytest.raises(ConnectionBrokenError):
            await conn.noop()


async def test_garbage_reply_breaks_connection() -> None:
    server = FakeServer(override=lambda line: b"hello?\r\n" if line == "NOOP" else None)
    async with connected(server) as conn:
        with pytest.raises(RemoteProtocolError) as info:
            await conn.noop()
        assert info.value.excerpt == b"hello?\r\n"
        with pytest.raises(ConnectionBrokenError):
            await conn.noop()


async def test_cancel_mid_command_breaks_connection(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer(override=lambda line: "hang" if line == "DATA" else None)
    async with connected(server) as conn:
        with trio.move_on_after(30) as scope:
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert scope.cancelled_caught
        assert conn.is_broken
        with pytest.raises(ConnectionBrokenError, match="interrupted"):
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert server.messages == []


async def test_cancel_before_sending_keeps_connection(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer()
    async with connected(server) as conn:
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.noop()
        assert not conn.is_broken
        await conn.noop()


async def test_concurrent_use_is_refused(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer(override=lambda line: "hang" if line == "NOOP" else None)
    async with connected(server) as conn, trio.open_nursery() as nursery:
        nursery.start_soon(conn.noop)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(LocalProtocolError, match="another task"):
            await conn.noop()
        nursery.cancel_scope.cancel()


async def test_aclose_is_idempotent_and_says_quit() -> None:
    server = FakeServer()
    async with connected(server) as conn:
        await conn.aclose()
        await conn.aclose()
        with pytest.raises(ConnectionBrokenError):
            await conn.noop()
    assert server.commands.count("QUIT") == 1


async def test_aclose_does_not_wait_forever_for_quit(autojump_clock: trio.abc.Clock) -> None:
    server = FakeServer(override=lambda line: "hang" if line == "QUIT" else None)
    async with connected(server) as conn:
        start = trio.current_time()
        await conn.aclose()
        assert trio.current_time() - start < 10
    assert "QUIT" in server.commands


async def test_quit() -> None:
    server = FakeServer()
    async with connected(server) as conn:
        reply = await conn.quit()
        assert reply.code == 221
        assert conn.is_broken


# ----- SMTPSender -------------------------------------------------------------------


class Servers:
    """Hands out connections to fresh fake servers, keeping them for inspection."""

    def __init__(self, nursery: trio.Nursery, make: Callable[[int], FakeServer]) -> None:
        self.nursery = nursery
        self.make = make
        self.servers: list[FakeServer] = []

    async def connect(self) -> SMTPConnection:
        server = self.make(len(self.servers))
        self.servers.append(server)
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.nursery.start_soon(server.serve, server_stream)
        conn = SMTPConnection(client_stream, security=Security.PLAIN, local_hostname="c.test")
        await conn.handshake()
        await conn.login("user", PASSWORD)
        return conn


async def test_sender_reuses_and_reconnects_after_idle_close() -> None:
    closes: list[bool] = []

    def make(index: int) -> FakeServer:
        # The first server drops the connection when the second message starts,
        # as a server does after its idle timeout.
        def hook(line: str) -> str | None:
            if index == 0 and line.startswith("MAIL") and closes:
                return "close"
            if index == 0 and line.startswith("MAIL"):
                closes.append(True)
            return None

        return FakeServer(override=hook)

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        await sender.send_message("a@x.test", ["b@x.test"], b"Subject: 1\r\n\r\none\r\n")
        await sender.send_message("a@x.test", ["b@x.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        await sender.send_message("a@x.test", ["b@x.test"], b"Subject: 3\r\n\r\nthree\r\n")
        assert sender.connections_opened == 2
        await sender.aclose()
        await sender.aclose()
        with pytest.raises(LocalProtocolError):
            await sender.send_message("a@x.test", ["b@x.test"], b"x")
        nursery.cancel_scope.cancel()
    delivered = [m[2] for s in servers.servers for m in s.messages]
    assert delivered == [
        b"Subject: 1\r\n\r\none\r\n",
        b"Subject: 2\r\n\r\ntwo\r\n",
        b"Subject: 3\r\n\r\nthree\r\n",
    ]


async def test_sender_reconnects_after_421_idle() -> None:
    def make(index: int) -> FakeServer:
        def hook(line: str) -> bytes | None:
            if index == 0 and line.startswith("MAIL"):
                return b"421 4.4.2 idle too long\r\n"
            return None

        return FakeServer(override=hook)

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        # Open the first connection without sending, as an idle one would be.
        sender._conn = await servers.connect()
        await sender.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert len(servers.servers) == 2
        await sender.aclose()
        nursery.cancel_scope.cancel()
    assert [len(s.messages) for s in servers.servers] == [0, 1]


async def test_sender_does_not_resend_after_content_went_out() -> None:
    def make(index: int) -> FakeServer:
        return FakeServer(override=lambda line: "close" if line == "<content>" else None)

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        sender._conn = await servers.connect()
        with pytest.raises(ConnectionBrokenError):
            await sender.send_message("a@x.test", ["b@x.test"], MESSAGE)
        # No second connection was opened to try the message again.
        assert len(servers.servers) == 1
        await sender.aclose()
        nursery.cancel_scope.cancel()


async def test_sender_does_not_retry_on_fresh_connection() -> None:
    def make(index: int) -> FakeServer:
        return FakeServer(override=lambda line: "close" if line.startswith("MAIL") else None)

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        with pytest.raises(ConnectionBrokenError):
            await sender.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert len(servers.servers) == 1
        # The next message opens a new connection and works around nothing: the
        # fake server closes again, and the error reaches the caller again.
        with pytest.raises(ConnectionBrokenError):
            await sender.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert len(servers.servers) == 2
        await sender.aclose()
        nursery.cancel_scope.cancel()


# ----- CHUNKING (BDAT) -------------------------------------------------------------


async def test_bdat_one_write_per_message() -> None:
    server = FakeServer(chunking=True)
    body = b"Subject: b\n\n.dot line\nbare\rcr\n"
    async with connected(server) as conn:
        assert conn.extensions.chunking
        result = await conn.send_message("a@x.test", ["b@x.test", "c@x.test"], body)
        assert result.accepted == ("b@x.test", "c@x.test")
        assert result.reply.command.value == "BDAT"
        await conn.send_message("a@x.test", ["b@x.test"], b"second")
    normalised = b"Subject: b\r\n\r\n.dot line\r\nbare\r\ncr\r\n"
    assert server.messages[0] == ("a@x.test", ["b@x.test", "c@x.test"], normalised)
    assert server.messages[1][2] == b"second\r\n"
    assert server.bdat_count == 2
    assert "DATA" not in server.commands
    # Envelope and content went in one write: one read saw MAIL, both RCPTs, BDAT.
    assert [
        f"MAIL FROM:<a@x.test> SIZE={len(normalised)}",
        "RCPT TO:<b@x.test>",
        "RCPT TO:<c@x.test>",
        f"BDAT {len(normalised)} LAST",
    ] in server.chunks


async def test_bdat_refusals_keep_stream_in_step() -> None:
    server = FakeServer(chunking=True, refuse_sender=frozenset({"bad@x.test"}))
    async with connected(server) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("a@x.test", ["refused@x.test"], MESSAGE)
        assert info.value.command == "RCPT"
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("bad@x.test", ["b@x.test"], MESSAGE)
        assert info.value.command == "MAIL"
        partial = await conn.send_message("a@x.test", ["refused@x.test", "b@x.test"], MESSAGE)
        assert partial.accepted == ("b@x.test",)
        assert conn.content_started
    assert len(server.messages) == 1
    assert server.messages[0][1] == ["b@x.test"]


async def test_bdat_content_refused() -> None:
    server = FakeServer(
        chunking=True,
        override=lambda line: b"552 5.3.4 too big\r\n" if line == "<content>" else None,
    )
    async with connected(server) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert info.value.command == "BDAT"
        assert info.value.code == 552
        server.override = None
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    # The failed transaction was reset before the next one.
    last_mail = max(i for i, c in enumerate(server.commands) if c.startswith("MAIL"))
    assert server.commands[last_mail - 1] == "RSET"
    assert len(server.messages) == 1


async def test_use_chunking_off_falls_back_to_data() -> None:
    server = FakeServer(chunking=True)
    async with connected(server) as conn:
        conn.use_chunking = False
        await conn.send_message("a@x.test", ["b@x.test"], MESSAGE)
    assert "DATA" in server.commands
    assert server.bdat_count == 0
    assert server.messages[0][2] == MESSAGE


async def test_sender_probes_idle_connection_with_noop(autojump_clock: trio.abc.Clock) -> None:
    # With CHUNKING the content goes out at once, so a dead connection cannot be
    # retried after the fact; the sender checks an idle connection first.
    def make(index: int) -> FakeServer:
        def hook(line: str) -> str | None:
            return "close" if index == 0 and line == "NOOP" else None

        return FakeServer(chunking=True, override=hook)

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        await sender.send_message("a@x.test", ["b@x.test"], b"one")
        await sender.send_message("a@x.test", ["b@x.test"], b"two")  # not idle: no NOOP
        assert "NOOP" not in servers.servers[0].commands
        await trio.sleep(IDLE_PROBE_SECONDS)
        await sender.send_message("a@x.test", ["b@x.test"], b"three")
        assert sender.connections_opened == 2
        await sender.aclose()
        nursery.cancel_scope.cancel()
    assert [m[2] for m in servers.servers[0].messages] == [b"one\r\n", b"two\r\n"]
    assert [m[2] for m in servers.servers[1].messages] == [b"three\r\n"]


async def test_sender_does_not_resend_bdat_message(autojump_clock: trio.abc.Clock) -> None:
    def make(index: int) -> FakeServer:
        return FakeServer(
            chunking=True, override=lambda line: "close" if line == "<content>" else None
        )

    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, make)
        sender = SMTPSender(servers.connect)
        sender._conn = await servers.connect()
        with pytest.raises(ConnectionBrokenError):
            await sender.send_message("a@x.test", ["b@x.test"], MESSAGE)
        assert len(servers.servers) == 1
        await sender.aclose()
        nursery.cancel_scope.cancel()


# ----- batches ---------------------------------------------------------------------


def batch(n: int, **special: list[str]) -> list[MailTransaction]:
    out = []
    for i in range(n):
        rcpts = special.get(f"r{i}", ["b@x.test"])
        sender = "bad@x.test" if f"bad{i}" in special else "a@x.test"
        out.append(MailTransaction(sender, rcpts, f"Subject: {i}\n\n.body {i}\n".encode()))
    return out


@pytest.mark.parametrize("chunking", [True, False])
async def test_send_messages_outcomes(chunking: bool) -> None:
    server = FakeServer(chunking=chunking, refuse_sender=frozenset({"bad@x.test"}))
    messages = batch(40, r3=["refused@x.test"], r5=["refused@x.test", "c@x.test"], bad7=["yes"])
    async with connected(server) as conn:
        outcomes = await conn.send_messages(messages)
        assert len(outcomes) == 40
        refused = {i for i, o in enumerate(outcomes) if not o.accepted}
        assert refused == {3, 7}
        assert outcomes[3].error is not None
        assert isinstance(outcomes[3].error, SMTPPermanentError)
        assert outcomes[3].error.command == "RCPT"
        assert isinstance(outcomes[7].error, SMTPPermanentError)
        assert outcomes[7].error.command == "MAIL"
        assert outcomes[5].result is not None
        assert outcomes[5].result.accepted == ("c@x.test",)
        # The connection is still good for more.
        await conn.send_message("a@x.test", ["b@x.test"], b"after")
    delivered = [m[2] for m in server.messages]
    expected = [f"Subject: {i}\r\n\r\n.body {i}\r\n".encode() for i in range(40) if i not in (3, 7)]
    assert delivered[:-1] == expected
    if chunking:
        # Pipelined across messages: some read saw several transactions at once.
        assert max(sum(c.startswith("MAIL") for c in chunk) for chunk in server.chunks) > 1
    else:
        assert server.bdat_count == 0


async def test_send_messages_bounds_messages_in_flight(autojump_clock: trio.abc.Clock) -> None:
    # A server that reads everything but answers nothing: the client must stop
    # writing after MAX_PIPELINED_MESSAGES and wait for replies.
    def hook(line: str) -> bytes | None:
        return b"" if line.startswith(("MAIL", "RCPT", "RSET", "<content>")) else None

    server = FakeServer(chunking=True, override=hook)
    async with connected(server) as conn:
        with trio.move_on_after(60):
            await conn.send_messages(batch(MAX_PIPELINED_MESSAGES * 3))
        assert conn.is_broken  # cancelled mid-batch
    assert sum(c.startswith("MAIL") for c in server.commands) == MAX_PIPELINED_MESSAGES


async def test_send_messages_groups_writes_and_bounds_commands() -> None:
    # Messages go out several to a write, and a message with many recipients
    # waits until its commands fit under the command cap (it must not stall).
    many = [f"r{j}@x.test" for j in range(MAX_PIPELINED_COMMANDS // 2)]
    messages = batch(MAX_PIPELINED_MESSAGES * 2) + batch(3, r0=many, r1=many, r2=many)
    server = FakeServer(chunking=True)
    async with connected(server) as conn:
        outcomes = await conn.send_messages(messages)
    assert all(o.accepted for o in outcomes)
    assert len(server.messages) == len(messages)
    per_chunk = [sum(c.startswith("MAIL") for c in chunk) for chunk in server.chunks]
    assert max(per_chunk) >= MAX_PIPELINED_MESSAGES // 2


async def test_send_messages_connection_lost_midway() -> None:
    count = [0]

    def hook(line: str) -> str | None:
        if line == "<content>":
            count[0] += 1
            if count[0] == 5:
                return "close"
        return None

    server = FakeServer(chunking=True, override=hook)
    n = MAX_PIPELINED_MESSAGES + 10
    async with connected(server) as conn:
        outcomes = await conn.send_messages(batch(n))
        assert conn.is_broken
    delivered = {m[2] for m in server.messages}
    bodies = [f"Subject: {i}\r\n\r\n.body {i}\r\n".encode() for i in range(n)]
    for i, outcome in enumerate(outcomes):
        if outcome.accepted:
            assert bodies[i] in delivered
        else:
            assert isinstance(outcome.error, ConnectionBrokenError)
            if not outcome.content_sent:
                assert bodies[i] not in delivered
    # Only a window's worth was written before the failure showed.
    assert [o.content_sent for o in outcomes[MAX_PIPELINED_MESSAGES:]] == [False] * 10
    assert outcomes[5].error is not None


async def test_send_messages_421_midway() -> None:
    count = [0]

    def hook(line: str) -> bytes | None:
        if line.startswith("MAIL"):
            count[0] += 1
            if count[0] == 3:
                return b"421 4.3.2 shutting down\r\n"
        return None

    server = FakeServer(chunking=True, override=hook)
    async with connected(server) as conn:
        outcomes = await conn.send_messages(batch(6))
    assert [o.accepted for o in outcomes[:2]] == [True, True], outcomes
    assert isinstance(outcomes[2].error, SMTPTransientError)
    assert outcomes[2].error.code == 421
    assert all(isinstance(o.error, ConnectionBrokenError) for o in outcomes[3:])
    assert len(server.messages) == 2


async def test_send_messages_validates_everything_first() -> None:
    server = FakeServer(chunking=True)
    async with connected(server) as conn:
        messages = [*batch(3), MailTransaction("a@x.test", ["b@x.test\r\nDATA"], b"x")]
        with pytest.raises(LocalProtocolError):
            await conn.send_messages(messages)
        with pytest.raises(TypeError):
            MailTransaction("a@x.test", "b@x.test", b"x")  # type: ignore[arg-type]
        assert "secret body" not in repr(MailTransaction("a@x.test", ["b@x.test"], b"secret body"))
    assert not any(c.startswith("MAIL") for c in server.commands)


async def test_sender_send_messages() -> None:
    async with trio.open_nursery() as nursery:
        servers = Servers(nursery, lambda index: FakeServer(chunking=True))
        sender = SMTPSender(servers.connect)
        outcomes = await sender.send_messages(batch(5))
        assert all(o.accepted for o in outcomes)
        await sender.aclose()
        nursery.cancel_scope.cancel()
    assert len(servers.servers[0].messages) == 5


async def test_connect_failure_is_connection_broken_with_the_os_error_as_cause() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there any more
    with pytest.raises(ConnectionBrokenError, match=f"cannot connect to 127.0.0.1:{port}") as info:
        async with open_smtp_connection("127.0.0.1", port, security=Security.PLAIN):
            pass
    assert isinstance(info.value.__cause__, OSError)
    # The same error the IMAP client gives, so callers catch one type for both.
    assert not isinstance(info.value, OSError)


async def test_transport_failure_while_sending_is_connection_broken_with_its_cause() -> None:
    server = FakeServer()
    async with connected(server) as conn:
        await conn.stream.aclose()  # the transport goes away under the connection
        with pytest.raises(ConnectionBrokenError, match="lost while sending") as info:
            await conn.noop()
        assert isinstance(info.value.__cause__, trio.ClosedResourceError)
        assert conn.is_broken
        with pytest.raises(ConnectionBrokenError, match="broken"):
            await conn.noop()


async def test_aclose_during_another_tasks_operation_closes_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = FakeServer(override=lambda line: "hang" if line == "NOOP" else None)
    failures: list[BaseException] = []

    async def noop(conn: SMTPConnection) -> None:
        try:
            await conn.noop()
        except ConnectionBrokenError as exc:
            failures.append(exc)

    async with connected(server) as conn, trio.open_nursery() as nursery:
        nursery.start_soon(noop, conn)
        await trio.testing.wait_all_tasks_blocked()
        await conn.aclose()  # no QUIT in the middle of the NOOP: just close
        assert conn.is_broken
        assert "closed" in repr(conn)
    assert "QUIT" not in server.commands
    assert len(failures) == 1
    with pytest.raises(ConnectionBrokenError, match="closed"):
        await conn.noop()


async def test_authenticate_oauth2_uses_xoauth2_and_decodes_the_error_challenge() -> None:
    server = FakeServer(auth="XOAUTH2 PLAIN")
    async with connected(server) as conn:
        with pytest.raises(AuthenticationError) as info:
            await conn.authenticate_oauth2("user", "bad-token")
        assert "status 401" in str(info.value)
        assert "the token is invalid, expired or revoked" in str(info.value)
        assert "bad-token" not in str(info.value)
        assert info.value.code == "535"
        await conn.authenticate_oauth2("user", "good-token")
        assert conn.authenticated


async def test_authenticate_oauth2_without_a_mechanism_sends_no_auth() -> None:
    server = FakeServer(auth="PLAIN LOGIN")
    async with connected(server) as conn:
        with pytest.raises(AuthenticationError, match="neither AUTH OAUTHBEARER nor XOAUTH2"):
            await conn.authenticate_oauth2("user", "tok")
    assert not any(c.startswith("AUTH") for c in server.commands)
