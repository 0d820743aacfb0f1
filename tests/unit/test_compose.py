"""compose_reply / compose_message: threading, encoding, and no header injection."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.compose import (
    MAX_REFERENCES,
    MAX_SUBJECT_CHARS,
    OutgoingMessage,
    compose_message,
    compose_reply,
    make_message_id,
    reply_subject,
    thread_references,
)
from prxmail.errors import LocalProtocolError
from prxmail.message import Address, Message, parse_message

NOW = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
BOT = "bot@ours.example"
ALICE = Address("alice@example.com", "Alice")


def parent(**fields: object) -> Message:
    fields.setdefault("message_id", "<p1@example.com>")
    fields.setdefault("subject", "Quarterly numbers")
    return Message(uid=1, uidvalidity=1, from_=ALICE, from_all=(ALICE,), **fields)  # type: ignore[arg-type]


def reply(message: Message, body: str = "Thanks!", **kwargs: object) -> OutgoingMessage:
    kwargs.setdefault("from_address", BOT)
    kwargs.setdefault("to", message.from_)
    kwargs.setdefault("default_subject", "PRX Message")
    kwargs.setdefault("now", NOW)
    return compose_reply(message, body, **kwargs)  # type: ignore[arg-type]


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    """Header (name, value) pairs as an independent parser reads them."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    return [(name.lower(), str(value)) for name, value in parsed.items()]


def body_of(raw: bytes) -> str:
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    content = parsed.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


REPLY_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "content-type",
    "content-transfer-encoding",
    "mime-version",
}


# -- the reply ----------------------------------------------------------------------


def test_reply_headers() -> None:
    out = reply(parent(references=("<root@example.com>",), in_reply_to="<root@example.com>"))
    headers = dict(headers_of(out.raw))
    assert set(headers) == REPLY_HEADERS
    assert headers["from"] == BOT
    assert headers["to"] == "Alice <alice@example.com>"
    assert headers["subject"] == "Re: Quarterly numbers"
    assert headers["date"] == "Tue, 04 Mar 2025 05:06:07 +0000"
    assert headers["message-id"] == out.message_id
    assert headers["in-reply-to"] == "<p1@example.com>"
    assert headers["references"] == "<root@example.com> <p1@example.com>"
    assert headers["auto-submitted"] == "auto-replied"
    assert headers["mime-version"] == "1.0"
    assert headers["content-type"] == 'text/plain; charset="utf-8"'
    assert out.in_reply_to == "<p1@example.com>"
    assert out.references == ("<root@example.com>", "<p1@example.com>")
    assert out.to == (ALICE,)
    assert out.envelope_sender == BOT
    assert out.envelope_recipients == ("alice@example.com",)
    assert not out.smtputf8
    assert body_of(out.raw) == "Thanks!\n"


def test_raw_uses_crlf_only() -> None:
    raw = reply(parent(), "one\ntwo\rthree\r\nfour").raw
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_message_ids_are_fresh_random_and_on_our_domain() -> None:
    ids = {reply(parent()).message_id for _ in range(50)}
    assert len(ids) == 50
    for ident in ids:
        assert re.fullmatch(r"<[0-9a-f]{32}@ours\.example>", ident)


def test_message_id_domain_is_idna_encoded() -> None:
    assert make_message_id("bot@bücher.example").endswith("@xn--bcher-kva.example>")


def test_preallocated_message_id_is_used_and_checked() -> None:
    assert reply(parent(), message_id="<fixed.1@ours.example>").message_id == (
        "<fixed.1@ours.example>"
    )
    for bad in ("fixed@ours.example", "<a b@c>", "<x@y>\r\nBcc: v@x", "<>"):
        with pytest.raises(LocalProtocolError):
            reply(parent(), message_id=bad)


def test_reply_parses_back_as_a_threaded_message() -> None:
    original = parse_message(
        b"From: Alice <alice@example.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        b"Message-ID: <p1@example.com>\r\nReferences: <r0@example.com>\r\n\r\nhi",
        uid=1,
        uidvalidity=1,
        max_attachment_bytes=0,
    )
    out = reply(original, "Antwort: schön")
    back = parse_message(out.raw, uid=2, uidvalidity=1, max_attachment_bytes=0)
    assert back.subject == "Re: Grüße"
    assert back.in_reply_to == "<p1@example.com>"
    assert back.references == ("<r0@example.com>", "<p1@example.com>")
    assert back.message_id == out.message_id
    assert back.from_ == Address(BOT)
    assert back.auto_submitted == "auto-replied"
    assert back.text == "Antwort: schön"


