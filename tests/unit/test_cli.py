from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prxmail import __version__
from prxmail.cli import main
from prxmail.doctor import EXIT_BLOCKED as EXIT_FAILURE
from prxmail.serve import EXIT_CONFIG

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
    assert main(["doctor", "-c", str(bad_config)]) == EXIT_FAILURE
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
    assert main(["doctor", "--json", "-c", str(bad_config)]) == EXIT_FAILURE
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
    assert main(["doctor"]) == EXIT_FAILURE
    assert f"{loopback_config} loaded" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prxmail", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "doctor" in result.stdout
