"""Checks that need no server: config, from_address, sender policy, state.

Theory of operation: these read only the configuration and the file system. The
state checks never create anything: they say whether the state directory is writable
(or creatable) and what an existing database holds.
"""

from __future__ import annotations

import os
from pathlib import Path

from prxmail.config import Config
from prxmail.doctor._report import Status, StepResult
from prxmail.errors import StateError, StateSchemaError
from prxmail.state import DB_FILENAME, MessageStatus, StateStore, account_key


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
    try:
        with StateStore(config.state_dir, read_only=True) as store:
            stats = store.statistics()
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
    account = account_key(config.username, config.imap_host, config.imap_port)
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
        status = Status.WARN
        hint = "some replies could not be sent; the log of prxmail serve says why"
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


def _config_step(config_path: Path, config: Config) -> StepResult:
    # The allowed_senders warnings belong to the policy step.
    warnings = [w for w in config.warnings if not w.startswith("allowed_senders")]
    detail = [*config.describe(), *(f"warning: {w}" for w in warnings)]
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
