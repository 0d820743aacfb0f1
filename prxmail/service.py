"""The library runner: the mail channel plus an external handler command.

Programs embed it with :func:`serve_mail_channel`; ``prxmail serve`` is its
command-line runner (:mod:`prxmail.cli._serve`: configuration, signals, exit statuses).

Theory of operation: :func:`serve_mail_channel` opens the channel
(:func:`prxmail.channel.open_mail_channel`) and, for every accepted message, runs the
handler command with the message as one JSON object on stdin
(:func:`message_payload`). Concurrency is bounded by a ``trio.CapacityLimiter`` of
``max_concurrent_handlers``: a slot is taken *before* the next message is received, so
when all slots are busy the channel is not asked for more mail. Each run is bounded by
``handler_timeout_secs``. Outcomes:

* exit 0 with output -> the output is the reply body (``channel.reply``);
* exit 0 without output -> handled, no reply;
* non-zero exit, death by signal, too much output, timeout -> recorded as failed with
  the reason (never retried; the stderr tail goes to the log);
* the command cannot be started at all -> the message is released and handed on again
  later, up to ``handler_max_attempts`` times (not the message's fault).

One log line per message says what happened to it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence

import trio

from prxmail._log import log_event, redacting
from prxmail._redact import SHORT_SECRET, Redactor, config_secrets
from prxmail.channel import MailChannel, open_mail_channel
from prxmail.config import Config
from prxmail.errors import HandlerError, LocalProtocolError
from prxmail.handler import DEFAULT_MAX_OUTPUT_BYTES, inherit_environment, run_exec_handler
from prxmail.message import Message

__all__ = ["handler_environment", "message_payload", "serve_mail_channel"]


def message_payload(message: Message) -> dict[str, object]:
    """The JSON object a handler gets on stdin for one message.

    Args:
        message: The accepted message.

    Returns:
        A JSON-serialisable dict: ``uid``, ``message_id``, ``from``, ``from_name``,
        ``to``, ``cc``, ``reply_to`` (address lists), ``subject``, ``date`` (ISO 8601
        UTC or null), ``text``, ``html`` (or null), ``attachments`` (``name``,
        ``content_type``, ``size``), ``in_reply_to`` (or null), ``references``,
        ``authentication_results``, ``truncated`` (true when the message was over
        ``max_message_bytes`` and only its text parts were loaded) and ``defects``.
    """
    return {
        "uid": message.uid,
        "message_id": message.message_id,
        "from": message.from_.addr,
        "from_name": message.from_.name,
        "to": [a.addr for a in message.to],
        "cc": [a.addr for a in message.cc],
        "reply_to": [a.addr for a in message.reply_to],
        "subject": message.subject,
        "date": message.date.isoformat() if message.date is not None else None,
        "text": message.text,
        "html": message.html,
        "attachments": [
            {"name": a.filename, "content_type": a.content_type, "size": a.size}
            for a in message.attachments
        ],
        "in_reply_to": message.in_reply_to,
        "references": list(message.references),
        "authentication_results": list(message.authentication_results),
        "truncated": "too-large" in message.defects,
        "defects": list(message.defects),
    }


def handler_environment(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The handler's environment: ours, minus every variable holding a mail password.

    That covers the ``password_env`` / ``smtp_password_env`` variables (their value *is*
    the password) and any other variable that holds it, alone or inside a longer value
    (``MAIL_URL=imaps://bot:PASSWORD@host``), also in its base64 or SASL forms.

    Args:
        config: Supplies the passwords to look for.
        environ: The environment to filter; ``os.environ`` by default.

    Returns:
        A new dict without those variables.
    """
    env = os.environ if environ is None else environ
    secrets = {s for s in config_secrets(config) if isinstance(s, str)}
    # Forms too short to look for inside other values (they occur in ordinary text)
    # only count when they are the whole value.
    contained = Redactor(s for s in config_secrets(config) if len(s) >= SHORT_SECRET)
    excluded = [
        name for name, value in env.items() if value in secrets or contained(value) != value
    ]
    if environ is None:
        return inherit_environment(exclude=excluded)
    return {k: v for k, v in env.items() if k not in excluded}


