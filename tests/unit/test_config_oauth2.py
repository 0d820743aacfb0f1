"""The OAuth 2 keys of the configuration (issue 13): auth, oauth2_*, provider, imap_id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prxmail._redact import Redactor, config_secrets
from prxmail._tls import Security
from prxmail.config import AuthMethod, OAuth2Grant, Secret, parse_config
from prxmail.errors import ConfigError
from prxmail.oauth2 import Secret as OAuth2Secret
from prxmail.service import handler_environment

PATH = "$.channels_config.email"
REFRESH = "rt-the-refresh-token-1234"
CLIENT_SECRET = "cs-the-client-secret-5678"
BASE = """\
[channels_config.email]
imap_host = "imap.example.com"
smtp_host = "smtp.example.com"
username = "bot@example.com"
from_address = "bot@example.com"
allowed_senders = ["alice@example.com"]
"""
OAUTH = """\
auth = "oauth2"
oauth2_token_url = "https://login.example.com/token"
oauth2_client_id = "client-1"
oauth2_refresh_token_env = "BOT_REFRESH"
"""
ENV = {"BOT_REFRESH": REFRESH, "BOT_SECRET": CLIENT_SECRET, "HOME": "/home/u"}


def parse(*lines: str, base: str = BASE, tmp: Path | None = None) -> object:
    return parse_config(base + "\n".join(lines) + "\n", environ=ENV, base_dir=tmp)


def problems(*lines: str, base: str = BASE) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse(*lines, base=base)
    text = str(info.value)
    assert REFRESH not in text
    assert CLIENT_SECRET not in text
    return info.value.problems


def test_one_secret_type() -> None:
    assert OAuth2Secret is Secret


def test_oauth2_for_both_protocols_without_a_password() -> None:
    config = parse_config(BASE + OAUTH, environ=ENV)
    assert config.auth is AuthMethod.OAUTH2
    assert config.smtp_auth is AuthMethod.OAUTH2
    assert config.password is None
    assert config.smtp_password is None
    assert config.oauth2 is not None
    assert config.oauth2.token_url == "https://login.example.com/token"
    assert config.oauth2.client_id == "client-1"
    assert config.oauth2.refresh_token is not None
    assert config.oauth2.refresh_token.reveal() == REFRESH
    assert config.oauth2.grant is OAuth2Grant.REFRESH_TOKEN
    assert REFRESH not in repr(config)
    assert config.imap_id is True


def test_password_is_still_the_default_and_oauth2_keys_need_oauth2() -> None:
    config = parse('password = "pw-1234"')
    assert config.auth is AuthMethod.PASSWORD  # type: ignore[attr-defined]
    assert config.oauth2 is None  # type: ignore[attr-defined]
    found = problems('password = "pw-1234"', 'oauth2_client_id = "x"')
    assert found == (
        "oauth2_client_id only apply with auth = 'oauth2' or smtp_auth = 'oauth2'"
        f" @ {PATH}.oauth2_client_id",
    )


@pytest.mark.parametrize("key", ["password", "password_env", "password_file"])
def test_a_password_with_oauth2_is_an_error_naming_the_key(key: str) -> None:
    value = '"BOT_PW"' if key == "password_env" else '"pw-1234"'
    found = problems(OAUTH, f"{key} = {value}")
    assert any(p.endswith(f"@ {PATH}.{key}") and "takes no password" in p for p in found)


def test_smtp_can_keep_a_password_beside_oauth2_imap_and_needs_one() -> None:
    config = parse(OAUTH, 'smtp_auth = "password"', 'smtp_password = "smtp-pw-1"')
    assert config.smtp_auth is AuthMethod.PASSWORD  # type: ignore[attr-defined]
    assert config.smtp_password.reveal() == "smtp-pw-1"  # type: ignore[attr-defined]
    found = problems(OAUTH, 'smtp_auth = "password"')
    assert any("smtp_auth = 'password' beside auth = 'oauth2'" in p for p in found)
    found = problems(OAUTH, 'smtp_password = "x-1234"')
    assert any(p.endswith(f"@ {PATH}.smtp_password") for p in found)


def test_missing_endpoint_keys_are_named() -> None:
    found = problems('auth = "oauth2"')
    joined = "\n".join(found)
    assert f"@ {PATH}.oauth2_token_url" in joined
    assert f"@ {PATH}.oauth2_client_id" in joined
    assert f"@ {PATH}.oauth2_refresh_token_file" in joined


def test_token_url_must_be_https_or_loopback_http() -> None:
    found = problems(OAUTH.replace("https://login", "http://login"))
    assert any(p.endswith(f"@ {PATH}.oauth2_token_url") for p in found)
    config = parse(OAUTH.replace("https://login.example.com", "http://127.0.0.1:8080"))
    assert config.oauth2.token_url == "http://127.0.0.1:8080/token"  # type: ignore[attr-defined]


def test_token_command_excludes_the_endpoint_keys() -> None:
    config = parse('auth = "oauth2"', 'oauth2_token_command = "get-token --for bot"')
    assert config.oauth2.token_command == ("get-token", "--for", "bot")  # type: ignore[attr-defined]
    found = problems(OAUTH, 'oauth2_token_command = "get-token"')
    assert any("oauth2_token_command replaces the token endpoint" in p for p in found)


def test_client_credentials_needs_a_secret_and_no_refresh_token(tmp_path: Path) -> None:
    lines = (
        'auth = "oauth2"',
        'oauth2_grant = "client_credentials"',
        'oauth2_token_url = "https://login.example.com/token"',
        'oauth2_client_id = "app"',
    )
    found = problems(*lines)
    assert any(p.endswith(f"@ {PATH}.oauth2_client_secret") for p in found)
    found = problems(
        *lines, 'oauth2_client_secret_env = "BOT_SECRET"', 'oauth2_refresh_token = "x"'
    )
    assert any(p.endswith(f"@ {PATH}.oauth2_refresh_token") for p in found)
    (tmp_path / "secret").write_text(CLIENT_SECRET + "\n")
    config = parse(*lines, 'oauth2_client_secret_file = "secret"', tmp=tmp_path)
    assert config.oauth2.grant is OAuth2Grant.CLIENT_CREDENTIALS  # type: ignore[attr-defined]
    assert config.oauth2.client_secret.reveal() == CLIENT_SECRET  # type: ignore[attr-defined]


def test_refresh_token_file_may_be_missing_but_not_a_fifo(tmp_path: Path) -> None:
    lines = (
        'auth = "oauth2"',
        'oauth2_token_url = "https://login.example.com/token"',
        'oauth2_client_id = "c"',
        'oauth2_refresh_token_file = "refresh"',
    )
    config = parse(*lines, tmp=tmp_path)
    assert config.oauth2.refresh_token_file == tmp_path / "refresh"  # type: ignore[attr-defined]

    os.mkfifo(tmp_path / "refresh")
    with pytest.raises(ConfigError) as info:
        parse(*lines, tmp=tmp_path)
    assert info.value.problems[0].endswith(f"@ {PATH}.oauth2_refresh_token_file")


def test_only_one_refresh_token_source() -> None:
    found = problems(OAUTH, 'oauth2_refresh_token = "other"')
    assert any("set only one of oauth2_refresh_token, oauth2_refresh_token_env" in p for p in found)


def test_provider_preset_fills_in_and_explicit_keys_win() -> None:
    table = """\
