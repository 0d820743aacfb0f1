"""The SMTP client against the real Postfix (and Dovecot behind it) on loopback.

Each test uses fresh users so it does not depend on what other tests delivered.
"""

from __future__ import annotations

import base64
import secrets
import ssl

import pytest
import trio

from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    SMTPPermanentError,
    TLSError,
)
from prxmail.smtp import (
    IDLE_PROBE_SECONDS,
    MailTransaction,
    Security,
    SMTPConnection,
    SMTPProtocol,
    State,
    open_smtp_connection,
    open_smtp_sender,
)
from tests.mailservers import MailServers, User

pytestmark = pytest.mark.integration

PORTS = [
    pytest.param(Security.TLS, id="implicit-tls"),
    pytest.param(Security.STARTTLS, id="starttls"),
]
# Postfix offers CHUNKING: by default the content goes as BDAT; DATA (dot-stuffed)
# is what servers without CHUNKING get, so both paths are proven on the real server.
PATHS = [pytest.param(True, id="bdat"), pytest.param(False, id="data")]


def port_for(servers: MailServers, security: Security) -> int:
    return servers.smtp_tls_port if security is Security.TLS else servers.smtp_starttls_port


def split_body(raw: bytes) -> tuple[bytes, bytes]:
    """Header and body of a delivered message, line endings made LF."""
    text = raw.replace(b"\r\n", b"\n")
    header, _, body = text.partition(b"\n\n")
    return header, body


async def deliver(
    servers: MailServers,
    security: Security,
    sender: User,
    recipients: list[str],
    data: bytes,
    *,
    chunking: bool = True,
) -> None:
    async with open_smtp_connection(
        servers.host,
        port_for(servers, security),
        security=security,
        ssl_context=servers.ssl_context(),
    ) as conn:
        assert conn.extensions.chunking
        conn.use_chunking = chunking
        await conn.login(sender.address, sender.password)
        result = await conn.send_message(sender.address, recipients, data)
        assert result.reply.code == 250
        assert result.accepted == tuple(recipients)


def fresh_pair(servers: MailServers) -> tuple[User, User]:
    tag = secrets.token_hex(4)
    return servers.add_user(f"from-{tag}"), servers.add_user(f"to-{tag}")


async def inbox(servers: MailServers, user: User, count: int) -> list[bytes]:
    return await trio.to_thread.run_sync(servers.wait_for_messages, user, count, 20)


