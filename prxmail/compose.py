"""Composing outgoing mail: threaded replies and fresh messages, as SMTP-ready bytes.

Everything that goes into a header -- the parent's subject, display names, the
configured subject -- comes from outside and is treated as hostile: control
characters (CR and LF above all) are turned into spaces *before* the stdlib
``email`` package sees them, and the serialised header section is checked again
afterwards to hold exactly the fields we set. The handler's output only ever becomes
the body: a body that starts with ``"Bcc: x"`` is body text, because the header
section is closed before it is written.

Encoding: headers use RFC 2047 encoded words for non-ASCII text (raw UTF-8 only when
an address itself is non-ASCII, which needs SMTPUTF8 anyway -- see
:attr:`OutgoingMessage.smtputf8`); the UTF-8 body is ``7bit`` when it is plain
short-lined ASCII, otherwise quoted-printable or base64, whichever is shorter, so
the message never needs 8BITMIME. Lines end in CRLF. The bytes are *not*
dot-stuffed: that is the SMTP client's job when it sends DATA.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.headerregistry
import email.policy
import email.utils
import re
import secrets
import unicodedata
from collections.abc import Sequence
from email.message import EmailMessage

import attrs

from prxmail.errors import LocalProtocolError
from prxmail.message import MAX_MESSAGE_ID_CHARS, Address, Message

__all__ = [
    "OutgoingMessage",
    "compose_message",
    "compose_reply",
    "make_message_id",
    "reply_subject",
    "thread_references",
]

# References we write: the thread's first id and the most recent ones. RFC 5322
# 3.6.4 lets a writer trim the list; keeping the root and the recent tail is what
# threading clients need, and 20 ids (~1.2 KB) is well within any server's header
# limits while covering any thread a person follows.
MAX_REFERENCES = 20

# A subject longer than this is cut. RFC 5322 recommends lines of 78 characters;
# subjects fold over several lines, but past a few hundred characters a subject is
# junk (or an attack on someone's mail client) and we do not repeat it.
MAX_SUBJECT_CHARS = 500

# Display names longer than this are cut, for the same reason.
MAX_DISPLAY_NAME_CHARS = 200

# Lines of a 7bit body at most this long (RFC 5322 2.1.1 "SHOULD" limit); longer
# lines make us choose quoted-printable, which wraps them.
_SEVEN_BIT_LINE = 78

# Reply prefixes in common languages, with counters ("Re[2]:", "Re(3):") and the
# full-width colon of CJK mailers. Forward markers (Fwd:) are kept on purpose.
_REPLY_PREFIX = re.compile(
    r"^(?:\s*(?:re|aw|sv|antw|antwort|vs|odp|res|ynt|回复|答复|回覆)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:\uff1a])+\s*",
    re.IGNORECASE,
)
_WHITESPACE_RUN = re.compile(r"\s+")
_ADDR_SPEC = re.compile(r"^[^\s@<>()\[\],;:\\\"]+@[^\s@<>()\[\],;:\\\"]+$")


@attrs.frozen
class OutgoingMessage:
    """A composed message, ready to be stored in the outbox and sent.

    Attributes:
        message_id: Its Message-ID, ``"<...@our.domain>"``.
        to: The recipients (header To and envelope).
        subject: The subject as written (before encoding).
        in_reply_to: The parent's Message-ID, or None for fresh mail.
        references: The References chain written, oldest first.
        raw: The complete message, CRLF line ends, not dot-stuffed.
        envelope_sender: The SMTP ``MAIL FROM`` address (``""`` = null path).
        envelope_recipients: The SMTP ``RCPT TO`` addresses.
        smtputf8: True when an address is non-ASCII, so the SMTP server must offer
            SMTPUTF8 (RFC 6531) for this message.
    """

    message_id: str
    to: tuple[Address, ...]
    subject: str
    in_reply_to: str | None
    references: tuple[str, ...]
    raw: bytes = attrs.field(repr=False)
    envelope_sender: str
    envelope_recipients: tuple[str, ...]
    smtputf8: bool = False


# -- helpers ------------------------------------------------------------------------


def _header_text(value: str, limit: int) -> str:
    """Text safe for a header: no control/format characters, single spaces, bounded.

    The stdlib header classes *decode* RFC 2047 encoded words in values we set
    (Python 3.11 before 3.11.10 then writes a decoded CR/LF straight into the
    header section, CVE-2024-6923). Text reaching here is already decoded, so any
    ``=?`` left is literal: it is broken up so it can never be taken for an
    encoded word.
    """
    cleaned = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
        for ch in value
        if unicodedata.category(ch) not in ("Cs", "Cf")
    )
    cleaned = _WHITESPACE_RUN.sub(" ", cleaned).strip()[:limit].strip()
    while "=?" in cleaned:
        cleaned = cleaned.replace("=?", "= ?")
    return cleaned


def _check_address(addr: str, what: str) -> str:
    addr = addr.strip()
    if not _ADDR_SPEC.match(addr) or len(addr) > 254:
        raise LocalProtocolError(f"{what} {addr!r} is not a plain user@domain address")
    if any(unicodedata.category(ch)[0] in "CZ" for ch in addr):
        raise LocalProtocolError(f"{what} {addr!r} contains control or space characters")
    return addr


def _ascii_domain(addr: str) -> str:
    domain = addr.rpartition("@")[2].rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise LocalProtocolError(f"cannot use the domain of {addr!r} in a Message-ID") from exc


def _valid_id(message_id: str) -> bool:
    return (
        len(message_id) <= MAX_MESSAGE_ID_CHARS
        and message_id.startswith("<")
        and message_id.endswith(">")
        and len(message_id) > 2
        and all("!" <= ch <= "~" and ch not in "<>" for ch in message_id[1:-1])
        # Would be decoded as an encoded word by the stdlib (see _header_text).
        and "=?" not in message_id
    )


def make_message_id(from_address: str) -> str:
    """A fresh Message-ID on the domain of ``from_address``.

    128 random bits from :mod:`secrets`, so ids never collide across processes,
    hosts or restarts (``email.utils.make_msgid`` uses 64 bits of a non-secret
    PRNG plus the time and pid).

    Args:
        from_address: Our address; its domain (IDNA-encoded) becomes the id's right
            side.

    Returns:
        ``"<32 hex digits@domain>"``.

    Raises:
        LocalProtocolError: ``from_address`` is not a plain address.
    """
    domain = _ascii_domain(_check_address(from_address, "from_address"))
    return f"<{secrets.token_hex(16)}@{domain}>"


def reply_subject(subject: str, default_subject: str) -> str:
    """The subject of a reply: ``"Re: "`` once, in front of the original.

    Any chain of reply prefixes (``Re:``, ``RE:``, ``Aw:``, ``Sv:``, ``Antw:``,
    ``Re[2]:``, ``Re(3):``, ``回复`` with a full-width colon ..., in any case and
    with any spacing) is removed first, so the result never reads
    ``"Re: Re: ..."``. Control characters become spaces.

    Args:
        subject: The parent's subject.
        default_subject: Used (without ``"Re: "``) when the parent has no subject.

    Returns:
        The subject, at most :data:`MAX_SUBJECT_CHARS` characters.
    """
    text = _header_text(subject, MAX_SUBJECT_CHARS * 2)
    stripped = _REPLY_PREFIX.sub("", text, count=1).strip()
    if not stripped:
        return _header_text(default_subject, MAX_SUBJECT_CHARS)
    return _header_text("Re: " + stripped, MAX_SUBJECT_CHARS)


def thread_references(parent: Message) -> tuple[str, ...]:
    """The References of a reply to ``parent`` (RFC 5322 section 3.6.4).

    The parent's References (or, without them, its In-Reply-To) followed by the
    parent's Message-ID; duplicates and ids unusable on the wire dropped; when
    longer than :data:`MAX_REFERENCES`, the first (thread root) and the most recent
    ones are kept. A substitute Message-ID (the parent had none) is not written:
    no other mail system knows it.

    Args:
        parent: The message being answered.

    Returns:
        The ids, oldest first.
    """
    base = list(parent.references)
    if not base and parent.in_reply_to:
        base = [parent.in_reply_to]
    if not parent.message_id_missing:
        base = [ident for ident in base if ident != parent.message_id]
        base.append(parent.message_id)
    chain = [ident for ident in dict.fromkeys(base) if _valid_id(ident)]
    if len(chain) > MAX_REFERENCES:
        chain = [chain[0], *chain[-(MAX_REFERENCES - 1) :]]
    return tuple(chain)


def _choose_cte(body: str) -> str:
    lines = body.split("\n")
    if all((" " <= ch <= "~") or ch == "\t" for line in lines for ch in line) and all(
        len(line) <= _SEVEN_BIT_LINE for line in lines
    ):
        return "7bit"
    data = body.encode("utf-8")
    plain = sum(1 for byte in data if 32 <= byte < 127 or byte in (9, 10))
    quoted_length = plain + 3 * (len(data) - plain)
    base64_length = len(base64.b64encode(data))
    return "quoted-printable" if quoted_length <= base64_length else "base64"


def _normalise_body(body: str) -> str:
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    # Lone surrogates (a handler decoding bytes with surrogateescape) cannot be
    # encoded; they become "?" rather than an exception at send time.
    body = body.encode("utf-8", "replace").decode("utf-8")
    if not body.endswith("\n"):
        body += "\n"
    return body


def _mailbox(address: Address, what: str) -> email.headerregistry.Address:
    addr = _check_address(address.addr, what)
    name = _header_text(address.name, MAX_DISPLAY_NAME_CHARS)
    try:
        if addr.isascii():
            return email.headerregistry.Address(display_name=name, addr_spec=addr)
        # The addr-spec parser refuses non-ASCII local parts even though RFC 6532
        # allows them (with SMTPUTF8); give the parts directly.
        local, _, domain = addr.rpartition("@")
        return email.headerregistry.Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError, TypeError) as exc:
        raise LocalProtocolError(f"{what} {addr!r} cannot be written in a header") from exc


def _verify_header_section(raw: bytes, expected: set[str]) -> None:
    """Defence in depth: the header section holds exactly the fields we set."""
    head, separator, _ = raw.partition(b"\r\n\r\n")
    if not separator:
        raise LocalProtocolError("composed message has no header/body separator")
    seen: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or len(line) > 998:
            raise LocalProtocolError("composed header line is malformed or too long")
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if not colon:
            raise LocalProtocolError("composed header section contains a non-header line")
        seen.append(name.decode("ascii", "replace").lower())
    if sorted(seen) != sorted(expected):
        raise LocalProtocolError(f"composed header fields {seen} differ from those set")


# -- composition ----------------------------------------------------------------------


def compose_message(
    *,
    from_address: str,
    to: Address | Sequence[Address],
    subject: str,
    body: str,
    default_subject: str = "",
    from_name: str = "",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str | None = "auto-generated",
    envelope_sender: str | None = None,
    now: _dt.datetime | None = None,
) -> OutgoingMessage:
    """Compose a text/plain UTF-8 message.

    Args:
        from_address: Our address, written as From.
        to: The recipient(s).
        subject: The subject (control characters become spaces).
        body: The text; becomes the body and nothing else, whatever it contains.
        default_subject: Used when ``subject`` is empty.
        from_name: Display name for From, may be empty.
        message_id: A pre-allocated Message-ID (``"<...>"``, e.g. stored in the
            outbox before sending); a fresh one from :func:`make_message_id` when
            None.
        in_reply_to: Parent Message-ID for threading, or None.
        references: References chain to write (ids invalid on the wire dropped).
        auto_submitted: The Auto-Submitted value (RFC 3834): ``"auto-generated"``
            for mail an automaton sends on its own, ``"auto-replied"`` for replies,
            None to leave the header out.
        envelope_sender: SMTP MAIL FROM; ``from_address`` when None, ``""`` for
            the null reverse-path.
        now: The Date, an aware datetime; the current time when None.

    Returns:
        The composed message.

    Raises:
        LocalProtocolError: An address is not a plain ``user@domain``, the
            message id is malformed, or the result would not be a clean message.
        ValueError: ``now`` is a naive datetime.
    """
    recipients = (to,) if isinstance(to, Address) else tuple(to)
    if not recipients:
        raise LocalProtocolError("a message needs at least one recipient")
    if now is None:
        now = _dt.datetime.now(_dt.UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    sender_box = _mailbox(Address(from_address, from_name), "from_address")
    to_boxes = [_mailbox(r, "recipient") for r in recipients]
    if message_id is None:
        message_id = make_message_id(from_address)
    elif not _valid_id(message_id):
        raise LocalProtocolError(f"message_id {message_id!r} is not a valid <id@domain>")
    if in_reply_to is not None and not _valid_id(in_reply_to):
        in_reply_to = None
    chain = tuple(ident for ident in dict.fromkeys(references) if _valid_id(ident))
    envelope = from_address.strip() if envelope_sender is None else envelope_sender.strip()
    if envelope:
        _check_address(envelope, "envelope_sender")

    smtputf8 = (
        not all(box.addr_spec.isascii() for box in (sender_box, *to_boxes))
        or not envelope.isascii()
    )
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    final_subject = _header_text(subject, MAX_SUBJECT_CHARS) or _header_text(
        default_subject, MAX_SUBJECT_CHARS
    )

    message = EmailMessage(policy=policy)
    message["From"] = sender_box
    message["To"] = to_boxes
    message["Date"] = email.utils.format_datetime(now)
    message["Message-ID"] = message_id
    expected = {"from", "to", "date", "message-id"}
    if final_subject:
        message["Subject"] = final_subject
        expected.add("subject")
    if in_reply_to is not None:
        message["In-Reply-To"] = in_reply_to
        expected.add("in-reply-to")
    if chain:
        message["References"] = " ".join(chain)
        expected.add("references")
    if auto_submitted is not None:
        message["Auto-Submitted"] = _header_text(auto_submitted, 100)
        expected.add("auto-submitted")
    text = _normalise_body(body)
    message.set_content(text, subtype="plain", charset="utf-8", cte=_choose_cte(text))
    expected.update({"content-type", "content-transfer-encoding", "mime-version"})

    raw = message.as_bytes(policy=policy)
    _verify_header_section(raw, expected)
    return OutgoingMessage(
        message_id=message_id,
        to=recipients,
        subject=final_subject,
        in_reply_to=in_reply_to,
        references=chain,
        raw=raw,
        envelope_sender=envelope,
        envelope_recipients=tuple(box.addr_spec for box in to_boxes),
        smtputf8=smtputf8,
    )


def compose_reply(
    parent: Message,
    body: str,
    *,
    from_address: str,
    to: Address,
    default_subject: str,
    from_name: str = "",
    message_id: str | None = None,
    envelope_sender: str | None = None,
    now: _dt.datetime | None = None,
) -> OutgoingMessage:
    """Compose the threaded reply to ``parent``.

    Subject ``"Re: "`` + the parent's subject without doubling prefixes
    (:func:`reply_subject`; ``default_subject`` when the parent has none);
    In-Reply-To the parent's Message-ID; References per
    :func:`thread_references`; a fresh Message-ID on our domain; Date; From;
    ``Auto-Submitted: auto-replied``; MIME-Version and a UTF-8 text/plain body.

    Args:
        parent: The message being answered.
        body: The handler's answer; it can never add or change headers.
        from_address: Our address.
        to: The recipient, usually from
            :func:`prxmail.policy.choose_reply_recipient`.
        default_subject: Subject used when the parent has none.
        from_name: Display name for From.
        message_id: A pre-allocated Message-ID, or None for a fresh one.
        envelope_sender: SMTP MAIL FROM; ``from_address`` when None.
        now: The Date (aware); the current time when None.

    Returns:
        The composed reply.

    Raises:
        LocalProtocolError: An address or the message id cannot be written safely.
        ValueError: ``now`` is naive.
    """
    in_reply_to = None if parent.message_id_missing else parent.message_id
    return compose_message(
        from_address=from_address,
        to=to,
        subject=reply_subject(parent.subject, default_subject),
        body=body,
        default_subject=default_subject,
        from_name=from_name,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=thread_references(parent),
        auto_submitted="auto-replied",
        envelope_sender=envelope_sender,
        now=now,
    )
