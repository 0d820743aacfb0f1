"""The heartbeat loops' shared poll timer (prxmail/channel/_core.py, _poll_tick)."""

from __future__ import annotations

import trio
import trio.testing

from prxmail.channel._core import OPERATOR_POLL_SECONDS, _poll_tick


async def test_every_channel_s_poll_wakes_on_one_shared_grid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 50 heartbeat loops started at staggered times: with a timer each they would wake
    # at 50 different moments a second (a deadline expiry each); on the shared grid
    # they all wake together, at whole multiples of the poll interval, and never wait
    # longer than one interval.
    woken: list[list[float]] = [[] for _ in range(50)]

    async def loop(index: int) -> None:
        await trio.sleep(index * 0.013)
        for _ in range(3):
            before = trio.current_time()
            await _poll_tick()
            now = trio.current_time()
            assert 0 < now - before <= OPERATOR_POLL_SECONDS
            woken[index].append(now)

    async with trio.open_nursery() as nursery:
        for index in range(len(woken)):
            nursery.start_soon(loop, index)
    moments = {round(t, 9) for times in woken for t in times}
    assert all(len(times) == 3 for times in woken)
    assert all(
        abs(m / OPERATOR_POLL_SECONDS - round(m / OPERATOR_POLL_SECONDS)) < 1e-9 for m in moments
    )
    assert len(moments) <= 4, sorted(moments)


async def test_a_cancelled_sleeper_does_not_strand_the_others(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The clock is frozen: a parked waiter can only return because the task sleeping
    # for all of them was cancelled and woke it (it then polls once early).
    done: list[str] = []
    sleeper = trio.CancelScope()

    async def cancelled_sleeper() -> None:
        with sleeper:
            await _poll_tick()

    async def waiter() -> None:
        await _poll_tick()
        done.append("woken")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_sleeper)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        sleeper.cancel()
    assert done == ["woken"]
