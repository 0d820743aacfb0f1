"""serve and doctor name a connect failure in the same words (one classification).

The real Dovecot/Postfix setup with the IMAP port pointed at a closed loopback port:
doctor's imap.tcp step and serve's "IMAP cannot connect" log line must carry the same
summary and hint.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
from pathlib import Path

import pytest

from prxmail.doctor import Status, run_checks
from tests.integration.servicekit import ServeProcess
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_serve_logs_cannot_connect_with_the_hint_doctor_prints(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind((mail_servers.host, 0))
        port = sock.getsockname()[1]
    user = mail_servers.add_user(f"diag{secrets.token_hex(4)}")
    text = mail_servers.prxmail_toml(
        user=user.localpart, allowed="alice", imap_port=port, state_dir=tmp_path / "state"
    )
    path = tmp_path / "prxmail.toml"
    path.write_text(text)

    report = await run_checks(path)
    tcp = report.step("imap.tcp")
    assert tcp.status is Status.FAIL

    proc = ServeProcess(path, f"{sys.executable} -c pass", json_logs=True)
    try:
        proc.wait_log('"event": "IMAP cannot connect, retrying"')
    finally:
        proc.kill()
    (line,) = [
        json.loads(line)
        for line in proc.log().splitlines()
        if '"event": "IMAP cannot connect, retrying"' in line
    ][:1]
    assert line["diagnosis"] == tcp.summary
    assert line["hint"] == tcp.hint
    assert "connection lost" not in proc.log()
