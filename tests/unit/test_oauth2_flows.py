"""The `prxmail auth` flows against the real test authorization server.

The device flow's user is played with AuthServer.approve_device / deny_device; the
loopback flow's browser is an httpx client that follows the authorization URL the
flow prints and then the redirect to the flow's own listener.
"""

from __future__ import annotations

import os
import ssl
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from prxmail.oauth2 import (
    OAuth2Error,
    Secret,
    TokenEndpointError,
    TokenResponse,
    run_device_flow,
    run_loopback_flow,
)
from tests.oauthserver import AuthServer, make_tls

CLIENT_ID = "prxmail-cli"
USER = "bot@prxmail.test"


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    return make_tls()


@pytest.fixture
def server(tls: tuple[ssl.SSLContext, ssl.SSLContext, str]) -> Iterator[AuthServer]:
    srv = AuthServer(tls[0]).start()
    srv.register_client(CLIENT_ID)  # a public client, as for the CLI
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext, str]) -> ssl.SSLContext:
    return tls[1]


class Screen(list[str]):
    """What the flow shows the user; ``shown`` is set at the first line."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = trio.Event()

    def append(self, line: str) -> None:
        super().append(line)
        self.shown.set()

    async def user_code(self) -> str:
        await self.shown.wait()
        return self[0].rsplit(" ", 1)[1]


def saved_token(path: Path) -> str:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text().strip()


# -- device authorization grant (RFC 8628) -------------------------------------------


async def device_flow(
    server: AuthServer, client_tls: ssl.SSLContext, path: Path, lines: list[str]
) -> TokenResponse:
    return await run_device_flow(
        device_url=server.device_url,
        token_url=server.token_url,
        client_id=CLIENT_ID,
        scope="mail offline_access",
        ssl_context=client_tls,
        refresh_token_file=path,
        output=lines.append,
    )


async def test_device_flow_completes(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    path = tmp_path / "refresh-token"
    lines = Screen()

    async def user() -> None:
        user_code = await lines.user_code()
        await trio.sleep(1.5)  # the flow polls (pending) at least once meanwhile
        server.approve_device(user_code, USER)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(user)
        tokens = await device_flow(server, client_tls, path, lines)
    assert lines[0].startswith(f"To sign in, open {server.url}/device-login in a browser")
    assert server.refresh_token_valid(saved_token(path))
    assert server._introspect(tokens.access_token.reveal())["username"] == USER
    polls = [form for grant, form in server.token_requests]
    assert len(polls) >= 2  # authorization_pending first
    assert polls[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert "slow_down" not in str(server.log)
    shown = "\n".join(lines)
    assert saved_token(path) not in shown
    assert tokens.access_token.reveal() not in shown


async def test_device_flow_honours_slow_down(
    server: AuthServer,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server.device_interval = 5
    server.enforce_interval = False  # the server cannot see the virtual clock
    server.queue_response(400, {"error": "slow_down"})
    server.queue_response(400, {"error": "authorization_pending"})
    lines = Screen()

    async def user() -> None:
        server.approve_device(await lines.user_code(), USER)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(user)
        await device_flow(server, client_tls, tmp_path / "rt", lines)
    # 5 s, then slow_down (interval 5 + 5), 10 s (pending), 10 s (approved).
    assert trio.current_time() - start == pytest.approx(25, abs=0.1)
    assert len(server.token_requests) == 3


async def test_device_flow_code_expires(
    server: AuthServer,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server.device_interval = 5
    server.enforce_interval = False
    start = trio.current_time()
    with pytest.raises(OAuth2Error, match="expired before the sign-in"):
        await device_flow(server, client_tls, tmp_path / "rt", [])
    assert trio.current_time() - start == pytest.approx(120, abs=5)  # the code's expires_in
    assert not (tmp_path / "rt").exists()


async def test_device_flow_declined(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    lines = Screen()

    async def user() -> None:
        server.deny_device(await lines.user_code())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(user)
        with pytest.raises(OAuth2Error, match="declined"):
            await device_flow(server, client_tls, tmp_path / "rt", lines)


async def test_device_flow_unknown_client(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    with pytest.raises(TokenEndpointError, match="invalid_client") as info:
        await run_device_flow(
            device_url=server.device_url,
            token_url=server.token_url,
            client_id="nobody",
            ssl_context=client_tls,
            refresh_token_file=tmp_path / "rt",
            output=lambda line: None,
        )
    assert "oauth2_client_id" in str(info.value)


# -- authorization code + PKCE with a loopback redirect (RFC 8252 / 7636) ------------


async def loopback_flow(
    server: AuthServer,
    client_tls: ssl.SSLContext,
    path: Path,
    browse: object,
    **kwargs: object,
) -> tuple[object, list[str]]:
    """Run the flow while ``browse(url, client)`` plays the browser."""
    lines: list[str] = []
    send, receive = trio.open_memory_channel[str](100)
    result: list[object] = []

    async def browser() -> None:
        async with httpx.AsyncClient(verify=client_tls) as client:
            async for line in receive:
                if line.startswith(server.authorize_url):
                    await browse(line, client)  # type: ignore[operator]
                    return

    def output(line: str) -> None:
        lines.append(line)
        send.send_nowait(line)

    failure: list[OAuth2Error] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(browser)
        try:
            result.append(
                await run_loopback_flow(
                    authorize_url=server.authorize_url,
                    token_url=server.token_url,
                    client_id=CLIENT_ID,
                    scope="mail offline_access",
                    ssl_context=client_tls,
                    refresh_token_file=path,
                    output=output,
                    **kwargs,  # type: ignore[arg-type]
                )
            )
        except OAuth2Error as exc:
            failure.append(exc)  # raised below, not wrapped in the nursery's group
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return result[0], lines


async def follow(
    url: str, client: httpx.AsyncClient, *, tamper_state: bool = False
) -> httpx.Response:
    authorize = await client.get(url)
    assert authorize.status_code == 302
    location = authorize.headers["location"]
    if tamper_state:
        location = location.replace("state=", "state=forged")
    assert location.startswith("http://127.0.0.1:")
    return await client.get(location)


async def test_loopback_flow_completes(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.default_user = USER
    pages: list[httpx.Response] = []

    async def browse(url: str, client: httpx.AsyncClient) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert query["code_challenge_method"] == "S256"
        assert query["response_type"] == "code"
        assert query["redirect_uri"].startswith("http://127.0.0.1:")
        # A browser's stray request first (favicon): answered 404, the flow goes on.
        stray = await client.get(query["redirect_uri"] + "favicon.ico")
        assert stray.status_code == 404
        pages.append(await follow(url, client))

    path = tmp_path / "refresh-token"
    _, lines = await loopback_flow(server, client_tls, path, browse)
    assert pages[0].status_code == 200
    assert "Signed in" in pages[0].text
    assert server.refresh_token_valid(saved_token(path))
    ((grant, form),) = server.token_requests
    assert grant == "authorization_code"
    assert len(form["code_verifier"]) >= 43  # the server checked it against the challenge
    assert saved_token(path) not in "\n".join(lines)


async def test_loopback_flow_passes_extra_params(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    async def browse(url: str, client: httpx.AsyncClient) -> None:
        seen.append(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)))
        await follow(url, client)

    await loopback_flow(
        server,
        client_tls,
        tmp_path / "rt",
        browse,
        extra_params={"login_hint": USER, "access_type": "offline"},
        client_secret=Secret("unused-by-public-client"),
    )
    assert seen[0]["login_hint"] == USER
    assert seen[0]["access_type"] == "offline"


async def test_loopback_flow_refuses_a_wrong_state(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.default_user = USER

    async def browse(url: str, client: httpx.AsyncClient) -> None:
        await follow(url, client, tamper_state=True)

    with pytest.raises(OAuth2Error, match="state"):
        await loopback_flow(server, client_tls, tmp_path / "rt", browse)
    assert server.token_requests == []  # the code was never exchanged
    assert not (tmp_path / "rt").exists()


async def test_loopback_flow_declined(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    async def browse(url: str, client: httpx.AsyncClient) -> None:
        page = await follow(url, client)  # nobody signed in: error=access_denied
        assert "did not complete" in page.text

    with pytest.raises(OAuth2Error, match="access_denied"):
        await loopback_flow(server, client_tls, tmp_path / "rt", browse)


async def test_loopback_flow_ignores_oversized_requests(
    server: AuthServer, client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    server.default_user = USER

    async def browse(url: str, client: httpx.AsyncClient) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        huge = await client.get(query["redirect_uri"], headers={"X-Fill": "x" * 20_000})
        assert huge.status_code == 404
        await follow(url, client)

    await loopback_flow(server, client_tls, tmp_path / "rt", browse)
    assert saved_token(tmp_path / "rt")


async def test_loopback_flow_gives_up(client_tls: ssl.SSLContext, tmp_path: Path) -> None:
    with pytest.raises(OAuth2Error, match=r"no sign-in arrived within 0\.3 s"):
        await run_loopback_flow(
            authorize_url="https://login.example.com/authorize",
            token_url="https://login.example.com/token",
            client_id=CLIENT_ID,
            ssl_context=client_tls,
            refresh_token_file=tmp_path / "rt",
            output=lambda line: None,
            give_up_after=0.3,
        )
    assert os.listdir(tmp_path) == []
