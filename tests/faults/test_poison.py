"""A message the server answers wrongly every time: failed with its reason, the folder
moves on (issue 11 item 11).

Real Dovecot never sends a malformed FETCH response, so a :class:`FaultProxy` between
the channel and Dovecot's plain-text port corrupts that one message's response every
time it passes: it lengthens a token inside the message's literal, so the literal ends
early and the rest of it runs into the FETCH line, which the parser refuses. The
channel must record the message failed after POISON_ATTEMPTS identical failures,
with the reason, log a WARNING, and still hand over and answer the next message.
"""

from __future__ import annotations

import functools
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from prxmail.channel import open_mail_channel
from prxmail.channel._fetch import POISON_ATTEMPTS
from prxmail.config import parse_config
from prxmail.state import MessageStatus, StateStore
from tests.faults._kit import proxied_config_text, wait_reply_count
from tests.faults._logs import captured_logs
from tests.faults.proxy import FaultProxy
from tests.integration.servicekit import append, fresh_pair, make_message
from tests.mailservers import PLAIN_BACKEND_HOST, MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# From the poison message's arrival to the next message in the consumer's hands:
# POISON_ATTEMPTS + 1 failed sessions, each a plain-text login and a reconnect delay
# of at most RECONNECT_INITIAL_SECONDS (the sessions made progress), plus slack for a
# loaded 2-core machine.
RECOVERY_BOUND = 20.0


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def test_a_poison_message_is_failed_and_the_next_one_answered(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    pair = fresh_pair(mail_servers, "poison")
    token = f"POISON-{secrets.token_hex(8)}".encode()
    poison = make_message(pair.alice, pair.bot, "poison", f"before {token.decode()} after\n")
    good = make_message(pair.alice, pair.bot, "good after poison", "an ordinary message\n")
    state = tmp_path / "state"
    # Dovecot's plain listener allows LOGIN without TLS only on a connection whose
    # local and remote addresses match: the proxy connects from its address.
    with FaultProxy(
        PLAIN_BACKEND_HOST, mail_servers._plain_backend_port, source_host=PLAIN_BACKEND_HOST
    ) as proxy:
        text = proxied_config_text(
            mail_servers, pair, state, proxy.port, mail_servers.smtp_tls_port
        ).replace('imap_security = "tls"', 'imap_security = "plain"')
        config = parse_config(text)
        proxy.rewrite(token, token + b"!" * 64, "down")
        with captured_logs() as logs:
            async with open_mail_channel(config) as channel:
                with trio.fail_after(20):
                    await channel.status.wait_value(lambda s: s.imap == "idle")
                started = time.monotonic()
                await in_thread(append, mail_servers, pair.bot, bytes(poison))
                await in_thread(append, mail_servers, pair.bot, bytes(good))
                with trio.fail_after(RECOVERY_BOUND + 10):
                    message = await channel.receive()
                recovered = time.monotonic() - started
                assert message.message_id == good["Message-ID"]
                reply_id = await channel.reply(message, "answered despite the poison\n")
                with trio.fail_after(20):
                    while channel.statistics().replies_sent < 1:  # noqa: ASYNC110 - no event
                        await trio.sleep(0.05)
                reconnects = channel.status.value.reconnects
        rewrites = proxy.statistics().rewrites
    tally = await in_thread(wait_reply_count, mail_servers, pair, 1, 20.0)
    with StateStore(state) as store:
        failed = store.messages_with_status(MessageStatus.FAILED)
    print(
        f"poison: next message handed over {recovered:.2f}s after the poison arrived "
        f"(bound {RECOVERY_BOUND:.0f}s), {reconnects} reconnects, {rewrites} corrupted responses"
    )
    assert recovered <= RECOVERY_BOUND
    assert tally.answered == {str(good["Message-ID"]): [reply_id]}
    assert rewrites >= POISON_ATTEMPTS
    [record] = failed
    assert record.key.uid == 1
    assert f"fetch failed {POISON_ATTEMPTS} times: RemoteProtocolError" in str(record.reason)
    [warning] = logs.fields("its fetch failed the same way every time")
    assert warning["uid"] == 1
    assert warning["attempts"] == POISON_ATTEMPTS
