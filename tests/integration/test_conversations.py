"""Conversations through ``prxmail serve`` against the real Dovecot + Postfix (issue 12).

A person replying as a mail client does (In-Reply-To = our reply, References = our
reply's References + its Message-ID), a burst of new threads, another automaton
answering every reply instantly, a deferral surviving SIGKILL, rich JSON replies and
incoming attachments as files. The loop guard's thresholds are shortened through
configuration (``loop_fast_answer_secs``, ``loop_slow_down_secs``) where the real
defaults would make a test wait minutes; the rule itself is unchanged.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.servicekit import (
    ServeProcess,
    config_text,
    fresh_pair,
    make_message,
    replies,
    send_mail,
    wait_replies,
)
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PNG = bytes(range(256)) * 8 + b"\x00\r\n\x89PNG\r\n"

HANDLER = r"""
import hashlib, json, os, sys
journal, mode, blob = sys.argv[1], sys.argv[2], sys.argv[3]
m = json.load(sys.stdin)
files = []
for a in m["attachments"]:
    data = open(a["path"], "rb").read() if a["path"] else None
    files.append({"name": a["name"], "path": a["path"],
                  "sha": hashlib.sha256(data).hexdigest() if data is not None else None})
entry = {"subject": m["subject"], "message_id": m["message_id"],
         "thread_id": m["thread_id"], "thread": m["thread"], "files": files,
         "run_dir": m["run_dir"]}
with open(journal, "a") as f:
    f.write(json.dumps(entry) + "\n")
body = "Echo: " + m["subject"]
if mode == "json":
    path = os.path.join(os.environ["PRXMAIL_RUN_DIR"], "chart.png")
    with open(path, "wb") as f:
        f.write(open(blob, "rb").read())
    print(json.dumps({"body": body, "html": "<p><b>Echo</b></p>",
                      "attachments": [{"path": path, "content_type": "image/png"}]}))
else:
    print(body)
"""


class Setup:
    def __init__(
        self,
        servers: MailServers,
        tmp_path: Path,
        tag: str,
        *,
        mode: str = "text",
        **extra: object,
    ) -> None:
        self.servers = servers
        self.pair = fresh_pair(servers, tag)
        self.tmp_path = tmp_path
        self.config = tmp_path / "prxmail.toml"
        self.config.write_text(config_text(servers, self.pair, tmp_path / "state", **extra))
        self.journal = tmp_path / "journal.jsonl"
        blob = tmp_path / "blob.png"
        blob.write_bytes(PNG)
        script = tmp_path / "handler.py"
        script.write_text(HANDLER)
        self.exec = f"{sys.executable} {script} {self.journal} {mode} {blob}"

    def serve(self) -> ServeProcess:
        return ServeProcess(self.config, self.exec)

    def entries(self) -> list[dict[str, object]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def send(self, msg: email.message.EmailMessage) -> None:
        send_mail(self.servers, self.pair.alice, msg, self.pair.bot)

    def new(self, subject: str, body: str = "Hello bot.\n") -> email.message.EmailMessage:
        return make_message(self.pair.alice, self.pair.bot, subject, body)

    def answer(self, parent: email.message.EmailMessage, body: str) -> email.message.EmailMessage:
        """Alice's client answering ``parent`` (our reply)."""
        subject = str(parent["Subject"])
        msg = make_message(self.pair.alice, self.pair.bot, subject, body)
        msg["In-Reply-To"] = str(parent["Message-ID"])
        refs = str(parent.get("References") or "").split()
        msg["References"] = " ".join([*refs, str(parent["Message-ID"])])
        return msg


def reply_to(
    servers: MailServers, setup: Setup, parent_id: str, timeout: float = 60
) -> email.message.EmailMessage:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in replies(servers, setup.pair.alice):
            if str(msg.get("In-Reply-To", "")).strip() == parent_id:
                return msg
        time.sleep(0.1)
    raise AssertionError(f"no reply to {parent_id}")


