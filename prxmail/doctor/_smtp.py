"""The SMTP chain: greeting, STARTTLS, EHLO, AUTH.

Theory of operation: as the IMAP chain, over an :class:`~prxmail.smtp.SMTPConnection`
on the stream :mod:`._network` connected; EHLO's extensions are summarised and AUTH
is tried with the configured credentials (the message is never sent).
"""

from __future__ import annotations

from typing import Final

import trio

from prxmail._login import AccountLogin
from prxmail._tls import Security
from prxmail.config import AuthMethod, Config
from prxmail.doctor._network import (
    _cert_summary,
    _find_ssl_error,
    _greeting_failure,
    _open_transport,
    _tls_failure,
)
from prxmail.doctor._oauth2 import _OAUTH2_LOGIN_HINT, _preset_hints, _token_failure
from prxmail.doctor._report import _LOGIN_HINT, Status, Timeouts, _Chain, _server_text
from prxmail.errors import (
    AuthenticationError,
    PrxmailError,
    SMTPPermanentError,
    SMTPTransientError,
    TLSError,
)
from prxmail.oauth2 import OAuth2Error
from prxmail.smtp import Extensions, SMTPConnection

# -- SMTP -------------------------------------------------------------------------------


def _smtp_names(security: Security) -> list[str]:
    if security is Security.TLS:
        head = ["smtp.dns", "smtp.tcp", "smtp.tls", "smtp.greeting"]
    else:
        head = ["smtp.dns", "smtp.tcp", "smtp.greeting", "smtp.tls"]
    return [*head, "smtp.ehlo", "smtp.auth"]


def _describe_extensions(ext: Extensions) -> str:
    parts = []
    if ext.size is not None:
        parts.append(f"SIZE {ext.size // (1024 * 1024)} MiB" if ext.size else "SIZE (no limit)")
    for flag, label in (
        (ext.pipelining, "PIPELINING"),
        (ext.eightbitmime, "8BITMIME"),
        (ext.smtputf8, "SMTPUTF8"),
        (ext.starttls, "STARTTLS"),
    ):
        if flag:
            parts.append(label)
    parts.append("AUTH " + " ".join(sorted(ext.auth)) if ext.auth else "no AUTH")
    return ", ".join(parts)


async def _smtp_chain(
    config: Config, timeouts: Timeouts, chain: _Chain, *, login: AccountLogin
) -> None:
    host, port, security = config.smtp_host, config.smtp_port, config.smtp_security
    opened = await _open_transport(
        chain, "smtp", config, host=host, port=port, security=security, timeouts=timeouts
    )
    if opened is None:
        return
    raw, stream, context = opened
    conn: SMTPConnection | None = None
    try:
        conn = SMTPConnection(stream, security=security, ssl_context=context, server_hostname=host)
        try:
            with trio.fail_after(timeouts.greeting):
                greeting = await conn.read_greeting()
        except (trio.TooSlowError, PrxmailError) as exc:
            _greeting_failure(chain, "smtp", security, raw, exc, timeouts=timeouts)
            return
        chain.add("smtp.greeting", Status.PASS, f"{greeting.code} {_server_text(greeting.text)}")
        if not await _smtp_ehlo(chain, conn, config, timeouts):
            return
        await _smtp_auth(chain, conn, config, timeouts, login)
    finally:
        if conn is not None:
            with trio.move_on_after(timeouts.close):
                await conn.aclose()
        await trio.aclose_forcefully(stream)


async def _smtp_ehlo(
    chain: _Chain, conn: SMTPConnection, config: Config, timeouts: Timeouts
) -> bool:
    try:
        with trio.fail_after(timeouts.command):
            ext = await conn.ehlo()
    except (trio.TooSlowError, PrxmailError) as exc:
        return chain.add(
            "smtp.ehlo",
            Status.FAIL,
            f"EHLO failed: {_server_text(str(exc)) or type(exc).__name__}",
            hint="the server does not behave like an SMTP submission server",
        )
    if config.smtp_security is Security.STARTTLS:
        try:
            with trio.fail_after(timeouts.command + timeouts.tls):
                await conn.starttls()
        except trio.TooSlowError:
            return chain.add(
                "smtp.tls",
                Status.FAIL,
                "STARTTLS did not complete in time",
                hint="check smtp_port and smtp_security",
            )
        except TLSError as exc:
            if _find_ssl_error(exc) is not None or isinstance(
                exc.__cause__, trio.BrokenResourceError
            ):
                _tls_failure(chain, "smtp", config, exc, b"")
                return False
            return chain.add(
                "smtp.tls",
                Status.FAIL,
                _server_text(str(exc)),
                hint="use implicit TLS: smtp_security = 'tls' (usually port 465)",
            )
        except PrxmailError as exc:
            return chain.add("smtp.tls", Status.FAIL, f"STARTTLS failed: {_server_text(str(exc))}")
        stream = conn.stream
        assert isinstance(stream, trio.SSLStream)
        status, summary = _cert_summary(stream, Security.STARTTLS)
        hint = "the certificate expires soon: the server administrator must renew it"
        chain.add("smtp.tls", status, summary, hint=hint if status is Status.WARN else "")
        ext = conn.extensions
    elif config.smtp_security is Security.PLAIN:
        chain.add(
            "smtp.tls",
            Status.WARN,
            "not encrypted: the SMTP password and every reply travel in clear text",
            hint="use smtp_security = 'tls' (port 465) or 'starttls' (port 587)",
        )
    return chain.add("smtp.ehlo", Status.PASS, _describe_extensions(ext))


