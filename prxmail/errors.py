"""One exception tree for the whole package.

Every exception prxmail raises on purpose derives from :class:`PrxmailError`. The
tree separates *who* is at fault, following h11 and trio:

* :class:`ConfigError` -- the configuration is wrong; carries every problem found.
* :class:`ProtocolError` -- the conversation itself went wrong; one of its two sides:

  * :class:`LocalProtocolError` -- the caller misused the API (a command in the wrong
    state, data that cannot be put on the wire safely). Retrying will not help.
  * :class:`RemoteProtocolError` -- the server broke the protocol; carries a short
    excerpt of the offending bytes. The connection is unusable afterwards.
* :class:`ConnectionBrokenError` -- the connection can no longer be used: the
  transport failed, the server closed it, or an earlier command was cancelled or
  timed out half-way. Every later call raises it again.
* :class:`TLSError` -- encryption could not be set up as required (STARTTLS not
  offered or failed, certificate not trusted). Never downgraded silently.
* :class:`AuthenticationError` -- the server refused the credentials.
* :class:`CommandRefusedError` -- the server understood a command and refused it;
  the protocol is still in step, so the connection stays usable (unless the refusal
  itself closes it, as SMTP's 421 does). Its two protocol families:

  * :class:`IMAPCommandError` (:class:`IMAPNoResponse`, :class:`IMAPBadResponse`) --
    a tagged NO or BAD, with the server's text and response code.
  * :class:`SMTPReplyError` (:class:`SMTPTransientError` for 4xx,
    :class:`SMTPPermanentError` for 5xx) -- an SMTP error reply.

  Whether a refusal may succeed later is told by the subclass alone (there is no
  separate ``transient`` flag to disagree with it).
* :class:`StateError` -- the durable state store cannot be used (in use by another
  process, written by another prxmail version -- :class:`StateSchemaError` --,
  corrupt). Never papered over: running on without durable state would break
  "nothing lost, nothing answered twice".
* :class:`HandlerError` -- an external handler command could not be run at all (not
  found, not executable, out of resources). A handler that runs and fails is not an
  error but a failed result; this one is not the message's fault, so the caller should
  keep the message for later instead of recording it as failed.

Timeouts belong to the caller (``trio.fail_after``): a timeout surfaces as
``trio.TooSlowError`` at the caller's scope, and the connection it interrupted then
raises :class:`ConnectionBrokenError` on every later call.

Trio's ``ClosedResourceError``/``BrokenResourceError``, ``OSError`` and
``ssl.SSLError`` are translated into this tree only at the transport boundary, by one
:func:`map_exceptions` block per client, with ``raise ... from`` (httpcore's
``_exceptions.py`` is the model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

__all__ = [
    "AuthenticationError",
    "CommandRefusedError",
    "ConfigError",
    "ConnectionBrokenError",
    "HandlerError",
    "IMAPBadResponse",
    "IMAPCommandError",
    "IMAPNoResponse",
    "LocalProtocolError",
    "ProtocolError",
    "PrxmailError",
    "RemoteProtocolError",
    "SMTPPermanentError",
    "SMTPReplyError",
    "SMTPTransientError",
    "StateError",
    "StateSchemaError",
    "TLSError",
]

# How many bytes of offending input a RemoteProtocolError keeps: enough to recognise
# the response in a log line, small enough that a hostile server cannot make our
# error messages (and logs) large.
EXCERPT_LIMIT = 80


class PrxmailError(Exception):
    """Base class of every error prxmail raises on purpose."""


class ConfigError(PrxmailError):
    """The configuration cannot be used.

    Attributes:
        problems: Every problem found, each a readable line naming the key path,
            e.g. ``"expected an integer 1..65535 @ $.channels_config.email.imap_port"``.
    """

    def __init__(self, problems: list[str] | tuple[str, ...], *, source: str | None = None):
        self.problems = tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class ProtocolError(PrxmailError):
    """The conversation broke its rules: see the two subclasses for whose fault."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol or the connection state forbids."""


class RemoteProtocolError(ProtocolError):
    """The server sent something that breaks the protocol.

    Attributes:
        excerpt: At most :data:`EXCERPT_LIMIT` bytes of the offending input.
    """

    def __init__(self, message: str, *, excerpt: bytes = b""):
        self.excerpt = bytes(excerpt[:EXCERPT_LIMIT])
        shown = f" (near {self.excerpt!r})" if self.excerpt else ""
        super().__init__(f"{message}{shown}")


class ConnectionBrokenError(PrxmailError):
    """The connection cannot be used any more; open a new one."""


