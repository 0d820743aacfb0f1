"""The EmailMessage-based ``compose_message`` prxmail shipped before it wrote headers itself.

Kept, unchanged apart from its names, only as the reference the differential tests in
``test_compose_reference.py`` hold the fast writer to: both outputs are parsed with
the stdlib and must say the same thing. Not used by the library.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.headerregistry
import email.policy
import email.utils
import re
import unicodedata
from collections.abc import Sequence
from email.message import EmailMessage

from prxmail.compose import MAX_DISPLAY_NAME_CHARS, MAX_SUBJECT_CHARS, _verify_header_section
from prxmail.errors import LocalProtocolError
from prxmail.message import MAX_MESSAGE_ID_CHARS, Address

_SEVEN_BIT_LINE = 78
_WHITESPACE_RUN = re.compile(r"\s+")


_ADDR_SPEC = re.compile(r"^[^\s@<>()\[\],;:\\\"]+@[^\s@<>()\[\],;:\\\"]+$")


def reference_check_address(addr: str, what: str) -> str:
    addr = addr.strip()
    if not _ADDR_SPEC.match(addr) or len(addr) > 254:
        raise LocalProtocolError(f"{what} {addr!r} is not a plain user@domain address")
    if any(unicodedata.category(ch)[0] in "CZ" for ch in addr):
        raise LocalProtocolError(f"{what} {addr!r} contains control or space characters")
    return addr


def reference_valid_id(message_id: str) -> bool:
    return (
        len(message_id) <= MAX_MESSAGE_ID_CHARS
        and message_id.startswith("<")
        and message_id.endswith(">")
        and len(message_id) > 2
        and all("!" <= ch <= "~" and ch not in "<>" for ch in message_id[1:-1])
        and "=?" not in message_id
    )


def reference_header_text(value: str, limit: int) -> str:
    cleaned = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch
        for ch in value
        if unicodedata.category(ch) not in ("Cs", "Cf")
    )
    cleaned = _WHITESPACE_RUN.sub(" ", cleaned).strip()[:limit].strip()
    while "=?" in cleaned:
        cleaned = cleaned.replace("=?", "= ?")
    return cleaned


def reference_choose_cte(body: str) -> str:
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


def reference_normalise_body(body: str) -> str:
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    body = body.encode("utf-8", "replace").decode("utf-8")
    if not body.endswith("\n"):
        body += "\n"
    return body


def _mailbox(address: Address, what: str) -> email.headerregistry.Address:
    addr = reference_check_address(address.addr, what)
    name = reference_header_text(address.name, MAX_DISPLAY_NAME_CHARS)
    try:
        if addr.isascii():
            return email.headerregistry.Address(display_name=name, addr_spec=addr)
        local, _, domain = addr.rpartition("@")
        return email.headerregistry.Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError, TypeError) as exc:
        raise LocalProtocolError(f"{what} {addr!r} cannot be written in a header") from exc


def reference_compose_raw(
    *,
    from_address: str,
    to: Sequence[Address],
    subject: str,
    body: str,
    message_id: str,
    now: _dt.datetime,
    default_subject: str = "",
    from_name: str = "",
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    auto_submitted: str | None = "auto-generated",
    envelope_sender: str | None = None,
) -> tuple[bytes, bool, tuple[str, ...]]:
    """The old composition: (raw, smtputf8, envelope recipients); message_id is given."""
    sender_box = _mailbox(Address(from_address, from_name), "from_address")
    to_boxes = [_mailbox(r, "recipient") for r in to]
    if in_reply_to is not None and not reference_valid_id(in_reply_to):
        in_reply_to = None
    chain = tuple(ident for ident in dict.fromkeys(references) if reference_valid_id(ident))
    envelope = from_address.strip() if envelope_sender is None else envelope_sender.strip()
    if envelope:
        reference_check_address(envelope, "envelope_sender")
    smtputf8 = (
        not all(box.addr_spec.isascii() for box in (sender_box, *to_boxes))
        or not envelope.isascii()
    )
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    final_subject = reference_header_text(subject, MAX_SUBJECT_CHARS) or reference_header_text(
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
        message["Auto-Submitted"] = reference_header_text(auto_submitted, 100)
        expected.add("auto-submitted")
    text = reference_normalise_body(body)
    message.set_content(text, subtype="plain", charset="utf-8", cte=reference_choose_cte(text))
    expected.update({"content-type", "content-transfer-encoding", "mime-version"})
    raw = message.as_bytes(policy=policy)
    _verify_header_section(raw, expected)
    return raw, smtputf8, tuple(box.addr_spec for box in to_boxes)
