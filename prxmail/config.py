"""Configuration: the PRX ``[channels_config.email]`` table plus prxmail's own keys.

Theory of operation: the TOML document is parsed with :mod:`tomllib`, the email table
is structured into frozen attrs classes by one private cattrs converter that forbids
unknown keys and uses *strict* hooks (a string is never silently turned into a port, a
number never into a host name), and every problem is reported at once as a readable
line ending in its key path, e.g. ``expected an integer from 1 to 65535, got 'abc' @
$.channels_config.email.imap_port``. Checks that involve several keys (where the
password comes from, TLS mode versus port) run after structuring, so their problems join
the same list. Secrets are wrapped in :class:`Secret`, whose ``repr`` and ``str`` never
show the value, and no error message ever quotes a secret key's value.

Files the configuration names are checked here, not when the channel first needs them:
the configuration file, password files and the CA file are read as regular files only,
each with a size bound (a FIFO would hang the start, ``/dev/zero`` exhaust memory), and
the CA file must load into an SSL context. A problem found later would surface as an
exception from deep inside the running channel instead of a line naming the key.

This module imports no other part of prxmail at run time except the error tree, the TLS
mode enum, :mod:`prxmail._validate`, the secret type and the OAuth 2 preset table and
URL rule: checking a configuration must not load trio, httpx, mail-parser or the
handler runner.

Authentication: ``auth = "password"`` (the default) or ``"oauth2"`` for IMAP, and
``smtp_auth`` for SMTP (default: the same as ``auth``). Both use the one set of
``oauth2_*`` keys -- one token per account, for IMAP and SMTP alike -- and SMTP falls
back to the IMAP password as before; ``smtp_auth = "password"`` beside ``auth =
"oauth2"`` needs its own ``smtp_password``. ``provider = "..."`` merges a preset's
values *under* the table before anything is structured, so explicit keys win and
every check below sees one table.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import os
import re
import ssl
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NewType, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from prxmail._redact import Secret
from prxmail._tls import Security
from prxmail._validate import (
    FileProblem,
    parse_exec_command,
    read_regular_file,
    validate_sender_entry,
)
from prxmail.errors import ConfigError
from prxmail.oauth2._presets import PRESETS, preset_defaults
from prxmail.oauth2._url import check_endpoint_url

__all__ = [
    "DEFAULT_ACCOUNT_NAME",
    "DEFAULT_IDLE_TIMEOUT_SECS",
    "DEFAULT_MAX_ATTACHMENT_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CA_FILE_BYTES",
    "MAX_CONFIG_FILE_BYTES",
    "MAX_SECRET_FILE_BYTES",
    "SHARED_KEYS",
    "AuthMethod",
    "Config",
    "FirstStart",
    "LogFormat",
    "OAuth2Grant",
    "OAuth2Settings",
    "ReplyFormat",
    "Secret",
    "default_state_dir",
    "load_accounts",
    "load_config",
    "parse_accounts",
    "parse_config",
]

TABLE_PATH: Final = "$.channels_config.email"
# Further accounts are the sub-tables of this key of the email table.
ACCOUNTS_KEY: Final = "accounts"
# The email table's own account, unless it says ``name = "..."``.
DEFAULT_ACCOUNT_NAME: Final = "default"
# Account names appear in log lines (account=), key paths and file names later: short,
# lowercase, no characters that need quoting anywhere. 64 is far beyond "support-eu".
_ACCOUNT_NAME: Final = re.compile(r"[a-z0-9_-]{1,64}\Z")
# Keys that one process holds once for all its accounts, so an account cannot set its
# own: the state directory (one process lock; the store keeps each account's rows
# apart), the log format (one stderr) and the health endpoint (one per process).
SHARED_KEYS: Final = ("state_dir", "log_format", "health_listen")

# RFC 2177 asks clients to re-issue IDLE at least every 29 minutes, because servers may
# log out an idle client after 30.
DEFAULT_IDLE_TIMEOUT_SECS: Final = 1740
# Messages up to this size are fetched whole. Bigger ones are described (headers, text
# parts, attachment list) without loading every byte: 25 MiB is the largest message the
# big providers accept, so ordinary mail always fits.
DEFAULT_MAX_MESSAGE_BYTES: Final = 25 * 1024 * 1024
# Attachment content up to this size is handed to the handler; beyond it only the name,
# type and size are, so one huge attachment cannot exhaust the handler's memory.
DEFAULT_MAX_ATTACHMENT_BYTES: Final = 10 * 1024 * 1024
# How long one handler run may take before it is stopped (SIGTERM, then SIGKILL) and the
# message recorded as failed. Five minutes covers an agent that calls a slow model API a
# few times; a handler stuck for longer is broken, and must not hold a slot forever.
DEFAULT_HANDLER_TIMEOUT_SECS: Final = 300
# Handlers running at the same time. Each is a process holding one message (up to
# max_message_bytes of it in its JSON input), so the product bounds memory; four lets a
# slow answer not delay the next sender's much while staying gentle on a small host.
DEFAULT_MAX_CONCURRENT_HANDLERS: Final = 4
# How often one message may be started (interrupted by a crash or shutdown, or its
# handler could not be started) before it is recorded as failed. A message that crashes
# the service every time must not do so forever; three absorbs an unlucky restart.
DEFAULT_HANDLER_MAX_ATTEMPTS: Final = 3
# The per-sender volume limit, a token bucket that defers (never rejects): a sustained
# 60 messages per hour (one a minute, faster than any person's back-and-forth: a
# 25-round thread in an hour fits) with bursts of up to DEFAULT_REPLY_RATE_BURST.
# Loops inside one thread are the per-thread loop guard's job, which stops them much
# sooner (prxmail.conversation); this limit is for volume from one address.
DEFAULT_REPLY_RATE_LIMIT: Final = 60
DEFAULT_REPLY_RATE_WINDOW_SECS: Final = 3600
# Messages one sender may have handed on at once: issue 12's burst of 30 questions in
# a minute is answered at once, with 10 to spare for that person's other mail.
DEFAULT_REPLY_RATE_BURST: Final = 40
# The per-thread loop guard (prxmail.conversation._loops has the rule): an answer to
# our reply within this many seconds is machine-fast (a person needs to notice, read
# and type), and a thread with a streak of such answers gets one reply per
# loop_slow_down_secs until the evidence holds it. The same numbers as there.
DEFAULT_LOOP_FAST_ANSWER_SECS: Final = 15
DEFAULT_LOOP_SLOW_DOWN_SECS: Final = 30
# Servers without IDLE are polled this often: a minute is the usual mail-client cadence
# and far from any provider's rate limits.
DEFAULT_POLL_INTERVAL_SECS: Final = 60
# IDLE is ended and re-issued at least this often even when idle_timeout_secs is longer.
# The DONE must be answered within command_timeout_secs, so a connection that died
# silently (a NAT box forgot it) is found within keepalive + command timeout, not after
# the 29-minute IDLE renewal. Five minutes is below common NAT idle timeouts.
DEFAULT_KEEPALIVE_SECS: Final = 300
# Every IMAP/SMTP command (connect, login, fetch of one batch, send of one message) must
# finish within this time or the connection is dropped and re-opened.
DEFAULT_COMMAND_TIMEOUT_SECS: Final = 60
# Messages fetched per UID FETCH. Bodies are fetched in such batches (and never more than
# max_message_bytes of them at once), so a mailbox with 100 000 unseen messages is worked
# through in bounded steps instead of one unbounded command.
DEFAULT_FETCH_BATCH_SIZE: Final = 50
# First wait after a transient SMTP failure; it doubles per failure up to the maximum.
# Thirty seconds lets a restarting server come back; an hour is the usual MTA ceiling.
DEFAULT_SMTP_RETRY_INITIAL_SECS: Final = 30
DEFAULT_SMTP_RETRY_MAX_SECS: Final = 3600
# Upper bound for the size limits themselves: a limit above 1 GiB is a typo, and the
# limits exist to keep memory bounded.
MAX_SIZE_LIMIT: Final = 1024 * 1024 * 1024
# The configuration file is read whole: a complete PRX configuration with every table
# is a few KiB, so 1 MiB is far beyond any real file while keeping a mistaken -c (a
# log file, a disk image) from being loaded into memory.
MAX_CONFIG_FILE_BYTES: Final = 1024 * 1024
# A password file holds one password or token: OAuth2 access tokens (JWTs) reach a few
# KiB, so 64 KiB leaves ample room and still refuses a wrong file at once.
MAX_SECRET_FILE_BYTES: Final = 64 * 1024
# A CA file may be a whole distribution bundle (Debian's ca-certificates.crt, about
# 150 roots, is 220 KB); 4 MiB takes a bundle many times that size.
MAX_CA_FILE_BYTES: Final = 4 * 1024 * 1024
# Characters that can never be part of a password sent on an IMAP or SMTP command line
# (RFC 3501 forbids CR and LF outside literals and NUL everywhere; SASL PLAIN uses NUL
# as its separator): a password holding one would fail every login forever.
_UNSENDABLE_CHARS: Final = frozenset("\0\r\n")
_UNSENDABLE_PROBLEM: Final = (
    "must not contain NUL, CR or LF characters (they cannot be sent in an IMAP or SMTP command)"
)


class FirstStart(enum.Enum):
    """What happens to mail already in the folder when prxmail first sees it.

    ``UNSEEN``: unseen messages (no ``\\Seen`` flag) are processed, seen ones skipped --
    mail that arrived before the bot was switched on and nobody read gets an answer.
    ``NEW``: only mail arriving after the first start is processed.
    """

    UNSEEN = "unseen"
    NEW = "new"


class AuthMethod(enum.Enum):
    """How a protocol logs in: ``PASSWORD`` (LOGIN / AUTH PLAIN) or ``OAUTH2`` (a token)."""

    PASSWORD = "password"  # noqa: S105 - a method name, not a password
    OAUTH2 = "oauth2"


class OAuth2Grant(enum.Enum):
    """Where access tokens come from (RFC 6749): a user's refresh token (§6), or the
    app's own client credentials (§4.4, Microsoft 365 app-only access for daemons)."""

    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a grant name, not a token
    CLIENT_CREDENTIALS = "client_credentials"


