"""Token sources: one per account, shared by the IMAP watcher, the SMTP sender and doctor.

Theory of operation
-------------------
A :class:`TokenSource` hands out access tokens. ``await source.token()`` returns the
cached token while it has more than a margin of its lifetime left, and fetches a new
one otherwise. Fetches are coalesced: the first task that needs a new token makes
the request *itself* (no background task); every other task that asks meanwhile waits
on a ``trio.Event`` for that one result, success or error. If the fetching task is
cancelled, the waiters wake up and the next of them fetches.

When a server refuses a token, the caller passes it back to
:meth:`TokenSource.refresh_after_rejection`: that token is dropped and a new one
fetched (unless another task already replaced it). :func:`authenticate_with` wraps
the whole "log in; refused? refresh once and try again; refused again? fail" dance for
the connections.

:class:`EndpointTokenSource` talks to a token endpoint with the ``refresh_token``
(RFC 6749 §6) or ``client_credentials`` (§4.4) grant. A refresh token may rotate: the
new one is written durably before the new access token is handed out, to the
refresh-token file when the token came from one (keeping its mode), or else to a file
in the state directory, which wins over the configured token on the next start --
unless the configured token changed since (the user ran ``prxmail auth`` and pasted a
new one), which the state file notices by the fingerprint of the token it replaced.

:class:`CommandTokenSource` runs ``oauth2_token_command`` and takes what it prints.

Timing uses ``trio.current_time()``, so tests drive expiry with an autojump clock.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import attrs
import trio

from prxmail._redact import Redactor
from prxmail.errors import AuthenticationError, ConfigError
from prxmail.oauth2._errors import OAuth2Error, TokenCommandError, TokenEndpointError
from prxmail.oauth2._files import SECRET_FILE_MODE, read_secret_file, write_secret_file
from prxmail.oauth2._secret import Revealable, Secret
from prxmail.oauth2._url import check_endpoint_url

if TYPE_CHECKING:
    from prxmail.oauth2._http import TokenResponse

__all__ = [
    "COMMAND_OUTPUT_LIMIT",
    "REFRESH_MARGIN",
    "TOKEN_REQUEST_TIMEOUT",
    "AccessToken",
    "CommandTokenSource",
    "EndpointTokenSource",
    "Grant",
    "TokenSource",
    "authenticate_with",
    "safe_command_env",
]

Grant = Literal["refresh_token", "client_credentials"]

# Refresh this long before a token's expiry, so a login that starts just before it
# does not carry a token that dies on the way (a slow TLS handshake, Dovecot's auth
# penalty). Capped at a fifth of the lifetime for short-lived tokens (tests, some
# providers issue five-minute tokens), so those are not refreshed on every use.
REFRESH_MARGIN = 120.0
REFRESH_MARGIN_FRACTION = 0.2
# A token endpoint that says nothing about the lifetime (expires_in is only
# RECOMMENDED by RFC 6749 §5.1): assume the common one hour, and a server's refusal
# triggers a refresh sooner anyway.
ASSUMED_LIFETIME = 3600.0
# Bound on one token request or one run of the token command. Token endpoints answer
# in well under a second; this only catches a hung endpoint or helper so the caller's
# retry logic gets control back. (Callers may still apply a tighter trio.fail_after.)
TOKEN_REQUEST_TIMEOUT = 30.0
# A token helper prints one token (Microsoft's are about 2.5 KB, JWTs rarely over 8 KB);
# more than this is not a token. Stderr is kept to the same bound for the error text.
COMMAND_OUTPUT_LIMIT = 64 * 1024
# How long a token printed by oauth2_token_command is reused. The command does not say
# when it expires; helpers cache tokens themselves, so asking again is cheap, but
# once per login would run a process per reconnect.
COMMAND_TOKEN_REUSE = 300.0
# Environment variables a token helper may need (its own config, a keyring or GPG
# agent, the CA store, the locale); nothing else of prxmail's environment, which may
# hold passwords in *_PASSWORD / *_SECRET variables, is passed on.
COMMAND_ENV_KEEP = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "DBUS_SESSION_BUS_ADDRESS",
    "GNUPGHOME",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
STATE_FILE_VERSION = 1


@attrs.frozen(repr=False)
class AccessToken:
    """An access token with the time (``trio.current_time()``) it expires.

    Attributes:
        expires_at: When the token stops being valid, on Trio's clock.
    """

    _value: str
    expires_at: float

    def reveal(self) -> str:
        """Return the token. Call it only where it goes on the wire (SASL)."""
        return self._value

    def __repr__(self) -> str:
        return f"AccessToken('********', expires_at={self.expires_at:.1f})"

    __str__ = __repr__


class TokenSource(Protocol):
    """What the connections and doctor need from a source of access tokens."""

    async def token(self) -> AccessToken:
        """Return a token valid for at least the refresh margin."""
        ...

    async def refresh_after_rejection(self, rejected: AccessToken) -> AccessToken:
        """Drop ``rejected`` (a server refused it) and return a fresh token."""
        ...


def _margin(lifetime: float) -> float:
    return min(REFRESH_MARGIN, lifetime * REFRESH_MARGIN_FRACTION)


@attrs.define
class _Fetch:
    """One token request in flight, awaited by every task that wants its result."""

    done: trio.Event = attrs.field(factory=trio.Event)
    result: AccessToken | None = None
    error: BaseException | None = None


class _CachingSource:
    """The caching and coalescing shared by both sources; subclasses implement _fetch."""

    def __init__(self) -> None:
        self._current: AccessToken | None = None
        self._refresh_at = -math.inf
        self._inflight: _Fetch | None = None
        self._fetches = 0

    @property
    def fetches(self) -> int:
        """How many token requests (or command runs) were made: for doctor and tests."""
        return self._fetches

    async def _fetch(self) -> tuple[str, float]:
        """Get a new token: ``(value, lifetime in seconds)``."""
        raise NotImplementedError

    async def token(self) -> AccessToken:
        """Return an access token with more than the refresh margin left.

        Returns:
            The cached token, or a new one (one request for all concurrent callers).

        Raises:
            OAuth2Error: no token could be obtained (the message says why and what
                to do; ``transient`` says whether a retry may help).
        """
        await trio.lowlevel.checkpoint()
        while True:
            current = self._current
            if current is not None and trio.current_time() < self._refresh_at:
                return current
            await self._coalesced_fetch()

    async def refresh_after_rejection(self, rejected: AccessToken) -> AccessToken:
        """Forget a token a server refused and return a new one.

        If another task already replaced ``rejected``, its replacement is returned
        without a new request.

        Args:
            rejected: The token the server refused.

        Returns:
            A new token.

        Raises:
            OAuth2Error: as for :meth:`token`.
        """
        await self.invalidate(rejected)
        return await self.token()

    async def invalidate(self, rejected: AccessToken) -> None:
        """Forget ``rejected`` so the next :meth:`token` fetches a new one.

        Args:
            rejected: The token a server refused; a newer current token is kept.
        """
        await trio.lowlevel.checkpoint()
        if self._current is rejected:
            self._current = None

    async def _coalesced_fetch(self) -> None:
        inflight = self._inflight
        if inflight is not None:
            await inflight.done.wait()
            if inflight.error is not None:
                raise inflight.error
            return  # success, or the fetching task was cancelled: the caller loops
        fetch = self._inflight = _Fetch()
        try:
            self._fetches += 1
            started = trio.current_time()
            value, lifetime = await self._fetch()
            token = AccessToken(value, started + lifetime)
            self._current = token
            self._refresh_at = token.expires_at - _margin(lifetime)
            fetch.result = token
        except trio.Cancelled:
            raise  # waiters see neither result nor error and try themselves
        except OAuth2Error as exc:
            fetch.error = exc
            raise
        finally:
            self._inflight = None
            fetch.done.set()


class EndpointTokenSource(_CachingSource):
    """Access tokens from an OAuth 2 token endpoint, cached and refreshed in time.

    Args:
        token_url: The token endpoint (https; http only for loopback hosts).
        client_id: The OAuth client (application) id.
        ssl_context: Verifies the endpoint's certificate (``tls_ca_file`` or the
            system trust store, as for the mail connections).
        grant: ``"refresh_token"`` (a user's delegated access) or
            ``"client_credentials"`` (an app's own access; needs a client secret).
        client_secret: Sent in the body (``client_secret_post``); public clients
            have none.
        refresh_token: The configured refresh token (from the config file or the
            environment). Rotations are saved under ``state_dir``.
        refresh_token_file: A file holding the refresh token instead; it is re-read
            before every refresh (so a ``prxmail auth`` run is picked up without a
            restart) and rotated tokens are written back to it.
        scope: Space-separated scopes, sent when given.
        state_dir: Where a rotated refresh token that came from ``refresh_token`` is
            kept; required with ``refresh_token``.
        account: Names the account in the state file name (its login address), so
            several accounts can share a state directory.
        request_timeout: Bound on one token request, seconds.

    Raises:
        ConfigError: a combination that cannot work (see the messages).
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        ssl_context: ssl.SSLContext,
        grant: Grant = "refresh_token",
        client_secret: Revealable | None = None,
        refresh_token: Revealable | None = None,
        refresh_token_file: Path | None = None,
        scope: str | None = None,
        state_dir: Path | None = None,
        account: str = "",
        request_timeout: float = TOKEN_REQUEST_TIMEOUT,
    ) -> None:
        super().__init__()
        check_endpoint_url(token_url)
        problems = []
        if grant == "refresh_token":
            if (refresh_token is None) == (refresh_token_file is None):
                problems.append(
                    "the refresh_token grant needs exactly one of oauth2_refresh_token, "
                    "oauth2_refresh_token_env or oauth2_refresh_token_file"
                )
            if refresh_token is not None and state_dir is None:
                problems.append("a configured refresh token needs a state directory")
        else:
            if client_secret is None:
                problems.append("the client_credentials grant needs oauth2_client_secret")
            if refresh_token is not None or refresh_token_file is not None:
                problems.append("the client_credentials grant takes no refresh token")
        if problems:
            raise ConfigError(problems)
        self._ssl_context = ssl_context
        self._token_url = token_url
        self._client_id = client_id
        self._grant = grant
        self._client_secret = client_secret
        self._configured_refresh = refresh_token
        self._refresh_file = refresh_token_file
        self._scope = scope
        self._timeout = request_timeout
        self._state_file: Path | None = None
        if refresh_token is not None and state_dir is not None:
            key = hashlib.sha256(f"{token_url}\0{client_id}\0{account}".encode()).hexdigest()
            self._state_file = state_dir / f"oauth2-{key[:16]}.json"
        # The refresh token in use: from the state file, the config, or the file.
        self._refresh: Secret | None = None

    def __repr__(self) -> str:
        return f"<EndpointTokenSource {self._grant} {self._token_url} client_id={self._client_id}>"

    @property
    def state_file(self) -> Path | None:
        """Where rotated refresh tokens of a configured token go (``None`` with a file)."""
        return self._state_file

    def _current_refresh_token(self) -> Secret:
        if self._refresh_file is not None:
            try:
                text = read_secret_file(self._refresh_file)
            except (OSError, ValueError) as exc:
                raise OAuth2Error(
                    f"cannot read oauth2_refresh_token_file {self._refresh_file}: {exc}",
                    hint="run `prxmail auth -c FILE` to create it",
                ) from None
            if not text:
                raise OAuth2Error(
                    f"oauth2_refresh_token_file {self._refresh_file} is empty",
                    hint="run `prxmail auth -c FILE` to fill it",
                )
            return Secret(text)
        if self._refresh is not None:
            return self._refresh
        assert self._configured_refresh is not None
        configured = self._configured_refresh.reveal()
        stored = self._load_state(configured)
        self._refresh = Secret(stored if stored is not None else configured)
        return self._refresh

    def _load_state(self, configured: str) -> str | None:
        if self._state_file is None:
            return None
        try:
            state = json.loads(read_secret_file(self._state_file))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise OAuth2Error(
                f"cannot read the saved refresh token {self._state_file}: {exc}",
                hint="remove the file to fall back to the configured refresh token",
            ) from None
        if (
            not isinstance(state, dict)
            or state.get("version") != STATE_FILE_VERSION
            or not isinstance(state.get("refresh_token"), str)
        ):
            raise OAuth2Error(
                f"the saved refresh token {self._state_file} is not in a known format",
                hint="remove the file to fall back to the configured refresh token",
            )
        if state.get("replaces") != _fingerprint(configured):
            return None  # the configured token changed since: the user's new one wins
        token: str = state["refresh_token"]
        return token

    def _save_rotated(self, new: Secret) -> None:
        try:
            if self._refresh_file is not None:
                write_secret_file(self._refresh_file, new.reveal())
            elif self._state_file is not None:
                assert self._configured_refresh is not None
                state = {
                    "version": STATE_FILE_VERSION,
                    "replaces": _fingerprint(self._configured_refresh.reveal()),
                    "refresh_token": new.reveal(),
                }
                self._state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_secret_file(self._state_file, json.dumps(state), mode=SECRET_FILE_MODE)
        except OSError as exc:
            where = self._refresh_file or self._state_file
            raise OAuth2Error(
                f"the provider rotated the refresh token but it could not be saved to "
                f"{where}: {exc.strerror or exc}",
                hint="fix the file's permissions or the disk; until then the new token "
                "lives only in memory and a restart needs `prxmail auth`",
            ) from None
        finally:
            self._refresh = new

    async def _fetch(self) -> tuple[str, float]:
        form: dict[str, str] = {"grant_type": self._grant, "client_id": self._client_id}
        secrets: list[str] = []
        refresh: Secret | None = None
        if self._grant == "refresh_token":
            refresh = await trio.to_thread.run_sync(self._current_refresh_token)
            form["refresh_token"] = refresh.reveal()
            secrets.append(refresh.reveal())
        if self._client_secret is not None:
            form["client_secret"] = self._client_secret.reveal()
            secrets.append(self._client_secret.reveal())
        if self._scope:
            form["scope"] = self._scope
        # The HTTP client (httpx) is loaded by the first token request, not by every
        # program that imports this module: a password account never pays for it.
        from prxmail.oauth2._http import request_token  # noqa: PLC0415

        try:
            with trio.fail_after(self._timeout):
                answer: TokenResponse = await request_token(
                    self._token_url, form, ssl_context=self._ssl_context, secrets=secrets
                )
        except trio.TooSlowError:
            raise TokenEndpointError(
                f"the token endpoint {self._token_url} did not answer within {self._timeout:g} s",
                hint="check the network path to it; retrying",
                transient=True,
            ) from None
        if (
            refresh is not None
            and answer.refresh_token is not None
            and answer.refresh_token.reveal() != refresh.reveal()
        ):
            new = answer.refresh_token
            await trio.to_thread.run_sync(self._save_rotated, new)
        lifetime = answer.expires_in if answer.expires_in is not None else ASSUMED_LIFETIME
        return answer.access_token.reveal(), lifetime


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def safe_command_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a token helper: :data:`COMMAND_ENV_KEEP` only.

    Args:
        environ: The environment to pick from; ``os.environ`` when ``None``.

    Returns:
        The kept variables.
    """
    source = os.environ if environ is None else environ
    return {k: source[k] for k in COMMAND_ENV_KEEP if k in source}


async def _read_bounded(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.receive_some(COMMAND_OUTPUT_LIMIT):
        room = COMMAND_OUTPUT_LIMIT + 1 - len(into)
        if room > 0:
            into += chunk[:room]
        # Keep draining past the bound so the helper never blocks on a full pipe.


class CommandTokenSource(_CachingSource):
    """Access tokens printed by a helper program (``oauth2_token_command``).

    The program runs without a shell, with stdin closed and only
    :data:`COMMAND_ENV_KEEP` of the environment; it must print the token (alone, on
    one line) and exit 0. The token is reused for :data:`COMMAND_TOKEN_REUSE` seconds
    or until a server refuses it.

    Args:
        argv: The program and its arguments.
        env: Its environment; :func:`safe_command_env` when ``None``.
        timeout: Bound on one run, seconds; a slower run is killed.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = TOKEN_REQUEST_TIMEOUT,
    ) -> None:
        super().__init__()
        if not argv or not argv[0]:
            raise ConfigError(["expected a program to run @ oauth2_token_command"])
        self._argv = list(argv)
        self._env = dict(safe_command_env() if env is None else env)
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<CommandTokenSource {self._argv[0]!r}>"

    async def _fetch(self) -> tuple[str, float]:
        name = self._argv[0]
        stdout, stderr = bytearray(), bytearray()
        try:
            process = await trio.lowlevel.open_process(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            raise TokenCommandError(
                f"cannot run oauth2_token_command {name!r}: {exc.strerror or exc}",
                hint="check the program path and that it is executable",
            ) from None
        try:
            with trio.move_on_after(self._timeout) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_bounded, process.stdout, stdout)
                    nursery.start_soon(_read_bounded, process.stderr, stderr)
                    await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            with trio.CancelScope(shield=True):
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
        if scope.cancelled_caught:
            raise TokenCommandError(
                f"oauth2_token_command {name!r} did not finish within {self._timeout:g} s "
                "and was killed",
                hint="check that it runs without waiting for input",
                transient=True,
            )
        text = stdout.decode("utf-8", "replace").strip()
        redact = Redactor([text] if text else [])
        err = " ".join(redact(stderr[:300].decode("utf-8", "replace")).split())
        if process.returncode != 0:
            raise TokenCommandError(
                f"oauth2_token_command {name!r} exited with status {process.returncode}"
                + (f": {err}" if err else ""),
                hint="run it by hand to see what it needs",
                transient=True,
            )
        if len(stdout) > COMMAND_OUTPUT_LIMIT:
            raise TokenCommandError(
                f"oauth2_token_command {name!r} printed more than {COMMAND_OUTPUT_LIMIT} "
                "bytes: not a token",
                hint="it must print only the access token",
            )
        if not text or any(c.isspace() or not c.isprintable() for c in text):
            raise TokenCommandError(
                f"oauth2_token_command {name!r} printed "
                + ("nothing" if not text else "more than one token-like word"),
                hint="it must print only the access token, on one line",
            )
        return text, COMMAND_TOKEN_REUSE


async def authenticate_with(
    source: TokenSource,
    login: Callable[[AccessToken], Awaitable[None]],
) -> AccessToken:
    """Log in with a token; if the server refuses it, refresh once and try again.

    Args:
        source: The account's token source.
        login: Logs in with the token, e.g.
            ``lambda t: imap.authenticate_xoauth2(user, t.reveal())``; raises
            :class:`~prxmail.errors.AuthenticationError` when refused.

    Returns:
        The token that was accepted.

    Raises:
        AuthenticationError: the fresh token was refused too (the server's error,
            unchanged), or :class:`OAuth2Error` when no token could be obtained.
    """
    token = await source.token()
    try:
        await login(token)
    except OAuth2Error:
        raise
    except AuthenticationError:
        token = await source.refresh_after_rejection(token)
        await login(token)
    return token
