"""Pure pieces of the service: oversized-message substitutes, handler payload and
environment, log formatting, backoff, exception-group collapsing."""

from __future__ import annotations

import io
import json
import logging
import random
import sys
from pathlib import Path

import attrs
import pytest
import trio

from prxmail._log import MAX_FIELD_CHARS, log_event, setup_logging
from prxmail.channel import (
    RECONNECT_INITIAL_SECONDS,
    RECONNECT_MAX_SECONDS,
    collapse_exception_group,
)
from prxmail.channel._fetch import (
    INLINE_PARSE_BYTES,
    OVERSIZE_DEFECT,
    build_substitute,
    describe_attachments,
    parse_inline,
    text_sections,
)
from prxmail.channel._watcher import _Backoff
from prxmail.cli import main
from prxmail.cli._serve import EXIT_CONFIG
from prxmail.config import parse_config
from prxmail.imap import BodyPart, MultipartBody
from prxmail.message import parse_message
from prxmail.service import handler_environment, message_payload
from prxmail.state import StateStore

CONFIG = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "top-secret-pw"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
"""


def part(type_: str, subtype: str, size: int, **kwargs: object) -> BodyPart:
    params = kwargs.pop("params", {})
    return BodyPart(
        type=type_,
        subtype=subtype,
        params=params,  # type: ignore[arg-type]
        id=None,
        description=None,
        encoding=kwargs.pop("encoding", "7bit"),  # type: ignore[arg-type]
        size=size,
        **kwargs,  # type: ignore[arg-type]
    )


STRUCTURE = MultipartBody(
    parts=(
        MultipartBody(
            parts=(
                part("text", "plain", 40, params={"charset": "utf-8"}),
                part("text", "html", 80, params={"charset": "utf-8"}),
            ),
            subtype="alternative",
        ),
        part(
            "application",
            "octet-stream",
            78 * 1000,
            encoding="base64",
            disposition=("attachment", {"filename": "../../etc/big.bin"}),
        ),
        part("text", "plain", 500, disposition=("attachment", {"filename": "notes.txt"})),
        part("image", "png", 7800, encoding="base64", params={"name": "pic.png"}),
    ),
    subtype="mixed",
)


_PLAIN_HEAD = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\nMessage-ID: <m@x>\r\n"


def _hostile_under_4k() -> dict[str, bytes]:
    """Messages under 4 KiB whose parse takes milliseconds each (bench/hostile_parse.py)."""
    mixed = _PLAIN_HEAD + b"Content-Type: multipart/mixed; boundary=p\r\n\r\n"
    html = _PLAIN_HEAD + b"Content-Type: text/html\r\n\r\n"
    return {
        "nested multipart": mixed
        + b"".join(b"--p\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n" for _ in range(50)),
        "tiny parts": mixed + b"--p\r\n\r\nx\r\n" * 300,
        "many recipients": _PLAIN_HEAD + b"Cc: " + b"a@b.c, " * 400 + b"\r\n\r\nx",
        "many header lines": _PLAIN_HEAD + b"X: y\r\n" * 500 + b"\r\nx",
        "encoded words": _PLAIN_HEAD + b"X: " + b"=?utf-8?q?a?= " * 200 + b"\r\n\r\nx",
        "parameters": _PLAIN_HEAD + b"Content-Type: text/plain" + b"; a=b" * 300 + b"\r\n\r\nx",
        "HTML tags": html + b"<div><b><i>x" * 250,
        "quoted display name": b"From: " + b'"q" (c) ' * 300 + b"<a@b.c>\r\n\r\nx",
        "over the size bound": _PLAIN_HEAD + b"\r\n" + b"plain words\r\n" * 1000,
    }


@pytest.mark.parametrize("shape", sorted(_hostile_under_4k()))
def test_slow_shapes_are_not_parsed_on_the_event_loop(shape: str) -> None:
    assert not parse_inline([_hostile_under_4k()[shape]])


def test_small_plain_mail_is_parsed_on_the_event_loop() -> None:
    plain = _PLAIN_HEAD + b"\r\n" + b"Hello, see you at 10.\r\n" * 100
    assert len(plain) < INLINE_PARSE_BYTES
    assert parse_inline([plain])
    alternative = (
        _PLAIN_HEAD
        + b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        + b"--b\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--b--\r\n"
    )
    assert parse_inline([alternative])


def test_the_inline_bounds_hold_for_a_whole_group() -> None:
    # Each alone passes; together they hold more addresses than a loop parse may scan.
    one = _PLAIN_HEAD + b"Cc: " + b"x@y.z, " * 10 + b"\r\n\r\nx"
    assert parse_inline([one])
    assert not parse_inline([one, one])
    small = _PLAIN_HEAD + b"\r\n" + b"x" * (INLINE_PARSE_BYTES // 2)
    assert not parse_inline([small, small])


def test_text_sections_pick_readable_parts_with_their_numbers() -> None:
    sections = text_sections(STRUCTURE)
    assert [(s.section, s.subtype, s.charset) for s in sections] == [
        ("1.1", "plain", "utf-8"),
        ("1.2", "html", "utf-8"),
    ]


def test_single_part_message_is_section_one() -> None:
    (section,) = text_sections(part("text", "plain", 10))
    assert section.section == "1"


def test_describe_attachments_sanitises_names_and_estimates_sizes() -> None:
    described = describe_attachments(STRUCTURE)
    assert [a.filename for a in described] == ["big.bin", "notes.txt", "pic.png"]
    assert [a.content_type for a in described] == [
        "application/octet-stream",
        "text/plain",
        "image/png",
    ]
    assert described[0].size == 57 * 1000  # base64: 57 bytes per 78-byte line
    assert described[1].size == 500
    assert all(a.content is None for a in described)


def test_substitute_parses_to_the_text_and_keeps_headers() -> None:
    header = (
        b"From: Alice <alice@example.com>\r\nSubject: big one\r\nMessage-ID: <big@x>\r\n"
        b'Content-Type: multipart/mixed;\r\n boundary="orig"\r\nMIME-Version: 1.0\r\n\r\n'
    )
    sections = text_sections(STRUCTURE)
    raw = build_substitute(
        header,
        [(sections[0], "Gr\u00fc\u00dfe, see attached.".encode()), (sections[1], b"<p>hi</p>")],
    )
    assert b"orig" not in raw
    message = parse_message(raw, uid=7, uidvalidity=1, max_attachment_bytes=1000)
    assert message.subject == "big one"
    assert message.message_id == "<big@x>"
    assert message.from_.addr == "alice@example.com"
    assert "Gr\u00fc\u00dfe, see attached." in message.text
    assert message.html is not None
    assert "<p>hi</p>" in message.html


def test_message_payload_has_the_documented_contract() -> None:
    raw = (
        b"From: Alice <alice@example.com>\r\nTo: bot@example.com, other@example.com\r\n"
        b"Cc: c@example.com\r\nSubject: Hi\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <m1@x>\r\nIn-Reply-To: <p@x>\r\nReferences: <r@x> <p@x>\r\n\r\nbody\r\n"
    )
    message = parse_message(raw, uid=3, uidvalidity=9, max_attachment_bytes=100)
    payload = message_payload(message)
    json.dumps(payload)  # serialisable
    assert payload["message_id"] == "<m1@x>"
    assert payload["from"] == "alice@example.com"
    assert payload["from_name"] == "Alice"
    assert payload["to"] == ["bot@example.com", "other@example.com"]
    assert payload["cc"] == ["c@example.com"]
    assert payload["subject"] == "Hi"
    assert payload["date"] == "2026-11-23T10:00:00+00:00"
    assert payload["text"].startswith("body")  # type: ignore[attr-defined]
    assert payload["html"] is None
    assert payload["attachments"] == []
    assert payload["in_reply_to"] == "<p@x>"
    assert payload["references"] == ["<r@x>", "<p@x>"]
    assert payload["truncated"] is False


def test_payload_marks_truncated_messages() -> None:
    message = parse_message(b"From: a@b.c\r\n\r\nx", uid=1, uidvalidity=1, max_attachment_bytes=1)
    big = attrs.evolve(message, defects=(OVERSIZE_DEFECT,))
    assert message_payload(big)["truncated"] is True


def test_handler_environment_drops_password_variables() -> None:
    config = parse_config(CONFIG)
    env = {"PATH": "/bin", "MAIL_PW": "top-secret-pw", "OTHER": "fine"}
    assert handler_environment(config, env) == {"PATH": "/bin", "OTHER": "fine"}


def test_human_log_line_is_one_line_without_injection() -> None:
    out = io.StringIO()
    setup_logging("human", stream=out)
    log_event(logging.INFO, "message replied", subject="evil\r\nFAKE LINE", uid=4, none=None)
    line = out.getvalue()
    assert line.count("\n") == 1
    assert "message replied" in line
    assert "uid=4" in line
    assert "none=" not in line
    assert 'subject="evil  FAKE LINE"' in line


def test_json_log_line_is_an_object_and_fields_are_bounded() -> None:
    out = io.StringIO()
    setup_logging("json", stream=out)
    log_event(logging.WARNING, "message failed", reason="x" * 5000, uid=1)
    (line,) = out.getvalue().splitlines()
    obj = json.loads(line)
    assert obj["event"] == "message failed"
    assert obj["level"] == "warning"
    assert obj["uid"] == 1
    assert len(obj["reason"]) == MAX_FIELD_CHARS


def test_setup_logging_replaces_its_own_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("human", stream=first)
    setup_logging("human", stream=second)
    log_event(logging.INFO, "once")
    assert first.getvalue() == ""
    assert "once" in second.getvalue()
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging("xml")


def test_backoff_grows_caps_jitters_and_resets() -> None:
    backoff = _Backoff(random.Random(1))
    delays = [backoff.next_delay() for _ in range(15)]
    assert RECONNECT_INITIAL_SECONDS / 2 <= delays[0] <= RECONNECT_INITIAL_SECONDS
    assert delays[3] > delays[0]
    assert max(delays) <= RECONNECT_MAX_SECONDS
    assert delays[-1] >= RECONNECT_MAX_SECONDS / 2
    backoff.reset()
    assert backoff.next_delay() <= RECONNECT_INITIAL_SECONDS


def test_collapse_exception_group_unwraps_the_one_real_error() -> None:
    boom = ValueError("boom")
    group = BaseExceptionGroup("g", [BaseExceptionGroup("inner", [boom])])
    assert collapse_exception_group(group) is boom


async def test_collapse_ignores_cancelled_siblings() -> None:
    boom = KeyError("k")
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as cancelled:
            group = BaseExceptionGroup("g", [cancelled, boom])
            assert collapse_exception_group(group) is boom
            raise
    two = BaseExceptionGroup("g", [ValueError(), KeyError()])
    assert collapse_exception_group(two) is two


def test_serve_exits_with_failure_when_another_instance_holds_the_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "prxmail.toml"
    config.write_text(CONFIG + f'state_dir = "{state}"\n')
    with StateStore(state):
        code = main(["serve", "-c", str(config), "--exec", f"{sys.executable} -c pass"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "StateError" in err
    assert "top-secret-pw" not in err