class ReplyFormat(enum.Enum):
    """What a handler's output is: ``TEXT`` (the reply body, as is) or ``JSON`` (one
    object with ``body``, optional ``html``, ``attachments`` and ``subject``)."""

    TEXT = "text"
    JSON = "json"


class LogFormat(enum.Enum):
    """Log line format: ``HUMAN`` (one readable line) or ``JSON`` (one object per line)."""

    HUMAN = "human"
    JSON = "json"


# OpenSSL messages end in the C source line that raised them: noise for an operator.
_SSL_SOURCE_LINE: Final = re.compile(r" \(_ssl\.c:\d+\)\Z")
_NON_ASCII_TO_QUESTION_MARK: Final = bytes(b if b < 0x80 else ord("?") for b in range(256))
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ADDRESS = re.compile(r"[^@\s<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


# Constrained scalar types: each has one strict structure hook below.
Port = NewType("Port", int)
PositiveInt = NewType("PositiveInt", int)
ByteLimit = NewType("ByteLimit", int)
NonEmptyStr = NewType("NonEmptyStr", str)
EnvName = NewType("EnvName", str)
ExecCommand = NewType("ExecCommand", str)
HandlerCount = NewType("HandlerCount", int)
AttemptCount = NewType("AttemptCount", int)
BatchSize = NewType("BatchSize", int)
AuthservId = NewType("AuthservId", str)
Address = NewType("Address", str)
SenderEntry = NewType("SenderEntry", str)
Provider = NewType("Provider", str)
TokenUrl = NewType("TokenUrl", str)
AccountName = NewType("AccountName", str)
HealthListen = NewType("HealthListen", str)


@attrs.frozen
class RawEmailTable:
    """The email table exactly as written (before secrets and defaults are resolved)."""

    imap_host: NonEmptyStr
    smtp_host: NonEmptyStr
    username: NonEmptyStr
    from_address: Address
    imap_port: Port = Port(993)
    imap_folder: NonEmptyStr = NonEmptyStr("INBOX")
    imap_security: Security | None = None
    smtp_port: Port = Port(465)
    smtp_tls: bool = True
    smtp_security: Security | None = None
    password: Secret | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None
    smtp_username: NonEmptyStr | None = None
    smtp_password: Secret | None = None
    smtp_password_env: EnvName | None = None
    smtp_password_file: Path | None = None
    provider: Provider | None = None
    auth: AuthMethod | None = None
    smtp_auth: AuthMethod | None = None
    oauth2_token_url: TokenUrl | None = None
    oauth2_client_id: NonEmptyStr | None = None
    oauth2_client_secret: Secret | None = None
    oauth2_client_secret_env: EnvName | None = None
    oauth2_client_secret_file: Path | None = None
    oauth2_refresh_token: Secret | None = None
    oauth2_refresh_token_env: EnvName | None = None
    oauth2_refresh_token_file: Path | None = None
    oauth2_scope: NonEmptyStr | None = None
    oauth2_grant: OAuth2Grant = OAuth2Grant.REFRESH_TOKEN
    oauth2_token_command: ExecCommand | None = None
    imap_id: bool = True
    idle_timeout_secs: PositiveInt = PositiveInt(DEFAULT_IDLE_TIMEOUT_SECS)
    allowed_senders: tuple[SenderEntry, ...] = ()
    default_subject: str = "PRX Message"
    tls_ca_file: Path | None = None
    state_dir: Path | None = None
    max_message_bytes: ByteLimit = ByteLimit(DEFAULT_MAX_MESSAGE_BYTES)
    max_attachment_bytes: ByteLimit = ByteLimit(DEFAULT_MAX_ATTACHMENT_BYTES)
    exec: ExecCommand | None = None
    handler_timeout_secs: PositiveInt = PositiveInt(DEFAULT_HANDLER_TIMEOUT_SECS)
    max_concurrent_handlers: HandlerCount = HandlerCount(DEFAULT_MAX_CONCURRENT_HANDLERS)
    handler_max_attempts: AttemptCount = AttemptCount(DEFAULT_HANDLER_MAX_ATTEMPTS)
    mark_seen: bool = True
    first_start: FirstStart = FirstStart.UNSEEN
    authserv_id: AuthservId | None = None
    require_authentication: bool = False
    reply_rate_limit: HandlerCount = HandlerCount(DEFAULT_REPLY_RATE_LIMIT)
    reply_rate_window_secs: PositiveInt = PositiveInt(DEFAULT_REPLY_RATE_WINDOW_SECS)
    poll_interval_secs: PositiveInt = PositiveInt(DEFAULT_POLL_INTERVAL_SECS)
    keepalive_secs: PositiveInt = PositiveInt(DEFAULT_KEEPALIVE_SECS)
    command_timeout_secs: PositiveInt = PositiveInt(DEFAULT_COMMAND_TIMEOUT_SECS)
    fetch_batch_size: BatchSize = BatchSize(DEFAULT_FETCH_BATCH_SIZE)
    smtp_retry_initial_secs: PositiveInt = PositiveInt(DEFAULT_SMTP_RETRY_INITIAL_SECS)
    smtp_retry_max_secs: PositiveInt = PositiveInt(DEFAULT_SMTP_RETRY_MAX_SECS)
    log_format: LogFormat = LogFormat.HUMAN
    # -- conversations (issue 12) --
    reply_rate_burst: HandlerCount = HandlerCount(DEFAULT_REPLY_RATE_BURST)
    reply_format: ReplyFormat = ReplyFormat.TEXT
    thread_keep_incoming_text: bool = False
    loop_fast_answer_secs: PositiveInt = PositiveInt(DEFAULT_LOOP_FAST_ANSWER_SECS)
    loop_slow_down_secs: PositiveInt = PositiveInt(DEFAULT_LOOP_SLOW_DOWN_SECS)
    # -- several accounts (issue 14) --
    name: AccountName | None = None
    # -- operations (issue 14) --
    health_listen: HealthListen | None = None


@attrs.frozen
class OAuth2Settings:
    """Where the account's OAuth 2 access tokens come from (the ``oauth2_*`` keys).

    Exactly one of two shapes: ``token_command`` (a program printing a token; every
    other field ``None``), or a token endpoint (``token_url`` and ``client_id``, with
    ``refresh_token`` or ``refresh_token_file`` for the refresh-token grant, and
    ``client_secret`` for the client-credentials grant).

    Attributes:
        token_url: The token endpoint (https; http only to loopback hosts).
        client_id: The OAuth client (application) id.
        client_secret: The client secret, for confidential clients.
        refresh_token: A refresh token from the file or the environment.
        refresh_token_file: A file holding the refresh token (``prxmail auth``
            writes it; it may not exist yet). Re-read before each refresh.
        scope: Space-separated scopes to ask for, when set.
        grant: The grant used to get access tokens.
        token_command: The argv of ``oauth2_token_command``.
    """

    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    refresh_token_file: Path | None = None
    scope: str | None = None
    grant: OAuth2Grant = OAuth2Grant.REFRESH_TOKEN
    token_command: tuple[str, ...] | None = None


@attrs.frozen
class Config:
    """A complete, validated configuration with secrets resolved.

    Attributes:
        imap_security / smtp_security: the effective TLS mode (explicit setting, or
            derived from the port: IMAP 993 -> TLS, 143 -> STARTTLS; SMTP 465 -> TLS,
            587 and 25 -> STARTTLS; any other port -> TLS; ``smtp_tls = false`` ->
            PLAIN).
        password / smtp_password: :class:`Secret` values (SMTP falls back to IMAP's);
            ``None`` for a protocol that logs in with OAuth 2.
        auth / smtp_auth: how IMAP and SMTP log in.
        oauth2: the token settings when either protocol uses OAuth 2, else ``None``.
        provider: the ``provider`` preset the values were filled from, if any.
        imap_id: send IMAP ID (RFC 2971) after login when the server offers it.
        health_listen: ``(host, port)`` of the health and metrics endpoint
            (``health_listen = "127.0.0.1:9100"``), or ``None`` (off, the default).
        allowed_senders: normalised entries (lowercase, trimmed).
        exec_command: the handler's argv (``exec``, split shell-like), or ``None``.
        authserv_id: the receiving server's authserv-id whose Authentication-Results
            are trusted; set only when ``require_authentication`` is true.
        warnings: things that work but deserve the operator's attention.
        name: the account's name (``name`` in the email table, ``"default"`` when
            unset, or the ``NAME`` of ``[channels_config.email.accounts.NAME]``).

    The service keys (handler, IMAP behaviour, outbox retries, logging) are documented
    at their ``DEFAULT_*`` constants in this module.
    """

    imap_host: str
    imap_port: int
    imap_folder: str
    imap_security: Security
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    username: str
    password: Secret | None
    smtp_username: str
    smtp_password: Secret | None
    from_address: str
    idle_timeout_secs: int
    allowed_senders: tuple[str, ...]
    default_subject: str
    tls_ca_file: Path | None
    state_dir: Path
    max_message_bytes: int
    max_attachment_bytes: int
    exec_command: tuple[str, ...] | None = None
    handler_timeout_secs: int = DEFAULT_HANDLER_TIMEOUT_SECS
    max_concurrent_handlers: int = DEFAULT_MAX_CONCURRENT_HANDLERS
    handler_max_attempts: int = DEFAULT_HANDLER_MAX_ATTEMPTS
    mark_seen: bool = True
    first_start: FirstStart = FirstStart.UNSEEN
    authserv_id: str | None = None
    reply_rate_limit: int = DEFAULT_REPLY_RATE_LIMIT
    reply_rate_window_secs: int = DEFAULT_REPLY_RATE_WINDOW_SECS
    poll_interval_secs: int = DEFAULT_POLL_INTERVAL_SECS
    keepalive_secs: int = DEFAULT_KEEPALIVE_SECS
    command_timeout_secs: int = DEFAULT_COMMAND_TIMEOUT_SECS
    fetch_batch_size: int = DEFAULT_FETCH_BATCH_SIZE
    smtp_retry_initial_secs: int = DEFAULT_SMTP_RETRY_INITIAL_SECS
    smtp_retry_max_secs: int = DEFAULT_SMTP_RETRY_MAX_SECS
    log_format: LogFormat = LogFormat.HUMAN
    auth: AuthMethod = AuthMethod.PASSWORD
    smtp_auth: AuthMethod = AuthMethod.PASSWORD
    oauth2: OAuth2Settings | None = None
    provider: str | None = None
    imap_id: bool = True
    # -- conversations (issue 12) --
    reply_rate_burst: int = DEFAULT_REPLY_RATE_BURST
    reply_format: ReplyFormat = ReplyFormat.TEXT
    thread_keep_incoming_text: bool = False
    loop_fast_answer_secs: int = DEFAULT_LOOP_FAST_ANSWER_SECS
    loop_slow_down_secs: int = DEFAULT_LOOP_SLOW_DOWN_SECS
    # -- operations (issue 14) --
    health_listen: tuple[str, int] | None = None
    warnings: tuple[str, ...] = ()
    name: str = DEFAULT_ACCOUNT_NAME

    @property
    def idle_renewal_secs(self) -> int:
        """How often the watcher really ends and re-issues IDLE, in seconds.

        The channel waits at most ``min(idle_timeout_secs, keepalive_secs)`` per IDLE
        (see :mod:`prxmail.channel`): ``keepalive_secs`` exists precisely to renew more
        often than the 29-minute RFC 2177 limit, so the start-up line shows the smaller.
        """
        return min(self.idle_timeout_secs, self.keepalive_secs)

    @property
    def smtp_tls(self) -> bool:
        """The PRX ``smtp_tls`` flag: whether SMTP is encrypted at all."""
        return self.smtp_security is not Security.PLAIN

    def describe(self) -> list[str]:
        """What the channel does with this configuration, one line each, no secrets."""
        senders = ", ".join(self.allowed_senders) or "nobody (allowed_senders is empty)"
        lines = self._describe_lines(senders)
        if self.oauth2 is not None:
            source = (
                "oauth2_token_command"
                if self.oauth2.token_command is not None
                else f"{self.oauth2.token_url} ({self.oauth2.grant.value} grant)"
            )
            users = [
                name
                for name, auth in (("IMAP", self.auth), ("SMTP", self.smtp_auth))
                if auth is AuthMethod.OAUTH2
            ]
            lines.append(f"log in to {' and '.join(users)} with OAuth 2 tokens from {source}")
        return lines

    def _describe_lines(self, senders: str) -> list[str]:
        return [
            f"watch folder {self.imap_folder!r} on {self.imap_host}:{self.imap_port}"
            f" ({self.imap_security.value}) as {self.username}",
            f"send replies through {self.smtp_host}:{self.smtp_port}"
            f" ({self.smtp_security.value}) as {self.smtp_username},"
            f" From: {self.from_address}",
            f"answer mail from: {senders}",
            f"re-issue IDLE every {self.idle_renewal_secs} s (poll every"
            f" {self.poll_interval_secs} s if the server has no IDLE);"
            f" keep state in {self.state_dir}",
        ]


class _Invalid(ValueError):
    """A value that failed one of our strict hooks; the message is shown as is."""


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, name in names.items():
        if type(value) is kind:
            return name
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _got(value: object) -> str:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return f"got {value!r}"
    return f"got {_type_name(value)}"


def _strict_str(value: object, _: object = None) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)}")
    return value


