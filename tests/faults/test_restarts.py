"""Dovecot restarted, Postfix stopped for a while, prxmail SIGKILLed and restarted.

``prxmail serve`` runs as a subprocess (with a tiny echo handler) while messages are
appended to the bot's INBOX. At random points (seeded) the test SIGKILLs prxmail and
starts it again, restarts Dovecot, and stops Postfix for a few seconds while mail keeps
arriving. Afterwards nothing may be lost and nothing answered twice: every message has
exactly one reply. The one duplicate SMTP allows (the same reply, same Message-ID, sent
again after a kill between the end of DATA and the server's answer) is counted apart.
Between faults the service must still be running (it never exits on its own).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import pytest

from tests.faults._kit import (
    incoming,
    proxied_config_text,
    seeded,
    tally_replies,
    wait_reply_count,
)
from tests.integration.servicekit import ServeProcess, append, fresh_pair
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

MESSAGES = 20
FAULTS = ["kill", "kill", "dovecot", "postfix"]
POSTFIX_DOWN = (2.0, 4.0)  # seconds Postfix stays stopped

HANDLER = r"""
import json, sys
journal = sys.argv[1]
m = json.load(sys.stdin)
with open(journal, "a") as f:
    f.write(json.dumps({"message_id": m["message_id"]}) + "\n")
print("Echo: " + m["subject"])
"""


def test_restarts_and_crashes_lose_nothing_and_answer_once(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    rng, _seed = seeded("restarts")
    pair = fresh_pair(mail_servers, "restarts")
    config = tmp_path / "prxmail.toml"
    config.write_text(
        proxied_config_text(
            mail_servers,
            pair,
            tmp_path / "state",
            mail_servers.imap_tls_port,
            mail_servers.smtp_tls_port,
            keepalive_secs=5,
            command_timeout_secs=5,
            reply_rate_limit=1000,
            reply_rate_burst=1000,
        )
    )
    journal = tmp_path / "journal.jsonl"
    script = tmp_path / "handler.py"
    script.write_text(HANDLER)
    command = f"{sys.executable} {script} {journal}"

    faults = list(FAULTS)
    rng.shuffle(faults)
    at = dict(zip(rng.sample(range(1, MESSAGES - 3), len(faults)), faults, strict=True))
    sent: list[str] = []
    done: list[str] = []
    restarts = {"prxmail": 0, "dovecot": 0, "postfix": 0}
    exits_on_own = 0

    def start() -> ServeProcess:
        proc = ServeProcess(config, command)
        proc.wait_log("prxmail serving")
        return proc

    proc = start()
    postfix_down = False
    try:
        for i in range(MESSAGES):
            message_id, raw = incoming(pair, rng, i, "restarts")
            append(mail_servers, pair.bot, raw)
            sent.append(message_id)
            fault = at.get(i)
            if fault is not None:
                time.sleep(rng.uniform(0.0, 1.0))  # a random point in the handling
                if proc.proc.poll() is not None:
                    exits_on_own += 1
                if fault == "kill":
                    proc.kill()
                    proc = start()
                    restarts["prxmail"] += 1
                elif fault == "dovecot":
                    mail_servers.restart_dovecot()
                    restarts["dovecot"] += 1
                else:
                    mail_servers.stop_postfix()
                    postfix_down = True
                    # Mail keeps arriving while replies cannot go out.
                    until = time.monotonic() + rng.uniform(*POSTFIX_DOWN)
                    while time.monotonic() < until:
                        time.sleep(0.2)
                    mail_servers.start_postfix()
                    postfix_down = False
                    restarts["postfix"] += 1
                done.append(fault)
            time.sleep(rng.uniform(0.05, 0.4))
        wait_reply_count(mail_servers, pair, MESSAGES, timeout=60.0, flush=True)
        time.sleep(2.0)  # room for a wrong second answer
        if proc.proc.poll() is not None:
            exits_on_own += 1
    finally:
        if postfix_down:
            mail_servers.start_postfix()
        status = proc.terminate()
    tally = tally_replies(mail_servers, pair)
    handled = collections.Counter(
        json.loads(line)["message_id"] for line in journal.read_text().splitlines()
    )
    print(
        f"restarts: messages={MESSAGES} faults={done} prxmail_kills={restarts['prxmail']} "
        f"dovecot_restarts={restarts['dovecot']} postfix_stops={restarts['postfix']} "
        f"replies={tally.copies} lost={len(tally.lost(sent))} "
        f"answered_twice={len(tally.answered_twice())} resent_same_id={tally.resent()} "
        f"handler_runs={sum(handled.values())} exits_on_own={exits_on_own}"
    )
    assert exits_on_own == 0, proc.log()
    assert status == 0
    assert tally.lost(sent) == [], proc.log()
    assert tally.answered_twice() == {}
    assert set(tally.answered) == set(sent)
    assert set(handled) == set(sent)
    assert len(done) == len(FAULTS)
