"""parse_message: the frozen model of a received mail, from hostile bytes."""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.message
import random
import re
import string
import sys
import unicodedata
from pathlib import Path

import attrs
import mailparser  # type: ignore[import-untyped]
import mailparser.core  # type: ignore[import-untyped]
import mailparser.exceptions  # type: ignore[import-untyped]
import mailparser.utils  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.message import (
    ELIDE_FLOOR_BYTES,
    MAX_FILENAME_BYTES,
    MAX_MIME_PARTS,
    MAX_REFERENCES_KEPT,
    Address,
    Attachment,
    Message,
    decode_header_text,
    missing_message_id,
    parse_message,
    parse_message_ids,
    sanitize_filename,
)
from prxmail.message._bounds import _elide_large_base64, new_elision_token
from prxmail.message._headers import _LINE_BREAKING, _SPACE_OR_CONTROL, _SURROGATE
from prxmail.message._mailparser import (
    _fast_address_pairs,
    _MailParser,
    decoded_payload,
    mail_parser,
)
from prxmail.message._speed import _mark_runs, _parse_tree, _restore_runs

LIMIT = 1024 * 1024


def _mail_parser(raw: bytes) -> _MailParser:
    """mail-parser over the speed layer's tree, as parse_message runs it."""
    return mail_parser(lambda: _parse_tree(raw))


def parse(raw: bytes, *, uid: int = 7, uidvalidity: int = 42, limit: int = LIMIT) -> Message:
    return parse_message(raw, uid=uid, uidvalidity=uidvalidity, max_attachment_bytes=limit)


def mail(*headers: str, body: bytes = b"hello\r\n") -> bytes:
    return "".join(f"{h}\r\n" for h in headers).encode("utf-8") + b"\r\n" + body


SIMPLE = mail(
    'From: "Alice Example" <Alice@Example.com>',
    "To: bot@example.org, Carol <carol@example.net>",
    "Cc: dave@example.net",
    "Reply-To: <alice.replies@example.com>",
    "Subject: Quarterly numbers",
    "Date: Tue, 04 Mar 2025 09:15:00 +0100",
    "Message-ID: <m1@example.com>",
    "In-Reply-To: <m0@example.com>",
    "References: <root@example.com>\r\n <m0@example.com>",
    body=b"Hi bot,\r\nplease summarise.\r\n",
)


# -- basic model ------------------------------------------------------------------


def test_simple_message_fields() -> None:
    msg = parse(SIMPLE)
    assert msg.uid == 7
    assert msg.uidvalidity == 42
    assert msg.message_id == "<m1@example.com>"
    assert not msg.message_id_missing
    assert msg.from_ == Address("Alice@Example.com", "Alice Example")
    assert msg.from_.domain == "example.com"
    assert msg.to == (Address("bot@example.org"), Address("carol@example.net", "Carol"))
    assert msg.cc == (Address("dave@example.net"),)
    assert msg.reply_to == (Address("alice.replies@example.com"),)
    assert msg.subject == "Quarterly numbers"
    assert msg.date == dt.datetime(2025, 3, 4, 8, 15, tzinfo=dt.UTC)
    assert msg.in_reply_to == "<m0@example.com>"
    assert msg.references == ("<root@example.com>", "<m0@example.com>")
    assert msg.text == "Hi bot,\nplease summarise."
    assert msg.html is None
    assert msg.attachments == ()
    assert msg.content_type == "text/plain"
    assert msg.size == len(SIMPLE)


def test_message_is_frozen_and_validated() -> None:
    msg = parse(SIMPLE)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        msg.subject = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError, match="uid"):
        Message(uid=-1, uidvalidity=1, message_id="<x@y>")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        parse_message("text", uid=1, uidvalidity=1, max_attachment_bytes=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uid"):
        parse_message(b"", uid=-1, uidvalidity=1, max_attachment_bytes=1)
    with pytest.raises(ValueError, match="max_attachment_bytes"):
        parse_message(b"", uid=1, uidvalidity=1, max_attachment_bytes=-5)


# -- Message-ID -------------------------------------------------------------------


def test_missing_message_id_gets_a_stable_substitute() -> None:
    raw = mail("From: a@x.org", "Subject: no id")
    first = parse(raw, uid=11, uidvalidity=500)
    again = parse(raw, uid=11, uidvalidity=500)
    assert first.message_id == again.message_id == missing_message_id(11, 500)
    assert first.message_id == "<500.11.prxmail@missing.invalid>"
    assert first.message_id_missing
    assert parse(raw, uid=12, uidvalidity=500).message_id != first.message_id


@pytest.mark.parametrize(
    "header",
    [
        "Message-ID:",
        "Message-ID: <>",
        "Message-ID: <" + "x" * 600 + "@example.com>",
        "Message-ID: <caf\u00e9@example.com>",
    ],
)
def test_unusable_message_id_gets_the_substitute(header: str) -> None:
    msg = parse(mail("From: a@x.org", header))
    assert msg.message_id_missing
    assert msg.message_id == missing_message_id(7, 42)


def test_bare_message_id_without_brackets_is_accepted() -> None:
    assert parse(mail("Message-ID: abc123@host.example")).message_id == "<abc123@host.example>"


def test_references_are_deduplicated_and_bounded() -> None:
    ids = [f"<r{i}@x>" for i in range(MAX_REFERENCES_KEPT * 3)]
    folded = "\r\n ".join(ids + ids[:5])
    msg = parse(mail("From: a@x.org", f"References: {folded}"))
    assert len(msg.references) == MAX_REFERENCES_KEPT
    assert msg.references[0] == "<r0@x>"
    assert msg.references[-1] == ids[-1]
    assert len(set(msg.references)) == len(msg.references)


def test_parse_message_ids_skips_junk() -> None:
    assert parse_message_ids("<a@b> junk (comment) <c@d>\r\n <e f@g>") == [
        "<a@b>",
        "<c@d>",
        "<ef@g>",
    ]
    assert parse_message_ids("") == []
    assert parse_message_ids("two words@x") == []


# -- header decoding --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("=?iso-8859-1?q?J=F6rg_M=FCller?=", "Jörg Müller"),
        ("=?UTF-8?B?w5xiZXJncsO2w59lbmzDpG5nZQ==?=", "Übergrößenlänge"),
        ("=?koi8-r?b?8NLJ18XU?=", "Привет"),
        ("=?shift_jis?b?g26DjYFb?=", "ハロー"),
        ("=?gb2312?b?1tDOxA==?=", "中文"),
        ("=?big5?b?pKSk5Q==?=", "中文"),
        ("=?iso-2022-jp?b?GyRCJDMkcyRLJEEkTxsoQg==?=", "こんにちは"),
        ("=?windows-1252?q?=93quoted=94?=", "\u201cquoted\u201d"),
        ("=?utf-8*en?q?with_language?=", "with language"),
        ("plain =?utf-8?q?and?= =?utf-8?q?_joined?= words", "plain and joined words"),
    ],
)
def test_encoded_words_in_several_charsets(raw: str, expected: str) -> None:
    assert decode_header_text(raw) == expected
    assert parse(mail(f"Subject: {raw}")).subject == expected