def _strict_bool(value: object, _: object = None) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, {_got(value)}")
    return value


def _int_in(low: int, high: int) -> Callable[[object, object], int]:
    def hook(value: object, _: object = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer from {low} to {high}, {_got(value)}")
        if not low <= value <= high:
            raise _Invalid(f"expected an integer from {low} to {high}, got {value}")
        return value

    return hook


def _non_empty(value: object, _: object = None) -> str:
    text = _strict_str(value).strip()
    if not text:
        raise _Invalid("expected a non-empty string")
    if any(ch in text for ch in "\r\n\0"):
        raise _Invalid("must not contain line breaks or NUL characters")
    return text


def _env_name(value: object, _: object = None) -> str:
    text = _strict_str(value)
    if not _ENV_NAME.match(text):
        raise _Invalid(f"expected an environment variable name, got {text!r}")
    return text


def _address(value: object, _: object = None) -> str:
    text = _non_empty(value)
    if not _ADDRESS.match(text):
        raise _Invalid(f"expected an email address like bot@example.com, got {text!r}")
    return text


def _sender_entry(value: object, _: object = None) -> str:
    text = _strict_str(value)
    try:
        return validate_sender_entry(text)
    except ValueError as exc:
        raise _Invalid(f"can never match a sender: {exc}") from None


def _secret(value: object, _: object = None) -> Secret:
    # Never quote the value: a password typed as a number is still a password.
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)}")
    if not value:
        raise _Invalid("expected a non-empty string")
    if not _UNSENDABLE_CHARS.isdisjoint(value):
        raise _Invalid(_UNSENDABLE_PROBLEM)
    return Secret(value)