# -- subject ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Hello", "Re: Hello"),
        ("Re: Hello", "Re: Hello"),
        ("RE: Hello", "Re: Hello"),
        ("re:Hello", "Re: Hello"),
        ("Re: Re: RE: Hello", "Re: Hello"),
        ("Aw: Hello", "Re: Hello"),
        ("AW: Re: Hello", "Re: Hello"),
        ("Sv: Hello", "Re: Hello"),
        ("Antw: Hello", "Re: Hello"),
        ("Re[2]: Hello", "Re: Hello"),
        ("Re(3): Hello", "Re: Hello"),
        ("RE : Hello", "Re: Hello"),
        ("  Re:   Hello  ", "Re: Hello"),
        ("回复\uff1a Hello", "Re: Hello"),
        ("Fwd: Hello", "Re: Fwd: Hello"),
        ("Regarding: Hello", "Re: Regarding: Hello"),
        ("Reply needed", "Re: Reply needed"),
        ("Hello Re: there", "Re: Hello Re: there"),
        ("", "PRX Message"),
        ("   ", "PRX Message"),
        ("Re:", "PRX Message"),
        ("Line\r\nBcc: evil@x.org", "Re: Line Bcc: evil@x.org"),
        ("Tab\there\x00nul", "Re: Tab here nul"),
    ],
)
def test_reply_subject(subject: str, expected: str) -> None:
    assert reply_subject(subject, "PRX Message") == expected


def test_reply_subject_is_bounded() -> None:
    assert len(reply_subject("x" * 10_000, "d")) == MAX_SUBJECT_CHARS


def test_reply_without_parent_subject_uses_default() -> None:
    out = reply(parent(subject=""))
    assert dict(headers_of(out.raw))["subject"] == "PRX Message"
    assert out.subject == "PRX Message"


def test_non_ascii_subject_is_encoded_and_folded() -> None:
    out = reply(parent(subject="Grüße aus Köln " * 12))
    head = out.raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert b"=?utf-8?" in head
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    assert dict(headers_of(out.raw))["subject"] == out.subject


# -- threading ----------------------------------------------------------------------


def test_references_fall_back_to_in_reply_to() -> None:
    message = parent(in_reply_to="<before@example.com>")
    assert thread_references(message) == ("<before@example.com>", "<p1@example.com>")


def test_references_start_fresh_without_history() -> None:
    assert thread_references(parent()) == ("<p1@example.com>",)


def test_references_are_deduplicated_and_end_with_the_parent() -> None:
    message = parent(
        references=("<a@x>", "<p1@example.com>", "<b@x>", "<a@x>"), in_reply_to="<b@x>"
    )
    assert thread_references(message) == ("<a@x>", "<b@x>", "<p1@example.com>")


def test_long_reference_chains_keep_root_and_recent() -> None:
    chain = tuple(f"<r{i}@x>" for i in range(100))
    refs = thread_references(parent(references=chain))
    assert len(refs) == MAX_REFERENCES
    assert refs[0] == "<r0@x>"
    assert refs[-1] == "<p1@example.com>"
    assert refs[-2] == "<r99@x>"


def test_invalid_ids_never_reach_the_wire() -> None:
    message = parent(references=("<ok@x>", "<bad\r\nBcc: v@x>", "<sp ace@x>", "no-brackets@x"))
    assert thread_references(message) == ("<ok@x>", "<p1@example.com>")


def test_substitute_message_id_is_not_written() -> None:
    message = parent(
        message_id="<1.7.prxmail@missing.invalid>", message_id_missing=True, in_reply_to="<a@x>"
    )
    out = reply(message)
    assert out.in_reply_to is None
    assert out.references == ("<a@x>",)
    assert "in-reply-to" not in dict(headers_of(out.raw))


# -- body encoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cte"),
    [
        ("plain ascii\nshort lines", "7bit"),
        ("x" * 200, "quoted-printable"),
        ("mostly ascii with one é", "quoted-printable"),
        ("日本語のテキストです。" * 20, "base64"),
        ("nul\x00inside", "quoted-printable"),
    ],
)
def test_body_transfer_encoding_is_chosen_sensibly(body: str, cte: str) -> None:
    out = reply(parent(), body)
    assert dict(headers_of(out.raw))["content-transfer-encoding"] == cte
    assert body_of(out.raw) == body + "\n"
    assert out.raw.isascii()  # never needs 8BITMIME
    assert all(len(line) <= 998 for line in out.raw.split(b"\r\n"))


def test_lone_surrogates_in_the_body_do_not_break_composition() -> None:
    out = reply(parent(), "bad \udcff byte")
    assert body_of(out.raw) == "bad ? byte\n"


def test_dot_lines_are_left_for_the_smtp_client() -> None:
    out = reply(parent(), "a\n.\nb")
    assert b"\r\n.\r\n" in out.raw  # dot-stuffing happens at DATA time


# -- injection ----------------------------------------------------------------------


