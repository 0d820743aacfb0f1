from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from prxmail._tls import create_ssl_context, shared_ssl_context


def test_context_verifies_by_default() -> None:
    context = create_ssl_context()
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_shared_context_is_one_per_ca_file_and_renewed_when_it_changes(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    first = shared_ssl_context(ca_file)
    assert shared_ssl_context(str(ca_file)) is first
    assert shared_ssl_context() is shared_ssl_context()
    assert shared_ssl_context() is not first
    other = trustme.CA()
    with ca_file.open("ab") as out:
        out.write(other.cert_pem.bytes())
    renewed = shared_ssl_context(ca_file)
    assert renewed is not first
    assert len(renewed.get_ca_certs()) == len(first.get_ca_certs()) + 1


def test_missing_ca_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        shared_ssl_context(tmp_path / "missing.pem")