def test_multibyte_character_split_across_encoded_words() -> None:
    # "é" is C3 A9 in UTF-8; some mailers cut between the two bytes.
    assert decode_header_text("=?utf-8?q?caf=C3?= =?utf-8?q?=A9?=") == "café"
    # Bytes split over base64 words are joined before decoding, too.
    assert decode_header_text("=?utf-8?b?w6k=?==?utf-8?b?w6k=?=") == "éé"


def test_unknown_charset_decodes_with_replacement_not_error() -> None:
    # An unknown charset is read as UTF-8 when it is valid UTF-8, else as
    # Windows-1252; bytes that fit neither become U+FFFD.
    assert decode_header_text("=?x-no-such-charset?q?caf=C3=A9?=") == "café"
    assert decode_header_text("=?x-no-such-charset?q?caf=E9?=") == "café"
    assert decode_header_text("=?x-no-such-charset?q?abc=81?=") == "abc\ufffd"
    assert decode_header_text("=?utf-8?q?bad=FF?=") == "bad\ufffd"
    assert decode_header_text("=?undefined?q?abc?=") == "abc"
    assert decode_header_text("=?zlib?q?abc?=") == "abc"


def test_invalid_encoded_word_stays_literal() -> None:
    assert decode_header_text("=?utf-8?b?!?= tail") == "=?utf-8?b?!?= tail"


def test_crlf_hidden_in_an_encoded_word_cannot_survive() -> None:
    msg = parse(mail("Subject: =?utf-8?q?Hi=0D=0ABcc:_victim@x.org?="))
    assert msg.subject == "Hi Bcc: victim@x.org"
    assert "\r" not in msg.subject
    assert "\n" not in msg.subject


def test_raw_8bit_headers_are_read_as_utf8_or_windows_1252() -> None:
    utf8 = b"From: J\xc3\xb6rg <j@x.org>\r\nSubject: caf\xc3\xa9\r\n\r\nbody"
    latin = b"From: J\xf6rg <j@x.org>\r\nSubject: caf\xe9 cr\xe8me\r\n\r\nbody"
    assert parse(utf8).subject == "café"
    assert parse(utf8).from_ == Address("j@x.org", "Jörg")
    assert parse(latin).subject == "café crème"
    assert parse(latin).from_ == Address("j@x.org", "Jörg")


def test_display_names_with_encoded_words_commas_and_quotes() -> None:
    raw = mail(
        "From: =?utf-8?q?Doe=2C_John?= <john@x.org>",
        'To: "Smith, Ann" <ann@x.org>, "=?utf-8?q?Bj=C3=B6rn?=" <b@x.org>',
    )
    msg = parse(raw)
    assert msg.from_ == Address("john@x.org", "Doe, John")
    assert msg.to == (Address("ann@x.org", "Smith, Ann"), Address("b@x.org", "Björn"))


def test_long_subject_is_bounded() -> None:
    assert len(parse(mail("Subject: " + "x" * 100_000)).subject) <= 4096


# -- addresses --------------------------------------------------------------------


def test_missing_from_gives_empty_address_and_a_defect() -> None:
    msg = parse(mail("Subject: hi"))
    assert msg.from_ == Address("")
    assert msg.from_all == ()
    assert "no-from" in msg.defects


def test_several_from_addresses_are_all_kept() -> None:
    msg = parse(mail("From: a@x.org, b@y.org"))
    assert msg.from_ == Address("a@x.org")
    assert msg.from_all == (Address("a@x.org"), Address("b@y.org"))


def test_groups_are_flattened_and_empty_groups_ignored() -> None:
    msg = parse(mail("From: undisclosed-recipients:;", "To: team: a@x.org, b@y.org;"))
    assert msg.from_all == ()
    assert msg.to == (Address("a@x.org"), Address("b@y.org"))


def test_return_path_and_sender() -> None:
    bounce = parse(mail("Return-Path: <>", "Sender: Owner <owner@lists.x.org>"))
    assert bounce.return_path == ""
    assert bounce.sender == "owner@lists.x.org"
    normal = parse(mail("Return-Path: <bounce+abc@x.org>"))
    assert normal.return_path == "bounce+abc@x.org"
    assert parse(SIMPLE).return_path is None


def test_policy_headers_are_captured() -> None:
    msg = parse(
        mail(
            "Auto-Submitted: auto-replied (vacation)",
            "Precedence: bulk",
            "List-Id: Team <team.lists.x.org>",
            "List-Unsubscribe: <mailto:leave@x.org>",
            "Authentication-Results: mx.ours.org; dmarc=pass header.from=x.org",
            "Authentication-Results: relay.other.org; spf=fail",
        )
    )
    assert msg.auto_submitted == "auto-replied (vacation)"
    assert msg.precedence == "bulk"
    assert msg.list_id == "Team <team.lists.x.org>"
    assert msg.list_unsubscribe == "<mailto:leave@x.org>"
    assert msg.authentication_results == (
        "mx.ours.org; dmarc=pass header.from=x.org",
        "relay.other.org; spf=fail",
    )
    plain = parse(SIMPLE)
    assert plain.auto_submitted is None
    assert plain.precedence is None
    assert plain.list_id is None


def test_oversized_header_section_keeps_only_what_is_used() -> None:
    flood = b"".join(
        b"Received: from h%d.example by mx.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
        for i in range(5000)
    )
    raw = flood + b"From: a@x.org\r\nSubject: still here\r\nContent-Type: text/html\r\n\r\n<p>hi"
    msg = parse(raw)
    assert "header-section-trimmed" in msg.defects
    assert msg.from_ == Address("a@x.org")
    assert msg.subject == "still here"
    assert msg.text == "hi"  # Content-Type survived the trim
    assert msg.size == len(raw)


def test_trimmed_address_fields_are_cut_between_addresses_only() -> None:
    many = b", ".join(b"user%d@example.com" % i for i in range(5000))
    msg = parse(b"From: a@x.org\r\nTo: " + many + b"\r\n\r\nbody")
    assert "header-section-trimmed" in msg.defects
    assert 0 < len(msg.to) < 5000
    assert all(re.fullmatch(r"user\d+@example\.com", a.addr) for a in msg.to)
    # A single huge From cannot be cut safely: it is dropped, not shortened.
    huge = b"From: boss@example.com" + b"x" * 40_000 + b".evil.example\r\n\r\nbody"
    assert parse(huge).from_all == ()


