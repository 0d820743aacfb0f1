"""Several accounts in one ``prxmail serve`` against the real Dovecot + Postfix (issue 14)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.servicekit import (
    ServeProcess,
    config_text,
    fresh_pair,
    make_message,
    send_mail,
    wait_replies,
)
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# Each account's handler says who answered, so a reply shows whose handler ran.
HANDLER = r"""
import json, sys
m = json.load(sys.stdin)
print(f"{sys.argv[1]} answers: {m['subject']}")
"""


class AccountsServe(ServeProcess):
    """``prxmail serve`` without ``--exec``: every account runs its own ``exec``."""

    def __init__(self, config_path: Path) -> None:
        argv = [sys.executable, "-m", "prxmail", "serve", "-c", str(config_path)]
        argv += ["--log-format", "json"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _status(config: Path, account: str) -> dict[str, object]:
    argv = [sys.executable, "-m", "prxmail", "status", "-c", str(config)]
    done = subprocess.run(
        [*argv, "--account", account, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    (entry,) = json.loads(done.stdout)["accounts"]
    return dict(entry)


def test_two_accounts_answer_their_own_mail_while_a_third_is_refused_login(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    support = fresh_pair(mail_servers, "support")
    sales = fresh_pair(mail_servers, "sales")
    broken = fresh_pair(mail_servers, "broken")
    script = tmp_path / "handler.py"
    script.write_text(HANDLER)
    text = config_text(mail_servers, support, tmp_path / "state")
    health_port = _free_port()
    text += f'name = "support"\nexec = "{sys.executable} {script} support-bot"\n'
    text += f'health_listen = "127.0.0.1:{health_port}"\n'
    text += "\n".join(
        [
            "[channels_config.email.accounts.sales]",
            f'username = "{sales.bot.address}"',
            f'password = "{sales.bot.password}"',
            f'from_address = "{sales.bot.address}"',
            f'allowed_senders = ["{sales.alice.address}"]',
            f'exec = "{sys.executable} {script} sales-bot"',
            "[channels_config.email.accounts.broken]",
            f'username = "{broken.bot.address}"',
            'password = "not-the-password"',
            f'from_address = "{broken.bot.address}"',
            f'allowed_senders = ["{broken.alice.address}"]',
            "",
        ]
    )
    config = tmp_path / "prxmail.toml"
    config.write_text(text)
    proc = AccountsServe(config)
    try:
        proc.wait_log("prxmail serving", count=3)
        proc.wait_log(
            r'"account": "broken".*"level": "error"|"level": "error".*"account": "broken"'
        )
        for pair, subject in ((support, "support question"), (sales, "sales question")):
            send_mail(
                mail_servers,
                pair.alice,
                make_message(pair.alice, pair.bot, subject, "Hello.\n"),
                pair.bot,
            )
        (to_support,) = wait_replies(mail_servers, support.alice, 1)
        (to_sales,) = wait_replies(mail_servers, sales.alice, 1)
        assert to_support.get_content().strip() == "support-bot answers: support question"
        assert to_sales.get_content().strip() == "sales-bot answers: sales question"
        assert to_sales["From"] == sales.bot.address
        assert to_support["From"] == support.bot.address
        proc.wait_log('"event": "message replied"', count=2)
        # The refused account is named by /healthz (503) and by status, the others are fine.
        health = httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=10)
        assert health.status_code == 503
        accounts = health.json()["accounts"]
        assert accounts["broken"]["healthy"] is False
        assert "auth-failed" in json.dumps(accounts["broken"])
        assert accounts["support"]["healthy"] is True
        assert accounts["sales"]["healthy"] is True
        _until("status auth-failed", lambda: _status(config, "broken")["imap"] == "auth-failed")
        assert _status(config, "sales")["imap"] == "idle"
    finally:
        code = proc.terminate()
    assert code == 0
    events = [json.loads(line) for line in proc.log().splitlines()]
    # Every line of an account's work says whose it is.
    replied = {e["account"]: e["subject"] for e in events if e["event"] == "message replied"}
    assert replied == {"support": "support question", "sales": "sales question"}
    serving = sorted(e["account"] for e in events if e["event"] == "prxmail serving")
    assert serving == ["broken", "sales", "support"]
    refused = {e["account"] for e in events if e["event"].startswith("IMAP login refused")}
    assert refused == {"broken"}
    assert "not-the-password" not in proc.log()
    for pair in (support, sales):
        assert pair.bot.password not in proc.log()
