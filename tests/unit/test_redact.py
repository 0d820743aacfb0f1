from __future__ import annotations

import base64
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from prxmail._redact import (
    REDACTED,
    WITHHELD,
    Redactor,
    config_secrets,
    credential_secrets,
    secret_forms,
)
from prxmail.config import parse_config


def test_plain_quoted_and_base64_forms_removed() -> None:
    redact = Redactor(['pa\\ss"word'])
    b64 = base64.b64encode(b'pa\\ss"word').decode()
    text = f'NO LOGIN "bot" "pa\\\\ss\\"word" failed; saw {b64} and {b64.rstrip("=")}'
    cleaned = redact(text)
    assert "ss" not in cleaned.replace("LOGIN", "")
    assert cleaned.count(REDACTED) == 3


def test_case_insensitive() -> None:
    assert Redactor(["Secret-Pw"])("echo SECRET-PW and secret-pw") == "echo *** and ***"


def test_sasl_payload_base64_removed() -> None:
    blob = b"\0bot@example.com\0hunter22"
    encoded = base64.b64encode(blob).decode()
    assert Redactor([blob])(f"535 5.7.8 bad {encoded}") == f"535 5.7.8 bad {REDACTED}"


def test_short_secret_withholds_whole_text() -> None:
    assert Redactor(["ab"])("server said: AB is wrong") == WITHHELD
    assert Redactor(["ab"])("server said: nothing") == "server said: nothing"


def test_empty_secrets_change_nothing() -> None:
    assert Redactor(["", b""])("text") == "text"
    assert secret_forms("") == set()


def test_longest_form_first() -> None:
    # The unpadded base64 is a prefix of the padded one; the padded one must go whole.
    encoded = base64.b64encode(b"password12").decode()
    assert encoded.endswith("=")
    assert Redactor(["password12"])(encoded) == REDACTED


@given(st.text(min_size=4, max_size=40), st.text(max_size=60), st.text(max_size=60))
def test_secret_never_survives(secret: str, before: str, after: str) -> None:
    cleaned = Redactor([secret])(before + secret + after)
    assert secret.lower() not in cleaned.lower() or cleaned == WITHHELD


def test_config_secrets_cover_both_passwords_and_their_sasl_payloads(tmp_path: Path) -> None:
    (tmp_path / "smtp.pw").write_text("smtp-S3cret\n")
    config = parse_config(
        "[channels_config.email]\n"
        'imap_host = "127.0.0.1"\nsmtp_host = "127.0.0.1"\n'
        'username = "bot@example.test"\nsmtp_username = "relay@example.test"\n'
        'password_env = "IMAP_PW"\nsmtp_password_file = "smtp.pw"\n'
        'from_address = "bot@example.test"\nallowed_senders = ["a@example.test"]\n',
        environ={"IMAP_PW": "imap-S3cret"},
        base_dir=tmp_path,
    )
    redact = Redactor(config_secrets(config))
    plain = base64.b64encode(b"\0bot@example.test\0imap-S3cret").decode()
    smtp_plain = base64.b64encode(b"relay@example.test\0relay@example.test\0smtp-S3cret")
    text = f"echo imap-S3cret smtp-S3cret {plain} {smtp_plain.decode().rstrip('=')}"
    assert redact(text) == f"echo {REDACTED} {REDACTED} {REDACTED} {REDACTED}"


def test_credential_secrets_skip_empty_passwords() -> None:
    assert credential_secrets([("bot", "")]) == []
