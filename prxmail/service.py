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

* exit 0 with output -> the output is the reply (``channel.reply``): the body as is
  with ``reply_format = "text"``; with ``"json"`` one object (``body``, ``html``,
  ``attachments``, ``subject``) parsed by :func:`prxmail.conversation.parse_json_reply`
  in a worker thread (it reads files) -- anything wrong with it fails the message with
  the parser's reason, never a half-built reply;
* exit 0 without output -> handled, no reply;
* non-zero exit, death by signal, too much output, timeout -> recorded as failed with
  the reason (never retried; the stderr tail goes to the log);
* the command cannot be started at all -> the message is released and handed on again
  later, up to ``handler_max_attempts`` times (not the message's fault).

Each run gets a private directory (mode 0700, :func:`prxmail.conversation.
write_attachments`) when the message has attachment content or replies are JSON: the
incoming attachments are files in it (each payload entry gets their ``path``), its path
is the payload's ``run_dir`` and the handler's ``PRXMAIL_RUN_DIR``, and files a JSON
reply attaches by ``path`` must lie in it. It is removed after the run, whatever the
outcome.

The payload also carries the conversation: ``thread_id`` and ``thread``, the earlier
messages of the thread prxmail saw or sent (see :meth:`MailChannel.thread`).

One log line per message says what happened to it.

Beside the channel, in the same nursery: with ``health_listen`` set, the health and
metrics endpoint (:mod:`prxmail._health`: ``GET /healthz``, ``GET /metrics``; its
metrics are the service's own registry, :mod:`prxmail._metrics`); when started by
systemd (``NOTIFY_SOCKET``), the notifications READY / STATUS / WATCHDOG / STOPPING
(:mod:`prxmail._systemd`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from prxmail._log import account_context, log_event, redacting
from prxmail._redact import SHORT_SECRET, Redactor, config_secrets
from prxmail._systemd import Notifier, supervise, watchdog_interval
from prxmail.channel import MailChannel, collapse_exception_group, open_mail_channel
from prxmail.channel._api import shared_state_dir
from prxmail.channel._sender import retry_policy
from prxmail.config import Config, ReplyFormat
from prxmail.conversation import (
    AttachmentFiles,
    InvalidReplyError,
    ReplySpec,
    parse_json_reply,
    remove_attachment_dir,
    write_attachments,
)
from prxmail.errors import HandlerError, LocalProtocolError, PrxmailError
from prxmail.handler import (
    DEFAULT_MAX_OUTPUT_BYTES,
    HandlerResult,
    inherit_environment,
    run_exec_handler,
)
from prxmail.message import Message
from prxmail.state import AsyncStateStore, open_state_store

if TYPE_CHECKING:
    from prxmail._metrics import ServiceMetrics

__all__ = [
    "RUN_DIR_ENV",
    "accounts_handler_environment",
    "handler_environment",
    "message_payload",
    "serve_mail_channel",
    "serve_mail_channels",
]

#: The environment variable holding the run's private directory (see the module comment).
RUN_DIR_ENV: Final = "PRXMAIL_RUN_DIR"

# Variables systemd gives the service itself (sd_notify(3) asks to keep them from
# children): a handler must not be able to send READY=1 or feed the watchdog for us.
SERVICE_ONLY_ENV: Final = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


def message_payload(
    message: Message,
    *,
    thread: Sequence[Mapping[str, object]] = (),
    files: AttachmentFiles | None = None,
) -> dict[str, object]:
    """The JSON object a handler gets on stdin for one message.

    Args:
        message: The accepted message.
        thread: The earlier messages of its thread (:meth:`MailChannel.thread`).
        files: The run's directory with the attachments' content, if one was made.

    Returns:
        A JSON-serialisable dict: ``uid``, ``message_id``, ``from``, ``from_name``,
        ``to``, ``cc``, ``reply_to`` (address lists), ``subject``, ``date`` (ISO 8601
        UTC or null), ``text``, ``html`` (or null), ``attachments`` (``name``,
        ``content_type``, ``size``), ``in_reply_to`` (or null), ``references``,
        ``authentication_results``, ``truncated`` (true when the message was over
        ``max_message_bytes`` and only its text parts were loaded), ``defects``,
        ``thread_id``, ``thread`` (at most :data:`~prxmail.state.MAX_THREAD_HISTORY`
        (50) earlier messages, oldest first: ``message_id``, ``direction``
        ``"in"``/``"out"``, ``date``, ``from``, ``subject``, ``text``) and ``run_dir``
        (the run's private directory, or null). Each attachment also has ``path``:
        the file holding its content, or null when it was over
        ``max_attachment_bytes`` (or no directory was made).
    """
    paths: Sequence[Path | None] = files.paths if files is not None else ()
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
            {
                "name": a.filename,
                "content_type": a.content_type,
                "size": a.size,
                "path": str(paths[i]) if i < len(paths) and paths[i] is not None else None,
            }
            for i, a in enumerate(message.attachments)
        ],
        "in_reply_to": message.in_reply_to,
        "references": list(message.references),
        "authentication_results": list(message.authentication_results),
        "truncated": "too-large" in message.defects,
        "defects": list(message.defects),
        "thread_id": message.thread_id,
        "thread": [dict(entry) for entry in thread],
        "run_dir": str(files.directory) if files is not None else None,
    }


def handler_environment(config: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The handler's environment: ours, minus every variable holding a mail password
    and systemd's notification variables (:data:`SERVICE_ONLY_ENV`).

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
        name
        for name, value in env.items()
        if value in secrets or contained(value) != value or name in SERVICE_ONLY_ENV
    ]
    if environ is None:
        return inherit_environment(exclude=excluded)
    return {k: v for k, v in env.items() if k not in excluded}


def _needs_run_dir(config: Config, message: Message) -> bool:
    return config.reply_format is ReplyFormat.JSON or any(
        a.content is not None for a in message.attachments
    )


async def _remove_run_dir(files: AttachmentFiles, fields: Mapping[str, object]) -> None:
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(remove_attachment_dir, files.directory)
        except OSError as exc:
            log_event(
                logging.ERROR,
                "handler run directory could not be removed",
                **fields,
                path=str(files.directory),
                error=str(exc),
            )


async def _handle(
    channel: MailChannel,
    message: Message,
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    limiter: trio.CapacityLimiter,
    token: object,
    metrics: ServiceMetrics | None = None,
) -> None:
    fields = {
        "uid": message.uid,
        "message_id": message.message_id,
        "from": message.from_.addr,
        "subject": message.subject,
        "thread_id": message.thread_id,
    }
    try:
        files: AttachmentFiles | None = None
        if _needs_run_dir(channel.config, message):
            try:
                files = await trio.to_thread.run_sync(write_attachments, message.attachments)
            except OSError as exc:
                # Not the message's fault (a full or unwritable temporary directory).
                retried = await channel.release(message, f"cannot write attachments: {exc}")
                log_event(
                    logging.ERROR,
                    "handler run directory could not be made"
                    + (", will retry" if retried else ", giving up"),
                    **fields,
                    error=str(exc),
                )
                return
        try:
            await _run_handler(
                channel, message, argv=argv, env=env, files=files, fields=fields, metrics=metrics
            )
        finally:
            if files is not None:
                await _remove_run_dir(files, fields)
    finally:
        limiter.release_on_behalf_of(token)


async def _json_reply(
    channel: MailChannel, message: Message, result: HandlerResult, files: AttachmentFiles | None
) -> ReplySpec:
    if result.stdout_invalid_utf8:
        # Decoded with replacement characters: the JSON is not what the handler wrote.
        raise InvalidReplyError("invalid JSON reply: output is not UTF-8")
    parse = functools.partial(
        parse_json_reply,
        result.stdout.encode("utf-8"),
        original_subject=message.subject,
        max_attachment_bytes=channel.config.max_attachment_bytes,
        allowed_roots=[files.directory] if files is not None else (),
    )
    # It reads the files the reply names: off the event loop.
    return await trio.to_thread.run_sync(parse)


async def _run_handler(
    channel: MailChannel,
    message: Message,
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    files: AttachmentFiles | None,
    fields: Mapping[str, object],
    metrics: ServiceMetrics | None,
) -> None:
    config = channel.config
    run_env = dict(env)
    if files is not None:
        run_env[RUN_DIR_ENV] = str(files.directory)
    payload = message_payload(message, thread=await channel.thread(message), files=files)
    try:
        with trio.move_on_after(config.handler_timeout_secs) as scope:
            result = await run_exec_handler(
                argv, payload, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES, env=run_env
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
        if metrics is not None:
            metrics.observe_handler(channel.config.name, float(config.handler_timeout_secs))
        reason = f"handler timed out after {config.handler_timeout_secs} s"
        await channel.mark_failed(message, reason)
        log_event(logging.WARNING, "message failed", **fields, reason=reason)
        return
    if metrics is not None:
        metrics.observe_handler(channel.config.name, result.duration)
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
    spec = ReplySpec(body=body)
    if config.reply_format is ReplyFormat.JSON:
        try:
            spec = await _json_reply(channel, message, result, files)
        except InvalidReplyError as exc:
            await channel.mark_failed(message, exc.reason)
            log_event(logging.WARNING, "message failed", **fields, reason=exc.reason)
            return
    try:
        reply_id = await channel.reply(
            message,
            spec.body,
            html=spec.html,
            attachments=spec.attachments,
            subject=spec.subject,
        )
    except (LocalProtocolError, ValueError) as exc:
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

    With ``health_listen`` set it also serves ``/healthz`` and ``/metrics`` there, and
    with ``NOTIFY_SOCKET`` set it keeps systemd informed (see the module comment).

    While it runs, the configuration's passwords are cut out of every log record
    (:func:`prxmail._log.redacting`): a server that echoes them in an error cannot put
    them into the log through any call site; every line carries ``account=NAME``.

    Raises:
        LocalProtocolError: ``exec_command`` is empty.
        StateError: the state directory cannot be used.
        OSError: the ``health_listen`` address cannot be bound.
    """
    if not exec_command or not exec_command[0]:
        raise LocalProtocolError("the handler command is empty")
    with redacting(config_secrets(config)), account_context(config.name):
        await _serve(config, list(exec_command), task_status)


async def _serve(
    config: Config,
    argv: list[str],
    task_status: trio.TaskStatus[MailChannel],
    *,
    env: Mapping[str, str] | None = None,
    store: AsyncStateStore | None = None,
    shared: bool = False,
    metrics: ServiceMetrics | None = None,
) -> None:
    run_env = handler_environment(config) if env is None else env
    limiter = trio.CapacityLimiter(config.max_concurrent_handlers)
    # One set of metrics for the process: this account's own when it runs alone,
    # else the one serve_mail_channels shares (and serves) for every account (None
    # for both without health_listen).
    own_metrics = not shared
    service_metrics = _service_metrics(config) if own_metrics else metrics
    async with open_mail_channel(config, store=store) as channel:
        if service_metrics is not None:
            service_metrics.add_account(config.name, channel)
        async with trio.open_nursery() as nursery:
            if own_metrics:
                await _start_monitoring(nursery, config, {config.name: channel}, service_metrics)
            task_status.started(channel)
            log_event(
                logging.INFO,
                "prxmail serving",
                folder=config.imap_folder,
                user=config.username,
                handler=argv[0],
            )
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
                        _handle,
                        channel,
                        message,
                        argv=argv,
                        env=run_env,
                        limiter=limiter,
                        token=token,
                        metrics=service_metrics,
                    )
                )


def accounts_handler_environment(
    configs: Sequence[Config], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The handlers' environment when several accounts share a process.

    Args:
        configs: Every account of the process.
        environ: As for :func:`handler_environment`.

    Returns:
        The environment without any variable holding *any* account's password: a
        handler of one account never sees another's.
    """
    env = handler_environment(configs[0], environ)
    for config in configs[1:]:
        env = handler_environment(config, env)
    return env


async def serve_mail_channels(
    configs: Sequence[Config],
    *,
    exec_commands: Mapping[str, Sequence[str]] | None = None,
    task_status: trio.TaskStatus[dict[str, MailChannel]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run several accounts in one process, each with its own handler, until cancelled.

    Every account is one task: its own channel (watcher, sender, sender policy), its
    own handler command and ``max_concurrent_handlers``; all of them share one state
    store (one ``state_dir``, one process lock), which keeps each account's state
    apart. Every log line of an account's work carries ``account=NAME``
    (:func:`prxmail._log.account_context`). A server that refuses an account's login
    or is down only makes that account retry; an account whose channel stops on an
    error (:class:`~prxmail.errors.PrxmailError`, ``OSError``) is logged and stays
    stopped while the others go on. Every handler's environment lacks every
    account's password variables.

    Args:
        configs: The accounts (:func:`prxmail.config.load_accounts`).
        exec_commands: Each account's handler argv by account name; an account not
            in it uses its configuration's ``exec``.
        task_status: For ``nursery.start``: started with the open channels by name
            once every account has opened or failed to, if at least one opened.

    Raises:
        LocalProtocolError: no account, names not unique, state directories differ,
            or an account has no handler command.
        StateError: the state directory cannot be used.
        PrxmailError, OSError: every account stopped on an error, or none could
            start (the last account's error).
    """
    state_dir = shared_state_dir(configs)
    commands = dict(exec_commands or {})
    argvs: dict[str, list[str]] = {}
    for config in configs:
        argv = commands.get(config.name, config.exec_command)
        if not argv or not argv[0]:
            raise LocalProtocolError(f"account {config.name!r} has no handler command")
        argvs[config.name] = list(argv)
    env = accounts_handler_environment(configs)
    with contextlib.ExitStack() as secrets:
        for config in configs:
            secrets.enter_context(redacting(config_secrets(config)))
        async with open_state_store(state_dir, retry_policy=retry_policy(configs[0])) as store:
            stopped: list[BaseException] = []
            channels: dict[str, MailChannel] = {}
            metrics = _service_metrics(configs[0])
            try:
                async with trio.open_nursery() as nursery:
                    for config in configs:
                        with account_context(config.name):
                            channel = await nursery.start(
                                functools.partial(
                                    _serve_account,
                                    config,
                                    argvs[config.name],
                                    env=env,
                                    store=store,
                                    stopped=stopped,
                                    metrics=metrics,
                                )
                            )
                        if channel is not None:
                            channels[config.name] = channel
                    if channels:
                        # One health endpoint and one systemd notifier for the process.
                        await _start_monitoring(nursery, configs[0], channels, metrics)
                        task_status.started(channels)
            except BaseExceptionGroup as group:
                raise collapse_exception_group(group) from None
            # Only reached when every account stopped on its own (or none could start).
            if stopped:
                raise stopped[-1]


async def _serve_account(
    config: Config,
    argv: list[str],
    *,
    env: Mapping[str, str],
    store: AsyncStateStore,
    stopped: list[BaseException],
    metrics: ServiceMetrics | None,
    task_status: trio.TaskStatus[MailChannel | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    started = False
    try:
        try:
            async with trio.open_nursery() as inner:
                channel = await inner.start(
                    functools.partial(
                        _serve, config, argv, env=env, store=store, shared=True, metrics=metrics
                    )
                )
                started = True
                task_status.started(channel)
        except BaseExceptionGroup as group:
            raise collapse_exception_group(group) from None
    except (PrxmailError, OSError) as exc:
        # This account only: the others keep their own channels and store rows.
        log_event(
            logging.ERROR,
            "account stopped" if started else "account could not start",
            error=f"{type(exc).__name__}: {exc}",
        )
        stopped.append(exc)
        if not started:
            task_status.started(None)


async def _start_monitoring(
    nursery: trio.Nursery,
    config: Config,
    channels: Mapping[str, MailChannel],
    metrics: ServiceMetrics | None,
) -> None:
    """Start the health endpoint (``health_listen``) and, under systemd, its notifications.

    Raises:
        OSError: the health address cannot be bound (a start-up failure).
    """
    if config.health_listen is not None:
        assert metrics is not None, "health_listen is set, so the metrics exist"
        from prxmail._health import serve_health  # noqa: PLC0415 (see _service_metrics)

        host, port = config.health_listen
        await nursery.start(serve_health, host, port, channels, metrics)
    notifier = Notifier.from_environ(os.environ)
    if notifier is not None:
        await nursery.start(
            functools.partial(supervise, notifier, channels, watchdog=watchdog_interval(os.environ))
        )


def _service_metrics(config: Config) -> ServiceMetrics | None:
    """The service's metrics when ``health_listen`` serves them, else ``None``.

    Nothing reads the metrics but ``GET /metrics``, so a service without the endpoint
    neither keeps them nor loads prometheus-client and h11 (about 1 MB of RSS).
    """
    if config.health_listen is None:
        return None
    from prxmail._metrics import ServiceMetrics  # noqa: PLC0415 (only with the endpoint)

    return ServiceMetrics()
