"""The README's main job: prxmail end to end against private local mail servers.

1. Starts Dovecot + Postfix on 127.0.0.1 (tests/mailservers.py) with users alice and bot.
2. Writes a configuration for the bot account that answers alice and checks it with
   ``prxmail doctor`` (every step from config to mailbox must pass).
3. Runs ``prxmail serve`` as a subprocess with a small example handler (a ``python3 -c``
   one-liner that greets the sender and quotes the subject).
4. Sends a message as alice (stdlib smtplib, implicit TLS, the servers' throwaway CA).
5. Waits for the threaded reply in alice's INBOX and prints its headers and body.
6. Stops serve with SIGTERM and the servers, and exits non-zero if the reply did not
   arrive (or serve did not stop cleanly).

Run with ``nox -s demo`` or ``python -m tests.demo``.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path
from typing import IO

from tests.mailservers import MailServers, mail_servers

# The example handler: reads the message JSON on stdin, prints the reply body.
HANDLER = (
    "import json, sys; m = json.load(sys.stdin); "
    "name = m['from_name'] or m['from']; "
    'print(f\'Hello {name}!\\n\\nThanks for your message about "{m["subject"]}".\'); '
    "print('This friendly answer came from the prxmail demo handler.')"
)

REPLY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def _pump(stream: IO[bytes], prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(prefix + line.decode("utf-8", "replace"))
        sys.stdout.flush()


def _send_as_alice(servers: MailServers) -> str:
    alice, bot = servers.users["alice"], servers.users["bot"]
    msg = EmailMessage()
    msg["From"] = f"Alice <{alice.address}>"
    msg["To"] = bot.address
    msg["Subject"] = "Hello bot, are you there?"
    msg["Message-ID"] = f"<demo-{os.getpid()}-{int(time.time())}@{alice.address.split('@')[1]}>"
    msg.set_content("Hi! Could you answer this, please?\n\nAlice\n")
    with smtplib.SMTP_SSL(
        servers.host, servers.smtp_tls_port, context=servers.ssl_context(), timeout=30
    ) as smtp:
        smtp.login(alice.address, alice.password)
        smtp.send_message(msg)
    return str(msg["Message-ID"])


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__)
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prxmail-demo-") as tmp, mail_servers() as servers:
        config = Path(tmp) / "prxmail.toml"
        config.write_text(servers.prxmail_toml())
        print(f"started {servers!r}")
        print(f"configuration {config} (password elided):")
        for line in config.read_text().splitlines():
            print("   ", 'password = "********"' if line.startswith("password") else line)
        doctor = [sys.executable, "-m", "prxmail", "doctor", "-c", str(config)]
        print(f"\n$ {' '.join(doctor)}", flush=True)
        doctor_status = subprocess.run(doctor, check=False).returncode
        if doctor_status != 0:
            print(f"\ndemo FAILED: doctor found a problem (exit status {doctor_status})")
            return 1
        command = [sys.executable, "-m", "prxmail", "serve", "-c", str(config)]
        print(f"\n$ {' '.join(command)} --exec 'python3 -c ...'", flush=True)
        proc = subprocess.Popen(
            [*command, "--exec", f"{sys.executable} -c {_quote(HANDLER)}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        pump = threading.Thread(target=_pump, args=(proc.stderr, "  [serve] "), daemon=True)
        pump.start()
        reply = None
        try:
            sent_id = _send_as_alice(servers)
            print(f"\nalice sent {sent_id}; waiting for the reply ...", flush=True)
            try:
                messages = servers.wait_for_messages(
                    servers.users["alice"], 1, timeout=REPLY_TIMEOUT
                )
                reply = email.message_from_bytes(messages[-1], policy=email.policy.default)
            except TimeoutError as exc:
                print(f"\nno reply arrived: {exc}")
        finally:
            status = _stop(proc)
            pump.join(timeout=5)
        if reply is not None:
            print("\nthe reply in alice's INBOX:")
            for name in (
                "From",
                "To",
                "Subject",
                "In-Reply-To",
                "References",
                "Auto-Submitted",
                "Message-ID",
            ):
                print(f"    {name}: {reply[name]}")
            body = reply.get_body(("plain",))
            text = body.get_content() if body is not None else ""
            print("\n" + "\n".join(f"    | {line}" for line in str(text).splitlines()))
    ok = reply is not None and reply["In-Reply-To"] == sent_id and status == 0
    print(f"\ndemo {'succeeded' if ok else 'FAILED'} (serve exit status {status})")
    return 0 if ok else 1


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


if __name__ == "__main__":
    raise SystemExit(main())
