"""Thread identity: one stable, opaque thread_id per conversation."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import pytest

from prxmail.compose import compose_reply
from prxmail.conversation import (
    THREAD_ID_HEX_CHARS,
    message_thread_id,
    thread_id_from_root,
    thread_lookup_ids,
    thread_root,
)
from prxmail.message import Address, Message, parse_message

ALICE = Address("alice@example.com", "Alice")
BOT = "bot@ours.example"
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def person(message_id: str, **fields: object) -> Message:
    return Message(
        uid=1,
        uidvalidity=1,
        message_id=message_id,
        from_=ALICE,
        from_all=(ALICE,),
        subject="Plans",
        **fields,  # type: ignore[arg-type]
    )


def our_reply(parent: Message) -> Message:
    """Our reply to ``parent``, composed for real and parsed back."""
    out = compose_reply(parent, "ok", from_address=BOT, to=ALICE, default_subject="x", now=NOW)
    return parse_message(out.raw, uid=2, uidvalidity=1, max_attachment_bytes=0)


def test_a_25_round_thread_keeps_one_id() -> None:
    first = person("<q0@example.com>")
    thread = message_thread_id(first)
    assert re.fullmatch(rf"[0-9a-f]{{{THREAD_ID_HEX_CHARS}}}", thread)
    message = first
    for round_ in range(1, 26):
        reply = our_reply(message)
        assert message_thread_id(reply) == thread
        # The person's client: In-Reply-To = our reply, References = our
        # reply's References + its Message-ID.
        message = person(
            f"<q{round_}@example.com>",
            in_reply_to=reply.message_id,
            references=(*reply.references, reply.message_id),
        )
        assert message_thread_id(message) == thread, round_
    # Our replies trim References to 20; the root survived all 25 rounds.
    assert len(message.references) == 21


def test_different_conversations_differ() -> None:
    ids = {message_thread_id(person(f"<start{n}@example.com>")) for n in range(1000)}
    assert len(ids) == 1000


def test_stable_and_independent_of_bracket_form() -> None:
    assert thread_id_from_root("<a@b>") == thread_id_from_root(" a@b ")
    # As documented: the SHA-256 prefix of the normalised root, the same on
    # every host and in every version.
    assert thread_id_from_root("a@b") == hashlib.sha256(b"<a@b>").hexdigest()[:16]


def test_references_truncated_in_the_middle_still_map_to_the_root() -> None:
    root = "<root@example.com>"
    full = person("<m9@example.com>", in_reply_to="<m8@x>", references=(root, "<m1@x>", "<m8@x>"))
    trimmed = person("<m9@example.com>", in_reply_to="<m8@x>", references=(root, "<m8@x>"))
    assert message_thread_id(full) == message_thread_id(trimmed)
    assert message_thread_id(full) == message_thread_id(person(root))


def test_in_reply_to_without_references_names_the_parent_thread() -> None:
    parent = person("<p@example.com>")
    child = person("<c@example.com>", in_reply_to="<p@example.com>")
    assert thread_root(child) == "<p@example.com>"
    assert message_thread_id(child) == message_thread_id(parent)


def test_known_threads_win_over_the_hash() -> None:
    # A client that dropped the root from References still lands in the thread
    # when a message it names is known; the parent (In-Reply-To) is asked first.
    known = {"<ours3@ours.example>": "aaaaaaaaaaaaaaaa", "<old@x>": "bbbbbbbbbbbbbbbb"}
    message = person(
        "<m@example.com>",
        in_reply_to="<ours3@ours.example>",
        references=("<old@x>", "<ours3@ours.example>"),
    )
    assert message_thread_id(message, known=known.get) == "aaaaaaaaaaaaaaaa"
    assert thread_lookup_ids(message) == ("<ours3@ours.example>", "<old@x>")
    assert message_thread_id(message, known={}.get) == thread_id_from_root("<old@x>")


def test_lookups_are_bounded() -> None:
    refs = tuple(f"<r{n}@x>" for n in range(100))
    message = person("<m@x>", references=refs, in_reply_to=refs[-1])
    asked: list[str] = []

    def known(ident: str) -> str | None:
        asked.append(ident)
        return None

    assert message_thread_id(message, known=known) == thread_id_from_root("<r0@x>")
    assert len(asked) == 25
    assert asked[0] == "<r99@x>"


@pytest.mark.parametrize(
    "fields",
    [
        {"references": ("", "<>"), "in_reply_to": "  "},
        {"references": ("<>",)},
        {"in_reply_to": ""},
    ],
)
def test_garbage_headers_fall_back_to_the_next_candidate(fields: dict[str, object]) -> None:
    message = person("<own@example.com>", **fields)
    assert thread_root(message) == "<own@example.com>"


def test_missing_message_id_gives_a_stable_thread() -> None:
    raw = b"From: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
    one = parse_message(raw, uid=7, uidvalidity=3, max_attachment_bytes=0)
    two = parse_message(raw, uid=7, uidvalidity=3, max_attachment_bytes=0)
    assert one.message_id_missing
    assert message_thread_id(one) == message_thread_id(two)
    garbage = person("<>")
    assert re.fullmatch(r"[0-9a-f]{16}", message_thread_id(garbage))