def test_huge_subject_is_cut_before_decoding() -> None:
    msg = parse(b"From: a@x.org\r\nSubject: " + b"=?utf-8?q?ab?= " * 50_000 + b"\r\n\r\nx")
    assert set(msg.subject) == {"a", "b"}
    assert "header-section-trimmed" in msg.defects


# -- dates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Date: Tue, 1 Jan 2030 00:00:00 -0800", dt.datetime(2030, 1, 1, 8, 0, tzinfo=dt.UTC)),
        ("Date: 1 Jan 2030 00:00:00 GMT", dt.datetime(2030, 1, 1, 0, 0, tzinfo=dt.UTC)),
        ("Date: Tue, 1 Jan 2030 00:00:00 -0000", dt.datetime(2030, 1, 1, 0, 0, tzinfo=dt.UTC)),
        ("Date: yesterday-ish", None),
        ("Date:", None),
        ("X-No-Date: 1", None),
    ],
)
def test_dates_are_aware_utc_or_none(header: str, expected: dt.datetime | None) -> None:
    date = parse(mail(header)).date
    assert date == expected
    if date is not None:
        assert date.tzinfo is not None


# -- bodies -----------------------------------------------------------------------

ALTERNATIVE = (
    b"From: a@x.org\r\n"
    b"Content-Type: multipart/alternative; boundary=b1\r\n\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Gr=C3=BC=C3=9Fe from plain\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>Gr\xc3\xbc\xc3\x9fe from <b>html</b></p>\r\n"
    b"--b1--\r\n"
)


def test_text_plain_is_preferred_over_html() -> None:
    msg = parse(ALTERNATIVE)
    assert msg.text == "Grüße from plain"
    assert msg.html is not None
    assert "<b>html</b>" in msg.html
    assert msg.content_type == "multipart/alternative"


def test_html_only_mail_is_converted_to_readable_text() -> None:
    raw = mail(
        "From: a@x.org",
        "Content-Type: text/html; charset=iso-8859-1",
        body=b"<html><head><style>p{}</style></head><body><p>Caf\xe9 &amp; more</p>"
        b"<ul><li>one</li><li>two</li></ul></body></html>",
    )
    msg = parse(raw)
    assert msg.text == "Café & more\n\n- one\n- two"
    assert msg.html is not None
    assert msg.html.startswith("<html>")


def test_base64_body_in_declared_charset() -> None:
    body = base64.b64encode("Привет, мир".encode("koi8-r")) + b"\r\n"
    raw = mail(
        "From: a@x.org",
        "Content-Type: text/plain; charset=koi8-r",
        "Content-Transfer-Encoding: base64",
        body=body,
    )
    assert parse(raw).text == "Привет, мир"


def test_unknown_body_charset_decodes_with_replacement() -> None:
    raw = mail("From: a@x.org", "Content-Type: text/plain; charset=x-bogus", body=b"ok \xff\xfe")
    msg = parse(raw)
    assert msg.text.startswith("ok ")
    assert "\ufffd" in msg.text
    msg.text.encode("utf-8")  # no surrogates escaped into the text


def test_crlf_and_nul_are_normalised_in_text() -> None:
    msg = parse(mail("From: a@x.org", body=b"one\r\ntwo\rthree\x00\r\n"))
    assert msg.text == "one\ntwo\nthree"


def test_other_text_types_as_the_whole_body_are_shown() -> None:
    raw = mail("From: a@x.org", "Content-Type: text/markdown; charset=utf-8", body=b"# Title\r\n")
    assert parse(raw).text == "# Title"


def test_binary_parts_never_become_text() -> None:
    raw = (
        b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\xff\xfebinary\r\n--b--\r\n"
    )
    msg = parse(raw)
    assert msg.text == ""
    assert [a.content for a in msg.attachments] == [b"\x00\x01\xff\xfebinary"]


# -- malformed MIME ---------------------------------------------------------------


def test_broken_boundary_still_delivers_the_text() -> None:
    raw = (
        b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=DECLARED\r\n\r\n"
        b"--ACTUAL\r\nContent-Type: text/plain\r\n\r\nthe words matter\r\n--ACTUAL--\r\n"
    )
    msg = parse(raw)
    assert "the words matter" in msg.text
    assert msg.attachments == ()
    assert "StartBoundaryNotFoundDefect" in msg.defects


def test_missing_close_boundary_keeps_the_parts() -> None:
    raw = (
        b"From: a@x.org\r\nContent-Type: multipart/alternative; boundary=zz\r\n\r\n"
        b"--zz\r\nContent-Type: text/plain\r\n\r\nplain part\r\n"
        b"--zz\r\nContent-Type: text/html\r\n\r\n<p>html part"
    )
    msg = parse(raw)
    assert msg.text == "plain part"
    assert msg.html == "<p>html part"


def test_multipart_bomb_does_not_raise() -> None:
    depth = 5000
    parts = [
        b"From: a@x.org\r\nSubject: bomb\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    ]
    for i in range(depth):
        parts.append(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1))
    raw = b"".join(parts)
    msg = parse(raw)
    assert msg.subject == "bomb"
    assert msg.from_ == Address("a@x.org")
    assert {"body-unparsed", "mime-too-deep"} & set(msg.defects)


def test_an_exception_inside_mail_parser_is_one_stable_defect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever mail-parser raises (a new release, an input it trips over), the
    # public defects say "body-unparsed", never the name of its exception class.
    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("inside mail-parser")

    monkeypatch.setattr(mailparser.core.MailParser, "_decode_body_payload", broken)
    msg = parse(SIMPLE)
    assert msg.defects == ("body-unparsed",)
    assert msg.subject == "Quarterly numbers"
    assert msg.from_ == Address("Alice@Example.com", "Alice Example")
    assert msg.text == ""


def test_too_many_parts_are_not_all_listed() -> None:
    count = MAX_MIME_PARTS + 50
    body = b"".join(
        b"--p\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n" for _ in range(count)
    )
    raw = b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n" + body + b"--p--"
    msg = parse(raw)
    assert len(msg.attachments) < MAX_MIME_PARTS
    assert "too-many-parts" in msg.defects


