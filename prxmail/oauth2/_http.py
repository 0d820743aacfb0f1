"""The token-endpoint client: form-encoded POSTs (RFC 6749) over httpx on Trio.

Theory of operation: every request is one ``POST`` of ``application/x-www-form-urlencoded``
parameters to an endpoint (token, device authorization), answered with a JSON object.
httpx runs on Trio through httpcore's Trio backend; a fresh client per request is
cheap next to how rarely tokens are fetched (about once an hour per account) and means
no connection pool outlives its nursery. Certificates are verified with the
``ssl.SSLContext`` the caller passes (the same one the mail connections use); plain
``http`` is accepted only for loopback hosts. Proxies and ``.netrc`` from the
environment are ignored (``trust_env=False``): a token request carries the client
secret and must go exactly where the configuration says.

Responses are read up to :data:`MAX_RESPONSE_BYTES`. Every text taken from a response
or an exception passes through a :class:`~prxmail._redact.Redactor` built from the
secrets of the request before it reaches an error message.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence

import attrs
import httpx

from prxmail._redact import Redactor
from prxmail.oauth2._errors import TokenEndpointError
from prxmail.oauth2._secret import Secret
from prxmail.oauth2._url import check_endpoint_url

__all__ = [
    "MAX_RESPONSE_BYTES",
    "TokenResponse",
    "check_endpoint_url",
    "endpoint_error",
    "parse_token_answer",
    "post_form",
    "request_token",
]

# A token response is a few KB at most (Microsoft's, with an id_token, about 5 KB);
# the bound keeps a wrong or hostile endpoint from filling memory.
MAX_RESPONSE_BYTES = 256 * 1024
# How much of a non-JSON body an error quotes: enough to recognise an HTML error page
# or a proxy's message, short enough for a log line.
BODY_EXCERPT_CHARS = 120

# What each RFC 6749 §5.2 error code means for the user, and whether waiting helps.
_ERROR_HINTS: Mapping[str, tuple[str, bool]] = {
    "invalid_grant": (
        "the refresh token (or code) expired or was revoked: run `prxmail auth -c FILE` "
        "to get a new one",
        False,
    ),
    "invalid_client": (
        "the client id or client secret is wrong (or the app registration does not "
        "allow this kind of client): check oauth2_client_id and oauth2_client_secret",
        False,
    ),
    "invalid_scope": (
        "the provider refused the scope: check oauth2_scope against what the app "
        "registration is allowed to ask for",
        False,
    ),
    "unauthorized_client": (
        "this client may not use this grant: enable it in the app registration "
        "(e.g. 'allow public client flows' for the device flow) or check oauth2_grant",
        False,
    ),
    "unsupported_grant_type": (
        "the endpoint does not support this grant: check oauth2_grant and oauth2_token_url",
        False,
    ),
    "invalid_request": (
        "the endpoint refused the request as malformed: check oauth2_token_url and "
        "the oauth2_* settings",
        False,
    ),
    "temporarily_unavailable": ("the provider is temporarily unavailable; retrying", True),
    "server_error": ("the provider had an internal error; retrying", True),
}


@attrs.frozen
class TokenResponse:
    """A successful token-endpoint answer (RFC 6749 §5.1).

    Attributes:
        access_token: The bearer token.
        expires_in: Its lifetime in seconds, when the endpoint said.
        refresh_token: A (possibly rotated) refresh token, when one was issued.
        scope: The granted scope, when the endpoint said.
    """

    access_token: Secret
    expires_in: float | None
    refresh_token: Secret | None = None
    scope: str | None = None


def _root_causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _unreachable(url: str, exc: BaseException, redact: Redactor) -> TokenEndpointError:
    causes = _root_causes(exc)
    host = urllib.parse.urlsplit(url).hostname or url
    if any(isinstance(c, socket.gaierror) for c in causes):
        what = f"the host name {host!r} does not resolve (DNS)"
        hint = "check oauth2_token_url and the machine's DNS"
    elif any(isinstance(c, ssl.SSLCertVerificationError) for c in causes):
        cert = next(c for c in causes if isinstance(c, ssl.SSLCertVerificationError))
        what = f"its TLS certificate is not trusted ({cert.verify_message or cert})"
        hint = "check tls_ca_file or the system trust store"
    elif any(isinstance(c, ssl.SSLError) for c in causes):
        what = "the TLS handshake failed"
        hint = "check that oauth2_token_url is an https endpoint"
    elif isinstance(exc, httpx.TimeoutException):
        what = "it did not answer in time"
        hint = "check the network path to it (firewall, proxy)"
    else:
        what = f"the connection failed ({type(exc).__name__}: {exc})"
        hint = "check oauth2_token_url and the network path to it"
    return TokenEndpointError(
        redact(f"cannot reach the token endpoint {url}: {what}"), hint=hint, transient=True
    )


async def post_form(
    url: str,
    form: Mapping[str, str],
    *,
    ssl_context: ssl.SSLContext,
    secrets: Sequence[str],
) -> tuple[int, dict[str, object]]:
    """POST a form and return the status and the JSON object answered.

    Args:
        url: The endpoint (checked with :func:`check_endpoint_url`).
        form: The parameters.
        ssl_context: Verifies the endpoint's certificate.
        secrets: Values in ``form`` that must never appear in an error.

    The caller bounds the time (``trio.fail_after``), as everywhere in prxmail.

    Returns:
        ``(status, object)`` for any status whose body is a JSON object (error
        answers included: RFC 6749 §5.2 errors come with 400 or 401).

    Raises:
        TokenEndpointError: unreachable, a body that is not a JSON object,
            or a body over :data:`MAX_RESPONSE_BYTES`.
        ConfigError: the URL is not an allowed endpoint.
    """
    check_endpoint_url(url)
    redact = Redactor(secrets)
    body = bytearray()
    # No httpx timeouts: the caller's trio.fail_after bounds the whole request.
    client = httpx.AsyncClient(verify=ssl_context, trust_env=False, timeout=None)  # noqa: S113
    try:
        async with (
            client,
            client.stream(
                "POST", url, data=dict(form), headers={"Accept": "application/json"}
            ) as response,
        ):
            status = response.status_code
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise TokenEndpointError(
                        f"the token endpoint {url} sent more than "
                        f"{MAX_RESPONSE_BYTES} bytes (HTTP {status}): not a token response",
                        status=status,
                        hint="check oauth2_token_url",
                    )
    except httpx.HTTPError as exc:
        raise _unreachable(url, exc, redact) from None
    try:
        parsed: object = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        excerpt = body[:BODY_EXCERPT_CHARS].decode("utf-8", "replace")
        excerpt = " ".join(redact(excerpt).split())
        raise TokenEndpointError(
            f"the token endpoint {url} answered HTTP {status} with no JSON object "
            f"(starts {excerpt!r})",
            status=status,
            hint="check oauth2_token_url: it must be the provider's OAuth 2 token endpoint"
            if status < 500
            else "the provider has a problem; retrying",
            transient=status >= 500,
            server_text=excerpt,
        )
    return status, parsed


def endpoint_error(
    url: str, status: int, answer: Mapping[str, object], redact: Redactor
) -> TokenEndpointError:
    """Turn an RFC 6749 §5.2 error answer into a :class:`TokenEndpointError`.

    Args:
        url: The endpoint, for the message.
        status: The HTTP status.
        answer: The JSON object.
        redact: Removes the request's secrets from the server's text.

    Returns:
        The error, with the code, the provider's description and a fix hint.
    """
    error = answer.get("error")
    code = error if isinstance(error, str) and error.isprintable() and len(error) < 64 else None
    description = answer.get("error_description")
    text = " ".join(redact(str(description)).split())[:300] if description else ""
    hint, transient = _ERROR_HINTS.get(code or "", ("", status >= 500))
    if not hint:
        hint = "retrying" if transient else "check the oauth2_* settings"
    shown = f" ({text})" if text else ""
    what = f"error {code!r}" if code else f"HTTP {status} without an error code"
    return TokenEndpointError(
        f"the token endpoint {url} refused the request: {what}{shown}",
        error=code,
        status=status,
        hint=hint,
        transient=transient,
        server_text=text,
    )


async def request_token(
    url: str,
    form: Mapping[str, str],
    *,
    ssl_context: ssl.SSLContext,
    secrets: Sequence[str],
) -> TokenResponse:
    """POST a token request and return the tokens, or raise the explained refusal.

    Args:
        url: The token endpoint.
        form: ``grant_type`` and its parameters (client secret included, if any).
        ssl_context: Verifies the endpoint's certificate.
        secrets: Values in ``form`` that must never appear in an error.

    Returns:
        The access token with its lifetime, and a refresh token if one was issued.

    Raises:
        TokenEndpointError: refused (with the RFC 6749 error code), unreachable,
            non-JSON, or no usable ``access_token`` in the answer.
        ConfigError: the URL is not an allowed endpoint.
    """
    status, answer = await post_form(url, form, ssl_context=ssl_context, secrets=secrets)
    return parse_token_answer(url, status, answer, Redactor(secrets))


def parse_token_answer(
    url: str, status: int, answer: Mapping[str, object], redact: Redactor
) -> TokenResponse:
    """Check a token endpoint's JSON answer and take the tokens out of it.

    Args:
        url: The endpoint, for messages.
        status: The HTTP status.
        answer: The JSON object.
        redact: Removes the request's secrets from the server's text.

    Returns:
        The tokens.

    Raises:
        TokenEndpointError: an error answer, or no usable Bearer ``access_token``.
    """
    if status != 200 or "error" in answer:
        raise endpoint_error(url, status, answer, redact)
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenEndpointError(
            f"the token endpoint {url} answered without an access_token",
            status=status,
            hint="check oauth2_token_url: it must be the provider's OAuth 2 token endpoint",
        )
    token_type = answer.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenEndpointError(
            f"the token endpoint {url} issued a {str(token_type)[:20]!r} token, not a Bearer token",
            status=status,
            hint="IMAP and SMTP need Bearer tokens: check oauth2_token_url",
        )
    expires_in = answer.get("expires_in")
    lifetime: float | None = None
    # Some endpoints (Microsoft's v1) send the number as a string.
    if isinstance(expires_in, int | float | str) and not isinstance(expires_in, bool):
        try:
            lifetime = float(expires_in)
        except ValueError:
            lifetime = None
        if lifetime is not None and not 0 < lifetime < float("inf"):
            lifetime = None
    refresh = answer.get("refresh_token")
    scope = answer.get("scope")
    return TokenResponse(
        access_token=Secret(token),
        expires_in=lifetime,
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        scope=scope if isinstance(scope, str) else None,
    )
