"""The message model: frozen values handlers, the sender policy and replies read.

Theory of operation: a :class:`Message` is built once, by
:func:`~prxmail.message.parse_message`, from bounded and decoded parts; every
field is plain data (no parser objects), so it can cross threads and be compared
and logged freely. The substitute Message-ID is a pure function of the mailbox
slot, so the same mail always gets the same one.
"""

from __future__ import annotations

import datetime as _dt

import attrs

# The domain of substitute Message-IDs. ".invalid" is reserved (RFC 2606), so a
# substitute can never collide with an id a real mail system generated.
MISSING_ID_DOMAIN = "missing.invalid"


@attrs.frozen
class Address:
    """One mailbox from an address header.

    Attributes:
        addr: The address (``local@domain``) as written, case preserved; ``""`` when
            the header was missing or held no usable mailbox.
        name: The decoded display name, ``""`` when there is none.
    """

    addr: str
    name: str = ""

    @property
    def domain(self) -> str:
        """The lower-cased part after the last ``@``, or ``""`` without one."""
        _, at, domain = self.addr.rpartition("@")
        return domain.lower() if at else ""


@attrs.frozen
class Attachment:
    """An attachment (or inline non-text part) of a message.

    Attributes:
        filename: A sanitised name safe to use as a file name: no directory parts,
            no control or format characters, no leading dots, at most
            :data:`MAX_FILENAME_BYTES` UTF-8 bytes. Parts without a name get
            ``attachment-N`` with an extension from the content type.
        content_type: The lower-cased MIME type, e.g. ``"application/pdf"``.
        size: The decoded size in bytes (estimated from the encoded length when the
            content was over the limit and therefore not decoded).
        content: The decoded bytes, or ``None`` when ``size`` is over the
            ``max_attachment_bytes`` given to :func:`parse_message`.
    """

    filename: str
    content_type: str
    size: int
    content: bytes | None = attrs.field(default=None, repr=False)


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


@attrs.frozen(kw_only=True)
class Message:
    """A received message, decoded and bounded.

    Header-derived text is decoded to ``str`` and never contains CR, LF or other
    control characters. Message-IDs are kept with their angle brackets
    (``"<id@host>"``).

    Attributes:
        uid: The IMAP UID.
        uidvalidity: The UIDVALIDITY of the folder the UID belongs to.
        message_id: The Message-ID; when the message has none (or an unusable one)
            a stable substitute ``"<UIDVALIDITY.UID.prxmail@missing.invalid>"`` that
            is the same every time this mail is parsed.
        message_id_missing: True when :attr:`message_id` is such a substitute.
        from_: The (first) From mailbox; ``Address("")`` when there is none.
        from_all: Every mailbox found in From headers (RFC 5322 allows several;
            the sender policy refuses such mail as ambiguous).
        sender: The Sender address, or ``None``.
        return_path: The Return-Path address the delivering server recorded:
            ``""`` for the null path ``<>`` (a bounce), ``None`` when absent.
        to, cc, reply_to: The mailboxes of those headers.
        subject: The decoded subject, ``""`` when missing.
        date: The Date as an aware datetime in UTC, or ``None`` when missing or
            unparseable.
        in_reply_to: The first Message-ID in In-Reply-To, or ``None``.
        references: The Message-IDs in References, oldest first.
        text: The body as plain text: text/plain parts preferred, otherwise the
            HTML converted to readable text. Lines end in ``"\\n"``. The text of
            attached messages (message/rfc822) follows the main text, as
            mail-parser presents it.
        html: The raw HTML body, or ``None`` when there is none.
        attachments: Attachments and inline non-text parts, in MIME order.
        authentication_results: Raw Authentication-Results values, topmost first.
        auto_submitted: The Auto-Submitted value, or ``None`` when absent.
        precedence: The Precedence value, or ``None``.
        list_id: The List-Id value, or ``None``.
        list_unsubscribe: The List-Unsubscribe value, or ``None``.
        content_type: The lower-cased top-level MIME type.
        size: The size of the raw message in bytes.
        defects: Short names of what was wrong with the input, for logging.
        thread_id: The conversation the message belongs to
            (:func:`prxmail.conversation.message_thread_id`), set by the channel
            when it admits the message; ``""`` on a message not admitted yet.
    """

    uid: int = attrs.field(validator=_non_negative)
    uidvalidity: int = attrs.field(validator=_non_negative)
    message_id: str
    message_id_missing: bool = False
    from_: Address = Address("")
    from_all: tuple[Address, ...] = ()
    sender: str | None = None
    return_path: str | None = None
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    date: _dt.datetime | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    text: str = attrs.field(default="", repr=False)
    html: str | None = attrs.field(default=None, repr=False)
    attachments: tuple[Attachment, ...] = ()
    authentication_results: tuple[str, ...] = ()
    auto_submitted: str | None = None
    precedence: str | None = None
    list_id: str | None = None
    list_unsubscribe: str | None = None
    content_type: str = "text/plain"
    size: int = 0
    defects: tuple[str, ...] = ()
    thread_id: str = ""


def missing_message_id(uid: int, uidvalidity: int) -> str:
    """The substitute Message-ID of a message that has none.

    Args:
        uid: The message's IMAP UID.
        uidvalidity: The folder's UIDVALIDITY.

    Returns:
        ``"<UIDVALIDITY.UID.prxmail@missing.invalid>"`` -- stable for the same
        mailbox slot, unique within one folder, never a real mail system's id.
    """
    return f"<{uidvalidity}.{uid}.prxmail@{MISSING_ID_DOMAIN}>"
