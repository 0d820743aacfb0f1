"""Helpers for the channel/serve integration tests: fresh accounts, sending, appending,
running ``prxmail serve`` as a subprocess. Peers (smtplib, imaplib) are used here only to
play the *other* side (alice's mail client), never inside prxmail."""

from __future__ import annotations

import email
import email.policy
import imaplib
import itertools
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import attrs

from prxmail.config import Config, parse_config
from tests.mailservers import DOMAIN, MailServers, User

_counter = itertools.count()


@attrs.frozen
class Pair:
    """A bot account and the one sender it answers."""

    bot: User
    alice: User
    bob: User


def fresh_pair(servers: MailServers, tag: str) -> Pair:
    n = f"{os.getpid()}{next(_counter)}{time.monotonic_ns() % 100000}"
    return Pair(
        bot=servers.add_user(f"bot-{tag}-{n}"),
        alice=servers.add_user(f"alice-{tag}-{n}"),
        bob=servers.add_user(f"bob-{tag}-{n}"),
    )


def config_text(servers: MailServers, pair: Pair, state_dir: Path, **extra: object) -> str:
    lines = [
        "[channels_config.email]",
        f'imap_host = "{servers.host}"',
        f"imap_port = {servers.imap_tls_port}",
        'imap_security = "tls"',
        f'smtp_host = "{servers.host}"',
        f"smtp_port = {servers.smtp_tls_port}",
        'smtp_security = "tls"',
        f'username = "{pair.bot.address}"',
        f'password = "{pair.bot.password}"',
        f'from_address = "{pair.bot.address}"',
        f'allowed_senders = ["{pair.alice.address}"]',
        f'tls_ca_file = "{servers.ca_file}"',
        f'state_dir = "{state_dir}"',
        "command_timeout_secs = 20",
        "smtp_retry_initial_secs = 1",
        "smtp_retry_max_secs = 2",
    ]
    for key, value in extra.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def make_config(servers: MailServers, pair: Pair, state_dir: Path, **extra: object) -> Config:
    return parse_config(config_text(servers, pair, state_dir, **extra))


def make_message(
    sender: User,
    to: User,
    subject: str,
    body: str = "Hello bot.\n",
    *,
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender.address
    msg["To"] = to.address
    msg["Subject"] = subject
    token = re.sub(r"[^A-Za-z0-9]+", "-", subject).strip("-")
    msg["Message-ID"] = f"<{token}-{time.monotonic_ns()}@{DOMAIN}>"
    for name, value in (headers or {}).items():
        del msg[name]
        msg[name] = value
    msg.set_content(body)
    return msg


def send_mail(servers: MailServers, sender: User, msg: EmailMessage | bytes, to: User) -> None:
    """Submit as ``sender`` through Postfix (implicit TLS)."""
    with smtplib.SMTP_SSL(
        servers.host, servers.smtp_tls_port, context=servers.ssl_context(), timeout=30
    ) as smtp:
        smtp.login(sender.address, sender.password)
        if isinstance(msg, bytes):
            smtp.sendmail(sender.address, [to.address], msg)
        else:
            smtp.send_message(msg)


def imap_login(servers: MailServers, user: User) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL(
        servers.host, servers.imap_tls_port, ssl_context=servers.ssl_context(), timeout=60
    )
    conn.login(user.address, user.password)
    return conn


def append(servers: MailServers, user: User, raw: bytes, folder: str = "INBOX") -> None:
    """Put a message straight into a folder (no Postfix involved)."""
    conn = imap_login(servers, user)
    try:
        status, data = conn.append(folder, None, None, raw)
        assert status == "OK", data
    finally:
        conn.logout()


def replies(servers: MailServers, user: User) -> list[email.message.EmailMessage]:
    out = []
    for raw in servers.inbox_messages(user):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out.append(msg)
    return out


def wait_replies(
    servers: MailServers, user: User, count: int, timeout: float = 30
) -> list[email.message.EmailMessage]:
    servers.wait_for_messages(user, count, timeout=timeout)
    return replies(servers, user)


# -- prxmail serve as a subprocess --------------------------------------------------------


class ServeProcess:
    """``python -m prxmail serve`` with its stderr collected (and echoed on failure)."""

    def __init__(self, config_path: Path, exec_command: str, *, json_logs: bool = False) -> None:
        argv = [sys.executable, "-m", "prxmail", "serve", "-c", str(config_path)]
        argv += ["--exec", exec_command]
        if json_logs:
            argv += ["--log-format", "json"]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 30, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            with self._lock:
                found = sum(1 for line in self.lines if regex.search(line))
            if found >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"log never showed {pattern!r} x{count}; log:\n{self.log()}")

    def terminate(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(  # noqa: B904 - the timeout is the failure
                    f"serve did not stop on SIGTERM; log:\n{self.log()}"
                )
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def peak_rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))


def running_serve(config_path: Path, exec_command: str, **kwargs: bool) -> Iterator[ServeProcess]:
    proc = ServeProcess(config_path, exec_command, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
