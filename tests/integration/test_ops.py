"""Operator commands next to a running ``prxmail serve``, against real Dovecot + Postfix (issue 14).

``prxmail status`` / ``outbox`` / ``messages`` run as separate processes, as an
operator would run them, while serve runs: they see its heartbeat, and their "retry
now" reaches it within seconds through the state store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.servicekit import (
    ServeProcess,
    append,
    config_text,
    fresh_pair,
    make_message,
    send_mail,
    wait_replies,
)
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Fails the first time it sees a subject with "fail-once" (a marker file remembers),
# answers every other time; one journal line per run.
HANDLER = r"""
import json, os, sys
journal, marker = sys.argv[1], sys.argv[2]
m = json.load(sys.stdin)
with open(journal, "a") as f:
    f.write(json.dumps({"subject": m["subject"]}) + "\n")
if "fail-once" in m["subject"] and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(3)
print("Echo: " + m["subject"])
"""

# The backoff after a failed send is long here, so a reply that goes out within
# seconds of `outbox retry` was sent because of the retry, not because it came due.
SLOW_RETRY = {"smtp_retry_initial_secs": 600, "smtp_retry_max_secs": 1200}


def _config(servers: MailServers, tmp_path: Path, tag: str, **extra: Any) -> tuple[Path, Any]:
    pair = fresh_pair(servers, tag)
    text = config_text(servers, pair, tmp_path / "state")
    # Replace the servicekit's quick-retry defaults instead of repeating a TOML key.
    kept = [line for line in text.splitlines() if line.split("=")[0].strip() not in extra]
    kept += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "prxmail.toml"
    path.write_text("\n".join(kept) + "\n")
    return path, pair


def _handler(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "handler.py"
    script.write_text(HANDLER)
    journal = tmp_path / "journal.jsonl"
    return f"{sys.executable} {script} {journal} {tmp_path / 'marker'}", journal


def _prxmail(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "prxmail", *args, "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, json.loads(done.stdout)


def _wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _status(config: Path) -> dict[str, Any]:
    code, doc = _prxmail(config, "status")
    assert code == 0, doc
    account: dict[str, Any] = doc["accounts"][0]
    return account


def _status_soon(config: Path) -> dict[str, Any] | None:
    """The status, or None while serve is still creating its state database."""
    code, doc = _prxmail(config, "status")
    return doc["accounts"][0] if code == 0 else None


def test_stuck_reply_is_listed_and_retry_all_delivers_it_once(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    config, pair = _config(mail_servers, tmp_path, "opsoutbox", **SLOW_RETRY)
    command, _journal = _handler(tmp_path)
    proc = ServeProcess(config, command)
    try:
        proc.wait_log("prxmail serving")
        _wait("running status", lambda: (_status_soon(config) or {}).get("service") == "running")
        mail_servers.stop_postfix()
        try:
            # Put into the bot's mailbox over IMAP: Postfix is down.
            msg = make_message(pair.alice, pair.bot, "stuck while smtp is down")
            append(mail_servers, pair.bot, msg.as_bytes())
            proc.wait_log("reply not sent yet, will retry", timeout=60)
            code, listed = _prxmail(config, "outbox", "list")
            assert code == 0
            (item,) = listed["items"]
            assert item["status"] == "queued"
            assert item["to"] == [pair.alice.address]
            assert item["subject"] == "Re: stuck while smtp is down"
            assert item["attempts"] >= 1
            assert item["last_error"]
            # The heartbeat is written within OPERATOR_POLL_SECONDS of a change.
            assert _wait(
                "the SMTP error in status",
                lambda: (_status_soon(config) or {}).get("smtp_error"),
                timeout=10,
            )
        finally:
            mail_servers.start_postfix()
        # Without the retry the next attempt is >= 300 s away (jittered 600 s).
        retried_at = time.monotonic()
        code, retried = _prxmail(config, "outbox", "retry", "--all")
        assert (code, retried["retried"]) == (0, [item["id"]])
        (reply,) = wait_replies(mail_servers, pair.alice, 1, timeout=30)
        assert time.monotonic() - retried_at < 30
        assert reply["Subject"] == "Re: stuck while smtp is down"
        proc.wait_log("reply sent")
        _wait("empty outbox", lambda: _prxmail(config, "outbox", "list")[1]["items"] == [])
        time.sleep(3)  # ... and only once
        assert len(mail_servers.inbox_messages(pair.alice)) == 1
    finally:
        assert proc.terminate() == 0
    assert pair.bot.password not in proc.log()


def test_messages_retry_reruns_a_failed_message_once(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    config, pair = _config(mail_servers, tmp_path, "opsretry")
    command, journal = _handler(tmp_path)
    proc = ServeProcess(config, command)
    try:
        proc.wait_log("prxmail serving")
        msg = make_message(pair.alice, pair.bot, "please fail-once")
        send_mail(mail_servers, pair.alice, msg, pair.bot)
        proc.wait_log("message failed")
        code, listed = _prxmail(config, "messages", "list", "--status", "failed")
        assert code == 0
        (failed,) = listed["messages"]
        assert failed["status"] == "failed"
        assert _status(config)["messages"]["failed"] == 1
        code, done = _prxmail(config, "messages", "retry", str(failed["id"]))
        assert (code, done["retried"]) == (0, failed["id"])
        (reply,) = wait_replies(mail_servers, pair.alice, 1, timeout=30)
        assert reply.get_content().strip() == "Echo: please fail-once"
        time.sleep(3)
        runs = journal.read_text().splitlines()
        assert len(runs) == 2  # the failed run and exactly one retry
        status = _status(config)
        assert status["messages"]["failed"] == 0
        assert status["last_handled_at"] is not None
        assert _prxmail(config, "messages", "retry", str(failed["id"]))[0] == 1
    finally:
        assert proc.terminate() == 0


def test_status_shows_auth_failed_for_a_wrong_password_then_not_running(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    config, pair = _config(mail_servers, tmp_path, "opsauth")
    config.write_text(config.read_text().replace(pair.bot.password, "wrong-password-123"))
    command, _journal = _handler(tmp_path)
    proc = ServeProcess(config, command)
    try:
        account = _wait(
            "auth-failed in status",
            lambda: (s := _status_soon(config) or {}).get("imap") == "auth-failed" and s,
        )
        assert account["service"] == "running"
        assert account["pid"] == proc.pid
        assert account["imap_error"]
        assert "wrong-password-123" not in json.dumps(account)
        assert account["last_connected_at"] is None
    finally:
        assert proc.terminate() == 0
    stopped = _status(config)
    assert stopped["service"] == "not-running"
    assert stopped["imap"] == "stopped"
