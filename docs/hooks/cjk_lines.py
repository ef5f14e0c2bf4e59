"""MkDocs hook: a source line break between two Chinese characters is not a space.

Markdown turns a line break inside a paragraph into a newline, and browsers show a newline as a space, which
is right between two English words and wrong between two Chinese characters ("带字二元组 哈希嵌入"). CSS Text
Level 3 lets a browser drop such a break between CJK characters, but the browsers in use do not. So, before
Markdown reads a page, every line that ends with a CJK character (ideographs, CJK and full-width punctuation)
(or with one and a closing ``**`` / ``*``) is joined to the next line when that one starts with one, outside fenced
code blocks, tables and headings
(a line ending in two spaces, Markdown's hard break, keeps its break). Lines that end
or start with anything else (a Latin word, inline code, a link) keep their break and its space.
"""

from __future__ import annotations

import re

CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_ENDS_CJK = re.compile(f"[{CJK}](\\*\\*|\\*|__|_)?$")  # a closing emphasis after it shows nothing
_STARTS_CJK = re.compile(f"^[ \t]*[{CJK}]")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")


def join_cjk_lines(markdown: str) -> str:
    """``markdown`` with the line breaks between two CJK characters removed (see the module docstring)."""
    out: list[str] = []
    fence: str | None = None
    for line in markdown.split("\n"):
        opening = _FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1) == fence:
                fence = None
            out.append(line)
            continue
        if opening:
            fence = opening.group(1)
            out.append(line)
            continue
        previous = out[-1] if out else ""
        # not a table row, a heading or a hard break (two trailing spaces) on the line before
        joinable = not previous.lstrip().startswith(("|", "#")) and not previous.endswith("  ")
        if joinable and _ENDS_CJK.search(previous.rstrip()) and _STARTS_CJK.match(line):
            out[-1] = previous.rstrip() + line.lstrip()
        else:
            out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, **_: object) -> str:
    return join_cjk_lines(markdown)
