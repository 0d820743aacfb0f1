"""reply_format = "json": every malformed handler output is one clear error."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
from pathlib import Path

import pytest

from prxmail.compose import OutgoingAttachment, compose_reply
from prxmail.conversation import InvalidReplyError, ReplySpec, parse_json_reply
from prxmail.message import Address, Message, parse_message

LIMIT = 1000


def parse(
    obj: object, *, roots: tuple[Path, ...] = (), subject: str = "Hi", **kw: int
) -> ReplySpec:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_json_reply(
        data,
        original_subject=subject,
        max_attachment_bytes=kw.get("per_file", LIMIT),
        max_total_attachment_bytes=kw.get("total", 3 * LIMIT),
        allowed_roots=roots,
    )


def reason(obj: object, **kw: object) -> str:
    with pytest.raises(InvalidReplyError) as info:
        parse(obj, **kw)  # type: ignore[arg-type]
    assert info.value.reason == str(info.value)
    assert info.value.reason.startswith("invalid JSON reply: ")
    return info.value.reason


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_body_only() -> None:
    assert parse({"body": "Hello"}) == ReplySpec(body="Hello")
    assert parse(b'  {"body": "x", "html": null, "attachments": null}\n') == ReplySpec(body="x")


def test_everything() -> None:
    spec = parse(
        {
            "body": "See attached",
            "html": "<p>See attached</p>",
            "attachments": [
                {"filename": "a.txt", "content_type": "Text/Plain", "content_base64": b64(b"abc")},
                {"filename": "b.bin", "content_base64": b64(b"\x00\xff")},
            ],
            "subject": "ignored: the message had one",
        }
    )
    assert spec == ReplySpec(
        body="See attached",
        html="<p>See attached</p>",
        attachments=(
            OutgoingAttachment("a.txt", "text/plain", b"abc"),
            OutgoingAttachment("b.bin", "application/octet-stream", b"\x00\xff"),
        ),
        subject=None,
    )


def test_subject_only_for_messages_without_one() -> None:
    assert parse({"body": "x", "subject": "New"}, subject="").subject == "New"
    assert parse({"body": "x", "subject": "New"}, subject="  ").subject == "New"
    assert parse({"body": "x", "subject": "New"}, subject="Old").subject is None
    assert parse({"body": "x", "subject": "  "}, subject="").subject is None


def test_path_attachments_inside_the_allowed_root(tmp_path: Path) -> None:
    (tmp_path / "out.pdf").write_bytes(b"%PDF-1.4 data")
    spec = parse(
        {"body": "x", "attachments": [{"path": str(tmp_path / "out.pdf")}]}, roots=(tmp_path,)
    )
    assert spec.attachments == (
        OutgoingAttachment("out.pdf", "application/octet-stream", b"%PDF-1.4 data"),
    )
    named = parse(
        {
            "body": "x",
            "attachments": [
                {
                    "path": str(tmp_path / "out.pdf"),
                    "filename": "r.pdf",
                    "content_type": "application/pdf",
                }
            ],
        },
        roots=(tmp_path,),
    )
    assert named.attachments[0].filename == "r.pdf"
    assert named.attachments[0].content_type == "application/pdf"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (b"", "output is empty"),
        (b"   \n", "output is empty"),
        (b"Hello there", "not JSON"),
        (b'{"body": "x"', "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "expected one JSON object, got list"),
        (b'"just text"', "expected one JSON object, got str"),
        (b"{}", "'body' is required"),
        (b'{"body": 5}', "body must be a string"),
        (b'{"body": "x", "html": 1}', "html must be a string"),
        (b'{"body": "x", "subject": []}', "subject must be a string"),
        (b'{"body": "x", "to": "victim@example.org"}', "unknown key(s) 'to'"),
        (b'{"body": "x", "headers": {"Bcc": "v@x"}}', "unknown key(s) 'headers'"),
        (b'{"body": "x", "attachment": []}', "unknown key(s) 'attachment'"),
        (b'{"body": "x", "attachments": {}}', "attachments must be a list"),
        (b'{"body": "x", "attachments": ["a.txt"]}', "attachments[0] must be an object"),
        (b'{"body": "x", "attachments": [{}]}', "needs 'path', or 'filename' and 'content_base64'"),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "!!"}]}',
            "is not base64",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "abc"}]}',
            "not valid base64",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "", "x": 1}]}',
            "unknown key(s) 'x' in attachments[0]",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "", "content_base64": ""}]}',
            "attachments[0].filename is empty",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a\\r\\nBcc: v@x",'
            b' "content_base64": ""}]}',
            "control characters",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "",'
            b' "content_type": "text/plain\\r\\nBcc: v@x"}]}',
            "control characters",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "",'
            b' "content_type": "multipart/mixed"}]}',
            "composite types",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "",'
            b' "content_type": "nonsense"}]}',
            "not a valid type/subtype",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_malformed_output(output: bytes, expected: str) -> None:
    assert expected in reason(output)


def test_attachment_size_limits() -> None:
    at_limit = {"filename": "a", "content_base64": b64(b"x" * LIMIT)}
    parse({"body": "x", "attachments": [at_limit]})
    over = {"filename": "a", "content_base64": b64(b"x" * (LIMIT + 1))}
    assert "over the 1000-byte limit" in reason({"body": "x", "attachments": [over]})
    huge = {"filename": "a", "content_base64": "QUFB" * 100_000}
    assert "more than the 1000-byte limit" in reason({"body": "x", "attachments": [huge]})
    three = {"body": "x", "attachments": [at_limit] * 3}
    parse(three)
    assert "total" in reason({"body": "x", "attachments": [at_limit] * 4})


def test_too_many_attachments() -> None:
    empty = {"filename": "a", "content_base64": ""}
    assert "at most 100" in reason({"body": "x", "attachments": [empty] * 101})


def test_path_rules(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"ok")
    outside = tmp_path / "secret.toml"
    outside.write_bytes(b'password = "hunter2"')
    (root / "link.txt").symlink_to(outside)
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo")
    (root / "big.bin").write_bytes(b"x" * (LIMIT + 1))

    def path_reason(path: str, roots: tuple[Path, ...] = (root,)) -> str:
        message = reason({"body": "x", "attachments": [{"path": path}]}, roots=roots)
        assert "hunter2" not in message
        return message

    assert "not an absolute path" in path_reason("ok.txt")
    assert "does not exist" in path_reason(str(root / "missing.txt"))
    assert "outside the directories" in path_reason(str(outside))
    assert "outside the directories" in path_reason(str(root / "link.txt"))
    assert "outside the directories" in path_reason(str(root / ".." / "secret.toml"))
    assert "outside the directories" in path_reason(str(root / "ok.txt"), roots=())
    assert "not a regular file" in path_reason(str(root / "sub"))
    assert "not a regular file" in path_reason(str(root / "fifo"))  # and did not hang
    assert "not a regular file" in path_reason("/dev/zero", roots=(Path("/dev"),))
    assert "over the 1000-byte limit" in path_reason(str(root / "big.bin"))
    assert "not a usable path" in path_reason("")


def test_no_half_built_reply_when_a_later_attachment_fails(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_bytes(b"ok")
    good = {"path": str(tmp_path / "ok.txt")}
    bad = {"path": str(tmp_path / "missing.txt")}
    with pytest.raises(InvalidReplyError):
        parse({"body": "x", "attachments": [good, bad]}, roots=(tmp_path,))


def test_a_hostile_reply_cannot_add_headers_or_recipients() -> None:
    spec = parse(
        {
            "body": "Bcc: victim@example.org\r\n\r\nhi",
            "html": "</p>\r\n\r\nBcc: victim@example.org",
            "subject": "New\r\nBcc: victim@example.org\ud800",
            "attachments": [
                {
                    "filename": "\ud800../../x   y.txt",
                    "content_type": "text/plain",
                    "content_base64": b64(b"\r\n--boundary\r\nBcc: v@x\r\n"),
                }
            ],
        },
        subject="",
    )
    parent = Message(
        uid=1, uidvalidity=1, message_id="<p@example.com>", from_=Address("alice@example.com")
    )
    out = compose_reply(
        parent,
        spec.body,
        from_address="bot@ours.example",
        to=Address("alice@example.com"),
        default_subject="PRX Message",
        html=spec.html,
        attachments=spec.attachments,
        subject=spec.subject,
    )
    assert out.envelope_recipients == ("alice@example.com",)
    parsed = email.message_from_bytes(out.raw, policy=email.policy.default)
    assert "bcc" not in {key.lower() for key in parsed}
    assert parsed["Subject"] == "New Bcc: victim@example.org"
    back = parse_message(out.raw, uid=2, uidvalidity=1, max_attachment_bytes=LIMIT)
    assert back.to == (Address("alice@example.com"),)
    assert back.attachments[0].content == b"\r\n--boundary\r\nBcc: v@x\r\n"
    assert back.attachments[0].filename == "x y.txt"
