"""The tutorial site builds strictly and can be read offline: no page loads a script, stylesheet or font from the
network, the math is rendered by the KaTeX shipped in docs/assets, the search index holds Chinese split into words,
and the reference pages hold what the code says (every command's ``--help``, the run-directory layout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import cli_reference  # noqa: E402  (the MkDocs hook, a plain module)

_EXTERNAL = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(https?:)?//[^"]*\"""", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_both_languages_have_every_page(site: Path) -> None:
    zh = sorted(p.relative_to(ROOT / "docs" / "zh") for p in (ROOT / "docs" / "zh").rglob("*.md"))
    en = sorted(p.relative_to(ROOT / "docs" / "en") for p in (ROOT / "docs" / "en").rglob("*.md"))
    assert zh == en and len(zh) >= 20
    for page in zh:
        html = page.with_suffix(".html")
        assert (site / html).is_file() and (site / "en" / html).is_file(), html
    assert '<html lang="zh"' in (site / "index.html").read_text(encoding="utf-8")
    assert '<html lang="en"' in (site / "en" / "index.html").read_text(encoding="utf-8")


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    offenders = []
    for page in site.rglob("*.html"):
        for match in _EXTERNAL.finditer(page.read_text(encoding="utf-8")):
            offenders.append(f"{page.relative_to(site)}: {match.group(0)[:160]}")
    assert not offenders, "\n".join(offenders[:20])
    math = (site / "concepts" / "math.html").read_text(encoding="utf-8")
    assert "assets/katex/katex.min.js" in math and 'class="arithmatex"' in math
    for font in re.findall(r"url\((fonts/[^)]+\.woff2)\)", (site / "assets/katex/katex.min.css").read_text()):
        assert (site / "assets" / "katex" / font).is_file(), font
    assert "assets/iframe-worker/shim.js" in math  # the offline search's shim, not unpkg.com's


def test_the_search_index_splits_chinese_into_words(site: Path) -> None:
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    assert index["config"]["lang"] == ["en"] and "\\u200b" in index["config"]["separator"]
    text = " ".join(doc["text"] for doc in index["docs"])
    assert "\u200b掩码\u200b" in text  # jieba cut 全词掩码 / 掩码语言模型 into words
    assert (site / "search" / "search_index.js").is_file()  # inlined for file:// by the offline plugin


