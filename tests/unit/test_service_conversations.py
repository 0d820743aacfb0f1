"""The service's handler path for conversations: thread in the payload, incoming
attachments as files in a private run directory, and ``reply_format = "json"``
(every malformed reply fails the message with a clear reason, nothing is sent)."""

from __future__ import annotations

import base64
import json
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from prxmail.compose import OutgoingAttachment
from prxmail.config import Config, ReplyFormat, parse_config
from prxmail.message import Message, parse_message
from prxmail.service import RUN_DIR_ENV, _handle

CONFIG = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "top-secret-pw"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
max_attachment_bytes = 2048
"""

ATTACHMENT = bytes(range(256)) * 4  # 1 KiB of every byte value

RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bot@example.com\r\n"
    b"Subject: report\r\n"
    b"Message-ID: <q1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n'
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: text/plain\r\n\r\n"
    b"see attached\r\n"
    b"--b\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="../../etc/data.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n")
    + b"--b--\r\n"
)


@attrs.define
class FakeChannel:
    """Records how the service finished the message (the channel's side is tested
    elsewhere)."""

    config: Config
    history: list[dict[str, object]] = attrs.Factory(list)
    outcome: list[tuple[str, Any]] = attrs.Factory(list)

    async def thread(self, message: Message) -> list[dict[str, object]]:
        return self.history

    async def reply(
        self,
        message: Message,
        body: str,
        *,
        html: str | None = None,
        attachments: Sequence[OutgoingAttachment] = (),
        subject: str | None = None,
    ) -> str:
        self.outcome.append(("reply", (body, html, tuple(attachments), subject)))
        return "<reply@bot>"

    async def mark_failed(self, message: Message, reason: str) -> None:
        self.outcome.append(("failed", reason))

    async def mark_handled(self, message: Message) -> None:
        self.outcome.append(("handled", None))

    async def release(self, message: Message, reason: str) -> bool:
        self.outcome.append(("released", reason))
        return True


def config(reply_format: str = "text") -> Config:
    return parse_config(CONFIG + f'reply_format = "{reply_format}"\n')


def message() -> Message:
    parsed = parse_message(RAW, uid=7, uidvalidity=1, max_attachment_bytes=2048)
    return attrs.evolve(parsed, thread_id="0123456789abcdef")


async def run(channel: FakeChannel, script: str, tmp_path: Path) -> tuple[str, Any]:
    path = tmp_path / "handler.py"
    path.write_text(script)
    limiter = trio.CapacityLimiter(1)
    token = object()
    await limiter.acquire_on_behalf_of(token)
    await _handle(
        channel,  # type: ignore[arg-type]
        message(),
        argv=[sys.executable, str(path)],
        env={"PATH": "/usr/bin:/bin"},
        limiter=limiter,
        token=token,
    )
    assert limiter.borrowed_tokens == 0
    (outcome,) = channel.outcome
    return outcome


ECHO_PAYLOAD = """\
import json, os, sys
payload = json.load(sys.stdin)
attachment = payload["attachments"][0]
with open(attachment["path"], "rb") as f:
    content = f.read()
print(json.dumps({
    "thread_id": payload["thread_id"],
    "thread": payload["thread"],
    "run_dir": payload["run_dir"],
    "env_dir": os.environ.get("PRXMAIL_RUN_DIR"),
    "path": attachment["path"],
    "mode": oct(os.stat(payload["run_dir"]).st_mode & 0o777),
    "content_ok": content == bytes(range(256)) * 4,
}))
"""


async def test_handler_reads_incoming_attachment_from_its_path_and_the_dir_is_gone(
    tmp_path: Path,
) -> None:
    channel = FakeChannel(config())
    channel.history = [{"message_id": "<r0@bot>", "direction": "out", "text": "earlier"}]
    kind, (body, *_rest) = await run(channel, ECHO_PAYLOAD, tmp_path)
    assert kind == "reply"
    seen = json.loads(body)
    assert seen["content_ok"] is True
    assert seen["thread_id"] == "0123456789abcdef"
    assert seen["thread"] == channel.history
    assert seen["run_dir"] == seen["env_dir"]
    assert seen["mode"] == oct(0o700)
    # Sanitised: no traversal out of the run directory.
    assert Path(seen["path"]).parent == Path(seen["run_dir"])
    assert Path(seen["path"]).name == "data.bin"
    assert not await trio.Path(seen["run_dir"]).exists()


async def test_the_run_dir_is_removed_when_the_handler_fails(tmp_path: Path) -> None:
    script = """\
