"""HTML mail bodies turned into readable plain text.

Theory of operation
-------------------

Handlers (people's scripts, language models) want the words of a message, laid out
the way a mail client would show them, not a tag soup with the tags deleted. The
converter is a :class:`html.parser.HTMLParser` subclass that builds the output *line
by line*:

* Text outside ``<pre>`` has every run of white space collapsed to one space, the way
  a browser renders it; inside ``<pre>`` it is kept as it is.
* Block elements do not print anything themselves; they *request* a line break (one
  for ``div``/``li``/``tr``/``br``, a blank line for ``p``/headings/``blockquote``/
  lists/tables). Requests are merged -- the largest wins -- and only acted on when the
  next text arrives, so nested blocks never pile up empty lines and the output never
  starts with blank lines.
* A new line starts with the current prefix: ``"> "`` per ``blockquote`` level and
  the indentation of nested lists. List items get ``"- "`` (``"1. "``, ``"2. "`` ...
  inside ``<ol>``).
* ``script``, ``style``, ``head``, ``title`` and ``template`` content is dropped, and
  so is every element marked ``hidden`` or styled ``display: none`` (preview text).
  Comments (including Outlook's ``<!--[if mso]>`` blocks) are ignored. Entities are
  decoded by the parser (``convert_charrefs``).
* A link whose visible text differs from its target is written ``text (url)``;
  ``javascript:``, ``data:`` and ``cid:`` targets are never shown.

Nothing here raises on bad markup: the stdlib parser is forgiving, unknown or
unbalanced tags are ignored, and nesting depth only affects layout up to a cap.
"""

from __future__ import annotations

from html.parser import HTMLParser

__all__ = ["html_to_text"]

# Indentation and quote prefixes grow with nesting. Hostile markup can nest a
# million <ul> or <blockquote> tags; without a cap every output line would carry a
# prefix as long as the nesting, making the output quadratic in the input. Eight
# levels is deeper than any real mail renders readably.
MAX_NESTING_SHOWN = 8

# Elements whose content is not text a reader sees.
_DROPPED = frozenset({"script", "style", "head", "title", "template"})

# Requested breaks: 1 = start a new line, 2 = leave one blank line.
_LINE = 1
_PARAGRAPH = 2
_BLOCK_BREAKS: dict[str, int] = {
    "address": _LINE,
    "article": _PARAGRAPH,
    "aside": _PARAGRAPH,
    "blockquote": _PARAGRAPH,
    "caption": _LINE,
    "center": _LINE,
    "dd": _LINE,
    "details": _LINE,
    "dialog": _LINE,
    "div": _LINE,
    "dl": _PARAGRAPH,
    "dt": _LINE,
    "fieldset": _LINE,
    "figcaption": _LINE,
    "figure": _PARAGRAPH,
    "footer": _LINE,
    "form": _LINE,
    "h1": _PARAGRAPH,
    "h2": _PARAGRAPH,
    "h3": _PARAGRAPH,
    "h4": _PARAGRAPH,
    "h5": _PARAGRAPH,
    "h6": _PARAGRAPH,
    "header": _LINE,
    "hr": _LINE,
    "li": _LINE,
    "main": _LINE,
    "nav": _LINE,
    "ol": _PARAGRAPH,
    "p": _PARAGRAPH,
    "pre": _PARAGRAPH,
    "section": _PARAGRAPH,
    "summary": _LINE,
    "table": _PARAGRAPH,
    "tbody": _LINE,
    "tfoot": _LINE,
    "thead": _LINE,
    "tr": _LINE,
    "ul": _PARAGRAPH,
}

# Characters that render as nothing. Marketing mail pads its preview text with
# hundreds of them; left in, they would make "empty" lines that are not empty.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u034f\u200b\u200c\u200d\u2060\ufeff"))

_HIDDEN_LINK_SCHEMES = ("javascript:", "data:", "cid:", "vbscript:")

# Elements without content: never "hidden" containers.
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)


def _is_hidden(attributes: dict[str, str | None]) -> bool:
    """Whether an element is not rendered: ``hidden`` or ``display: none``.

    Newsletters hide their "preview text" this way; it is not part of the message.
    """
    if "hidden" in attributes:
        return True
    style = "".join((attributes.get("style") or "").split()).lower()
    return "display:none" in style


