"""Tests of the exec handler runner, with small Python scripts as handlers."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from prxmail.config import Config, parse_config
from prxmail.errors import HandlerError, LocalProtocolError
from prxmail.handler import (
    PIPE_DRAIN_GRACE_SECONDS,
    RUN_MARK_ENV,
    STDERR_TAIL_BYTES,
    HandlerResult,
    encode_payload,
    inherit_environment,
    parse_exec_command,
    run_exec_handler,
)
from prxmail.service import handler_environment

LIMIT = 64 * 1024


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def open_fds() -> set[str]:
    """Our open pipes and pidfds: what a leaking handler run would leave behind.

    Only those kinds are compared, so unrelated activity (a server fixture's sockets,
    log files) cannot make the comparison flaky.
    """
    kinds = ("pipe:", "anon_inode:[pidfd]")
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the listing's own descriptor, closed meanwhile
        if target.startswith(kinds):
            found.add(f"{fd}->{target}")
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_pidfile(path: Path, count: int = 1) -> list[int]:
    pids: list[int] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.01)
    raise AssertionError(f"no pid file {path}")


async def wait_dead(pids: list[int]) -> None:
    # Another process's death has no event to wait on; poll, bounded.
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.05)
    assert not any(alive(p) for p in pids)


PAYLOAD = {
    "message_id": "<abc@example.com>",
    "from": "alice@example.com",
    "from_name": "Zoë Ünïcødé",
    "to": ["bot@example.com"],
    "cc": [],
    "subject": "Grüße 🎉 — 日本語",
    "date": "2024-06-07T10:00:00+00:00",
    "text": "line 1\nline 2\n",
    "html": None,
    "attachments": [{"name": "résumé.pdf", "content_type": "application/pdf", "size": 1234}],
    "in_reply_to": None,
    "references": ["<a@x>", "<b@x>"],
}

ECHO_STDIN = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"


# -- parse_exec_command ----------------------------------------------------------------


def test_parse_exec_command_splits_like_a_shell_without_one() -> None:
    assert parse_exec_command("python3 /opt/bot.py --lang 'de CH'") == [
        "python3",
        "/opt/bot.py",
        "--lang",
        "de CH",
    ]
    assert parse_exec_command(r'a "b \"c\"" d\ e') == ["a", 'b "c"', "d e"]
    # Shell syntax is not interpreted: it stays literal arguments.
    assert parse_exec_command("echo $HOME; rm -rf / | cat > x #c") == [
        "echo",
        "$HOME;",
        "rm",
        "-rf",
        "/",
        "|",
        "cat",
        ">",
        "x",
        "#c",
    ]


@pytest.mark.parametrize(
    ("cmd", "message"),
    [
        ("", "empty"),
        ("   \t\n", "empty"),
        ("python 'unclosed", "unbalanced quote"),
        ('python "unclosed', "unbalanced quote"),
        ("python trailing\\", "trailing backslash"),
        ("'' arg", "empty program name"),
        ("a\x00b", "NUL"),
    ],
)
def test_parse_exec_command_errors(cmd: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_exec_command(cmd)


# -- payload -------------------------------------------------------------------------


def test_encode_payload_keeps_non_ascii_as_utf8() -> None:
    data = encode_payload(PAYLOAD)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1  # one JSON object on one line
    assert "Grüße 🎉 — 日本語".encode() in data
    assert b"\\u" not in data
    assert json.loads(data) == PAYLOAD


def test_encode_payload_lone_surrogates_fall_back_to_escapes() -> None:
    payload = {"text": "bad \udcff byte", "subject": "Grüße"}
    data = encode_payload(payload)
    data.decode("ascii")  # pure ASCII escapes now
    assert json.loads(data) == payload


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}, {"x": {1, 2}}])
def test_encode_payload_rejects_non_json(bad: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError, match="JSON"):
        encode_payload(bad)


def test_inherit_environment_excludes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRXMAIL_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PRXMAIL_TEST_OTHER", "ok")
    env = inherit_environment(exclude={"PRXMAIL_TEST_SECRET"})
    assert "PRXMAIL_TEST_SECRET" not in env
    assert env["PRXMAIL_TEST_OTHER"] == "ok"


# -- HandlerResult -------------------------------------------------------------------


def test_result_properties() -> None:
    good = HandlerResult(0, "Hello\n", "", 0.1)
    assert good.ok
    assert good.reply_body == "Hello\n"
    assert good.failure_reason is None
    assert HandlerResult(0, " \n\t", "", 0.1).reply_body is None
    failed = HandlerResult(3, "partial", "oops", 0.1)
    assert not failed.ok
    assert failed.reply_body is None
    assert failed.failure_reason == "handler exited with status 3"
    killed = HandlerResult(-signal.SIGKILL, "", "", 0.1)
    assert killed.failure_reason == "handler killed by SIGKILL"
    over = HandlerResult(0, "x", "", 0.1, stdout_overflow=True)
    assert not over.ok
    assert over.reply_body is None
    assert over.failure_reason is not None
    assert "size limit" in over.failure_reason
    assert "partial" not in repr(failed)  # bodies stay out of reprs (and logs)


# -- running handlers ------------------------------------------------------------------


async def test_payload_reaches_handler_intact_and_stdout_is_the_reply() -> None:
    result = await run_exec_handler(py(ECHO_STDIN), PAYLOAD, max_output_bytes=LIMIT)
    assert result.ok
    assert result.exit_code == 0
    assert result.stdout.endswith("\n")
    assert json.loads(result.stdout) == PAYLOAD
    assert "Zoë Ünïcødé" in result.stdout
    assert result.duration > 0


async def test_reply_with_non_ascii_and_stderr() -> None:
    code = (
        "import sys, json\n"
        "d = json.loads(sys.stdin.buffer.read().decode('utf-8'))\n"
        "sys.stderr.write('handling ' + d['message_id'] + '\\n')\n"
        "sys.stdout.buffer.write(('Danke für: ' + d['subject']).encode('utf-8'))\n"
    )
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.reply_body == "Danke für: Grüße 🎉 — 日本語"
    assert result.stderr_tail == "handling <abc@example.com>\n"
    assert not result.stdout_invalid_utf8


async def test_nonzero_exit_is_a_failed_result_not_an_exception() -> None:
    code = "import sys; print('half an answer'); sys.stderr.write('Traceback: boom'); sys.exit(3)"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.exit_code == 3
    assert not result.ok
    assert result.reply_body is None
    assert result.stdout == "half an answer\n"  # kept for the log
    assert result.stderr_tail == "Traceback: boom"
    assert result.failure_reason == "handler exited with status 3"


async def test_handler_killed_by_signal() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.exit_code == -signal.SIGKILL
    assert result.failure_reason == "handler killed by SIGKILL"


async def test_empty_output_means_no_reply() -> None:
    result = await run_exec_handler(py("pass"), PAYLOAD, max_output_bytes=LIMIT)
    assert result.ok
    assert result.stdout == ""
    assert result.reply_body is None


async def test_output_exactly_at_limit_is_accepted() -> None:
    code = "import sys; sys.stdout.write('a' * 1000)"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=1000)
    assert result.ok
    assert result.stdout == "a" * 1000


async def test_output_over_limit_fails_and_is_not_a_reply() -> None:
    code = "import sys; sys.stdout.write('a' * 1001)"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=1000)
    assert result.stdout_overflow
    assert not result.ok
    assert result.reply_body is None
    assert result.stdout == "a" * 1000  # only the allowed prefix was kept


async def test_endless_output_is_stopped_quickly() -> None:
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    start = time.monotonic()
    with trio.fail_after(20):
        result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=100_000)
    assert time.monotonic() - start < 10
    assert result.stdout_overflow
    assert len(result.stdout) == 100_000
    assert result.exit_code == -signal.SIGTERM


async def test_invalid_utf8_is_replaced_and_flagged() -> None:
    code = r"import sys; sys.stdout.buffer.write(b'caf\xe9 ok')"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.ok
    assert result.stdout_invalid_utf8
    assert result.reply_body == "caf\ufffd ok"


async def test_utf8_bom_is_dropped() -> None:
    code = r"import sys; sys.stdout.buffer.write(b'\xef\xbb\xbfHallo')"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.reply_body == "Hallo"
    assert not result.stdout_invalid_utf8


async def test_stderr_is_bounded_to_its_tail() -> None:
    code = (
        "import sys\n"
        "sys.stderr.write('é' * 100_000)\n"  # 200 kB of two-byte characters
        "sys.stderr.write('THE END')\n"
    )
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)
    assert result.stderr_tail.endswith("THE END")
    assert len(result.stderr_tail.encode()) <= STDERR_TAIL_BYTES
    assert len(result.stderr_tail.encode()) >= STDERR_TAIL_BYTES - 3
    assert "\ufffd" not in result.stderr_tail  # the cut did not leave a broken character


async def test_large_payload_and_output_do_not_deadlock() -> None:
    # The handler writes a lot *before* reading its input: only concurrent feeding and
    # reading lets both sides progress.
    code = (
        "import sys, json\n"
        "sys.stdout.write('x' * 300_000)\n"
        "sys.stdout.flush()\n"
        "d = json.loads(sys.stdin.buffer.read())\n"
        "sys.stdout.write(str(len(d['text'])))\n"
    )
    payload = {**PAYLOAD, "text": "ü" * 3_000_000}
    with trio.fail_after(30):
        result = await run_exec_handler(py(code), payload, max_output_bytes=1_000_000)
    assert result.ok
    assert result.stdout == "x" * 300_000 + "3000000"


async def test_handler_that_ignores_stdin() -> None:
    payload = {**PAYLOAD, "text": "y" * 2_000_000}
    with trio.fail_after(30):
        result = await run_exec_handler(
            py("print('no input needed')"), payload, max_output_bytes=LIMIT
        )
    assert result.ok
    assert result.stdout == "no input needed\n"


async def test_env_is_passed_exactly() -> None:
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    result = await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT, env={"ONLY": "this"})
    env = json.loads(result.stdout)
    env.pop("LC_CTYPE", None)  # Python may coerce the C locale by itself
    mark = env.pop(RUN_MARK_ENV)  # the run's mark, a fresh token each run
    assert re.fullmatch("[0-9a-f]{32}", mark)
    assert env == {"ONLY": "this"}


async def test_missing_or_unexecutable_program_raises_handler_error(tmp_path: Path) -> None:
    with pytest.raises(HandlerError, match="cannot start handler") as info:
        await run_exec_handler([str(tmp_path / "nope")], PAYLOAD, max_output_bytes=LIMIT)
    assert info.value.argv0 == str(tmp_path / "nope")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o600)
    with pytest.raises(HandlerError):
        await run_exec_handler([str(script)], PAYLOAD, max_output_bytes=LIMIT)


async def test_bad_arguments_are_refused_before_starting() -> None:
    with pytest.raises(LocalProtocolError):
        await run_exec_handler([], PAYLOAD, max_output_bytes=LIMIT)
    with pytest.raises(LocalProtocolError, match="JSON"):
        await run_exec_handler(py("pass"), {"x": object()}, max_output_bytes=LIMIT)
    with pytest.raises(ValueError, match="max_output_bytes"):
        await run_exec_handler(py("pass"), PAYLOAD, max_output_bytes=-1)
    with pytest.raises(ValueError, match="kill_grace"):
        await run_exec_handler(py("pass"), PAYLOAD, max_output_bytes=1, kill_grace=-1)


# -- cancellation, process cleanup -------------------------------------------------------


async def test_caller_timeout_kills_and_reaps_sleep(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    fds_before = open_fds()
    start = time.monotonic()
    with trio.move_on_after(0.5) as cs:
        await run_exec_handler(
            ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"],
            PAYLOAD,
            max_output_bytes=LIMIT,
        )
    elapsed = time.monotonic() - start
    assert cs.cancelled_caught
    assert elapsed < 3, elapsed  # SIGTERM works on sleep: no wait for the kill grace
    (pid,) = wait_pidfile(pidfile)
    assert not alive(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG; reaped already, no zombie
    assert open_fds() == fds_before


async def test_timeout_kills_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    cmd = f"sleep 30 & echo $! > {pidfile}; echo $$ >> {pidfile}; wait"
    with trio.move_on_after(0.5) as cs:
        await run_exec_handler(["sh", "-c", cmd], PAYLOAD, max_output_bytes=LIMIT)
    assert cs.cancelled_caught
    pids = wait_pidfile(pidfile, 2)
    await wait_dead(pids)


async def test_sigterm_first_then_sigkill_after_grace(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    polite = (
        "import signal, sys, time, pathlib\n"
        f"def on_term(*a):\n    pathlib.Path({str(marker)!r}).write_text('term')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    with trio.move_on_after(0.5):
        await run_exec_handler(py(polite), PAYLOAD, max_output_bytes=LIMIT, kill_grace=5)
    assert marker.read_text() == "term"

    pidfile = tmp_path / "stubborn.pid"
    stubborn = (
        "import os, signal, time\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(30)\n"
    )
    start = time.monotonic()
    with trio.move_on_after(0.5) as cs:
        await run_exec_handler(py(stubborn), PAYLOAD, max_output_bytes=LIMIT, kill_grace=0.5)
    elapsed = time.monotonic() - start
    assert cs.cancelled_caught
    assert 0.9 <= elapsed < 5, elapsed  # waited the grace, then SIGKILL
    (pid,) = wait_pidfile(pidfile)
    assert not alive(pid)


async def test_leftover_child_holding_pipes_is_killed_after_exit(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg"
    cmd = f"sleep 30 & echo $! > {pidfile}; echo answer"
    start = time.monotonic()
    with trio.fail_after(10):
        result = await run_exec_handler(["sh", "-c", cmd], PAYLOAD, max_output_bytes=LIMIT)
    elapsed = time.monotonic() - start
    assert result.reply_body == "answer\n"
    assert PIPE_DRAIN_GRACE_SECONDS <= elapsed + 0.05 < PIPE_DRAIN_GRACE_SECONDS + 3
    (pid,) = wait_pidfile(pidfile)
    await wait_dead([pid])


async def test_no_fd_or_process_leaks_over_many_runs() -> None:
    fds_before = open_fds()
    results = []
    limiter = trio.CapacityLimiter(4)

    async def one(n: int) -> None:
        async with limiter:
            code = f"import os, sys; sys.stdin.read(); print({n}, os.getpid())"
            results.append(await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT))

    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(one, n)
    outputs = [r.stdout.split() for r in results]
    assert sorted(int(n) for n, _ in outputs) == list(range(12))
    assert open_fds() == fds_before
    for _, pid in outputs:
        # Each handler was reaped by us (other tests' servers may be our children too,
        # so ask about these pids only).
        with pytest.raises(ChildProcessError):
            os.waitpid(int(pid), os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks


async def test_concurrency_limit_is_respected(tmp_path: Path) -> None:
    # Each handler records start/end times; with a limiter of 2 never more than 2 overlap.
    log = tmp_path / "log"
    code = (
        "import time, sys\n"
        f"f = open({str(log)!r}, 'a')\n"
        "f.write(f'start {time.monotonic()}\\n'); f.flush()\n"
        "time.sleep(0.2)\n"
        "f.write(f'end {time.monotonic()}\\n'); f.flush()\n"
    )
    limiter = trio.CapacityLimiter(2)

    async def one() -> None:
        async with limiter:
            assert (await run_exec_handler(py(code), PAYLOAD, max_output_bytes=LIMIT)).ok

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    events = sorted(
        (float(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines())
    )
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2


# -- escapers: setsid() children outside the process group ------------------------------


def escaper(pidfile: Path, *, then: str = "", clear_env: bool = False) -> list[str]:
    """A handler that double-forks a setsid()ed ``sleep 300`` and records its pid.

    The grandchild leaves the handler's session and process group and is re-parented
    away from it: killpg cannot reach it. ``then`` runs in the handler afterwards.
    """
    env = "{}" if clear_env else "os.environ"
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        null = os.open(os.devnull, os.O_RDWR)\n"
        "        for fd in (0, 1, 2):\n"
        "            os.dup2(null, fd)\n"
        f"        open({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"        os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        f"        os.execve('/bin/sleep', ['sleep', '300'], {env})\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        f"while not os.path.exists({str(pidfile)!r}):\n"
        "    time.sleep(0.01)\n"
        f"{then}\n"
        "print('answer')\n"
    )
    return py(code)


async def test_a_setsid_escaper_is_killed_when_the_handler_exits(tmp_path: Path) -> None:
    pidfile = tmp_path / "escaper"
    with trio.fail_after(20):
        result = await run_exec_handler(escaper(pidfile), PAYLOAD, max_output_bytes=LIMIT)
    assert result.reply_body == "answer\n"
    (pid,) = wait_pidfile(pidfile)
    # Gone by the time the call returned: no polling, no grace.
    assert not alive(pid)


async def test_a_setsid_escaper_is_killed_on_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "escaper"
    with trio.move_on_after(2) as cs:
        await run_exec_handler(
            escaper(pidfile, then="time.sleep(60)"), PAYLOAD, max_output_bytes=LIMIT
        )
    assert cs.cancelled_caught
    (pid,) = wait_pidfile(pidfile)
    assert not alive(pid)


_SUBREAPER_RUN = r"""
import json, os, subprocess, sys
from pathlib import Path
import trio
from prxmail.handler import contain_orphans, run_exec_handler
argv, cleared = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
older = subprocess.Popen(["sleep", "300"])  # a child of ours from before: not touched
async def main():
    await run_exec_handler(argv, {}, max_output_bytes=1024)
    await run_exec_handler(cleared, {}, max_output_bytes=1024)
