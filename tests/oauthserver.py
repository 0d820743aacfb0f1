"""A small real OAuth 2 authorization server for the tests (standard library only).

Theory of operation
-------------------
``AuthServer`` is an HTTPS (or, for a few unit tests, plain HTTP) server on 127.0.0.1
in a thread of the test process, with an in-memory database of clients, refresh
tokens, access tokens, device codes and authorization codes. It implements what
prxmail and Dovecot talk to:

* ``POST /token`` (RFC 6749): the ``refresh_token``, ``client_credentials``,
  ``authorization_code`` (with PKCE S256, RFC 7636) and device-code (RFC 8628) grants;
  access tokens live :attr:`AuthServer.expires_in` seconds; with
  :attr:`AuthServer.rotate` every refresh issues a new refresh token and revokes the
  old one. Clients authenticate with ``client_secret_post``.
* ``POST /introspect`` (RFC 7662), for Dovecot's oauth2 passdb: ``token=...`` ->
  ``{"active": true, "username": ...}`` or ``{"active": false}``.
* ``POST /revoke`` (RFC 7009) and :meth:`AuthServer.revoke`.
* ``POST /device`` (RFC 8628 device authorization) with :meth:`AuthServer.approve_device`
  / :meth:`AuthServer.deny_device` playing the user; polling faster than the interval
  gets ``slow_down``.
* ``GET /authorize``: "logs in" the user named by ``login_hint`` (or
  :attr:`AuthServer.default_user`) at once and redirects to the loopback
  ``redirect_uri`` with a code and the state -- so a test's HTTP client can play the
  browser.

Failures are injected with :meth:`AuthServer.queue_response`: the next token requests
get exactly the given status and body. Every token request is recorded in
:attr:`AuthServer.token_requests` (grant type and form) for assertions.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import attrs

__all__ = ["AuthServer", "Client", "auth_server"]

HOST = "127.0.0.1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Request bodies the server reads at most: token and introspection forms are far
# smaller; a bigger one is a test bug.
MAX_BODY = 64 * 1024
# How long a device code and an authorization code stay valid (RFC 8628 suggests
# minutes); tests finish in seconds.
CODE_LIFETIME = 120
# Handshake and read bound per connection, so a stuck client cannot pin a thread.
SOCKET_TIMEOUT = 10.0


@attrs.define
class Client:
    """A registered OAuth client. ``app_user`` is the mailbox a client_credentials token
    may access (Microsoft's app-only access is granted per mailbox the same way)."""

    client_id: str
    secret: str | None = attrs.field(default=None, repr=False)
    app_user: str | None = None


@attrs.define
class _Grant:
    username: str
    client_id: str
    scope: str
    expires_at: float = float("inf")
    revoked: bool = False


@attrs.define
class _Device:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: int
    username: str | None = None
    denied: bool = False
    last_poll: float = 0.0


@attrs.define
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    username: str
    scope: str
    expires_at: float
    used: bool = False


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: AuthServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, not in the
        # accept loop, so one slow client cannot stall the others.
        request.settimeout(SOCKET_TIMEOUT)
        if self.owner.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.owner.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # an untrusting client hung up during the handshake
        with wrapped:
            super().finish_request(wrapped, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.owner.log.append(format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode())

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        body = self.rfile.read(length).decode()
        return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))

    def do_POST(self) -> None:
        owner = self.server.owner
        path = urllib.parse.urlsplit(self.path).path
        form = self._form()
        if path == "/token":
            status, body, ctype = owner._token(form)
            self._send(status, body, ctype)
        elif path == "/introspect":
            self._json(200, owner._introspect(form.get("token", "")))
        elif path == "/revoke":
            owner.revoke(form.get("token", ""))
            self._send(200, b"")
        elif path == "/device":
            status, obj = owner._device(form)
            self._json(status, obj)
        else:
            self._json(404, {"error": "not_found"})

    def do_GET(self) -> None:
        owner = self.server.owner
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/authorize":
            self._json(404, {"error": "not_found"})
            return
        query = dict(urllib.parse.parse_qsl(parts.query))
        status, location = owner._authorize(query)
        if location is None:
            self._send(status, b"bad authorization request", "text/plain")
            return
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class AuthServer:
    """The test authorization server; see the module docstring.

    Args:
        ssl_context: A server-side context (HTTPS); ``None`` serves plain HTTP.
        host: Loopback address to listen on.

    Attributes:
        expires_in: Lifetime of new access tokens, seconds.
        rotate: Issue a new refresh token on every refresh (revoking the old one).
        delay: Seconds every token request waits before it is answered (to hold
            concurrent requests open in coalescing tests).
        default_user: Who "logs in" at /authorize without a ``login_hint``.
        device_interval: The polling interval the device endpoint asks for.
        enforce_interval: Answer ``slow_down`` to polls faster than the interval
            (off for tests on a virtual clock, which the server cannot see).
        token_requests: ``(grant_type, form)`` of every token request, in order.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = HOST) -> None:
        self.ssl_context = ssl_context
        self.host = host
        self.expires_in = 300
        self.rotate = False
        self.delay = 0.0
        self.default_user: str | None = None
        self.device_interval = 1
        self.enforce_interval = True
        self.token_requests: list[tuple[str, dict[str, str]]] = []
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        self._refresh: dict[str, _Grant] = {}
        self._access: dict[str, _Grant] = {}
        self._devices: dict[str, _Device] = {}
        self._codes: dict[str, _Code] = {}
        self._queued: list[tuple[int, bytes, str]] = []
        self._httpd = _Server((host, 0), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL (``https://127.0.0.1:PORT``)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    token_url = property(lambda self: self.url + "/token")
    introspection_url = property(lambda self: self.url + "/introspect")
    revocation_url = property(lambda self: self.url + "/revoke")
    device_url = property(lambda self: self.url + "/device")
    authorize_url = property(lambda self: self.url + "/authorize")

    def start(self) -> AuthServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"oauth-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listener. Idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(SOCKET_TIMEOUT)
            self._thread = None
        self._httpd.server_close()

    # -- test controls ------------------------------------------------------------

    def register_client(
        self, client_id: str, secret: str | None = None, *, app_user: str | None = None
    ) -> Client:
        """Register a client (public when ``secret`` is ``None``)."""
        client = Client(client_id, secret, app_user)
        with self._lock:
            self._clients[client_id] = client
        return client

    def issue_refresh_token(self, username: str, client_id: str, scope: str = "mail") -> str:
        """Issue a refresh token as if the user had consented already."""
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._refresh[token] = _Grant(username, client_id, scope)
        return token

    def issue_access_token(self, username: str, client_id: str = "direct") -> str:
        """Issue an access token directly (for tests that need no client flow)."""
        with self._lock:
            return self._new_access(_Grant(username, client_id, "mail"))

    def revoke(self, token: str) -> None:
        """Revoke a refresh or access token (RFC 7009); unknown tokens are ignored."""
        with self._lock:
            for table in (self._refresh, self._access):
                if token in table:
                    table[token].revoked = True

    def queue_response(
        self, status: int, body: bytes | dict[str, Any], content_type: str = "application/json"
    ) -> None:
        """Answer the next token request with exactly this (queued in order)."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        with self._lock:
            self._queued.append((status, raw, content_type))

    def approve_device(self, user_code: str, username: str) -> None:
        """Play the user who entered ``user_code`` and consented."""
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.username = username
                    return
        raise KeyError(user_code)

    def deny_device(self, user_code: str) -> None:
        """Play the user who entered ``user_code`` and declined."""
        with self._lock:
            for device in self._devices.values():
                if device.user_code == user_code:
                    device.denied = True
                    return
        raise KeyError(user_code)

    def refresh_token_valid(self, token: str) -> bool:
        """True while ``token`` is a known, unrevoked refresh token."""
        with self._lock:
            grant = self._refresh.get(token)
            return grant is not None and not grant.revoked

    def grants(self, grant_type: str) -> int:
        """How many token requests with this grant type came in."""
        with self._lock:
            return sum(1 for g, _ in self.token_requests if g == grant_type)

    # -- endpoints (called from request threads) ---------------------------------

    def _new_access(self, grant: _Grant) -> str:
        token = "at-" + secrets.token_urlsafe(24)
        self._access[token] = _Grant(
            grant.username, grant.client_id, grant.scope, time.monotonic() + self.expires_in
        )
        return token

    def _check_client(self, form: dict[str, str]) -> Client | None:
        client = self._clients.get(form.get("client_id", ""))
        if client is None:
            return None
        if client.secret is not None and form.get("client_secret") != client.secret:
            return None
        return client

    def _token(self, form: dict[str, str]) -> tuple[int, bytes, str]:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            grant_type = form.get("grant_type", "")
            self.token_requests.append((grant_type, dict(form)))
            if self._queued:
                return self._queued.pop(0)
            status, obj = self._token_locked(grant_type, form)
        return status, json.dumps(obj).encode(), "application/json"

    def _token_locked(self, grant_type: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        client = self._check_client(form)
        if client is None:
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        answer: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.expires_in}
        if grant_type == "refresh_token":
            old = form.get("refresh_token", "")
            grant = self._refresh.get(old)
            if grant is None or grant.revoked or grant.client_id != client.client_id:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "refresh token expired or revoked",
                }
            if self.rotate:
                grant.revoked = True
                new = "rt-" + secrets.token_urlsafe(24)
                self._refresh[new] = _Grant(grant.username, grant.client_id, grant.scope)
                answer["refresh_token"] = new
            answer["access_token"] = self._new_access(grant)
            return 200, answer
        if grant_type == "client_credentials":
            if client.secret is None or client.app_user is None:
                return 400, {"error": "unauthorized_client"}
            answer["access_token"] = self._new_access(
                _Grant(client.app_user, client.client_id, form.get("scope", ""))
            )
            return 200, answer
        if grant_type == DEVICE_GRANT:
            device = self._devices.get(form.get("device_code", ""))
            if device is None or device.client_id != client.client_id:
                return 400, {"error": "invalid_grant"}
            now = time.monotonic()
            if now > device.expires_at:
                return 400, {"error": "expired_token"}
            if device.denied:
                return 400, {"error": "access_denied"}
            # RFC 8628 §3.5: polling faster than the interval earns slow_down (with
            # 10% slack for timer jitter).
            too_fast = self.enforce_interval and now - device.last_poll < device.interval * 0.9
            device.last_poll = now
            if too_fast:
                device.interval += 5
                return 400, {"error": "slow_down"}
            if device.username is None:
                return 400, {"error": "authorization_pending"}
            del self._devices[device.device_code]
            return 200, self._issue_pair(device.username, client.client_id, device.scope)
        if grant_type == "authorization_code":
            code = self._codes.get(form.get("code", ""))
            if code is None or code.used or time.monotonic() > code.expires_at:
                return 400, {"error": "invalid_grant"}
            code.used = True
            if code.client_id != client.client_id or code.redirect_uri != form.get("redirect_uri"):
                return 400, {"error": "invalid_grant", "error_description": "mismatch"}
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge:
                return 400, {"error": "invalid_grant", "error_description": "PKCE failed"}
            return 200, self._issue_pair(code.username, client.client_id, code.scope)
        return 400, {"error": "unsupported_grant_type"}

    def _issue_pair(self, username: str, client_id: str, scope: str) -> dict[str, Any]:
        refresh = "rt-" + secrets.token_urlsafe(24)
        grant = _Grant(username, client_id, scope)
        self._refresh[refresh] = grant
        return {
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "access_token": self._new_access(grant),
            "refresh_token": refresh,
            "scope": scope,
        }

    def _introspect(self, token: str) -> dict[str, Any]:
        with self._lock:
            grant = self._access.get(token)
            if grant is None or grant.revoked or time.monotonic() >= grant.expires_at:
                return {"active": False}
            return {"active": True, "username": grant.username, "scope": grant.scope}

    def _device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            client = self._check_client(form)
            if client is None:
                return 401, {"error": "invalid_client"}
            device = _Device(
                device_code="dc-" + secrets.token_urlsafe(16),
                user_code=f"{secrets.randbelow(10**8):08d}",
                client_id=client.client_id,
                scope=form.get("scope", ""),
                expires_at=time.monotonic() + CODE_LIFETIME,
                interval=self.device_interval,
            )
            self._devices[device.device_code] = device
            return 200, {
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": self.url + "/device-login",
                "expires_in": CODE_LIFETIME,
                "interval": device.interval,
            }

    def _authorize(self, query: dict[str, str]) -> tuple[int, str | None]:
        with self._lock:
            client = self._clients.get(query.get("client_id", ""))
            redirect = query.get("redirect_uri", "")
            host = urllib.parse.urlsplit(redirect).hostname
            if client is None or host not in ("127.0.0.1", "localhost", "::1"):
                return 400, None
            params: dict[str, str] = {"state": query.get("state", "")}
            if (
                query.get("response_type") != "code"
                or query.get("code_challenge_method") != "S256"
                or not query.get("code_challenge")
            ):
                params["error"] = "invalid_request"
            else:
                username = query.get("login_hint") or self.default_user
                if username is None:
                    params["error"] = "access_denied"
                else:
                    code = "ac-" + secrets.token_urlsafe(16)
                    self._codes[code] = _Code(
                        client.client_id,
                        redirect,
                        query["code_challenge"],
                        username,
                        query.get("scope", ""),
                        time.monotonic() + CODE_LIFETIME,
                    )
                    params["code"] = code
            sep = "&" if "?" in redirect else "?"
            return 302, redirect + sep + urllib.parse.urlencode(params)


def server_ssl_context(cert: Any) -> ssl.SSLContext:
    """A server context for a trustme ``LeafCert``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@contextlib.contextmanager
def auth_server(ssl_context: ssl.SSLContext | None = None) -> Iterator[AuthServer]:
    """Run an :class:`AuthServer` for a ``with`` block."""
    server = AuthServer(ssl_context).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A free loopback port (for tests that need a port nothing listens on)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_tls() -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    """A throwaway CA: ``(server context, client context trusting it, CA PEM path)``."""
    import tempfile

    import trustme

    ca = trustme.CA(organization_name="prxmail oauth test CA")
    cert = ca.issue_cert(HOST, "localhost")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client)
    fd, path = tempfile.mkstemp(prefix="prxmail-oauth-ca-", suffix=".pem")
    with open(fd, "wb") as f:
        f.write(ca.cert_pem.bytes())
    return server_ssl_context(cert), client, path