def test_boundary_flood_is_cut_and_the_text_before_it_kept() -> None:
    parts = b"".join(
        b"--p\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n"
        for _ in range(3 * MAX_MIME_PARTS)
    )
    raw = (
        b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n"
        b"--p\r\nContent-Type: text/plain\r\n\r\nfirst words\r\n" + parts + b"--p--\r\n"
    )
    msg = parse(raw)
    assert msg.text == "first words"
    assert "too-many-parts" in msg.defects
    assert 0 < len(msg.attachments) < MAX_MIME_PARTS


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"no headers at all, just words",
        bytes(range(256)) * 4,
        b"From: a@x.org\r\nContent-Type: multipart/mixed\r\n\r\nno boundary parameter",
        b"From: a@x.org\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not*base64***",
        b"From: a@x.org\r\nContent-Type: text/plain; charset=undefined\r\n\r\nabc",
        b"From: a@x.org\r\nContent-Type: ;;;\r\nContent-Disposition: ;filename*=bad''%ZZ\r\n\r\nx",
        b"From: <<<@@@>>>\r\nTo: ,,,\r\nDate: \xff\xfe\r\nMessage-ID: <\xff@x>\r\n\r\nbody",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\n--a\r\nContent-Type: "
        b"message/rfc822\r\n\r\n--a--",
        b"Header-without-colon\r\nFrom a@x.org\r\n\r\nbody",
    ],
)
def test_malformed_input_yields_a_best_effort_message(raw: bytes) -> None:
    msg = parse(raw)
    assert isinstance(msg, Message)
    assert msg.message_id
    msg.text.encode("utf-8")
    msg.subject.encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    msg = parse(raw)
    msg.text.encode("utf-8")
    assert all(ch not in msg.subject for ch in "\r\n")


_LINES = st.sampled_from(
    [
        b"From: a@x.org",
        b"From: =?utf-8?q?=FF?= <b@y.org>",
        b"Subject: =?bogus?b?////?=",
        b"Content-Type: multipart/mixed; boundary=q",
        b"Content-Type: text/html; charset=utf-16",
        b"Content-Type: message/rfc822",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.txt",
        b"--q",
        b"--q--",
        b"",
        b"<p>text</p>",
        b"=C3=A9=",
        b"aGVsbG8=",
        b"\xff\xfe\x00",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=30))
def test_never_raises_on_mime_shaped_soup(lines: list[bytes]) -> None:
    msg = parse(b"\r\n".join(lines), limit=8)
    msg.text.encode("utf-8")
    for attachment in msg.attachments:
        assert "/" not in attachment.filename
        assert attachment.content is None or len(attachment.content) <= 8


# -- attachments ------------------------------------------------------------------


def multipart(*parts: bytes) -> bytes:
    out = [b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=BND\r\n\r\n"]
    out.append(b"--BND\r\nContent-Type: text/plain\r\n\r\nbody text\r\n")
    for part in parts:
        out.append(b"--BND\r\n" + part + b"\r\n")
    out.append(b"--BND--\r\n")
    return b"".join(out)


def test_attachment_name_type_size_and_content() -> None:
    raw = multipart(
        b"Content-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="report.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"%PDF-1.7 data")
    )
    msg = parse(raw)
    assert msg.text == "body text"
    assert msg.attachments == (
        Attachment("report.pdf", "application/pdf", len(b"%PDF-1.7 data"), b"%PDF-1.7 data"),
    )


def test_rfc2231_filename_with_charset_and_continuations() -> None:
    raw = multipart(
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment;\r\n"
        b" filename*0*=utf-8'de'%C3%9Cbersicht%20;\r\n"
        b" filename*1*=%E2%82%AC.xlsx\r\n\r\nxx"
    )
    assert parse(raw).attachments[0].filename == "Übersicht €.xlsx"


def test_rfc2231_filename_in_latin1() -> None:
    raw = multipart(
        b"Content-Type: text/plain\r\n"
        b"Content-Disposition: attachment; filename*=iso-8859-1''r%E9sum%E9.txt\r\n\r\nxx"
    )
    assert parse(raw).attachments[0].filename == "résumé.txt"


def test_rfc2047_encoded_name_parameter() -> None:
    raw = multipart(
        b'Content-Type: application/pdf; name="=?utf-8?q?Rechnung_M=C3=A4rz.pdf?="\r\n\r\nxx'
    )
    msg = parse(raw)
    assert [a.filename for a in msg.attachments] == ["Rechnung März.pdf"]


def test_raw_utf8_filename() -> None:
    raw = multipart(
        b"Content-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="\xc3\xa9t\xc3\xa9.pdf"\r\n\r\nxx'
    )
    assert parse(raw).attachments[0].filename == "été.pdf"


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\system32\\evil.dll", "evil.dll"),
        ("...hidden", "hidden"),
        (".bashrc", "bashrc"),
        ("bad\x00na\x1bme\r\n.txt", "bad na me.txt"),
        ("invoice\u202egpj.exe", "invoicegpj.exe"),
        ("what?*<>|:.txt", "what______.txt"),
        ("CON.txt", "_CON.txt"),
        ("trailing. . .", "trailing"),
        ("  spaced   out  .pdf", "spaced out.pdf"),
        ("/", "attachment-1.bin"),
        ("..", "attachment-1.bin"),
        ("", "attachment-1.bin"),
        (None, "attachment-1.bin"),
    ],
)
def test_sanitize_filename(declared: str | None, expected: str) -> None:
    assert sanitize_filename(declared) == expected


def test_sanitize_filename_bounds_length_and_keeps_extension() -> None:
    name = sanitize_filename("é" * 400 + ".pdf")
    assert name.endswith(".pdf")
    assert len(name.encode("utf-8")) <= MAX_FILENAME_BYTES
    name.encode("utf-8")  # not cut inside a character


def test_sanitize_filename_fallback_uses_index_and_type() -> None:
    assert sanitize_filename(None, index=3, content_type="image/png") == "attachment-3.png"


def test_hostile_names_in_a_message_are_sanitised() -> None:
    raw = multipart(
        b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="../../.ssh/id_rsa"'
        b"\r\n\r\nkey",
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''..%2F..%2Fx%0D%0A.sh\r\n\r\nx",
    )
    names = [a.filename for a in parse(raw).attachments]
    assert names == ["id_rsa", "x.sh"]


def test_inline_image_without_name_gets_a_generated_name() -> None:
    raw = multipart(
        b"Content-Type: image/png\r\nContent-ID: <img1@x>\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\niVBORw0KGgo="
    )
    assert parse(raw).attachments == (
        Attachment("attachment-1.png", "image/png", 8, b"\x89PNG\r\n\x1a\n"),
    )


def test_attachment_over_the_limit_keeps_size_but_not_content() -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    raw = multipart(
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(payload),
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="small.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"tiny"),
    )
    big, small = parse(raw, limit=1000).attachments
    assert big == Attachment("big.bin", "application/octet-stream", len(payload), None)
    assert small.content == b"tiny"
    exact = parse(raw, limit=len(payload)).attachments[0]
    assert exact.content == payload