def test_each_language_has_its_own_search_index(site: Path) -> None:
    """docs/hooks/search_index.py splits mkdocs-static-i18n's merged index; English pages look in en/search/."""
    zh, en = (json.loads((d / "search" / "search_index.json").read_text(encoding="utf-8")) for d in (site, site / "en"))
    assert {doc["location"].split("#")[0] for doc in zh["docs"]} == {
        doc["location"].split("#")[0] for doc in en["docs"]
    }
    assert "tutorial.html" in {doc["location"] for doc in en["docs"]}  # relative to en/
    titles = [{doc["location"]: doc["title"] for doc in index["docs"]}["tutorial.html"] for index in (zh, en)]
    assert re.search(r"[\u4e00-\u9fff]", titles[0]) and not re.search(r"[\u4e00-\u9fff]", titles[1]), titles
    assert (site / "en" / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index = {")
    for page, base in (("en/index.html", "."), ("en/concepts/nas.html", ".."), ("concepts/nas.html", "..")):
        assert f'"base": "{base}"' in (site / page).read_text(encoding="utf-8"), page


def test_the_command_reference_is_the_cli_help(site: Path) -> None:
    from lmforge.cli import COMMANDS

    reference = cli_reference.commands_reference()
    for name in COMMANDS:
        assert f"## lmforge {name}\n" in reference, name
    assert "usage: lmforge finetune classify" in reference and "--training.precision {fp32,bf16,fp16,auto}" in reference
    page = (site / "reference" / "commands.html").read_text(encoding="utf-8")
    assert "usage: lmforge data fetch" in page and "lmforge:commands" not in page
    layout = (site / "en" / "reference" / "run-directory.html").read_text(encoding="utf-8")
    assert "trainer_state/step-NNNNNNN/" in layout and "lmforge:run-directory" not in layout
    block = re.search(r"<pre\b.*?</pre>", layout, flags=re.S)  # the layout is a code block, one file per line
    assert block is not None and "RUN_DIR/task.json" in block.group(0) and "``" not in block.group(0)
    assert block.group(0).count("RUN_DIR/") == 8 and "(--resume RUN_DIR reads it)" in re.sub(
        r"<[^>]+>", "", block.group(0)
    )


_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_BROKEN_CJK = re.compile(f"[{_CJK}][ \t]*\n[ \t]*[{_CJK}]")  # a newline in running text shows as a space
_BLOCK_TAG = re.compile(
    r"</?(p|li|td|th|tr|thead|tbody|table|h[1-6]|div|ul|ol|dl|dd|dt|br|hr|blockquote|details|summary|img)\b[^>]*>"
)


def test_no_chinese_page_shows_a_space_where_the_source_broke_a_line(site: Path) -> None:
    """A source line break between two Chinese characters renders as nothing (docs/hooks/cjk_lines.py): the
    article text of every built Chinese page (block boundaries kept apart, code left out) has no CJK, newline, CJK.
    Before the hook: 119 in 21 pages."""
    stray = []
    for page in site.rglob("*.html"):
        if page.relative_to(site).parts[0] in ("en", "assets", "search"):
            continue
        article = re.search(r"<article\b.*?</article>", page.read_text(encoding="utf-8"), flags=re.S)
        if article is None:
            continue
        html = re.sub(r"<(pre|code|script|style)\b.*?</\1>", "\0", article.group(0), flags=re.S)
        text = re.sub(r"<[^>]+>", "", _BLOCK_TAG.sub("\0", html))
        stray += [f"{page.relative_to(site)}: {m.group(0)!r}" for m in _BROKEN_CJK.finditer(text)]
    assert not stray, "\n".join(stray[:20])


def test_the_line_join_keeps_code_tables_headings_and_latin_breaks() -> None:
    from cjk_lines import join_cjk_lines

    rest = "\nEnglish\n## 标题\n正文 end\n硬换行  \n下一行\n```\n代码\n行\n```\n| 表 |\n格"
    source = "带字二元组\n哈希嵌入，\n  继续。" + rest
    assert join_cjk_lines(source) == "带字二元组哈希嵌入，继续。" + rest
    assert join_cjk_lines("**问题？**\n回答，*强调。*\n下一句") == "**问题？**回答，*强调。*下一句"


CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not (CHROMIUM or os.environ.get("CI")), reason="no Chromium installed (apt-get install chromium)")
def test_the_diagrams_are_drawn_offline_in_a_browser(site: Path) -> None:
    """The ```mermaid blocks become diagrams in headless Chromium opened on the files, with every http(s) request
    refused: the Mermaid shipped in docs/assets/mermaid draws them (Material would otherwise fetch unpkg.com's). A
    diagram Mermaid could not draw stays an empty box, 0 pixels high. CI installs Chromium, so there this runs."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must run the browser test: install Debian's chromium (see .ci/run)"
    pages = sorted({p for p in site.rglob("*.html") if '<pre class="mermaid">' in p.read_text(encoding="utf-8")})
    assert site / "concepts" / "basics.html" in pages and site / "en" / "concepts" / "basics.html" in pages
    refused: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(
            "**/*",
            lambda route: (
                (refused.append(route.request.url), route.abort())
                if route.request.url.startswith(("http:", "https:"))
                else route.continue_()
            ),
        )
        for html in pages:
            source = html.read_text(encoding="utf-8").count('<pre class="mermaid">')
            page.goto(html.as_uri())
            diagrams = page.locator("div.mermaid")
            page.wait_for_function(
                f"Array.from(document.querySelectorAll('div.mermaid')).filter(d => d.offsetHeight > 40).length"
                f" === {source}",
                timeout=20_000,
            )
            heights = [diagrams.nth(i).bounding_box()["height"] for i in range(diagrams.count())]
            assert len(heights) == source and min(heights) > 40, (html, heights)
        browser.close()
    assert not refused and not errors, (refused[:5], errors[:5])


def _search(page, html: Path, query: str) -> list[tuple[str, str]]:
    """The (link, missing terms) of each result of ``query`` in the search box of ``html``, opened from the disk."""
    page.goto(html.as_uri())
    page.wait_for_function("document.querySelector('.md-search-result__meta') !== null")
    page.click("input.md-search__input")
    page.fill("input.md-search__input", query)
    page.keyboard.press("End")  # the search listens for keys; fill alone types nothing it hears
    page.wait_for_selector("li.md-search-result__item", timeout=30_000)  # the worker reads the index first
    items = page.locator("li.md-search-result__item")
    found = []
    for i in range(items.count()):
        terms = items.nth(i).locator(".md-search-result__terms")
        missing = terms.first.inner_text().split(":", 1)[-1].strip() if terms.count() else ""
        found.append((items.nth(i).locator("a").first.get_attribute("href"), missing))
    return found


@pytest.mark.skipif(not (CHROMIUM or os.environ.get("CI")), reason="no Chromium installed (apt-get install chromium)")
def test_search_finds_chinese_words_and_stays_in_its_language(site: Path) -> None:
    """In headless Chromium on the files: "预训练" finds the pages that hold it with nothing listed as missing
    (Material's own cutter searched "预* 训" and listed "缺少: 预*" on every result; docs/hooks/search_index.py),
    and each language's search lists only its own pages (mkdocs-static-i18n merges the two indexes)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must run the browser test: install Debian's chromium (see .ci/run)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        chinese = _search(page, site / "index.html", "预训练")
        english = _search(page, site / "en" / "concepts" / "nas.html", "checkpoint")
        browser.close()
    assert len(chinese) >= 5 and not any("/en/" in link for link, _ in chinese), chinese
    top = [link.split("?")[0].removeprefix(site.as_uri()) for link, _ in chinese[:2]]
    assert top == ["/tutorial.html", "/concepts/objectives.html"], chinese[:2]  # the pages titled with the word
    assert [missing for _, missing in chinese[:2]] == ["", ""], chinese[:2]
    assert len(english) >= 5 and all(link.startswith((site / "en").as_uri() + "/") for link, _ in english), english
