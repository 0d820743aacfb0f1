"""``prxmail doctor`` with several accounts: each checked, concurrently, one block each."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import trio

from prxmail.cli import main
from prxmail.config import Config
from prxmail.doctor import (
    EXIT_BLOCKED,
    EXIT_CONFIG,
    DoctorReport,
    Status,
    Timeouts,
    run_account_checks,
    run_doctor,
)
from prxmail.doctor import _run as doctor_run

FAST = Timeouts(dns=1, connect=1, tls=1, greeting=1, command=1, close=1, chain=3)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write(tmp_path: Path, *extra: str) -> Path:
    lines = [
        "[channels_config.email]",
        'imap_host = "127.0.0.1"',
        f"imap_port = {closed_port()}",
        'smtp_host = "127.0.0.1"',
        f"smtp_port = {closed_port()}",
        'username = "support@example.com"',
        'password = "support-pw-secret"',
        'from_address = "support@example.com"',
        'allowed_senders = ["alice@example.com"]',
        f'state_dir = "{tmp_path / "state"}"',
        "[channels_config.email.accounts.sales]",
        'username = "sales@example.com"',
        'password = "sales-pw-secret"',
        'from_address = "sales@example.com"',
        *extra,
    ]
    path = tmp_path / "prxmail.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_every_account_gets_its_own_report(tmp_path: Path) -> None:
    reports = await run_account_checks(write(tmp_path), timeouts=FAST)
    assert [r.account for r in reports] == ["default", "sales"]
    for report in reports:
        assert report.step("imap.tcp").status is Status.FAIL
        assert report.exit_status == EXIT_BLOCKED
    assert "sales@example.com" in " ".join(reports[1].step("config").detail)
    assert "sales-pw-secret" not in json.dumps([r.to_json() for r in reports])


async def test_one_account_on_request(tmp_path: Path) -> None:
    (report,) = await run_account_checks(write(tmp_path), account="sales", timeouts=FAST)
    assert report.account == "sales"
    (report,) = await run_account_checks(write(tmp_path), account="ops", timeouts=FAST)
    assert report.exit_status == EXIT_CONFIG
    (problem,) = report.step("config").detail
    assert problem.startswith("no account 'ops' in")
    assert problem.endswith("its accounts: default, sales")


async def test_accounts_are_checked_at_the_same_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each account's check waits for the other's to have begun: one after the other,
    # this could never finish.
    begun = {"default": trio.Event(), "sales": trio.Event()}

    async def check(config_path: Path, config: Config, limits: Timeouts) -> DoctorReport:
        begun[config.name].set()
        other = "sales" if config.name == "default" else "default"
        await begun[other].wait()
        return DoctorReport(str(config_path), (), account=config.name)

    monkeypatch.setattr(doctor_run, "_check_account", check)
    with trio.fail_after(5):
        reports = await run_account_checks(write(tmp_path), timeouts=FAST)
    assert [r.account for r in reports] == ["default", "sales"]


def test_text_has_one_block_per_account_and_a_summary(tmp_path: Path) -> None:
    out = io.StringIO()
    code = run_doctor(write(tmp_path), as_json=False, out=out)
    assert code == EXIT_BLOCKED
    text = out.getvalue()
    assert text.count("== account ") == 2
    first, second = text.split("== account sales ==")
    assert first.startswith("== account default ==\n")
    assert "FAIL imap.tcp" in first
    assert "FAIL imap.tcp" in second
    assert text.splitlines()[-1] == "BLOCKED: 2 of 2 account(s): default, sales"


def test_json_lists_the_accounts(tmp_path: Path) -> None:
    out = io.StringIO()
    code = run_doctor(write(tmp_path), as_json=True, out=out)
    document = json.loads(out.getvalue())
    assert code == EXIT_BLOCKED
    assert document["ok"] is False
    assert [a["account"] for a in document["accounts"]] == ["default", "sales"]
    assert {"ok", "config", "steps"} <= set(document["accounts"][0])


def test_a_single_account_file_prints_as_before(tmp_path: Path) -> None:
    path = write(tmp_path)
    text = path.read_text()
    path.write_text(text[: text.index("[channels_config.email.accounts.sales]")])
    out = io.StringIO()
    run_doctor(path, as_json=True, out=out)
    assert set(json.loads(out.getvalue())) == {"ok", "config", "steps"}


def test_a_config_problem_in_any_account_exits_2(tmp_path: Path) -> None:
    out = io.StringIO()
    code = run_doctor(write(tmp_path, "imap_port = 0"), as_json=False, out=out)
    assert code == EXIT_CONFIG
    assert "@ $.channels_config.email.accounts.sales.imap_port" in out.getvalue()


def test_the_command_line_takes_account(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "-c", str(write(tmp_path)), "--account", "sales", "--json"])
    assert code == EXIT_BLOCKED
    document = json.loads(capsys.readouterr().out)
    assert [a["account"] for a in document["accounts"]] == ["sales"]
