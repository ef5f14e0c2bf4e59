"""The web page in a real browser: headless Chromium (the Debian package) driven by Playwright.

CI installs ``chromium`` with apt-get before ``make test`` (.ci/run), so there this test always runs;
elsewhere it is skipped when no Chromium is installed (Playwright never downloads a browser here).

The screenshots it takes go to a temporary directory, or to ``$LMFORGE_SCREENSHOTS`` when that is set: the docs'
pictures of the page (``docs/assets/screenshots``) are made with
``LMFORGE_SCREENSHOTS=docs/assets/screenshots pytest tests/serve/test_page.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("CI"):
    raise RuntimeError("CI must run the browser test: install Debian's chromium (see .ci/run)")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium installed (apt-get install chromium)")

# What the NER tab shows is decided by the model; to check the highlighting itself, the page is given a known
# answer (the real /v1/ner endpoint is covered in test_api.py).
KNOWN_ENTITIES = {
    "model": "ner",
    "data": [
        {
            "entities": [
                {"type": "PER", "start": 5, "end": 7, "text": "李鹏", "score": 0.97},
                {"type": "LOC", "start": 10, "end": 12, "text": "北京", "score": 0.93},
            ]
        }
    ],
}


NER_TEXT = "国务院总理李鹏今天在北京会见了日本客人。"
KNOWN_EXPLANATION = {
    "model": "ner",
    "method": "ig",
    "data": [
        {
            "text": NER_TEXT,
            "target": "PER 李鹏",
            "method": "ig",
            "value": 0.9,
            "delta": 0.001,
            "tokens": [
                {"token": c, "start": i, "end": i + 1, "score": 0.5 if c == "总" else -0.1 if c == "天" else 0.0}
                for i, c in enumerate(NER_TEXT)
            ],
            "extra": {},
        }
    ],
}


def test_chat_classify_and_ner_in_chromium(live_server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("LMFORGE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(live_server + "/")
        expect(page.locator("#chat .model option")).to_have_count(1)  # the models were listed

        # chat: type, send, the reply streams in and the status names the model and its latency
        page.fill("#chat-input", "我爱北京")
        page.click("#chat-send")
        reply = page.locator("#chat-log .msg.assistant")
        expect(reply).to_have_attribute("data-done", "true", timeout=20_000)
        assert reply.inner_text().strip(), page.locator("#chat .status").inner_text()
        expect(page.locator("#chat .status")).to_contain_text("answered by chat in")
        page.fill("#chat-input", "天安门")  # a second turn keeps the history
        page.keyboard.press("Enter")
        expect(page.locator("#chat-log .msg.assistant")).to_have_count(2)
        expect(page.locator("#chat-log .msg.assistant").nth(1)).to_have_attribute("data-done", "true", timeout=20_000)

        # classification: a label with a probability bar per label
        page.click("nav button[data-tab=classify]")
        page.fill("#classify-input", "房间干净，服务周到")
        page.click("#classify-send")
        expect(page.locator("#classify-out .label-row")).to_have_count(2)
        expect(page.locator("#classify .status")).to_contain_text("answered by classify")
        # why? the real /v1/explain: one line, one shaded span per character, the strongest the full colour
        page.click("#classify-why")
        expect(page.locator("#classify .status")).to_contain_text("explained by classify", timeout=20_000)
        spans = page.locator("#classify-why-out .why-text span")
        expect(spans).to_have_count(len("房间干净，服务周到"))
        assert page.locator("#classify-why-out .why-text").inner_text() == "房间干净，服务周到"
        colours = {spans.nth(i).evaluate("e => e.style.background") for i in range(spans.count())}
        assert "rgb(255, 64, 64)" in colours or "rgb(64, 115, 255)" in colours, colours
        page.screenshot(path=str(shots / "classify-why.png"), full_page=True)

        # NER: entities highlighted by type, at their character offsets
        page.route("**/v1/ner", lambda route: route.fulfill(json=KNOWN_ENTITIES))
        page.click("nav button[data-tab=ner]")
        page.fill("#ner-input", NER_TEXT)
        page.click("#ner-send")
        marks = page.locator("#ner-out mark.ent")
        expect(marks).to_have_count(2)
        assert [marks.nth(i).inner_text() for i in range(2)] == ["李鹏", "北京"]
        assert [marks.nth(i).get_attribute("data-type") for i in range(2)] == ["PER", "LOC"]
        assert page.locator("#ner-out").inner_text().startswith("国务院总理李鹏")
        page.screenshot(path=str(shots / "ner.png"), full_page=True)
        # why? for entities: a known answer, drawn at its offsets with red / blue by sign
        page.route("**/v1/explain", lambda route: route.fulfill(json=KNOWN_EXPLANATION))
        page.click("#ner-why")
        expect(page.locator("#ner-why-out .why-line")).to_have_count(1)
        expect(page.locator("#ner-why-out .why-head")).to_contain_text("PER 李鹏")
        strongest = page.locator("#ner-why-out .why-text span[data-score='0.5']")
        assert strongest.inner_text() == "总" and strongest.evaluate("e => e.style.background") == "rgb(255, 64, 64)"
        lowered = page.locator("#ner-why-out .why-text span[data-score='-0.1']")
        assert lowered.inner_text() == "天" and lowered.evaluate("e => e.style.background") == "rgb(217, 227, 255)"

        page.click("nav button[data-tab=chat]")
        page.screenshot(path=str(shots / "chat.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (shots / "chat.png").stat().st_size > 10_000