def _path(value: object, _: object = None) -> Path:
    return Path(os.path.expanduser(_non_empty(value)))


def _exec_command(value: object, _: object = None) -> str:
    text = _strict_str(value)
    try:
        parse_exec_command(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _authserv_id(value: object, _: object = None) -> str:
    text = _non_empty(value)
    if any(ch.isspace() or ch == ";" for ch in text):
        raise _Invalid(f"expected a host-like authserv-id without spaces or ';', got {text!r}")
    return text.lower()


def _choice(kind: type[enum.Enum]) -> Callable[[object, object], enum.Enum]:
    choices = ", ".join(repr(member.value) for member in kind)

    def hook(value: object, _: object = None) -> enum.Enum:
        if not isinstance(value, str):
            raise _Invalid(f"expected one of {choices}, {_got(value)}")
        try:
            return kind(value.strip().lower())
        except ValueError:
            raise _Invalid(f"expected one of {choices}, got {value!r}") from None

    return hook


def _account_name(value: object, _: object = None) -> str:
    text = _strict_str(value)
    if not _ACCOUNT_NAME.match(text):
        raise _Invalid(
            f"expected an account name of 1 to 64 characters a-z, 0-9, '_' or '-', got {text!r}"
        )
    return text


def _provider(value: object, _: object = None) -> str:
    choices = ", ".join(repr(name) for name in PRESETS)
    if not isinstance(value, str) or value.strip().lower() not in PRESETS:
        raise _Invalid(f"expected one of {choices}, {_got(value)}")
    return value.strip().lower()


def _token_url(value: object, _: object = None) -> str:
    text = _non_empty(value)
    try:
        check_endpoint_url(text)
    except ConfigError:
        raise _Invalid(
            f"expected an https:// URL (plain http only for 127.0.0.1, localhost or ::1),"
            f" got {text!r}"
        ) from None
    return text


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into an IP literal and a port.

    Args:
        address: A ``health_listen`` value.

    Returns:
        ``(host, port)``; the host is an IP address (a name would need DNS at start
        and could resolve to a public interface).

    Raises:
        ValueError: the text is not an IP address and a port of 1 to 65535.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:9100', got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"the host must be an IP address such as 127.0.0.1 or [::1], got {host!r}"
        ) from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"the port must be 1 to 65535, got {port}")
    return host, port


def _health_listen(value: object, _: object = None) -> str:
    text = _non_empty(value)
    try:
        parse_listen_address(text)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return text


def _security(value: object, _: object = None) -> Security:
    choices = ", ".join(repr(s.value) for s in Security)
    if not isinstance(value, str):
        raise _Invalid(f"expected one of {choices}, {_got(value)}")
    try:
        return Security(value.strip().lower())
    except ValueError:
        raise _Invalid(f"expected one of {choices}, got {value!r}") from None


def _list_of_strings(
    default: Callable[[object, Any], object],
) -> Callable[[object, Any], object]:
    # cattrs structures a tuple from any iterable, so a string would become one entry
    # (and one error) per character; a TOML array arrives as a list, and only a list is
    # accepted. The entries still go through ``default``, keeping per-entry key paths.
    def hook(value: object, type_: Any) -> object:
        if not isinstance(value, list):
            hint = f"; write [{value!r}]" if isinstance(value, str) else ""
            raise _Invalid(f"expected a list of strings, {_got(value)}{hint}")
        return default(value, type_)

    return hook


