"""The OAuth 2 SASL messages (XOAUTH2, OAUTHBEARER) and error-challenge decoding."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prxmail.errors import LocalProtocolError
from prxmail.oauth2 import (
    ERROR_ACKNOWLEDGEMENT,
    decode_error_challenge,
    oauthbearer_initial_response,
    preferred_mechanism,
    xoauth2_initial_response,
)

TOKEN = "ya29.a0AfH6SMBx-token-value"


def b64json(obj: object) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_xoauth2_initial_response() -> None:
    assert xoauth2_initial_response("bot@example.com", TOKEN) == (
        b"user=bot@example.com\x01auth=Bearer ya29.a0AfH6SMBx-token-value\x01\x01"
    )


def test_oauthbearer_initial_response_rfc7628_example_shape() -> None:
    # RFC 7628 §4.1: n,a=user@example.com,^Ahost=server.example.com^Aport=143^A
    # auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==^A^A
    token = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    assert oauthbearer_initial_response(
        "user@example.com", token, host="server.example.com", port=143
    ) == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert oauthbearer_initial_response("u@x", "t") == b"n,a=u@x,\x01auth=Bearer t\x01\x01"


def test_oauthbearer_escapes_saslname() -> None:
    assert oauthbearer_initial_response("a=b,c@x", "t").startswith(b"n,a=a=3Db=2Cc@x,\x01")


@pytest.mark.parametrize(
    ("user", "token"),
    [("bot\x01@x", TOKEN), ("bot@x", "to\x01ken"), ("bot@x\r\n", TOKEN), ("bot@x", "a b")],
)
def test_control_characters_refused(user: str, token: str) -> None:
    with pytest.raises(LocalProtocolError):
        xoauth2_initial_response(user, token)
    with pytest.raises(LocalProtocolError):
        oauthbearer_initial_response(user, token)


def test_preferred_mechanism() -> None:
    assert preferred_mechanism(["PLAIN", "xoauth2", "OAUTHBEARER"]) == "OAUTHBEARER"
    assert preferred_mechanism(["PLAIN", "XOAUTH2"]) == "XOAUTH2"
    assert preferred_mechanism(["PLAIN", "LOGIN"]) is None
    assert ERROR_ACKNOWLEDGEMENT == {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}


def test_decode_dovecot_xoauth2_challenge() -> None:
    challenge = decode_error_challenge(
        b64json({"status": "401", "schemes": "bearer", "scope": "mail"})
    )
    assert (challenge.status, challenge.schemes, challenge.scope) == ("401", "bearer", "mail")
    assert challenge.message == (
        "the server refused the token (status 401, schemes bearer, needs scope mail): "
        "the token is invalid, expired or revoked, or was issued for another user"
    )


def test_decode_insufficient_scope_and_bytes_input() -> None:
    raw = b64json({"status": "insufficient_scope", "scope": "https://mail.google.com/"}).encode()
    challenge = decode_error_challenge(raw)
    assert "needs scope https://mail.google.com/" in challenge.message
    assert "lacks a scope" in challenge.message


def test_decode_keeps_the_token_out() -> None:
    challenge = decode_error_challenge(
        b64json({"status": f"invalid_token {TOKEN}", "scope": TOKEN}), secrets=[TOKEN]
    )
    assert TOKEN not in challenge.message
    assert "***" in challenge.message


@pytest.mark.parametrize(
    "raw",
    ["", "not base64!!", base64.b64encode(b"[1, 2]").decode(), "A" * 100_000, "e30"],
)
def test_unreadable_challenges_are_described(raw: str) -> None:
    challenge = decode_error_challenge(raw)
    assert challenge.status is None
    assert challenge.message.startswith("the server refused the token")


@given(st.binary(max_size=300))
def test_decode_never_raises(data: bytes) -> None:
    decode_error_challenge(base64.b64encode(data))
    decode_error_challenge(data)