async def _handle(
    channel: MailChannel,
    message: Message,
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    limiter: trio.CapacityLimiter,
    token: object,
) -> None:
    config = channel.config
    fields = {
        "uid": message.uid,
        "message_id": message.message_id,
        "from": message.from_.addr,
        "subject": message.subject,
    }
    try:
        try:
            with trio.move_on_after(config.handler_timeout_secs) as scope:
                result = await run_exec_handler(
                    argv,
                    message_payload(message),
                    max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES,
                    env=env,
                )
        except HandlerError as exc:
            retried = await channel.release(message, str(exc))
            log_event(
                logging.ERROR,
                "handler could not be started" + (", will retry" if retried else ", giving up"),
                **fields,
                error=str(exc),
            )
            return
        if scope.cancelled_caught:
            reason = f"handler timed out after {config.handler_timeout_secs} s"
            await channel.mark_failed(message, reason)
            log_event(logging.WARNING, "message failed", **fields, reason=reason)
            return
        duration = round(result.duration, 3)
        if not result.ok:
            reason = result.failure_reason or "handler failed"
            await channel.mark_failed(message, f"{reason}: {result.stderr_tail[-500:]}")
            log_event(
                logging.WARNING,
                "message failed",
                **fields,
                reason=reason,
                stderr=result.stderr_tail[-500:] or None,
                duration=duration,
            )
            return
        body = result.reply_body
        if body is None:
            await channel.mark_handled(message)
            log_event(logging.INFO, "message handled, no reply", **fields, duration=duration)
            return
        try:
            reply_id = await channel.reply(message, body)
        except LocalProtocolError as exc:
            await channel.mark_failed(message, f"reply cannot be composed: {exc}")
            log_event(logging.WARNING, "message failed", **fields, reason=str(exc))
            return
        log_event(
            logging.WARNING if result.stdout_invalid_utf8 else logging.INFO,
            "message replied",
            **fields,
            reply_id=reply_id,
            duration=duration,
            note="handler output was not valid UTF-8" if result.stdout_invalid_utf8 else None,
        )
    finally:
        limiter.release_on_behalf_of(token)


async def serve_mail_channel(
    config: Config,
    *,
    exec_command: Sequence[str],
    task_status: trio.TaskStatus[MailChannel] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the channel with an external handler until cancelled.

    Args:
        config: The validated configuration.
        exec_command: The handler's argv (program first).
        task_status: For ``nursery.start``: started with the open channel.

    While it runs, the configuration's passwords are cut out of every log record
    (:func:`prxmail._log.redacting`): a server that echoes them in an error cannot put
    them into the log through any call site.

    Raises:
        LocalProtocolError: ``exec_command`` is empty.
        StateError: the state directory cannot be used.
    """
    if not exec_command or not exec_command[0]:
        raise LocalProtocolError("the handler command is empty")
    with redacting(config_secrets(config)):
        await _serve(config, list(exec_command), task_status)


async def _serve(
    config: Config, argv: list[str], task_status: trio.TaskStatus[MailChannel]
) -> None:
    env = handler_environment(config)
    limiter = trio.CapacityLimiter(config.max_concurrent_handlers)
    async with open_mail_channel(config) as channel:
        task_status.started(channel)
        log_event(
            logging.INFO,
            "prxmail serving",
            folder=config.imap_folder,
            account=config.username,
            handler=argv[0],
        )
        async with trio.open_nursery() as nursery:
            while True:
                token = object()
                await limiter.acquire_on_behalf_of(token)
                try:
                    message = await channel.receive()
                except BaseException:
                    limiter.release_on_behalf_of(token)
                    raise
                nursery.start_soon(
                    functools.partial(
                        _handle, channel, message, argv=argv, env=env, limiter=limiter, token=token
                    )
                )