@pytest.mark.parametrize("chunking", PATHS)
@pytest.mark.parametrize("security", PORTS)
async def test_utf8_subject_and_body_land_byte_correct(
    mail_servers: MailServers, security: Security, chunking: bool
) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    body = "Grüße aus Köln \u2013 ✓ naïve café\n日本語のテキスト\n".encode()
    data = (
        f"From: {sender.address}\nTo: {rcpt.address}\n"
        "Subject: Grüße ✓ \u2013 ünïcödé\nMessage-ID: <utf8-1@prxmail.test>\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    ).encode() + body
    await deliver(mail_servers, security, sender, [rcpt.address], data, chunking=chunking)
    (raw,) = await inbox(mail_servers, rcpt, 1)
    header, delivered_body = split_body(raw)
    assert delivered_body == body
    assert "Subject: Grüße ✓ \u2013 ünïcödé".encode() in header.split(b"\n")
    assert b"Message-ID: <utf8-1@prxmail.test>" in header


@pytest.mark.parametrize("chunking", PATHS)
@pytest.mark.parametrize("security", PORTS)
async def test_dot_lines_survive(
    mail_servers: MailServers, security: Security, chunking: bool
) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    body = b".\n..\n.leading dot\n...three\nmiddle . dot\n.\n"
    data = f"From: {sender.address}\nTo: {rcpt.address}\nSubject: dots\n\n".encode() + body
    await deliver(mail_servers, security, sender, [rcpt.address], data, chunking=chunking)
    (raw,) = await inbox(mail_servers, rcpt, 1)
    assert split_body(raw)[1] == body


@pytest.mark.parametrize("chunking", PATHS)
@pytest.mark.parametrize("security", PORTS)
async def test_large_message_lands_byte_correct(
    mail_servers: MailServers, security: Security, chunking: bool
) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    # About 5 MB of base64 text in 76-character lines, as a big attachment would be,
    # with dot-leading lines sprinkled in to exercise stuffing at scale.
    chunk = base64.encodebytes(secrets.token_bytes(57 * 1000))
    lines = chunk.split(b"\n")
    lines = [b"." + line if i % 97 == 0 else line for i, line in enumerate(lines)]
    body = b"\n".join(lines) * 65
    assert len(body) > 5_000_000
    data = f"From: {sender.address}\nTo: {rcpt.address}\nSubject: big\n\n".encode() + body
    await deliver(mail_servers, security, sender, [rcpt.address], data, chunking=chunking)
    (raw,) = await inbox(mail_servers, rcpt, 1)
    assert split_body(raw)[1] == body


@pytest.mark.parametrize("security", PORTS)
async def test_wrong_password(mail_servers: MailServers, security: Security) -> None:
    user = mail_servers.add_user(f"wrongpw-{secrets.token_hex(4)}")
    wrong = "not-" + user.password
    async with open_smtp_connection(
        mail_servers.host,
        port_for(mail_servers, security),
        security=security,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        with pytest.raises(AuthenticationError) as info:
            await conn.login(user.address, wrong)
        assert info.value.code == "535"
        assert wrong not in str(info.value)
        assert base64.b64encode(wrong.encode()).decode().rstrip("=") not in str(info.value)
        # Postfix's 535 is kept as the cause, as redacted as the error itself.
        cause = info.value.__cause__
        assert isinstance(cause, SMTPPermanentError)
        assert cause.code == 535
        assert wrong not in str(cause)
        # The session goes on: the right password works on the same connection.
        await conn.login(user.address, user.password)


@pytest.mark.parametrize("security", PORTS)
async def test_refused_recipient(mail_servers: MailServers, security: Security) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    data = b"Subject: refused\n\nhello\n"
    async with open_smtp_connection(
        mail_servers.host,
        port_for(mail_servers, security),
        security=security,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        await conn.login(sender.address, sender.password)
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message(sender.address, ["rejected@prxmail.test"], data)
        assert info.value.command == "RCPT"
        assert 500 <= info.value.code < 600
        assert info.value.enhanced is not None
        assert info.value.enhanced.startswith("5.")
        # Partial success: one refused, one accepted, on the same connection.
        result = await conn.send_message(
            sender.address, ["rejected@prxmail.test", rcpt.address], data
        )
        assert result.accepted == (rcpt.address,)
        assert [r.address for r in result.refused] == ["rejected@prxmail.test"]
        assert result.refused[0].reply.code >= 500
        # Another domain: no relaying.
        with pytest.raises(SMTPPermanentError):
            await conn.send_message(sender.address, ["someone@example.org"], data)
        await conn.send_message(sender.address, [rcpt.address], data)
    assert len(await inbox(mail_servers, rcpt, 2)) == 2


@pytest.mark.parametrize("security", PORTS)
async def test_unauthenticated_submission_is_refused(
    mail_servers: MailServers, security: Security
) -> None:
    _, rcpt = fresh_pair(mail_servers)
    async with open_smtp_connection(
        mail_servers.host,
        port_for(mail_servers, security),
        security=security,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message("outsider@example.org", [rcpt.address], b"Subject: x\n\nx\n")
        assert info.value.code >= 500
    assert mail_servers.inbox_messages(rcpt) == []


async def test_starttls_port_upgrades_and_offers_auth_only_after(
    mail_servers: MailServers,
) -> None:
    async with open_smtp_connection(
        mail_servers.host,
        mail_servers.smtp_starttls_port,
        security=Security.STARTTLS,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        assert conn.tls_active
        assert not conn.extensions.starttls
        assert {"PLAIN", "LOGIN"} & conn.extensions.auth
        assert conn.extensions.pipelining


async def test_starttls_port_without_tls_refuses_auth_and_mail(
    mail_servers: MailServers,
) -> None:
    user = mail_servers.add_user(f"notls-{secrets.token_hex(4)}")
    # Our client refuses, before sending anything, in the explicit plain mode too,
    # since Postfix does not offer AUTH in clear text.
    async with open_smtp_connection(
        mail_servers.host, mail_servers.smtp_starttls_port, security=Security.PLAIN
    ) as conn:
        assert conn.extensions.starttls
        assert not conn.extensions.auth
        with pytest.raises(AuthenticationError, match="no password mechanism"):
            await conn.login(user.address, user.password)
        with pytest.raises(SMTPPermanentError) as info:
            await conn.send_message(user.address, [user.address], b"Subject: x\n\nx\n")
        assert info.value.code == 530  # Must issue a STARTTLS command first

    # And Postfix itself refuses an AUTH sent in clear text anyway (bypassing our
    # client's refusal with the bare protocol core over a raw TCP stream).
    stream = await trio.open_tcp_stream(mail_servers.host, mail_servers.smtp_starttls_port)
    async with stream:
        proto = SMTPProtocol()

        async def reply_to(data: bytes) -> int:
            if data:
                await stream.send_all(data)
            while (reply := proto.next_reply()) is None:
                proto.receive_data(await stream.receive_some(4096))
            return reply.code

        assert await reply_to(b"") == 220
        assert await reply_to(proto.send_ehlo("client.test")) == 250
        blob = b"\x00" + user.address.encode() + b"\x00" + user.password.encode()
        code = await reply_to(proto.send_auth("PLAIN", blob))
        assert 500 <= code < 600
        assert proto.state is State.READY


@pytest.mark.parametrize("security", PORTS)
async def test_certificate_verified_by_default(
    mail_servers: MailServers, security: Security
) -> None:
    # No ssl_context: the system trust store, which does not know the test CA.
    with pytest.raises(TLSError, match="certificate"):
        async with open_smtp_connection(
            mail_servers.host, port_for(mail_servers, security), security=security
        ):
            pass


async def test_wrong_host_name_refused(mail_servers: MailServers) -> None:
    context = mail_servers.ssl_context()
    tcp = await trio.open_tcp_stream(mail_servers.host, mail_servers.smtp_tls_port)
    conn = SMTPConnection(trio.SSLStream(tcp, context, server_hostname="mail.example.org"))
    with pytest.raises(TLSError):
        await conn.handshake()
    await conn.aclose()
    assert isinstance(context, ssl.SSLContext)


async def test_sender_many_messages_and_reconnect_after_postfix_restart(
    mail_servers: MailServers,
) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    async with open_smtp_sender(
        mail_servers.host,
        mail_servers.smtp_tls_port,
        username=sender.address,
        password=sender.password,
        ssl_context=mail_servers.ssl_context(),
    ) as smtp:
        for i in range(10):
            await smtp.send_message(
                sender.address, [rcpt.address], f"Subject: n{i}\n\nmessage {i}\n".encode()
            )
        assert smtp.connections_opened == 1
        # Let Postfix hand all ten to Dovecot first: stopping it mid-LMTP makes it
        # deliver again after the restart (at-least-once), which is not ours to test.
        await inbox(mail_servers, rcpt, 10)
        # Postfix goes away under the idle connection and comes back.
        await trio.to_thread.run_sync(mail_servers.stop_postfix)
        await trio.to_thread.run_sync(mail_servers.start_postfix)
        await trio.sleep(IDLE_PROBE_SECONDS)  # idle long enough to be checked first
        await smtp.send_message(sender.address, [rcpt.address], b"Subject: after\n\nafter\n")
        assert smtp.connections_opened == 2
    messages = await inbox(mail_servers, rcpt, 11)
    bodies = sorted(split_body(m)[1] for m in messages)
    assert bodies == sorted([f"message {i}\n".encode() for i in range(10)] + [b"after\n"])


async def test_broken_connection_reports_clearly(mail_servers: MailServers) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    async with open_smtp_connection(
        mail_servers.host,
        mail_servers.smtp_tls_port,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        await conn.login(sender.address, sender.password)
        await trio.to_thread.run_sync(mail_servers.stop_postfix)
        try:
            with pytest.raises(ConnectionBrokenError):
                await conn.send_message(sender.address, [rcpt.address], b"Subject: x\n\nx\n")
            assert conn.is_broken
        finally:
            await trio.to_thread.run_sync(mail_servers.start_postfix)


@pytest.mark.parametrize("security", PORTS)
async def test_batch_pipelined_across_messages(
    mail_servers: MailServers, security: Security
) -> None:
    sender, rcpt = fresh_pair(mail_servers)
    bodies = [f".line {i}\nGr\u00fc\u00dfe {i}\n".encode() for i in range(40)]
    messages = [
        MailTransaction(
            sender.address,
            ["rejected@prxmail.test"] if i == 17 else [rcpt.address],
            f"Subject: batch {i}\n\n".encode() + body,
        )
        for i, body in enumerate(bodies)
    ]
    async with open_smtp_connection(
        mail_servers.host,
        port_for(mail_servers, security),
        security=security,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        await conn.login(sender.address, sender.password)
        outcomes = await conn.send_messages(messages)
        assert [o.accepted for o in outcomes] == [i != 17 for i in range(40)]
        assert isinstance(outcomes[17].error, SMTPPermanentError)
        assert outcomes[17].error.command == "RCPT"
        assert not conn.is_broken
    delivered = await inbox(mail_servers, rcpt, 39)
    assert len(delivered) == 39
    got = sorted(split_body(m)[1] for m in delivered)
    assert got == sorted(b for i, b in enumerate(bodies) if i != 17)