def _is_type(kind: object) -> Callable[[Any], bool]:
    # Generic aliases such as tuple[str, ...] are not classes, so they are registered
    # with a predicate instead of by type.
    return lambda candidate: bool(candidate == kind)


def _build_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    hooks: dict[Any, Callable[[object, object], object]] = {
        str: _strict_str,
        bool: _strict_bool,
        Port: _int_in(1, 65535),
        PositiveInt: _int_in(1, 7 * 24 * 3600),
        ByteLimit: _int_in(1024, MAX_SIZE_LIMIT),
        NonEmptyStr: _non_empty,
        EnvName: _env_name,
        Address: _address,
        SenderEntry: _sender_entry,
        Secret: _secret,
        Path: _path,
        Security: _security,
        ExecCommand: _exec_command,
        AuthservId: _authserv_id,
        HandlerCount: _int_in(1, 1000),
        AttemptCount: _int_in(1, 100),
        BatchSize: _int_in(1, 1000),
        FirstStart: _choice(FirstStart),
        LogFormat: _choice(LogFormat),
        AuthMethod: _choice(AuthMethod),
        OAuth2Grant: _choice(OAuth2Grant),
        Provider: _provider,
        TokenUrl: _token_url,
        HealthListen: _health_listen,
        ReplyFormat: _choice(ReplyFormat),
        AccountName: _account_name,
    }
    for kind, hook in hooks.items():
        conv.register_structure_hook(kind, hook)
    # After the scalar hooks, so the default array hooks structure entries with them.
    for field in attrs.fields(attrs.resolve_types(RawEmailTable)):
        if typing.get_origin(field.type) is tuple:
            kind = field.type
            default = conv.get_structure_hook(kind)
            conv.register_structure_hook_func(_is_type(kind), _list_of_strings(default))
    return conv


_converter = _build_converter()
_FIELDS: Final = tuple(a.name for a in attrs.fields(RawEmailTable))

_T = TypeVar("_T")
# Markers between _format_exception and _structure for unknown-key lines.
_UNKNOWN: Final = "\0unknown:"
_KEY_SPLIT: Final = "\0"


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, _Invalid):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        # One line per key; _structure moves each key into its line's path.
        return _UNKNOWN + _KEY_SPLIT.join(sorted(exc.extra_fields))
    if isinstance(exc, KeyError):
        return "required key missing"
    return cattrs.v.format_exception(exc, type_)


def _structure(data: object, cls: type[_T], path: str) -> tuple[_T | None, list[str]]:
    try:
        return _converter.structure(data, cls), []
    except (ClassValidationError, IterableValidationError) as exc:
        lines = cattrs.transform_error(exc, path=path, format_exception=_format_exception)
    problems = []
    for line in lines:
        if not line.startswith(_UNKNOWN):
            problems.append(line)
            continue
        keys, _, where = line.rpartition(" @ ")
        for key in keys.removeprefix(_UNKNOWN).split(_KEY_SPLIT):
            close = difflib.get_close_matches(key, _FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint} @ {where}.{key}")
    return None, problems


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where durable state lives unless ``state_dir`` says otherwise.

    ``$XDG_STATE_HOME/prxmail``, or ``~/.local/state/prxmail`` when the variable is
    unset or not absolute (as the XDG Base Directory specification asks).
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "prxmail"


def _resolve_secret(
    raw: RawEmailTable,
    prefix: str,
    environ: Mapping[str, str],
    base_dir: Path,
    problems: list[str],
    *,
    name: str = "password",
) -> Secret | None:
    """Resolve the ``<prefix><name>`` / ``_env`` / ``_file`` triple into one secret."""
    key = f"{prefix}{name}"
    noun = name.replace("oauth2_", "OAuth 2 ").replace("_", " ")
    inline: Secret | None = getattr(raw, key)
    env_name: str | None = getattr(raw, f"{key}_env")
    file: Path | None = getattr(raw, f"{key}_file")
    keys = [
        f"{key}{suffix}"
        for suffix, value in (("", inline), ("_env", env_name), ("_file", file))
        if value is not None
    ]
    if len(keys) > 1:
        problems.append(
            f"set only one of {', '.join(keys)} (they all give the {noun}) @ {TABLE_PATH}"
        )
        return None
    if inline is not None:
        return inline
    if env_name is not None:
        where = f"@ {TABLE_PATH}.{key}_env"
        value = environ.get(env_name)
        if not value:
            problems.append(f"environment variable {env_name} is not set or empty {where}")
            return None
    elif file is not None:
        where = f"@ {TABLE_PATH}.{key}_file"
        path = file if file.is_absolute() else base_dir / file
        try:
            text = read_regular_file(path, limit=MAX_SECRET_FILE_BYTES).decode("utf-8")
        except FileProblem as exc:
            problems.append(f"cannot read {noun} file {path}: {exc} {where}")
            return None
        except UnicodeDecodeError:
            problems.append(f"cannot read {noun} file {path}: not UTF-8 {where}")
            return None
        # One trailing newline is what editors and `echo` add; it is not the password.
        value = text.removesuffix("\n").removesuffix("\r")
        if not value:
            problems.append(f"{noun} file {path} is empty {where}")
            return None
    else:
        return None
    if not _UNSENDABLE_CHARS.isdisjoint(value):
        problems.append(f"{_UNSENDABLE_PROBLEM} {where}")
        return None
    return Secret(value)


def _check_ca_file(path: Path, problems: list[str]) -> None:
    where = f"@ {TABLE_PATH}.tls_ca_file"
    try:
        data = read_regular_file(path, limit=MAX_CA_FILE_BYTES)
    except FileProblem as exc:
        problems.append(f"cannot use tls_ca_file {path}: {exc} {where}")
        return
    # OpenSSL ignores text outside the PEM blocks, but cadata must be ASCII: bundles
    # carry UTF-8 comments (CA names), so any non-ASCII byte becomes '?' -- inside a
    # block it was invalid anyway.
    pem = data.translate(_NON_ASCII_TO_QUESTION_MARK).decode("ascii")
    # A bare context: only the file's own certificates are checked, without the cost
    # of loading the system trust store.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        problems.append(
            f"cannot use tls_ca_file {path}: it holds no PEM certificate OpenSSL can load"
            f" ({_SSL_SOURCE_LINE.sub('', str(exc))}) {where}"
        )


def _imap_security(raw: RawEmailTable) -> Security:
    if raw.imap_security is not None:
        return raw.imap_security
    return Security.STARTTLS if raw.imap_port == 143 else Security.TLS


def _smtp_security(raw: RawEmailTable, problems: list[str]) -> Security:
    if raw.smtp_security is not None:
        if not raw.smtp_tls and raw.smtp_security is not Security.PLAIN:
            problems.append(
                f"smtp_tls = false contradicts smtp_security = {raw.smtp_security.value!r};"
                f" drop smtp_tls or set smtp_security = 'plain' @ {TABLE_PATH}.smtp_tls"
            )
        return raw.smtp_security
    if not raw.smtp_tls:
        return Security.PLAIN
    return Security.STARTTLS if raw.smtp_port in (25, 587) else Security.TLS