class TLSError(PrxmailError):
    """TLS could not be established as the configuration requires."""


class AuthenticationError(PrxmailError):
    """The server refused the credentials.

    Attributes:
        protocol: ``"imap"`` or ``"smtp"``.
        server_text: The server's explanation, with any secret removed.
        code: The IMAP response code (e.g. ``"AUTHENTICATIONFAILED"``) or the SMTP
            reply code as a string (e.g. ``"535"``), when the server gave one.
    """

    def __init__(
        self, message: str, *, protocol: str, server_text: str = "", code: str | None = None
    ):
        self.protocol = protocol
        self.server_text = server_text
        self.code = code
        super().__init__(message)


class CommandRefusedError(PrxmailError):
    """The server answered a command with a refusal (IMAP NO/BAD, SMTP 4xx/5xx).

    Attributes:
        command: The command refused, e.g. ``"SELECT"`` or ``"RCPT"``.
        text: The server's explanation.
    """

    def __init__(self, message: str, *, command: str, text: str) -> None:
        self.command = command
        self.text = text
        super().__init__(message)


class IMAPCommandError(CommandRefusedError):
    """An IMAP command completed with a tagged NO or BAD.

    Attributes:
        command: The command name, e.g. ``"SELECT"``.
        status: ``"NO"`` or ``"BAD"``.
        code: The response code atom without brackets (``"TRYCREATE"``), or ``None``.
        text: The human-readable text the server sent.
    """

    def __init__(self, command: str, status: str, text: str, code: str | None = None):
        self.status = status
        self.code = code
        shown_code = f"[{code}] " if code else ""
        super().__init__(
            f"{command} failed: {status} {shown_code}{text}", command=command, text=text
        )


class IMAPNoResponse(IMAPCommandError):
    """Tagged NO: the server understood the command and refused it."""


class IMAPBadResponse(IMAPCommandError):
    """Tagged BAD: the server did not accept the command as valid."""


class SMTPReplyError(CommandRefusedError):
    """The SMTP server answered a command with an error reply.

    Attributes:
        command: The command the reply answers, e.g. ``"RCPT"``.
        code: The three-digit reply code.
        enhanced: The RFC 3463 enhanced status code (``"5.1.1"``), or ``None``.
        text: The reply text, lines joined with newlines.
    """

    def __init__(self, command: str, code: int, text: str, enhanced: str | None = None):
        self.code = code
        self.enhanced = enhanced
        shown = f" {enhanced}" if enhanced else ""
        super().__init__(f"{command} failed: {code}{shown} {text}", command=command, text=text)


class SMTPTransientError(SMTPReplyError):
    """A 4xx reply: try again later."""


class SMTPPermanentError(SMTPReplyError):
    """A 5xx reply: do not retry unchanged."""


class StateError(PrxmailError):
    """The durable state store cannot be opened or used.

    Raised when the state directory is locked by another running prxmail, when the
    database was written by a newer prxmail (unknown schema version), or when SQLite
    reports the file as unusable.
    """


class StateSchemaError(StateError):
    """The state database has a schema version this prxmail does not read as it is.

    An older database is migrated by the next start of the service (it opens the store
    for writing); a newer one needs a newer prxmail. Read-only users (``prxmail
    doctor``) tell the two apart by the attributes, not by the message.

    Attributes:
        found: The database's schema version.
        supported: The version this prxmail reads and writes.
    """

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(message)


class HandlerError(PrxmailError):
    """An external handler command could not be started.

    Attributes:
        argv0: The program that was to be run.
    """

    def __init__(self, message: str, *, argv0: str):
        self.argv0 = argv0
        super().__init__(message)


@contextlib.contextmanager
def map_exceptions(
    mapping: Mapping[
        type[BaseException] | tuple[type[BaseException], ...],
        Callable[[BaseException], PrxmailError],
    ],
) -> Iterator[None]:
    """Translate foreign exceptions into this tree, keeping the original as cause.

    Each client wraps its transport calls in one such block (httpcore's
    ``map_exceptions``), so the translation lives in one place instead of an
    ``except`` at every call site. Exceptions of this tree and cancellation pass
    through untouched.

    Args:
        mapping: Exception types (checked in order) to a factory building the
            replacement from the original.

    Raises:
        PrxmailError: what the factory built, ``from`` the original exception.
    """
    try:
        yield
    except PrxmailError:
        raise
    except Exception as exc:
        for source, build in mapping.items():
            if isinstance(exc, source):
                raise build(exc) from exc
        raise
