from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prxmail import __version__
from prxmail.cli import COMMANDS, main
from prxmail.cli._serve import EXIT_CONFIG, EXIT_OK
from prxmail.doctor import EXIT_BLOCKED as EXIT_FAILURE
from prxmail.doctor import EXIT_CONFIG as DOCTOR_EXIT_CONFIG

GOOD = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
password = "s3cret-pw"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
"""


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "prxmail.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('imap_host = "imap.example.com"', 'imap_prot = "x"'))
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"prxmail {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["doctor", "--help"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: prxmail" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == EXIT_CONFIG
    assert "required" in capsys.readouterr().err


def test_doctor_reports_config_problems_with_paths(
    bad_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2, as serve uses for a configuration it cannot start with: nothing else was checked.
    assert DOCTOR_EXIT_CONFIG == EXIT_CONFIG
    assert main(["doctor", "-c", str(bad_config)]) == DOCTOR_EXIT_CONFIG
    out = capsys.readouterr().out
    assert out.startswith("FAIL config")
    assert "unknown key 'imap_prot'" in out
    assert "required key missing @ $.channels_config.email.imap_host" in out


@pytest.fixture
def loopback_config(tmp_path: Path) -> Path:
    """GOOD pointed at closed loopback ports: the doctor's network steps fail at once,
    and no test talks to a real host."""
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    text = GOOD.replace('"imap.example.com"', '"127.0.0.1"').replace(
        '"smtp.example.com"', '"127.0.0.1"'
    )
    text += f'imap_port = {ports[0]}\nsmtp_port = {ports[1]}\nstate_dir = "{tmp_path / "st"}"\n'
    path = tmp_path / "loopback.toml"
    path.write_text(text)
    return path


def test_doctor_json(
    bad_config: Path, loopback_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--json", "-c", str(bad_config)]) == DOCTOR_EXIT_CONFIG
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert result["steps"][0]["status"] == "fail"
    assert main(["doctor", "--json", "-c", str(loopback_config)]) == EXIT_FAILURE
    result = json.loads(capsys.readouterr().out)
    steps = {step["name"]: step["status"] for step in result["steps"]}
    assert steps["config"] == "pass"
    assert steps["imap.tcp"] == "fail"
    assert steps["imap.login"] == "skip"
    assert steps["policy"] == "pass"


def test_doctor_never_prints_password(
    loopback_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "-c", str(loopback_config)]) == EXIT_FAILURE
    captured = capsys.readouterr()
    assert "PASS config" in captured.out
    assert "FAIL imap.tcp" in captured.out
    assert "s3cret-pw" not in captured.out + captured.err


def test_serve_without_handler_says_how_to_set_one(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "-c", str(good_config)])
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert "--exec" in captured.err
    assert "s3cret-pw" not in captured.out + captured.err


def test_serve_rejects_unsplittable_exec(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "-c", str(good_config), "--exec", "python3 'unbalanced"])
    assert code == EXIT_CONFIG
    assert "--exec" in capsys.readouterr().err


def test_serve_refuses_a_handler_that_does_not_exist(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "-c", str(good_config), "--exec", "/nonexistent/handler --x"])
    assert code == EXIT_CONFIG
    assert "/nonexistent/handler" in capsys.readouterr().err


def test_serve_config_error_exit_status(
    bad_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "-c", str(bad_config)]) == EXIT_CONFIG
    assert "unknown key 'imap_prot'" in capsys.readouterr().err


def test_config_path_from_environment(
    loopback_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRXMAIL_CONFIG", str(loopback_config))
    # 1, not 2: the configuration is fine, the (closed) servers are what blocks.
    assert main(["doctor"]) == EXIT_FAILURE
    assert f"{loopback_config} loaded" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prxmail", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "doctor" in result.stdout


# -- bad files: one line, exit 2, no traceback, no hang (subprocess runs) -----------

# Each run is a fresh interpreter importing trio and the whole package: about a second
# on an idle machine. The bound is generous because the test machines are small and
# shared; the failure it guards against (a read blocked on a FIFO) never ends at all.
CLI_TIMEOUT_SECS = 60
ROOT = Path(__file__).resolve().parents[2]
KEY = "$.channels_config.email."


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PRXMAIL_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "prxmail", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECS,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _with(tmp_path: Path, *lines: str, drop: str = "", state_dir: Path | None = None) -> Path:
    """GOOD plus ``lines``; should a bad value slip through, the run stays on closed
    loopback ports and a state directory of its own."""
    text = GOOD.replace('"imap.example.com"', '"127.0.0.1"').replace(
        '"smtp.example.com"', '"127.0.0.1"'
    )
    kept = [line for line in text.splitlines() if not drop or line.split(" =")[0] != drop]
    safe = [
        f"imap_port = {_closed_port()}",
        f"smtp_port = {_closed_port()}",
        f'state_dir = "{state_dir or tmp_path / "state"}"',
    ]
    path = tmp_path / "bad.toml"
    path.write_text("\n".join([*kept, *safe, *lines]) + "\n")
    return path


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.pem"
    path.write_text("this is not a certificate\n")
    return path


# Each case builds the file passed as -c and names what its one error line must say.
BAD_FILES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "nested-toml": lambda t: (
        _with(t, "deep = " + "[" * 5000 + "]" * 5000),
        "not valid TOML: nested too deeply",
    ),
    "config-is-dev-zero": lambda t: (Path("/dev/zero"), "/dev/zero: a character device"),
    "config-is-fifo": lambda t: (_fifo(t), "pipe: a FIFO (named pipe), not a regular file"),
    "password-file-dev-zero": lambda t: (
        _with(t, 'password_file = "/dev/zero"', drop="password"),
        f"/dev/zero: a character device, not a regular file @ {KEY}password_file",
    ),
    "password-file-fifo": lambda t: (
        _with(t, f'password_file = "{_fifo(t)}"', drop="password"),
        f"a FIFO (named pipe), not a regular file @ {KEY}password_file",
    ),
    "tls-ca-file-fifo": lambda t: (
        _with(t, f'tls_ca_file = "{_fifo(t)}"'),
        f"a FIFO (named pipe), not a regular file @ {KEY}tls_ca_file",
    ),
    "tls-ca-file-missing": lambda t: (
        _with(t, f'tls_ca_file = "{t / "missing.pem"}"'),
        f"missing.pem: No such file or directory @ {KEY}tls_ca_file",
    ),
    "tls-ca-file-not-pem": lambda t: (
        _with(t, f'tls_ca_file = "{_junk(t)}"'),
        "junk.pem: it holds no PEM certificate",
    ),
    "nul-in-password": lambda t: (
        _with(t, 'password = "s3cret\\u0000pw"', drop="password"),
        "must not contain NUL, CR or LF characters",
    ),
    "allowed-senders-string": lambda t: (
        _with(t, 'allowed_senders = "alice@example.com"', drop="allowed_senders"),
        "expected a list of strings, got 'alice@example.com'",
    ),
}
# The key each case's line must end with (the file itself has no key).
BAD_FILE_KEYS = {
    "tls-ca-file-not-pem": f"@ {KEY}tls_ca_file",
    "nul-in-password": f"@ {KEY}password",
    "allowed-senders-string": f"@ {KEY}allowed_senders",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_serve_bad_file_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    config, says = BAD_FILES[case](tmp_path)
    result = run_cli("serve", "-c", str(config), "--exec", f"{sys.executable} -c pass")
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("prxmail: ")
    assert says in line
    assert line.endswith(BAD_FILE_KEYS.get(case, ""))
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_doctor_bad_file_fails_the_config_step_without_hanging(case: str, tmp_path: Path) -> None:
    config, says = BAD_FILES[case](tmp_path)
    result = run_cli("doctor", "-c", str(config))
    assert result.returncode == DOCTOR_EXIT_CONFIG
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith("FAIL config")
    assert says in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_serve_unusable_state_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    # A state_dir below a regular file can never be created (and, unlike a read-only
    # directory, this holds for root too).
    (tmp_path / "plain-file").write_text("")
    config = _with(tmp_path, state_dir=tmp_path / "plain-file" / "state")
    result = run_cli("serve", "-c", str(config), "--exec", f"{sys.executable} -c pass")
    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if "ERROR" in line]
    (line,) = failures
    assert "prxmail could not start" in line
    assert "plain-file" in line
    assert result.stderr.splitlines()[-1] == line


@pytest.mark.timeout(2 * CLI_TIMEOUT_SECS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(signum: signal.Signals, tmp_path: Path) -> None:
    # Closed loopback ports: the watcher keeps retrying, the channel itself is open.
    config = _with(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "prxmail", "serve", "-c", str(config)]
    with subprocess.Popen(
        [*argv, "--exec", f"{sys.executable} -c pass"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "prxmail serving" in line:
                break
        proc.send_signal(signum)
        rest = proc.communicate(timeout=CLI_TIMEOUT_SECS)[1]
    assert "prxmail serving" in seen[-1]
    assert proc.returncode == EXIT_OK
    assert f"shutting down signal={signum.name}" in rest
    assert "Traceback" not in "".join(seen) + rest


def test_every_command_in_the_table_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert COMMANDS, "the table is the only place subcommands come from"
    for command in COMMANDS:
        assert command.name in listed
        assert command.help in listed
        with pytest.raises(SystemExit) as info:
            main([command.name, "--help"])
        assert info.value.code == 0
        assert command.description.split()[0] in capsys.readouterr().out


def test_serve_reply_format_flag_reaches_the_service(
    good_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prxmail.cli._serve

    seen: list[object] = []

    def fake_run(config: object, argv: list[str]) -> None:
        seen.append(config)

    monkeypatch.setattr(prxmail.cli._serve, "_run", fake_run)
    path = good_config
    assert main(["serve", "-c", str(path), "--exec", "true", "--reply-format", "json"]) == EXIT_OK
    assert main(["serve", "-c", str(path), "--exec", "true"]) == EXIT_OK
    formats = [c.reply_format.value for c in seen]  # type: ignore[attr-defined]
    assert formats == ["json", "text"]
    with pytest.raises(SystemExit):
        main(["serve", "-c", str(path), "--exec", "true", "--reply-format", "xml"])
