"""``prxmail doctor`` against the real Dovecot and Postfix on loopback.

One test per failure the issue names: wrong password, closed port, untrusted
certificate, STARTTLS port with the implicit-TLS setting and the reverse, missing
folder, unknown config key, wrong type -- plus the all-pass run, through the CLI.
Each test must finish in a few seconds, so the greeting wait is shortened where a
test provokes it on purpose.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prxmail.doctor import DoctorReport, Status, Timeouts, render_text, run_checks
from tests.mailservers import MailServers

pytestmark = pytest.mark.integration

# The defaults except a 1 s greeting wait: the reverse-port tests wait for a greeting
# that never comes.
QUICK = Timeouts(greeting=1.0)
# Every run here must end well inside "a few seconds".
RUN_LIMIT = 4.0


def fresh_toml(servers: MailServers) -> tuple[str, str]:
    """A config for a new user (so tests do not share mailboxes), and its password."""
    user = servers.add_user(f"doc{secrets.token_hex(4)}")
    return servers.prxmail_toml(user=user.localpart, allowed="alice"), user.password


def set_key(text: str, key: str, value: str) -> str:
    """Replace ``key = ...`` in a config text (or add it)."""
    pattern = re.compile(rf"^{re.escape(key)} = .*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _: f"{key} = {value}", text)
    return text + f"{key} = {value}\n"


async def doctor(tmp_path: Path, text: str, timeouts: Timeouts = QUICK) -> DoctorReport:
    path = tmp_path / "prxmail.toml"
    path.write_text(text)
    start = time.monotonic()
    report = await run_checks(path, timeouts=timeouts)
    elapsed = time.monotonic() - start
    assert elapsed < RUN_LIMIT, f"doctor took {elapsed:.1f} s\n{render_text(report)}"
    return report


def failed(report: DoctorReport) -> list[str]:
    return [s.name for s in report.steps if s.status is Status.FAIL]


def test_all_pass_through_the_cli(mail_servers: MailServers, tmp_path: Path) -> None:
    text, password = fresh_toml(mail_servers)
    path = tmp_path / "prxmail.toml"
    path.write_text(text)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "prxmail", "doctor", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert time.monotonic() - start < RUN_LIMIT + 2  # the interpreter start included
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in (
        "config",
        "imap.dns",
        "imap.tcp",
        "imap.tls",
        "imap.greeting",
        "imap.capabilities",
        "imap.login",
        "imap.folder",
        "imap.idle",
        "smtp.dns",
        "smtp.tcp",
        "smtp.tls",
        "smtp.greeting",
        "smtp.ehlo",
        "smtp.auth",
        "smtp.from_address",
        "policy",
        "state.dir",
        "state.db",
    ):
        assert any(line.startswith(f"PASS {name} ") for line in lines), (name, result.stdout)
    assert "'INBOX': 0 messages, 0 unseen, UIDVALIDITY" in result.stdout
    assert "AUTH" in result.stdout
    assert lines[-1] == "OK: nothing blocks the channel"
    assert password not in result.stdout + result.stderr

    as_json = subprocess.run(
        [sys.executable, "-m", "prxmail", "doctor", "--json", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    document = json.loads(as_json.stdout)
    assert as_json.returncode == 0
    assert document["ok"] is True
    assert {s["status"] for s in document["steps"]} == {"pass"}


async def test_starttls_ports_pass(mail_servers: MailServers, tmp_path: Path) -> None:
    text, _ = fresh_toml(mail_servers)
    text = set_key(text, "imap_port", str(mail_servers.imap_plain_port))
    text = set_key(text, "imap_security", '"starttls"')
    text = set_key(text, "smtp_port", str(mail_servers.smtp_starttls_port))
    text = set_key(text, "smtp_security", '"starttls"')
    report = await doctor(tmp_path, text)
    assert report.ok, render_text(report)
    assert report.step("imap.tls").summary.startswith("STARTTLS up")
    assert report.step("smtp.tls").summary.startswith("STARTTLS up")


async def test_wrong_password(mail_servers: MailServers, tmp_path: Path) -> None:
    text, password = fresh_toml(mail_servers)
    wrong = "not-" + password
    report = await doctor(
        tmp_path, text.replace(f'password = "{password}"', f'password = "{wrong}"')
    )
    assert failed(report) == ["imap.login", "smtp.auth"]
    for name in ("imap.login", "smtp.auth"):
        step = report.step(name)
        assert "authentication failed" in step.summary
        assert "app password" in step.hint
    assert report.step("imap.folder").status is Status.SKIP
    assert wrong not in render_text(report) + json.dumps(report.to_json())


async def test_closed_port(mail_servers: MailServers, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind((mail_servers.host, 0))
        port = sock.getsockname()[1]
    text, _ = fresh_toml(mail_servers)
    report = await doctor(tmp_path, set_key(text, "imap_port", str(port)))
    assert failed(report) == ["imap.tcp"]
    assert "refused" in report.step("imap.tcp").summary
    assert report.step("imap.tls").status is Status.SKIP
    # SMTP is checked all the same.
    assert report.step("smtp.auth").status is Status.PASS


async def test_untrusted_certificate(mail_servers: MailServers, tmp_path: Path) -> None:
    text, _ = fresh_toml(mail_servers)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("tls_ca_file"))
    report = await doctor(tmp_path, text + "\n")
    assert failed(report) == ["imap.tls", "smtp.tls"]
    for name in ("imap.tls", "smtp.tls"):
        step = report.step(name)
        assert "does not trust" in step.summary
        assert "tls_ca_file" in step.hint


async def test_starttls_port_with_implicit_tls_setting(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    text, _ = fresh_toml(mail_servers)
    text = set_key(text, "imap_port", str(mail_servers.imap_plain_port))
    text = set_key(text, "smtp_port", str(mail_servers.smtp_starttls_port))
    report = await doctor(tmp_path, text)
    assert failed(report) == ["imap.tls", "smtp.tls"]
    imap, smtp = report.step("imap.tls"), report.step("smtp.tls")
    assert "plain text" in imap.summary
    assert "* OK" in imap.summary
    assert "imap_security = 'starttls'" in imap.hint
    assert "plain text" in smtp.summary
    assert "220 " in smtp.summary
    assert "smtp_security = 'starttls'" in smtp.hint


async def test_implicit_tls_port_with_starttls_setting(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    text, _ = fresh_toml(mail_servers)
    text = set_key(text, "imap_security", '"starttls"')
    text = set_key(text, "smtp_security", '"starttls"')
    report = await doctor(tmp_path, text)
    assert failed(report) == ["imap.greeting", "smtp.greeting"]
    for proto in ("imap", "smtp"):
        step = report.step(f"{proto}.greeting")
        assert "no greeting" in step.summary
        assert f"{proto}_security = 'tls'" in step.hint
        assert report.step(f"{proto}.tls").status is Status.SKIP


async def test_missing_folder(mail_servers: MailServers, tmp_path: Path) -> None:
    text, _ = fresh_toml(mail_servers)
    report = await doctor(tmp_path, set_key(text, "imap_folder", '"Bots"'))
    assert failed(report) == ["imap.folder"]
    folder = report.step("imap.folder")
    assert "'Bots'" in folder.summary
    assert folder.detail == ("folders on the server: INBOX",)
    assert report.step("imap.idle").status is Status.SKIP


async def test_unknown_config_key(mail_servers: MailServers, tmp_path: Path) -> None:
    text, password = fresh_toml(mail_servers)
    report = await doctor(tmp_path, text.replace("imap_port =", "imap_prot ="))
    assert failed(report) == ["config"]
    assert [s.name for s in report.steps] == ["config"]
    detail = "\n".join(report.step("config").detail)
    assert "unknown key 'imap_prot' (did you mean 'imap_port'?)" in detail
    assert "@ $.channels_config.email.imap_prot" in detail
    assert password not in render_text(report)


async def test_wrong_type(mail_servers: MailServers, tmp_path: Path) -> None:
    text, _ = fresh_toml(mail_servers)
    text = set_key(text, "smtp_port", f'"{mail_servers.smtp_tls_port}"')
    report = await doctor(tmp_path, text)
    assert failed(report) == ["config"]
    detail = "\n".join(report.step("config").detail)
    assert "expected an integer from 1 to 65535" in detail
    assert "@ $.channels_config.email.smtp_port" in detail