def test_a_25_round_thread_is_answered_in_full_with_one_thread_id_and_history(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    # Alice waits 2 s before each answer; the guard's "machine-fast" is cut to 1 s so
    # that she counts as a person without making the test take 25 x 15 s.
    setup = Setup(mail_servers, tmp_path, "rounds", loop_fast_answer_secs=1)
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        first = setup.new("long talk")
        setup.send(first)
        parent_id = str(first["Message-ID"])
        for round_no in range(1, 26):
            ours = reply_to(mail_servers, setup, parent_id)
            assert ours["Subject"] == "Re: long talk"
            if round_no == 25:
                break
            time.sleep(2)
            answer = setup.answer(ours, f"round {round_no + 1}\n")
            setup.send(answer)
            parent_id = str(answer["Message-ID"])
        entries = setup.entries()
        assert len(entries) == 25
        assert len({e["thread_id"] for e in entries}) == 1
        # Each handler run saw every earlier message of the thread, both ways.
        for index, entry in enumerate(entries):
            thread = entry["thread"]
            assert isinstance(thread, list)
            assert len(thread) == 2 * index
            assert [t["direction"] for t in thread] == ["in", "out"] * index
            if index:
                assert thread[-1]["text"].startswith("Echo: ")  # our reply's text
                assert thread[-2]["text"] is None  # incoming text not kept by default
                assert thread[-2]["message_id"] == entries[index - 1]["message_id"]
        assert "thread held" not in proc.log()
        assert "deferred" not in proc.log()
    finally:
        proc.terminate()


def test_a_burst_of_30_new_threads_is_answered_promptly(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "burst")
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        started = time.monotonic()
        for n in range(30):
            setup.send(setup.new(f"question {n}"))
        got = wait_replies(mail_servers, setup.pair.alice, 30, timeout=120)
        assert time.monotonic() - started < 120
        assert sorted(str(m["Subject"]) for m in got) == sorted(
            f"Re: question {n}" for n in range(30)
        )
        assert len({e["thread_id"] for e in setup.entries()}) == 30
        assert "deferred" not in proc.log()
    finally:
        proc.terminate()


def test_a_two_automaton_loop_is_held_and_new_threads_still_answered(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    # The suspected loop's slow-down is 2 s instead of 30 so the hold comes in seconds.
    setup = Setup(mail_servers, tmp_path, "loop", loop_slow_down_secs=2)
    proc = setup.serve()
    stop = threading.Event()
    answered: set[str] = set()

    def automaton() -> None:
        # Answers every reply of ours at once, sets no RFC 3834 header.
        while not stop.is_set():
            for msg in replies(mail_servers, setup.pair.alice):
                mid = str(msg["Message-ID"])
                if mid in answered or not str(msg["Subject"]).startswith("Re: ping"):
                    continue
                answered.add(mid)
                setup.send(setup.answer(msg, "auto answer\n"))
            time.sleep(0.05)

    bot = threading.Thread(target=automaton, daemon=True)
    try:
        proc.wait_log("prxmail serving")
        bot.start()
        setup.send(setup.new("ping"))
        proc.wait_log("thread held", timeout=200)
        held_at = len(answered)
        time.sleep(8)
        ours = [m for m in replies(mail_servers, setup.pair.alice) if "ping" in str(m["Subject"])]
        assert len(ours) <= 50
        assert len(ours) == held_at  # nothing more after the hold
        assert "loop suspected" in proc.log()
        # A new thread from the same person is answered.
        fresh = setup.new("another topic")
        setup.send(fresh)
        assert reply_to(mail_servers, setup, str(fresh["Message-ID"]))["Subject"] == (
            "Re: another topic"
        )
    finally:
        stop.set()
        bot.join(timeout=5)
        proc.terminate()


def test_a_deferred_message_survives_sigkill_and_is_answered_after_restart(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    # One message at once, a token back every 20 s: the second is deferred.
    setup = Setup(
        mail_servers,
        tmp_path,
        "defer",
        reply_rate_burst=1,
        reply_rate_limit=1,
        reply_rate_window_secs=20,
    )
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        first, second = setup.new("first"), setup.new("second")
        setup.send(first)
        reply_to(mail_servers, setup, str(first["Message-ID"]))
        setup.send(second)
        proc.wait_log("message deferred")
    finally:
        proc.kill()  # SIGKILL: nothing is cleaned up
    killed_at = time.monotonic()
    assert [e["subject"] for e in setup.entries()] == ["first"]
    proc = setup.serve()
    try:
        got = reply_to(mail_servers, setup, str(second["Message-ID"]), timeout=60)
        assert got["Subject"] == "Re: second"
        assert time.monotonic() - killed_at < 60
        assert [e["subject"] for e in setup.entries()] == ["first", "second"]
    finally:
        proc.terminate()


def test_json_reply_with_html_and_attachment_arrives_byte_exact_and_threaded(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "rich", mode="json", reply_format="json")
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        msg = setup.new("draw me a chart")
        setup.send(msg)
        got = reply_to(mail_servers, setup, str(msg["Message-ID"]))
        assert str(msg["Message-ID"]) in str(got["References"])
        body = got.get_body(preferencelist=("plain",))
        html = got.get_body(preferencelist=("html",))
        assert body is not None
        assert html is not None
        assert body.get_content().strip() == "Echo: draw me a chart"
        assert "<b>Echo</b>" in html.get_content()
        (attachment,) = list(got.iter_attachments())
        assert attachment.get_filename() == "chart.png"
        assert attachment.get_content_type() == "image/png"
        assert attachment.get_payload(decode=True) == PNG
        (entry,) = setup.entries()
        assert not Path(str(entry["run_dir"])).exists()
    finally:
        proc.terminate()


def test_exec_handler_reads_an_incoming_attachment_from_its_path(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "attach")
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        msg = setup.new("see attached")
        msg.add_attachment(PNG, maintype="image", subtype="png", filename="../../evil.png")
        setup.send(msg)
        reply_to(mail_servers, setup, str(msg["Message-ID"]))
        (entry,) = setup.entries()
        (file,) = entry["files"]  # type: ignore[misc]
        assert file["sha"] == hashlib.sha256(PNG).hexdigest()
        assert Path(file["path"]).parent == Path(str(entry["run_dir"]))
        assert Path(file["path"]).name == "evil.png"
        assert not Path(str(entry["run_dir"])).exists()
    finally:
        proc.terminate()
