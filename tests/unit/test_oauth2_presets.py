"""The provider preset table."""

from __future__ import annotations

import urllib.parse

import pytest

from prxmail._tls import Security
from prxmail.errors import ConfigError
from prxmail.oauth2 import PRESETS, check_endpoint_url, get_preset, preset_defaults

ISSUE_PROVIDERS = ("gmail", "outlook", "office365", "yahoo", "icloud", "fastmail", "zoho", "163")


def test_every_provider_of_the_issue_has_a_preset() -> None:
    assert tuple(PRESETS) == ISSUE_PROVIDERS


@pytest.mark.parametrize("name", ISSUE_PROVIDERS)
def test_presets_are_consistent(name: str) -> None:
    preset = PRESETS[name]
    # The port and the security mode agree the way prxmail's defaults do.
    assert (preset.imap_port, preset.imap_security) == (993, Security.TLS)
    assert (preset.smtp_port, preset.smtp_security) in (
        (465, Security.TLS),
        (587, Security.STARTTLS),
    )
    assert preset.sources
    assert all(urllib.parse.urlsplit(s).scheme == "https" for s in preset.sources)
    assert preset.hints
    if preset.auth == "oauth2":
        assert preset.oauth2 is not None
    if preset.oauth2 is not None:
        for url in (preset.oauth2.token_url, preset.oauth2.authorize_url, preset.oauth2.device_url):
            if url is not None:
                check_endpoint_url(url)
        assert preset.oauth2.authorize_url or preset.oauth2.device_url


def test_microsoft_presets() -> None:
    for name, tenant in (("outlook", "consumers"), ("office365", "organizations")):
        oauth2 = PRESETS[name].oauth2
        assert oauth2 is not None
        base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
        assert (oauth2.token_url, oauth2.device_url, oauth2.authorize_url) == (
            f"{base}/token",
            f"{base}/devicecode",
            f"{base}/authorize",
        )
        assert oauth2.scope.split() == [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access",
        ]
    assert any("SMTP AUTH must be enabled" in h for h in PRESETS["office365"].hints)
    assert PRESETS["office365"].oauth2.client_credentials_scope == (  # type: ignore[union-attr]
        "https://outlook.office365.com/.default"
    )


def test_gmail_uses_the_loopback_flow() -> None:
    oauth2 = PRESETS["gmail"].oauth2
    assert oauth2 is not None
    assert oauth2.scope == "https://mail.google.com/"
    assert oauth2.device_url is None  # Google's device flow refuses the Gmail scope
    assert oauth2.authorize_params == {"access_type": "offline", "prompt": "consent"}


def test_163_requires_imap_id() -> None:
    assert PRESETS["163"].imap_id_required
    assert not PRESETS["gmail"].imap_id_required


def test_preset_defaults() -> None:
    assert preset_defaults("office365") == {
        "imap_host": "outlook.office365.com",
        "imap_port": 993,
        "imap_security": "tls",
        "smtp_host": "smtp.office365.com",
        "smtp_port": 587,
        "smtp_security": "starttls",
        "auth": "oauth2",
        "oauth2_token_url": "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
        "oauth2_scope": (
            "https://outlook.office.com/IMAP.AccessAsUser.All "
            "https://outlook.office.com/SMTP.Send offline_access"
        ),
    }
    assert "oauth2_token_url" not in preset_defaults("yahoo")
    assert preset_defaults("icloud")["auth"] == "password"


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match=r'"gmail", "outlook".*@ provider'):
        get_preset("hotmail")