# Refusals of AUTH (the SMTPPermanentError behind the AuthenticationError) that are
# not "wrong credentials": RFC 4954 section 6 reply codes and RFC 3463 enhanced codes.
_SMTP_REFUSAL_HINTS: Final = {
    534: "the server wants a stronger mechanism or an app password for this account"
    " (RFC 4954 534); with 2-step verification create an app password",
    538: "the server wants an encrypted connection for AUTH: use smtp_security = 'tls'"
    " (port 465) or 'starttls' (port 587)",
}
_SMTP_ENHANCED_HINTS: Final = {
    "5.7.9": _SMTP_REFUSAL_HINTS[534],
    "5.7.11": _SMTP_REFUSAL_HINTS[538],
}


def _smtp_refusal_hint(exc: AuthenticationError) -> str:
    """The advice for a refused SMTP login, from the refusal's reply codes."""
    refusal = exc.__cause__
    if isinstance(refusal, SMTPPermanentError):
        hint = _SMTP_ENHANCED_HINTS.get(refusal.enhanced or "") or _SMTP_REFUSAL_HINTS.get(
            refusal.code
        )
        if hint is not None:
            return hint
    return _LOGIN_HINT + "; if SMTP uses other credentials, set smtp_username and smtp_password"


async def _smtp_auth(
    chain: _Chain, conn: SMTPConnection, config: Config, timeouts: Timeouts, login: AccountLogin
) -> bool:
    offered = conn.extensions.auth
    if not offered:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            "the server offers no AUTH here, so prxmail cannot log in",
            hint="use the provider's submission port (465 with TLS or 587 with STARTTLS),"
            " not port 25",
        )
    oauth2 = config.smtp_auth is AuthMethod.OAUTH2
    if oauth2 and not {"OAUTHBEARER", "XOAUTH2"} & offered:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            "the server offers no OAuth 2 mechanism (OAUTHBEARER or XOAUTH2); offered: "
            + " ".join(sorted(offered)),
            detail=_preset_hints(config),
            hint="SMTP AUTH with OAuth 2 may be switched off for this mailbox or server;"
            " or set smtp_auth = 'password' with smtp_password",
        )
    if not oauth2 and not {"PLAIN", "LOGIN"} & offered:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            "the server offers no password mechanism prxmail supports (PLAIN or LOGIN);"
            " offered: " + " ".join(sorted(offered)),
            hint="the provider may require OAuth 2 for SMTP: set smtp_auth = 'oauth2'"
            " (README: OAuth 2)",
        )
    try:
        with trio.fail_after(timeouts.command):
            await login.smtp(conn)
    except OAuth2Error as exc:
        return _token_failure(chain, "smtp.auth", "SMTP", config, exc)
    except trio.TooSlowError:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"the server did not answer AUTH within {timeouts.command:g} s",
            hint="the server is overloaded or hangs; try again later",
        )
    except AuthenticationError as exc:
        if oauth2:
            return chain.add(
                "smtp.auth",
                Status.FAIL,
                f"the SMTP server refused the OAuth 2 token for {config.smtp_username}:"
                f" {_server_text(str(exc))}",
                detail=_preset_hints(config),
                hint=_OAUTH2_LOGIN_HINT,
            )
        said = _server_text(exc.server_text)
        code = f"{exc.code} " if exc.code else ""
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"authentication failed for {config.smtp_username}: {code}{said}".rstrip(": "),
            detail=_preset_hints(config),
            hint=_smtp_refusal_hint(exc),
        )
    except SMTPTransientError as exc:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"AUTH failed temporarily: {exc.code} {_server_text(exc.text)}",
            hint="the server has a temporary problem; try again later",
        )
    except PrxmailError as exc:
        return chain.add("smtp.auth", Status.FAIL, f"AUTH failed: {_server_text(str(exc))}")
    return chain.add(
        "smtp.auth", Status.PASS, f"authenticated as {config.smtp_username} (no mail sent)"
    )