class _TextRenderer(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._lines: list[str] = []
        self._current: list[str] = []  # pieces of the line being built
        self._line_open = False  # the current line has a prefix written
        self._want_break = 0  # largest break requested since the last text
        self._pending_space = False
        self._dropping: dict[str, int] = {}
        self._pre = 0
        self._quote = 0
        self._line_quote = 0  # quote depth of the last line started
        self._lists: list[list[int]] = []  # per open list: [is_ordered, next number]
        self._marker: str | None = None  # "- " / "3. " waiting for the item's text
        self._links: list[tuple[str, list[str]]] = []  # (href, text seen inside)
        self._cell_in_row = 0
        self._hidden_tag: str | None = None  # element hidden by display:none / hidden
        self._hidden_depth = 0

    # -- output primitives ------------------------------------------------------

    def _prefix(self) -> str:
        quote = "> " * min(self._quote, MAX_NESTING_SHOWN)
        indent = "  " * min(max(len(self._lists) - 1, 0), MAX_NESTING_SHOWN)
        return quote + indent

    def _break(self, kind: int) -> None:
        self._want_break = max(self._want_break, kind)
        self._pending_space = False

    def _end_line(self) -> None:
        self._lines.append("".join(self._current).rstrip())
        self._current = []
        self._line_open = False

    def _emit(self, text: str) -> None:
        """Put inline text on the output, acting on any pending break first."""
        if not text:
            return
        if self._want_break and (self._lines or self._current):
            if self._line_open:
                self._end_line()
            if self._want_break >= _PARAGRAPH and self._lines and self._lines[-1] != "":
                # The blank line between two blocks belongs to the shallower quote.
                depth = min(self._quote, self._line_quote, MAX_NESTING_SHOWN)
                self._lines.append(("> " * depth).rstrip())
            self._pending_space = False
        self._want_break = 0
        if not self._line_open:
            self._current.append(self._prefix())
            self._line_open = True
            self._line_quote = self._quote
            self._pending_space = False
        if self._marker is not None:
            self._current.append(self._marker)
            self._marker = None
            self._pending_space = False
        if self._pending_space:
            self._current.append(" ")
            self._pending_space = False
        self._current.append(text)
        if self._links:
            self._links[-1][1].append(text)

    def _emit_flowing(self, data: str) -> None:
        words = data.split()
        if not words:
            if data and (self._line_open or self._lines):
                self._pending_space = True
            return
        if data[0].isspace() and self._line_open:
            self._pending_space = True
        self._emit(" ".join(words))
        if data[-1].isspace():
            self._pending_space = True

    def _emit_pre(self, data: str) -> None:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for i, line in enumerate(lines):
            if i:
                if not self._line_open:
                    # An empty line inside <pre> is content, keep it.
                    self._current.append(self._prefix())
                self._end_line()
                self._want_break = 0
            if line:
                self._emit(line)

    # -- parser callbacks -------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            # Many mails never close <head>; <body> ends it regardless.
            self._dropping.pop("head", None)
            self._dropping.pop("title", None)
            return
        if tag in _DROPPED:
            self._dropping[tag] = self._dropping.get(tag, 0) + 1
            return
        if self._dropping:
            return
        if self._hidden_tag is not None:
            if tag == self._hidden_tag:
                self._hidden_depth += 1
            return
        attributes = dict(attrs)
        if _is_hidden(attributes):
            if tag not in _VOID:  # a hidden <br>/<img> just shows nothing
                self._hidden_tag = tag
                self._hidden_depth = 1
            return
        if tag in _BLOCK_BREAKS:
            nested_list = tag in ("ul", "ol") and bool(self._lists)
            self._break(_LINE if nested_list else _BLOCK_BREAKS[tag])
        if tag == "br":
            if self._line_open:
                self._end_line()
                if self._want_break:
                    # <div><br></div>: the block would end the line anyway, so the
                    # <br> shows as an empty line of its own.
                    self._lines.append(self._prefix().rstrip())
                    self._want_break = 0
            elif self._want_break == 0 and self._lines:
                # A second <br> in a row: the empty line is what it shows.
                self._lines.append(self._prefix().rstrip())
            self._pending_space = False
        elif tag in ("ul", "ol"):
            start = 1
            if tag == "ol":
                try:
                    start = int(attributes.get("start") or 1)
                except ValueError:
                    start = 1
            self._lists.append([tag == "ol", start])
        elif tag == "li":
            if not self._lists:
                self._lists.append([False, 1])
            ordered, number = self._lists[-1]
            if ordered:
                self._marker = f"{number}. "
                self._lists[-1][1] = number + 1
            else:
                self._marker = "- "
        elif tag == "blockquote":
            self._quote += 1
        elif tag == "pre":
            self._pre += 1
        elif tag == "tr":
            self._cell_in_row = 0
        elif tag in ("td", "th"):
            if self._cell_in_row:
                self._pending_space = True
            self._cell_in_row += 1
        elif tag == "hr":
            self._emit("---")
            self._break(_LINE)
        elif tag == "img":
            alt = " ".join((attributes.get("alt") or "").split())
            if alt:
                self._emit_flowing(f" {alt} ")
        elif tag == "a":
            href = (attributes.get("href") or "").strip()
            if len(self._links) < MAX_NESTING_SHOWN:
                self._links.append((href, []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <img/>, <hr/>: no content, so no end tag bookkeeping.
        self.handle_starttag(tag, attrs)
        if tag not in _VOID and tag != "a":
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED:
            count = self._dropping.get(tag, 0)
            if count <= 1:
                self._dropping.pop(tag, None)
            else:
                self._dropping[tag] = count - 1
            return
        if self._dropping:
            return
        if self._hidden_tag is not None:
            if tag == self._hidden_tag:
                self._hidden_depth -= 1
                if self._hidden_depth == 0:
                    self._hidden_tag = None
            return
        if tag in _BLOCK_BREAKS and tag != "hr":
            nested_list = tag in ("ul", "ol") and len(self._lists) > 1
            self._break(_LINE if nested_list else _BLOCK_BREAKS[tag])
        if tag in ("ul", "ol"):
            if self._lists:
                self._lists.pop()
        elif tag == "li":
            self._marker = None
        elif tag == "blockquote":
            self._quote = max(self._quote - 1, 0)
        elif tag == "pre":
            self._pre = max(self._pre - 1, 0)
        elif tag == "a" and self._links:
            href, seen = self._links.pop()
            if self._links:
                self._links[-1][1].extend(seen)
            shown = _link_suffix(href, " ".join(seen))
            if shown:
                self._emit_flowing(f" ({shown})")

    def handle_data(self, data: str) -> None:
        if self._dropping or self._hidden_tag is not None:
            return
        data = data.translate(_INVISIBLE)
        if self._pre:
            self._emit_pre(data)
        else:
            self._emit_flowing(data)

    def render(self) -> str:
        if self._line_open:
            self._end_line()
        out: list[str] = []
        for line in self._lines:
            # A blank line is one that shows nothing but quote markers.
            if line.strip("> ") == "" and out and out[-1].strip("> ") == "":
                continue
            out.append(line)
        while out and out[-1].strip("> ") == "":
            out.pop()
        while out and out[0].strip("> ") == "":
            out.pop(0)
        return "\n".join(out)


def _link_suffix(href: str, text: str) -> str:
    """The URL to show after a link's text, or "" when it adds nothing."""
    if not href or href.startswith("#"):
        return ""
    lowered = href.lower()
    if lowered.startswith(_HIDDEN_LINK_SCHEMES):
        return ""
    if any(ch.isspace() for ch in href) or any(ord(ch) < 32 for ch in href):
        href = "".join(href.split())

    def bare(value: str) -> str:
        value = value.strip().lower()
        for scheme in ("mailto:", "tel:", "https://", "http://"):
            if value.startswith(scheme):
                value = value[len(scheme) :]
                break
        return value.rstrip("/")

    if not text.strip() or bare(text) == bare(href):
        return "" if text.strip() else href
    return href


def html_to_text(html: str) -> str:
    """Render an HTML mail body as readable plain text.

    Block elements become line breaks (paragraphs, headings, quotes and lists get a
    blank line around them), list items are marked ``"- "`` (numbered in ``<ol>``),
    ``blockquote`` lines are prefixed with ``"> "``, entities are decoded, white space
    is collapsed as a browser would (``<pre>`` is kept verbatim), ``script``/``style``/
    ``head`` are dropped, and links read ``text (url)`` when the text is not the URL
    itself.

    Args:
        html: The HTML document or fragment, already decoded to ``str``.

    Returns:
        The text, lines separated by ``"\\n"``, without leading or trailing blank
        lines and with no line ending in white space. Empty for empty input.

    Raises:
        Nothing for any markup: the parser is lenient and malformed input yields
        best-effort text.
    """
    renderer = _TextRenderer()
    renderer.feed(html)
    renderer.close()
    return renderer.render()
