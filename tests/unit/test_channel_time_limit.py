"""The channel's timeouts say what timed out and which setting bounds it (issue 11 item 21)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from prxmail.channel._core import _COMMAND_TIMEOUT, _time_limit


async def test_a_timeout_names_the_step_the_limit_and_the_setting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(trio.TooSlowError) as info, _time_limit(30, "SMTP send", _COMMAND_TIMEOUT):
        await trio.sleep(31)
    assert str(info.value) == "SMTP send timed out after 30 s (command_timeout_secs)"


async def test_a_nested_limit_keeps_its_own_text(autojump_clock: trio.testing.MockClock) -> None:
    with (
        pytest.raises(trio.TooSlowError) as info,
        _time_limit(60, "outer", "outer_secs"),
        _time_limit(5, "inner", "inner_secs"),
    ):
        await trio.sleep(10)
    assert str(info.value) == "inner timed out after 5 s (inner_secs)"


async def test_no_timeout_no_error(autojump_clock: trio.testing.MockClock) -> None:
    with _time_limit(5, "quick", "quick_secs"):
        await trio.sleep(1)
