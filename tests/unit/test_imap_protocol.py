"""The sans-I/O IMAP client: encoder, state table, and whole conversations as bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.errors import LocalProtocolError, RemoteProtocolError
from prxmail.imap import (
    NEED_DATA,
    ConnectionClosed,
    ConnectionState,
    ContinuationRequest,
    Event,
    Exists,
    FetchData,
    IdData,
    IMAPProtocol,
    Raw,
    SequenceSet,
    StatusResponse,
    TaggedResponse,
    decode_mailbox,
    encode_command,
    encode_mailbox,
)
from prxmail.imap._parser import parse_response
from prxmail.imap._state import ALLOWED, TRANSITIONS

# -- encoder -----------------------------------------------------------------------------


def test_atoms_quoted_and_literals() -> None:
    assert encode_command("A1", "LOGIN", ["bob@x.test", 'p "w\\'])[0] == (
        b'A1 LOGIN bob@x.test "p \\"w\\\\"\r\n'
    )
    assert encode_command("A1", "SELECT", [""]) == [b'A1 SELECT ""\r\n']
    assert encode_command("A1", "LOGIN", ["u", "line\r\nA2 DELETE INBOX"]) == [
        b"A1 LOGIN u {21}\r\n",
        b"line\r\nA2 DELETE INBOX\r\n",
    ]
    assert encode_command("A1", "LOGIN", ["u", "pässword"], literal_plus=True) == [
        b"A1 LOGIN u {9+}\r\np\xc3\xa4ssword\r\n"
    ]


def test_literal_minus_only_for_small_literals() -> None:
    assert len(encode_command("A1", "X", ["\r" * 4096], literal_minus=True)) == 1
    assert len(encode_command("A1", "X", ["\r" * 4097], literal_minus=True)) == 2


def test_numbers_sets_lists_raw() -> None:
    cmd = encode_command(
        "A7",
        "UID FETCH",
        [SequenceSet.of([1, 2, 3, 9]), Raw("(UID BODY.PEEK[])"), [Raw("CHANGEDSINCE"), 12]],
    )
    assert cmd == [b"A7 UID FETCH 1:3,9 (UID BODY.PEEK[]) (CHANGEDSINCE 12)\r\n"]


@pytest.mark.parametrize("bad", [Raw("a\r\nb"), Raw("a\x00"), "nul\x00", -1, True])
def test_unsafe_arguments_are_refused(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode_command("A1", "X", [bad])  # type: ignore[list-item]


@given(st.text(max_size=60))
def test_no_data_ever_puts_crlf_on_a_command_line(value: str) -> None:
    try:
        chunks = encode_command("A1", "LOGIN", ["user", value])
    except LocalProtocolError:
        assert "\x00" in value
        return
    first = chunks[0]
    # CR/LF only at the end of a line that announces a literal, or at the very end.
    lines = first.split(b"\r\n")
    assert lines[-1] == b"" or len(chunks) == 1
    for chunk in chunks[:-1]:
        assert chunk.endswith(b"}\r\n")
        assert chunk.count(b"\r\n") == 1
    if len(chunks) == 1 and "\r" not in value and "\n" not in value:
        assert first.count(b"\r\n") == 1


@given(st.text(max_size=40))
def test_mailbox_name_round_trip(name: str) -> None:
    encoded = encode_mailbox(name)
    assert encoded.isascii()
    assert decode_mailbox(encoded) == name


def test_mailbox_rfc3501_example() -> None:
    assert encode_mailbox("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert encode_mailbox("A&B") == "A&-B"
    assert decode_mailbox("&Jjo-!") == "☺!"


# -- state table ----------------------------------------------------------------------


def test_state_table_invariants() -> None:
    assert ALLOWED[ConnectionState.LOGOUT] == frozenset()
    assert "FETCH" not in ALLOWED[ConnectionState.AUTHENTICATED]
    assert "LOGIN" not in ALLOWED[ConnectionState.SELECTED]
    for (state, command, _), _new in TRANSITIONS.items():
        assert command in ALLOWED[state] or state is ConnectionState.IDLING


# -- conversations ---------------------------------------------------------------------


def events(proto: IMAPProtocol, data: bytes = b"") -> list[Event]:
    if data:
        proto.receive_data(data)
    out: list[Event] = []
    while (event := proto.next_event()) is not NEED_DATA:
        assert not isinstance(event, type(NEED_DATA))
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def greeted(caps: bytes = b"IMAP4rev1 IDLE") -> IMAPProtocol:
    proto = IMAPProtocol()
    [greeting] = events(proto, b"* OK [CAPABILITY " + caps + b"] hi\r\n")
    assert isinstance(greeting, StatusResponse)
    return proto


def test_full_session_transcript() -> None:
    proto = greeted(b"IMAP4rev1 IDLE ID")
    assert proto.capabilities == {"IMAP4REV1", "IDLE", "ID"}
    assert proto.state is ConnectionState.NOT_AUTHENTICATED

    tag = proto.send_command("LOGIN", ["alice", "secret"])
    assert proto.data_to_send() == b"A0001 LOGIN alice secret\r\n"
    [ok] = events(proto, b"A0001 OK [CAPABILITY IMAP4rev1 IDLE CONDSTORE] Logged in\r\n")
    assert ok == TaggedResponse(tag, "OK", ok.code, "Logged in")  # type: ignore[union-attr]
    assert proto.state is ConnectionState.AUTHENTICATED
    assert "CONDSTORE" in proto.capabilities

    proto.send_command("ID", [Raw("NIL")])
    assert proto.data_to_send() == b"A0002 ID NIL\r\n"
    got = events(proto, b'* ID ("name" "Dovecot")\r\nA0002 OK ID done\r\n')
    assert got[0] == IdData({"name": "Dovecot"})

    proto.send_command("SELECT", ["INBOX"])
    proto.data_to_send()
    got = events(proto, b"* 2 EXISTS\r\n* OK [UIDVALIDITY 7] x\r\nA0003 OK [READ-WRITE] ok\r\n")
    assert got[0] == Exists(2)
    assert proto.state is ConnectionState.SELECTED

    proto.send_command("UID FETCH", [SequenceSet.of([1, 2]), Raw("(BODY.PEEK[])")])
    assert proto.data_to_send() == b"A0004 UID FETCH 1:2 (BODY.PEEK[])\r\n"
    got = events(proto, b"* 1 FETCH (UID 1 BODY[] {2}\r\nhi)\r\n")
    assert got == [FetchData(seq=1, uid=1, sections={"": b"hi"})]
    assert proto.command_in_progress == "UID"
    events(proto, b"A0004 OK done\r\n")
    assert proto.command_in_progress is None

    proto.send_command("IDLE")
    assert proto.data_to_send() == b"A0005 IDLE\r\n"
    assert events(proto, b"+ idling\r\n") == [ContinuationRequest("idling")]
    assert proto.state is ConnectionState.IDLING
    with pytest.raises(LocalProtocolError):
        proto.send_command("NOOP")
    assert events(proto, b"* 3 EXISTS\r\n") == [Exists(3)]
    proto.send_done()
    assert proto.data_to_send() == b"DONE\r\n"
    with pytest.raises(LocalProtocolError):
        proto.send_done()
    events(proto, b"A0005 OK Idle completed\r\n")
    assert proto.state is ConnectionState.SELECTED

    proto.send_command("LOGOUT")
    proto.data_to_send()
    got = events(proto, b"* BYE bye\r\nA0006 OK done\r\n")
    assert proto.state is ConnectionState.LOGOUT
    proto.receive_data(b"")
    assert proto.next_event() == ConnectionClosed()


def test_synchronising_literal_waits_for_continuation() -> None:
    proto = greeted()
    proto.send_command("LOGIN", ["alice", "pass\nword"])
    assert proto.data_to_send() == b"A0001 LOGIN alice {9}\r\n"
    assert proto.data_to_send() == b""
    # the "+" is consumed by the core, which releases the literal
    assert events(proto, b"+ Ready\r\n") == []
    assert proto.data_to_send() == b"pass\nword\r\n"
    events(proto, b"A0001 OK ok\r\n")
    assert proto.state is ConnectionState.AUTHENTICATED


def test_literal_refused_drops_rest_of_command() -> None:
    proto = greeted()
    proto.send_command("LOGIN", ["alice", "pass\nword"])
    proto.data_to_send()
    [tagged] = events(proto, b"A0001 NO too big\r\n")
    assert isinstance(tagged, TaggedResponse)
    assert tagged.status == "NO"
    assert proto.data_to_send() == b""
    assert proto.state is ConnectionState.NOT_AUTHENTICATED


def test_literal_plus_when_offered() -> None:
    proto = greeted(b"IMAP4rev1 LITERAL+")
    proto.send_command("LOGIN", ["alice", "pass\nword"])
    assert proto.data_to_send() == b"A0001 LOGIN alice {9+}\r\npass\nword\r\n"


def test_authenticate_continuations_reach_the_caller() -> None:
    proto = greeted(b"IMAP4rev1 AUTH=PLAIN")
    proto.send_command("AUTHENTICATE", [Raw("PLAIN")])
    proto.data_to_send()
    assert events(proto, b"+ \r\n") == [ContinuationRequest("")]
    proto.send_continuation(b"AGFsaWNlAHNlY3JldA==")
    assert proto.data_to_send() == b"AGFsaWNlAHNlY3JldA==\r\n"
    with pytest.raises(LocalProtocolError):
        proto.send_continuation(b"x\r\nA2 LOGOUT")
    events(proto, b"A0001 OK ok\r\n")
    assert proto.state is ConnectionState.AUTHENTICATED


def test_commands_checked_against_state() -> None:
    proto = IMAPProtocol()
    with pytest.raises(LocalProtocolError, match="greeting"):
        proto.send_command("NOOP")
    events(proto, b"* OK hi\r\n")
    with pytest.raises(LocalProtocolError, match="not allowed in the not authenticated"):
        proto.send_command("SELECT", ["INBOX"])
    proto.send_command("NOOP")
    with pytest.raises(LocalProtocolError, match="still in progress"):
        proto.send_command("NOOP")


def test_failed_select_leaves_selected_state() -> None:
    proto = greeted()
    proto.send_command("LOGIN", ["a", "b"])
    events(proto, b"A0001 OK ok\r\n")
    proto.send_command("SELECT", ["INBOX"])
    events(proto, b"A0002 OK ok\r\n")
    assert proto.state is ConnectionState.SELECTED
    proto.send_command("SELECT", ["Nope"])
    events(proto, b"A0003 NO no such mailbox\r\n")
    assert proto.state is ConnectionState.AUTHENTICATED


def test_preauth_greeting() -> None:
    proto = IMAPProtocol()
    events(proto, b"* PREAUTH welcome back\r\n")
    assert proto.state is ConnectionState.AUTHENTICATED


def test_bye_greeting() -> None:
    proto = IMAPProtocol()
    [bye] = events(proto, b"* BYE too many connections\r\n")
    assert isinstance(bye, StatusResponse)
    assert bye.status == "BYE"
    assert proto.state is ConnectionState.LOGOUT


@pytest.mark.parametrize(
    "greeting", [b"HTTP/1.1 400 Bad Request\r\n", b"* 3 EXISTS\r\n", b"A1 OK x\r\n", b"+ go\r\n"]
)
def test_garbage_greeting(greeting: bytes) -> None:
    proto = IMAPProtocol()
    proto.receive_data(greeting)
    with pytest.raises(RemoteProtocolError):
        proto.next_event()


def test_bye_mid_command_then_eof() -> None:
    proto = greeted()
    proto.send_command("NOOP")
    proto.receive_data(b"* BYE shutting down\r\n")
    [bye] = events(proto)
    assert isinstance(bye, StatusResponse)
    assert bye.status == "BYE"
    assert proto.state is ConnectionState.LOGOUT
    proto.receive_data(b"")
    assert proto.next_event() == ConnectionClosed()


def test_wrong_tag_and_stray_continuation() -> None:
    proto = greeted()
    proto.send_command("NOOP")
    proto.receive_data(b"Z9 OK x\r\n")
    with pytest.raises(RemoteProtocolError, match="does not match"):
        proto.next_event()
    proto = greeted()
    proto.receive_data(b"+ hello\r\n")
    with pytest.raises(RemoteProtocolError, match="no command in progress"):
        proto.next_event()
    proto = greeted()
    proto.send_command("NOOP")
    proto.receive_data(b"+ hello\r\n")
    with pytest.raises(RemoteProtocolError, match="unexpected continuation"):
        proto.next_event()


def test_starttls_discards_buffered_plaintext_and_capabilities() -> None:
    proto = greeted(b"IMAP4rev1 STARTTLS LOGINDISABLED")
    proto.send_command("STARTTLS")
    proto.data_to_send()
    # an attacker appends a forged response right after the OK
    [ok] = events(proto, b"A0001 OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    assert isinstance(ok, TaggedResponse)
    assert proto.capabilities == frozenset()
    assert proto.next_event() is NEED_DATA


def test_eof_mid_response_is_a_protocol_error() -> None:
    proto = greeted()
    proto.send_command("NOOP")
    proto.receive_data(b"* 1 FETCH (BODY[] {10}\r\nabc")
    proto.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a literal"):
        proto.next_event()


SESSION = (
    b"* OK [CAPABILITY IMAP4rev1] hi\r\n"
    b"* 1 FETCH (UID 1 FLAGS (\\Seen) BODY[] {7}\r\nab\r\ncd\n)\r\n"
    b"* 2 EXISTS\r\n"
    b"* OK [UIDNEXT 5] x\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=10))
def test_events_independent_of_how_input_is_split(cuts: list[int]) -> None:
    reference = IMAPProtocol()
    expected = events(reference, SESSION)
    proto = IMAPProtocol()
    got: list[Event] = []
    points = sorted(set(cuts))
    for a, b in zip([0, *points], [*points, len(SESSION)], strict=False):
        if SESSION[a:b]:
            got.extend(events(proto, SESSION[a:b]))
    assert got == expected
    assert len(expected) == 4


def test_parse_response_is_exported_for_custom_use() -> None:
    from prxmail.imap import Framer

    framer = Framer()
    framer.receive_data(b"* 4 EXISTS\r\n")
    frame = framer.next_frame()
    assert frame is not None
    assert parse_response(frame) == Exists(4)


def test_events_identical_for_a_split_at_every_offset() -> None:
    reference = events(IMAPProtocol(), SESSION)
    for cut in range(1, len(SESSION)):
        proto = IMAPProtocol()
        got = events(proto, SESSION[:cut]) + events(proto, SESSION[cut:])
        assert got == reference, cut


# -- the ERROR state (issue 11 item 23, issue 15) ----------------------------------------


def broken(data: bytes) -> tuple[IMAPProtocol, RemoteProtocolError]:
    """A selected session whose server then sends ``data`` (a protocol error)."""
    proto = greeted()
    proto.send_command("LOGIN", ["alice", "secret"])
    proto.data_to_send()
    events(proto, b"A0001 OK in\r\n")
    proto.send_command("SELECT", ["INBOX"])
    proto.data_to_send()
    events(proto, b"* 3 EXISTS\r\nA0002 OK [READ-WRITE] ok\r\n")
    proto.send_command("NOOP")
    proto.data_to_send()
    proto.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        events(proto)
    return proto, info.value


@pytest.mark.parametrize(
    "data",
    [
        b"* 1 FETCH (UID x)\r\n",  # grammar
        b"Z9 OK stray\r\n",  # a tag we never sent
        b"+ more?\r\n",  # a continuation NOOP cannot take
        b"* 1 FETCH (BODY[] {99999999999}\r\n",  # over the literal limit
        b"* " + b"9" * 5000 + b" EXISTS\r\n",  # over-long number
    ],
)
def test_after_a_protocol_error_every_later_call_raises(data: bytes) -> None:
    # The rest of the stream is a perfectly good answer: before, it was processed as
    # if nothing had happened (the NOOP "completed", the state moved on).
    proto, error = broken(data + b"* 4 EXISTS\r\nA0003 OK NOOP done\r\n")
    assert proto.state is ConnectionState.ERROR
    assert proto.error is error
    calls = [
        proto.next_event,
        lambda: proto.receive_data(b"A0003 OK NOOP done\r\n"),
        lambda: proto.receive_data(b""),
        lambda: proto.send_command("NOOP"),
        lambda: proto.send_command("LOGOUT"),
        proto.send_done,
        lambda: proto.send_continuation(b"x"),
    ]
    for call in calls:
        with pytest.raises(LocalProtocolError, match="unusable since") as info:
            call()
        assert info.value.__cause__ is error
        assert str(error) in str(info.value)
    # Nothing more goes on the wire, and the state stays ERROR.
    assert not proto.has_data_to_send
    assert proto.data_to_send() == b""
    assert proto.command_in_progress is None
    assert proto.state is ConnectionState.ERROR


def test_protocol_error_in_the_greeting_is_terminal_too() -> None:
    proto = IMAPProtocol()
    proto.receive_data(b"HTTP/1.1 400 Bad Request\r\n* OK [CAPABILITY IMAP4rev1] hi\r\n")
    with pytest.raises(RemoteProtocolError, match="greeting"):
        proto.next_event()
    assert proto.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError, match="unusable"):
        proto.next_event()
    assert proto.greeting is None


def test_queued_bytes_are_dropped_on_a_protocol_error() -> None:
    # A LOGIN whose password waits for the server's "+" as a synchronising literal:
    # after the error it must never be released.
    proto = greeted()
    proto.send_command("LOGIN", ["alice", "pass\nword"])
    assert proto.data_to_send() == b"A0001 LOGIN alice {9}\r\n"
    proto.receive_data(b"* 1 FETCH (UID 0)\r\n+ go ahead\r\n")
    with pytest.raises(RemoteProtocolError):
        proto.next_event()
    assert proto.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        proto.next_event()
    assert proto.data_to_send() == b""


def test_error_state_is_terminal_in_the_table() -> None:
    from prxmail.imap._state import UNSOLICITED

    error = ConnectionState.ERROR
    assert ALLOWED[error] == frozenset()
    for state in ConnectionState:
        assert UNSOLICITED[(state, "PROTOCOL_ERROR")] is error
    assert not [key for key, new in UNSOLICITED.items() if key[0] is error and new is not error]
    assert not [key for key in TRANSITIONS if key[0] is error]


def test_eof_and_bye_still_close_cleanly_without_an_error() -> None:
    proto = greeted()
    events(proto, b"* BYE going\r\n")
    proto.receive_data(b"")
    assert proto.next_event() == ConnectionClosed()
    assert proto.next_event() == ConnectionClosed()  # every time, as documented
    assert proto.state is ConnectionState.LOGOUT
    assert proto.error is None


# Real-server quirks inside a session: each response is accepted and the session goes on.
QUIRKS = (
    b"* OK [CAPABILITY IMAP4rev1 MOVE] hi\r\n"
    b'* LIST (\\Noselect) "/" ~/Mail/foo\r\n'
    b'* 2 FETCH (UID 9 BODYSTRUCTURE ("MIXED") BODY[2] )\r\n'
    b'* 3 FETCH (UID 10 BODY[HEADER.FIELDS ("Content-Type")] {4}\r\nab\r\n)\r\n'
    b"[COPYUID 17 9:10 101:102]\r\n"
    b"* 2 EXPUNGE\r\n"
    b'A0001 OK [Error="Microsoft.Exchange.X" Service=Imap4] done\r\n'
)


QUIRKS_GREETING, QUIRKS_REST = QUIRKS.split(b"\r\n", 1)


def quirk_session(cuts: list[int]) -> list[Event]:
    proto = IMAPProtocol()
    got = events(proto, QUIRKS_GREETING + b"\r\n")
    proto.send_command("NOOP")
    points = sorted(set(cuts))
    for a, b in zip([0, *points], [*points, len(QUIRKS_REST)], strict=False):
        if QUIRKS_REST[a:b]:
            got.extend(events(proto, QUIRKS_REST[a:b]))
    assert proto.state is ConnectionState.NOT_AUTHENTICATED
    assert proto.commands_in_flight == 0
    return got


def test_quirks_session_is_accepted_whole() -> None:
    got = quirk_session([])
    assert len(got) == 7
    fetch = got[3]
    assert isinstance(fetch, FetchData)
    assert fetch.section('HEADER.FIELDS ("Content-Type")') == b"ab\r\n"
    assert got[-1] == TaggedResponse(
        "A0001", "OK", None, '[Error="Microsoft.Exchange.X" Service=Imap4] done'
    )


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=1, max_value=len(QUIRKS_REST) - 1), max_size=12))
def test_quirks_session_independent_of_how_input_is_split(cuts: list[int]) -> None:
    assert quirk_session(cuts) == quirk_session([])
