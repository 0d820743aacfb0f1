from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prxmail import __version__
from prxmail.cli import main
from prxmail.doctor import EXIT_BLOCKED as EXIT_FAILURE
from prxmail.doctor import EXIT_OK
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


def test_doctor_json(
    bad_config: Path, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "--json", "-c", str(bad_config)]) == EXIT_FAILURE
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert result["steps"][0]["status"] == "fail"
    assert main(["doctor", "--json", "-c", str(good_config)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["steps"][0]["status"] == "pass"


def test_doctor_good_config_never_prints_password(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", "-c", str(good_config)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "PASS config" in captured.out
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


def test_serve_config_error_exit_status(
    bad_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "-c", str(bad_config)]) == EXIT_CONFIG
    assert "unknown key 'imap_prot'" in capsys.readouterr().err


def test_config_path_from_environment(
    good_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRXMAIL_CONFIG", str(good_config))
    assert main(["doctor"]) == EXIT_OK
    assert str(good_config) in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prxmail", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "serve" in result.stdout
    assert "doctor" in result.stdout