def test_body_that_looks_like_headers_stays_body() -> None:
    body = "Bcc: victim@x.org\nSubject: changed\n\nreal text"
    out = reply(parent(), body)
    names = [name for name, _ in headers_of(out.raw)]
    assert sorted(names) == sorted(REPLY_HEADERS)
    assert body_of(out.raw) == body + "\n"


def test_crlf_in_parent_subject_or_names_cannot_add_headers() -> None:
    message = parent(subject="Hi\r\nBcc: victim@x.org\r\n\r\nbody?")
    out = reply(message, to=Address("alice@example.com", "Alice\r\nBcc: victim@x.org"))
    names = [name for name, _ in headers_of(out.raw)]
    assert sorted(names) == sorted(REPLY_HEADERS)
    assert b"\r\nBcc:" not in out.raw


def test_encoded_words_in_hostile_text_cannot_smuggle_line_breaks() -> None:
    # The stdlib decodes encoded words in header values it is given; a decoded
    # CR/LF would otherwise land in the header section.
    out = reply(
        parent(subject="x =?utf-8?q?a=0D=0ABcc:_v@x.org?= y", references=("<=?q?=0A?=@x>",)),
        to=Address("alice@example.com", "=?utf-8?q?=0D=0ABcc:_v@x.org?="),
    )
    assert sorted(name for name, _ in headers_of(out.raw)) == sorted(REPLY_HEADERS)
    assert b"\r\nBcc:" not in out.raw
    assert out.references == ("<p1@example.com>",)


@pytest.mark.parametrize(
    "addr",
    [
        "alice@example.com\r\nBcc: v@x.org",
        "alice@example.com>, <v@x.org",
        "alice example.com",
        "MAILER-DAEMON",
        "",
        "a@b@c",
    ],
)
def test_bad_recipient_addresses_are_refused(addr: str) -> None:
    with pytest.raises(LocalProtocolError):
        reply(parent(), to=Address(addr))


def test_bad_from_address_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        reply(parent(), from_address="bot@ours.example\r\nBcc: v@x.org")


def test_naive_date_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        reply(parent(), now=dt.datetime(2025, 1, 1))


_HEADER_SOUP = st.lists(
    st.sampled_from([*'aZ :\r\n\t\x00\x0b.é日<>@,;"=?', "Bcc: ", "\r\n\r\n", "=?utf-8?q?=0A?="]),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(subject=_HEADER_SOUP, name=_HEADER_SOUP, body=st.text(max_size=300))
def test_no_input_text_reaches_the_header_section(subject: str, name: str, body: str) -> None:
    out = reply(parent(subject=subject), body, to=Address("alice@example.com", name))
    headers = headers_of(out.raw)
    assert sorted(n for n, _ in headers) == sorted(
        REPLY_HEADERS if out.subject else REPLY_HEADERS - {"subject"}
    )
    parsed = dict(headers)
    assert parsed["to"].endswith("<alice@example.com>") or parsed["to"] == "alice@example.com"
    expected_body = body.replace("\r\n", "\n").replace("\r", "\n")
    expected_body = expected_body.encode("utf-8", "replace").decode("utf-8")
    if not expected_body.endswith("\n"):
        expected_body += "\n"
    assert body_of(out.raw) == expected_body


# -- fresh messages -----------------------------------------------------------------


def test_compose_message_for_fresh_mail() -> None:
    out = compose_message(
        from_address=BOT,
        from_name="PRX Bot",
        to=[Address("a@example.com"), Address("b@example.com", "B")],
        subject="",
        default_subject="PRX Message",
        body="Status: all good",
        now=NOW,
    )
    headers = dict(headers_of(out.raw))
    assert headers["from"] == "PRX Bot <bot@ours.example>"
    assert headers["to"] == "a@example.com, B <b@example.com>"
    assert headers["subject"] == "PRX Message"
    assert headers["auto-submitted"] == "auto-generated"
    assert "in-reply-to" not in headers
    assert "references" not in headers
    assert out.envelope_recipients == ("a@example.com", "b@example.com")


def test_compose_message_options() -> None:
    out = compose_message(
        from_address=BOT,
        to=Address("a@example.com"),
        subject="s",
        body="b",
        auto_submitted=None,
        envelope_sender="",
        now=NOW,
    )
    assert "auto-submitted" not in dict(headers_of(out.raw))
    assert out.envelope_sender == ""
    with pytest.raises(LocalProtocolError):
        compose_message(from_address=BOT, to=[], subject="s", body="b")


def test_non_ascii_address_needs_smtputf8() -> None:
    out = compose_message(
        from_address=BOT, to=Address("jörg@bücher.example"), subject="Grüße", body="x", now=NOW
    )
    assert out.smtputf8
    assert "jörg@bücher.example".encode() in out.raw