import json, sys
payload = json.load(sys.stdin)
open(payload["run_dir"] + "/left-behind", "w").write("x")
print(payload["run_dir"], file=sys.stderr)
sys.exit(3)
"""
    channel = FakeChannel(config())
    kind, reason = await run(channel, script, tmp_path)
    assert kind == "failed"
    assert "status 3" in reason
    run_dir = reason.rsplit(": ", 1)[1].strip()
    assert run_dir.startswith("/")
    assert not await trio.Path(run_dir).exists()


async def test_json_reply_with_html_and_an_attachment_from_the_run_dir(tmp_path: Path) -> None:
    script = f"""\
import base64, json, os, sys
payload = json.load(sys.stdin)
path = os.path.join(os.environ["{RUN_DIR_ENV}"], "out.bin")
with open(path, "wb") as f:
    f.write(b"\\x00\\x01binary")
print(json.dumps({{
    "body": "text part",
    "html": "<p>html part</p>",
    "attachments": [
        {{"path": path, "content_type": "application/octet-stream"}},
        {{"filename": "n.txt", "content_type": "text/plain",
          "content_base64": base64.b64encode(b"inline").decode()}},
    ],
}}))
"""
    channel = FakeChannel(config("json"))
    assert channel.config.reply_format is ReplyFormat.JSON
    kind, (body, html, attachments, subject) = await run(channel, script, tmp_path)
    assert kind == "reply"
    assert (body, html, subject) == ("text part", "<p>html part</p>", None)
    assert [(a.filename, a.content) for a in attachments] == [
        ("out.bin", b"\x00\x01binary"),
        ("n.txt", b"inline"),
    ]


def _print(output: bytes) -> str:
    return f"import sys\nsys.stdin.read()\nsys.stdout.buffer.write({output!r})\n"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (b"plain words, not JSON", "not JSON"),
        (b'["body"]', "expected one JSON object"),
        (b'{"html": "<p>x</p>"}', "'body' is required"),
        (b'{"body": 5}', "body must be a string"),
        (b'{"body": "x", "headers": {"Bcc": "eve@example.net"}}', "unknown key"),
        (b'{"body": "x", "to": "eve@example.net"}', "unknown key"),
        (b'{"body": "x", "attachments": {"path": "/etc/hostname"}}', "must be a list"),
        (b'{"body": "x", "attachments": [{"path": "/etc/hostname"}]}', "/etc/hostname"),
        (b'{"body": "x", "attachments": [{"path": "relative.txt"}]}', "relative.txt"),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "!!"}]}',
            "base64",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", "content_base64": "'
            + base64.b64encode(b"x" * 4096)
            + b'"}]}',
            "2048",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a\\r\\nBcc: e", '
            b'"content_base64": "eA=="}]}',
            "filename",
        ),
        (
            b'{"body": "x", "attachments": [{"filename": "a", '
            b'"content_type": "text/plain\\r\\nX: y", "content_base64": "eA=="}]}',
            "content_type",
        ),
        (b'{"body": "caf\xe9"}', "not UTF-8"),
    ],
)
async def test_every_malformed_json_reply_fails_the_message_with_its_reason(
    tmp_path: Path, output: bytes, expected: str
) -> None:
    channel = FakeChannel(config("json"))
    kind, reason = await run(channel, _print(output), tmp_path)
    assert kind == "failed"
    assert reason.startswith("invalid JSON reply")
    assert expected in reason


async def test_json_reply_naming_a_missing_file_in_the_run_dir_fails(tmp_path: Path) -> None:
    script = f"""\
import json, os, sys
sys.stdin.read()
path = os.path.join(os.environ["{RUN_DIR_ENV}"], "never-written.pdf")
print(json.dumps({{"body": "x", "attachments": [{{"path": path}}]}}))
"""
    channel = FakeChannel(config("json"))
    kind, reason = await run(channel, script, tmp_path)
    assert kind == "failed"
    assert "never-written.pdf" in reason


async def test_json_reply_subject_is_used_only_when_the_message_had_none(tmp_path: Path) -> None:
    channel = FakeChannel(config("json"))
    kind, (_, _, _, subject) = await run(
        channel, _print(b'{"body": "x", "subject": "new"}'), tmp_path
    )
    assert kind == "reply"
    assert subject is None  # the message has "report"


async def test_text_reply_format_sends_json_looking_output_as_text(tmp_path: Path) -> None:
    channel = FakeChannel(config("text"))
    kind, (body, html, attachments, _) = await run(channel, _print(b'{"body": "x"}'), tmp_path)
    assert kind == "reply"
    assert (body, html, attachments) == ('{"body": "x"}', None, ())


def test_run_dir_is_private(tmp_path: Path) -> None:
    from prxmail.conversation import remove_attachment_dir, write_attachments

    files = write_attachments(message().attachments)
    try:
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    finally:
        remove_attachment_dir(files.directory)
