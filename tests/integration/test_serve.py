"""``prxmail serve`` as a subprocess against the real Dovecot + Postfix.

The handler is a small Python script (written per test) whose behaviour depends on the
subject; it appends one JSON line per run to a journal so the tests can see what it got.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.integration.servicekit import (
    ServeProcess,
    append,
    config_text,
    fresh_pair,
    make_message,
    replies,
    send_mail,
    wait_replies,
)
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HANDLER = r"""
import json, os, sys, time
journal, marker = sys.argv[1], sys.argv[2]
m = json.load(sys.stdin)
started = time.time()
subject = m["subject"]
if "sleep-once" in subject and not os.path.exists(marker):
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
if "slow" in subject:
    time.sleep(1.5)
if "escape" in subject:  # leave a setsid()ed grandchild behind, out of our group
    bare = "bare" in subject  # ...also without our environment (and its run mark)
    pidfile = marker + (".bare" if bare else ".escaper")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            open(pidfile + ".tmp", "w").write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            os.execve("/bin/sleep", ["sleep", "300"], {} if bare else dict(os.environ))
        os._exit(0)
    os.wait()
    while not os.path.exists(pidfile):
        time.sleep(0.01)
entry = {"subject": subject, "uid": m["uid"], "text_len": len(m["text"]),
         "text_head": m["text"][:200], "attachments": m["attachments"],
         "truncated": m["truncated"], "keys": sorted(m), "start": started,
         "end": time.time(), "env_has_password": any(
             v == os.environ.get("PRX_TEST_PASSWORD") for k, v in os.environ.items()
             if k != "PRX_TEST_PASSWORD")}
with open(journal, "a") as f:
    f.write(json.dumps(entry) + "\n")
if "fail" in subject:
    print("something broke in the handler", file=sys.stderr)
    sys.exit(3)
if "silent" in subject:
    sys.exit(0)
