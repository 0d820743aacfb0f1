"""systemd's notify protocol (``Type=notify``): READY, STATUS, WATCHDOG, STOPPING.

Theory of operation: when systemd starts the service with ``NOTIFY_SOCKET`` set, each
notification is one datagram of ``KEY=VALUE`` lines to that AF_UNIX socket (a path, or
an abstract name when it starts with ``@``). :func:`supervise` runs in the service's
nursery beside the accounts:

* ``READY=1`` once every account has finished its first catch-up -- its IMAP status
  reached idle, polling or fetching, which the watcher only sets after catching up --
  or has been refused login (``auth-failed`` will not fix itself; holding READY back
  would make systemd kill a service whose other accounts work; ``/healthz`` and
  ``STATUS=`` say what is wrong);
* ``STATUS=`` with a one-line summary, whenever it changes (checked every
  :data:`STATUS_CHECK_SECONDS`);
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` when that is set (for this process):
  sent from a task on the event loop, so a stuck loop stops it and systemd restarts us;
* ``STOPPING=1`` when the service stops.

A notification that cannot be sent is logged once and the service goes on: systemd
supervision is a help, not a condition for answering mail.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

import trio

from prxmail._log import log_event
from prxmail.channel import MailChannel

__all__ = [
    "STATUS_CHECK_SECONDS",
    "Notifier",
    "notify_address",
    "status_summary",
    "supervise",
    "watchdog_interval",
]

# How often the summary is recomputed to see whether STATUS= changed: a person
# reading `systemctl status` sees a change within this time; cheaper checks are pointless.
STATUS_CHECK_SECONDS: Final = 1.0

# The summary is one line in `systemctl status`; beyond this it is cut (many accounts).
MAX_STATUS_CHARS: Final = 400

#: ``ChannelStatus.imap`` values in which the account has a working IMAP session (here,
#: not in :mod:`prxmail._metrics`, so that a service without ``health_listen`` does
#: not load prometheus-client for it).
CONNECTED_STATES: Final = frozenset({"idle", "polling", "fetching"})

_READY_STATES: Final = CONNECTED_STATES | {"auth-failed"}


def notify_address(value: str) -> str:
    """The socket address for a ``NOTIFY_SOCKET`` value.

    Args:
        value: A path, or ``@name`` for a socket in the abstract namespace.

    Returns:
        The address for ``sendto``: the path, or the name after a NUL byte.

    Raises:
        ValueError: the value is empty or relative (systemd only sets absolute paths).
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or @name, got {value!r}")
    return value


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, as systemd asks.

    Args:
        environ: The process environment.

    Returns:
        Seconds, or ``None`` when no watchdog is set for this process (unset, not a
        positive number, or ``WATCHDOG_PID`` names another process).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


def status_summary(channels: Mapping[str, MailChannel]) -> str:
    """The one-line ``STATUS=`` text: each account's IMAP state and what was done.

    Args:
        channels: Account name -> open channel.

    Returns:
        E.g. ``"default: idle; sales: auth-failed | 3 handled, 2 replies sent"``.
    """
    states = "; ".join(f"{name}: {ch.status.value.imap}" for name, ch in channels.items())
    stats = [ch.statistics() for ch in channels.values()]
    done = sum(s.replied + s.handled for s in stats)
    sent = sum(s.replies_sent for s in stats)
    failed = sum(s.failed for s in stats)
    text = f"{states} | {done} handled, {sent} replies sent, {failed} failed"
    return text[:MAX_STATUS_CHARS]


class Notifier:
    """Sends notifications to ``NOTIFY_SOCKET``."""

    def __init__(self, address: str) -> None:
        """Args:
        address: From :func:`notify_address`.
        """
        self._address = address
        self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """A notifier when ``NOTIFY_SOCKET`` is set, else ``None``.

        Args:
            environ: The process environment.

        Returns:
            The notifier, or ``None`` (not started by systemd, or a bad value, logged).
        """
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return None
        try:
            return cls(notify_address(value))
        except ValueError as exc:
            log_event(logging.WARNING, "systemd notifications off", error=str(exc))
            return None

    async def send(self, text: str) -> None:
        """Send one notification (``KEY=VALUE`` lines); failures are logged once.

        Args:
            text: The notification.
        """
        try:
            await self._socket.sendto(text.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log_event(logging.WARNING, "systemd notification could not be sent", error=str(exc))

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


async def _send_ready(notifier: Notifier, channels: Mapping[str, MailChannel]) -> None:
    # The accounts open when supervision began (a copy: the mapping may grow meanwhile).
    for channel in list(channels.values()):
        await channel.status.wait_value(lambda s: s.imap in _READY_STATES)
    await notifier.send("READY=1\nSTATUS=" + status_summary(channels))
    log_event(logging.INFO, "told systemd: ready")


async def _send_status(notifier: Notifier, channels: Mapping[str, MailChannel]) -> None:
    last = ""
    while True:
        summary = status_summary(channels)
        if summary != last:
            await notifier.send("STATUS=" + summary)
            last = summary
        await trio.sleep(STATUS_CHECK_SECONDS)


async def _send_watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        await notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


async def supervise(
    notifier: Notifier,
    channels: Mapping[str, MailChannel],
    *,
    watchdog: float | None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep systemd informed until cancelled; then send ``STOPPING=1``.

    Args:
        notifier: Where to send.
        channels: Account name -> open channel (all accounts, already open).
        watchdog: Seconds between ``WATCHDOG=1`` (:func:`watchdog_interval`), or None.
        task_status: For ``nursery.start``.
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_ready, notifier, channels)
            nursery.start_soon(_send_status, notifier, channels)
            if watchdog is not None:
                nursery.start_soon(_send_watchdog, notifier, watchdog)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            await notifier.send("STOPPING=1")
        notifier.close()