[channels_config.email]
provider = "office365"
username = "bot@contoso.com"
from_address = "bot@contoso.com"
oauth2_client_id = "app-id"
oauth2_refresh_token_env = "BOT_REFRESH"
smtp_port = 25
"""
    config = parse_config(table, environ=ENV)
    assert config.provider == "office365"
    assert config.imap_host == "outlook.office365.com"
    assert config.imap_security is Security.TLS
    assert config.smtp_port == 25  # explicit wins over the preset's 587
    assert config.auth is AuthMethod.OAUTH2
    assert config.oauth2 is not None
    assert config.oauth2.token_url is not None
    assert "login.microsoftonline.com" in config.oauth2.token_url
    assert "IMAP.AccessAsUser.All" in (config.oauth2.scope or "")
    found = problems(base=table.replace('"office365"', '"aol"'))
    assert any(p.endswith(f"@ {PATH}.provider") for p in found)


def test_imap_id_can_be_switched_off() -> None:
    assert parse(OAUTH, "imap_id = false").imap_id is False  # type: ignore[attr-defined]


def test_oauth2_secrets_are_redacted_and_kept_from_the_handler() -> None:
    config = parse(OAUTH, 'oauth2_client_secret_env = "BOT_SECRET"')
    secrets = config_secrets(config)  # type: ignore[arg-type]
    redact = Redactor(secrets)
    assert redact(f"echo {REFRESH} and {CLIENT_SECRET}") == "echo *** and ***"
    env = handler_environment(config, environ={**ENV, "OTHER": "fine"})  # type: ignore[arg-type]
    assert env == {"HOME": "/home/u", "OTHER": "fine"}


def test_loading_the_config_loads_neither_trio_nor_httpx() -> None:
    import json
    import subprocess
    import sys

    code = "import json, sys, prxmail.config; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, text=True
    ).stdout
    loaded = set(json.loads(out))
    for heavy in ("trio", "httpx", "prxmail.oauth2._token", "prxmail.oauth2._http"):
        assert heavy not in loaded
    assert "prxmail.oauth2._presets" in loaded


def test_describe_says_where_the_tokens_come_from() -> None:
    config = parse_config(
        BASE + OAUTH + 'smtp_auth = "password"\nsmtp_password = "p-123"\n', environ=ENV
    )
    assert config.describe()[-1] == (
        "log in to IMAP with OAuth 2 tokens from https://login.example.com/token"
        " (refresh_token grant)"
    )
    assert REFRESH not in "\n".join(config.describe())


def test_client_credentials_with_a_preset_asks_for_the_app_scope() -> None:
    table = """\
[channels_config.email]
provider = "office365"
username = "bot@contoso.com"
from_address = "bot@contoso.com"
oauth2_client_id = "app-id"
oauth2_grant = "client_credentials"
oauth2_client_secret_env = "BOT_SECRET"
"""
    config = parse_config(table, environ=ENV)
    assert config.oauth2 is not None
    assert config.oauth2.scope == "https://outlook.office365.com/.default"
