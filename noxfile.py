"""Developer tasks. ``nox`` alone runs lint, typecheck and the full test suite."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.error_on_missing_interpreters = True

TEST_DEPS = [
    "pytest>=8",
    "pytest-trio>=0.8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "trustme>=1.1",
]
LINT_DEPS = ["ruff>=0.6"]
TYPE_DEPS = ["mypy>=1.11"]
# Peer libraries are measured against, never installed as runtime dependencies.
BENCH_DEPS = ["imapclient>=3", "aioimaplib>=1.1", "aiosmtplib>=3", "trustme>=1.1"]


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests and integration tests against real Dovecot and Postfix."""
    session.install("-q", ".", *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("-q", *LINT_DEPS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-q", ".", *TYPE_DEPS)
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against peer libraries on the same local servers (prints ratios)."""
    session.install("-q", ".", *BENCH_DEPS)
    # For `python -m bench plot` (the PNG in docs/); only this session needs it.
    session.install("-q", "matplotlib>=3.8")
    args = session.posargs or ["all"]
    session.run("python", "-m", "bench", *args)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job end to end on private local Dovecot + Postfix (needs root for apt)."""
    session.install("-q", ".", "trustme>=1.1")
    session.run("python", "-m", "tests.demo", *session.posargs)