def _port_warnings(raw: RawEmailTable, imap: Security, smtp: Security) -> list[str]:
    warnings = []
    if imap is Security.PLAIN:
        warnings.append("imap_security = 'plain': the IMAP password travels unencrypted")
    if smtp is Security.PLAIN:
        warnings.append("SMTP without TLS: the SMTP password and replies travel unencrypted")
    if imap is Security.TLS and raw.imap_port == 143:
        warnings.append("imap_port 143 is normally STARTTLS, but imap_security is 'tls'")
    if imap is Security.STARTTLS and raw.imap_port == 993:
        warnings.append("imap_port 993 is normally implicit TLS, but imap_security is 'starttls'")
    if smtp is Security.TLS and raw.smtp_port in (25, 587):
        warnings.append(
            f"smtp_port {raw.smtp_port} is normally STARTTLS, but smtp_security is 'tls'"
        )
    if smtp is Security.STARTTLS and raw.smtp_port == 465:
        warnings.append("smtp_port 465 is normally implicit TLS, but smtp_security is 'starttls'")
    if not raw.allowed_senders:
        warnings.append("allowed_senders is empty: nobody will be answered")
    elif "*" in raw.allowed_senders:
        warnings.append("allowed_senders contains '*': anyone can make the bot answer")
    return warnings


def _with_preset(table: dict[str, Any]) -> dict[str, Any]:
    """The table with a valid ``provider``'s preset values merged under the explicit ones.

    An invalid ``provider`` value is left to its structure hook to report.
    """
    name = table.get("provider")
    if not isinstance(name, str) or name.strip().lower() not in PRESETS:
        return table
    merged = preset_defaults(name.strip().lower())
    # App-only access asks for the resource's ".default" scope, not the delegated ones.
    preset = PRESETS[name.strip().lower()].oauth2
    if table.get("oauth2_grant") == OAuth2Grant.CLIENT_CREDENTIALS.value and preset is not None:
        if preset.client_credentials_scope is None:
            merged.pop("oauth2_scope", None)
        else:
            merged["oauth2_scope"] = preset.client_credentials_scope
    # The preset's endpoint keys describe the provider's own token endpoint; a token
    # command replaces the endpoint entirely, so they must not then count as set.
    if "oauth2_token_command" in table:
        for key in _ENDPOINT_KEYS:
            merged.pop(key, None)
    return {**merged, **table}


# The keys that describe a token endpoint: oauth2_token_command excludes all of them.
_ENDPOINT_KEYS: Final = (
    "oauth2_token_url",
    "oauth2_client_id",
    "oauth2_client_secret",
    "oauth2_client_secret_env",
    "oauth2_client_secret_file",
    "oauth2_refresh_token",
    "oauth2_refresh_token_env",
    "oauth2_refresh_token_file",
    "oauth2_scope",
    "oauth2_grant",
)


def _forbid_passwords(raw: RawEmailTable, prefix: str, auth_key: str, problems: list[str]) -> None:
    for suffix in ("", "_env", "_file"):
        key = f"{prefix}password{suffix}"
        if getattr(raw, key) is not None:
            problems.append(
                f"{auth_key} = 'oauth2' takes no password: remove {key}, or set"
                f" {auth_key} = 'password' @ {TABLE_PATH}.{key}"
            )


def _oauth2_settings(
    raw: RawEmailTable,
    explicit: frozenset[str],
    environ: Mapping[str, str],
    base_dir: Path,
    problems: list[str],
) -> OAuth2Settings | None:
    """The ``oauth2_*`` keys checked against each other (see :class:`OAuth2Settings`)."""
    if raw.oauth2_token_command is not None:
        clashing = [k for k in _ENDPOINT_KEYS if k in explicit]
        if clashing:
            problems.append(
                f"oauth2_token_command replaces the token endpoint: remove {', '.join(clashing)}"
                f" @ {TABLE_PATH}.{clashing[0]}"
            )
            return None
        return OAuth2Settings(token_command=tuple(parse_exec_command(raw.oauth2_token_command)))
    before = len(problems)
    if raw.oauth2_token_url is None:
        problems.append(
            "required key missing: auth = 'oauth2' needs oauth2_token_url (or a provider"
            f" preset, or oauth2_token_command) @ {TABLE_PATH}.oauth2_token_url"
        )
    if raw.oauth2_client_id is None:
        problems.append(
            "required key missing: the OAuth 2 client (application) id"
            f" @ {TABLE_PATH}.oauth2_client_id"
        )
    client_secret = _resolve_secret(
        raw, "", environ, base_dir, problems, name="oauth2_client_secret"
    )
    refresh_keys = [
        k
        for k in ("oauth2_refresh_token", "oauth2_refresh_token_env", "oauth2_refresh_token_file")
        if getattr(raw, k) is not None
    ]
    refresh_token: Secret | None = None
    refresh_file: Path | None = None
    if raw.oauth2_grant is OAuth2Grant.CLIENT_CREDENTIALS:
        if client_secret is None and len(problems) == before:
            problems.append(
                "oauth2_grant = 'client_credentials' needs the client secret: set"
                " oauth2_client_secret, oauth2_client_secret_env or oauth2_client_secret_file"
                f" @ {TABLE_PATH}.oauth2_client_secret"
            )
        for key in refresh_keys:
            problems.append(
                f"oauth2_grant = 'client_credentials' takes no refresh token: remove {key}"
                f" @ {TABLE_PATH}.{key}"
            )
    elif len(refresh_keys) > 1:
        problems.append(
            f"set only one of {', '.join(refresh_keys)} (they all give the refresh token)"
            f" @ {TABLE_PATH}"
        )
    elif raw.oauth2_refresh_token_file is not None:
        refresh_file = raw.oauth2_refresh_token_file
        if not refresh_file.is_absolute():
            refresh_file = base_dir / refresh_file
        _check_refresh_token_file(refresh_file, problems)
    elif refresh_keys:
        refresh_token = _resolve_secret(
            raw, "", environ, base_dir, problems, name="oauth2_refresh_token"
        )
    else:
        problems.append(
            "required key missing: the refresh_token grant needs oauth2_refresh_token_file"
            " (`prxmail auth -c FILE` fills it), oauth2_refresh_token or"
            f" oauth2_refresh_token_env @ {TABLE_PATH}.oauth2_refresh_token_file"
        )
    if len(problems) > before:
        return None
    return OAuth2Settings(
        token_url=raw.oauth2_token_url,
        client_id=raw.oauth2_client_id,
        client_secret=client_secret,
        refresh_token=refresh_token,
        refresh_token_file=refresh_file,
        scope=raw.oauth2_scope,
        grant=raw.oauth2_grant,
    )


def _check_refresh_token_file(path: Path, problems: list[str]) -> None:
    # The file may not exist yet: `prxmail auth` creates it, and the token source
    # re-reads it before every refresh. If it exists it must be a readable regular file.
    if not os.path.lexists(path):
        return
    try:
        read_regular_file(path, limit=MAX_SECRET_FILE_BYTES)
    except FileProblem as exc:
        problems.append(
            f"cannot read OAuth 2 refresh token file {path}: {exc}"
            f" @ {TABLE_PATH}.oauth2_refresh_token_file"
        )


