"""The IMAP chain: greeting, STARTTLS, capabilities, login, folder, IDLE.

Theory of operation: on the stream :mod:`._network` connected, an
:class:`~prxmail.imap.IMAPConnection` speaks the protocol; each step runs under its
own timeout and records one result, and the first failure ends the chain. A refused
login, a missing folder (with the folders that do exist) and a server without IDLE
each get a hint in plain words.
"""

from __future__ import annotations

import ssl
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
    _RecordingStream,
    _tls_failure,
)
from prxmail.doctor._oauth2 import _OAUTH2_LOGIN_HINT, _preset_hints, _token_failure
from prxmail.doctor._report import (
    _LOGIN_HINT,
    MAX_FOLDERS_SHOWN,
    Status,
    Timeouts,
    _Chain,
    _server_text,
)
from prxmail.errors import (
    AuthenticationError,
    IMAPBadResponse,
    IMAPCommandError,
    PrxmailError,
    TLSError,
)
from prxmail.imap import ConnectionState as IMAPState
from prxmail.imap import IMAPConnection, Raw, decode_mailbox
from prxmail.oauth2 import OAuth2Error

# -- IMAP -------------------------------------------------------------------------------


def _imap_names(security: Security) -> list[str]:
    head = ["imap.dns", "imap.tcp"]
    if security is Security.TLS:
        head += ["imap.tls", "imap.greeting"]
    else:
        head += ["imap.greeting", "imap.tls"]
    return [*head, "imap.capabilities", "imap.login", "imap.folder", "imap.idle"]


_IMAP_NOTABLE: Final = (
    "IMAP4REV1",
    "IMAP4REV2",
    "IDLE",
    "UIDPLUS",
    "ESEARCH",
    "CONDSTORE",
    "LITERAL+",
    "ENABLE",
    "MOVE",
    "SASL-IR",
)


def _imap_capabilities(caps: frozenset[str]) -> str:
    notable = [c for c in _IMAP_NOTABLE if c in caps]
    auth = sorted(c.removeprefix("AUTH=") for c in caps if c.startswith("AUTH="))
    text = " ".join(notable) or "none of note"
    if auth:
        text += "; AUTH " + " ".join(auth)
    return f"{len(caps)} capabilities: {text}"


async def _list_folders(conn: IMAPConnection, timeouts: Timeouts) -> list[str] | None:
    """Selectable folder names from LIST, or None when they cannot be had."""
    if conn.broken:
        return None
    try:
        with trio.fail_after(timeouts.command):
            boxes = await conn.list_mailboxes()
    except (PrxmailError, trio.TooSlowError):
        return None
    return [decode_mailbox(box.raw_name) for box in boxes if box.selectable]


async def _imap_chain(
    config: Config, timeouts: Timeouts, chain: _Chain, *, login: AccountLogin
) -> None:
    host, port, security = config.imap_host, config.imap_port, config.imap_security
    opened = await _open_transport(
        chain, "imap", config, host=host, port=port, security=security, timeouts=timeouts
    )
    if opened is None:
        return
    raw, stream, context = opened
    conn: IMAPConnection | None = None
    try:
        conn = IMAPConnection(
            stream,
            encrypted=security is Security.TLS,
            allow_plaintext_login=security is Security.PLAIN,
        )
        if not await _imap_greeting(chain, conn, security, raw, timeouts):
            return
        if security is Security.STARTTLS:
            assert context is not None
            if not await _imap_starttls(chain, conn, config, context, timeouts):
                return
        elif security is Security.PLAIN:
            chain.add(
                "imap.tls",
                Status.WARN,
                "not encrypted: imap_security = 'plain' sends the password in clear text",
                hint="use imap_security = 'tls' (port 993) or 'starttls' (port 143)",
            )
        if not await _imap_capabilities_step(chain, conn, timeouts):
            return
        if not await _imap_login(chain, conn, config, timeouts, login):
            return
        if not await _imap_folder(chain, conn, config, timeouts):
            return
        if "IDLE" in conn.capabilities:
            chain.add("imap.idle", Status.PASS, "IDLE supported: new mail is seen at once")
        else:
            chain.add(
                "imap.idle",
                Status.WARN,
                "the server does not support IDLE: prxmail will poll for new mail every"
                f" {config.poll_interval_secs} s",
                hint="replies come up to one poll interval late; lower poll_interval_secs"
                " for quicker answers, or use a provider with IDLE",
            )
    finally:
        if conn is not None:
            with trio.move_on_after(timeouts.close):
                await conn.logout()
            await conn.aclose()
        else:
            await trio.aclose_forcefully(stream)


