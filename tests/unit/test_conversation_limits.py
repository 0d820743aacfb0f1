"""The per-sender token bucket: bursts answered, volume deferred, state persisted."""

from __future__ import annotations

import json

import pytest

from prxmail.conversation import DEFAULT_BURST, SenderRateLimiter


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def drain(limiter: SenderRateLimiter, clock: FakeClock, sender: str, count: int) -> list[float]:
    """Hand ``count`` messages through, waiting out each deferral; their times."""
    times = []
    for _ in range(count):
        retry = limiter.admit(sender)
        while retry is not None:
            assert retry > clock.now
            clock.now = retry
            retry = limiter.admit(sender)
        times.append(clock.now)
    return times


def test_defaults_answer_a_30_message_burst_at_once() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock)
    start = clock.now
    times = drain(limiter, clock, "alice@example.com", 30)
    assert times[-1] - start < 120  # "within a couple of minutes": here, at once
    assert times[-1] == start


def test_defaults_keep_a_long_thread_flowing_after_a_burst() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock)
    drain(limiter, clock, "alice@example.com", 30)
    # Then 25 rounds within the hour, one every 2.4 minutes: never deferred.
    for _ in range(25):
        clock.now += 144
        assert limiter.admit("alice@example.com") is None


def test_over_the_burst_messages_are_deferred_to_the_sustained_pace() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(clock=clock)
    times = drain(limiter, clock, "bot@example.com", DEFAULT_BURST + 5)
    gaps = [b - a for a, b in zip(times[DEFAULT_BURST - 1 :], times[DEFAULT_BURST:], strict=False)]
    assert gaps == pytest.approx([60.0] * 5)  # 60 an hour


def test_a_deferral_counts_nothing() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(1, 60.0, burst=1, clock=clock)
    assert limiter.admit("a@x") is None
    first = limiter.admit("a@x")
    for _ in range(50):
        assert limiter.admit("a@x") == first
    assert first is not None
    clock.now = first
    assert limiter.admit("a@x") is None


def test_state_survives_a_restart_and_refills_over_the_downtime() -> None:
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    limiter = SenderRateLimiter(60, 3600.0, burst=40, clock=clock)
    drain(limiter, clock, "Alice@Example.com", 40)
    assert limiter.admit("alice@example.com") is not None
    state = json.loads(json.dumps(limiter.to_state(wall_clock=wall)))
    assert set(state["senders"]) == {"alice@example.com"}
    # Restarted at once, on a new monotonic clock: still empty.
    fresh = SenderRateLimiter.from_state(
        state, 60, 3600.0, burst=40, clock=FakeClock(3.0), wall_clock=wall
    )
    assert fresh.admit("alice@example.com") is not None
    assert fresh.admit("bob@example.com") is None
    # Restarted five minutes later: five tokens came back meanwhile.
    wall.now += 300
    later_clock = FakeClock(7.0)
    later = SenderRateLimiter.from_state(
        state, 60, 3600.0, burst=40, clock=later_clock, wall_clock=wall
    )
    assert [later.admit("alice@example.com") is None for _ in range(6)] == [True] * 5 + [False]


def test_a_wall_clock_that_went_back_refills_nothing() -> None:
    clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
    limiter = SenderRateLimiter(60, 3600.0, burst=2, clock=clock)
    drain(limiter, clock, "a@x", 2)
    state = limiter.to_state(wall_clock=wall)
    wall.now -= 10_000
    again = SenderRateLimiter.from_state(state, 60, 3600.0, burst=2, clock=clock, wall_clock=wall)
    assert again.admit("a@x") is not None


def test_full_buckets_are_not_saved_and_loading_is_bounded() -> None:
    clock = FakeClock()
    limiter = SenderRateLimiter(60, 3600.0, burst=5, max_senders=3, clock=clock)
    limiter.admit("a@x")
    clock.now += 3600
    assert limiter.to_state()["senders"] == {}
    state = {"v": 1, "saved_at": 0.0, "senders": {f"s{n}@x": n / 10 for n in range(10)}}
    limiter.load_state(state, wall_clock=lambda: 0.0)
    assert limiter.statistics().tracked_senders == 3
    # The emptiest buckets were kept.
    assert limiter.admit("s0@x") is not None
    assert limiter.admit("s9@x") is None


@pytest.mark.parametrize(
    "state",
    [
        {"v": 2, "saved_at": 0, "senders": {}},
        {"v": 1, "saved_at": "now", "senders": {}},
        {"v": 1, "saved_at": 0, "senders": []},
        [],
    ],
)
def test_malformed_state_is_refused(state: object) -> None:
    with pytest.raises(ValueError, match="malformed rate limiter state"):
        SenderRateLimiter().load_state(state)  # type: ignore[arg-type]


def test_bad_entries_in_state_are_skipped() -> None:
    limiter = SenderRateLimiter(burst=2)
    limiter.load_state(
        {"v": 1, "saved_at": 0, "senders": {"a@x": "zero", "b@x": float("nan"), "c@x": True}},
        wall_clock=lambda: 0.0,
    )
    assert limiter.statistics().tracked_senders == 0
