"""Token sources against the real test authorization server (tests/oauthserver.py)."""

from __future__ import annotations

import json
import os
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from prxmail.errors import AuthenticationError, ConfigError
from prxmail.oauth2 import (
    AccessToken,
    CommandTokenSource,
    EndpointTokenSource,
    OAuth2Error,
    Secret,
    TokenCommandError,
    TokenEndpointError,
    authenticate_with,
)
from tests.oauthserver import AuthServer, free_port, make_tls

CLIENT_ID = "prxmail-test"
CLIENT_SECRET = "client-secret-value-1234"
USER = "bot@prxmail.test"


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    return make_tls()


@pytest.fixture
def server(tls: tuple[ssl.SSLContext, ssl.SSLContext, str]) -> Iterator[AuthServer]:
    srv = AuthServer(tls[0]).start()
    srv.register_client(CLIENT_ID, CLIENT_SECRET)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext, str]) -> ssl.SSLContext:
    return tls[1]


def source_for(
    server: AuthServer,
    client_tls: ssl.SSLContext,
    refresh: str,
    tmp_path: Path,
    **kwargs: object,
) -> EndpointTokenSource:
    return EndpointTokenSource(
        token_url=server.token_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token=Secret(refresh),
        state_dir=tmp_path / "state",
        account=USER,
        ssl_context=client_tls,
        **kwargs,  # type: ignore[arg-type]
    )


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


