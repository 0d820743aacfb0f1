"""Checks that need no server: config, from_address, sender policy, state.

Theory of operation: these read only the configuration and the file system. The
state checks never create anything: they say whether the state directory is writable
(or creatable) and what an existing database holds.
"""

from __future__ import annotations

import os
import stat
import time
import tomllib
from pathlib import Path
from typing import Final

from prxmail.config import Config
from prxmail.doctor._report import Status, StepResult
from prxmail.errors import StateError, StateSchemaError
from prxmail.state import DB_FILENAME, MessageStatus, OutboxItem, StateStore, account_key

# A reply still queued this long after it was composed is stuck: the normal path sends
# within seconds, and the retry backoff tries again within the hour (its default cap).
STUCK_OUTBOX_SECONDS: Final = 3600.0

# A queued reply this far past its next attempt is not being sent at all (the service
# is not running, or its sender hangs): the sender looks at least once a minute.
OVERDUE_OUTBOX_SECONDS: Final = 300.0

# The keys of [channels_config.email] that name a file holding a secret.
_SECRET_FILE_KEYS: Final = (
    "password_file",
    "smtp_password_file",
    "oauth2_client_secret_file",
    "oauth2_refresh_token_file",
)


def _check_from_address(config: Config) -> StepResult:
    name = "smtp.from_address"
    sender_domain = config.from_address.rpartition("@")[2].lower()
    login = config.smtp_username
    if "@" not in login:
        return StepResult(
            name,
            Status.PASS,
            f"From: {config.from_address} (login {login!r} has no domain to compare)",
        )
    login_domain = login.rpartition("@")[2].lower()
    if config.from_address.lower() == login.lower():
        return StepResult(name, Status.PASS, f"From: {config.from_address} is the login itself")
    if sender_domain == login_domain:
        return StepResult(
            name, Status.PASS, f"From: {config.from_address} is in the login's domain"
        )
    return StepResult(
        name,
        Status.WARN,
        f"From: {config.from_address} is not in the login's domain ({login_domain})",
        hint="most providers refuse or rewrite a From address the account does not own"
        " (add it as an alias / 'send as' address), and receivers' SPF/DMARC checks may"
        " reject it; use the account's own address unless the alias is set up",
    )


# -- policy and state -------------------------------------------------------------------


def _check_policy(config: Config) -> StepResult:
    senders = config.allowed_senders
    if not senders:
        return StepResult(
            "policy",
            Status.WARN,
            "allowed_senders is empty: nobody will be answered",
            hint="list the addresses ('alice@example.com') or domains ('@example.com')"
            " the bot may answer",
        )
    if "*" in senders:
        return StepResult(
            "policy",
            Status.WARN,
            "allowed_senders contains '*': anyone can make the bot answer",
            hint="anyone who knows the address can make the bot send mail (and run the"
            " handler); list addresses or domains instead unless that is intended",
        )
    shown = ", ".join(senders[:5]) + (f" and {len(senders) - 5} more" if len(senders) > 5 else "")
    return StepResult("policy", Status.PASS, f"answers mail from {shown}")