print(f"Echo: {subject}")
"""


class Setup:
    def __init__(self, servers: MailServers, tmp_path: Path, tag: str, **extra: object) -> None:
        self.servers = servers
        self.pair = fresh_pair(servers, tag)
        self.config = tmp_path / "prxmail.toml"
        self.config.write_text(config_text(servers, self.pair, tmp_path / "state", **extra))
        self.journal = tmp_path / "journal.jsonl"
        self.marker = tmp_path / "marker"
        script = tmp_path / "handler.py"
        script.write_text(HANDLER)
        self.exec = f"{sys.executable} {script} {self.journal} {self.marker}"

    def serve(self, **kwargs: bool) -> ServeProcess:
        return ServeProcess(self.config, self.exec, **kwargs)

    def entries(self) -> list[dict[str, object]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def send(self, subject: str, body: str = "Hello bot.\n") -> None:
        send_mail(
            self.servers,
            self.pair.alice,
            make_message(self.pair.alice, self.pair.bot, subject, body),
            self.pair.bot,
        )


def test_serve_outcomes_json_logs_and_no_secrets(mail_servers: MailServers, tmp_path: Path) -> None:
    setup = Setup(mail_servers, tmp_path, "outcomes")
    proc = setup.serve(json_logs=True)
    try:
        proc.wait_log("prxmail serving")
        setup.send("please fail")
        setup.send("be silent")
        setup.send("hello there")
        (reply,) = wait_replies(mail_servers, setup.pair.alice, 1)
        assert reply["Subject"] == "Re: hello there"
        assert reply.get_content().strip() == "Echo: hello there"
        proc.wait_log('"event": "reply sent"')
        proc.wait_log('"event": "message failed"')
        proc.wait_log('"event": "message handled, no reply"')
    finally:
        status = proc.terminate()
    assert status == 0
    log = proc.log()
    assert setup.pair.bot.password not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    failed = next(e for e in events if e["event"] == "message failed")
    assert failed["subject"] == "please fail"
    assert "exit" in str(failed["reason"]) or "3" in str(failed["reason"])
    assert "something broke" in str(failed["stderr"])
    # Every handler got the documented JSON contract.
    for entry in setup.entries():
        for key in (
            "message_id",
            "from",
            "from_name",
            "to",
            "cc",
            "subject",
            "date",
            "text",
            "html",
            "attachments",
            "in_reply_to",
            "references",
        ):
            assert key in entry["keys"]  # type: ignore[operator]
    assert len(setup.entries()) == 3


def test_sigkill_in_the_middle_of_handling_answers_exactly_once(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "sigkill")
    first = setup.serve()
    try:
        first.wait_log("prxmail serving")
        setup.send("sleep-once please")
        deadline = time.monotonic() + 30
        while not setup.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert setup.marker.exists(), first.log()
        time.sleep(0.2)
    finally:
        first.kill()  # SIGKILL while the handler runs
    # The orphaned handler (its own session) is ours to stop.
    handler_pid = int(setup.marker.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(handler_pid, signal.SIGKILL)
    assert replies(mail_servers, setup.pair.alice) == []
    second = setup.serve()
    try:
        (reply,) = wait_replies(mail_servers, setup.pair.alice, 1)
        assert reply["Subject"] == "Re: sleep-once please"
        second.wait_log("message replied")
        time.sleep(2)  # room for a wrong second answer
    finally:
        assert second.terminate() == 0
    assert len(replies(mail_servers, setup.pair.alice)) == 1
    assert "handled again" in second.log()


def test_restart_while_mail_arrives(mail_servers: MailServers, tmp_path: Path) -> None:
    setup = Setup(mail_servers, tmp_path, "restartsub")
    subjects = [f"restart {i}" for i in range(8)]
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        for subject in subjects[:3]:
            setup.send(subject)
    finally:
        assert proc.terminate() == 0
    for subject in subjects[3:6]:  # while down
        setup.send(subject)
    proc = setup.serve()
    try:
        for subject in subjects[6:]:
            setup.send(subject)
        got = wait_replies(mail_servers, setup.pair.alice, len(subjects), timeout=60)
        time.sleep(2)
    finally:
        assert proc.terminate() == 0
    got = replies(mail_servers, setup.pair.alice)
    assert sorted(m["Subject"] for m in got) == sorted(f"Re: {s}" for s in subjects)


def test_big_attachment_does_not_blow_memory(mail_servers: MailServers, tmp_path: Path) -> None:
    setup = Setup(mail_servers, tmp_path, "big", max_message_bytes=5 * 1024 * 1024)
    msg = make_message(setup.pair.alice, setup.pair.bot, "big attachment", "See the file.\n")
    payload = os.urandom(50 * 1024 * 1024)
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="big.bin")
    raw = bytes(msg)
    del payload, msg
    assert len(raw) > 60 * 1024 * 1024  # base64 makes 50 MB into ~68 MB
    append(mail_servers, setup.pair.bot, raw)
    del raw
    proc = setup.serve()
    try:
        (reply,) = wait_replies(mail_servers, setup.pair.alice, 1, timeout=60)
        assert reply["Subject"] == "Re: big attachment"
        peak_kib = proc.peak_rss_kib()
    finally:
        assert proc.terminate() == 0
    (entry,) = setup.entries()
    assert entry["truncated"] is True
    assert "See the file." in str(entry["text_head"])
    (att,) = entry["attachments"]  # type: ignore[misc]
    assert att["name"] == "big.bin"
    assert abs(att["size"] - 50 * 1024 * 1024) < 1024 * 1024
    print(f"serve peak RSS with a 68 MB message in the mailbox: {peak_kib / 1024:.1f} MiB")
    assert peak_kib < 120 * 1024, f"peak RSS {peak_kib} KiB"


MALFORMED = [
    # Broken multipart: the boundary never appears.
    b"From: {a}\r\nTo: {b}\r\nSubject: broken boundary\r\nMessage-ID: <mal1-{n}@x>\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="nope"\r\n\r\n'
    b"--other\r\nContent-Type: text/plain\r\n\r\nlost text\r\n--other--\r\n",
    # Unknown charset and 8-bit garbage in headers and body.
    b"From: {a}\r\nTo: {b}\r\nSubject: =?x-klingon?q?bad=FF?= \xff\xfe charset\r\n"
    b"Message-ID: <mal2-{n}@x>\r\nContent-Type: text/plain; charset=x-klingon\r\n"
    b"\r\n\xff\xfebody\r\n",
    # No headers worth the name, no Message-ID, no Subject.
    b"From: {a}\r\n\r\njust a body, nothing else\r\n",
    # Deeply nested multiparts.
    b"From: {a}\r\nTo: {b}\r\nSubject: nested\r\nMessage-ID: <mal4-{n}@x>\r\n"
    + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(60)
    )
    + b"Content-Type: text/plain\r\n\r\ndeep\r\n",
]


def test_malformed_mime_never_stops_the_service(mail_servers: MailServers, tmp_path: Path) -> None:
    setup = Setup(mail_servers, tmp_path, "malformed")
    n = str(time.monotonic_ns()).encode()
    alice, bot = setup.pair.alice.address.encode(), setup.pair.bot.address.encode()
    for template in MALFORMED:
        raw = template.replace(b"{a}", alice).replace(b"{b}", bot).replace(b"{n}", n)
        append(mail_servers, setup.pair.bot, raw)
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        setup.send("still alive?")
        got = wait_replies(mail_servers, setup.pair.alice, len(MALFORMED) + 1, timeout=60)
        assert proc.proc.poll() is None
    finally:
        assert proc.terminate() == 0
    subjects = {m["Subject"] for m in got}
    assert "Re: still alive?" in subjects
    assert "Re: broken boundary" in subjects
    assert "Re: nested" in subjects


def test_handlers_run_concurrently_up_to_the_limit(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "conc", max_concurrent_handlers=2)
    for i in range(4):
        append(
            mail_servers,
            setup.pair.bot,
            bytes(make_message(setup.pair.alice, setup.pair.bot, f"slow {i}")),
        )
    proc = setup.serve()
    try:
        wait_replies(mail_servers, setup.pair.alice, 4, timeout=60)
    finally:
        assert proc.terminate() == 0
    spans = [(float(e["start"]), float(e["end"])) for e in setup.entries()]  # type: ignore[arg-type]
    assert len(spans) == 4
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2, spans


def test_handler_timeout_is_recorded_as_failure(mail_servers: MailServers, tmp_path: Path) -> None:
    setup = Setup(mail_servers, tmp_path, "timeout", handler_timeout_secs=1)
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        setup.send("slow and too late")
        proc.wait_log("handler timed out after 1 s")
        setup.send("next one")
        (reply,) = wait_replies(mail_servers, setup.pair.alice, 1)
        assert reply["Subject"] == "Re: next one"
    finally:
        assert proc.terminate() == 0


def test_sigterm_during_handling_releases_the_message_for_the_next_start(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "sigterm")
    first = setup.serve()
    try:
        first.wait_log("prxmail serving")
        setup.send("sleep-once then stop")
        deadline = time.monotonic() + 30
        while not setup.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert setup.marker.exists(), first.log()
        stopping = time.monotonic()
        status = first.terminate()
        took = time.monotonic() - stopping
    finally:
        first.kill()
    assert status == 0
    assert took < 10, took  # the handler group is stopped, not waited for
    assert "message released at shutdown" in first.log()
    handler_pid = int(setup.marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(handler_pid, 0)  # the handler did not outlive serve
    second = setup.serve()
    try:
        (reply,) = wait_replies(mail_servers, setup.pair.alice, 1)
        assert reply["Subject"] == "Re: sleep-once then stop"
        time.sleep(2)
    finally:
        assert second.terminate() == 0
    assert len(replies(mail_servers, setup.pair.alice)) == 1


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_nothing_a_handler_setsids_outlives_its_run_or_serve(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    setup = Setup(mail_servers, tmp_path, "escape")
    marked = Path(f"{setup.marker}.escaper")
    bare = Path(f"{setup.marker}.bare")
    proc = setup.serve()
    try:
        proc.wait_log("prxmail serving")
        setup.send("escape with the run mark")
        proc.wait_log("message replied")
        # The run's sweep killed it before the run counted as done.
        assert not _running(int(marked.read_text()))
        setup.send("escape bare")
        proc.wait_log("message replied", count=2)
        # The documented limit: no environment, no mark -- it lives until serve stops.
        assert _running(int(bare.read_text()))
    finally:
        status = proc.terminate()
    assert status == 0
    # serve is a subreaper: the orphan became its child and was stopped at exit.
    assert not _running(int(bare.read_text()))