def test_quoted_printable_attachment_is_decoded() -> None:
    raw = multipart(
        b"Content-Type: text/csv; charset=utf-8\r\n"
        b'Content-Disposition: attachment; filename="t.csv"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\na,b=0A=C3=A9,=\r\nc"
    )
    attachment = parse(raw).attachments[0]
    assert attachment.content == "a,b\né,c".encode()
    assert attachment.size == len(attachment.content)
    assert attachment.content_type == "text/csv"


def test_attached_message_is_one_attachment() -> None:
    inner = b"From: x@y.org\r\nSubject: forwarded\r\n\r\ninner body\r\n"
    raw = multipart(
        b"Content-Type: message/rfc822\r\n"
        b'Content-Disposition: attachment; filename="fwd.eml"\r\n\r\n' + inner
    )
    msg = parse(raw)
    # mail-parser shows the attached message's text after the main text, which
    # is what a handler asked to "look at the forwarded mail" needs.
    assert msg.text == "body text\n\ninner body"
    [attachment] = msg.attachments
    assert attachment.filename == "fwd.eml"
    assert attachment.content_type == "message/rfc822"
    assert attachment.content is not None
    assert b"Subject: forwarded" in attachment.content
    assert b"inner body" in attachment.content


# -- large bodies are not parsed whole ----------------------------------------------


def big_attachment_mail(payload: bytes, *, text_type: str = "application/octet-stream") -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=BND\r\n\r\n"
        b"--BND\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--BND\r\nContent-Type: " + text_type.encode() + b"\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--BND--\r\n"
    )


TOKEN = new_elision_token()


def forged_marker_mail(marker: bytes) -> bytes:
    return (
        b"From: a@x.org\r\nContent-Type: multipart/mixed; boundary=BND\r\n\r\n"
        b"--BND\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--BND\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="f.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + marker + b"\r\n--BND--\r\n"
    )


@pytest.mark.parametrize(
    "marker",
    [
        b"PRXMAILELIDED999999999Z",  # the marker as it was before it had a token
        b"PRXMAILELIDED" + b"0" * 32 + b"999999999Z",  # a guessed token
        b"PRXMAILELIDED" + TOKEN.encode() + b"999999999Z",  # another parse's token
    ],
)
def test_a_forged_elision_marker_does_not_forge_an_attachment_size(marker: bytes) -> None:
    [attachment] = parse(forged_marker_mail(marker), limit=1000).attachments
    assert attachment.size < 100  # the marker text, decoded as base64, not 999,999,999
    assert attachment.content is not None


def test_a_forged_run_marker_is_delivered_verbatim() -> None:
    # The fast path marks long base64-like runs with PRXMAILRUN<n>Z; text that holds
    # that spelling itself must come out as written, not be swapped for another run.
    run = (b"QUJD" * 19 + b"\r\n") * 60
    raw = (
        b"From: a@x.org\r\nContent-Type: text/plain\r\n\r\n"
        b"PRXMAILRUN0Z PRXMAILRUN1Z\r\n" + run + b"end\r\n"
    )
    msg = parse(raw, limit=1000)
    assert msg.text.startswith("PRXMAILRUN0Z PRXMAILRUN1Z\n")
    assert msg.text.replace("\n", "").count("QUJD") == 19 * 60


