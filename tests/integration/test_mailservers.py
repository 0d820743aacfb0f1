"""Prove the private Dovecot + Postfix fixture with the stdlib clients.

smtplib and imaplib are test tooling here only (prxmail itself never uses them). Each
test works with fresh users so the tests stay independent of each other and of the
order they run in.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import imaplib
import json
import os
import pathlib
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests import mailservers
from tests.mailservers import DOMAIN, REJECTED_ADDRESS, SMTP_SIZE_LIMIT, MailServers, User

pytestmark = pytest.mark.integration

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Bound for any single network step in these tests; the servers answer in milliseconds.
IO_TIMEOUT = 10.0

_counter = iter(range(1_000_000))


def _fresh_user(servers: MailServers, prefix: str) -> User:
    return servers.add_user(f"{prefix}{next(_counter)}-{uuid.uuid4().hex[:6]}")


def _message(sender: User, recipient: str, token: str) -> email.message.EmailMessage:
    msg = email.message.EmailMessage()
    msg["From"] = sender.address
    msg["To"] = recipient
    msg["Subject"] = f"test {token}"
    msg["Message-ID"] = f"<{token}@{DOMAIN}>"
    msg.set_content(f"body {token}\n")
    return msg


def _smtp_tls(servers: MailServers) -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL(
        servers.host, servers.smtp_tls_port, context=servers.ssl_context(), timeout=IO_TIMEOUT
    )


def _smtp_starttls(servers: MailServers) -> smtplib.SMTP:
    client = smtplib.SMTP(servers.host, servers.smtp_starttls_port, timeout=IO_TIMEOUT)
    client.starttls(context=servers.ssl_context())
    return client


def _submit(servers: MailServers, sender: User, recipient: str, token: str) -> None:
    with _smtp_tls(servers) as client:
        client.login(sender.address, sender.password)
        client.send_message(_message(sender, recipient, token))


def _imap_tls(servers: MailServers) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(
        servers.host,
        servers.imap_tls_port,
        ssl_context=servers.ssl_context(),
        timeout=IO_TIMEOUT,
    )


def _imap_fetch_all(servers: MailServers, user: User) -> list[bytes]:
    client = _imap_tls(servers)
    try:
        client.login(user.address, user.password)
        typ, data = client.select("INBOX", readonly=True)
        assert typ == "OK"
        typ, data = client.uid("SEARCH", "ALL")
        assert typ == "OK"
        assert isinstance(data[0], bytes)
        messages: list[bytes] = []
        for uid in data[0].decode().split():
            typ, parts = client.uid("FETCH", uid, "(BODY.PEEK[])")
            assert typ == "OK"
            messages.extend(p[1] for p in parts if isinstance(p, tuple))
        return messages
    finally:
        client.logout()


def _subject(raw: bytes) -> str:
    return str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])


# ---------------------------------------------------------------------------
# Delivery


@pytest.mark.parametrize("port_kind", ["implicit-tls", "starttls"])
def test_submission_lands_in_other_users_inbox(mail_servers: MailServers, port_kind: str) -> None:
    alice = mail_servers.users["alice"]
    rcpt = _fresh_user(mail_servers, "rcpt")
    token = uuid.uuid4().hex
    client = (
        _smtp_tls(mail_servers) if port_kind == "implicit-tls" else _smtp_starttls(mail_servers)
    )
    with client:
        client.login(alice.address, alice.password)
        refused = client.send_message(_message(alice, rcpt.address, token))
    assert refused == {}

    on_disk = mail_servers.wait_for_messages(rcpt, 1)
    assert len(on_disk) == 1
    assert _subject(on_disk[0]) == f"test {token}"
    assert b"Delivered-To: " + rcpt.address.encode() in on_disk[0]

    over_imap = _imap_fetch_all(mail_servers, rcpt)
    assert [_subject(m) for m in over_imap] == [f"test {token}"]
    assert f"body {token}".encode() in over_imap[0]
    # The sender's own mailbox got nothing.
    assert all(token.encode() not in m for m in mail_servers.inbox_messages(alice))


def test_added_user_is_usable_at_once(mail_servers: MailServers) -> None:
    user = mail_servers.add_user(f"new-{uuid.uuid4().hex[:8]}", "chosen-password-1")
    assert user.address.endswith("@" + DOMAIN)
    assert mail_servers.users[user.localpart] == user
    client = _imap_tls(mail_servers)
    try:
        assert client.login(user.address, "chosen-password-1")[0] == "OK"
        assert client.select("INBOX") == ("OK", [b"0"])
    finally:
        client.logout()
    assert mail_servers.maildir(user).is_dir()  # Dovecot made it on first use
    assert mail_servers.inbox_messages(user) == []


def test_wait_for_messages_times_out(mail_servers: MailServers) -> None:
    user = _fresh_user(mail_servers, "empty")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 of 1"):
        mail_servers.wait_for_messages(user, 1, timeout=0.3)
    assert time.monotonic() - started < 3


# ---------------------------------------------------------------------------
# Authentication and TLS requirements


def test_imap_wrong_password_refused(mail_servers: MailServers) -> None:
    alice = mail_servers.users["alice"]
    client = _imap_tls(mail_servers)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(alice.address, alice.password + "x")
    finally:
        client.logout()


@pytest.mark.parametrize("port_kind", ["implicit-tls", "starttls"])
def test_smtp_wrong_password_refused(mail_servers: MailServers, port_kind: str) -> None:
    alice = mail_servers.users["alice"]
    client = (
        _smtp_tls(mail_servers) if port_kind == "implicit-tls" else _smtp_starttls(mail_servers)
    )
    with client:
        client.ehlo()
        # One AUTH PLAIN (smtplib's login() would retry with LOGIN, doubling Dovecot's
        # failure delay); then the right password on the same connection works.
        wrong = base64.b64encode(f"\0{alice.address}\0not-{alice.password}".encode())
        code, _ = client.docmd("AUTH", "PLAIN " + wrong.decode())
        assert code == 535
        assert client.login(alice.address, alice.password)[0] == 235


def test_imap_plain_login_refused_before_starttls(mail_servers: MailServers) -> None:
    alice = mail_servers.users["alice"]
    client = imaplib.IMAP4(mail_servers.host, mail_servers.imap_plain_port, timeout=IO_TIMEOUT)
    try:
        assert "STARTTLS" in client.capabilities
        assert "LOGINDISABLED" in client.capabilities
        # imaplib itself would refuse to send LOGIN here; send it raw so the server
        # is what refuses it.
        tag = client._new_tag().decode()
        client.send(f'{tag} LOGIN "{alice.address}" "{alice.password}"\r\n'.encode())
        reply = client.readline()
        while reply.startswith(b"*"):
            reply = client.readline()
        assert reply.startswith(f"{tag} NO".encode()), reply
        # The same credentials work once the connection is encrypted.
        typ, _ = client.starttls(ssl_context=mail_servers.ssl_context())
        assert typ == "OK"
        typ, _ = client.login(alice.address, alice.password)
        assert typ == "OK"
    finally:
        client.logout()


def test_smtp_auth_refused_before_starttls(mail_servers: MailServers) -> None:
    alice = mail_servers.users["alice"]
    with smtplib.SMTP(
        mail_servers.host, mail_servers.smtp_starttls_port, timeout=IO_TIMEOUT
    ) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHg=")  # \0alice\0x
        assert code == 530
        code, _ = client.docmd("MAIL", f"FROM:<{alice.address}>")
        assert code == 530
        client.starttls(context=mail_servers.ssl_context())
        client.ehlo()
        assert client.has_extn("auth")
        assert client.esmtp_features["size"] == str(SMTP_SIZE_LIMIT)
        code, _ = client.login(alice.address, alice.password)
        assert code == 235


def test_implicit_tls_ports_present_the_test_certificate(mail_servers: MailServers) -> None:
    for port in (mail_servers.imap_tls_port, mail_servers.smtp_tls_port):
        with (
            socket.create_connection((mail_servers.host, port), timeout=IO_TIMEOUT) as raw,
            mail_servers.ssl_context().wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # And a client that trusts only the system store refuses it.
    with (
        socket.create_connection(
            (mail_servers.host, mail_servers.imap_tls_port), timeout=IO_TIMEOUT
        ) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")


# ---------------------------------------------------------------------------
# Refused recipients and senders


def _rcpt_code(client: smtplib.SMTP, sender: str, recipient: str) -> int:
    code, _ = client.mail(sender)
    assert code == 250
    code, _ = client.rcpt(recipient)
    client.rset()
    return code


def test_rejected_address_and_foreign_domain_get_5xx_at_rcpt(mail_servers: MailServers) -> None:
    alice = mail_servers.users["alice"]
    with _smtp_tls(mail_servers) as client:
        client.login(alice.address, alice.password)
        assert 500 <= _rcpt_code(client, alice.address, REJECTED_ADDRESS) < 600
        assert 500 <= _rcpt_code(client, alice.address, "someone@example.com") < 600
        assert 500 <= _rcpt_code(client, alice.address, "root@localhost") < 600
        # Control: the same session may send to a real user.
        assert _rcpt_code(client, alice.address, mail_servers.users["bob"].address) == 250


def test_rejected_recipient_refused_by_send_message(mail_servers: MailServers) -> None:
    alice = mail_servers.users["alice"]
    with _smtp_starttls(mail_servers) as client:
        client.login(alice.address, alice.password)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            client.send_message(_message(alice, REJECTED_ADDRESS, "x"))
    ((code, _),) = info.value.recipients.values()
    assert 500 <= code < 600


def test_unauthenticated_submission_refused(mail_servers: MailServers) -> None:
    bob = mail_servers.users["bob"]
    with _smtp_tls(mail_servers) as client:
        client.ehlo()
        code = _rcpt_code(client, "stranger@example.com", bob.address)
    assert 500 <= code < 600


# ---------------------------------------------------------------------------
# IDLE


class _RawIMAP:
    """Just enough IMAP over a TLS socket to watch IDLE (imaplib has no IDLE before 3.14)."""

    def __init__(self, servers: MailServers) -> None:
        raw = socket.create_connection((servers.host, servers.imap_tls_port), timeout=IO_TIMEOUT)
        self.sock = servers.ssl_context().wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        assert self.readline().startswith(b"* OK")

    def readline(self) -> bytes:
        line = self.file.readline(64 * 1024)
        if not line:
            raise ConnectionError("server closed the connection")
        return line

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def command(self, tag: str, line: str) -> list[bytes]:
        self.send(f"{tag} {line}")
        lines = []
        while not (reply := self.readline()).startswith(tag.encode() + b" "):
            lines.append(reply)
        assert reply.startswith(tag.encode() + b" OK"), reply
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw_imap(mail_servers: MailServers) -> Iterator[_RawIMAP]:
    conn = _RawIMAP(mail_servers)
    try:
        yield conn
    finally:
        conn.close()


def test_idle_reports_exists_after_delivery(mail_servers: MailServers, raw_imap: _RawIMAP) -> None:
    rcpt = _fresh_user(mail_servers, "idle")
    raw_imap.command("a1", f'LOGIN "{rcpt.address}" "{rcpt.password}"')
    selected = raw_imap.command("a2", "SELECT INBOX")
    assert b"* 0 EXISTS\r\n" in selected
    raw_imap.send("a3 IDLE")
    assert raw_imap.readline().startswith(b"+ ")

    started = time.monotonic()
    _submit(mail_servers, mail_servers.users["alice"], rcpt.address, uuid.uuid4().hex)
    # Untagged lines other than EXISTS (RECENT, keepalives) may come first.
    while (line := raw_imap.readline()) != b"* 1 EXISTS\r\n":
        assert line.startswith(b"* "), line
    elapsed = time.monotonic() - started
    raw_imap.send("DONE")
    while not (line := raw_imap.readline()).startswith(b"a3 "):
        pass
    assert line.startswith(b"a3 OK")
    assert elapsed < IO_TIMEOUT


# ---------------------------------------------------------------------------
# Server lifecycle


def test_restart_dovecot_keeps_users_and_mail(mail_servers: MailServers) -> None:
    rcpt = _fresh_user(mail_servers, "restart")
    alice = mail_servers.users["alice"]
    _submit(mail_servers, alice, rcpt.address, "before")
    mail_servers.wait_for_messages(rcpt, 1)

    conn = _RawIMAP(mail_servers)
    try:
        conn.command("a1", f'LOGIN "{rcpt.address}" "{rcpt.password}"')
        mail_servers.restart_dovecot()
        # The old connection was cut by the restart.
        with pytest.raises((ConnectionError, OSError)):
            conn.command("a2", "NOOP")
    finally:
        conn.close()

    # Postfix still delivers (its cached LMTP connection went away with Dovecot).
    _submit(mail_servers, alice, rcpt.address, "after")
    subjects = sorted(_subject(m) for m in mail_servers.wait_for_messages(rcpt, 2))
    assert subjects == ["test after", "test before"]
    assert sorted(_subject(m) for m in _imap_fetch_all(mail_servers, rcpt)) == subjects


def test_stop_and_start_postfix(mail_servers: MailServers) -> None:
    rcpt = _fresh_user(mail_servers, "pfx")
    mail_servers.stop_postfix()
    try:
        for port in (mail_servers.smtp_tls_port, mail_servers.smtp_starttls_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((mail_servers.host, port), timeout=IO_TIMEOUT).close()
    finally:
        mail_servers.start_postfix()
    _submit(mail_servers, mail_servers.users["alice"], rcpt.address, "after-restart")
    assert [_subject(m) for m in mail_servers.wait_for_messages(rcpt, 1)] == ["test after-restart"]


# ---------------------------------------------------------------------------
# The harness itself


def test_add_user_rejects_unsafe_input(mail_servers: MailServers) -> None:
    for bad in ("", "Upper", "a b", "x:y", "a@b", "a+b"):
        with pytest.raises(ValueError, match="local part"):
            mail_servers.add_user(bad)
    with pytest.raises(ValueError, match="password"):
        mail_servers.add_user(f"pw-{uuid.uuid4().hex[:6]}", "has:colon")
    with pytest.raises(ValueError, match="exists"):
        mail_servers.add_user("alice")


def test_cli_up_send_inbox_and_sigterm(mail_server_machine: None, tmp_path: pathlib.Path) -> None:
    toml_file, json_file = tmp_path / "prxmail.toml", tmp_path / "servers.json"
    command = [sys.executable, "-m", "tests.mailservers"]
    with subprocess.Popen(
        [*command, "up", "--toml", str(toml_file), "--json", str(json_file)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            info = _read_up_description(proc)
            assert set(info["users"]) >= {"alice", "bob", "bot"}
            assert re.search(r"^imap_port = \d+$", info["prxmail_toml"], re.MULTILINE)
            assert info["ca_file"] in info["prxmail_toml"]
            assert toml_file.read_text() == info["prxmail_toml"]
            assert json.loads(json_file.read_text()) == info
            for path in (toml_file, json_file):
                assert path.stat().st_mode & 0o777 == 0o600

            token = uuid.uuid4().hex
            sent = subprocess.run(
                [*command, "send", "--servers", str(json_file), "--to", "bob", "--subject", token],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert sent.returncode == 0, sent.stderr
            assert "to bob@prxmail.test" in sent.stdout
            deadline = time.monotonic() + IO_TIMEOUT
            while True:
                listed = subprocess.run(
                    [*command, "inbox", "--servers", str(json_file), "bob"],
                    cwd=REPO_ROOT,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                assert listed.returncode == 0, listed.stderr
                if f"Subject: {token}" in listed.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert "bob@prxmail.test: 1 message(s)" in listed.stdout
            assert f"Subject: {token}" in listed.stdout

            workdir = info["workdir"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            assert not os.path.exists(workdir)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _read_up_description(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        text += line
        if line.rstrip() == "}":
            info: dict[str, Any] = json.loads(text)
            return info
    raise AssertionError(f"no description from `up`: {text!r}")


def _pid_running(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_servers_do_not_outlive_a_killed_owner(mail_server_machine: None) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.mailservers", "up"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            info = _read_up_description(proc)
            workdir = pathlib.Path(info["workdir"])
            dovecot_pid = mailservers._read_pid(str(workdir / "dovecot/run/master.pid"))
            postfix_pid = mailservers._read_pid(str(workdir / "postfix/queue/pid/master.pid"))
        finally:
            proc.kill()  # SIGKILL: no cleanup code of the owner runs
    try:
        assert dovecot_pid is not None
        assert postfix_pid is not None
        deadline = time.monotonic() + 30
        while (_pid_running(dovecot_pid) or _pid_running(postfix_pid)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        watchdog_log = (workdir / "logs/watchdog.log").read_text()
        assert not _pid_running(dovecot_pid), watchdog_log
        assert not _pid_running(postfix_pid), watchdog_log
        assert f"stopping dovecot {dovecot_pid}" in watchdog_log
        assert f"stopping postfix {postfix_pid}" in watchdog_log
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # kept on an unclean exit, by design


def test_start_retries_when_a_port_is_taken(
    mail_server_machine: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold a port and hand it out as "free" once: the first attempt must fail to bind
    # and the second, with fresh ports, succeed.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_ports = mailservers._free_ports
    calls = []

    def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = real_free_ports(count, host)
        calls.append(ports)
        if len(calls) == 1:
            ports[0] = taken  # imap_tls_port of the first attempt
        return ports

    monkeypatch.setattr(mailservers, "_free_ports", free_ports)
    try:
        with mailservers.mail_servers() as servers:
            assert servers.imap_tls_port != taken
            alice = servers.users["alice"]
            client = _imap_tls(servers)
            try:
                assert client.login(alice.address, alice.password)[0] == "OK"
            finally:
                client.logout()
    finally:
        squatter.close()
    assert len(calls) >= 3  # first attempt (+ its backend port), then a second one


def test_prxmail_toml_snippet_is_a_valid_config(mail_servers: MailServers) -> None:
    from prxmail._tls import Security
    from prxmail.config import parse_config

    config = parse_config(mail_servers.prxmail_toml(), source="snippet")
    bot, alice = mail_servers.users["bot"], mail_servers.users["alice"]
    assert (config.imap_host, config.imap_port) == ("127.0.0.1", mail_servers.imap_tls_port)
    assert (config.smtp_host, config.smtp_port) == ("127.0.0.1", mail_servers.smtp_tls_port)
    assert config.imap_security is Security.TLS
    assert config.smtp_security is Security.TLS
    assert config.username == config.from_address == bot.address
    assert config.allowed_senders == (alice.address,)
    assert config.tls_ca_file == mail_servers.ca_file
    assert config.warnings == ()


def test_private_instances_are_not_taken_for_system_services(mail_servers: MailServers) -> None:
    # ensure_installed stops system-wide services an install started; it must never
    # mistake a private instance (ours or a parallel run's) for one.
    found = mailservers._system_service_pids()
    dovecot_pid = int((mail_servers.workdir / "dovecot/run/master.pid").read_text().split()[0])
    postfix_pid = mailservers._read_pid(str(mail_servers.workdir / "postfix/queue/pid/master.pid"))
    assert postfix_pid is not None
    assert dovecot_pid not in found["dovecot"]
    assert postfix_pid not in found["postfix"]


def test_many_imap_sessions_per_user(mail_servers: MailServers) -> None:
    # Beyond Dovecot's default of 10 per user+IP, for benchmarks and concurrency tests.
    user = _fresh_user(mail_servers, "many")
    clients = []
    try:
        for _ in range(15):
            client = _imap_tls(mail_servers)
            clients.append(client)
            assert client.login(user.address, user.password)[0] == "OK"
            assert client.select("INBOX")[0] == "OK"
    finally:
        for client in clients:
            client.logout()


def test_prxmail_toml_variants(mail_servers: MailServers) -> None:
    from prxmail._tls import Security
    from prxmail.config import parse_config

    config = parse_config(
        mail_servers.prxmail_toml(
            "bob",
            ["alice", "@example.com", "*"],
            imap_security="starttls",
            smtp_security="starttls",
            tls_ca_file=False,
        )
    )
    assert config.username == mail_servers.users["bob"].address
    assert (config.imap_port, config.imap_security) == (
        mail_servers.imap_plain_port,
        Security.STARTTLS,
    )
    assert (config.smtp_port, config.smtp_security) == (
        mail_servers.smtp_starttls_port,
        Security.STARTTLS,
    )
    assert config.tls_ca_file is None
    assert config.allowed_senders == (mail_servers.users["alice"].address, "@example.com", "*")
    # A deliberate mismatch: implicit TLS spoken to the STARTTLS port.
    text = mail_servers.prxmail_toml(imap_port=mail_servers.imap_plain_port)
    assert f'imap_port = {mail_servers.imap_plain_port}\nimap_security = "tls"' in text
    with pytest.raises(ValueError, match="security"):
        mail_servers.prxmail_toml(imap_security="ssl")


def test_deliver_to_maildir_is_seen_by_imap(mail_servers: MailServers) -> None:
    user = _fresh_user(mail_servers, "bulk")  # never logged in: no Maildir yet
    raws = [
        f"From: x@example.com\nTo: {user.address}\nSubject: bulk {i}\n\nbody {i}\n".encode()
        for i in range(3)
    ]
    paths = mail_servers.deliver_to_maildir(user, raws)
    assert [p.parent.name for p in paths] == ["new", "new", "new"]
    assert mail_servers.inbox_messages(user) == raws

    client = _imap_tls(mail_servers)
    try:
        client.login(user.address, user.password)
        assert client.select("INBOX") == ("OK", [b"3"])
        typ, _ = client.store("1", "+FLAGS", "(\\Seen)")  # Dovecot must be able to rename
        assert typ == "OK"
    finally:
        client.logout()
    assert [_subject(m) for m in _imap_fetch_all(mail_servers, user)] == [
        "bulk 0",
        "bulk 1",
        "bulk 2",
    ]
    seen = [p.name for p in (mail_servers.maildir(user) / "cur").iterdir()]
    assert any(name.endswith(":2,S") for name in seen), seen


def test_change_uidvalidity(mail_servers: MailServers) -> None:
    user = _fresh_user(mail_servers, "uidv")
    _submit(mail_servers, mail_servers.users["alice"], user.address, "kept")
    mail_servers.wait_for_messages(user, 1)
    before = mail_servers.uidvalidity(user)
    after = mail_servers.change_uidvalidity(user)
    assert after == before + 1
    client = _imap_tls(mail_servers)
    try:
        client.login(user.address, user.password)
        assert client.select("INBOX", readonly=True) == ("OK", [b"1"])
        assert client.response("UIDVALIDITY") == ("UIDVALIDITY", [str(after).encode()])
    finally:
        client.logout()
