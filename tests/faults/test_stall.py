"""Silent stalls (no RST, no bytes): detected and recovered within the configured times.

The IMAP connection is stalled while prxmail IDLEs, then a message arrives: the watcher
must notice the dead connection within ``keepalive_secs + 2 * command_timeout_secs``
(the IDLE cycle's hard deadline, see prxmail.channel) and hand the message over after
reconnecting. Then the SMTP connection stalls inside DATA: the reply must still go out,
after ``command_timeout_secs`` plus one retry delay.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio

from prxmail.channel import RECONNECT_INITIAL_SECONDS, open_mail_channel
from prxmail.config import parse_config
from tests.faults._kit import incoming, proxied_config_text, seeded, wait_reply_count
from tests.faults.proxy import FaultProxy
from tests.integration.servicekit import append, fresh_pair
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KEEPALIVE = 2
COMMAND_TIMEOUT = 2
RETRY = 1
# Work after detection on a loaded CI machine: TLS, LOGIN, SELECT, SEARCH, FETCH, parse.
SLACK = 4.0


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def test_silent_stalls_are_detected_and_recovered(
    mail_servers: MailServers, tmp_path: Path
) -> None:
    rng, _seed = seeded("stall")
    pair = fresh_pair(mail_servers, "stall")
    host = mail_servers.host
    with (
        FaultProxy(host, mail_servers.imap_tls_port) as imap_proxy,
        FaultProxy(host, mail_servers.smtp_tls_port) as smtp_proxy,
    ):
        config = parse_config(
            proxied_config_text(
                mail_servers,
                pair,
                tmp_path / "state",
                imap_proxy.port,
                smtp_proxy.port,
                keepalive_secs=KEEPALIVE,
                command_timeout_secs=COMMAND_TIMEOUT,
                smtp_retry_initial_secs=RETRY,
                smtp_retry_max_secs=RETRY,
                reply_rate_limit=1000,
                reply_rate_burst=1000,
            )
        )
        async with open_mail_channel(config, rng=rng) as channel:
            with trio.fail_after(20):
                await channel.status.wait_value(lambda s: s.imap == "idle")
            reconnects = channel.status.value.reconnects
            assert imap_proxy.stall() == 1
            stalled_at = trio.current_time()
            message_id, raw = incoming(pair, rng, 0, "stall")
            await in_thread(append, mail_servers, pair.bot, raw)

            # The IDLE cycle's hard deadline, plus scheduling room on a loaded machine.
            detect_bound = KEEPALIVE + 2 * COMMAND_TIMEOUT + 2.0
            with trio.fail_after(detect_bound + SLACK):
                await channel.status.wait_value(lambda s: s.reconnects > reconnects)
            detected = trio.current_time() - stalled_at
            deliver_bound = detect_bound + RECONNECT_INITIAL_SECONDS + SLACK
            with trio.fail_after(deliver_bound - detected + 1.0):
                message = await channel.receive()
            delivered = trio.current_time() - stalled_at
            assert message.message_id == message_id

            # The SMTP side: stall in the middle of DATA (the reply is ~60 KB).
            smtp_proxy.stall_after(rng.randrange(2_000, 40_000), "up")
            replied_at = trio.current_time()
            reply_id = await channel.reply(message, "stall reply\n" + "x" * 60_000)
            send_bound = COMMAND_TIMEOUT + RETRY + SLACK
            with trio.fail_after(send_bound + 2.0):
                while channel.statistics().replies_sent < 1:  # noqa: ASYNC110 - no event
                    await trio.sleep(0.05)
            sent = trio.current_time() - replied_at
            smtp_stalls = smtp_proxy.statistics().stalls
        tally = await in_thread(wait_reply_count, mail_servers, pair, 1, 20.0)

    print(
        f"stall: imap detected after {detected:.2f}s (bound {detect_bound:.0f}s), "
        f"message handed over after {delivered:.2f}s; smtp stalls={smtp_stalls}, "
        f"reply sent after {sent:.2f}s (bound {send_bound:.0f}s)"
    )
    assert detected <= detect_bound
    assert smtp_stalls == 1
    assert sent >= COMMAND_TIMEOUT  # the stall really held the first attempt
    assert tally.answered == {message_id: [reply_id]}
