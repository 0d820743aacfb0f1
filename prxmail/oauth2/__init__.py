"""OAuth 2 for IMAP and SMTP: token sources, SASL messages, provider presets, auth flows.

One :class:`TokenSource` per account is shared by the IMAP watcher, the SMTP sender and
doctor; the connections log in with :func:`authenticate_with` and the SASL messages of
:mod:`prxmail.oauth2._sasl`. ``prxmail auth`` runs :func:`run_device_flow` or
:func:`run_loopback_flow` to get the first refresh token.

Importing the package loads none of its modules: the configuration imports the preset
table (:mod:`._presets`) without paying for trio or httpx, which the token source and
the flows need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prxmail._lazy import lazy_exports

if TYPE_CHECKING:
    from prxmail.oauth2._errors import OAuth2Error as OAuth2Error
    from prxmail.oauth2._errors import TokenCommandError as TokenCommandError
    from prxmail.oauth2._errors import TokenEndpointError as TokenEndpointError
    from prxmail.oauth2._files import SECRET_FILE_MODE as SECRET_FILE_MODE
    from prxmail.oauth2._files import read_secret_file as read_secret_file
    from prxmail.oauth2._files import write_secret_file as write_secret_file
    from prxmail.oauth2._flows import AUTHORIZATION_WAIT as AUTHORIZATION_WAIT
    from prxmail.oauth2._flows import Output as Output
    from prxmail.oauth2._flows import pkce_pair as pkce_pair
    from prxmail.oauth2._flows import run_device_flow as run_device_flow
    from prxmail.oauth2._flows import run_loopback_flow as run_loopback_flow
    from prxmail.oauth2._http import TokenResponse as TokenResponse
    from prxmail.oauth2._http import request_token as request_token
    from prxmail.oauth2._presets import PRESETS as PRESETS
    from prxmail.oauth2._presets import OAuth2Preset as OAuth2Preset
    from prxmail.oauth2._presets import Preset as Preset
    from prxmail.oauth2._presets import get_preset as get_preset
    from prxmail.oauth2._presets import preset_defaults as preset_defaults
    from prxmail.oauth2._sasl import ERROR_ACKNOWLEDGEMENT as ERROR_ACKNOWLEDGEMENT
    from prxmail.oauth2._sasl import ErrorChallenge as ErrorChallenge
    from prxmail.oauth2._sasl import decode_error_challenge as decode_error_challenge
    from prxmail.oauth2._sasl import oauthbearer_initial_response as oauthbearer_initial_response
    from prxmail.oauth2._sasl import preferred_mechanism as preferred_mechanism
    from prxmail.oauth2._sasl import xoauth2_initial_response as xoauth2_initial_response
    from prxmail.oauth2._secret import Revealable as Revealable
    from prxmail.oauth2._secret import Secret as Secret
    from prxmail.oauth2._token import AccessToken as AccessToken
    from prxmail.oauth2._token import CommandTokenSource as CommandTokenSource
    from prxmail.oauth2._token import EndpointTokenSource as EndpointTokenSource
    from prxmail.oauth2._token import Grant as Grant
    from prxmail.oauth2._token import TokenSource as TokenSource
    from prxmail.oauth2._token import authenticate_with as authenticate_with
    from prxmail.oauth2._token import safe_command_env as safe_command_env
    from prxmail.oauth2._url import check_endpoint_url as check_endpoint_url

__all__ = [
    "AUTHORIZATION_WAIT",
    "ERROR_ACKNOWLEDGEMENT",
    "PRESETS",
    "SECRET_FILE_MODE",
    "AccessToken",
    "CommandTokenSource",
    "EndpointTokenSource",
    "ErrorChallenge",
    "Grant",
    "OAuth2Error",
    "OAuth2Preset",
    "Output",
    "Preset",
    "Revealable",
    "Secret",
    "TokenCommandError",
    "TokenEndpointError",
    "TokenResponse",
    "TokenSource",
    "authenticate_with",
    "check_endpoint_url",
    "decode_error_challenge",
    "get_preset",
    "oauthbearer_initial_response",
    "pkce_pair",
    "preferred_mechanism",
    "preset_defaults",
    "read_secret_file",
    "request_token",
    "run_device_flow",
    "run_loopback_flow",
    "safe_command_env",
    "write_secret_file",
    "xoauth2_initial_response",
]

# Where each public name lives; loaded on first use (see the module docstring).
_LOCATIONS: dict[str, str] = {
    "OAuth2Error": "prxmail.oauth2._errors",
    "TokenCommandError": "prxmail.oauth2._errors",
    "TokenEndpointError": "prxmail.oauth2._errors",
    "SECRET_FILE_MODE": "prxmail.oauth2._files",
    "read_secret_file": "prxmail.oauth2._files",
    "write_secret_file": "prxmail.oauth2._files",
    "AUTHORIZATION_WAIT": "prxmail.oauth2._flows",
    "Output": "prxmail.oauth2._flows",
    "pkce_pair": "prxmail.oauth2._flows",
    "run_device_flow": "prxmail.oauth2._flows",
    "run_loopback_flow": "prxmail.oauth2._flows",
    "TokenResponse": "prxmail.oauth2._http",
    "check_endpoint_url": "prxmail.oauth2._url",
    "request_token": "prxmail.oauth2._http",
    "PRESETS": "prxmail.oauth2._presets",
    "OAuth2Preset": "prxmail.oauth2._presets",
    "Preset": "prxmail.oauth2._presets",
    "get_preset": "prxmail.oauth2._presets",
    "preset_defaults": "prxmail.oauth2._presets",
    "ERROR_ACKNOWLEDGEMENT": "prxmail.oauth2._sasl",
    "ErrorChallenge": "prxmail.oauth2._sasl",
    "decode_error_challenge": "prxmail.oauth2._sasl",
    "oauthbearer_initial_response": "prxmail.oauth2._sasl",
    "preferred_mechanism": "prxmail.oauth2._sasl",
    "xoauth2_initial_response": "prxmail.oauth2._sasl",
    "Revealable": "prxmail.oauth2._secret",
    "Secret": "prxmail.oauth2._secret",
    "AccessToken": "prxmail.oauth2._token",
    "CommandTokenSource": "prxmail.oauth2._token",
    "EndpointTokenSource": "prxmail.oauth2._token",
    "Grant": "prxmail.oauth2._token",
    "TokenSource": "prxmail.oauth2._token",
    "authenticate_with": "prxmail.oauth2._token",
    "safe_command_env": "prxmail.oauth2._token",
}


__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS, __all__)