@pytest.mark.parametrize("length", [ELIDE_FLOOR_BYTES + 1, 3 * ELIDE_FLOOR_BYTES + 2])
def test_large_attachment_is_described_exactly_without_content(length: int) -> None:
    raw = big_attachment_mail(bytes(range(256)) * (length // 256) + b"x" * (length % 256))
    assert _elide_large_base64(raw, 1000, TOKEN) != raw  # cut before the MIME parser runs
    msg = parse(raw, limit=1000)
    assert msg.text == "see attached"
    assert msg.size == len(raw)
    assert msg.attachments == (Attachment("big.bin", "application/octet-stream", length, None),)


def test_large_attachment_within_the_limit_keeps_its_content() -> None:
    payload = bytes(range(256)) * 1024
    raw = big_attachment_mail(payload)
    assert _elide_large_base64(raw, len(payload), TOKEN) == raw
    assert parse(raw, limit=len(payload)).attachments[0].content == payload


def test_large_base64_text_body_is_always_delivered() -> None:
    text = ("all work and no play " * 10_000).encode()
    raw = (
        b"From: a@x.org\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(text)
    )
    assert _elide_large_base64(raw, 10, TOKEN) == raw
    assert parse(raw, limit=10).text == text.decode()


def test_large_top_level_binary_body_is_elided() -> None:
    payload = b"\x00\xff" * ELIDE_FLOOR_BYTES
    raw = (
        b"From: a@x.org\r\nContent-Type: application/pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(payload)
    )
    msg = parse(raw, limit=100)
    assert msg.attachments == (Attachment("attachment-1.pdf", "application/pdf", len(payload)),)


def test_large_body_with_junk_in_its_base64_is_not_elided_but_still_bounded() -> None:
    payload = bytes(range(256)) * 512
    encoded = base64.encodebytes(payload)
    raw = big_attachment_mail(b"")
    raw = raw.replace(
        b"\r\n\r\n--BND--", b"\r\n\r\n" + encoded[:1000] + b"!junk!\n" + encoded[1000:] + b"--BND--"
    )
    assert _elide_large_base64(raw, 10, TOKEN) == raw
    [attachment] = parse(raw, limit=10).attachments
    assert attachment.content is None
    assert abs(attachment.size - len(payload)) < 16


# -- realistic samples (tests/data/mime, written for these tests) -------------------

SAMPLES = Path(__file__).parent.parent / "data" / "mime"


def sample(name: str, *, limit: int = 1000) -> Message:
    return parse((SAMPLES / name).read_bytes(), limit=limit)


def test_sample_outlook_html_only() -> None:
    msg = sample("outlook_html_only.eml")
    assert msg.from_ == Address("Hans.Mueller@Corp.Example", "Hans Müller")
    assert msg.subject == "AW: Angebot für Q2 \u2013 bitte prüfen"
    assert msg.text == (
        "Hallo,\n\nanbei das Angebot für Q2 \u2013 bitte bis Freitag prüfen.\n\nGrüße\nHans\n\nLogo"
    )
    assert msg.html is not None
    assert "MsoNormal" in msg.html
    assert msg.return_path == "hans.mueller@corp.example"
    assert msg.in_reply_to == "<a1b2c3@ours.example>"
    [pdf] = msg.attachments
    assert (pdf.filename, pdf.content_type) == ("Angebot Q2 für Kunden.pdf", "application/pdf")
    assert pdf.content is not None
    assert pdf.content.startswith(b"%PDF-1.7")
    assert len(msg.authentication_results) == 1


def test_sample_apple_alternative_with_inline_image() -> None:
    msg = sample("apple_alternative_inline.eml")
    assert msg.subject == "Trip photos 📷"
    assert (
        msg.text
        == "Here is the view from the hotel — can you write a caption?\n\n[image: view.png]"
    )
    assert msg.html is not None
    assert "cid:view@example.com" in msg.html
    assert msg.reply_to == (Address("alice.travel@example.com", "Alice Travel"),)
    assert msg.date == dt.datetime(2025, 2, 16, 2, 30, tzinfo=dt.UTC)
    [image] = msg.attachments
    assert (image.filename, image.content_type, image.size) == ("view.png", "image/png", 48)


def test_sample_postfix_bounce() -> None:
    msg = sample("postfix_bounce.eml")
    assert msg.return_path == ""
    assert msg.content_type == "multipart/report"
    assert msg.auto_submitted == "auto-replied"
    assert msg.from_ == Address("MAILER-DAEMON@mx.ours.example", "Mail Delivery System")
    assert msg.text.startswith("This is the mail system at host mx.ours.example.")
    assert [a.content_type for a in msg.attachments] == [
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_sample_broken_everything_still_yields_text() -> None:
    msg = sample("broken_everything.eml")
    assert "Still" in msg.text
    assert "readable?" in msg.text
    assert msg.from_all == ()
    assert "no-from" in msg.defects
    assert "StartBoundaryNotFoundDefect" in msg.defects
    msg.subject.encode("utf-8")


# -- the address fast path ----------------------------------------------------------

_ATEXT_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_ATOMS = st.text(alphabet=_ATEXT_CHARS, min_size=1, max_size=10)
_DOT_ATOMS = st.lists(_ATOMS, min_size=1, max_size=3).map(".".join)
_ADDR_SPECS = st.builds(lambda local, domain: f"{local}@{domain}", _DOT_ATOMS, _DOT_ATOMS)
_BLANKS = st.text(alphabet=" \t", max_size=2)
_CHARSETS = st.sampled_from(
    [
        *("utf-8", "UTF-8", "iso-8859-1", "us-ascii", "windows-1252", "koi8-r", "shift_jis"),
        *("utf-16", "unknown-8bit", "x-no-such-charset", "base64"),
    ]
)
_Q_SAFE = set(string.ascii_letters + string.digits)


def _encoded_word(text: str, charset: str, kind: str) -> str:
    try:
        data = text.encode(charset, "replace")
    except (LookupError, UnicodeError):
        data = text.encode("utf-8", "surrogatepass")
    if kind in "bB":
        payload = base64.b64encode(data).decode("ascii")
    else:
        payload = "".join(
            chr(b) if chr(b) in _Q_SAFE else "_" if b == 0x20 else f"={b:02X}" for b in data
        )
    return f"=?{charset}?{kind}?{payload}?="


_ENCODED_WORDS = st.one_of(
    st.builds(_encoded_word, st.text(max_size=12), _CHARSETS, st.sampled_from("bBqQ")),
    # junk payloads: wrong padding, stray '=', characters mail-parser may refuse
    st.builds(
        lambda charset, kind, payload: f"=?{charset}?{kind}?{payload}?=",
        _CHARSETS,
        st.sampled_from("bBqQ"),
        st.text(alphabet=_ATEXT_CHARS.replace("?", "") + ".", max_size=12),
    ),
)
_NAME_WORDS = st.lists(st.one_of(_ATOMS, _ENCODED_WORDS), max_size=4)


@st.composite
def _fast_shaped_values(draw: st.DrawFn) -> str:
    addr = draw(_ADDR_SPECS)
    if draw(st.booleans()):
        return draw(_BLANKS) + addr + draw(_BLANKS)
    gaps = [draw(st.text(alphabet=" \t", min_size=1, max_size=2)) for _ in range(5)]
    words = draw(_NAME_WORDS)
    phrase = "".join(word + gap for word, gap in zip(words, gaps, strict=False))
    if draw(st.booleans()):
        phrase = phrase.rstrip(" \t")
    return f"{draw(_BLANKS)}{phrase}<{addr}>{draw(_BLANKS)}"


@settings(max_examples=1500, deadline=None)
@given(_fast_shaped_values())
def test_address_fast_path_gives_what_mail_parser_gives(value: str) -> None:
    fast = _fast_address_pairs(value)
    if fast is None:
        return  # declined: mail-parser reads it, as for any other value
    defects: list[object] = []
    assert fast == mailparser.utils.get_addresses(value, defects=defects, decode_names=True)
    assert defects == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bot@example.org", [("", "bot@example.org")]),
        (" \tfirst.last+tag@mail.example.org ", [("", "first.last+tag@mail.example.org")]),
        ("<bot@example.org>", [("", "bot@example.org")]),
        ("Sender 7 <sender7@bench.example>", [("Sender 7", "sender7@bench.example")]),
        ("Bob<bob@x.org>", [("Bob", "bob@x.org")]),
        ("=?utf-8?q?J=C3=B6rg?= Smith <j@x.org>", [("Jörg Smith", "j@x.org")]),
        ("=?utf-8?q?J=C3=B6?= =?utf-8?q?rg?= <j@x.org>", [("Jörg", "j@x.org")]),
        ("=?iso-8859-1?b?SvZyZw==?= <j@x.org>", [("Jörg", "j@x.org")]),
    ],
)
def test_address_fast_path_takes_the_plain_shapes(
    value: str, expected: list[tuple[str, str]]
) -> None:
    assert _fast_address_pairs(value) == expected
    assert mailparser.utils.get_addresses(value, decode_names=True) == expected


@pytest.mark.parametrize(
    "value",
    [
        '"alice@example.com" <evil@x.org>',
        "alice@example.com <evil@x.org>",
        "alice@example.com@evil.org",
        "alice@example.com.<evil@x.org>",
        "Alice <alice@x.org>, Bob <bob@y.org>",
        "a@x.org, b@y.org",
        "Alice (boss) <a@x.org>",
        "a@x.org (Alice)",
        "Alice <a@x.org> <b@y.org>",
        "Alice <<a@x.org>>",
        "Alice <a@x.org>>",
        "Alice <a@x.org> x",
        'Alice <"a b"@x.org>',
        "Alice <a@[127.0.0.1]>",
        "Alice <@route.org:a@x.org>",
        "Al\\ice <a@x.org>",
        "team: a@x.org;",
        "J. Smith <a@x.org>",
        ".a@x.org",
        "a.@x.org",
        "a..b@x.org",
        "a@x.org.",
        "Jörg <j@x.org>",
        "jörg@x.org",
        "a@x.org\r\n",
        "a\x00b@x.org",
        "=?utf-8?b?Q?= <a@x.org>",
        "=?utf-8*en?q?Alice?= <a@x.org>",
        "=?utf-8?q?a=0D=0AB?= <a@x.org>",
        "=?utf-8?q?" + "x" * 70 + "?= <a@x.org>",
        "=?x-no-such-charset?q?Alice?= <a@x.org>",
        "=?utf-8?q?Alice?=<a@x.org>",
        '=?utf-8?q?a"b?= <a@x.org>',
        "=?utf-8?q?a<b@c>?= <a@x.org>",
        "",
        " ",
    ],
)
def test_address_fast_path_declines_anything_else(value: str) -> None:
    assert _fast_address_pairs(value) is None


# -- the mail-parser subclass ---------------------------------------------------------

_MAILPARSER_SAMPLES = [
    SIMPLE,
    mail(
        "From: =?utf-8?q?J=C3=B6rg?= <j@x.org>",
        "From: second@y.org",
        "To: team: a@x.org, b@y.org;",
        "Cc: Carol <c@x.org>",
        'Cc: "Smith, Ann" <ann@x.org>, bad@@x',
        "Bcc: <b@x.org>",
        "Delivered-To: bot@x.org",
        "Reply-To: J\xf6rg <j@x.org>",
        "Date: Tue, 31 Feb 2025 09:15:00 +0100",
        "Received: from x (y [203.0.113.9]) by z; Tue, 04 Mar 2025 09:15:00 +0100",
    ),
    mail("From: a@x.org", "Date: not a date", "Content-Type: text/html", body=b"<p>hi</p>"),
    *(path.read_bytes() for path in sorted(SAMPLES.glob("*.eml"))),
]


def _mailparser_view(parser: mailparser.MailParser) -> dict[str, object]:
    return {
        "text_plain": parser.text_plain,
        "text_html": parser.text_html,
        "text_not_managed": parser.text_not_managed,
        "defects": parser.defects,
        "defects_categories": parser.defects_categories,
        "date": parser.date,
        "timezone": parser.timezone,
        "address_header_defects": parser.address_header_defects,
        "from": parser.from_,
        "to": parser.to,
        "cc": parser.cc,
        "raw_from": parser.from_raw,
        "raw_cc": parser.cc_raw,
        "mail": parser.mail,
        "mail_partial": parser.mail_partial,
    }


@pytest.mark.parametrize("raw", _MAILPARSER_SAMPLES)
def test_mail_parser_subclass_gives_what_mail_parser_gives(raw: bytes) -> None:
    ours = _mail_parser(raw)
    theirs = mailparser.MailParser.from_bytes(raw)
    assert _mailparser_view(ours) == _mailparser_view(theirs)


def test_mail_parser_subclass_raises_what_mail_parser_raises_on_a_nesting_bomb() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(5000)
    )
    with pytest.raises(mailparser.exceptions.MailParserRecursionError):
        mailparser.MailParser.from_bytes(raw)
    with pytest.raises(mailparser.exceptions.MailParserRecursionError):
        _mail_parser(raw)


