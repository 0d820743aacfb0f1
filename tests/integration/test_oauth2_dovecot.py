"""OAuth 2 against the real Dovecot and Postfix, with tokens from the test auth server.

The whole chain: :class:`~prxmail.oauth2.EndpointTokenSource` gets a token from
tests/oauthserver.py over HTTPS; prxmail's IMAP and SMTP clients log in with it
(AUTHENTICATE / AUTH XOAUTH2); Dovecot's oauth2 passdb checks it by RFC 7662
introspection (Postfix asks Dovecot). Deliberate failures connect from another
loopback address (TESTBED: Dovecot's auth penalty is per client IP).
"""

from __future__ import annotations

import base64
import socket
import ssl
import uuid
from pathlib import Path

import pytest
import trio

from prxmail.errors import AuthenticationError
from prxmail.imap import ConnectionState, open_imap_connection
from prxmail.oauth2 import (
    ERROR_ACKNOWLEDGEMENT,
    AccessToken,
    EndpointTokenSource,
    Secret,
    authenticate_with,
    decode_error_challenge,
    oauthbearer_initial_response,
    xoauth2_initial_response,
)
from prxmail.smtp import open_smtp_connection
from tests.mailservers import OAUTH_CLIENT_ID, MailServers, User

pytestmark = pytest.mark.integration

# The loopback address deliberate failures come from.
FAILING_CLIENT_ADDRESS = "127.0.0.3"
IO_TIMEOUT = 10.0


def fresh_user(servers: MailServers) -> User:
    return servers.add_user("oauth" + uuid.uuid4().hex[:10])


def token_source(servers: MailServers, user: User, tmp_path: Path) -> EndpointTokenSource:
    return EndpointTokenSource(
        token_url=servers.oauth.token_url,
        client_id=OAUTH_CLIENT_ID,
        client_secret=Secret(servers.oauth_client_secret),
        refresh_token=Secret(servers.refresh_token(user)),
        state_dir=tmp_path,
        account=user.address,
        ssl_context=servers.ssl_context(),
    )


async def imap_login(servers: MailServers, user: User, token: AccessToken) -> None:
    async with open_imap_connection(
        servers.host,
        servers.imap_tls_port,
        ssl_context=servers.ssl_context(),
        server_hostname="localhost",
    ) as imap:
        await imap.authenticate_xoauth2(user.address, token.reveal())
        assert imap.state is ConnectionState.AUTHENTICATED
        box = await imap.select("INBOX")
        assert box.exists == 0


async def smtp_send(servers: MailServers, user: User, token: AccessToken, to: User) -> None:
    async with open_smtp_connection(
        servers.host, servers.smtp_tls_port, ssl_context=servers.ssl_context()
    ) as smtp:
        await smtp.authenticate_xoauth2(user.address, token.reveal())
        message = (
            f"From: {user.address}\r\nTo: {to.address}\r\nSubject: oauth2 smtp\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@prxmail.test>\r\n\r\nsent with a token\r\n"
        ).encode()
        result = await smtp.send_message(user.address, [to.address], message)
        assert not result.refused


