"""Composed mail through the real Postfix into Dovecot's Maildir, arriving intact.

compose_message writes its header section itself (RFC 2047 encoded words, folding,
quoted display names) and picks 7bit, quoted-printable or base64 for the body; the
real MTA must accept each shape, deliver our bytes unchanged behind the headers it
prepends, and prxmail's own parser must read back what was composed -- rich replies
(HTML alternative, attachments) included.
"""

from __future__ import annotations

import secrets

import pytest
import trio

from prxmail.compose import OutgoingAttachment, compose_message, compose_reply
from prxmail.message import Address, parse_message
from prxmail.smtp import Security, open_smtp_connection
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHAPES = [
    pytest.param("Re: Quarterly numbers", "Alice Example", "Thanks!\nSee you.", id="ascii"),
    pytest.param(
        "Überprüfung der Größenänderung für München und Zürich " * 6,
        "Jörg Müller-Lüdenscheidt, Ph.D. " * 4,
        "Grüße aus Köln \u2013 schön.\n" * 40 + "x" * 1200,
        id="long-utf8-quoted-printable",
    ),
    pytest.param(
        "日本語のテキストです。" * 20,
        '"Bob" (the \\ builder)',
        "日本語のテキストです。\n" * 100,
        id="cjk-base64",
    ),
    pytest.param(
        "dots and NUL",
        "",
        ".\n..\n.leading\nnul\x00here\rlone cr\nFrom the start\ntrailing  ",
        id="dots-nul-lone-cr",
    ),
]


@pytest.mark.parametrize(("subject", "name", "body"), SHAPES)
async def test_composed_mail_arrives_intact(
    mail_servers: MailServers, subject: str, name: str, body: str
) -> None:
    tag = secrets.token_hex(4)
    sender, rcpt = mail_servers.add_user(f"cf-{tag}"), mail_servers.add_user(f"ct-{tag}")
    out = compose_message(
        from_address=sender.address,
        from_name=name,
        to=Address(rcpt.address, name),
        subject=subject,
        body=body,
        references=[f"<{n}.{'r' * 40}@example.com>" for n in range(20)],
        in_reply_to="<19.rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr@example.com>",
    )
    assert not out.smtputf8
    async with open_smtp_connection(
        mail_servers.host,
        mail_servers.smtp_starttls_port,
        security=Security.STARTTLS,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        await conn.login(sender.address, sender.password)
        result = await conn.send_message(out.envelope_sender, out.envelope_recipients, out.raw)
        assert result.reply.code == 250
    (raw,) = await trio.to_thread.run_sync(mail_servers.wait_for_messages, rcpt, 1, 20)
    # Postfix and Dovecot only prepend their trace headers.
    assert raw.replace(b"\r\n", b"\n").endswith(out.raw.replace(b"\r\n", b"\n"))
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=0)
    assert back.subject == out.subject
    assert back.message_id == out.message_id
    assert back.references == out.references
    assert back.from_ == Address(sender.address, " ".join(name.split()))
    assert back.to == (Address(rcpt.address, " ".join(name.split())),)
    expected_text = body.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    assert back.text.replace("\r\n", "\n").rstrip("\n").replace("\x00", "") == (
        expected_text.rstrip("\n")
    )


async def test_html_and_attachment_reply_arrives_byte_exact_and_threaded(
    mail_servers: MailServers,
) -> None:
    tag = secrets.token_hex(4)
    sender, rcpt = mail_servers.add_user(f"rf-{tag}"), mail_servers.add_user(f"rt-{tag}")
    parent = parse_message(
        f"From: Person <{rcpt.address}>\r\nTo: {sender.address}\r\n"
        "Subject: Quarterly numbers\r\nMessage-ID: <q2.person@example.com>\r\n"
        "References: <q0.person@example.com> <a1.bot@example.com>\r\n"
        "In-Reply-To: <a1.bot@example.com>\r\n\r\nSend the report please.\r\n".encode(),
        uid=1,
        uidvalidity=1,
        max_attachment_bytes=0,
    )
    # Every byte value, several times, and a text file whose line ends must not
    # be touched by anything in between.
    pdf = OutgoingAttachment(
        "Größenbericht Q3 \u2013 final.pdf", "application/pdf", bytes(range(256)) * 300
    )
    csv = OutgoingAttachment("data.csv", "text/csv", b"a,b\r\n1,2\n3,4\r")
    out = compose_reply(
        parent,
        "Here it is.\n-- \nbot",
        from_address=sender.address,
        to=Address(rcpt.address, "Person"),
        default_subject="PRX Message",
        html="<p>Here it is.</p>\n<p>&mdash; bot</p>",
        attachments=[pdf, csv],
    )
    async with open_smtp_connection(
        mail_servers.host,
        mail_servers.smtp_starttls_port,
        security=Security.STARTTLS,
        ssl_context=mail_servers.ssl_context(),
    ) as conn:
        await conn.login(sender.address, sender.password)
        result = await conn.send_message(out.envelope_sender, out.envelope_recipients, out.raw)
        assert result.reply.code == 250
    (raw,) = await trio.to_thread.run_sync(mail_servers.wait_for_messages, rcpt, 1, 20)
    assert raw.replace(b"\r\n", b"\n").endswith(out.raw.replace(b"\r\n", b"\n"))
    back = parse_message(raw, uid=1, uidvalidity=1, max_attachment_bytes=1 << 20)
    assert back.content_type == "multipart/mixed"
    assert back.in_reply_to == "<q2.person@example.com>"
    assert back.references == (
        "<q0.person@example.com>",
        "<a1.bot@example.com>",
        "<q2.person@example.com>",
    )
    assert back.subject == "Re: Quarterly numbers"
    assert back.text.replace("\r\n", "\n").strip() == "Here it is.\n-- \nbot"
    assert back.html is not None
    assert "<p>&mdash; bot</p>" in back.html
    assert [(a.filename, a.content_type, a.content) for a in back.attachments] == [
        (pdf.filename, "application/pdf", pdf.content),
        ("data.csv", "text/csv", csv.content),
    ]
