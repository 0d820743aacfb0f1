"""Secrets of the OAuth 2 pieces: tokens and client secrets that never show themselves.

:class:`Secret` behaves like :class:`prxmail.config.Secret` (``reveal()``; ``repr`` and
``str`` show stars) and lives here, below the config, so that the config can import the
provider presets from this package without an import cycle. Every function here takes
any :class:`Revealable`, so the config's secrets can be passed as they are.
"""

from __future__ import annotations

from typing import Protocol

import attrs

__all__ = ["Revealable", "Secret"]


class Revealable(Protocol):
    """Anything that holds a secret string and reveals it only on request."""

    def reveal(self) -> str:
        """Return the secret value."""
        ...


@attrs.frozen(repr=False)
class Secret:
    """A secret string that never shows itself in ``repr``, ``str`` or f-strings."""

    _value: str

    def reveal(self) -> str:
        """Return the secret value. Call it only where the value goes on the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__