async def test_token_source_logs_in_to_imap_and_smtp(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    user, rcpt = fresh_user(mail_servers), fresh_user(mail_servers)
    source = token_source(mail_servers, user, tmp_path)
    token = await source.token()
    await imap_login(mail_servers, user, token)
    await smtp_send(mail_servers, user, token, rcpt)
    delivered = await trio.to_thread.run_sync(mail_servers.wait_for_messages, rcpt, 1)
    assert b"Subject: oauth2 smtp" in delivered[0]
    assert source.fetches == 1  # one token served both protocols


def raw_sasl_exchange(
    servers: MailServers, protocol: str, mechanism: str, payload: bytes
) -> tuple[str, str]:
    """Send one SASL initial response from FAILING_CLIENT_ADDRESS.

    Returns ``(challenge, final reply line)``: the error challenge ("" if none).
    """
    port = servers.imap_tls_port if protocol == "imap" else servers.smtp_tls_port
    raw = socket.create_connection(
        (servers.host, port), timeout=IO_TIMEOUT, source_address=(FAILING_CLIENT_ADDRESS, 0)
    )
    with servers.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls:
        lines = tls.makefile("rb")
        encoded = base64.b64encode(payload).decode()
        assert lines.readline().startswith(b"* OK" if protocol == "imap" else b"220")
        if protocol == "imap":
            tls.sendall(f"a1 AUTHENTICATE {mechanism} {encoded}\r\n".encode())
        else:
            tls.sendall(b"EHLO client.prxmail.test\r\n")
            while not lines.readline().startswith(b"250 "):
                pass
            tls.sendall(f"AUTH {mechanism} {encoded}\r\n".encode())
        reply = lines.readline().decode().rstrip("\r\n")
        challenge = ""
        if reply.startswith(("+ ", "334 ")):
            challenge = reply.split(" ", 1)[1]
            answer = ERROR_ACKNOWLEDGEMENT[mechanism]
            tls.sendall(base64.b64encode(answer) + b"\r\n" if answer else b"\r\n")
            reply = lines.readline().decode().rstrip("\r\n")
        return challenge, reply


@pytest.mark.parametrize("protocol", ["imap", "smtp"])
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_revoked_token_is_refused_with_a_clear_challenge(
    mail_servers: MailServers, tmp_path: Path, protocol: str, mechanism: str
) -> None:
    user = fresh_user(mail_servers)
    token = await token_source(mail_servers, user, tmp_path).token()
    secret = token.reveal()
    if mechanism == "XOAUTH2":
        payload = xoauth2_initial_response(user.address, secret)
    else:
        payload = oauthbearer_initial_response(user.address, secret, host="localhost", port=993)
    # The valid token works with the raw exchange (OAUTHBEARER included) ...
    challenge, reply = await trio.to_thread.run_sync(
        raw_sasl_exchange, mail_servers, protocol, mechanism, payload
    )
    assert challenge == ""
    assert reply.startswith("a1 OK" if protocol == "imap" else "235 ")
    # ... and once revoked it is refused, with a JSON challenge first.
    mail_servers.oauth.revoke(secret)
    challenge, reply = await trio.to_thread.run_sync(
        raw_sasl_exchange, mail_servers, protocol, mechanism, payload
    )
    assert reply.startswith("a1 NO" if protocol == "imap" else "535 ")
    decoded = decode_error_challenge(challenge, secrets=[secret])
    assert decoded.status in ("401", "invalid_token")
    assert decoded.message.startswith("the server refused the token (status ")
    assert "expired or revoked" in decoded.message
    assert secret not in decoded.message


async def test_prxmail_clients_report_a_revoked_token_without_it(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    user = fresh_user(mail_servers)
    source = token_source(mail_servers, user, tmp_path)
    token = await source.token()
    mail_servers.oauth.revoke(token.reveal())
    with pytest.raises(AuthenticationError) as imap_error:
        await imap_login(mail_servers, user, token)
    with pytest.raises(AuthenticationError) as smtp_error:
        await smtp_send(mail_servers, user, token, user)
    assert smtp_error.value.code == "535"
    for exc in (imap_error.value, smtp_error.value):
        assert token.reveal() not in str(exc) + exc.server_text
    # End with a successful login (TESTBED: that clears any auth penalty on 127.0.0.1).
    await authenticate_with(source, lambda t: imap_login(mail_servers, user, t))


async def test_expired_token_is_refreshed_after_the_refusal(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    user = fresh_user(mail_servers)
    mail_servers.oauth.expires_in = 1
    try:
        source = token_source(mail_servers, user, tmp_path)
        stale = await source.token()
    finally:
        mail_servers.oauth.expires_in = 300
    await trio.sleep(1.2)  # now Dovecot's introspection says inactive
    # authenticate_with sees the refusal, refreshes once and logs in with the new token.
    accepted = await authenticate_with(source, lambda t: imap_login(mail_servers, user, t))
    assert accepted.reveal() != stale.reveal()
    assert source.fetches == 2


async def test_client_credentials_token_logs_in(mail_servers: MailServers) -> None:
    user = fresh_user(mail_servers)
    mail_servers.oauth.register_client(
        "daemon-" + user.localpart, "app-secret-1", app_user=user.address
    )
    source = EndpointTokenSource(
        token_url=mail_servers.oauth.token_url,
        client_id="daemon-" + user.localpart,
        client_secret=Secret("app-secret-1"),
        grant="client_credentials",
        scope="https://outlook.office365.com/.default",
        ssl_context=mail_servers.ssl_context(),
    )
    await imap_login(mail_servers, user, await source.token())


def test_password_users_unaffected(mail_servers: MailServers) -> None:
    import imaplib

    alice = mail_servers.users["alice"]
    client = imaplib.IMAP4_SSL(
        mail_servers.host, mail_servers.imap_tls_port, ssl_context=mail_servers.ssl_context()
    )
    try:
        assert "AUTH=XOAUTH2" in client.capabilities
        assert "AUTH=OAUTHBEARER" in client.capabilities
        assert client.login(alice.address, alice.password)[0] == "OK"
    finally:
        client.logout()
    assert isinstance(mail_servers.ssl_context(), ssl.SSLContext)


async def test_loopback_flow_token_file_logs_in(mail_servers: MailServers, tmp_path: Path) -> None:
    # `prxmail auth` (loopback + PKCE) writes the file; the token source reads it; Dovecot
    # accepts the token. The test plays the browser.
    import httpx

    from prxmail.oauth2 import run_loopback_flow

    user = fresh_user(mail_servers)
    path = tmp_path / "refresh-token"
    send, receive = trio.open_memory_channel[str](10)

    async def browser() -> None:
        async with httpx.AsyncClient(verify=mail_servers.ssl_context()) as client:
            async for line in receive:
                if line.startswith(mail_servers.oauth.authorize_url):
                    redirect = await client.get(line)
                    await client.get(redirect.headers["location"])
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(browser)
        await run_loopback_flow(
            authorize_url=mail_servers.oauth.authorize_url,
            token_url=mail_servers.oauth.token_url,
            client_id=OAUTH_CLIENT_ID,
            client_secret=Secret(mail_servers.oauth_client_secret),
            scope="mail",
            extra_params={"login_hint": user.address},
            ssl_context=mail_servers.ssl_context(),
            refresh_token_file=path,
            output=send.send_nowait,
        )
    source = EndpointTokenSource(
        token_url=mail_servers.oauth.token_url,
        client_id=OAUTH_CLIENT_ID,
        client_secret=Secret(mail_servers.oauth_client_secret),
        refresh_token_file=path,
        ssl_context=mail_servers.ssl_context(),
    )
    await imap_login(mail_servers, user, await source.token())