async def _imap_greeting(
    chain: _Chain,
    conn: IMAPConnection,
    security: Security,
    raw: _RecordingStream,
    timeouts: Timeouts,
) -> bool:
    try:
        with trio.fail_after(timeouts.greeting):
            greeting = await conn.read_greeting()
    except (trio.TooSlowError, PrxmailError) as exc:
        _greeting_failure(chain, "imap", security, raw, exc, timeouts=timeouts)
        return False
    text = _server_text(greeting.text) or "(no text)"
    if greeting.status == "PREAUTH":
        return chain.add(
            "imap.greeting",
            Status.WARN,
            f"PREAUTH: the server logged us in without a password ({text})",
            hint="unusual: the server trusts this connection; login is skipped",
        )
    return chain.add("imap.greeting", Status.PASS, f"* {greeting.status} {text}")


async def _imap_starttls(
    chain: _Chain,
    conn: IMAPConnection,
    config: Config,
    context: ssl.SSLContext,
    timeouts: Timeouts,
) -> bool:
    if conn.state is not IMAPState.NOT_AUTHENTICATED:
        return chain.add(
            "imap.tls",
            Status.FAIL,
            "the server pre-authenticated the session, so STARTTLS is impossible",
            hint="use implicit TLS: imap_security = 'tls' (usually port 993)",
        )
    try:
        with trio.fail_after(timeouts.command + timeouts.tls):
            await conn.starttls(context, server_hostname=config.imap_host)
    except trio.TooSlowError:
        return chain.add(
            "imap.tls",
            Status.FAIL,
            "STARTTLS did not complete in time",
            hint="check imap_port and imap_security",
        )
    except TLSError as exc:
        if _find_ssl_error(exc) is not None or isinstance(exc.__cause__, trio.BrokenResourceError):
            _tls_failure(chain, "imap", config, exc, b"")
            return False
        return chain.add(
            "imap.tls",
            Status.FAIL,
            _server_text(str(exc)),
            hint="the server offers no STARTTLS on this port: use implicit TLS,"
            " imap_security = 'tls' (usually port 993)",
        )
    except PrxmailError as exc:
        return chain.add("imap.tls", Status.FAIL, f"STARTTLS failed: {_server_text(str(exc))}")
    stream = conn.stream
    assert isinstance(stream, trio.SSLStream)
    status, summary = _cert_summary(stream, Security.STARTTLS)
    hint = "the certificate expires soon: the server administrator must renew it"
    return chain.add("imap.tls", status, summary, hint=hint if status is Status.WARN else "")


async def _imap_capabilities_step(chain: _Chain, conn: IMAPConnection, timeouts: Timeouts) -> bool:
    try:
        with trio.fail_after(timeouts.command):
            caps = conn.capabilities or await conn.capability()
    except (trio.TooSlowError, PrxmailError) as exc:
        return chain.add(
            "imap.capabilities",
            Status.FAIL,
            f"CAPABILITY failed: {_server_text(str(exc)) or type(exc).__name__}",
            hint="the server does not behave like an IMAP4rev1 server",
        )
    if "IMAP4REV1" not in caps and "IMAP4REV2" not in caps:
        return chain.add(
            "imap.capabilities",
            Status.WARN,
            _imap_capabilities(caps) + " (IMAP4rev1 not announced)",
            hint="the server may not support everything prxmail needs",
        )
    return chain.add("imap.capabilities", Status.PASS, _imap_capabilities(caps))


# RFC 5530 response codes on a refused login that mean something other than "wrong
# username or password", with the advice each one needs.
_IMAP_REFUSAL_HINTS: Final = {
    "UNAVAILABLE": "the server's login service is down for now (not a password problem);"
    " try again later",
    "EXPIRED": "the password (or the account) has expired: set a new one with the"
    " provider, then update the configuration",
    "PRIVACYREQUIRED": "the server wants an encrypted connection for logins: use"
    " imap_security = 'tls' (port 993) or 'starttls' (port 143)",
    "CONTACTADMIN": "the server says the account needs its administrator's attention",
}


def _imap_refusal(exc: AuthenticationError, username: str) -> tuple[str, str]:
    """Summary and hint for a refused IMAP login, from the error's code and cause."""
    if exc.code == "LOGINDISABLED":
        return (
            "the server refuses LOGIN on an unencrypted connection (LOGINDISABLED)",
            "use imap_security = 'starttls' (port 143) or 'tls' (port 993)",
        )
    said = _server_text(exc.server_text)
    code = f"[{exc.code}] " if exc.code else ""
    if isinstance(exc.__cause__, IMAPBadResponse):
        # BAD: the command itself was not accepted, so the password was never judged.
        return (
            f"the server did not accept the LOGIN command: {code}{said}".rstrip(": "),
            "the server does not take LOGIN in this form; check imap_host and imap_port"
            " (is this the provider's IMAP server?)",
        )
    summary = f"authentication failed for {username}: {code}{said}".rstrip(": ")
    return summary, _IMAP_REFUSAL_HINTS.get(exc.code or "", _LOGIN_HINT)


