"""The readable text of an HTML page, with the standard library's parser: what a reader sees
in the page's main content, one paragraph per block element, without scripts, styles,
navigation bars, headers and footers (Sphinx's related / sphinxsidebar divs included)."""
from __future__ import annotations

import re
from html.parser import HTMLParser

# Elements whose whole content is never text for a reader.
_SKIPPED = {"script", "style", "nav", "header", "footer", "head", "noscript", "template"}
# Sphinx (and many generators) put navigation in divs of these classes: Sphinx's own theme
# (related, sphinxsidebar), the Read the Docs theme (wy-breadcrumbs, rst-footer-buttons: the
# kernel's documentation) and DocBook (navheader, navfooter: PostgreSQL's); a headerlink is
# the pilcrow permalink after every heading.
_SKIPPED_CLASSES = {"related", "sphinxsidebar", "footer", "navigation", "breadcrumbs",
                    "headerlink", "wy-breadcrumbs", "rst-footer-buttons", "navheader",
                    "navfooter"}
# Elements that end a paragraph.
_BLOCKS = {"p", "div", "section", "article", "li", "dt", "dd", "pre", "blockquote", "table",
           "tr", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "ul", "ol", "dl"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed",
         "source", "track", "wbr"}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, skipped) of each open element
        self._pre = 0

    @property
    def _skipping(self) -> bool:
        return any(skipped for _, skipped in self._stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self._end_paragraph()
        if tag in _VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        self._stack.append((tag, tag in _SKIPPED or bool(classes & _SKIPPED_CLASSES)))
        self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(t == tag for t, _ in self._stack):
            return  # a stray end tag: HTML in the wild has them
        if tag in _BLOCKS:  # before the element closes: a <pre> keeps its lines
            self._end_paragraph()
        while self._stack:  # close what the page left open inside this element
            open_tag, _ = self._stack.pop()
            self._pre -= open_tag == "pre"
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._current.append(data)

    def _end_paragraph(self) -> None:
        text = "".join(self._current)
        self._current = []
        if self._pre:
            text = text.strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text:
            self.paragraphs.append(text)


def html_to_text(html: str) -> str:
    """Paragraphs separated by blank lines; code blocks (<pre>) keep their lines."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    parser._end_paragraph()
    return "\n\n".join(parser.paragraphs)
