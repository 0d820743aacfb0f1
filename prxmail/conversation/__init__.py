"""Conversations: thread identity, loop detection, volume limits, rich replies.

The pure parts of long email conversations (issue 12), for the channel, the
handler and the state store to use:

* :func:`message_thread_id` -- a stable ``thread_id`` per conversation;
* :class:`LoopGuard` over a per-thread :class:`ThreadActivity` -- proceed, defer
  or hold, never drop;
* :class:`SenderRateLimiter` -- a per-sender token bucket that defers;
* :func:`parse_json_reply` -- a handler's ``reply_format = "json"`` output as a
  validated :class:`ReplySpec`;
* :func:`write_attachments` / :func:`remove_attachment_dir` -- incoming
  attachments as files in a private directory for ``--exec`` handlers.
"""

from __future__ import annotations

from prxmail.conversation._files import AttachmentFiles as AttachmentFiles
from prxmail.conversation._files import remove_attachment_dir as remove_attachment_dir
from prxmail.conversation._files import write_attachments as write_attachments
from prxmail.conversation._limits import DEFAULT_BURST as DEFAULT_BURST
from prxmail.conversation._limits import DEFAULT_RATE as DEFAULT_RATE
from prxmail.conversation._limits import DEFAULT_WINDOW_SECS as DEFAULT_WINDOW_SECS
from prxmail.conversation._limits import RateLimiterStatistics as RateLimiterStatistics
from prxmail.conversation._limits import SenderRateLimiter as SenderRateLimiter
from prxmail.conversation._loops import FAST_ANSWER_SECS as FAST_ANSWER_SECS
from prxmail.conversation._loops import FAST_STREAK_TO_HOLD as FAST_STREAK_TO_HOLD
from prxmail.conversation._loops import FAST_STREAK_TO_SLOW as FAST_STREAK_TO_SLOW
from prxmail.conversation._loops import MAX_REPLIES_PER_WINDOW as MAX_REPLIES_PER_WINDOW
from prxmail.conversation._loops import REPLY_WINDOW_SECS as REPLY_WINDOW_SECS
from prxmail.conversation._loops import SLOW_DOWN_SECS as SLOW_DOWN_SECS
from prxmail.conversation._loops import Defer as Defer
from prxmail.conversation._loops import Hold as Hold
from prxmail.conversation._loops import LoopDecision as LoopDecision
from prxmail.conversation._loops import LoopGuard as LoopGuard
from prxmail.conversation._loops import Proceed as Proceed
from prxmail.conversation._loops import ThreadActivity as ThreadActivity
from prxmail.conversation._reply_json import (
    DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES as DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES,
)
from prxmail.conversation._reply_json import MAX_JSON_REPLY_BYTES as MAX_JSON_REPLY_BYTES
from prxmail.conversation._reply_json import InvalidReplyError as InvalidReplyError
from prxmail.conversation._reply_json import ReplySpec as ReplySpec
from prxmail.conversation._reply_json import parse_json_reply as parse_json_reply
from prxmail.conversation._thread import MAX_THREAD_LOOKUPS as MAX_THREAD_LOOKUPS
from prxmail.conversation._thread import THREAD_ID_HEX_CHARS as THREAD_ID_HEX_CHARS
from prxmail.conversation._thread import KnownThread as KnownThread
from prxmail.conversation._thread import message_thread_id as message_thread_id
from prxmail.conversation._thread import thread_id_from_root as thread_id_from_root
from prxmail.conversation._thread import thread_lookup_ids as thread_lookup_ids
from prxmail.conversation._thread import thread_root as thread_root

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_TOTAL_ATTACHMENT_BYTES",
    "DEFAULT_RATE",
    "DEFAULT_WINDOW_SECS",
    "FAST_ANSWER_SECS",
    "FAST_STREAK_TO_HOLD",
    "FAST_STREAK_TO_SLOW",
    "MAX_JSON_REPLY_BYTES",
    "MAX_REPLIES_PER_WINDOW",
    "MAX_THREAD_LOOKUPS",
    "REPLY_WINDOW_SECS",
    "SLOW_DOWN_SECS",
    "THREAD_ID_HEX_CHARS",
    "AttachmentFiles",
    "Defer",
    "Hold",
    "InvalidReplyError",
    "KnownThread",
    "LoopDecision",
    "LoopGuard",
    "Proceed",
    "RateLimiterStatistics",
    "ReplySpec",
    "SenderRateLimiter",
    "ThreadActivity",
    "message_thread_id",
    "parse_json_reply",
    "remove_attachment_dir",
    "thread_id_from_root",
    "thread_lookup_ids",
    "thread_root",
    "write_attachments",
]
