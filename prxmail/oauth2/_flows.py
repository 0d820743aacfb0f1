"""The ``prxmail auth`` flows: getting the first refresh token, as library functions.

Two flows, both ending with the refresh token written to a file (mode 0600,
atomically, see :func:`~prxmail.oauth2.write_secret_file`):

* :func:`run_device_flow` -- the device authorization grant (RFC 8628): ask the device
  endpoint for a code, print the verification URL and the code, then poll the token
  endpoint at the ``interval`` it asked for, slowing down by 5 s on ``slow_down``
  (§3.5), until the user approves, declines (``access_denied``) or the code expires.
  Works over SSH and on headless machines.
* :func:`run_loopback_flow` -- the authorization code grant with PKCE (RFC 7636, S256)
  and a loopback redirect (RFC 8252 §7.3): listen on 127.0.0.1 on a random port, print
  the authorization URL for the user's browser, and wait for the one redirect that
  carries the code and our ``state``. Requests are read up to
  :data:`MAX_REDIRECT_REQUEST_BYTES`; connections that are not the redirect (a
  browser's favicon or preconnect) are answered 404 and counted against
  :data:`MAX_REDIRECT_CONNECTIONS`; a redirect with a wrong ``state`` ends the flow
  with an error (it did not come from our authorization request).

The ``output`` callable receives each line to show the user, so the CLI prints and
tests capture. Neither flow ever shows a token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from prxmail._redact import Redactor
from prxmail.oauth2._errors import OAuth2Error, TokenEndpointError
from prxmail.oauth2._files import SECRET_FILE_MODE, write_secret_file
from prxmail.oauth2._http import (
    TokenResponse,
    check_endpoint_url,
    endpoint_error,
    parse_token_answer,
    post_form,
)
from prxmail.oauth2._secret import Revealable

__all__ = [
    "AUTHORIZATION_WAIT",
    "DEVICE_GRANT_TYPE",
    "MAX_REDIRECT_CONNECTIONS",
    "MAX_REDIRECT_REQUEST_BYTES",
    "Output",
    "pkce_pair",
    "run_device_flow",
    "run_loopback_flow",
]

Output = Callable[[str], None]

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default."
DEFAULT_POLL_INTERVAL = 5
# RFC 8628 §3.5: on slow_down "the interval MUST be increased by 5 seconds".
SLOW_DOWN_STEP = 5
# A device code without expires_in (it is REQUIRED, but): Microsoft's and Google's
# codes live 15 and 30 minutes; assume the shorter.
DEFAULT_DEVICE_CODE_LIFETIME = 900
# How long the loopback flow waits for the user to finish in the browser: signing in
# with a second factor takes minutes, not hours.
AUTHORIZATION_WAIT = 600.0
# The redirect is one GET with a code and state in the query (Microsoft's codes are
# about 1 KB) and a browser's usual headers; 16 KB holds that with room for cookies
# sent to 127.0.0.1 by other local apps.
MAX_REDIRECT_REQUEST_BYTES = 16 * 1024
# Connections the listener accepts while waiting (favicon, preconnects, reloads) before
# it gives up: a real browser needs a handful, anything more is not a browser.
MAX_REDIRECT_CONNECTIONS = 32
# How long one browser connection may take to send its request.
REDIRECT_READ_TIMEOUT = 10.0
# PKCE code verifier: 32 random bytes, 43 characters of base64url (RFC 7636 §4.1
# allows 43..128 and recommends 32 octets).
VERIFIER_BYTES = 32


def _client_form(
    client_id: str, client_secret: Revealable | None
) -> tuple[dict[str, str], list[str]]:
    form = {"client_id": client_id}
    hidden: list[str] = []
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
        hidden.append(client_secret.reveal())
    return form, hidden


def _save(tokens: TokenResponse, refresh_token_file: Path, hint: str) -> None:
    if tokens.refresh_token is None:
        raise OAuth2Error("the provider issued no refresh token", hint=hint)
    write_secret_file(refresh_token_file, tokens.refresh_token.reveal(), mode=SECRET_FILE_MODE)


async def run_device_flow(
    *,
    device_url: str,
    token_url: str,
    client_id: str,
    ssl_context: ssl.SSLContext,
    refresh_token_file: Path,
    client_secret: Revealable | None = None,
    scope: str | None = None,
    output: Output = print,
) -> TokenResponse:
    """Run the device authorization grant (RFC 8628) and save the refresh token.

    Args:
        device_url: The device authorization endpoint.
        token_url: The token endpoint.
        client_id: The OAuth client id (a public client needs no secret).
        ssl_context: Verifies both endpoints' certificates.
        refresh_token_file: Where the refresh token is written (mode 0600, atomically).
        client_secret: For confidential clients (Google's device flow wants one).
        scope: Space-separated scopes; include ``offline_access`` for Microsoft.
        output: Receives the lines to show the user.

    Returns:
        The tokens of the approved grant (the access token can be used at once).

    Raises:
        OAuth2Error: the user declined, the code expired, no refresh token was issued.
        TokenEndpointError: an endpoint refused or could not be reached.
        ConfigError: an endpoint URL is not https (or loopback http).
        OSError: the refresh-token file could not be written.
    """
    check_endpoint_url(device_url, key="device authorization endpoint")
    check_endpoint_url(token_url)
    form, hidden = _client_form(client_id, client_secret)
    if scope:
        form["scope"] = scope
    status, answer = await post_form(device_url, form, ssl_context=ssl_context, secrets=hidden)
    if status != 200 or "error" in answer:
        raise endpoint_error(device_url, status, answer, Redactor(hidden))
    device_code = answer.get("device_code")
    user_code = answer.get("user_code")
    # Google's endpoint says verification_url; RFC 8628 says verification_uri.
    uri = answer.get("verification_uri") or answer.get("verification_url")
    if not (isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)):
        raise TokenEndpointError(
            f"the device authorization endpoint {device_url} answered without "
            "device_code, user_code and verification_uri",
            status=status,
            hint="check the device authorization endpoint URL",
        )
    interval = _positive_int(answer.get("interval"), DEFAULT_POLL_INTERVAL)
    lifetime = _positive_int(answer.get("expires_in"), DEFAULT_DEVICE_CODE_LIFETIME)
    output(f"To sign in, open {uri} in a browser and enter the code {user_code}")
    complete = answer.get("verification_uri_complete")
    if isinstance(complete, str):
        output(f"(or open {complete} directly)")
    output("Waiting for the sign-in to complete...")
    hidden = [*hidden, device_code]
    poll = {**form, "grant_type": DEVICE_GRANT_TYPE, "device_code": device_code}
    poll.pop("scope", None)
    deadline = trio.current_time() + lifetime
    while True:
        await trio.sleep(interval)
        if trio.current_time() >= deadline:
            raise OAuth2Error(
                "the device code expired before the sign-in was completed",
                hint="run `prxmail auth` again and finish the sign-in in time",
            )
        status, answer = await post_form(token_url, poll, ssl_context=ssl_context, secrets=hidden)
        error = answer.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        if error == "access_denied":
            raise OAuth2Error(
                "the sign-in was declined", hint="run `prxmail auth` again and consent"
            )
        if error == "expired_token":
            raise OAuth2Error(
                "the device code expired before the sign-in was completed",
                hint="run `prxmail auth` again and finish the sign-in in time",
            )
        tokens = parse_token_answer(token_url, status, answer, Redactor(hidden))
        await trio.to_thread.run_sync(
            _save,
            tokens,
            refresh_token_file,
            "ask for offline access (Microsoft: add the offline_access scope)",
        )
        output(f"Signed in; the refresh token was saved to {refresh_token_file}")
        return tokens


def _positive_int(value: object, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)  # Microsoft's v1 endpoints send numbers as strings
    return default


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636 §4.1-4.2).

    Returns:
        ``(verifier, challenge)``, both base64url without padding.
    """
    verifier = secrets.token_urlsafe(VERIFIER_BYTES)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


_PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>prxmail</title></head>"
    "<body><p>{text}</p></body></html>"
)


