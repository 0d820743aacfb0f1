"""Provider presets: what each big provider documents, for ``provider = "..."``.

A preset fills in hosts, ports, security, the auth method and -- where OAuth 2 applies
-- the token endpoint and scope, plus the endpoints ``prxmail auth`` uses and the
hints doctor shows with failures. Keys the user sets explicitly always win: the config
merges ``{**preset_defaults(name), **explicit}`` before it structures the table.

Every value comes from the provider's own documentation, named in ``sources``.
Microsoft's endpoints name a tenant: ``consumers`` for Outlook.com accounts and
``organizations`` for Microsoft 365 (a single-tenant app registration needs its
tenant id instead: set ``oauth2_token_url``). Google's device flow does not allow the
Gmail scope (its "allowed scopes" list for limited-input devices has no
``https://mail.google.com/``), so Gmail's ``prxmail auth`` uses the loopback flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import attrs

from prxmail._tls import Security
from prxmail.errors import ConfigError

__all__ = ["PRESETS", "OAuth2Preset", "Preset", "get_preset", "preset_defaults"]

_MS = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
_MS_SCOPE = (
    "https://outlook.office.com/IMAP.AccessAsUser.All "
    "https://outlook.office.com/SMTP.Send offline_access"
)
_MS_OAUTH_DOC = (
    "https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/"
    "how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth"
)
_MS_DEVICE_DOC = "https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code"


@attrs.frozen
class OAuth2Preset:
    """A provider's OAuth 2 endpoints and scope.

    Attributes:
        token_url: The token endpoint (``oauth2_token_url``).
        scope: The delegated scopes for IMAP and SMTP (``oauth2_scope``).
        authorize_url: The authorization endpoint for the loopback flow, if usable.
        device_url: The device authorization endpoint, if the provider allows the
            mail scopes on it.
        authorize_params: Extra authorization parameters the provider needs for a
            refresh token (Google: ``access_type=offline``, ``prompt=consent``).
        client_credentials_scope: The scope of app-only access
            (``oauth2_grant = "client_credentials"``), where the provider has one.
    """

    token_url: str
    scope: str
    authorize_url: str | None = None
    device_url: str | None = None
    authorize_params: Mapping[str, str] = attrs.field(factory=dict)
    client_credentials_scope: str | None = None


@attrs.frozen
class Preset:
    """One provider's documented settings.

    Attributes:
        name: The ``provider`` value.
        imap_host, imap_port, imap_security: The IMAP server.
        smtp_host, smtp_port, smtp_security: The SMTP submission server.
        auth: The auth method the preset selects: ``"oauth2"`` where passwords no
            longer work, ``"password"`` (an app password) elsewhere.
        oauth2: The OAuth 2 settings, for providers that support it for IMAP/SMTP.
        imap_id_required: The server refuses mailbox access until the client sends
            IMAP ID (RFC 2971).
        hints: Lines doctor shows with a failure for this provider.
        sources: The provider documentation the values come from.
    """

    name: str
    imap_host: str
    imap_port: int
    imap_security: Security
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    auth: Literal["password", "oauth2"]
    hints: tuple[str, ...]
    sources: tuple[str, ...]
    oauth2: OAuth2Preset | None = None
    imap_id_required: bool = False


def _microsoft(tenant: str) -> OAuth2Preset:
    base = _MS.format(tenant=tenant)
    return OAuth2Preset(
        token_url=f"{base}/token",
        scope=_MS_SCOPE,
        authorize_url=f"{base}/authorize",
        device_url=f"{base}/devicecode",
        client_credentials_scope=(
            "https://outlook.office365.com/.default" if tenant != "consumers" else None
        ),
    )


_PRESETS = (
    Preset(
        name="gmail",
        imap_host="imap.gmail.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.gmail.com",
        smtp_port=465,
        smtp_security=Security.TLS,
        auth="password",
        oauth2=OAuth2Preset(
            token_url="https://oauth2.googleapis.com/token",  # noqa: S106 - a URL, not a secret
            scope="https://mail.google.com/",
            authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
            device_url=None,
            authorize_params={"access_type": "offline", "prompt": "consent"},
        ),
        hints=(
            "Gmail: a password login needs 2-Step Verification and an app password "
            "(https://myaccount.google.com/apppasswords); a Workspace admin may have "
            'disabled app passwords, then use auth = "oauth2"',
            "Gmail OAuth2: create an OAuth client of type 'Desktop app' in the Google "
            "Cloud console, enable the Gmail API, and run `prxmail auth`",
        ),
        sources=(
            "https://support.google.com/mail/answer/7126229",
            "https://developers.google.com/gmail/imap/xoauth2-protocol",
            "https://developers.google.com/identity/protocols/oauth2/native-app",
            "https://developers.google.com/identity/protocols/oauth2/limited-input-device",
        ),
    ),
    Preset(
        name="outlook",
        imap_host="outlook.office365.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp-mail.outlook.com",
        smtp_port=587,
        smtp_security=Security.STARTTLS,
        auth="oauth2",
        oauth2=_microsoft("consumers"),
        hints=(
            "Outlook.com: IMAP access is off by default: Settings > Mail > Forwarding "
            "and IMAP > 'Let devices and apps use IMAP'",
            "Outlook.com accepts only OAuth2: register an app for personal Microsoft "
            "accounts with the delegated scopes IMAP.AccessAsUser.All, SMTP.Send and "
            "offline_access, then run `prxmail auth`",
        ),
        sources=(
            "https://support.microsoft.com/en-us/office/"
            "pop-imap-and-smtp-settings-8361e398-8af4-4e97-b147-6c6c4ac95353",
            _MS_OAUTH_DOC,
            _MS_DEVICE_DOC,
        ),
    ),
    Preset(
        name="office365",
        imap_host="outlook.office365.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.office365.com",
        smtp_port=587,
        smtp_security=Security.STARTTLS,
        auth="oauth2",
        oauth2=_microsoft("organizations"),
        hints=(
            "Microsoft 365: SMTP AUTH must be enabled for the mailbox (Microsoft 365 "
            "admin center > user > Mail > Manage email apps > Authenticated SMTP)",
            "Microsoft 365: IMAP must be enabled for the mailbox (Manage email apps > IMAP)",
            "Microsoft 365: a single-tenant app registration needs its tenant id in "
            "oauth2_token_url (https://login.microsoftonline.com/<tenant-id>/oauth2/v2.0/token)",
            "Microsoft 365 app-only access (client_credentials): the app's service "
            "principal must be granted access to the mailbox in Exchange Online",
        ),
        sources=(
            "https://learn.microsoft.com/en-us/exchange/clients-and-mobile-in-exchange-online/"
            "pop3-and-imap4/pop3-and-imap4",
            "https://learn.microsoft.com/en-us/exchange/clients-and-mobile-in-exchange-online/"
            "authenticated-client-smtp-submission",
            _MS_OAUTH_DOC,
            _MS_DEVICE_DOC,
        ),
    ),
    Preset(
        name="yahoo",
        imap_host="imap.mail.yahoo.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.mail.yahoo.com",
        smtp_port=465,
        smtp_security=Security.TLS,
        auth="password",
        hints=(
            "Yahoo: use an app password (Account security > Generate app password), "
            "not the account password",
        ),
        sources=("https://help.yahoo.com/kb/SLN4075.html",),
    ),
    Preset(
        name="icloud",
        imap_host="imap.mail.me.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.mail.me.com",
        smtp_port=587,
        smtp_security=Security.STARTTLS,
        auth="password",
        hints=(
            "iCloud: use an app-specific password (appleid.apple.com > Sign-In and "
            "Security > App-Specific Passwords)",
            "iCloud: if IMAP refuses the full address, try only the name part as "
            "username (SMTP wants the full address)",
        ),
        sources=("https://support.apple.com/en-us/102525",),
    ),
    Preset(
        name="fastmail",
        imap_host="imap.fastmail.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.fastmail.com",
        smtp_port=465,
        smtp_security=Security.TLS,
        auth="password",
        hints=(
            "Fastmail: use an app password with IMAP and SMTP access (Settings > "
            "Privacy & Security > App passwords)",
        ),
        sources=(
            "https://www.fastmail.help/hc/en-us/articles/1500000278342-Server-names-and-ports",
        ),
    ),
    Preset(
        name="zoho",
        imap_host="imap.zoho.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.zoho.com",
        smtp_port=465,
        smtp_security=Security.TLS,
        auth="password",
        hints=(
            "Zoho: IMAP access must be enabled in Zoho Mail settings; with two-factor "
            "authentication use an application-specific password",
            "Zoho: accounts in other data centres use their own hosts (imap.zoho.eu, "
            "imap.zoho.in, ...): set imap_host and smtp_host",
        ),
        sources=("https://www.zoho.com/mail/help/imap-access.html",),
    ),
    Preset(
        name="163",
        imap_host="imap.163.com",
        imap_port=993,
        imap_security=Security.TLS,
        smtp_host="smtp.163.com",
        smtp_port=465,
        smtp_security=Security.TLS,
        auth="password",
        imap_id_required=True,
        hints=(
            "163: enable IMAP/SMTP in the web mail settings and use the client "
            "authorization code it gives you, not the account password",
            "163: SELECT fails with 'Unsafe Login' unless the client sends IMAP ID: "
            "keep IMAP ID on",
        ),
        sources=("https://help.mail.163.com/",),
    ),
)

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Args:
        name: A ``provider`` value.

    Returns:
        The preset.

    Raises:
        ConfigError: no such preset (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(f'"{n}"' for n in PRESETS)
        raise ConfigError([f"expected one of {known}, got {name!r} @ provider"]) from None


def preset_defaults(name: str) -> dict[str, object]:
    """The configuration keys a preset sets, for merging under the explicit ones.

    Args:
        name: A ``provider`` value.

    Returns:
        ``imap_host``, ``imap_port``, ``imap_security``, ``smtp_host``,
        ``smtp_port``, ``smtp_security``, ``auth`` and -- when the preset selects
        OAuth 2 -- ``oauth2_token_url`` and ``oauth2_scope``; values as they would
        be written in the TOML.

    Raises:
        ConfigError: no such preset.
    """
    preset = get_preset(name)
    values: dict[str, object] = {
        "imap_host": preset.imap_host,
        "imap_port": preset.imap_port,
        "imap_security": preset.imap_security.value,
        "smtp_host": preset.smtp_host,
        "smtp_port": preset.smtp_port,
        "smtp_security": preset.smtp_security.value,
        "auth": preset.auth,
    }
    if preset.oauth2 is not None:
        values["oauth2_token_url"] = preset.oauth2.token_url
        values["oauth2_scope"] = preset.oauth2.scope
    return values
