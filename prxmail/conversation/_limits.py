"""The per-sender volume limit: a token bucket that defers, never rejects.

Theory of operation. Every sender has a bucket of at most ``burst`` tokens, full
at first; each message handed on takes one, and tokens flow back at ``rate``
tokens per ``window_secs``. A message that finds the bucket empty is not refused:
:meth:`SenderRateLimiter.admit` says when the next token arrives, and the caller
keeps the message (unseen, durably) and asks again then. So a burst is answered at
once up to ``burst``, and beyond it at the sustained pace; nothing is dropped.

The defaults are chosen against issue 12's two scenarios:

* 30 messages from one person in new threads within a minute are all answered
  promptly: :data:`DEFAULT_BURST` = 40 covers them at once, with 10 to spare for
  that person's other mail of the moment.
* A 25-round thread within an hour (one message per ~2.4 minutes), even right
  after such a burst: :data:`DEFAULT_RATE` = 60 per hour refills a token a minute,
  faster than any person writes, so the thread never waits.

What the limit is for is volume from one address that is not a conversation (a
runaway script on an allowed address, mail that starts a new thread every time):
after 40 at once it gets one answer a minute. Loops inside one thread are the
per-thread loop guard's job (:mod:`._loops`), which stops them much sooner.

The bucket state is plain data (:meth:`SenderRateLimiter.to_state`), so the state
store can keep it across restarts; the running limiter uses any monotonic clock,
and the saved state records the wall-clock time of the snapshot so that tokens
refill over the downtime as well.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_TRACKED_SENDERS",
    "DEFAULT_RATE",
    "DEFAULT_WINDOW_SECS",
    "RateLimiterStatistics",
    "SenderRateLimiter",
]

# Messages one sender may have handed on at once: issue 12's 30-message burst,
# plus 10 for whatever else that person sends in the same minute.
DEFAULT_BURST: Final = 40

# The sustained pace: 60 per DEFAULT_WINDOW_SECS (one a minute). A person's
# fastest back-and-forth (25 rounds an hour) is well inside it.
DEFAULT_RATE: Final = 60
DEFAULT_WINDOW_SECS: Final = 3600.0

# The limiter forgets the least recently active sender beyond this many. Each
# tracked sender costs about a hundred bytes; a flood from forged addresses must
# not grow memory without bound. Forgetting a sender gives it a full bucket, which
# only ever lets its mail through sooner, never later.
DEFAULT_MAX_TRACKED_SENDERS: Final = 10_000

_STATE_VERSION: Final = 1


@attrs.frozen
class RateLimiterStatistics:
    """A snapshot of a rate limiter.

    Attributes:
        tracked_senders: Senders currently remembered (buckets not full).
        max_tracked_senders: The cap on that number.
        evicted_senders: Senders forgotten early because the cap was reached.
    """

    tracked_senders: int
    max_tracked_senders: int
    evicted_senders: int


def _sender_key(sender: str) -> str:
    """One comparable form of an address: trimmed, brackets off, lower-cased."""
    value = sender.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value.lower()


def _malformed(detail: str) -> ValueError:
    # One exception type for the store to catch, whatever field is off.
    return ValueError(f"malformed rate limiter state: {detail}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class SenderRateLimiter:
    """At most ``burst`` at once and ``rate`` per ``window_secs`` per sender.

    Memory is bounded: senders whose bucket is full again are forgotten as they
    are met, and at most ``max_senders`` are remembered (beyond that the least
    recently active is forgotten, which only makes the limiter more permissive
    for it).

    Not thread-safe; use it from one task (it never blocks).
    """

    def __init__(
        self,
        rate: int = DEFAULT_RATE,
        window_secs: float = DEFAULT_WINDOW_SECS,
        *,
        burst: int | None = DEFAULT_BURST,
        max_senders: int = DEFAULT_MAX_TRACKED_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a limiter.

        Args:
            rate: Messages per sender per window, sustained (>= 1).
            window_secs: The window length in seconds (> 0).
            burst: Messages a sender may have at once (>= 1); None means ``rate``
                (a whole window's allowance at once).
            max_senders: How many senders are remembered at most (>= 1).
            clock: Monotonic seconds; inject ``trio.current_time`` or a fake.

        Raises:
            ValueError: A bound is out of range.
        """
        self._rate = _positive_int("rate", rate)
        if isinstance(window_secs, bool) or not (
            isinstance(window_secs, int | float) and math.isfinite(window_secs) and window_secs > 0
        ):
            raise ValueError(f"window_secs must be a finite number > 0, got {window_secs!r}")
        self._burst = float(_positive_int("burst", rate if burst is None else burst))
        self._max_senders = _positive_int("max_senders", max_senders)
        self._window = float(window_secs)
        self._per_second = self._rate / self._window
        self._clock = clock
        # sender -> (tokens, clock time they were counted); least recently active
        # first, so eviction candidates are at the front.
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._evicted = 0

    @property
    def burst(self) -> int:
        """Messages a sender may have at once."""
        return int(self._burst)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self._burst
        tokens, then = entry
        return min(self._burst, tokens + max(now - then, 0.0) * self._per_second)

    def _ready_at(self, tokens: float, now: float) -> float:
        return now + (1.0 - tokens) / self._per_second

    def next_allowed(self, sender: str) -> float | None:
        """When :meth:`admit` would let ``sender`` through, without taking anything.

        Args:
            sender: The sender address (case-insensitive).

        Returns:
            None when it would now; else the clock time a token is back.
        """
        now = self._clock()
        tokens = self._tokens(_sender_key(sender), now)
        return None if tokens >= 1.0 else self._ready_at(tokens, now)

    def admit(self, sender: str) -> float | None:
        """Take a token for a message from ``sender``, if there is one.

        Args:
            sender: The sender address (case-insensitive).

        Returns:
            None when admitted (the message is counted). Otherwise the clock time
            at which to ask again; nothing is counted, and the message must be
            kept and handed on then -- never dropped.
        """
        now = self._clock()
        key = _sender_key(sender)
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return self._ready_at(tokens, now)
        if key not in self._buckets:
            self._forget_full(now)
            while len(self._buckets) >= self._max_senders:
                self._buckets.popitem(last=False)
                self._evicted += 1
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        return None

    def allow(self, sender: str) -> bool:
        """:meth:`admit` as a boolean (True = admitted and counted)."""
        return self.admit(sender) is None

    def would_allow(self, sender: str) -> bool:
        """Whether :meth:`admit` would succeed now, without recording anything."""
        return self.next_allowed(sender) is None

    def _forget_full(self, now: float) -> None:
        # A bucket refills completely (burst / per_second) seconds after it was
        # last counted; such senders are equivalent to unknown ones. The front is
        # the least recently counted, so the scan stops at the first live one.
        while self._buckets:
            _, (tokens, then) = next(iter(self._buckets.items()))
            if tokens + (now - then) * self._per_second < self._burst:
                break
            self._buckets.popitem(last=False)

    def statistics(self) -> RateLimiterStatistics:
        """A snapshot of the limiter's memory use."""
        return RateLimiterStatistics(
            tracked_senders=len(self._buckets),
            max_tracked_senders=self._max_senders,
            evicted_senders=self._evicted,
        )

    def to_state(self, *, wall_clock: Callable[[], float] = time.time) -> dict[str, Any]:
        """The buckets as JSON-serialisable plain data, for the state store.

        Args:
            wall_clock: Wall-clock seconds, recorded so that :meth:`from_state`
                can refill the buckets for the time in between.

        Returns:
            ``{"v": 1, "saved_at": <wall seconds>, "senders": {addr: tokens}}``,
            only senders whose bucket is not full.
        """
        now = self._clock()
        senders = {}
        for key in self._buckets:
            tokens = self._tokens(key, now)
            if tokens < self._burst:
                senders[key] = tokens
        return {"v": _STATE_VERSION, "saved_at": float(wall_clock()), "senders": senders}

    def load_state(
        self, state: Mapping[str, Any], *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        """Replace the buckets by those saved with :meth:`to_state`.

        Tokens flow back for the wall-clock time since the snapshot (none when
        the clock went backwards); at most ``max_senders`` are kept, the emptiest
        last. Entries that are not address -> number are skipped.

        Args:
            state: The plain data.
            wall_clock: Wall-clock seconds.

        Raises:
            ValueError: ``state`` is not such a snapshot (version, types).
        """
        if not isinstance(state, Mapping) or state.get("v") != _STATE_VERSION:
            raise _malformed("not a snapshot of a known version")
        saved_at, senders = state.get("saved_at"), state.get("senders")
        if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
            raise _malformed("saved_at must be a number")
        if not isinstance(senders, Mapping):
            raise _malformed("senders must be a mapping")
        elapsed = max(float(wall_clock()) - float(saved_at), 0.0)
        now = self._clock()
        loaded: list[tuple[float, str]] = []
        for key, tokens in senders.items():
            if not isinstance(key, str) or isinstance(tokens, bool):
                continue
            if not isinstance(tokens, int | float) or not math.isfinite(tokens):
                continue
            refilled = min(self._burst, max(float(tokens), 0.0) + elapsed * self._per_second)
            if refilled < self._burst:
                loaded.append((refilled, _sender_key(key)))
        # Keep the emptiest buckets when over the cap: forgetting a full-ish one
        # costs the least. They go in fullest first (the front is evicted first).
        loaded.sort(reverse=True)
        self._buckets.clear()
        for tokens, key in loaded[-self._max_senders :]:
            self._buckets[key] = (tokens, now)

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        rate: int = DEFAULT_RATE,
        window_secs: float = DEFAULT_WINDOW_SECS,
        *,
        burst: int | None = DEFAULT_BURST,
        max_senders: int = DEFAULT_MAX_TRACKED_SENDERS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> SenderRateLimiter:
        """A limiter with the given settings and the buckets of a snapshot.

        Args:
            state: :meth:`to_state` output.
            rate: See :class:`SenderRateLimiter`.
            window_secs: See :class:`SenderRateLimiter`.
            burst: See :class:`SenderRateLimiter`.
            max_senders: See :class:`SenderRateLimiter`.
            clock: See :class:`SenderRateLimiter`.
            wall_clock: See :meth:`load_state`.

        Returns:
            The limiter.

        Raises:
            ValueError: A bound is out of range or the snapshot is malformed.
        """
        limiter = cls(rate, window_secs, burst=burst, max_senders=max_senders, clock=clock)
        limiter.load_state(state, wall_clock=wall_clock)
        return limiter
