"""OAuth 2 wired end to end: config -> token source -> channel, doctor and `prxmail auth`.

Against the real Dovecot (oauth2 passdb, introspection) and Postfix (Dovecot SASL)
with tokens from tests/oauthserver.py. Each test makes fresh users; tests that make
the server refuse something connect the refused logins from another loopback address
or end with a successful login (TESTBED: Dovecot's auth penalty is per client IP).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from prxmail._login import AccountLogin
from prxmail.channel import open_mail_channel
from prxmail.config import Config, load_config, parse_config
from prxmail.doctor import run_checks
from prxmail.imap import ConnectionState, open_imap_connection
from prxmail.message import Message
from prxmail.smtp import open_smtp_connection, open_smtp_sender
from tests.integration.servicekit import (
    Pair,
    config_text,
    fresh_pair,
    make_message,
    running_serve,
    send_mail,
    wait_replies,
)
from tests.mailservers import OAUTH_CLIENT_ID, MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
# Short enough that a test outlives several tokens, long enough for a login to finish
# with the token it fetched (the refresh margin is a fifth of this).
SHORT_LIFETIME = 4


async def in_thread(fn: object, *args: object) -> object:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))  # type: ignore[arg-type]


def oauth_text(
    servers: MailServers, pair: Pair, tmp_path: Path, *, refresh_file: bool = True, **extra: object
) -> str:
    """The channel config for ``pair.bot`` with OAuth 2 instead of its password."""
    text = config_text(servers, pair, tmp_path / "state", **extra)
    text = re.sub(r"^password = .*\n", "", text, flags=re.M)
    lines = [
        'auth = "oauth2"',
        f'oauth2_token_url = "{servers.oauth.token_url}"',
        f'oauth2_client_id = "{OAUTH_CLIENT_ID}"',
        f'oauth2_client_secret = "{servers.oauth_client_secret}"',
    ]
    if refresh_file:
        token_file = tmp_path / "refresh-token"
        token_file.write_text(servers.refresh_token(pair.bot) + "\n")
        token_file.chmod(0o600)
        lines.append(f'oauth2_refresh_token_file = "{token_file}"')
    return text + "\n".join(lines) + "\n"


def issued_secrets(servers: MailServers) -> list[str]:
    """Every token the auth server issued so far, and the client secret."""
    oauth = servers.oauth
    with oauth._lock:
        return [*oauth._access, *oauth._refresh, servers.oauth_client_secret]


def assert_no_secret(servers: MailServers, *texts: str) -> None:
    secrets = issued_secrets(servers)
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.fixture
def short_tokens(mail_servers: MailServers) -> Iterator[None]:
    before = mail_servers.oauth.expires_in
    mail_servers.oauth.expires_in = SHORT_LIFETIME
    try:
        yield
    finally:
        mail_servers.oauth.expires_in = before


async def next_message(channel: object) -> Message:
    with trio.fail_after(30):
        return await channel.receive()  # type: ignore[attr-defined, no-any-return]


async def test_channel_answers_mail_with_oauth2_on_both_protocols_and_refreshes(
    mail_servers: MailServers, tmp_path: Path, short_tokens: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pair = fresh_pair(mail_servers, "oauthchan")
    config = parse_config(oauth_text(mail_servers, pair, tmp_path))
    grants_before = mail_servers.oauth.grants("refresh_token")
    async with open_mail_channel(config) as channel:
        first = make_message(pair.alice, pair.bot, "oauth question", "ping\n")
        await in_thread(send_mail, mail_servers, pair.alice, first, pair.bot)
        message = await next_message(channel)
        await channel.reply(message, "pong 1")
        await in_thread(wait_replies, mail_servers, pair.alice, 1)
        # One token for the watcher and the sender: one account, one token source.
        assert mail_servers.oauth.grants("refresh_token") == grants_before + 1

        # The token expires; Dovecot restarts, so the watcher must log in again, and
        # the next reply is sent after the expiry.
        await trio.sleep(SHORT_LIFETIME + 1)
        await in_thread(mail_servers.restart_dovecot)
        second = make_message(pair.alice, pair.bot, "oauth question 2", "ping again\n")
        await in_thread(send_mail, mail_servers, pair.alice, second, pair.bot)
        message = await next_message(channel)
        assert message.message_id == second["Message-ID"]
        await channel.reply(message, "pong 2")
        await in_thread(wait_replies, mail_servers, pair.alice, 2)
    assert mail_servers.oauth.grants("refresh_token") >= grants_before + 2
    assert_no_secret(mail_servers, caplog.text)


async def test_smtp_connection_opened_after_expiry_logs_in_with_a_fresh_token(
    mail_servers: MailServers, tmp_path: Path, short_tokens: None
) -> None:
    pair = fresh_pair(mail_servers, "oauthsmtp")
    config = parse_config(oauth_text(mail_servers, pair, tmp_path))
    login = AccountLogin(config, mail_servers.ssl_context())
    before = mail_servers.oauth.grants("refresh_token")
    for n in range(2):
        async with open_smtp_sender(
            config.smtp_host,
            config.smtp_port,
            security=config.smtp_security,
            ssl_context=mail_servers.ssl_context(),
            authenticate=login.smtp,
        ) as sender:
            msg = make_message(pair.bot, pair.alice, f"sent {n}")
            await sender.send_message(pair.bot.address, [pair.alice.address], msg.as_bytes())
        await trio.sleep(SHORT_LIFETIME + 1)
    await in_thread(wait_replies, mail_servers, pair.alice, 2)
    assert mail_servers.oauth.grants("refresh_token") == before + 2


def test_rotated_refresh_token_survives_a_restart(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthrot")
    path = tmp_path / "prxmail.toml"
    path.write_text(oauth_text(mail_servers, pair, tmp_path))
    token_file = tmp_path / "refresh-token"
    original = token_file.read_text().strip()
    mail_servers.oauth.rotate = True
    try:
        for _ in range(2):  # the second run is the "restart": a new process state
            report = trio.run(run_checks, path)
            assert report.ok, report
    finally:
        mail_servers.oauth.rotate = False
    rotated = token_file.read_text().strip()
    assert rotated != original
    assert not mail_servers.oauth.refresh_token_valid(original)
    assert mail_servers.oauth.refresh_token_valid(rotated)
    assert token_file.stat().st_mode & 0o777 == 0o600


def test_doctor_shows_oauth2_steps_and_a_revoked_token_clearly(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthdoc")
    path = tmp_path / "prxmail.toml"
    path.write_text(oauth_text(mail_servers, pair, tmp_path))
    report = trio.run(run_checks, path)
    by_name = {step.name: step for step in report.steps}
    assert report.ok, report
    assert by_name["oauth2.token"].status.value == "pass"
    assert "logged in" in by_name["imap.login"].summary
    assert "authenticated" in by_name["smtp.auth"].summary

    mail_servers.oauth.revoke((tmp_path / "refresh-token").read_text().strip())
    report = trio.run(run_checks, path)
    by_name = {step.name: step for step in report.steps}
    assert not report.ok
    token = by_name["oauth2.token"]
    assert token.status.value == "fail"
    assert "invalid_grant" in token.summary
    assert "prxmail auth" in token.hint + token.summary
    assert_no_secret(mail_servers, repr(report))


def test_serve_logs_a_revoked_refresh_token_clearly(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthrev")
    path = tmp_path / "prxmail.toml"
    path.write_text(oauth_text(mail_servers, pair, tmp_path))
    mail_servers.oauth.revoke((tmp_path / "refresh-token").read_text().strip())
    for proc in running_serve(path, "cat"):
        proc.wait_log(
            r"IMAP login refused: check the OAuth 2 settings.*invalid_grant.*prxmail auth",
            timeout=30,
        )
        proc.terminate()
        assert_no_secret(mail_servers, proc.log())


async def test_client_credentials_grant_logs_in_as_the_app_mailbox(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthapp")
    app_id = "daemon-" + pair.bot.localpart
    mail_servers.oauth.register_client(app_id, "app-secret-" + app_id, app_user=pair.bot.address)
    text = oauth_text(mail_servers, pair, tmp_path, refresh_file=False)
    text = text.replace(f'oauth2_client_id = "{OAUTH_CLIENT_ID}"', f'oauth2_client_id = "{app_id}"')
    text = text.replace(
        f'oauth2_client_secret = "{mail_servers.oauth_client_secret}"',
        f'oauth2_client_secret = "app-secret-{app_id}"',
    )
    config = parse_config(text + 'oauth2_grant = "client_credentials"\n')
    async with open_mail_channel(config) as channel:
        msg = make_message(pair.alice, pair.bot, "to the daemon")
        await in_thread(send_mail, mail_servers, pair.alice, msg, pair.bot)
        message = await next_message(channel)
        await channel.reply(message, "the daemon answers")
        await in_thread(wait_replies, mail_servers, pair.alice, 1)


def _auth_cli(config: Path, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "prxmail", "auth", "-c", str(config), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, lines: list[str]) -> re.Match[str]:
    assert proc.stdout is not None
    regex = re.compile(pattern)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if match := regex.search(line):
            return match
    raise AssertionError(
        f"no {pattern!r} in {lines!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )


@pytest.mark.parametrize("flow", ["device", "loopback"])
def test_prxmail_auth_writes_the_refresh_token_and_serve_can_use_it(
    mail_servers: MailServers, tmp_path: Path, flow: str
) -> None:
    pair = fresh_pair(mail_servers, "oauthcli")
    path = tmp_path / "prxmail.toml"
    text = oauth_text(mail_servers, pair, tmp_path)
    token_file = tmp_path / "refresh-token"
    token_file.unlink()  # prxmail auth creates it
    path.write_text(text)
    oauth = mail_servers.oauth
    flags = ["--flow", flow]
    flags += [f"--device-url={oauth.device_url}"] if flow == "device" else []
    flags += [f"--authorize-url={oauth.authorize_url}"] if flow == "loopback" else []
    lines: list[str] = []
    proc = _auth_cli(path, *flags)
    try:
        if flow == "device":
            code = _read_until(proc, r"enter the code (\S+)", lines).group(1)
            oauth.approve_device(code, pair.bot.address)
        else:
            url = _read_until(proc, r"^(https://\S+/authorize\?\S+)$", lines).group(1)
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
            assert query["login_hint"] == [pair.bot.address]
            # Play the browser: the authorize endpoint redirects to the loopback listener.
            threading.Thread(
                target=httpx.get,
                args=(url,),
                kwargs={"verify": mail_servers.ssl_context(), "follow_redirects": True},
                daemon=True,
            ).start()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + out + err
    assert proc.returncode == 0, output
    assert f"the refresh token was saved to {token_file}" in output
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert oauth.refresh_token_valid(token_file.read_text().strip())
    assert_no_secret(mail_servers, output)
    report = trio.run(run_checks, path)
    assert report.ok, report


def test_prxmail_auth_refuses_a_config_it_cannot_write_to(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthnofile")
    path = tmp_path / "prxmail.toml"
    path.write_text(
        oauth_text(mail_servers, pair, tmp_path, refresh_file=False)
        + 'oauth2_refresh_token = "rt-inline"\n'
    )
    config: Config = load_config(path)
    assert config.oauth2 is not None
    proc = _auth_cli(path, "--flow", "device", "--device-url", mail_servers.oauth.device_url)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "set oauth2_refresh_token_file" in err
    assert "rt-inline" not in out + err


async def test_a_token_the_servers_refuse_is_refreshed_once_on_both_protocols(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "oauthrej")
    config = parse_config(oauth_text(mail_servers, pair, tmp_path))
    login = AccountLogin(config, mail_servers.ssl_context())
    assert login.token_source is not None
    cached = await login.token_source.token()
    # The provider revoked the access token; the source still thinks it is good.
    mail_servers.oauth.revoke(cached.reveal())
    async with open_imap_connection(
        config.imap_host, config.imap_port, ssl_context=mail_servers.ssl_context()
    ) as imap:
        await login.imap(imap)  # refused once, refreshed, logged in: ends with a success
        assert imap.state is ConnectionState.AUTHENTICATED
    fresh = await login.token_source.token()
    assert fresh.reveal() != cached.reveal()
    mail_servers.oauth.revoke(fresh.reveal())
    async with open_smtp_connection(
        config.smtp_host, config.smtp_port, ssl_context=mail_servers.ssl_context()
    ) as smtp:
        await login.smtp(smtp)
        assert smtp.authenticated