async def _respond(stream: trio.SocketStream, status: str, text: str) -> None:
    body = _PAGE.format(text=text).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
    ).encode()
    await stream.send_all(head + body)


async def _read_request_target(stream: trio.SocketStream) -> str | None:
    """The request target of one GET, or None for anything else / too large / too slow."""
    data = bytearray()
    with trio.move_on_after(REDIRECT_READ_TIMEOUT):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(MAX_REDIRECT_REQUEST_BYTES)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_REDIRECT_REQUEST_BYTES:
                return None
    if b"\r\n\r\n" not in data:
        return None
    request_line = bytes(data).split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/"):
        return None
    return parts[1]


async def run_loopback_flow(
    *,
    authorize_url: str,
    token_url: str,
    client_id: str,
    ssl_context: ssl.SSLContext,
    refresh_token_file: Path,
    client_secret: Revealable | None = None,
    scope: str | None = None,
    extra_params: Mapping[str, str] | None = None,
    output: Output = print,
    give_up_after: float = AUTHORIZATION_WAIT,
) -> TokenResponse:
    """Run the authorization code flow with PKCE and a loopback redirect; save the token.

    Args:
        authorize_url: The authorization endpoint (opened in the user's browser).
        token_url: The token endpoint.
        client_id: The OAuth client id.
        ssl_context: Verifies the token endpoint's certificate.
        refresh_token_file: Where the refresh token is written (mode 0600, atomically).
        client_secret: For clients that have one (Google's "desktop app" clients).
        scope: Space-separated scopes.
        extra_params: More authorization request parameters, e.g. Google's
            ``access_type=offline`` and ``prompt=consent`` or a ``login_hint``.
        output: Receives the lines to show the user (the URL to open among them).
        give_up_after: Seconds to wait for the browser's redirect.

    Returns:
        The tokens.

    Raises:
        OAuth2Error: declined, a wrong ``state``, no redirect in time, too many
            stray connections, or no refresh token issued.
        TokenEndpointError: the code exchange was refused or failed.
        ConfigError: an endpoint URL is not https (or loopback http).
        OSError: no loopback port, or the refresh-token file could not be written.
    """
    check_endpoint_url(authorize_url, key="authorization endpoint")
    check_endpoint_url(token_url)
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    redirect_uri = f"http://127.0.0.1:{port}/"
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **({"scope": scope} if scope else {}),
        **(extra_params or {}),
    }
    sep = "&" if urllib.parse.urlsplit(authorize_url).query else "?"
    url = authorize_url + sep + urllib.parse.urlencode(params)
    output("Open this URL in a browser on this machine and sign in:")
    output(url)
    callback: dict[str, str] = {}
    arrived = trio.Event()

    async def handle(stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        async with stream:
            target = await _read_request_target(stream)
            split = urllib.parse.urlsplit(target or "")
            if target is None or split.path != "/" or callback:
                await _respond(stream, "404 Not Found", "Not found.")
                return
            query = dict(urllib.parse.parse_qsl(split.query))
            callback.update(query or {"error": "invalid_request"})
            arrived.set()
            if query.get("code"):
                text = "Signed in. You can close this window and return to prxmail."
            else:
                text = "The sign-in did not complete. Return to prxmail for details."
            await _respond(stream, "200 OK", text)
            nursery.cancel_scope.cancel()

    with trio.move_on_after(give_up_after) as waited:
        async with listener, trio.open_nursery() as nursery:
            for _ in range(MAX_REDIRECT_CONNECTIONS):
                stream = await listener.accept()
                nursery.start_soon(handle, stream, nursery)
            # Give the connections already accepted their chance, then stop.
            with trio.move_on_after(REDIRECT_READ_TIMEOUT):
                await arrived.wait()
            nursery.cancel_scope.cancel()
    if not callback:
        if waited.cancelled_caught:
            raise OAuth2Error(
                f"no sign-in arrived within {give_up_after:g} s",
                hint="open the URL printed above in a browser on this machine",
            )
        raise OAuth2Error(
            f"{MAX_REDIRECT_CONNECTIONS} connections to the redirect listener and none "
            "was the sign-in",
            hint="run `prxmail auth` again",
        )
    if not secrets.compare_digest(callback.get("state", ""), state):
        raise OAuth2Error(
            "the redirect did not carry this sign-in's state (it came from elsewhere)",
            hint="run `prxmail auth` again and use the URL it prints",
        )
    if "code" not in callback:
        error = callback.get("error", "no code")
        description = callback.get("error_description", "")
        shown = f" ({' '.join(description.split())[:200]})" if description else ""
        raise OAuth2Error(
            f"the sign-in was not completed: {error[:64]}{shown}",
            hint="run `prxmail auth` again and consent" if error == "access_denied" else "",
            code=error[:64],
        )
    form, hidden = _client_form(client_id, client_secret)
    code = callback["code"]
    form |= {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    hidden += [code, verifier]
    status, answer = await post_form(token_url, form, ssl_context=ssl_context, secrets=hidden)
    tokens = parse_token_answer(token_url, status, answer, Redactor(hidden))
    await trio.to_thread.run_sync(
        _save,
        tokens,
        refresh_token_file,
        "ask for offline access (Google: access_type=offline; Microsoft: offline_access)",
    )
    output(f"Signed in; the refresh token was saved to {refresh_token_file}")
    return tokens