def _check_state_dir(path: Path) -> StepResult:
    name = "state.dir"
    if path.exists():
        if not path.is_dir():
            return StepResult(
                name,
                Status.FAIL,
                f"state_dir {path} exists but is not a directory",
                hint="point state_dir at a directory (or remove the file)",
            )
        if not os.access(path, os.W_OK | os.X_OK):
            return StepResult(
                name,
                Status.FAIL,
                f"state_dir {path} is not writable by this user",
                hint="fix its owner/permissions, or point state_dir elsewhere",
            )
        return StepResult(name, Status.PASS, f"{path} is writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return StepResult(name, Status.PASS, f"{path} does not exist yet; it can be created")
    return StepResult(
        name,
        Status.FAIL,
        f"state_dir {path} does not exist and cannot be created ({parent} is not writable)",
        hint="create it with the right owner, or point state_dir at a writable place",
    )


def _check_state_db(config: Config) -> StepResult:
    name = "state.db"
    db = config.state_dir / DB_FILENAME
    if not db.is_file():
        return StepResult(name, Status.PASS, "no state database yet (created on first serve)")
    account = account_key(config.username, config.imap_host, config.imap_port)
    try:
        with StateStore(config.state_dir, read_only=True) as store:
            stats = store.statistics()
            stuck = _stuck_outbox(store.operator_outbox(account), time.time())
    except StateSchemaError as exc:
        if exc.found < exc.supported:
            # Not damage: the service migrates an older database when it next starts.
            return StepResult(
                name,
                Status.WARN,
                f"the state database cannot be read yet: {exc}",
                hint="prxmail serve upgrades it when it next starts; nothing is lost",
            )
        return StepResult(
            name,
            Status.FAIL,
            f"the state database cannot be read: {exc}",
            hint="it was written by a newer prxmail: upgrade prxmail on this machine",
        )
    except StateError as exc:
        return StepResult(
            name,
            Status.FAIL,
            f"the state database cannot be read: {exc}",
            hint="restore it from a backup or move it aside",
        )
    mine = [m for m in stats.mailboxes if m.account == account]
    detail = [
        f"folder {m.folder!r}: last processed UID {m.last_uid} (UIDVALIDITY {m.uidvalidity})"
        for m in mine
    ]
    if not mine:
        detail.append(f"no folder of {account} recorded yet")
    summary = f"{stats.outbox_queued} replies waiting in the outbox"
    status = Status.PASS
    hint = ""
    if stats.outbox_failed:
        summary += f", {stats.outbox_failed} failed permanently"
    if stuck:
        status = Status.WARN
        last = stuck[-1]
        summary += (
            f"; {len(stuck)} stuck (outbox item {last.id}: {last.last_error or 'never tried'})"
        )
        detail.extend(
            f"outbox item {item.id} to {', '.join(item.envelope_to)}: {item.status.value},"
            f" {item.attempts} attempts, last error: {item.last_error or '-'}"
            for item in stuck
        )
        hint = (
            "replies are not going out: see `prxmail outbox list`; fix the cause (the last"
            " error above), then `prxmail outbox retry --all`, or `prxmail outbox drop ID`"
        )
    deferred = stats.messages_by_status.get(MessageStatus.DEFERRED, 0)
    held = stats.messages_by_status.get(MessageStatus.HELD, 0)
    summary += f"; {deferred} messages deferred, {held} held"
    if held:
        status = Status.WARN
        hint = hint or (
            "held threads look like a mail loop and wait for an operator: the WARNING"
            " 'thread held' in the log of prxmail serve names the thread and why"
        )
    folder_state = next((m for m in mine if m.folder == config.imap_folder), None)
    if folder_state is not None:
        summary += f"; last processed UID {folder_state.last_uid} in {config.imap_folder!r}"
    return StepResult(name, status, summary, tuple(detail), hint)


def _stuck_outbox(items: list[OutboxItem], now: float) -> list[OutboxItem]:
    """Permanently failed replies, and queued ones that are old or long overdue."""
    return [
        item
        for item in items
        if item.status is not item.status.QUEUED
        or now - item.created_at > STUCK_OUTBOX_SECONDS
        or now - item.next_attempt_at > OVERDUE_OUTBOX_SECONDS
    ]


def _secret_file_warnings(config_path: Path) -> list[str]:
    """Secret files every user of the host can read: a WARN, not a FAIL, since the
    service works, but anyone on the host can log in as the bot. Group-readable is
    left alone: a credential shared with the service's group (0640) is deliberate."""
    try:
        table = tomllib.loads(config_path.read_text("utf-8"))["channels_config"]["email"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # the config step reports a configuration it cannot read
    if not isinstance(table, dict):
        return []
    files = [
        (key, config_path.parent / value)
        for key in _SECRET_FILE_KEYS
        if isinstance(value := table.get(key), str)
    ]
    warnings = []
    for key, path in files:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # a missing file is the config step's business
        if mode & stat.S_IROTH:
            warnings.append(
                f"{key} {path} is readable by every user (mode {stat.S_IMODE(mode):04o}):"
                f" chmod 600 {path}"
            )
    return warnings


def _config_step(config_path: Path, config: Config) -> StepResult:
    # The allowed_senders warnings belong to the policy step.
    warnings = [w for w in config.warnings if not w.startswith("allowed_senders")]
    secrets = _secret_file_warnings(config_path)
    detail = [*config.describe(), *(f"warning: {w}" for w in [*warnings, *secrets])]
    if secrets:
        return StepResult(
            "config",
            Status.WARN,
            f"{config_path} loaded; {len(secrets)} secret file(s) readable by every user",
            tuple(detail),
            hint="other users on this host can read the password: " + "; ".join(secrets),
        )
    if warnings:
        return StepResult(
            "config",
            Status.WARN,
            f"{config_path} loaded, with {len(warnings)} warning(s)",
            tuple(detail),
            hint="the usual pairs are IMAP 993 = tls, 143 = starttls; SMTP 465 = tls,"
            " 587 = starttls",
        )
    return StepResult("config", Status.PASS, f"{config_path} loaded", tuple(detail))
