"""The IMAP response parser: one byte transcript per response kind, RFC 3501 examples,
real-server quirks and hostile input."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prxmail.errors import RemoteProtocolError
from prxmail.imap import (
    Address,
    BodyPart,
    CapabilityData,
    ContinuationRequest,
    EnabledData,
    ESearchData,
    Event,
    Exists,
    Expunge,
    FetchData,
    FlagsData,
    Framer,
    IdData,
    ListData,
    MultipartBody,
    Recent,
    ResponseCode,
    SearchData,
    SequenceSet,
    StatusResponse,
    TaggedResponse,
    UnknownResponse,
    decode_mailbox,
    parse_response,
)
from prxmail.imap._parser import MAX_NESTING_DEPTH


def parse(data: bytes) -> Event:
    framer = Framer()
    framer.receive_data(data)
    frame = framer.next_frame()
    assert frame is not None, "incomplete response"
    assert framer.next_frame() is None
    return parse_response(frame)


# -- status responses ----------------------------------------------------------------


def test_greeting_ok_with_capability_code() -> None:
    event = parse(b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n")
    assert event == StatusResponse(
        "OK",
        ResponseCode("CAPABILITY", ("IMAP4REV1", "IDLE", "LITERAL+", "AUTH=PLAIN")),
        "Dovecot ready.",
    )


def test_greeting_preauth_and_bye() -> None:
    assert parse(b"* PREAUTH IMAP4rev1 server logged in as Smith\r\n") == StatusResponse(
        "PREAUTH", None, "IMAP4rev1 server logged in as Smith"
    )
    assert parse(b"* BYE Autologout; idle for too long\r\n") == StatusResponse(
        "BYE", None, "Autologout; idle for too long"
    )


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"* OK [UIDVALIDITY 3857529045] UIDs valid", ResponseCode("UIDVALIDITY", 3857529045)),
        (b"* OK [UIDNEXT 4392] Predicted next UID", ResponseCode("UIDNEXT", 4392)),
        (b"* OK [UNSEEN 17] Message 17 is first unseen", ResponseCode("UNSEEN", 17)),
        (b"* OK [HIGHESTMODSEQ 715194045007] x", ResponseCode("HIGHESTMODSEQ", 715194045007)),
        (b"* OK [ALERT] System shutdown in 10 minutes", ResponseCode("ALERT")),
        (b"A1 OK [READ-WRITE] SELECT completed", ResponseCode("READ-WRITE")),
        (b"A1 OK [READ-ONLY] EXAMINE completed", ResponseCode("READ-ONLY")),
        (b"A1 NO [TRYCREATE] no such mailbox", ResponseCode("TRYCREATE")),
        (b"A1 NO [AUTHENTICATIONFAILED] bad", ResponseCode("AUTHENTICATIONFAILED")),
        (b"* OK [NOMODSEQ] no modseqs", ResponseCode("NOMODSEQ")),
        (b"* NO [BADCHARSET (US-ASCII)] x", ResponseCode("BADCHARSET", "(US-ASCII)")),
        (
            b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited",
            ResponseCode("PERMANENTFLAGS", ("\\Deleted", "\\Seen", "\\*")),
        ),
        # quirk: "]" inside a keyword of PERMANENTFLAGS
        (
            b"* OK [PERMANENTFLAGS (\\Seen odd]flag)] Limited",
            ResponseCode("PERMANENTFLAGS", ("\\Seen", "odd]flag")),
        ),
    ],
)
def test_response_codes(line: bytes, code: ResponseCode) -> None:
    event = parse(line + b"\r\n")
    assert isinstance(event, StatusResponse | TaggedResponse)
    assert event.code == code


def test_tagged_responses() -> None:
    assert parse(b"a001 OK LOGIN completed\r\n") == TaggedResponse(
        "a001", "OK", None, "LOGIN completed"
    )
    assert parse(b"A999 NO [ALERT] nope\r\n") == TaggedResponse(
        "A999", "NO", ResponseCode("ALERT"), "nope"
    )
    assert parse(b"A2 BAD command unknown\r\n") == TaggedResponse(
        "A2", "BAD", None, "command unknown"
    )


def test_status_quirks() -> None:
    # no text at all, extra spaces, 8-bit text, a "[" that opens no code
    assert parse(b"A1 OK\r\n") == TaggedResponse("A1", "OK", None, "")
    assert parse(b"*  OK   [ALERT]   hi\r\n") == StatusResponse("OK", ResponseCode("ALERT"), "hi")
    assert parse("* OK Grüße\r\n".encode()) == StatusResponse("OK", None, "Grüße")
    assert parse(b"* OK [unterminated\r\n") == StatusResponse("OK", None, "[unterminated")


def test_continuation() -> None:
    assert parse(b"+ Ready for additional command text\r\n") == ContinuationRequest(
        "Ready for additional command text"
    )
    assert parse(b"+\r\n") == ContinuationRequest("")
    assert parse(b"+ idling\r\n") == ContinuationRequest("idling")


# -- server data -----------------------------------------------------------------------


def test_capability_flags_counts() -> None:
    assert parse(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=GSSAPI LOGINDISABLED\r\n") == (
        CapabilityData(frozenset({"IMAP4REV1", "STARTTLS", "AUTH=GSSAPI", "LOGINDISABLED"}))
    )
    assert parse(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n") == FlagsData(
        ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
    )
    assert parse(b"* FLAGS NIL\r\n") == FlagsData(())
    assert parse(b"* 172 EXISTS\r\n") == Exists(172)
    assert parse(b"* 1 RECENT\r\n") == Recent(1)
    assert parse(b"* 44 EXPUNGE\r\n") == Expunge(44)
    assert parse(b"* ENABLED CONDSTORE\r\n") == EnabledData(frozenset({"CONDSTORE"}))


def test_search_and_esearch() -> None:
    assert parse(b"* SEARCH 2 84 882\r\n") == SearchData((2, 84, 882))
    assert parse(b"* SEARCH\r\n") == SearchData(())
    assert parse(b"* SEARCH 2 5 6 (MODSEQ 917162500)\r\n") == SearchData((2, 5, 6), 917162500)
    event = parse(b'* ESEARCH (TAG "A283") UID COUNT 3 ALL 2,10:11 MIN 2 MAX 11\r\n')
    assert event == ESearchData(
        tag="A283", uid=True, min=2, max=11, count=3, all=SequenceSet(((2, 2), (10, 11)))
    )
    assert isinstance(event, ESearchData)
    assert event.all is not None
    assert list(event.all) == [2, 10, 11]
    assert parse(b'* ESEARCH (TAG "A1") UID\r\n') == ESearchData(tag="A1", uid=True)


def test_id_and_unknown() -> None:
    assert parse(b'* ID ("name" "Dovecot" "version" NIL)\r\n') == IdData(
        {"name": "Dovecot", "version": None}
    )
    assert parse(b"* ID NIL\r\n") == IdData(None)
    event = parse(b"* STATUS INBOX (MESSAGES 3)\r\n")
    assert event == UnknownResponse("STATUS", b"* STATUS INBOX (MESSAGES 3)")
    assert parse(b"* 3 WEIRD\r\n") == UnknownResponse("WEIRD", b"* 3 WEIRD")


# -- FETCH ------------------------------------------------------------------------------


def test_fetch_hot_path() -> None:
    event = parse(
        b"* 12 FETCH (UID 4827313 RFC822.SIZE 5 FLAGS (\\Seen $Forwarded) "
        b"BODY[] {5}\r\nhello MODSEQ (12121231000))\r\n"
    )
    assert event == FetchData(
        seq=12,
        uid=4827313,
        flags=("\\Seen", "$Forwarded"),
        rfc822_size=5,
        sections={"": b"hello"},
        modseq=12121231000,
    )
    assert isinstance(event, FetchData)
    assert event.body == b"hello"


def test_fetch_sections_partial_nil_and_rfc822_forms() -> None:
    event = parse(
        b"* 1 FETCH (BODY[HEADER.FIELDS (From Subject)] {4}\r\nab\r\n"
        b' BODY[1.MIME] "x" BODY[TEXT]<0> {2}\r\nhi BODY[2] NIL RFC822.HEADER {1}\r\nH'
        b" RFC822 {1}\r\nM RFC822.TEXT {1}\r\nT BINARY[1] ~{1}\r\nB)\r\n"
    )
    assert isinstance(event, FetchData)
    assert event.sections == {
        "HEADER.FIELDS (FROM SUBJECT)": b"ab\r\n",
        "1.MIME": b"x",
        "TEXT<0>": b"hi",
        "2": None,
        "HEADER": b"H",
        "": b"M",
        "TEXT": b"T",
    }
    assert event.extra == {"BINARY[1]": b"B"}


def test_fetch_internaldate() -> None:
    event = parse(b'* 1 FETCH (INTERNALDATE "17-Jul-1996 02:44:25 -0700")\r\n')
    assert isinstance(event, FetchData)
    assert event.internaldate == datetime.datetime(
        1996, 7, 17, 2, 44, 25, tzinfo=datetime.timezone(datetime.timedelta(hours=-7))
    )
    event = parse(b'* 1 FETCH (INTERNALDATE " 7-Jul-1996 02:44:25 +0000")\r\n')
    assert isinstance(event, FetchData)
    assert event.internaldate is not None
    assert event.internaldate.day == 7
    with pytest.raises(RemoteProtocolError, match="INTERNALDATE"):
        parse(b'* 1 FETCH (INTERNALDATE "yesterday")\r\n')


# RFC 3501 section 7.4.2 example (ENVELOPE) and a BODYSTRUCTURE from section 7.4.2 too.
RFC_ENVELOPE = (
    b'* 12 FETCH (FLAGS (\\Seen) INTERNALDATE "17-Jul-1996 02:44:25 -0700" '
    b'RFC822.SIZE 4286 ENVELOPE ("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
    b'"IMAP4rev1 WG mtg summary and minutes" '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'((NIL NIL "imap" "cac.washington.edu")) '
    b'((NIL NIL "minutes" "CNRI.Reston.VA.US")'
    b'("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
    b'"<B27397-0100000@cac.washington.edu>") '
    b'BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92))\r\n'
)


def test_rfc3501_envelope_example() -> None:
    event = parse(RFC_ENVELOPE)
    assert isinstance(event, FetchData)
    assert event.seq == 12
    assert event.rfc822_size == 4286
    env = event.envelope
    assert env is not None
    assert env.subject == "IMAP4rev1 WG mtg summary and minutes"
    assert env.from_ == (Address("Terry Gray", None, "gray", "cac.washington.edu"),)
    assert [a.email for a in env.cc] == ["minutes@CNRI.Reston.VA.US", "KLENSIN@MIT.EDU"]
    assert env.bcc == ()
    assert env.in_reply_to is None
    assert env.message_id == "<B27397-0100000@cac.washington.edu>"
    assert event.bodystructure == BodyPart(
        type="text",
        subtype="plain",
        params={"charset": "US-ASCII"},
        id=None,
        description=None,
        encoding="7bit",
        size=3028,
        lines=92,
    )


def test_multipart_bodystructure_with_extensions_and_message_rfc822() -> None:
    data = (
        b'* 1 FETCH (UID 9 BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL'
        b' "quoted-printable" 120 4 NIL NIL NIL NIL)'
        b'("application" "pdf" ("name" "a.pdf") NIL NIL "base64" 5000 NIL'
        b' ("attachment" ("filename" "a.pdf")) NIL NIL)("message" "rfc822" NIL NIL NIL "7bit" 300'
        b' (NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL) ("text" "plain" NIL NIL NIL "7bit" 10 1)'
        b' 12) "mixed" ("boundary" "xyz") NIL "en" NIL))\r\n'
    )
    event = parse(data)
    assert isinstance(event, FetchData)
    body = event.bodystructure
    assert isinstance(body, MultipartBody)
    assert body.subtype == "mixed"
    assert body.params == {"boundary": "xyz"}
    assert body.language == ("en",)
    text, pdf, inner = body.parts
    assert isinstance(text, BodyPart)
    assert text.lines == 4
    assert text.encoding == "quoted-printable"
    assert isinstance(pdf, BodyPart)
    assert pdf.disposition == ("attachment", {"filename": "a.pdf"})
    assert pdf.size == 5000
    assert isinstance(inner, BodyPart)
    assert inner.envelope is not None
    assert inner.envelope.subject == "inner"
    assert inner.lines == 12
    assert isinstance(inner.body, BodyPart)
    assert inner.body.size == 10


def test_fetch_quirks_nil_lists_extra_spaces_8bit_quoted() -> None:
    data = (
        '* 5 FETCH ( UID  3   FLAGS NIL ENVELOPE (NIL "Grüße" NIL NIL NIL NIL NIL NIL NIL NIL)'
        " X-GM-LABELS (\\Inbox) )\r\n"
    ).encode()
    event = parse(data)
    assert isinstance(event, FetchData)
    assert event.uid == 3
    assert event.flags == ()
    assert event.envelope is not None
    assert event.envelope.subject == "Grüße"
    assert event.envelope.from_ == ()
    assert event.extra == {"X-GM-LABELS": [b"\\Inbox"]}


def test_quoted_escapes() -> None:
    event = parse(b'* ID ("a\\"b" "c\\\\d")\r\n')
    assert event == IdData({'a"b': "c\\d"})


# -- hostile and broken input ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'* 1 FETCH (BODY[] "unterminated)\r\n',
        b"* 1 FETCH (UID)\r\n",
        b"* 1 FETCH (UID x)\r\n",
        b"* 1 FETCH UID 5\r\n",
        b"* 1 FETCH (UID 5\r\n",
        b"* 1 FETCH (ENVELOPE (NIL))\r\n",
        b"* 1 FETCH (BODYSTRUCTURE ())\r\n",
        b"* 1 FETCH (MODSEQ 5)\r\n",
        b'* ID ("odd")\r\n',
        b"* OK [UIDNEXT abc] x\r\n",
        b"* ESEARCH ALL (1)\r\n",
        b"* SEARCH 1 two\r\n",
        b"A1 MAYBE x\r\n",
        b"(garbage\r\n",
        b"*\r\n",
        b"* FLAGS (\\Seen\r\n",
    ],
)
def test_malformed_responses_raise_with_excerpt(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse(data)
    assert len(info.value.excerpt) <= 80


def test_deep_nesting_is_refused() -> None:
    depth = MAX_NESTING_DEPTH + 5
    data = b"* 1 FETCH (BODYSTRUCTURE " + b"(" * depth + b")" * depth + b")\r\n"
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        parse(data)


def test_moderate_nesting_is_fine() -> None:
    inner = b'("text" "plain" NIL NIL NIL "7bit" 1 1)'
    body = inner
    for _ in range(30):
        body = b"(" + body + b' "mixed")'
    event = parse(b"* 1 FETCH (BODYSTRUCTURE " + body + b")\r\n")
    assert isinstance(event, FetchData)
    node = event.bodystructure
    for _ in range(30):
        assert isinstance(node, MultipartBody)
        node = node.parts[0]
    assert isinstance(node, BodyPart)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parser(junk: bytes) -> None:
    framer = Framer(max_line_length=1000, max_literal_size=1000)
    framer.receive_data(junk + b"\r\n")
    try:
        while (frame := framer.next_frame()) is not None:
            parse_response(frame)
    except RemoteProtocolError:
        pass


@given(
    uid=st.integers(min_value=1, max_value=2**32 - 1),
    flags=st.lists(st.sampled_from(["\\Seen", "\\Flagged", "$Label", "a]b"]), max_size=4),
    body=st.binary(max_size=300),
)
def test_fetch_round_trip(uid: int, flags: list[str], body: bytes) -> None:
    data = (
        b"* 1 FETCH (UID %d FLAGS (%s) BODY[] {%d}\r\n" % (uid, " ".join(flags).encode(), len(body))
        + body
        + b")\r\n"
    )
    assert parse(data) == FetchData(seq=1, uid=uid, flags=tuple(flags), sections={"": body})


@given(st.lists(st.integers(min_value=1, max_value=2**32 - 1), min_size=1, max_size=50))
def test_sequence_set_round_trip(numbers: list[int]) -> None:
    seq = SequenceSet.of(numbers)
    assert list(SequenceSet.parse(str(seq))) == sorted(set(numbers))
    assert len(seq) == len(set(numbers))


def test_sequence_set_star_forms() -> None:
    seq = SequenceSet.parse("5:*,*:3,*")
    assert seq.ranges == ((5, None), (3, None), (None, None))
    assert str(seq) == "5:*,3:*,*"
    with pytest.raises(ValueError, match="enumerate"):
        next(iter(seq))
    with pytest.raises(ValueError, match="no known size"):
        len(seq)
    with pytest.raises(ValueError, match="sequence number"):
        SequenceSet.parse("0:3")
    with pytest.raises(ValueError, match="at least one"):
        SequenceSet.of([])


# -- LIST ------------------------------------------------------------------------------


def test_list_quoted_name_and_delimiter() -> None:
    event = parse(b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"\r\n')
    assert event == ListData(("\\HasNoChildren", "\\Sent"), "/", b"Sent Items")
    assert event.selectable


def test_list_atom_name_nil_delimiter_and_noselect() -> None:
    event = parse(b"* LIST (\\Noselect) NIL INBOX\r\n")
    assert event == ListData(("\\Noselect",), None, b"INBOX")
    assert not event.selectable


def test_list_literal_name_and_lsub() -> None:
    event = parse(b'* LSUB () "." {12}\r\nfoo\r\nbar.baz\r\n')
    assert event == ListData((), ".", b"foo\r\nbar.baz")


def test_list_mailbox_named_nil_is_a_name() -> None:
    assert parse(b'* LIST () "/" NIL\r\n') == ListData((), "/", b"NIL")


def test_list_modified_utf7_name_kept_raw_and_decodable() -> None:
    event = parse(b'* LIST () "/" "Entw&APw-rfe"\r\n')
    assert isinstance(event, ListData)
    assert decode_mailbox(event.raw_name) == "Entwürfe"


@pytest.mark.parametrize(
    "line",
    [b'* LIST \\HasNoChildren "/" x\r\n', b'* LIST () "/"\r\n', b"* LIST (\r\n"],
)
def test_list_malformed(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(line)


# -- numbers are bounded by their grammar (issue 11 item 1) ------------------------------

HUGE = b"9" * 5000  # past Python's 4,300-digit int() limit: a bare ValueError before


@pytest.mark.parametrize(
    "data",
    [
        b"* OK [UIDNEXT " + HUGE + b"] Predicted next UID\r\n",
        b"* OK [UIDVALIDITY " + HUGE + b"] UIDs valid\r\n",
        b"* OK [HIGHESTMODSEQ " + HUGE + b"] x\r\n",
        b"A1 OK [UNSEEN " + HUGE + b"] x\r\n",
        b"* " + HUGE + b" EXISTS\r\n",
        b"* " + HUGE + b" RECENT\r\n",
        b"* " + HUGE + b" EXPUNGE\r\n",
        b"* " + HUGE + b" FETCH (UID 1)\r\n",
        b"* 1 FETCH (UID " + HUGE + b")\r\n",
        b"* 1 FETCH (RFC822.SIZE " + HUGE + b")\r\n",
        b"* 1 FETCH (MODSEQ (" + HUGE + b"))\r\n",
        b"* 1 FETCH (BODY[]<" + HUGE + b"> NIL)\r\n",
        b'* 1 FETCH (BODYSTRUCTURE ("text" "plain" NIL NIL NIL "7bit" ' + HUGE + b" 1))\r\n",
        b'* 1 FETCH (BODYSTRUCTURE ("text" "plain" NIL NIL NIL "7bit" 1 ' + HUGE + b"))\r\n",
        b"* SEARCH 1 " + HUGE + b"\r\n",
        b"* SEARCH 1 (MODSEQ " + HUGE + b")\r\n",
        b'* ESEARCH (TAG "A1") UID COUNT ' + HUGE + b"\r\n",
        b'* ESEARCH (TAG "A1") UID MODSEQ ' + HUGE + b"\r\n",
    ],
)
def test_over_long_numbers_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="at most") as info:
        parse(data)
    assert len(info.value.excerpt) <= 80


@pytest.mark.parametrize(
    "data",
    [
        # number / nz-number: 32 bits unsigned.
        b"* OK [UIDNEXT 4294967296] x\r\n",
        b"* 4294967296 EXISTS\r\n",
        b"* 1 FETCH (UID 4294967296)\r\n",
        b"* SEARCH 4294967296\r\n",
        b"* ESEARCH UID MAX 4294967296\r\n",
        # nz-number: zero is not a message number or UID.
        b"* 0 FETCH (UID 1)\r\n",
        b"* 0 FETCH (FLAGS ())\r\n",
        b"* 0 EXPUNGE\r\n",
        b"* 1 FETCH (UID 0)\r\n",
        b"* SEARCH 3 0\r\n",
        # mod-sequence-value / number64: 63 bits.
        b"* OK [HIGHESTMODSEQ 9223372036854775808] x\r\n",
        b"* 1 FETCH (MODSEQ (9223372036854775808))\r\n",
        b"* 1 FETCH (RFC822.SIZE 9223372036854775808)\r\n",
        # Absurd zero padding is refused by length, before int().
        b"* 1 FETCH (UID " + b"0" * 30 + b"1)\r\n",
    ],
)
def test_out_of_range_numbers_are_a_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(data)


def test_numbers_at_their_grammar_maximum_are_accepted() -> None:
    top, top64 = 2**32 - 1, 2**63 - 1
    assert parse(b"* OK [UIDNEXT 4294967295] x\r\n") == StatusResponse(
        "OK", ResponseCode("UIDNEXT", top), "x"
    )
    assert parse(b"* OK [HIGHESTMODSEQ 9223372036854775807] x\r\n") == StatusResponse(
        "OK", ResponseCode("HIGHESTMODSEQ", top64), "x"
    )
    assert parse(b"* 4294967295 EXISTS\r\n") == Exists(top)
    assert parse(b"* 0 EXISTS\r\n") == Exists(0)  # number, not nz-number
    assert parse(b"* OK [UNSEEN 0] x\r\n") == StatusResponse(
        "OK", ResponseCode("UNSEEN", 0), "x"
    )  # tolerated: some servers say so for an empty mailbox
    assert parse(
        b"* 4294967295 FETCH (UID 4294967295 RFC822.SIZE 9223372036854775807 "
        b"MODSEQ (9223372036854775807))\r\n"
    ) == FetchData(seq=top, uid=top, rfc822_size=top64, modseq=top64)
    assert parse(b"* SEARCH 4294967295 (MODSEQ 9223372036854775807)\r\n") == SearchData(
        (top,), top64
    )
    assert parse(b"* 1 FETCH (UID 0000000007)\r\n") == FetchData(seq=1, uid=7)


# -- real-server quirks (issue 11 items 13-18) -------------------------------------------

TEXT_PART = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'
ENVELOPE_RAW = b'(NIL "inner" NIL NIL NIL NIL NIL NIL NIL "<i@x.test>")'


def structure(raw: bytes) -> object:
    event = parse(b"* 1 FETCH (UID 7 BODYSTRUCTURE " + raw + b")\r\n")
    assert isinstance(event, FetchData)
    assert event.uid == 7  # the rest of the response still parses
    return event.bodystructure


def test_multipart_with_zero_parts_is_an_empty_multipart() -> None:
    assert structure(b'("MIXED")') == MultipartBody(parts=(), subtype="mixed")
    assert structure(b'("ALTERNATIVE" ("BOUNDARY" "b1") NIL NIL NIL)') == MultipartBody(
        parts=(), subtype="alternative", params={"boundary": "b1"}
    )
    # ... also as the body of a message/rfc822 part.
    part = structure(
        b'("message" "rfc822" NIL NIL NIL "7bit" 100 ' + ENVELOPE_RAW + b' ("MIXED") 5)'
    )
    assert isinstance(part, BodyPart)
    assert part.body == MultipartBody(parts=(), subtype="mixed")
    assert part.envelope is not None
    assert part.envelope.subject == "inner"
    assert part.lines == 5


def test_nil_media_type_of_a_multipart() -> None:
    # NIL where the multipart's subtype belongs: read as mixed (RFC 2046 5.1.3).
    node = structure(b"(" + TEXT_PART + b" NIL)")
    assert isinstance(node, MultipartBody)
    assert node.subtype == "mixed"
    assert len(node.parts) == 1
    # NIL as the type of a part-less multipart.
    assert structure(b'(NIL "MIXED" ("BOUNDARY" "x") NIL NIL)') == MultipartBody(
        parts=(), subtype="mixed", params={"boundary": "x"}
    )


def test_message_rfc822_sent_as_a_basic_part() -> None:
    assert structure(b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 1234)') == BodyPart(
        "message", "rfc822", {}, None, None, "7bit", 1234
    )
    # Without envelope/body/lines but with extension data: the extension data is
    # read as such, not as a (broken) inner body.
    part = structure(
        b'("MESSAGE" "RFC822" ("name" "a.eml") NIL NIL "7BIT" 1234 NIL '
        b'("attachment" ("filename" "a.eml")) NIL NIL)'
    )
    assert part == BodyPart(
        "message",
        "rfc822",
        {"name": "a.eml"},
        None,
        None,
        "7bit",
        1234,
        disposition=("attachment", {"filename": "a.eml"}),
    )
    # NIL envelope and body followed by a line count: still the full form.
    part = structure(b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 1234 NIL NIL 12)')
    assert isinstance(part, BodyPart)
    assert part.lines == 12
    assert part.body is None


def test_basic_part_without_subtype() -> None:
    # Content-Type "X-ZIP" with no "/subtype": the server leaves the field out.
    assert structure(b'("X-ZIP" NIL NIL NIL "BASE64" 1234)') == BodyPart(
        "x-zip", "", {}, None, None, "base64", 1234
    )
    part = structure(
        b'(("X-ZIP" ("name" "a.zip") NIL NIL "BASE64" 1234 NIL ("attachment" NIL) NIL NIL) '
        + TEXT_PART
        + b' "MIXED")'
    )
    assert isinstance(part, MultipartBody)
    assert part.parts[0] == BodyPart(
        "x-zip",
        "",
        {"name": "a.zip"},
        None,
        None,
        "base64",
        1234,
        disposition=("attachment", {}),
    )


@pytest.mark.parametrize(
    "raw", [b"()", b'("text" "plain" NIL)', b'("text" "plain" NIL NIL NIL "7bit")']
)
def test_bodystructure_beyond_repair_is_still_refused(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        structure(raw)


def test_exchange_bracket_that_is_not_a_response_code_is_text() -> None:
    line = (
        b'A1 OK [Error="Microsoft.Exchange.Data.Storage.StoragePermanentException" '
        b"Proxy=BN8PR12CA0001.NAMPRD12.PROD.OUTLOOK.COM:1993:SSL Service=Imap4] "
        b"AUTHENTICATE completed.\r\n"
    )
    event = parse(line)
    assert event == TaggedResponse("A1", "OK", None, line[6:-2].decode())
    # A code name is an atom followed by a space or "]": both still work.
    assert parse(b"* OK [ALERT] hi\r\n") == StatusResponse("OK", ResponseCode("ALERT"), "hi")
    assert parse(b"* NO [X-ODD-1 data] hi\r\n") == StatusResponse(
        "NO", ResponseCode("X-ODD-1", "data"), "hi"
    )


def test_yandex_empty_section_without_value() -> None:
    assert parse(b"* 5 FETCH (UID 9 BODY[2] )\r\n") == FetchData(seq=5, uid=9, sections={"2": b""})
    assert parse(b"* 5 FETCH (BODY[2])\r\n") == FetchData(seq=5, sections={"2": b""})


def test_stray_response_code_lines_are_unknown_responses() -> None:
    # Exchange, during MOVE: a bare response code line, with or without "* ".
    assert parse(b"[COPYUID 1727 5:6 101:102]\r\n") == UnknownResponse(
        "[COPYUID]", b"[COPYUID 1727 5:6 101:102]"
    )
    assert parse(b"* [COPYUID 1727 5 101] Moved\r\n") == UnknownResponse(
        "[COPYUID]", b"* [COPYUID 1727 5 101] Moved"
    )
    for junk in (b"[\r\n", b"[COPYUID\r\n", b"* [=x]\r\n"):
        with pytest.raises(RemoteProtocolError):
            parse(junk)


def test_list_name_starting_with_tilde_is_an_atom() -> None:
    # RFC 3501 section 6.3.8's own example.
    assert parse(b'* LIST (\\Noselect) "/" ~/Mail/foo\r\n') == ListData(
        ("\\Noselect",), "/", b"~/Mail/foo"
    )
    # A real literal8 marker is still a literal.
    assert parse(b'* LIST () "/" ~{3}\r\nabc\r\n') == ListData((), "/", b"abc")


@pytest.mark.parametrize(
    "answered",
    [
        b'HEADER.FIELDS ("Content-Type")',
        b"HEADER.FIELDS (CONTENT-TYPE)",
        b"header.fields (Content-Type)",
        b'HEADER.FIELDS  ( "content-type" )',
    ],
)
def test_header_fields_section_found_by_the_requested_spelling(answered: bytes) -> None:
    event = parse(b"* 1 FETCH (BODY[" + answered + b"] {21}\r\nContent-Type: a/b\r\n\r\n)\r\n")
    assert isinstance(event, FetchData)
    assert event.sections == {"HEADER.FIELDS (CONTENT-TYPE)": b"Content-Type: a/b\r\n\r\n"}
    for asked in ('HEADER.FIELDS ("Content-Type")', "HEADER.FIELDS (Content-Type)"):
        assert event.section(asked) == b"Content-Type: a/b\r\n\r\n"
    assert event.section("HEADER.FIELDS (To)") is None


def test_section_lookup_keeps_the_other_keys() -> None:
    event = parse(
        b"* 1 FETCH (BODY[] {2}\r\nhi BODY[1.mime] {1}\r\nm BODY[2]<0> {1}\r\np "
        b'BODY[HEADER.FIELDS.NOT ("X-A" X-B)] {1}\r\nn)\r\n'
    )
    assert isinstance(event, FetchData)
    assert event.sections == {
        "": b"hi",
        "1.MIME": b"m",
        "2<0>": b"p",
        "HEADER.FIELDS.NOT (X-A X-B)": b"n",
    }
    assert event.section("") == event.body == b"hi"
    assert event.section("1.MIME") == b"m"
    assert event.section("2<0.4096>") == event.section("2<0>") == b"p"
    assert event.section('header.fields.not (x-a "X-B")') == b"n"