def parse_config(
    text: str,
    *,
    source: str | None = None,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate a TOML configuration document.

    Args:
        text: The TOML text; it must hold a ``[channels_config.email]`` table (other
            tables of a PRX configuration are left alone).
        source: Where the text came from, for error messages.
        base_dir: Directory that relative paths (``password_file``, ``tls_ca_file``,
            ``state_dir``) are resolved against; the current directory by default.
        environ: Environment for ``*_password_env`` and the XDG state directory;
            ``os.environ`` by default.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: with every problem found, each naming its key path. The files
            the table names are read here: ``password_file`` and
            ``smtp_password_file`` (at most :data:`MAX_SECRET_FILE_BYTES`) and
            ``tls_ca_file`` (at most :data:`MAX_CA_FILE_BYTES`, and it must load into
            an SSL context) must be regular files; a FIFO, a device or a directory is
            a problem, not something to wait on or read without end.
    """
    env = os.environ if environ is None else environ
    base = base_dir if base_dir is not None else Path.cwd()
    table = _email_table(text, source)
    # The further accounts are parse_accounts' business; this stays the one PRX table.
    table.pop(ACCOUNTS_KEY, None)
    config, problems = _table_config(table, env, base)
    if config is None:
        raise ConfigError(problems, source=source)
    return config


def _email_table(text: str, source: str | None) -> dict[str, Any]:
    """The ``[channels_config.email]`` table of a TOML document (a copy)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source=source) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively; no configuration
        # nests deeper than a few levels, so this is a broken or hostile file.
        raise ConfigError(
            ["not valid TOML: nested too deeply (arrays or inline tables inside each other)"],
            source=source,
        ) from None

    channels = document.get("channels_config")
    table = channels.get("email") if isinstance(channels, dict) else None
    if table is None:
        raise ConfigError([f"missing table [channels_config.email] @ {TABLE_PATH}"], source=source)
    if not isinstance(table, dict):
        raise ConfigError(
            [f"expected a table, got {_type_name(table)} @ {TABLE_PATH}"], source=source
        )
    return dict(table)


def _table_config(
    table: dict[str, Any], env: Mapping[str, str], base: Path
) -> tuple[Config | None, list[str]]:
    """One account's table validated: the Config, or ``None`` and every problem.

    Problems name their keys under :data:`TABLE_PATH`; :func:`parse_accounts` moves
    them to the account's own path.
    """
    explicit = frozenset(table)
    table = _with_preset(table)
    raw, problems = _structure(table, RawEmailTable, TABLE_PATH)
    if raw is None:
        return None, problems

    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    auth = raw.auth or AuthMethod.PASSWORD
    smtp_auth = raw.smtp_auth or auth
    password = smtp_password = None
    if auth is AuthMethod.PASSWORD:
        password = _resolve_secret(raw, "", env, base, problems)
        if password is None and not problems:
            problems.append(
                f"required key missing: set password, password_env or password_file @ {TABLE_PATH}"
            )
    else:
        _forbid_passwords(raw, "", "auth", problems)
    if smtp_auth is AuthMethod.PASSWORD:
        smtp_password = _resolve_secret(raw, "smtp_", env, base, problems)
        if password is None and smtp_password is None and not problems:
            problems.append(
                "smtp_auth = 'password' beside auth = 'oauth2' needs SMTP's own password:"
                f" set smtp_password, smtp_password_env or smtp_password_file @ {TABLE_PATH}"
            )
    else:
        _forbid_passwords(raw, "smtp_", "smtp_auth", problems)
    oauth2: OAuth2Settings | None = None
    if AuthMethod.OAUTH2 in (auth, smtp_auth):
        oauth2 = _oauth2_settings(raw, explicit, env, base, problems)
    else:
        stray = sorted(k for k in explicit if k.startswith("oauth2_"))
        if stray:
            problems.append(
                f"{', '.join(stray)} only apply with auth = 'oauth2' or smtp_auth = 'oauth2'"
                f" @ {TABLE_PATH}.{stray[0]}"
            )
    imap_security = _imap_security(raw)
    smtp_security = _smtp_security(raw, problems)
    if raw.require_authentication and raw.authserv_id is None:
        problems.append(
            "require_authentication = true needs authserv_id (the receiving server's"
            f" name in its Authentication-Results headers) @ {TABLE_PATH}.authserv_id"
        )
    if raw.tls_ca_file is not None:
        _check_ca_file(resolve(raw.tls_ca_file), problems)
    if raw.smtp_retry_max_secs < raw.smtp_retry_initial_secs:
        problems.append(
            f"must be at least smtp_retry_initial_secs ({raw.smtp_retry_initial_secs})"
            f" @ {TABLE_PATH}.smtp_retry_max_secs"
        )
    if problems:
        return None, problems

    return Config(
        name=raw.name or DEFAULT_ACCOUNT_NAME,
        imap_host=raw.imap_host,
        imap_port=raw.imap_port,
        imap_folder=raw.imap_folder,
        imap_security=imap_security,
        smtp_host=raw.smtp_host,
        smtp_port=raw.smtp_port,
        smtp_security=smtp_security,
        username=raw.username,
        password=password,
        smtp_username=raw.smtp_username or raw.username,
        smtp_password=(smtp_password or password) if smtp_auth is AuthMethod.PASSWORD else None,
        from_address=raw.from_address,
        idle_timeout_secs=raw.idle_timeout_secs,
        allowed_senders=tuple(dict.fromkeys(raw.allowed_senders)),
        default_subject=raw.default_subject,
        tls_ca_file=resolve(raw.tls_ca_file) if raw.tls_ca_file else None,
        state_dir=resolve(raw.state_dir) if raw.state_dir else default_state_dir(env),
        max_message_bytes=raw.max_message_bytes,
        max_attachment_bytes=raw.max_attachment_bytes,
        exec_command=tuple(parse_exec_command(raw.exec)) if raw.exec else None,
        handler_timeout_secs=raw.handler_timeout_secs,
        max_concurrent_handlers=raw.max_concurrent_handlers,
        handler_max_attempts=raw.handler_max_attempts,
        mark_seen=raw.mark_seen,
        first_start=raw.first_start,
        authserv_id=raw.authserv_id if raw.require_authentication else None,
        reply_rate_limit=raw.reply_rate_limit,
        reply_rate_window_secs=raw.reply_rate_window_secs,
        poll_interval_secs=raw.poll_interval_secs,
        keepalive_secs=raw.keepalive_secs,
        command_timeout_secs=raw.command_timeout_secs,
        fetch_batch_size=raw.fetch_batch_size,
        smtp_retry_initial_secs=raw.smtp_retry_initial_secs,
        smtp_retry_max_secs=raw.smtp_retry_max_secs,
        log_format=raw.log_format,
        auth=auth,
        smtp_auth=smtp_auth,
        oauth2=oauth2,
        provider=raw.provider,
        imap_id=raw.imap_id,
        reply_rate_burst=raw.reply_rate_burst,
        reply_format=raw.reply_format,
        thread_keep_incoming_text=raw.thread_keep_incoming_text,
        loop_fast_answer_secs=raw.loop_fast_answer_secs,
        loop_slow_down_secs=raw.loop_slow_down_secs,
        health_listen=parse_listen_address(raw.health_listen) if raw.health_listen else None,
        warnings=tuple(_port_warnings(raw, imap_security, smtp_security)),
    ), []


