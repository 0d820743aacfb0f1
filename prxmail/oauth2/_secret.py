"""Secrets of the OAuth 2 pieces: tokens and client secrets that never show themselves.

:class:`Secret` is prxmail's one secret type (:class:`prxmail._redact.Secret`, which
the configuration uses too), re-exported here. Every function of this package takes
any :class:`Revealable`.
"""

from __future__ import annotations

from typing import Protocol

from prxmail._redact import Secret

__all__ = ["Revealable", "Secret"]


class Revealable(Protocol):
    """Anything that holds a secret string and reveals it only on request."""

    def reveal(self) -> str:
        """Return the secret value."""
        ...