async def test_refresh_grant_fetches_and_caches(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    refresh = server.issue_refresh_token(USER, CLIENT_ID)
    source = source_for(server, client_tls, refresh, tmp_path, scope="mail offline_access")
    first = await source.token()
    again = await source.token()
    assert again is first
    assert server._introspect(first.reveal()) == {
        "active": True,
        "username": USER,
        "scope": "mail",
    }
    assert server.grants("refresh_token") == 1
    ((_, form),) = server.token_requests
    assert form == {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": refresh,
        "scope": "mail offline_access",
    }
    assert first.expires_at - trio.current_time() == pytest.approx(300, abs=5)


async def test_refreshes_before_expiry(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.expires_in = 1  # margin: a fifth of it, 0.2 s
    source = source_for(server, client_tls, server.issue_refresh_token(USER, CLIENT_ID), tmp_path)
    first = await source.token()
    assert await source.token() is first
    await trio.sleep(0.85)  # still valid for 0.15 s, inside the margin
    second = await source.token()
    assert second.reveal() != first.reveal()
    assert server.grants("refresh_token") == 2


async def test_concurrent_refreshes_are_coalesced(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.delay = 0.3
    source = source_for(server, client_tls, server.issue_refresh_token(USER, CLIENT_ID), tmp_path)
    got: list[AccessToken] = []

    async def one() -> None:
        got.append(await source.token())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert len(got) == 5
    assert len({t.reveal() for t in got}) == 1
    assert server.grants("refresh_token") == 1
    assert source.fetches == 1


async def test_coalesced_failure_reaches_every_waiter_once(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.delay = 0.2
    source = source_for(server, client_tls, "rt-unknown-to-the-server", tmp_path)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await source.token()
        except TokenEndpointError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert len(errors) == 3
    assert server.grants("refresh_token") == 1


async def test_cancelled_fetch_lets_a_waiter_fetch(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.delay = 0.3
    source = source_for(server, client_tls, server.issue_refresh_token(USER, CLIENT_ID), tmp_path)
    got: list[AccessToken] = []

    async def waiter() -> None:
        got.append(await source.token())

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.1):
            async with trio.open_nursery() as inner:
                inner.start_soon(source.token)
                await trio.sleep(0.01)
                nursery.start_soon(waiter)
                await trio.sleep(1)
    assert len(got) == 1
    assert server._introspect(got[0].reveal())["active"] is True


async def test_refresh_after_rejection(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    source = source_for(server, client_tls, server.issue_refresh_token(USER, CLIENT_ID), tmp_path)
    first = await source.token()
    server.revoke(first.reveal())
    second = await source.refresh_after_rejection(first)
    assert second.reveal() != first.reveal()
    # A second task reporting the same (already replaced) token gets the new one.
    assert await source.refresh_after_rejection(first) is second
    assert server.grants("refresh_token") == 2


async def test_authenticate_with_refreshes_once_then_fails(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    source = source_for(server, client_tls, server.issue_refresh_token(USER, CLIENT_ID), tmp_path)
    seen: list[str] = []

    async def refuse_first(token: AccessToken) -> None:
        seen.append(token.reveal())
        if len(seen) == 1:
            raise AuthenticationError("refused", protocol="imap")

    accepted = await authenticate_with(source, refuse_first)
    assert accepted.reveal() == seen[1] != seen[0]

    async def refuse_all(token: AccessToken) -> None:
        raise AuthenticationError("refused again", protocol="smtp")

    with pytest.raises(AuthenticationError, match="refused again"):
        await authenticate_with(source, refuse_all)
    assert server.grants("refresh_token") == 3


async def test_rotated_token_written_back_to_file_keeping_mode(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.rotate = True
    original = server.issue_refresh_token(USER, CLIENT_ID)
    path = tmp_path / "refresh-token"
    path.write_text(original + "\n")
    path.chmod(0o640)
    source = EndpointTokenSource(
        token_url=server.token_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token_file=path,
        ssl_context=client_tls,
    )
    first = await source.token()
    rotated = path.read_text().strip()
    assert rotated != original
    assert server.refresh_token_valid(rotated)
    assert not server.refresh_token_valid(original)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["refresh-token"]  # no temporary file left
    await source.refresh_after_rejection(first)
    assert server.token_requests[-1][1]["refresh_token"] == rotated


async def test_rotated_configured_token_survives_restart(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.rotate = True
    configured = server.issue_refresh_token(USER, CLIENT_ID)
    source = source_for(server, client_tls, configured, tmp_path)
    await source.token()
    state_file = source.state_file
    assert state_file is not None
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert configured not in state_file.read_text()
    # A "restart": a new source with the same (now revoked) configured token.
    restarted = source_for(server, client_tls, configured, tmp_path)
    token = await restarted.token()
    assert server._introspect(token.reveal())["active"] is True
    # The user pastes a brand-new token into the config: that one wins over the file.
    fresh = server.issue_refresh_token(USER, CLIENT_ID)
    renewed = source_for(server, client_tls, fresh, tmp_path)
    await renewed.token()
    assert server.token_requests[-1][1]["refresh_token"] == fresh


async def test_client_credentials_grant(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.register_client("daemon", "daemon-secret-5678", app_user=USER)
    source = EndpointTokenSource(
        token_url=server.token_url,
        client_id="daemon",
        client_secret=Secret("daemon-secret-5678"),
        grant="client_credentials",
        scope="https://outlook.office365.com/.default",
        ssl_context=client_tls,
    )
    token = await source.token()
    assert server._introspect(token.reveal())["username"] == USER
    ((_, form),) = server.token_requests
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "daemon",
        "client_secret": "daemon-secret-5678",
        "scope": "https://outlook.office365.com/.default",
    }


def test_bad_combinations_are_config_errors(client_tls: ssl.SSLContext, tmp_path: Path) -> None:
    common = {"client_id": "x", "ssl_context": client_tls}
    with pytest.raises(ConfigError, match="https"):
        EndpointTokenSource(
            token_url="http://login.example.com/token", refresh_token=Secret("r"), **common
        )
    with pytest.raises(ConfigError, match="exactly one"):
        EndpointTokenSource(token_url="https://a.example/token", **common)
    with pytest.raises(ConfigError, match="client_secret"):
        EndpointTokenSource(
            token_url="https://a.example/token", grant="client_credentials", **common
        )
    with pytest.raises(ConfigError, match="state directory"):
        EndpointTokenSource(
            token_url="https://a.example/token", refresh_token=Secret("r"), **common
        )
    # Plain http is fine on loopback.
    EndpointTokenSource(
        token_url="http://127.0.0.1:9/token",
        refresh_token=Secret("r"),
        state_dir=tmp_path,
        **common,
    )


async def test_plain_http_on_loopback_works(tmp_path: Path) -> None:
    plain = AuthServer(None).start()
    try:
        plain.register_client(CLIENT_ID)
        source = EndpointTokenSource(
            token_url=plain.token_url,
            client_id=CLIENT_ID,
            refresh_token=Secret(plain.issue_refresh_token(USER, CLIENT_ID)),
            state_dir=tmp_path,
            ssl_context=ssl.create_default_context(),
        )
        await source.token()
        assert "client_secret" not in plain.token_requests[0][1]  # a public client
    finally:
        plain.stop()


ErrorCase = tuple[int, dict[str, str] | bytes, str | None, str, bool]


@pytest.mark.parametrize(
    "case",
    [
        (400, {"error": "invalid_grant"}, "invalid_grant", "prxmail auth", False),
        (401, {"error": "invalid_client"}, "invalid_client", "oauth2_client_id", False),
        (400, {"error": "invalid_scope"}, "invalid_scope", "oauth2_scope", False),
        (400, {"error": "unauthorized_client"}, "unauthorized_client", "grant", False),
        (503, {"error": "temporarily_unavailable"}, "temporarily_unavailable", "retry", True),
        (502, b"<html>Bad gateway</html>", None, "retrying", True),
        (200, b"not json at all", None, "oauth2_token_url", False),
        (404, {"detail": "no such thing"}, None, "oauth2", False),
        (200, {"token_type": "Bearer", "expires_in": 60}, None, "oauth2_token_url", False),
    ],
    ids=lambda c: f"{c[0]}-{c[2] or 'none'}",
)
async def test_endpoint_errors_are_explained(
    server: AuthServer,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
    case: ErrorCase,
) -> None:
    status, body, error, hint, transient = case
    refresh = server.issue_refresh_token(USER, CLIENT_ID)
    content_type = "text/html" if isinstance(body, bytes) else "application/json"
    server.queue_response(status, body, content_type)
    source = source_for(server, client_tls, refresh, tmp_path)
    with pytest.raises(TokenEndpointError) as info:
        await source.token()
    exc = info.value
    assert isinstance(exc, AuthenticationError)
    assert exc.error == error
    assert hint in str(exc)
    assert exc.transient is transient
    assert_no_secret(str(exc) + repr(exc) + repr(source), refresh, CLIENT_SECRET)


async def test_echoed_secrets_are_redacted(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    refresh = server.issue_refresh_token(USER, CLIENT_ID)
    server.queue_response(
        400,
        {"error": "invalid_grant", "error_description": f"token {refresh} for {CLIENT_SECRET}"},
    )
    source = source_for(server, client_tls, refresh, tmp_path)
    with pytest.raises(TokenEndpointError, match="invalid_grant") as info:
        await source.token()
    assert "***" in str(info.value)
    assert_no_secret(str(info.value) + info.value.server_text, refresh, CLIENT_SECRET)


async def test_unreachable_endpoint(client_tls: ssl.SSLContext, tmp_path: Path) -> None:
    source = EndpointTokenSource(
        token_url=f"https://127.0.0.1:{free_port()}/token",
        client_id=CLIENT_ID,
        refresh_token=Secret("rt-secret-abcdef"),
        state_dir=tmp_path,
        ssl_context=client_tls,
    )
    with pytest.raises(TokenEndpointError, match="cannot reach the token endpoint") as info:
        await source.token()
    assert info.value.transient
    assert "rt-secret-abcdef" not in str(info.value)


async def test_untrusted_certificate(server: AuthServer, tmp_path: Path) -> None:
    source = source_for(
        server,
        ssl.create_default_context(),  # the system store does not know the test CA
        server.issue_refresh_token(USER, CLIENT_ID),
        tmp_path,
    )
    with pytest.raises(TokenEndpointError, match=r"certificate is not trusted.*tls_ca_file"):
        await source.token()
    assert server.token_requests == []


async def test_hung_endpoint_times_out(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.delay = 2
    source = source_for(
        server,
        client_tls,
        server.issue_refresh_token(USER, CLIENT_ID),
        tmp_path,
        request_timeout=0.3,
    )
    with pytest.raises(TokenEndpointError, match=r"did not answer within 0\.3 s") as info:
        await source.token()
    assert info.value.transient


async def test_reprs_hide_tokens(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    refresh = server.issue_refresh_token(USER, CLIENT_ID)
    source = source_for(server, client_tls, refresh, tmp_path)
    token = await source.token()
    shown = repr(token) + str(token) + f"{token}" + repr(source) + repr(Secret(refresh))
    assert_no_secret(shown, token.reveal(), refresh, CLIENT_SECRET)


def write_script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "helper.py"
    path.write_text(f"#!{sys.executable}\nimport os, sys, time\n{body}\n")
    path.chmod(0o700)
    return path


async def test_token_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRXMAIL_PASSWORD", "env-password-9999")
    monkeypatch.setenv("HOME", str(tmp_path))
    script = write_script(
        tmp_path,
        "print('at-from-helper-' + str(len(sys.argv)));"
        "open(os.path.join(os.environ['HOME'], 'env.json'), 'w').write("
        "__import__('json').dumps(dict(os.environ)))",
    )
    source = CommandTokenSource([str(script), "--account", USER])
    token = await source.token()
    assert token.reveal() == "at-from-helper-3"
    assert await source.token() is token  # reused, not run again
    env = json.loads((tmp_path / "env.json").read_text())
    assert "PRXMAIL_PASSWORD" not in env
    assert env["HOME"] == str(tmp_path)
    assert "at-from-helper" not in repr(source) + repr(token)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("sys.stderr.write('no keyring\\n'); sys.exit(3)", "status 3: no keyring"),
        ("pass", "printed nothing"),
        ("print('two words')", "more than one"),
        ("sys.stdout.write('x' * 100000)", "more than 65536 bytes"),
    ],
)
async def test_token_command_failures(tmp_path: Path, body: str, match: str) -> None:
    source = CommandTokenSource([str(write_script(tmp_path, body))])
    with pytest.raises(TokenCommandError, match=match):
        await source.token()


async def test_token_command_timeout_kills(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = write_script(
        tmp_path, f"open({str(pidfile)!r}, 'w').write(str(os.getpid()));time.sleep(30)"
    )
    source = CommandTokenSource([str(script)], timeout=0.5)
    with pytest.raises(TokenCommandError, match="did not finish"):
        await source.token()
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_token_command_not_found(tmp_path: Path) -> None:
    with pytest.raises(TokenCommandError, match="cannot run") as info:
        await CommandTokenSource([str(tmp_path / "missing")]).token()
    assert isinstance(info.value, OAuth2Error)
