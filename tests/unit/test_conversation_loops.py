"""The per-thread loop guard: people are never held, instant automatons are."""

from __future__ import annotations

import json

import pytest

from prxmail.conversation import (
    FAST_STREAK_TO_HOLD,
    MAX_REPLIES_PER_WINDOW,
    SLOW_DOWN_SECS,
    Defer,
    Hold,
    LoopDecision,
    LoopGuard,
    Proceed,
    ThreadActivity,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Thread:
    """One thread's record driven as the channel will drive it."""

    def __init__(self, guard: LoopGuard) -> None:
        self.guard = guard
        self.activity = ThreadActivity()
        self.replies = 0

    def incoming(self) -> LoopDecision:
        decision, self.activity = self.guard.check(self.activity)
        return decision

    def reply(self) -> None:
        self.activity = self.guard.note_reply(self.activity)
        self.replies += 1


def run_conversation(clock: FakeClock, thread: Thread, answer_delay: float, rounds: int) -> int:
    """The other side answers each reply after ``answer_delay``; deferrals are
    waited out. Returns the replies sent before a hold (or all of them)."""
    for _ in range(rounds):
        decision = thread.incoming()
        while isinstance(decision, Defer):
            assert decision.until > clock.now
            clock.now = decision.until
            decision = thread.guard.decide(thread.activity)
        if isinstance(decision, Hold):
            return thread.replies
        assert isinstance(decision, Proceed)
        clock.now += 0.5  # the handler's time
        thread.reply()
        clock.now += answer_delay
    return thread.replies


@pytest.mark.parametrize("answer_delay", [30.0, 60.0, 140.0])
def test_a_person_answering_for_25_rounds_within_an_hour_is_never_held(
    answer_delay: float,
) -> None:
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    start = clock.now
    assert run_conversation(clock, thread, answer_delay, 26) == 26
    assert clock.now - start < 3600 + 140
    assert thread.activity.held is None


def test_a_person_with_a_few_quick_answers_is_not_even_slowed() -> None:
    clock = FakeClock()
    guard = LoopGuard(clock=clock)
    thread = Thread(guard)
    for delay in [5.0, 8.0, 90.0] * 10:  # two quick "thanks" then a real answer
        assert isinstance(thread.incoming(), Proceed)
        thread.reply()
        clock.now += delay
    assert thread.activity.held is None


def test_an_instant_automaton_is_held_early_on_strong_evidence() -> None:
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    sent = run_conversation(clock, thread, answer_delay=1.5, rounds=500)
    assert sent == FAST_STREAK_TO_HOLD
    assert thread.activity.held is not None
    assert "answers in a row" in thread.activity.held
    # Held stays held, whatever comes next.
    clock.now += 10_000
    assert isinstance(thread.incoming(), Hold)


def test_a_suspected_loop_is_slowed_down_before_it_is_held() -> None:
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    deferrals = []
    for _ in range(FAST_STREAK_TO_HOLD):
        decision = thread.incoming()
        if isinstance(decision, Defer):
            deferrals.append(decision)
            assert decision.until == pytest.approx(thread.activity.reply_times[-1] + SLOW_DOWN_SECS)
            clock.now = decision.until
        if isinstance(decision, Hold):
            break
        thread.reply()
        clock.now += 1.0
    assert len(deferrals) >= 3


def test_a_patient_automaton_is_held_at_the_reply_cap() -> None:
    # Answers after 20 s each: never "fast", so only the 50-per-day cap stops it.
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    assert run_conversation(clock, thread, answer_delay=20.0, rounds=500) == MAX_REPLIES_PER_WINDOW
    assert thread.activity.held is not None
    assert "50 replies" in thread.activity.held


def test_the_cap_is_per_day_not_forever() -> None:
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    assert run_conversation(clock, thread, answer_delay=3600.0, rounds=60) == 60


def test_a_held_thread_does_not_affect_other_threads() -> None:
    clock = FakeClock()
    guard = LoopGuard(clock=clock)
    looping = Thread(guard)
    run_conversation(clock, looping, answer_delay=1.0, rounds=100)
    assert looping.activity.held is not None
    fresh = Thread(guard)
    assert isinstance(fresh.incoming(), Proceed)


def test_only_the_first_message_after_our_reply_is_an_answer() -> None:
    clock = FakeClock()
    guard = LoopGuard(clock=clock)
    activity = guard.note_reply(ThreadActivity())
    clock.now += 2
    activity = guard.note_incoming(activity)
    assert activity.fast_streak == 1
    clock.now += 1
    again = guard.note_incoming(activity)  # a second message, or a deferred one re-checked
    assert again == activity


def test_check_records_the_hold_once() -> None:
    clock = FakeClock()
    guard = LoopGuard(clock=clock)
    thread = Thread(guard)
    run_conversation(clock, thread, answer_delay=1.0, rounds=100)
    reason = thread.activity.held
    assert reason is not None
    decision, again = guard.check(thread.activity)
    assert decision == Hold(reason)
    assert again == thread.activity


def test_release_clears_the_hold_and_the_evidence() -> None:
    clock = FakeClock()
    guard = LoopGuard(clock=clock)
    thread = Thread(guard)
    run_conversation(clock, thread, answer_delay=1.0, rounds=100)
    released = guard.release(thread.activity)
    assert released.held is None
    assert released.replies == thread.replies
    assert isinstance(guard.decide(released), Proceed)


def test_activity_round_trips_through_json() -> None:
    clock = FakeClock()
    thread = Thread(LoopGuard(clock=clock))
    run_conversation(clock, thread, answer_delay=2.0, rounds=100)
    state = json.loads(json.dumps(thread.activity.to_state()))
    assert ThreadActivity.from_state(state) == thread.activity


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"replies": -1},
        {"replies": True},
        {"fast_streak": "3"},
        {"held": 5},
        {"awaiting_answer": "yes"},
        {"reply_times": "1,2"},
        {"answer_delays": [1, "x"]},
    ],
)
def test_malformed_state_is_refused(change: dict[str, object]) -> None:
    state = ThreadActivity().to_state()
    state.update(change)
    with pytest.raises(ValueError, match="malformed thread activity"):
        ThreadActivity.from_state(state)


def test_state_lists_are_cut_to_their_bounds() -> None:
    state = ThreadActivity().to_state()
    state["reply_times"] = list(range(10_000))
    activity = ThreadActivity.from_state(state)
    assert len(activity.reply_times) == MAX_REPLIES_PER_WINDOW
    assert activity.reply_times[-1] == 9_999.0


def test_configured_thresholds_replace_the_defaults() -> None:
    now = [1000.0]
    guard = LoopGuard(clock=lambda: now[0], fast_answer_secs=1, slow_down_secs=2)
    activity = ThreadActivity()
    for _ in range(3):
        activity = guard.note_reply(activity)
        now[0] += 1.5  # slower than the configured 1 s: a person
        decision, activity = guard.check(activity)
        assert isinstance(decision, Proceed)
    assert activity.fast_streak == 0
    for _ in range(3):
        activity = guard.note_reply(activity)
        now[0] += 0.5
        decision, activity = guard.check(activity)
    assert isinstance(decision, Defer)
    assert decision.until == activity.reply_times[-1] + 2