def test_mail_parser_subclass_skips_unread_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # If this fails, mail-parser's internals changed and parse_message lost its
    # speed-up (results stay right: see the test above). Adapt _MailParser.
    scanned: list[object] = []
    real_get_addresses = mailparser.core.get_addresses

    def counting_get_addresses(value: object, **kwargs: object) -> object:
        scanned.append(value)
        return real_get_addresses(value, **kwargs)

    monkeypatch.setattr(mailparser.core, "get_addresses", counting_get_addresses)
    parser = _MailParser.from_bytes(
        mail("From: Alice <alice@x.org>", "To: bot@x.org, carol@x.org", "Cc: dave@x.org")
    )
    assert parser._mail is None
    assert parser._mail_partial is None
    assert scanned == ["bot@x.org, carol@x.org"]  # not in the fast grammar: scanned
    assert parser.from_ == [("Alice", "alice@x.org")]
    assert parser.cc == [("", "dave@x.org")]
    assert parser.mail["from"] == [("Alice", "alice@x.org")]


# -- runs of lines kept away from the stdlib parser ----------------------------------


def _tree_view(part: email.message.Message) -> dict[str, object]:
    payload = vars(part)["_payload"]
    return {
        "unixfrom": part.get_unixfrom(),
        "headers": [(name, str(value)) for name, value in part.raw_items()],
        "payload": [_tree_view(p) for p in payload] if isinstance(payload, list) else payload,
        "preamble": part.preamble,
        "epilogue": part.epilogue,
        "defects": [type(defect).__name__ for defect in part.defects],
        "default_type": part.get_default_type(),
    }


def _b64_block(size: int, eol: bytes, seed: int = 1) -> bytes:
    data = bytes((seed * 7 + i * 31) % 256 for i in range(size))
    return base64.encodebytes(data).replace(b"\n", eol)


def _mime_with(body: bytes, *, eol: bytes = b"\r\n", kind: str = "application/pdf") -> bytes:
    head = [
        b"From: a@x.org",
        b"Content-Type: multipart/mixed; boundary=BND",
        b"",
        b"preamble",
        b"--BND",
        b"Content-Type: text/plain",
        b"",
        b"hello",
        b"--BND",
        b"Content-Type: " + kind.encode(),
        b"Content-Transfer-Encoding: base64",
        b"",
    ]
    return eol.join(head) + eol + body + eol + b"--BND--" + eol


_BLOCK = _b64_block(6000, b"\r\n")
_RUN_SAMPLES = [
    _mime_with(_BLOCK),
    _mime_with(_b64_block(6000, b"\n"), eol=b"\n"),
    _mime_with(_BLOCK + b"\r\n\r\n"),  # blank lines before the boundary
    _mime_with(_BLOCK.replace(b"\r\n", b"\r", 5)),  # bare CRs end lines too
    _mime_with(_BLOCK.replace(b"\r\n", b"\r\r\n", 1)),  # ...and make an empty line
    _mime_with(_BLOCK.replace(b"\r\n", b"\r\n\r\n", 1)),  # a blank line inside
    _mime_with(_BLOCK[:-2] + b"\r"),
    _mime_with(b"\r\n" + _BLOCK),  # a second blank line before the run
    _mime_with(b"\r\n" + _BLOCK, kind="message/rfc822"),
    _mime_with(_BLOCK + b"PRXMAILRUN0Z\r\n"),  # the marker text in the input
    _mime_with(_BLOCK, kind="message/rfc822"),
    _mime_with(
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n" + _BLOCK,
        kind="message/rfc822",
    ),
    _mime_with(_BLOCK, kind="message/delivery-status"),
    _mime_with(b"Subject: x\r\n\r\n" + _BLOCK, kind="multipart/mixed; boundary=BND"),
    _mime_with(_BLOCK).replace(b"--BND--", b"--BND--\r\n\r\n" + _BLOCK),  # epilogue
    _mime_with(_BLOCK).replace(b"preamble", _BLOCK),  # preamble
    _mime_with(_BLOCK).replace(b"boundary=BND", b"boundary=OTHER"),
    b"From: a@x.org\r\nSubject: plain\r\n\r\n"
    + b"Some text: with colons\r\n--dashes\r\n\r\n" * 200,
    b"From: a@x.org\r\nContent-Type: text/plain\r\n\r\n" + _BLOCK,
    b"From: a@x.org\r\nGarbage line\r\nSubject: late\r\n\r\n" + _BLOCK,
    b"From: a@x.org\r\nSubject: x\r\r\nMore: y\r\n\r\n" + _BLOCK,
    b"From: a@x.org\r\nContent-Type:\r\n multipart/mixed; boundary=BND\r\n\r\n" + _BLOCK,
    b"From: a@x.org\r\nContent-Type: message/rfc822\r\n\r\n" + _BLOCK,
    b"From: a@x.org\r\n\r\n" + _BLOCK + b"PRXMAILRUN0Z",
    *(path.read_bytes() for path in sorted(SAMPLES.glob("*.eml"))),
]