with contain_orphans() as contained:
    trio.run(main)
    marked, unmarked = (int(Path(p).read_text()) for p in sys.argv[3:5])
    before = {"marked": state(marked), "unmarked": state(unmarked)}
after = {"marked": state(marked), "unmarked": state(unmarked), "older": state(older.pid)}
older.kill()
older.wait()
print(json.dumps({"contained": contained, "before": before, "after": after}))
"""


def test_subreaper_reaps_escapers_and_stops_what_escaped_the_mark(tmp_path: Path) -> None:
    """Inside contain_orphans (what prxmail serve does) an escaper re-parents to us:
    the run's sweep kills *and reaps* it (no zombie left for anyone), and one that also
    dropped its environment -- and so the run's mark -- is stopped when the block ends,
    while a child that was there before the block is left alone."""
    marked, unmarked = tmp_path / "marked", tmp_path / "unmarked"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _SUBREAPER_RUN,
            json.dumps(escaper(marked)),
            json.dumps(escaper(unmarked, clear_env=True)),
            str(marked),
            str(unmarked),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    report = json.loads(done.stdout)
    assert report["contained"] is True
    assert report["before"]["marked"] == "gone"  # killed and reaped by the run itself
    assert report["before"]["unmarked"] == "S"  # the documented limit: still sleeping
    assert report["after"] == {"marked": "gone", "unmarked": "gone", "older": "S"}


# -- the handler's environment -----------------------------------------------------------


def _config(**lines: str) -> Config:
    text = "\n".join(
        [
            "[channels_config.email]",
            'imap_host = "127.0.0.1"',
            'smtp_host = "127.0.0.1"',
            'username = "bot@example.test"',
            'from_address = "bot@example.test"',
            'allowed_senders = ["alice@example.test"]',
            *(f"{k} = {v}" for k, v in lines.items()),
        ]
    )
    return parse_config(text + "\n", environ={"IMAP_PW": "imap-S3cret", "SMTP_PW": "pw"})


def test_handler_environment_holds_no_password_in_any_variable() -> None:
    config = _config(password_env='"IMAP_PW"', smtp_password_env='"SMTP_PW"')
    b64 = base64.b64encode(b"\0bot@example.test\0imap-S3cret").decode()
    env = {
        "PATH": "/usr/local/sbin:/usr/bin",  # ordinary variables stay
        "PWD": "/srv/pw/bot",  # contains the short SMTP password as text: stays
        "IMAP_PW": "imap-S3cret",  # the password_env variable itself
        "SMTP_PW": "pw",  # the smtp_password_env variable, however short
        "MAIL_URL": "imaps://bot:imap-S3cret@mail.example.test/",
        "AUTH_BLOB": b64,  # the SASL PLAIN payload as it went on the wire
    }
    assert handler_environment(config, env) == {
        "PATH": "/usr/local/sbin:/usr/bin",
        "PWD": "/srv/pw/bot",
    }


def test_handler_environment_keeps_systemd_notification_variables_from_handlers() -> None:
    config = _config(password_env='"IMAP_PW"')
    env = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": "4242",
        "INVOCATION_ID": "abc",  # other systemd variables are harmless and stay
    }
    assert handler_environment(config, env) == {"PATH": "/usr/bin", "INVOCATION_ID": "abc"}
