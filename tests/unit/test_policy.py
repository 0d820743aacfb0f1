"""Sender policy, Authentication-Results, loop guards, rate limit, reply recipient."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail.message import Address, Message, parse_message
from prxmail.policy import (
    AuthResult,
    ReplyRateLimiter,
    SenderPolicy,
    Verdict,
    check_authentication_results,
    choose_reply_recipient,
    domains_aligned,
    evaluate,
    loop_guard_reason,
    parse_authentication_results,
    sender_allowed,
    validate_sender_entry,
)

OURS = "bot@ours.example"
SENT_IDS = {"<sent1@ours.example>", "<sent2@ours.example>", "<sent3@ours.example>"}


def is_ours(message_id: str) -> bool:
    return message_id in SENT_IDS


def msg(**fields: object) -> Message:
    sender = fields.pop("from_", Address("alice@example.com", "Alice"))
    assert isinstance(sender, Address)
    fields.setdefault("from_all", (sender,) if sender.addr else ())
    fields.setdefault("message_id", "<in@example.com>")
    return Message(uid=1, uidvalidity=1, from_=sender, **fields)  # type: ignore[arg-type]


POLICY = SenderPolicy(allowed_senders=("alice@example.com", "@corp.example"), own_addresses=(OURS,))


def verdict(message: Message, policy: SenderPolicy = POLICY, **kwargs: object) -> Verdict:
    checker = kwargs.pop("is_our_message_id", is_ours)
    assert callable(checker)
    return evaluate(message, policy, is_our_message_id=checker, **kwargs)  # type: ignore[arg-type]


# -- allowed_senders entries ------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "normalised"),
    [
        ("*", "*"),
        ("  Alice@Example.COM ", "alice@example.com"),
        ("@Corp.Example", "@corp.example"),
        ("@localhost", "@localhost"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
        ("@bücher.example", "@bücher.example"),
        ("@xn--bcher-kva.example", "@xn--bcher-kva.example"),
    ],
)
def test_valid_entries_are_normalised(entry: str, normalised: str) -> None:
    assert validate_sender_entry(entry) == normalised


@pytest.mark.parametrize(
    ("entry", "hint"),
    [
        ("*@company.com", "@company.com"),
        ("company.com", "@company.com"),
        ("@", "nothing after"),
        ("", "empty"),
        ("   ", "empty"),
        ("alice @example.com", "white space"),
        ("a@b@example.com", "more than one"),
        ("Alice <alice@example.com>", "white space"),
        ("<alice@example.com>", "bare address"),
        ("alice@example.com,bob@example.com", "bare address"),
        ("@example..com", "empty label"),
        ("@.example.com", "dot"),
        ("@example.com.", "dot"),
        ("@-bad.example", "not a valid domain label"),
        ("@ex_ample.com", "not a valid domain label"),
        ("alice.@example.com", "dots"),
        ("*.example.com", "wildcards"),
    ],
)
def test_entries_that_can_never_match_are_refused_with_a_reason(entry: str, hint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(hint)):
        validate_sender_entry(entry)


def test_non_string_entry_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        validate_sender_entry(5)  # type: ignore[arg-type]


def test_policy_validates_its_entries() -> None:
    assert SenderPolicy(allowed_senders=(" A@X.org ",)).allowed_senders == ("a@x.org",)
    with pytest.raises(ValueError, match=re.escape("'@company.com'")):
        SenderPolicy(allowed_senders=("*@company.com",))


# -- matching ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "allowed", "expected"),
    [
        ("alice@example.com", ("alice@example.com",), True),
        ("ALICE@EXAMPLE.COM", ("alice@example.com",), True),
        ("<alice@example.com>", ("alice@example.com",), True),
        ("bob@example.com", ("alice@example.com",), False),
        ("bob@corp.example", ("@corp.example",), True),
        ("Bob@CORP.example", ("@corp.example",), True),
        ("bob@mail.corp.example", ("@corp.example",), False),  # subdomains are NOT covered
        ("bob@evilcorp.example", ("@corp.example",), False),
        ("bob@corp.example.evil", ("@corp.example",), False),
        ("anyone@anywhere.example", ("*",), True),
        ("", ("*",), False),
        ("MAILER-DAEMON", ("*",), False),
        ("alice@example.com", (), False),
        ("u@xn--bcher-kva.example", ("@bücher.example",), True),
        ("u@bücher.example", ("@xn--bcher-kva.example",), True),
        ("alice@example.com.", ("alice@example.com",), True),
    ],
)
def test_sender_allowed(addr: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert sender_allowed(addr, allowed) is expected


# -- Authentication-Results parsing -----------------------------------------------


def test_parse_authentication_results_with_comments_and_quotes() -> None:
    header = parse_authentication_results(
        'mx.ours.example (Postfix; "quoted; in comment") 1;\r\n'
        " dkim=pass (2048-bit key; unprotected) header.d=example.com header.s=sel"
        ' header.b="AbC;d";\r\n'
        " spf=pass (sender SPF authorized) smtp.mailfrom=bounce@example.com;\r\n"
        ' dmarc = fail reason="policy; p=reject" header.from=example.com;'
        " auth/1=none"
    )
    assert header is not None
    assert header.authserv_id == "mx.ours.example"
    assert [(r.method, r.result) for r in header.results] == [
        ("dkim", "pass"),
        ("spf", "pass"),
        ("dmarc", "fail"),
        ("auth", "none"),
    ]
    dkim, spf, dmarc, _ = header.results
    assert dkim.get("header.d") == "example.com"
    assert dkim.get("header.b") == "AbC;d"
    assert spf.get("smtp.mailfrom") == "bounce@example.com"
    assert dmarc.get("reason") == "policy; p=reject"
    assert dmarc.get("header.from") == "example.com"
    assert dmarc.get("header.d") is None


def test_parse_authentication_results_none_and_junk() -> None:
    none = parse_authentication_results("mx.ours.example; none")
    assert none is not None
    assert none.results == ()
    assert parse_authentication_results("") is None
    assert parse_authentication_results("   ;dkim=pass") is None
    junk = parse_authentication_results("mx; = = =; dkim; spf=pass =x a=b")
    assert junk is not None
    assert junk.results == (AuthResult("spf", "pass", (("a", "b"),)),)
    assert parse_authentication_results("mx; " + "x" * 10_000) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab=;()"\\ .@\r\n', max_size=60))
def test_authentication_results_parser_never_raises(value: str) -> None:
    parse_authentication_results(value)


@pytest.mark.parametrize(
    ("domain", "from_domain", "expected"),
    [
        ("example.com", "example.com", True),
        ("EXAMPLE.com", "example.COM", True),
        ("mail.example.com", "example.com", True),
        ("example.com", "news.example.com", True),
        ("localhost", "localhost", True),
        ("com", "example.com", False),
        ("a.example.com", "b.example.com", False),
        ("evilexample.com", "example.com", False),
        ("example.com.evil", "example.com", False),
        ("", "example.com", False),
    ],
)
def test_domains_aligned(domain: str, from_domain: str, expected: bool) -> None:
    assert domains_aligned(domain, from_domain) is expected


AUTH_POLICY = SenderPolicy(
    allowed_senders=("*",), own_addresses=(OURS,), authserv_id="mx.ours.example"
)


def authed(*headers: str, sender: str = "alice@example.com") -> Message:
    return msg(from_=Address(sender), authentication_results=headers)


@pytest.mark.parametrize(
    "header",
    [
        "mx.ours.example; dmarc=pass (p=reject) header.from=example.com",
        "mx.ours.example; dmarc=pass",
        "MX.OURS.EXAMPLE; dkim=pass header.d=example.com",
        "mx.ours.example; dkim=pass header.d=mail.example.com",
        "mx.ours.example; dkim=pass header.i=@example.com",
        "mx.ours.example; spf=pass smtp.mailfrom=bounces@example.com",
        "mx.ours.example; spf=pass smtp.mailfrom=example.com",
        "mx.ours.example; dkim=fail header.d=example.com; spf=pass smtp.mailfrom=example.com",
    ],
)
def test_authentication_accepted(header: str) -> None:
    passed, detail = check_authentication_results(authed(header), "mx.ours.example")
    assert passed, detail
    assert verdict(authed(header), AUTH_POLICY) == Verdict(True, "accepted")


@pytest.mark.parametrize(
    ("headers", "detail_part"),
    [
        ((), "no Authentication-Results"),
        (("other.example; dmarc=pass",), "no Authentication-Results"),
        (("mx.ours.example; dmarc=fail",), "dmarc=fail"),
        (("mx.ours.example; dmarc=pass header.from=evil.example",), "dmarc=pass"),
        (("mx.ours.example; dkim=pass header.d=evil.example",), "unaligned"),
        (("mx.ours.example; spf=pass smtp.mailfrom=x@evil.example",), "unaligned"),
        (("mx.ours.example; spf=softfail smtp.mailfrom=example.com",), "spf=softfail"),
        (("mx.ours.example; none",), "no results"),
    ],
)
def test_authentication_refused(headers: tuple[str, ...], detail_part: str) -> None:
    passed, detail = check_authentication_results(authed(*headers), "mx.ours.example")
    assert not passed
    assert detail_part in detail
    result = verdict(authed(*headers), AUTH_POLICY)
    assert (result.accepted, result.reason) == (False, "auth-results-failed")


def test_only_the_topmost_header_of_our_server_counts() -> None:
    # The sender forged a passing header below ours; ours (topmost) says fail.
    message = authed(
        "other.example; dmarc=pass",
        "mx.ours.example; dmarc=fail header.from=example.com",
        "mx.ours.example; dmarc=pass header.from=example.com",
    )
    assert check_authentication_results(message, "mx.ours.example")[0] is False


def test_authentication_check_is_off_by_default() -> None:
    assert SenderPolicy().authserv_id is None
    assert verdict(msg(), POLICY).accepted


def test_authentication_results_survive_parsing() -> None:
    raw = (
        b"Authentication-Results: mx.ours.example;\r\n"
        b"  dkim=pass header.d=example.com\r\n"
        b"From: alice@example.com\r\n\r\nhi"
    )
    message = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=0)
    assert check_authentication_results(message, "mx.ours.example")[0] is True


# -- loop guards ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"auto_submitted": "auto-replied"}, "auto-submitted"),
        ({"auto_submitted": "Auto-Generated (daily report)"}, "auto-submitted"),
        ({"auto_submitted": "auto-notified; owner-email=x@y"}, "auto-submitted"),
        ({"auto_submitted": ""}, "auto-submitted"),
        ({"precedence": "bulk"}, "bulk"),
        ({"precedence": "List"}, "bulk"),
        ({"precedence": "junk (spam)"}, "bulk"),
        ({"list_id": "<team.lists.example.com>"}, "list-mail"),
        ({"list_unsubscribe": "<mailto:leave@example.com>"}, "list-mail"),
        ({"return_path": ""}, "bounce"),
        ({"content_type": "multipart/report"}, "bounce"),
        ({"from_": Address("MAILER-DAEMON@mx.example.com")}, "bounce"),
        ({"from_": Address("postmaster@example.com")}, "bounce"),
        ({"from_": Address("MAILER-DAEMON")}, "bounce"),
        ({"sender": "mailer-daemon@mx.example.com"}, "bounce"),
        ({"from_": Address("Bot@Ours.Example")}, "own-address"),
        ({"message_id": "<sent1@ours.example>"}, "loop"),
    ],
)
def test_loop_guards(fields: dict[str, object], reason: str) -> None:
    message = msg(**fields)
    assert loop_guard_reason(message, own_addresses=(OURS,), is_our_message_id=is_ours) == reason
    # The guards win even over "*": they protect against loops, not strangers.
    wide = SenderPolicy(allowed_senders=("*",), own_addresses=(OURS,))
    assert verdict(message, wide) == Verdict(False, reason)


@pytest.mark.parametrize(
    "fields",
    [
        {"auto_submitted": "no"},
        {"auto_submitted": "No (sent by a person)"},
        {"precedence": "first-class"},
        {"return_path": "alice@example.com"},
        {"content_type": "multipart/mixed"},
    ],
)
def test_ordinary_mail_passes_the_guards(fields: dict[str, object]) -> None:
    message = msg(**fields)
    assert loop_guard_reason(message, own_addresses=(OURS,), is_our_message_id=is_ours) is None
    assert verdict(message) == Verdict(True, "accepted")


def test_a_person_replying_to_our_reply_is_not_a_loop() -> None:
    reply = msg(in_reply_to="<sent1@ours.example>", references=("<root@x>", "<sent1@ours.example>"))
    assert verdict(reply) == Verdict(True, "accepted")


def test_a_long_thread_naming_many_of_our_ids_is_not_a_loop() -> None:
    # 25 rounds as a person's client builds them: References = our reply's
    # References + its id, so most of the ids named are ours.
    ours = [f"<auto{i}@ours.example>" for i in range(25)]
    theirs = [f"<theirs{i}@example.com>" for i in range(25)]

    def ours_check(message_id: str) -> bool:
        return message_id in ours

    chain = tuple(x for pair in zip(theirs, ours, strict=True) for x in pair)
    answer = msg(references=chain, in_reply_to=chain[-1], message_id="<theirs25@example.com>")
    assert loop_guard_reason(answer, own_addresses=(OURS,), is_our_message_id=ours_check) is None
    assert verdict(answer, is_our_message_id=ours_check) == Verdict(True, "accepted")
    # Our own mail coming back (its own Message-ID is ours) still is a loop.
    echo = msg(references=chain, message_id=ours[3])
    assert verdict(echo, is_our_message_id=ours_check) == Verdict(False, "loop")


def test_guards_from_a_parsed_bounce() -> None:
    raw = (
        b"Return-Path: <>\r\nFrom: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\r\n\r\n"
        b"--r\r\nContent-Type: text/plain\r\n\r\nundeliverable\r\n"
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; x@y\r\nAction: failed\r\n--r--\r\n"
    )
    message = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=100)
    assert verdict(message, SenderPolicy(allowed_senders=("*",))) == Verdict(False, "bounce")


# -- sender checks ----------------------------------------------------------------


def test_sender_not_allowed() -> None:
    assert verdict(msg(from_=Address("mallory@evil.example"))) == Verdict(
        False, "sender-not-allowed"
    )


def test_empty_allowed_list_allows_nobody() -> None:
    assert verdict(msg(), SenderPolicy()) == Verdict(False, "sender-not-allowed")


def test_missing_or_ambiguous_from() -> None:
    assert verdict(msg(from_=Address(""))) == Verdict(False, "no-sender")
    two = msg(from_all=(Address("alice@example.com"), Address("mallory@evil.example")))
    result = verdict(two)
    assert (result.accepted, result.reason) == (False, "ambiguous-sender")


# -- rate limit -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_is_a_token_bucket() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(3, 60.0, clock=clock)  # burst = max_replies = 3
    assert [limiter.allow("A@x.org") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b@x.org")  # others are independent
    assert not limiter.would_allow("a@X.ORG")  # case-insensitive
    # One token back every 20 s (3 per 60 s), not the whole window at once.
    assert limiter.next_allowed("a@x.org") == pytest.approx(1020.0)
    clock.now += 19.9
    assert not limiter.allow("a@x.org")
    clock.now += 0.2
    assert limiter.allow("a@x.org")
    assert not limiter.allow("a@x.org")
    clock.now += 60
    assert [limiter.allow("a@x.org") for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_burst_is_separate_from_the_sustained_rate() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(60, 3600.0, burst=40, clock=clock)
    assert all(limiter.allow("a@x.org") for _ in range(40))
    retry = limiter.admit("a@x.org")
    assert retry == pytest.approx(1060.0)  # one a minute after the burst


def test_rate_limiter_refusal_is_not_counted() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(1, 10.0, clock=clock)
    assert limiter.allow("a@x.org")
    for _ in range(100):
        clock.now += 0.05
        assert not limiter.allow("a@x.org")
    clock.now = 1010.01
    assert limiter.allow("a@x.org")


def test_rate_limiter_memory_is_bounded() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(2, 60.0, max_senders=100, clock=clock)
    for i in range(1000):
        assert limiter.allow(f"user{i}@x.org")
    stats = limiter.statistics()
    assert stats.tracked_senders == 100
    assert stats.evicted_senders == 900
    # Senders whose bucket is full again are dropped as time passes, without
    # any eviction.
    clock.now += 61
    limiter.allow("fresh@x.org")
    assert limiter.statistics().tracked_senders == 1
    assert limiter.statistics().evicted_senders == 900


def test_rate_limiter_keeps_the_most_recently_active() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(1, 60.0, max_senders=2, clock=clock)
    assert limiter.allow("a@x.org")
    assert limiter.allow("b@x.org")
    assert limiter.allow("c@x.org")  # evicts a (least recently active)
    assert not limiter.allow("c@x.org")
    assert not limiter.allow("b@x.org")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_replies": 0, "window_secs": 1.0},
        {"max_replies": 1, "window_secs": 0.0},
        {"max_replies": 1, "window_secs": float("inf")},
        {"max_replies": 1, "window_secs": 1.0, "max_senders": 0},
        {"max_replies": 1, "window_secs": 1.0, "burst": 0},
    ],
)
def test_rate_limiter_bounds_are_checked(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        ReplyRateLimiter(**kwargs)  # type: ignore[arg-type]


def test_evaluate_counts_only_accepted_mail_against_the_limit() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(2, 3600.0, clock=clock)
    refused = msg(precedence="bulk")
    for _ in range(5):
        assert not verdict(refused, rate_limiter=limiter).accepted
    assert verdict(msg(), rate_limiter=limiter).accepted
    assert verdict(msg(), rate_limiter=limiter).accepted
    over = verdict(msg(), rate_limiter=limiter)
    assert (over.accepted, over.reason) == (False, "rate-limited")


def test_over_the_rate_limit_is_a_deferral_not_a_rejection() -> None:
    clock = FakeClock()
    limiter = ReplyRateLimiter(2, 3600.0, clock=clock)
    assert verdict(msg(), rate_limiter=limiter) == Verdict(True, "accepted")
    assert verdict(msg(), rate_limiter=limiter) == Verdict(True, "accepted")
    over = verdict(msg(), rate_limiter=limiter)
    assert over.deferred
    assert over.retry_at == pytest.approx(1000.0 + 1800.0)
    # Refusals are never deferrals: they carry no retry time.
    assert not verdict(msg(precedence="bulk"), rate_limiter=limiter).deferred
    assert not verdict(msg(from_=Address("mallory@evil.example"))).deferred
    clock.now = over.retry_at
    assert verdict(msg(), rate_limiter=limiter) == Verdict(True, "accepted")


# -- reply recipient --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply_to", "expected"),
    [
        ((), Address("alice@example.com", "Alice")),
        ((Address("team@corp.example", "Team"),), Address("team@corp.example", "Team")),
        ((Address("victim@elsewhere.example"),), Address("alice@example.com", "Alice")),
        (
            (Address("victim@elsewhere.example"), Address("bob@corp.example")),
            Address("bob@corp.example"),
        ),
        ((Address(OURS),), Address("alice@example.com", "Alice")),
    ],
)
def test_reply_recipient(reply_to: tuple[Address, ...], expected: Address) -> None:
    policy = SenderPolicy(
        allowed_senders=("alice@example.com", "@corp.example", "bot@ours.example"),
        own_addresses=(OURS,),
    )
    assert choose_reply_recipient(msg(reply_to=reply_to), policy) == expected


def test_reply_to_is_honoured_for_everybody_when_all_are_allowed() -> None:
    policy = SenderPolicy(allowed_senders=("*",))
    message = msg(reply_to=(Address("other@elsewhere.example"),))
    assert choose_reply_recipient(message, policy) == Address("other@elsewhere.example")


# -- verdicts on the realistic samples ----------------------------------------------

SAMPLES = Path(__file__).parent.parent / "data" / "mime"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("outlook_html_only.eml", Verdict(True, "accepted")),
        ("apple_alternative_inline.eml", Verdict(True, "accepted")),
        ("postfix_bounce.eml", Verdict(False, "bounce")),
        ("vacation_autoreply.eml", Verdict(False, "auto-submitted")),
        ("list_mail.eml", Verdict(False, "bulk")),
        ("broken_everything.eml", Verdict(False, "no-sender")),
    ],
)
def test_sample_verdicts(name: str, expected: Verdict) -> None:
    message = parse_message(
        (SAMPLES / name).read_bytes(), uid=1, uidvalidity=1, max_attachment_bytes=0
    )
    policy = SenderPolicy(allowed_senders=("*",), own_addresses=(OURS,))
    assert verdict(message, policy) == expected


def test_sample_outlook_passes_the_authentication_check() -> None:
    raw = (SAMPLES / "outlook_html_only.eml").read_bytes()
    message = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=0)
    policy = SenderPolicy(allowed_senders=("@corp.example",), authserv_id="mx.ours.example")
    assert verdict(message, policy) == Verdict(True, "accepted")
    forged = parse_message(
        raw.replace(b"Authentication-Results: mx.ours.example", b"Authentication-Results: mx.evil"),
        uid=1,
        uidvalidity=1,
        max_attachment_bytes=0,
    )
    assert verdict(forged, policy).reason == "auth-results-failed"