@pytest.mark.parametrize("raw", _RUN_SAMPLES)
def test_marked_runs_give_the_tree_of_a_full_parse(raw: bytes) -> None:
    assert _tree_view(_parse_tree(raw)) == _tree_view(email.message_from_bytes(raw))


@pytest.mark.parametrize("raw", _RUN_SAMPLES)
def test_marked_runs_give_what_mail_parser_gives(raw: bytes) -> None:
    theirs = mailparser.MailParser.from_bytes(raw)
    assert _mailparser_view(_mail_parser(raw)) == _mailparser_view(theirs)


def test_runs_are_marked_where_they_save_work() -> None:
    # Without this the test above could pass with the optimisation never applied.
    marked, runs, whole_body = _mark_runs(_mime_with(_BLOCK))
    assert len(runs) == 1
    assert whole_body is None
    assert len(marked) < 1000
    marked, runs, whole_body = _mark_runs(b"From: a@x.org\r\n\r\n" + _BLOCK)
    assert whole_body is not None
    assert len(marked) < 200
    assert _mark_runs(_mime_with(_BLOCK + b"PRXMAILRUN0Z"))[1] == {}  # marker text in the input
    # A run over the 1 MB slices of the check is still one run, whatever falls
    # where the slices would meet (lines of 17 bytes put an LF at 1 MiB).
    text = base64.b64encode(random.Random(1).randbytes(1_800_000))
    for width, eol in ((16, b"\n"), (16, b"\r\n"), (76, b"\n"), (76, b"\r\n")):
        lines = [text[i : i + width] for i in range(0, len(text), width)]
        big = _mime_with(eol.join(lines), eol=eol)
        marked, runs, _ = _mark_runs(big)
        assert len(runs) == 1
        assert len(marked) < 1000
        assert _tree_view(_parse_tree(big)) == _tree_view(email.message_from_bytes(big))
    assert _mark_runs(_mime_with(_BLOCK.replace(b"\r\n", b"\r\n\r\n", 1)))[1] == {}


_SOUP_LINES = st.sampled_from(
    [
        b"From: a@x.org",
        b"Content-Type: multipart/mixed; boundary=q",
        b"Content-Type: message/rfc822",
        b"Content-Type: text/plain",
        b"Content-Transfer-Encoding: base64",
        b" folded",
        b"--q",
        b"--q--",
        b"",
        b"\r",
        b"PRXMAILRUN1Z",
        b"text: line",
        _b64_block(2500, b"\r\n", 2).rstrip(),
        _b64_block(3000, b"\n", 3).rstrip(),
        _b64_block(2500, b"\r", 4).rstrip(),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_SOUP_LINES, max_size=20), st.sampled_from([b"\r\n", b"\n"]))
def test_marked_runs_give_the_tree_of_a_full_parse_for_mime_soup(
    lines: list[bytes], eol: bytes
) -> None:
    raw = eol.join(lines)
    assert _tree_view(_parse_tree(raw)) == _tree_view(email.message_from_bytes(raw))


def test_runs_not_put_back_exactly_once_mean_a_full_parse() -> None:
    multipart_root = email.message_from_bytes(
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\nPRXMAILRUN0Z"
    )
    assert not _restore_runs(multipart_root, {"PRXMAILRUN0Z": "AAAA"}, "PRXMAILRUN0Z")
    root = email.message_from_bytes(b"Subject: x\r\n\r\nPRXMAILRUN0Z\r\nPRXMAILRUN0Z")
    assert not _restore_runs(root, {"PRXMAILRUN0Z": "AAAA"}, None)  # seen twice
    root = email.message_from_bytes(b"Subject: x\r\n\r\nPRXMAILRUN0Z")
    assert not _restore_runs(root, {"PRXMAILRUN0Z": "A", "PRXMAILRUN1Z": "B"}, None)
    root = email.message_from_bytes(b"Subject: x\r\n\r\nPRXMAILRUN0Z\r\n")
    assert _restore_runs(root, {"PRXMAILRUN0Z": "AAAA"}, None)
    assert root.get_payload() == "AAAA\r\n"


def test_character_classes_match_unicodedata() -> None:
    # _clean_text and _clean_addr use regex classes for Unicode categories.
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    categories = [unicodedata.category(ch) for ch in everything]
    assert {m.start() for m in _LINE_BREAKING.finditer(everything)} == {
        i for i, cat in enumerate(categories) if cat in ("Cc", "Zl", "Zp")
    }
    assert {m.start() for m in _SURROGATE.finditer(everything)} == {
        i for i, cat in enumerate(categories) if cat == "Cs"
    }
    assert {m.start() for m in _SPACE_OR_CONTROL.finditer(everything)} == {
        i for i, ch in enumerate(everything) if ch.isspace() or categories[i] == "Cc"
    }


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet="ABCDEFabcdef0123+/=\r\n \t!-é", max_size=60),
    st.sampled_from(["base64", "BASE64", "base64 ", " base64", "quoted-printable", ""]),
)
def test_decoded_payload_is_the_stdlib_decoding(payload: str, encoding: str) -> None:
    part = email.message.Message()
    if encoding:
        part["Content-Transfer-Encoding"] = encoding
    part.set_payload(payload)
    assert decoded_payload(part) == part.get_payload(decode=True)


def test_decoded_payload_takes_the_quick_path_for_plain_base64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    part = email.message.Message()
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(base64.encodebytes(b"%PDF-1.7 " * 100).decode("ascii"))
    monkeypatch.setattr(part, "get_payload", lambda *args, **kwargs: pytest.fail("slow path"))
    assert decoded_payload(part) == b"%PDF-1.7 " * 100