async def _imap_login(
    chain: _Chain, conn: IMAPConnection, config: Config, timeouts: Timeouts, login: AccountLogin
) -> bool:
    if conn.state is not IMAPState.NOT_AUTHENTICATED:
        return chain.add("imap.login", Status.PASS, "already authenticated (PREAUTH)")
    try:
        with trio.fail_after(timeouts.command):
            await login.imap(conn)
    except OAuth2Error as exc:
        return _token_failure(chain, "imap.login", "IMAP", config, exc)
    except trio.TooSlowError:
        return chain.add(
            "imap.login",
            Status.FAIL,
            f"the server did not answer LOGIN within {timeouts.command:g} s",
            hint="the server is overloaded or hangs; try again later",
        )
    except AuthenticationError as exc:
        if config.auth is AuthMethod.OAUTH2:
            return chain.add(
                "imap.login",
                Status.FAIL,
                f"the IMAP server refused the OAuth 2 token for {config.username}:"
                f" {_server_text(str(exc))}",
                detail=_preset_hints(config),
                hint=_OAUTH2_LOGIN_HINT,
            )
        summary, hint = _imap_refusal(exc, config.username)
        return chain.add(
            "imap.login", Status.FAIL, summary, detail=_preset_hints(config), hint=hint
        )
    except TLSError as exc:
        return chain.add(
            "imap.login",
            Status.FAIL,
            _server_text(str(exc)),
            hint="use imap_security = 'tls' or 'starttls'",
        )
    except PrxmailError as exc:
        return chain.add("imap.login", Status.FAIL, f"LOGIN failed: {_server_text(str(exc))}")
    if not conn.encrypted:
        return chain.add(
            "imap.login",
            Status.WARN,
            f"logged in as {config.username}, but the password went unencrypted",
            hint="use imap_security = 'tls' or 'starttls'",
        )
    return chain.add("imap.login", Status.PASS, f"logged in as {config.username}")


async def _imap_folder(
    chain: _Chain, conn: IMAPConnection, config: Config, timeouts: Timeouts
) -> bool:
    folder = config.imap_folder
    try:
        with trio.fail_after(timeouts.command):
            box = await conn.examine(folder)
    except trio.TooSlowError:
        return chain.add(
            "imap.folder",
            Status.FAIL,
            f"EXAMINE {folder!r} did not answer within {timeouts.command:g} s",
            hint="a very large folder or a slow server; try again",
        )
    except IMAPCommandError as exc:
        folders = await _list_folders(conn, timeouts)
        if folders is None:
            detail = ["the folder list could not be read"]
        elif folders:
            shown = sorted(folders, key=str.lower)[:MAX_FOLDERS_SHOWN]
            more = f" (and {len(folders) - len(shown)} more)" if len(folders) > len(shown) else ""
            detail = ["folders on the server: " + ", ".join(shown) + more]
        else:
            detail = ["the server lists no folders"]
        said = _server_text(exc.text)
        return chain.add(
            "imap.folder",
            Status.FAIL,
            f"folder {folder!r} cannot be opened: {said}" if said else f"no folder {folder!r}",
            detail=detail,
            hint="set imap_folder to an existing folder (names are case-sensitive, except"
            " INBOX; sub-folders use the server's separator, e.g. 'Archive/Bots')",
        )
    except PrxmailError as exc:
        return chain.add(
            "imap.folder", Status.FAIL, f"EXAMINE {folder!r} failed: {_server_text(str(exc))}"
        )
    unseen = "? unseen"
    try:
        with trio.fail_after(timeouts.command):
            unseen_uids = await conn.uid_search(Raw("UNSEEN"))
        unseen = f"{len(unseen_uids)} unseen"
    except (trio.TooSlowError, PrxmailError):
        if conn.broken:
            return chain.add(
                "imap.folder", Status.FAIL, f"searching {folder!r} for unseen mail failed"
            )
    validity = box.uidvalidity if box.uidvalidity is not None else "not reported"
    summary = f"{folder!r}: {box.exists} messages, {unseen}, UIDVALIDITY {validity}"
    if box.uidvalidity is None:
        # The service refuses such a folder: without UIDVALIDITY a re-created folder
        # cannot be told from the old one, so stored UIDs could skip or repeat mail.
        return chain.add(
            "imap.folder",
            Status.FAIL,
            summary,
            hint="the server does not report UIDVALIDITY, which prxmail needs to track"
            " mail safely; use another server or folder",
        )
    return chain.add("imap.folder", Status.PASS, summary)
