"""html_to_text: readable text out of HTML mail, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prxmail._html import MAX_NESTING_SHOWN, html_to_text


def test_paragraphs_become_blank_line_separated_blocks() -> None:
    assert html_to_text("<p>one</p><p>two</p>") == "one\n\ntwo"


def test_whitespace_collapses_like_a_browser() -> None:
    assert html_to_text("<p>  many\n\n   spaces\there  </p>") == "many spaces here"


def test_br_breaks_a_line_and_two_make_an_empty_line() -> None:
    assert html_to_text("a<br>b<br/><br>c") == "a\nb\n\nc"


def test_paragraph_break_survives_a_following_br() -> None:
    assert html_to_text("<p>a</p><br>b") == "a\n\nb"


def test_divs_and_table_rows_are_lines() -> None:
    html = (
        "<div>one</div><div>two</div>"
        "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
    )
    assert html_to_text(html) == "one\ntwo\n\na b\nc"


@pytest.mark.parametrize("level", range(1, 7))
def test_headings_are_their_own_block(level: int) -> None:
    assert html_to_text(f"intro<h{level}>Title</h{level}>body") == "intro\n\nTitle\n\nbody"


def test_unordered_list_items_get_dashes_and_nesting_indents() -> None:
    html = "<p>Items:</p><ul><li>one</li><li>two<ul><li>inner</li></ul></li></ul>end"
    assert html_to_text(html) == "Items:\n\n- one\n- two\n  - inner\n\nend"


def test_ordered_list_items_are_numbered_from_start() -> None:
    assert html_to_text('<ol start="3"><li>c<li>d</ol>') == "3. c\n4. d"
    assert html_to_text('<ol start="x"><li>a</ol>') == "1. a"


def test_list_item_outside_a_list_still_gets_a_marker() -> None:
    assert html_to_text("<li>stray</li>") == "- stray"


def test_entities_are_decoded() -> None:
    text = html_to_text("<p>Fish &amp; chips &lt;3 &eacute;t&eacute; &#x1F600; &#169;&nbsp;x</p>")
    assert text == "Fish & chips <3 été 😀 © x"


def test_style_script_head_and_title_are_dropped() -> None:
    html = (
        "<html><head><title>Secret title</title><style>p { color: red }</style>"
        "<script>var x = '<p>no</p>';</script></head>"
        "<body><p>Visible</p><script>alert('x')</script></body></html>"
    )
    assert html_to_text(html) == "Visible"


def test_unclosed_head_ends_at_body() -> None:
    assert html_to_text("<head><meta charset=utf-8><title>t</title><body>text") == "text"


def test_comments_and_outlook_conditionals_are_ignored() -> None:
    html = "<!--[if mso]><p>only outlook</p><![endif]--><p>shown</p><!-- hidden -->"
    assert html_to_text(html) == "shown"


def test_pre_keeps_spacing_and_lines() -> None:
    html = "<p>code:</p><pre>  x = 1\n\n      y  =  2</pre><p>after</p>"
    assert html_to_text(html) == "code:\n\n  x = 1\n\n      y  =  2\n\nafter"


def test_blockquote_lines_are_prefixed() -> None:
    html = "<p>I agree.</p><blockquote><p>Original one</p><p>Original two</p></blockquote>"
    assert html_to_text(html) == "I agree.\n\n> Original one\n>\n> Original two"


def test_nested_blockquotes_stack_prefixes() -> None:
    html = "<blockquote>outer<blockquote>inner</blockquote></blockquote>"
    # The blank line between the two is still inside the outer quote.
    assert html_to_text(html) == "> outer\n>\n> > inner"


def test_link_with_different_text_shows_the_url() -> None:
    assert html_to_text('<a href="https://x.org/a?b=1">Read more</a>') == (
        "Read more (https://x.org/a?b=1)"
    )


def test_link_whose_text_is_the_url_is_not_repeated() -> None:
    assert html_to_text('<a href="https://x.org/">https://x.org</a>') == "https://x.org"
    assert html_to_text('<a href="mailto:bob@x.org">bob@x.org</a>') == "bob@x.org"
    assert html_to_text('<a href="https://x.org/">x.org</a>') == "x.org"


def test_link_without_text_shows_the_url() -> None:
    assert html_to_text('see <a href="https://x.org/p"></a>') == "see (https://x.org/p)"


@pytest.mark.parametrize(
    "href", ["javascript:alert(1)", "data:text/html,hi", "cid:img1@x", "#top", ""]
)
def test_script_data_cid_and_anchor_links_are_not_shown(href: str) -> None:
    assert html_to_text(f'<a href="{href}">label</a>') == "label"


def test_inline_elements_do_not_break_words() -> None:
    assert html_to_text("<p>He<b>ll</b>o <i>big</i> <span>world</span></p>") == "Hello big world"


def test_image_alt_text_is_kept() -> None:
    assert html_to_text('<p>Logo: <img src="cid:x" alt="ACME  Corp"> here</p>') == (
        "Logo: ACME Corp here"
    )


def test_invisible_preheader_padding_is_removed() -> None:
    assert html_to_text(
        "<div>Hi\u200c\u00ad&zwnj;\u200b</div><div>\u200b</div><div>there</div>"
    ) == ("Hi\nthere")


def test_hidden_preview_text_is_dropped() -> None:
    html = (
        '<div style="display: none; max-height:0">Preview &zwnj;&nbsp;text'
        "<div>nested <div>deeper</div></div> still hidden</div>"
        "<p hidden>also hidden</p><p>Visible</p>"
    )
    assert html_to_text(html) == "Visible"


def test_display_block_is_not_hidden() -> None:
    assert html_to_text('<div style="display:block">shown</div>') == "shown"


def test_hidden_void_element_does_not_hide_what_follows() -> None:
    assert html_to_text('a<br style="display:none">b<img hidden alt="x">c') == "abc"
    assert html_to_text('<div>a<img style="display:none" alt="x"/>b</div>c') == "ab\nc"


def test_empty_div_line_as_mail_clients_write_it() -> None:
    html = (
        "<div>On Mon, Bob wrote:</div><blockquote><div>Can you check <b>this</b>?</div>"
        "<div><br></div><div>Bob</div></blockquote><div>Sure, done.</div>"
    )
    assert html_to_text(html) == (
        "On Mon, Bob wrote:\n\n> Can you check this?\n>\n> Bob\n\nSure, done."
    )


def test_hr_is_a_separator_line() -> None:
    assert html_to_text("above<hr>below") == "above\n---\nbelow"


def test_no_leading_or_trailing_blank_lines_and_no_trailing_spaces() -> None:
    text = html_to_text("<p></p><div> </div><p>x </p><p> </p><br><br>")
    assert text == "x"


def test_empty_and_text_only_input() -> None:
    assert html_to_text("") == ""
    assert html_to_text("just text") == "just text"


def test_deep_nesting_is_capped_in_layout() -> None:
    depth = 5000
    text = html_to_text("<ul>" * depth + "<li>deep</li>" + "</ul>" * depth)
    assert text == "  " * MAX_NESTING_SHOWN + "- deep"
    quoted = html_to_text("<blockquote>" * depth + "q" + "</blockquote>" * depth)
    assert quoted == "> " * MAX_NESTING_SHOWN + "q"


def test_unbalanced_markup_is_tolerated() -> None:
    assert html_to_text("<p>one<div>two</p></span></ul></blockquote>three") == "one\ntwo\n\nthree"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_never_raises_on_arbitrary_text(html: str) -> None:
    text = html_to_text(html)
    assert isinstance(text, str)
    assert all(line == line.rstrip() for line in text.split("\n"))


_TAGS = st.sampled_from(
    ["p", "div", "br", "li", "ul", "ol", "pre", "blockquote", "a", "script", "head", "td"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            _TAGS.map(lambda t: f"<{t}>"),
            _TAGS.map(lambda t: f"</{t}>"),
            st.just('<a href="https://x.org">'),
            st.text(alphabet="ab &;<>\n\t#", max_size=8),
        ),
        max_size=40,
    )
)
def test_never_raises_on_tag_soup(pieces: list[str]) -> None:
    text = html_to_text("".join(pieces))
    assert not text.startswith("\n")
    assert not text.endswith("\n")
