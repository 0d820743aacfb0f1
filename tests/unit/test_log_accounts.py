"""Every log line of an account's work carries ``account=`` (issue 14)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel

from prxmail._log import (
    account_context,
    current_account,
    get_logger,
    log_event,
    setup_logging,
)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    ours = get_logger()
    saved = (list(root.handlers), list(ours.handlers), ours.level, ours.propagate)
    out = io.StringIO()
    setup_logging("json", stream=out)
    yield out
    setup_logging("human", stream=io.StringIO())
    root.handlers[:] = saved[0]
    ours.handlers[:] = saved[1]
    ours.setLevel(saved[2])
    ours.propagate = saved[3]


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lines_inside_an_account_context_name_the_account_first(json_log: io.StringIO) -> None:
    log_event(logging.INFO, "outside")
    with account_context("sales"):
        log_event(logging.INFO, "inside", uid=7)
        with account_context("support"):
            log_event(logging.INFO, "nested")
        log_event(logging.INFO, "back")
    log_event(logging.INFO, "after")
    events = lines(json_log)
    assert [e.get("account") for e in events] == [None, "sales", "support", "sales", None]
    assert list(events[1])[3:] == ["account", "uid"]
    assert current_account() is None


def test_an_explicit_account_field_wins(json_log: io.StringIO) -> None:
    with account_context("sales"):
        log_event(logging.INFO, "x", account="other")
    (event,) = lines(json_log)
    assert event["account"] == "other"


def test_foreign_records_and_the_human_format_carry_the_account() -> None:
    out = io.StringIO()
    setup_logging("human", stream=out)
    try:
        with account_context("ops"):
            logging.getLogger("some.library").warning("library says")
            get_logger().error("plain record")
    finally:
        setup_logging("human", stream=io.StringIO())
    first, second = out.getvalue().splitlines()
    assert "library says account=ops logger=some.library" in first
    assert second.endswith("plain record account=ops")


async def test_tasks_and_threads_started_for_an_account_inherit_it(
    json_log: io.StringIO,
) -> None:
    async def task(event: str) -> None:
        await trio.lowlevel.checkpoint()
        log_event(logging.INFO, event)

    async with trio.open_nursery() as nursery:
        for name in ("a", "b"):
            with account_context(name):
                nursery.start_soon(task, f"task {name}")
                await trio.to_thread.run_sync(log_event, logging.INFO, f"thread {name}")
    by_event = {e["event"]: e.get("account") for e in lines(json_log)}
    assert by_event == {"thread a": "a", "thread b": "b", "task a": "a", "task b": "b"}
