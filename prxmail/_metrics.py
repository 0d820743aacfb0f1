"""The service's metrics, in the Prometheus text format (``GET /metrics``).

Theory of operation: every running service owns one :class:`ServiceMetrics` with its
own ``CollectorRegistry`` -- never prometheus-client's global one, so two services in
one process (or one test after another) never share or double-register a series.
Most series are not counted here a second time: a collector reads each account's
channel at scrape time (:meth:`MailChannel.statistics` for message outcomes and sent
replies, ``channel.status`` for the IMAP connection and reconnects), so the numbers are
the channel's own. Only what the channel does not keep is observed as it happens: the
handler's run time (the service times it) and the push latency (the channel's
``push_latency_hook``). The outbox gauge needs a state-store query, which cannot run
inside a collector (it is synchronous, on the event loop), so :meth:`refresh` reads it
before each exposition.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prxmail._systemd import CONNECTED_STATES
from prxmail.channel import ChannelStatistics, MailChannel

__all__ = ["CONNECTED_STATES", "OUTCOMES", "ServiceMetrics"]

#: The ``outcome`` label of ``prxmail_messages_total``, each with the statistics field
#: it counts.
OUTCOMES: Final = {
    "replied": "replied",
    "handled": "handled",
    "failed": "failed",
    "released": "released",
    "rejected": "rejected",
    "duplicate": "duplicates",
    "deferred": "deferred",
    "held": "held",
}

# Handler run times: a handler answers in well under a second when it is a script and
# in tens of seconds when it calls a language model; handler_timeout_secs defaults to
# 300, so the buckets reach that far.
HANDLER_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Push latency, from EXISTS received to the message handed out (the server's own delay
# before it sends EXISTS is not in it): a search, a fetch and a claim take milliseconds
# on a near server; seconds mean busy handler slots or a slow link.
PUSH_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ChannelCollector(Collector):
    """Reads every account's channel when the registry is scraped."""

    def __init__(self, channels: dict[str, MailChannel]) -> None:
        self._channels = channels

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "prxmail_messages",
            "Messages by what became of them (handler outcomes and admission verdicts).",
            labels=["account", "outcome"],
        )
        replies = CounterMetricFamily(
            "prxmail_replies_sent",
            "Replies and messages the SMTP server accepted.",
            labels=["account"],
        )
        reconnects = CounterMetricFamily(
            "prxmail_reconnects",
            "IMAP sessions that ended in a failure (each is followed by a reconnect).",
            labels=["account"],
        )
        connected = GaugeMetricFamily(
            "prxmail_imap_connected",
            "1 while the account has a working IMAP session (idle, polling or fetching).",
            labels=["account"],
        )
        for name, channel in self._channels.items():
            stats: ChannelStatistics = channel.statistics()
            status = channel.status.value
            for outcome, field in OUTCOMES.items():
                messages.add_metric([name, outcome], getattr(stats, field))
            replies.add_metric([name], stats.replies_sent)
            reconnects.add_metric([name], status.reconnects)
            connected.add_metric([name], 1.0 if status.imap in CONNECTED_STATES else 0.0)
        yield messages
        yield replies
        yield reconnects
        yield connected


class ServiceMetrics:
    """The metrics of one running service (see the module comment)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._channels: dict[str, MailChannel] = {}
        self.registry.register(_ChannelCollector(self._channels))
        self._outbox = Gauge(
            "prxmail_outbox_pending",
            "Replies queued in the outbox and not sent yet.",
            ["account"],
            registry=self.registry,
        )
        self._handler = Histogram(
            "prxmail_handler_seconds",
            "Run time of the handler command per message.",
            ["account"],
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )
        self._push = Histogram(
            "prxmail_push_latency_seconds",
            "Seconds from an IDLE push (EXISTS) to the next message handed to the handler.",
            ["account"],
            buckets=PUSH_BUCKETS,
            registry=self.registry,
        )

    def add_account(self, name: str, channel: MailChannel) -> None:
        """Report an account's channel, and observe its push latency.

        Args:
            name: The account's name (the ``account`` label).
            channel: Its open channel.
        """
        self._channels[name] = channel
        histogram = self._push.labels(name)
        channel.push_latency_hook = histogram.observe
        self._handler.labels(name)  # present (empty) before the first message
        self._outbox.labels(name)

    def observe_handler(self, name: str, seconds: float) -> None:
        """Record one handler run.

        Args:
            name: The account.
            seconds: How long the handler ran.
        """
        self._handler.labels(name).observe(seconds)

    async def refresh(self) -> None:
        """Read what only the state store knows (the outbox) into the gauges."""
        for name, channel in list(self._channels.items()):
            # Counted per account (accounts may share one store), without loading bodies.
            summary = await channel._store.account_summary(channel.account)
            self._outbox.labels(name).set(summary.outbox_queued)

    async def exposition(self) -> bytes:
        """Returns: the current metrics in the Prometheus text format."""
        await self.refresh()
        return generate_latest(self.registry)
