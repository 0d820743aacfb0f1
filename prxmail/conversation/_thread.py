"""Thread identity: one short, stable ``thread_id`` per conversation.

Theory of operation. A conversation is named after its root: the first Message-ID
of References (RFC 5322 3.6.4: a writer keeps the root when it trims the list, and
so do our replies, see :func:`prxmail.compose.thread_references`), else the
In-Reply-To id, else the message's own Message-ID (it starts a thread). The id is
normalised with :func:`prxmail.state.normalize_message_id` and hashed:
``thread_id`` is the first :data:`THREAD_ID_HEX_CHARS` hex digits of its SHA-256.
That makes it opaque (it reveals no address or host), short enough for a log line
or a file name, the same on every host and across restarts, and it needs no state.

Two things a pure hash of the root cannot see are covered by an optional lookup
of the threads already known (the state store's record of messages seen and
sent), consulted before the hash:

* our own replies belong to the thread of their parent, also when the parent had
  no usable Message-ID (our reply then carries no References of it);
* a client that drops the root from References (some trim from the front) still
  lands in the thread when any id it does name is a message we know.

The lookup is asked about the In-Reply-To id first (the parent decides), then
References from the newest back, at most :data:`MAX_THREAD_LOOKUPS` ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from prxmail.message import Message
from prxmail.state import normalize_message_id

__all__ = [
    "MAX_THREAD_LOOKUPS",
    "THREAD_ID_HEX_CHARS",
    "KnownThread",
    "message_thread_id",
    "thread_id_from_root",
    "thread_lookup_ids",
    "thread_root",
]

# 16 hex digits = 64 bits: a collision between two conversations of one mailbox
# is a birthday problem needing ~4 billion threads for even odds, while the id
# stays short enough to read in a log line and to use as a file or session name.
THREAD_ID_HEX_CHARS = 16

# Ids of one message asked of the known-thread lookup. Our replies write at most
# 20 References (prxmail.compose.MAX_REFERENCES); a few more cover other writers,
# and the bound keeps a hostile References header (the model keeps up to 100)
# from turning into a hundred store lookups.
MAX_THREAD_LOOKUPS = 25

#: Given a normalised Message-ID, the ``thread_id`` recorded for it, or None.
KnownThread = Callable[[str], "str | None"]


def _normalised(message_id: str | None) -> str | None:
    if not message_id:
        return None
    try:
        return normalize_message_id(message_id)
    except ValueError:
        return None


def thread_root(message: Message) -> str:
    """The normalised Message-ID a message's thread is named after.

    Args:
        message: A received (or composed and re-parsed) message.

    Returns:
        The first usable References id, else In-Reply-To, else the message's own
        Message-ID (a substitute one when it had none).
    """
    for candidate in (*message.references[:1], message.in_reply_to, message.message_id):
        root = _normalised(candidate)
        if root is not None:
            return root
    # Message.message_id is never empty (a substitute is made when missing), but
    # a hand-built Message may hold garbage: it is still one stable thread.
    return normalize_message_id(repr(message.message_id))


def thread_id_from_root(root: str) -> str:
    """The ``thread_id`` of the thread named after ``root``.

    Args:
        root: A Message-ID, in any bracket form.

    Returns:
        :data:`THREAD_ID_HEX_CHARS` lower-case hex digits.

    Raises:
        ValueError: ``root`` is empty.
    """
    digest = hashlib.sha256(normalize_message_id(root).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:THREAD_ID_HEX_CHARS]


def thread_lookup_ids(message: Message) -> tuple[str, ...]:
    """The normalised ids :func:`message_thread_id` asks its lookup about, in order.

    For the state store to fetch in one query before calling
    :func:`message_thread_id` with a dict's ``get``.

    Args:
        message: The message.

    Returns:
        In-Reply-To, then References newest first; deduplicated, at most
        :data:`MAX_THREAD_LOOKUPS`.
    """

    def candidates() -> Iterator[str]:
        for raw in (message.in_reply_to, *reversed(message.references)):
            ident = _normalised(raw)
            if ident is not None:
                yield ident

    found: dict[str, None] = {}
    for ident in candidates():
        found.setdefault(ident)
        if len(found) >= MAX_THREAD_LOOKUPS:
            break
    return tuple(found)


def message_thread_id(message: Message, *, known: KnownThread | None = None) -> str:
    """The ``thread_id`` of a received message.

    Args:
        message: The message.
        known: Looks up the thread of a message already seen or sent (normalised
            Message-ID in, ``thread_id`` or None out); None when nothing is known.

    Returns:
        The thread of the first known id among :func:`thread_lookup_ids`, else the
        hash of :func:`thread_root`.
    """
    if known is not None:
        for ident in thread_lookup_ids(message):
            thread = known(ident)
            if thread:
                return thread
    return thread_id_from_root(thread_root(message))
