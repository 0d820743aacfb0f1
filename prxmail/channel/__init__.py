"""The email channel for trio programs: accepted mail in, threaded replies out.

::

    async with open_mail_channel(config) as channel:
        async for message in channel:
            await channel.reply(message, f"Hello {message.from_.name or message.from_.addr}!")

The package, by module: ``_api`` (:class:`MailChannel`, the consumer's side, and
:func:`open_mail_channel`), ``_core`` (the state and hand-offs the parts share),
``_watcher`` (IMAP sessions, IDLE, reconnects), ``_fetch`` (the fetch pipeline:
fetch, parse, claim, admit; oversized messages) and ``_sender`` (the SMTP outbox).
The theory of operation is in ``_api``'s module comment.
"""

from prxmail.channel._api import ChannelStatistics as ChannelStatistics
from prxmail.channel._api import MailChannel as MailChannel
from prxmail.channel._api import open_mail_channel as open_mail_channel
from prxmail.channel._api import open_mail_channels as open_mail_channels
from prxmail.channel._core import MESSAGE_BUFFER as MESSAGE_BUFFER
from prxmail.channel._core import SEEN_BUFFER as SEEN_BUFFER
from prxmail.channel._core import ChannelStatus as ChannelStatus
from prxmail.channel._core import collapse_exception_group as collapse_exception_group
from prxmail.channel._fetch import FIRST_FETCH_BYTES as FIRST_FETCH_BYTES
from prxmail.channel._fetch import GROUP_BYTES as GROUP_BYTES
from prxmail.channel._fetch import INLINE_PARSE_BYTES as INLINE_PARSE_BYTES
from prxmail.channel._fetch import PARSE_THREADS as PARSE_THREADS
from prxmail.channel._sender import OUTBOX_BATCH as OUTBOX_BATCH
from prxmail.channel._sender import OUTBOX_RECHECK_SECONDS as OUTBOX_RECHECK_SECONDS
from prxmail.channel._watcher import AUTH_RETRY_SECONDS as AUTH_RETRY_SECONDS
from prxmail.channel._watcher import HEALTHY_SESSION_SECONDS as HEALTHY_SESSION_SECONDS
from prxmail.channel._watcher import RECONNECT_INITIAL_SECONDS as RECONNECT_INITIAL_SECONDS
from prxmail.channel._watcher import RECONNECT_MAX_SECONDS as RECONNECT_MAX_SECONDS

__all__ = [
    "AUTH_RETRY_SECONDS",
    "FIRST_FETCH_BYTES",
    "GROUP_BYTES",
    "INLINE_PARSE_BYTES",
    "MESSAGE_BUFFER",
    "PARSE_THREADS",
    "SEEN_BUFFER",
    "ChannelStatistics",
    "ChannelStatus",
    "MailChannel",
    "collapse_exception_group",
    "open_mail_channel",
    "open_mail_channels",
]
