"""``prxmail auth``: what it refuses before any flow starts (the flows: integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prxmail.cli import main

BASE = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
from_address = "bot@example.com"
"""


def run(
    tmp_path: Path, text: str, *flags: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    path = tmp_path / "prxmail.toml"
    path.write_text(BASE + text)
    status = main(["auth", "-c", str(path), *flags])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('password = "pw-1234"\n', "does not use OAuth 2"),
        ('auth = "oauth2"\noauth2_token_command = "get-token"\n', "no refresh token to get"),
        (
            'auth = "oauth2"\noauth2_token_url = "https://login.example.com/token"\n'
            'oauth2_client_id = "c"\noauth2_refresh_token = "rt-secret-inline"\n',
            "set oauth2_refresh_token_file",
        ),
        (
            'auth = "oauth2"\noauth2_token_url = "https://login.example.com/token"\n'
            'oauth2_client_id = "c"\noauth2_refresh_token_file = "rt"\n',
            "the loopback flow needs --authorize-url",
        ),
    ],
)
def test_auth_refuses_what_it_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    status, output = run(tmp_path, text, capsys=capsys)
    assert status == 2
    assert words in output
    assert "rt-secret-inline" not in output
    assert not (tmp_path / "rt").exists()


def test_auth_flow_flag_is_checked_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        run(tmp_path, 'password = "x-123"\n', "--flow", "carrier-pigeon", capsys=capsys)
    assert "invalid choice" in capsys.readouterr().err


def test_auth_device_flow_needs_a_device_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        'auth = "oauth2"\noauth2_token_url = "https://login.example.com/token"\n'
        'oauth2_client_id = "c"\noauth2_refresh_token_file = "rt"\n'
    )
    status, output = run(tmp_path, text, "--flow", "device", capsys=capsys)
    assert status == 2
    assert "the device flow needs --device-url" in output
