"""Several accounts in one process: the shared store, the runner, ``prxmail serve`` (issue 14)."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from prxmail._log import get_logger, setup_logging
from prxmail.channel import MailChannel, open_mail_channels
from prxmail.config import Config, parse_accounts
from prxmail.errors import LocalProtocolError
from prxmail.service import accounts_handler_environment, serve_mail_channels
from prxmail.state import OutboxDraft, RetryPolicy, StateStore, account_key

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SALES = account_key("sales@example.com", "imap.example.com", 993)
SUPPORT = account_key("support@example.com", "imap.example.com", 993)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accounts_text(state_dir: Path, *, sales_exec: str = "", support_exec: str = "") -> str:
    port = closed_port()
    return "\n".join(
        [
            "[channels_config.email]",
            'imap_host = "127.0.0.1"',
            f"imap_port = {port}",
            'imap_security = "plain"',
            'smtp_host = "127.0.0.1"',
            f"smtp_port = {port}",
            'smtp_security = "plain"',
            'username = "support@example.com"',
            'password_env = "SUPPORT_PW"',
            'from_address = "support@example.com"',
            'allowed_senders = ["alice@example.com"]',
            f'state_dir = "{state_dir}"',
            support_exec,
            "[channels_config.email.accounts.sales]",
            'username = "sales@example.com"',
            'password_env = "SALES_PW"',
            'from_address = "sales@example.com"',
            sales_exec,
            "",
        ]
    )


ENV = {"SUPPORT_PW": "support-secret-pw", "SALES_PW": "sales-secret-pw", "HOME": "/h"}


def configs(tmp_path: Path) -> tuple[Config, ...]:
    return parse_accounts(accounts_text(tmp_path / "state"), environ=ENV)


# -- the shared store ----------------------------------------------------------------------


def draft(n: int) -> OutboxDraft:
    return OutboxDraft(f"r{n}@bot.example.com", "bot@example.com", ["a@example.com"], b"raw")


def test_each_account_sends_only_its_own_outbox(tmp_path: Path) -> None:
    with StateStore(tmp_path / "state") as store:
        sales = store.enqueue(SALES, draft(1))
        support = store.enqueue(SUPPORT, draft(2))
        assert [i.id for i in store.due_outbox(account=SALES)] == [sales.id]
        assert [i.id for i in store.due_outbox(account=SUPPORT)] == [support.id]
        assert {i.id for i in store.due_outbox()} == {sales.id, support.id}
        later = store.mark_transient_failure(support.id, "421 later")
        assert store.next_due_at(account=SUPPORT) == later.next_attempt_at
        assert store.next_due_at(account=SALES) == sales.next_attempt_at
        assert store.next_due_at(account="nobody@x:1") is None


def test_a_retry_follows_the_accounts_own_backoff(tmp_path: Path) -> None:
    clock = lambda: 1000.0  # noqa: E731 - a frozen wall clock
    store_policy = RetryPolicy(initial_delay=3600.0, max_delay=3600.0, jitter=0.0)
    with StateStore(tmp_path / "state", retry_policy=store_policy, clock=clock) as store:
        item = store.enqueue(SALES, draft(1))
        own = RetryPolicy(initial_delay=5.0, max_delay=5.0, jitter=0.0)
        assert store.mark_transient_failure(item.id, "421", policy=own).next_attempt_at == 1005.0
        assert store.mark_transient_failure(item.id, "421").next_attempt_at == 4600.0
        dying = RetryPolicy(initial_delay=5.0, max_delay=5.0, max_attempts=3, jitter=0.0)
        gone = store.mark_transient_failure(item.id, "421", policy=dying)
        assert gone.status.value == "failed_permanent"


# -- the runner ----------------------------------------------------------------------------


def test_no_handler_sees_any_accounts_password(tmp_path: Path) -> None:
    environ = {**ENV, "OTHER": "x", "URL": "imap://u:sales-secret-pw@h"}
    env = accounts_handler_environment(configs(tmp_path), environ)
    assert env == {"HOME": "/h", "OTHER": "x"}


async def test_the_runner_refuses_accounts_it_cannot_run_apart(tmp_path: Path) -> None:
    main, sales = configs(tmp_path)
    argv = {"default": ["true"], "sales": ["true"]}
    with pytest.raises(LocalProtocolError, match="no account"):
        await serve_mail_channels((), exec_commands=argv)
    with pytest.raises(LocalProtocolError, match="unique"):
        await serve_mail_channels((main, attrs.evolve(sales, name="default")), exec_commands=argv)
    with pytest.raises(LocalProtocolError, match="state directory"):
        await serve_mail_channels(
            (main, attrs.evolve(sales, state_dir=tmp_path / "other")), exec_commands=argv
        )
    with pytest.raises(LocalProtocolError, match="'sales' has no handler"):
        await serve_mail_channels((main, sales), exec_commands={"default": ["true"]})
    with pytest.raises(LocalProtocolError, match="state directory"):
        async with open_mail_channels((main, attrs.evolve(sales, state_dir=tmp_path / "x"))):
            pass


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


async def test_an_account_that_cannot_open_leaves_the_others_serving(
    tmp_path: Path, json_log: io.StringIO
) -> None:
    main, sales = configs(tmp_path)
    # Its CA file vanished after the configuration was checked: that channel cannot open.
    broken = attrs.evolve(sales, tls_ca_file=tmp_path / "gone.pem")
    argv = {"default": ["true"], "sales": ["true"]}
    async with trio.open_nursery() as nursery:
        channels: dict[str, MailChannel] = await nursery.start(
            lambda task_status: serve_mail_channels(
                (main, broken), exec_commands=argv, task_status=task_status
            )
        )
        assert list(channels) == ["default"]
        # The open one keeps running (retrying its closed IMAP port) until cancelled.
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    events = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failed = [e for e in events if e["event"] == "account could not start"]
    assert [e["account"] for e in failed] == ["sales"]
    assert "gone.pem" in failed[0]["error"]
    serving = [e["account"] for e in events if e["event"] == "prxmail serving"]
    assert serving == ["default"]
    # The open account's own lines (its connection retries) name it too.
    assert any(e.get("account") == "default" and e["level"] == "warning" for e in events)


async def test_when_no_account_can_open_the_runner_raises(tmp_path: Path) -> None:
    main, sales = configs(tmp_path)
    gone = tmp_path / "gone.pem"
    with pytest.raises(FileNotFoundError):
        await serve_mail_channels(
            (attrs.evolve(main, tls_ca_file=gone), attrs.evolve(sales, tls_ca_file=gone)),
            exec_commands={"default": ["true"], "sales": ["true"]},
        )


async def test_open_mail_channels_opens_every_account_on_one_store(tmp_path: Path) -> None:
    async with open_mail_channels(configs(tmp_path), rng=random.Random(1)) as channels:
        assert list(channels) == ["default", "sales"]
        assert channels["default"].account != channels["sales"].account
        assert channels["default"]._store is channels["sales"]._store


# -- prxmail serve ---------------------------------------------------------------------------


def serve(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "prxmail", "serve", "-c", str(config), "--log-format", "json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
    )


def test_serve_leaves_out_an_account_without_a_handler_and_runs_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "prxmail.toml"
    config.write_text(
        accounts_text(
            tmp_path / "state",
            support_exec=f'exec = "{sys.executable} -c pass"',
            sales_exec='exec = "/nonexistent/sales-bot"',
        )
    )
    with serve(config) as proc:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(json.loads(line))
            if seen[-1]["event"] == "prxmail serving":
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0
    events = seen + [json.loads(line) for line in rest.splitlines()]
    (left_out,) = [e for e in events if e["event"] == "account not started"]
    assert left_out["account"] == "sales"
    assert "'/nonexistent/sales-bot' not found" in left_out["error"]
    assert [e["account"] for e in events if e["event"] == "prxmail serving"] == ["default"]
    assert "secret-pw" not in rest


def test_serve_with_no_account_that_can_start_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "prxmail.toml"
    config.write_text(accounts_text(tmp_path / "state"))
    with serve(config) as proc:
        err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 2
    events = [json.loads(line) for line in err.splitlines()]
    assert sorted(e["account"] for e in events if e["event"] == "account not started") == [
        "default",
        "sales",
    ]
    assert events[-1]["event"] == "prxmail could not start"


def test_a_single_account_serve_names_its_account_on_every_line(tmp_path: Path) -> None:
    text = accounts_text(tmp_path / "state", support_exec=f'exec = "{sys.executable} -c pass"')
    config = tmp_path / "prxmail.toml"
    config.write_text(text[: text.index("[channels_config.email.accounts.sales]")])
    with serve(config) as proc:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(json.loads(line))
            # The watcher's first retry of its closed port: a line from a channel task.
            serving = any(e["event"] == "prxmail serving" for e in seen)
            if serving and seen[-1]["level"] == "warning":
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0
    events = seen + [json.loads(line) for line in rest.splitlines()]
    process = {"shutting down", "prxmail stopped"}
    assert process <= {e["event"] for e in events}
    assert {e.get("account") for e in events if e["event"] not in process} == {"default"}
    assert all("account" not in e for e in events if e["event"] in process)
