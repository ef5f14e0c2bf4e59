"""MkDocs hook: one search index per language, and Chinese queries cut into the index's words.

Two things Material for MkDocs (9.x) and mkdocs-static-i18n (1.x) do not do for this site, fixed after the build:

- **One index per language.** mkdocs-static-i18n builds the English pages under ``en/`` and merges both languages'
  entries into one ``search/search_index.json`` (by design), so a search on an English page lists the Chinese
  pages too. Here the merged index is split: ``search/`` keeps the Chinese pages, ``en/search/`` gets the English
  ones (locations relative to ``en/``), and every English page's ``__config.base`` (where Material's search looks
  for ``search/search_index.json`` and from which it resolves result links; nothing else on these pages reads it)
  points at ``en/``.
- **Chinese query segmentation.** Material's search worker cuts each run of Han characters in a query into words
  of the index before searching, and gets it wrong twice. Its cutter never tries a word that ends at the run's
  last character and drops the remainder ("预训练" became "预" and "训"; "分词器" "分词"; "学习率" "学习"). And it
  joins the words with "* ", after which the query transform appends its own "*" to every word, so a word
  reaches the "missing terms" check as "预*", which no indexed word starts with: every result listed "缺少: 预*"
  ("Missing"). Here the cutter covers the whole run with the fewest words the index holds (dynamic programming; a
  character that is no word of the index stands alone), as jieba cut the pages when they were indexed, and the
  words are joined with a space (the transform adds the one trailing wildcard). "预训练" is searched as "预*
  训练*"; a page holding both words lists nothing missing. Material offers no hook for this (its query
  transform runs before the cut), so the shipped worker is edited; if a Material release changes either piece,
  the build fails here rather than search silently breaking.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority

SECOND_LANGUAGE = "en"
"""The language mkdocs-static-i18n builds under its own folder (mkdocs.yml: the default, zh, is at the root)."""

_MATERIAL_CUTTER = re.compile(
    r"function (\w+)\((\w+),(\w+)\)\{let \w+=new Set,\w+=new Uint16Array\(\2\.length\);.*?"
    r"return \w+\.has\(\"\"\)\?new Set\(\[\2\]\):\w+\}"
)
SEGMENT_JS = (
    "function {name}(t,e){{"
    "let n=t.length,b=new Array(n+1).fill(1/0),c=new Array(n+1).fill(0);b[0]=0;"
    "for(let j=1;j<=n;j++)for(let i=Math.max(0,j-16);i<j;i++){{"
    "let w=t.slice(i,j);if((j-i===1||w in e)&&b[i]+1<b[j]){{b[j]=b[i]+1;c[j]=i}}}}"
    "let r=[];for(let j=n;j>0;j=c[j])r.unshift(t.slice(c[j],j));return new Set(r)}}"
)
"""The whole Han run as the fewest words of the index ``e`` (words of up to 16 characters), in order."""
_HAN_JOIN = re.compile(
    r'(\.replace\(new RegExp\("\\\\p\{sc=Han\}\+","gu"\),'
    r'\w+=>\[\.\.\.\w+\(\w+,this\.index\.invertedIndex\)\]\.join\()"\* "\)'
)
_BASE = re.compile(r'("base": ")([^"]*)(")')


@event_priority(-200)  # after mkdocs-static-i18n has built every language and merged the index (-100)
def on_post_build(config, **kwargs) -> None:
    i18n = config.plugins.get("i18n")
    if i18n is not None and getattr(i18n, "building", False):
        return  # a language's own build inside mkdocs-static-i18n's; the merged index comes after the last
    site = Path(config.site_dir)
    split_index(site)
    fix_query_segmentation(site)


def split_index(site: Path) -> None:
    """``search/`` keeps the first language's entries, ``en/search/`` gets the English ones; English pages look
    there."""
    merged = site / "search" / "search_index.json"
    if not merged.is_file():
        return
    index = json.loads(merged.read_text(encoding="utf-8"))
    prefix = f"{SECOND_LANGUAGE}/"
    second = [
        {**doc, "location": doc["location"].removeprefix(prefix)}
        for doc in index["docs"]
        if doc["location"].startswith(prefix)
    ]
    first = [doc for doc in index["docs"] if not doc["location"].startswith(prefix)]
    if not second:
        return  # already split (mkdocs serve rebuilds in place) or a single-language site
    _write_index(site / "search", {**index, "docs": first})
    _write_index(site / SECOND_LANGUAGE / "search", {**index, "docs": second})
    for page in (site / SECOND_LANGUAGE).rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        config_start = html.find('<script id="__config"')
        if config_start < 0:
            continue
        match = _BASE.search(html, config_start)
        base = match.group(2)
        relative = "." if base in ("..", "../") else base.removeprefix("../")
        page.write_text(html[: match.start(2)] + relative + html[match.end(2) :], encoding="utf-8")


def _write_index(directory: Path, index: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(index, ensure_ascii=False, separators=(",", ":"))
    (directory / "search_index.json").write_text(text, encoding="utf-8")
    (directory / "search_index.js").write_text(f"var __index = {text}", encoding="utf-8")  # the offline plugin's


def fix_query_segmentation(site: Path) -> None:
    """Replace the search worker's Han-run cutter with ``SEGMENT_JS`` (see the module docstring)."""
    workers = sorted((site / "assets" / "javascripts" / "workers").glob("search.*.min.js"))
    if not workers:
        raise PluginError(
            "docs/hooks/search_index.py: Material's search worker (assets/javascripts/workers) is missing"
        )
    for worker in workers:
        code = worker.read_text(encoding="utf-8")
        if "let n=t.length,b=new Array(n+1)" in code:
            continue  # already replaced (mkdocs serve rebuilds in place)
        found, joins = _MATERIAL_CUTTER.findall(code), len(_HAN_JOIN.findall(code))
        if len(found) != 1 or joins != 1:
            raise PluginError(
                f"docs/hooks/search_index.py: {worker.name} has {len(found)} Han-run cutter(s) and {joins} join(s) "
                "where 1 of each was expected; Material changed its search worker: check its query segmentation "
                "and update this hook"
            )
        name = found[0][0]
        code = _MATERIAL_CUTTER.sub(SEGMENT_JS.format(name=name).replace("\\", "\\\\"), code)
        worker.write_text(_HAN_JOIN.sub(r'\1" ")', code), encoding="utf-8")
