"""The sans-I/O SMTP core: byte transcripts in, replies and state out."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.errors import (
    ConnectionBrokenError,
    LocalProtocolError,
    RemoteProtocolError,
    SMTPPermanentError,
    SMTPTransientError,
)
from prxmail.smtp import (
    MAX_LINE_LENGTH,
    MAX_REPLY_LINES,
    Command,
    Extensions,
    Reply,
    SMTPProtocol,
    State,
    decode_data,
    encode_data,
    error_for_reply,
    parse_extensions,
)
from prxmail.smtp._protocol import decode_challenge, mail_options

GREETING = b"220 mx.prxmail.test ESMTP Postfix\r\n"
EHLO_REPLY = (
    b"250-mx.prxmail.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-VRFY\r\n"
    b"250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250 SMTPUTF8\r\n"
)


def feed(proto: SMTPProtocol, data: bytes) -> list[Reply]:
    proto.receive_data(data)
    replies = []
    while (reply := proto.next_reply()) is not None:
        replies.append(reply)
    return replies


def ready_protocol(ehlo: bytes = EHLO_REPLY) -> SMTPProtocol:
    proto = SMTPProtocol()
    assert feed(proto, GREETING)[0].code == 220
    assert proto.send_ehlo("client.test") == b"EHLO client.test\r\n"
    feed(proto, ehlo)
    assert proto.state is State.READY
    return proto


# ----- replies -------------------------------------------------------------------


def test_greeting_and_ehlo_transcript() -> None:
    proto = SMTPProtocol()
    assert proto.state is State.GREETING
    assert proto.next_reply() is None
    (greeting,) = feed(proto, GREETING)
    assert greeting.code == 220
    assert greeting.command is Command.GREETING
    assert greeting.text == "mx.prxmail.test ESMTP Postfix"
    assert proto.state is State.CONNECTED
    proto.send_ehlo("client.test")
    (reply,) = feed(proto, EHLO_REPLY)
    assert reply.command is Command.EHLO
    assert len(reply.lines) == 11
    ext = proto.extensions
    assert ext.pipelining
    assert ext.starttls
    assert ext.eightbitmime
    assert ext.smtputf8
    assert ext.enhancedstatuscodes
    assert ext.size == 10240000
    assert ext.auth == frozenset({"PLAIN", "LOGIN"})
    assert "DSN" in ext.keywords
    assert proto.state is State.READY


def test_extension_parsing_variants() -> None:
    reply = Reply(
        code=250,
        lines=("name", "auth=login plain", "AUTH cram-md5", "SIZE", "  ", "x-weird  a  b"),
        command=Command.EHLO,
    )
    ext = parse_extensions(reply)
    assert ext.auth == frozenset({"LOGIN", "PLAIN", "CRAM-MD5"})
    assert ext.size == 0  # announced without a number: no fixed limit
    assert not ext.pipelining
    assert ext.keywords["X-WEIRD"] == "a  b"
    assert parse_extensions(Reply(250, ("only name",), Command.EHLO)) == Extensions()


def test_enhanced_codes_and_text() -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    replies = feed(
        proto, b"250 2.1.0 Ok\r\n550-5.1.1 <b@x.test>: Recipient\r\n550 5.1.1 unknown\r\n"
    )
    assert replies[0].enhanced == "2.1.0"
    assert replies[0].text == "Ok"
    assert replies[1].enhanced == "5.1.1"
    assert replies[1].text == "<b@x.test>: Recipient\nunknown"
    err = error_for_reply(replies[1])
    assert isinstance(err, SMTPPermanentError)
    assert (err.command, err.code, err.enhanced) == ("RCPT", 550, "5.1.1")
    assert "unknown" in err.text


def test_enhanced_code_class_must_match() -> None:
    proto = ready_protocol()
    proto.send_noop()
    (reply,) = feed(proto, b"250 5.0.0 looks like a code\r\n")
    assert reply.enhanced is None
    assert reply.text == "5.0.0 looks like a code"
    proto.send_noop()
    (reply,) = feed(proto, b"250 2.0.0\r\n")
    assert reply.enhanced == "2.0.0"
    assert reply.text == ""


def test_transient_error_type() -> None:
    err = error_for_reply(Reply(451, ("4.3.0 try later",), Command.DATA, "4.3.0"), "DATA")
    assert isinstance(err, SMTPTransientError)
    assert err.text == "try later"


def test_bare_lf_and_bare_code_lines_are_accepted() -> None:
    proto = ready_protocol()
    proto.send_noop()
    proto.send_noop()
    replies = feed(proto, b"250 ok\n250\r\n")
    assert [r.code for r in replies] == [250, 250]
    assert replies[1].lines == ("",)


TRANSCRIPT = GREETING + EHLO_REPLY + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n"


def run_transcript(chunks: list[bytes]) -> tuple[SMTPProtocol, list[Reply]]:
    """Feed chunks, answering each reply the way a pipelining client would."""
    proto = SMTPProtocol()
    seen: list[Reply] = []
    for chunk in chunks:
        proto.receive_data(chunk)
        while (reply := proto.next_reply()) is not None:
            seen.append(reply)
            if reply.command is Command.GREETING:
                proto.send_ehlo("c.test")
            elif reply.command is Command.EHLO:
                proto.send_mail("a@x.test")
                proto.send_rcpt("b@x.test")
                proto.send_data()
    return proto, seen


def check_transcript(proto: SMTPProtocol, seen: list[Reply]) -> None:
    assert [r.code for r in seen] == [220, 250, 250, 250, 354]
    assert [r.command for r in seen] == [
        Command.GREETING,
        Command.EHLO,
        Command.MAIL,
        Command.RCPT,
        Command.DATA,
    ]
    assert len(seen[1].lines) == 11
    assert seen[2].enhanced == "2.1.0"
    assert proto.extensions.pipelining
    assert proto.state is State.BODY


@given(st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=8))
@settings(max_examples=300, deadline=None)
def test_replies_independent_of_how_bytes_are_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(TRANSCRIPT)]
    check_transcript(*run_transcript([TRANSCRIPT[a:b] for a, b in itertools.pairwise(bounds)]))


def test_every_single_offset_split() -> None:
    # Exhaustive companion to the hypothesis test: one cut at every offset, and
    # one byte at a time.
    for cut in range(len(TRANSCRIPT) + 1):
        check_transcript(*run_transcript([TRANSCRIPT[:cut], TRANSCRIPT[cut:]]))
    check_transcript(*run_transcript([bytes([b]) for b in TRANSCRIPT]))


# ----- hostile and broken servers ---------------------------------------------------


def test_line_too_long_without_newline() -> None:
    proto = SMTPProtocol()
    proto.receive_data(b"220 " + b"x" * (MAX_LINE_LENGTH // 2))
    with pytest.raises(RemoteProtocolError, match="longer than") as info:
        proto.receive_data(b"y" * MAX_LINE_LENGTH)
    assert info.value.excerpt.startswith(b"220 xxx")
    assert len(info.value.excerpt) <= 80
    assert proto.state is State.CLOSED


def test_complete_line_too_long() -> None:
    proto = SMTPProtocol()
    with pytest.raises(RemoteProtocolError, match="longer than"):
        feed(proto, b"220 " + b"x" * MAX_LINE_LENGTH + b"\r\n")


def test_too_many_lines() -> None:
    proto = ready_protocol()
    proto.send_noop()
    with pytest.raises(RemoteProtocolError, match="lines"):
        feed(proto, b"250-x\r\n" * (MAX_REPLY_LINES + 1))
    with pytest.raises(ConnectionBrokenError):
        proto.send_noop()


@pytest.mark.parametrize(
    "data",
    [
        b"hello world\r\n",
        b"2500 too long code\r\n",
        b"150 wrong class\r\n",
        b"650 wrong class\r\n",
        b"25\r\n",
        b"250_separator\r\n",
        b"250 embedded\rcr\r\n",
        b"250 nul\x00byte\r\n",
        b"250-first\r\n251 different code\r\n",
    ],
)
def test_malformed_replies(data: bytes) -> None:
    proto = ready_protocol()
    proto.send_noop()
    with pytest.raises(RemoteProtocolError) as info:
        feed(proto, data)
    assert info.value.excerpt
    assert proto.state is State.CLOSED


def test_unsolicited_reply() -> None:
    proto = ready_protocol()
    with pytest.raises(RemoteProtocolError, match="no command was pending"):
        feed(proto, b"250 surprise\r\n")


def test_invalid_reply_classes() -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    with pytest.raises(RemoteProtocolError, match="354 is not a valid reply to MAIL"):
        feed(proto, b"354 go ahead\r\n")

    proto = ready_protocol()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    proto.send_data()
    with pytest.raises(RemoteProtocolError, match="DATA"):
        feed(proto, b"250 ok\r\n250 ok\r\n250 ok\r\n")

    proto = ready_protocol()
    proto.send_auth("PLAIN", b"\x00u\x00p")
    with pytest.raises(RemoteProtocolError):
        feed(proto, b"354 no\r\n")


def test_undecodable_text_is_replaced_not_fatal() -> None:
    proto = ready_protocol()
    proto.send_noop()
    (reply,) = feed(proto, b"250 caf\xc3\xa9 \xff\r\n")
    assert reply.text == "caf\u00e9 \ufffd"


@pytest.mark.parametrize("closing", [b"421 4.3.2 shutting down\r\n", b"421 bye\r\n"])
def test_421_closes_whatever_it_answers(closing: bytes) -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    (reply,) = feed(proto, closing)
    assert reply.code == 421
    assert proto.state is State.CLOSED
    assert proto.pending == 0
    assert isinstance(error_for_reply(reply), SMTPTransientError)
    with pytest.raises(ConnectionBrokenError):
        proto.send_rset()


def test_refused_greeting_closes() -> None:
    proto = SMTPProtocol()
    (reply,) = feed(proto, b"554 5.7.1 go away\r\n")
    assert reply.code == 554
    assert proto.state is State.CLOSED


def test_quit_closes() -> None:
    proto = ready_protocol()
    assert proto.send_quit() == b"QUIT\r\n"
    feed(proto, b"221 2.0.0 Bye\r\n")
    assert proto.state is State.CLOSED
    with pytest.raises(ConnectionBrokenError):
        proto.send_noop()


# ----- state table ---------------------------------------------------------------


def test_commands_out_of_order_are_local_errors() -> None:
    proto = SMTPProtocol()
    with pytest.raises(LocalProtocolError, match="state greeting"):
        proto.send_ehlo("c.test")
    feed(proto, GREETING)
    with pytest.raises(LocalProtocolError):
        proto.send_mail("a@x.test")  # before EHLO
    proto.send_ehlo("c.test")
    feed(proto, EHLO_REPLY)
    with pytest.raises(LocalProtocolError):
        proto.send_rcpt("b@x.test")  # before MAIL
    with pytest.raises(LocalProtocolError):
        proto.send_data()
    with pytest.raises(LocalProtocolError):
        proto.send_body(b"hi")
    proto.send_mail("a@x.test")
    with pytest.raises(LocalProtocolError):
        proto.send_data()  # DATA needs a RCPT first
    assert proto.pending == 1


def test_pipelined_transaction_and_body() -> None:
    proto = ready_protocol()
    wire = (
        proto.send_mail("a@x.test", size=12, eightbit=True, smtputf8=True)
        + proto.send_rcpt("b@x.test")
        + proto.send_rcpt("c@x.test")
        + proto.send_data()
    )
    assert wire == (
        b"MAIL FROM:<a@x.test> SIZE=12 BODY=8BITMIME SMTPUTF8\r\n"
        b"RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n"
    )
    assert proto.state is State.DATA
    assert proto.pending == 4
    replies = feed(proto, b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    assert [r.command for r in replies] == [Command.MAIL, Command.RCPT, Command.RCPT, Command.DATA]
    assert proto.state is State.BODY
    assert proto.send_body(b"hi") == b"hi\r\n.\r\n"
    assert proto.state is State.BODY_SENT
    feed(proto, b"250 2.0.0 queued\r\n")
    assert proto.state is State.READY


def test_refused_data_returns_to_ready_and_rset_is_allowed() -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    proto.send_data()
    feed(proto, b"250 ok\r\n550 no\r\n554 5.5.1 no valid recipients\r\n")
    assert proto.state is State.READY
    assert proto.send_rset() == b"RSET\r\n"


def test_stepwise_failed_mail_needs_rset() -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    feed(proto, b"553 bad sender\r\n")
    assert proto.state is State.MAIL
    with pytest.raises(LocalProtocolError):
        proto.send_mail("a@x.test")
    proto.send_rset()
    feed(proto, b"250 ok\r\n")
    assert proto.state is State.READY


def test_ehlo_refused_then_helo() -> None:
    proto = SMTPProtocol()
    feed(proto, GREETING)
    proto.send_ehlo("c.test")
    feed(proto, b"502 command not implemented\r\n")
    assert proto.state is State.CONNECTED
    assert proto.send_helo("c.test") == b"HELO c.test\r\n"
    feed(proto, b"250 hi\r\n")
    assert proto.state is State.READY
    assert proto.extensions == Extensions()


def test_starttls_drops_buffered_bytes() -> None:
    proto = ready_protocol()
    proto.send_starttls()
    # A man in the middle appends a fake reply after the 220, in clear text.
    (reply,) = feed(proto, b"220 2.0.0 Ready to start TLS\r\n250-evil\r\n250 AUTH PLAIN\r\n"[:30])
    assert reply.code == 220
    proto.receive_data(b"250 injected\r\n")
    assert proto.state is State.TLS_HANDSHAKE
    assert proto.start_tls() == len(b"250 injected\r\n")
    assert proto.state is State.CONNECTED
    assert proto.extensions == Extensions()
    assert proto.next_reply() is None
    proto.send_ehlo("c.test")


def test_starttls_refused() -> None:
    proto = ready_protocol()
    proto.send_starttls()
    feed(proto, b"454 4.7.0 TLS not available\r\n")
    assert proto.state is State.READY
    with pytest.raises(LocalProtocolError):
        proto.start_tls()


def test_auth_login_dialogue() -> None:
    proto = ready_protocol()
    assert proto.send_auth("login") == b"AUTH LOGIN\r\n"
    (challenge,) = feed(proto, b"334 VXNlcm5hbWU6\r\n")
    assert decode_challenge(challenge) == b"Username:"
    assert proto.state is State.AUTH_CHALLENGE
    assert proto.send_auth_response(b"user") == b"dXNlcg==\r\n"
    feed(proto, b"334 UGFzc3dvcmQ6\r\n")
    proto.send_auth_response(b"pw")
    feed(proto, b"235 2.7.0 Authentication successful\r\n")
    assert proto.state is State.READY


def test_auth_plain_initial_response_and_failure() -> None:
    proto = ready_protocol()
    assert proto.send_auth("PLAIN", b"\x00u\x00p") == b"AUTH PLAIN AHUAcA==\r\n"
    assert proto.send_auth  # still READY only after the reply
    (reply,) = feed(proto, b"535 5.7.8 Error: authentication failed\r\n")
    assert reply.code == 535
    assert proto.state is State.READY
    with pytest.raises(LocalProtocolError):
        proto.send_auth("PL AIN")


def test_bad_challenge_is_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_challenge(Reply(334, ("not base64!",), Command.AUTH))


# ----- injection -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "a@x.test\r\nRCPT TO:<evil@x.test>",
        "a@x.test\nDATA",
        "a@x.test\r",
        "a\x00@x.test",
        "a@x.test> SIZE=1",
        "a b@x.test",
        "a\x7f@x.test",
    ],
)
def test_addresses_cannot_inject(address: str) -> None:
    proto = ready_protocol()
    with pytest.raises(LocalProtocolError):
        proto.send_mail(address)
    assert proto.state is State.READY
    assert proto.pending == 0
    proto.send_mail("ok@x.test")
    with pytest.raises(LocalProtocolError):
        proto.send_rcpt(address)
    assert proto.pending == 1


def test_params_and_names_cannot_inject() -> None:
    proto = ready_protocol()
    with pytest.raises(LocalProtocolError):
        proto.send_mail("a@x.test", params=["RET=HDRS\r\nRSET"])
    with pytest.raises(LocalProtocolError):
        proto.send_mail("a@x.test", params=["X=\x00"])
    proto.send_mail("a@x.test")
    with pytest.raises(LocalProtocolError):
        proto.send_rcpt("b@x.test", params=["NOTIFY=NEVER\n"])
    with pytest.raises(LocalProtocolError):
        proto.send_rcpt("")
    for bad in ["c.test\r\nMAIL FROM:<x>", "", "two words", "\x00"]:
        proto2 = SMTPProtocol()
        feed(proto2, GREETING)
        with pytest.raises(LocalProtocolError):
            proto2.send_ehlo(bad)


def test_null_sender_and_utf8_address() -> None:
    proto = ready_protocol()
    assert proto.send_mail("") == b"MAIL FROM:<>\r\n"
    assert proto.send_rcpt("j\u00f6rg@x.test") == "RCPT TO:<j\u00f6rg@x.test>\r\n".encode()


# ----- DATA encoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\n", b"a\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".hidden\n.\n..two\n", b"..hidden\r\n..\r\n...two\r\n.\r\n"),
        (b"x\r\n.\r\nRCPT TO:<e>\r\n", b"x\r\n..\r\nRCPT TO:<e>\r\n.\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n"),
    ],
)
def test_encode_data(data: bytes, wire: bytes) -> None:
    assert encode_data(data) == wire


def _normalised(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


@given(st.binary(max_size=300) | st.text(alphabet=".\r\na\u00e9 ", max_size=60).map(str.encode))
@settings(max_examples=500, deadline=None)
def test_dot_stuffing_round_trip(data: bytes) -> None:
    wire = encode_data(data)
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    # No line of the stuffed body is a lone "." and no bare CR or LF survives.
    assert b"\r\n.\r\n" not in b"\r\n" + body
    assert body.count(b"\n") == body.count(b"\r\n") == body.count(b"\r")
    assert decode_data(wire) == _normalised(data)


def test_large_body_is_stuffed_correctly() -> None:
    line = b".starts with a dot and is long enough to matter " * 3 + b"\n"
    data = line * 100_000  # ~15 MB
    wire = encode_data(data)
    assert wire.count(b"\r\n..starts") == 100_000 - 1
    assert wire.startswith(b"..starts")
    assert decode_data(wire) == data.replace(b"\n", b"\r\n")


def test_decode_data_rejects_unterminated() -> None:
    with pytest.raises(ValueError, match="CRLF"):
        decode_data(b"abc\r\n")


# ----- MAIL parameters ---------------------------------------------------------------


def test_mail_options() -> None:
    ext = Extensions(size=100, eightbitmime=True, smtputf8=True)
    assert mail_options(b"plain", "a@x", ["b@x"], ext) == (5, False, False)
    assert mail_options(b"S: x\n\ncaf\xc3\xa9", "a@x", ["b@x"], ext) == (11, True, False)
    utf8_subject = "Subject: \u00e9t\u00e9\r\n\r\nbody".encode()
    # Raw UTF-8 headers travel as 8BITMIME; SMTPUTF8 only when asked for.
    assert mail_options(utf8_subject, "a@x", ["b@x"], ext) == (22, True, False)
    assert mail_options(utf8_subject, "a@x", ["b@x"], ext, smtputf8=True)[2] is True
    # 8-bit only in the body: BODY=8BITMIME is enough, no SMTPUTF8.
    assert mail_options("S: x\n\n\u00e9".encode(), "a@x", ["b@x"], ext) == (8, True, False)
    assert mail_options(b"x", "\u00e9@x", ["b@x"], ext)[2] is True
    assert mail_options(b"x", "a@x", ["b@x"], Extensions()) == (None, False, False)
    with pytest.raises(LocalProtocolError, match="SIZE"):
        mail_options(b"x" * 101, "a@x", ["b@x"], ext)
    with pytest.raises(LocalProtocolError, match="8BITMIME"):
        mail_options(b"\xff", "a@x", ["b@x"], Extensions())
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        mail_options(b"x", "a@x", ["\u00e9@x"], Extensions(eightbitmime=True))
    # SIZE announced with no number: no limit, but the size is still declared.
    assert mail_options(b"x" * 1000, "a@x", ["b@x"], Extensions(size=0))[0] == 1000


def test_bdat_transaction() -> None:
    proto = ready_protocol(EHLO_REPLY.replace(b"250-DSN", b"250-CHUNKING"))
    assert proto.extensions.chunking
    proto.send_mail("a@x.test")
    with pytest.raises(LocalProtocolError):
        proto.send_bdat_last(b"x")  # needs a RCPT first
    proto.send_rcpt("b@x.test")
    wire = proto.send_bdat_last(b"Subject: x\n\n.dot\n")
    assert wire == b"BDAT 20 LAST\r\nSubject: x\r\n\r\n.dot\r\n"
    assert proto.state is State.BODY_SENT
    replies = feed(proto, b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
    assert replies[-1].command is Command.BDAT
    assert proto.state is State.READY
    # Refused BDAT also ends in READY (the client then sends RSET).
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    proto.send_bdat_last(b"\r\n", crlf_normalized=True)
    feed(proto, b"250 ok\r\n550 no\r\n554 5.5.1 no valid recipients\r\n")
    assert proto.state is State.READY
    proto.send_rset()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    proto.send_bdat_last(b"x")
    # 354 is no answer to BDAT.
    with pytest.raises(RemoteProtocolError):
        feed(proto, b"250 ok\r\n250 ok\r\n250 ok\r\n354 what\r\n")


@given(
    st.lists(
        st.binary(max_size=64)
        | st.sampled_from([b"250-x\r\n", b"250 ok\r\n", b"\r\n", b"354 go\r\n", b"421 bye\r\n"]),
        max_size=30,
    )
)
@settings(max_examples=300, deadline=None)
def test_hostile_bytes_only_ever_raise_remote_protocol_error(chunks: list[bytes]) -> None:
    proto = ready_protocol()
    proto.send_mail("a@x.test")
    proto.send_rcpt("b@x.test")
    proto.send_data()
    error: RemoteProtocolError | None = None
    try:
        for chunk in chunks:
            proto.receive_data(chunk)
            while proto.next_reply() is not None:
                pass
    except RemoteProtocolError as exc:
        error = exc
    if error is not None:
        assert len(error.excerpt) <= 80
        assert proto.state is State.CLOSED
    assert proto.pending <= 3


# ----- numbers in replies are bounded (issue 11 item 1) ---------------------------------


@pytest.mark.parametrize(
    ("size_line", "size"),
    [
        ("SIZE 35882577", 35882577),
        ("SIZE 99999999999999999999", 10**20 - 1),  # RFC 1870: up to 20 digits
        # Too long for RFC 1870, or not ASCII digits: "announced, no fixed limit".
        ("SIZE " + "9" * 100, 0),
        ("SIZE \u00b2", 0),  # str.isdigit() is true for it; int() raised ValueError
        ("SIZE \u0661\u0662", 0),  # Arabic-Indic digits
    ],
)
def test_ehlo_size_value_is_bounded_ascii_digits(size_line: str, size: int) -> None:
    proto = ready_protocol(b"250-mx.prxmail.test\r\n250 " + size_line.encode() + b"\r\n")
    assert proto.extensions.size == size


@pytest.mark.parametrize(
    "line",
    [
        b"2500 ok\r\n",
        b"25 ok\r\n",
        b"2" + b"5" * 5000 + b" ok\r\n",
        b"\xd9\xa2\xd9\xa5\xd9\xa0 ok\r\n",
    ],
)
def test_reply_codes_are_exactly_three_ascii_digits(line: bytes) -> None:
    proto = SMTPProtocol()
    with pytest.raises(RemoteProtocolError):
        feed(proto, line)
    assert proto.state is State.CLOSED
