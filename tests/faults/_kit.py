"""Shared pieces of the fault tests: the seed, the message mix, reply accounting."""

from __future__ import annotations

import collections
import email.message
import os
import random
import time
from pathlib import Path

import attrs

from tests.integration.servicekit import Pair, config_text, make_message
from tests.mailservers import MailServers


def seeded(name: str) -> tuple[random.Random, int]:
    """A random source for one test: ``PRXMAIL_FAULT_SEED`` or a fresh seed, printed.

    The seed is printed so a failing CI run can be replayed exactly.
    """
    raw = os.environ.get("PRXMAIL_FAULT_SEED")
    seed = int(raw) if raw else int.from_bytes(os.urandom(4), "big")
    print(f"{name}: seed {seed} (replay with PRXMAIL_FAULT_SEED={seed})")
    return random.Random(seed), seed  # test scheduling, not security


def incoming(pair: Pair, rng: random.Random, index: int, tag: str) -> tuple[str, bytes]:
    """Message ``index`` from alice to the bot; bodies from 1 KB to ~150 KB so a fetch
    spans many TLS records (a cut lands inside the literal). Returns (Message-ID, raw)."""
    size = rng.choice((1_000, 8_000, 40_000, 150_000))
    line = f"{tag} message {index} line of text to make the body longer.\n"
    body = line * max(1, size // len(line))
    msg = make_message(pair.alice, pair.bot, f"{tag} {index}", body)
    return str(msg["Message-ID"]), bytes(msg)


@attrs.frozen
class ReplyTally:
    """What alice received, per parent Message-ID."""

    answered: dict[str, list[str]]  # parent -> reply Message-IDs, one per copy received

    @property
    def copies(self) -> int:
        return sum(len(ids) for ids in self.answered.values())

    def lost(self, parents: list[str]) -> list[str]:
        return [p for p in parents if p not in self.answered]

    def answered_twice(self) -> dict[str, list[str]]:
        """Parents with two *different* replies: answered twice, never allowed."""
        return {p: ids for p, ids in self.answered.items() if len(set(ids)) > 1}

    def resent(self) -> int:
        """Extra copies of the same reply (the one duplicate SMTP allows)."""
        return sum(len(ids) - 1 for ids in self.answered.values() if len(set(ids)) == 1)


def tally_replies(servers: MailServers, pair: Pair) -> ReplyTally:
    answered: dict[str, list[str]] = collections.defaultdict(list)
    for raw in servers.inbox_messages(pair.alice):
        msg = email.message_from_bytes(raw)
        parent = str(msg["In-Reply-To"] or "").strip()
        answered[parent].append(str(msg["Message-ID"] or "").strip())
    return ReplyTally(answered=dict(answered))


def flush_postfix(servers: MailServers) -> None:
    """Ask the test Postfix to retry its deferred mail now.

    While Dovecot restarts, Postfix's LMTP delivery of replies fails and it defers them
    for minutes: a test-bed delay, not a prxmail one, so the tests cut it short.
    """
    servers.flush_postfix()


def wait_reply_count(
    servers: MailServers, pair: Pair, count: int, timeout: float, *, flush: bool = False
) -> ReplyTally:
    """Poll alice's INBOX until ``count`` distinct parents are answered (or time is up).

    With ``flush``, Postfix's deferred queue is flushed every couple of seconds.
    """
    deadline = time.monotonic() + timeout
    next_flush = time.monotonic()
    while True:
        tally = tally_replies(servers, pair)
        if len(tally.answered) >= count or time.monotonic() >= deadline:
            return tally
        if flush and time.monotonic() >= next_flush:
            flush_postfix(servers)
            next_flush = time.monotonic() + 2.0
        time.sleep(0.1)


def email_message(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw)


def proxied_config_text(
    servers: MailServers, pair: Pair, state: Path, imap_port: int, smtp_port: int, **extra: int
) -> str:
    """The integration config, pointed at the proxies, with ``extra`` keys overriding."""
    settings = {"imap_port": imap_port, "smtp_port": smtp_port, **extra}
    lines = [
        line
        for line in config_text(servers, pair, state).splitlines()
        if line.partition(" = ")[0] not in settings
    ]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"