def load_config(path: Path | str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration file at ``path``.

    Relative paths inside it are resolved against the file's directory. The file must
    be a regular file of at most :data:`MAX_CONFIG_FILE_BYTES`; so must every file it
    names (see :func:`parse_config`).

    Args:
        path: The configuration file.
        environ: As for :func:`parse_config`.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: the file cannot be read, or it has problems (all listed).
    """
    file = Path(path)
    text = _read_config_file(file)
    return parse_config(text, source=str(file), base_dir=file.parent.resolve(), environ=environ)


# Keys that give one secret in three ways (inline, _env, _file): inherited as one.
_SECRET_GROUPS: Final = tuple(
    (name, f"{name}_env", f"{name}_file")
    for name in ("password", "smtp_password", "oauth2_client_secret", "oauth2_refresh_token")
)
# A problem's key path: the email table itself, or one key of it (and what follows).
_PROBLEM_PATH: Final = re.compile(r" @ \$\.channels_config\.email(?:\.(\w+))?(\S*)\Z")


def _account_problem(
    problem: str, path: str, own: frozenset[str], main: Sequence[str]
) -> str | None:
    """Move a problem of an account's merged table to the account's own key path.

    A problem with a key the account inherited, which the main table has as well, is
    the main table's (already reported there): ``None``. Every other one is this
    account's, found at ``path`` -- also one about an inherited key that only goes wrong
    together with the account's own keys.
    """
    match = _PROBLEM_PATH.search(problem)
    if match is None:
        return problem
    key = match.group(1)
    if key is not None and key not in own and problem in main:
        return None
    where = path if key is None else f"{path}.{key}"
    return problem[: match.start()] + f" @ {where}{match.group(2)}"


def parse_accounts(
    text: str,
    *,
    source: str | None = None,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config, ...]:
    """Parse every account of a configuration document.

    The email table is the first account (named by its ``name`` key, else
    ``"default"``); each ``[channels_config.email.accounts.NAME]`` table is one more,
    taking every key of the email table and inheriting from it each key it does not
    set. :data:`SHARED_KEYS` (``state_dir``, ``log_format``, ``health_listen``) belong
    to the process and cannot differ per account; the account's name is its table's
    name.

    Args:
        text, source, base_dir, environ: As for :func:`parse_config`.

    Returns:
        The accounts' configurations, the email table's first, then in file order;
        each has its :attr:`Config.name`.

    Raises:
        ConfigError: with every problem of every account, each naming its key path
            (``... @ $.channels_config.email.accounts.sales.imap_port``); a problem of
            an inherited key is listed once, at the email table's key.
    """
    env = os.environ if environ is None else environ
    base = base_dir if base_dir is not None else Path.cwd()
    table = _email_table(text, source)
    extra = table.pop(ACCOUNTS_KEY, {})
    main, problems = _table_config(table, env, base)
    configs: list[Config] = [] if main is None else [main]
    accounts_path = f"{TABLE_PATH}.{ACCOUNTS_KEY}"
    if not isinstance(extra, dict):
        problems.append(
            f"expected tables [channels_config.email.accounts.NAME], got {_type_name(extra)}"
            f" @ {accounts_path}"
        )
        extra = {}
    main_name = table.get("name", DEFAULT_ACCOUNT_NAME)
    main_problems = tuple(problems)
    for name, own in extra.items():
        path = f"{accounts_path}.{name}"
        if not _ACCOUNT_NAME.match(name):
            problems.append(
                "expected an account name of 1 to 64 characters a-z, 0-9, '_' or '-',"
                f" got {name!r} @ {path}"
            )
            continue
        if not isinstance(own, dict):
            problems.append(f"expected a table, got {_type_name(own)} @ {path}")
            continue
        if name == main_name:
            problems.append(
                f"account name {name!r} is already the email table's own account;"
                f" rename one of them @ {path}"
            )
        before = len(problems)
        for key in ("name", ACCOUNTS_KEY):
            if key in own:
                what = "its table's name" if key == "name" else "not nested"
                problems.append(f"an account's name is {what}: remove {key} @ {path}.{key}")
        for key in SHARED_KEYS:
            if key in own and own[key] != table.get(key):
                problems.append(
                    f"{key} cannot differ per account (one process: one state directory"
                    f" with one lock, one log, one health endpoint); set it in"
                    f" [channels_config.email] only"
                    f" @ {path}.{key}"
                )
        if len(problems) > before:
            continue
        merged = {k: v for k, v in table.items() if k != "name"}
        for group in _SECRET_GROUPS:
            # Each group is one setting written three ways: an account that gives its
            # own password_env does not also inherit the email table's password.
            if any(key in own for key in group):
                for key in group:
                    merged.pop(key, None)
        merged.update(own)
        config, found = _table_config(merged, env, base)
        keys = frozenset(own)
        for problem in found:
            moved = _account_problem(problem, path, keys, main_problems)
            if moved is not None and moved not in problems:
                problems.append(moved)
        if config is not None:
            configs.append(attrs.evolve(config, name=name))
    if not problems:
        problems.extend(_same_mailbox_problems(configs, accounts_path))
    if problems:
        raise ConfigError(problems, source=source)
    return tuple(configs)


def _same_mailbox_problems(configs: Sequence[Config], accounts_path: str) -> list[str]:
    # The state store keys every row by (username, IMAP host, port): two accounts with
    # the same login would share one outbox and one high-water mark.
    seen: dict[tuple[str, str, int], str] = {}
    problems = []
    for config in configs:
        login = (config.username.lower(), config.imap_host.lower(), config.imap_port)
        if login in seen:
            problems.append(
                f"accounts {seen[login]!r} and {config.name!r} log in as {config.username}"
                f" on {config.imap_host}:{config.imap_port}; each account needs its own"
                f" mailbox login @ {accounts_path}.{config.name}.username"
            )
        else:
            seen[login] = config.name
    return problems


def load_accounts(
    path: Path | str, *, environ: Mapping[str, str] | None = None
) -> tuple[Config, ...]:
    """Read and validate every account of the configuration file at ``path``.

    The file is read as by :func:`load_config`; the accounts are as in
    :func:`parse_accounts`.

    Args:
        path: The configuration file.
        environ: As for :func:`parse_config`.

    Returns:
        Each account's :class:`Config`, the email table's own first.

    Raises:
        ConfigError: the file cannot be read, or it has problems (all listed).
    """
    file = Path(path)
    text = _read_config_file(file)
    return parse_accounts(text, source=str(file), base_dir=file.parent.resolve(), environ=environ)


def _read_config_file(file: Path) -> str:
    try:
        return read_regular_file(file, limit=MAX_CONFIG_FILE_BYTES).decode("utf-8")
    except FileProblem as exc:
        raise ConfigError([f"cannot read {file}: {exc}"], source=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError([f"cannot read {file}: not UTF-8"], source=str(file)) from None
