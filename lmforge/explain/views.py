"""Pictures of ``explain/``'s explanations: a self-contained HTML page and a PNG, the text with each token
shaded by its score (red: raises the explained output, blue: lowers it; the strongest token of each explanation
is the full colour).

The HTML needs nothing at view time (inline CSS, no script, no font download). The PNG is drawn by matplotlib
with a CJK font from the system (Debian: ``fonts-wqy-microhei`` or ``fonts-noto-cjk``; ``.ci/run`` installs the
first): without one, Chinese would be drawn as empty boxes, so ``cjk_font`` refuses before any work is done.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import UserError
from lmforge.explain.attribution import Explanation
from lmforge.files import atomic_write

CJK_FONTS = ("WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Droid Sans Fallback")


def _rgb(score: float, scale: float) -> tuple[float, float, float]:
    """White to red for positive, white to blue for negative scores, by |score| / scale."""
    t = 0.0 if scale <= 0 else min(abs(score) / scale, 1.0)
    return (1.0, 1.0 - 0.75 * t, 1.0 - 0.75 * t) if score >= 0 else (1.0 - 0.75 * t, 1.0 - 0.55 * t, 1.0)


def _scale(ex: Explanation) -> float:
    return max((abs(t.score) for t in ex.tokens), default=0.0)


PNG_LINES_EACH = 15
"""Most lines of text the PNG draws of one explanation (40 characters a line; the HTML page has all of it)."""
PNG_LINES = 60
"""Most lines of text in one PNG; the explanations past them are on the HTML page only (the PNG says so). Each
character is drawn on its own (about 6 ms on 2 cores), so this also bounds the drawing to about 15 s."""


def _segments(ex: Explanation) -> list[tuple[str, float | None]]:
    """The text the model read cut into (piece, score) in order: tokens with their scores, the characters between
    them None."""
    read = ex.extra.get("read_chars", len(ex.text))
    out, pos = [], 0
    for t in sorted(ex.tokens, key=lambda t: t.start):
        if t.start < pos:  # sub-tokens sharing characters: shade the first
            continue
        if t.start > pos:
            out.append((ex.text[pos : t.start], None))
        out.append((ex.text[t.start : t.end] or t.token, t.score))
        pos = t.end
    if pos < read:
        out.append((ex.text[pos:read], None))
    return out


def unread_note(ex: Explanation) -> str | None:
    """What the pictures leave out of a text longer than the model's window (``targets.mark_unread``)."""
    read = ex.extra.get("read_chars")
    if read is None:
        return None
    return f"… {len(ex.text) - read:,} more characters: beyond the model's window, not read and not explained"


def render_html(explanations: Sequence[Explanation], title: str = "lmforge explain") -> str:
    """One self-contained page: per explanation its target, value and method, and the shaded text (each token's
    score in its tooltip)."""
    rows = []
    for ex in explanations:
        scale = _scale(ex)
        spans = []
        for piece, score in _segments(ex):
            if score is None:
                spans.append(html.escape(piece))
                continue
            r, g, b = (round(255 * c) for c in _rgb(score, scale))
            spans.append(
                f'<span class="t" style="background:rgb({r},{g},{b})" title="{score:+.4f}">{html.escape(piece)}</span>'
            )
        if note := unread_note(ex):
            spans.append(f' <span class="unread">{html.escape(note)}</span>')
        head = f"{html.escape(ex.target)} &middot; {ex.value:.4f} &middot; {html.escape(ex.method)}"
        if ex.delta is not None:
            head += f" &middot; completeness gap {ex.delta:+.4f}"
        rows.append(f'<div class="ex"><div class="head">{head}</div><div class="text">{"".join(spans)}</div></div>')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:60em}.ex{margin:1.2em 0}.head{color:#555;font-size:.9em}"
        ".text{font-size:1.3em;line-height:1.9}.t{padding:.1em 0;border-radius:.2em}.unread{color:#888;font-size:.7em}"
    )
    legend = (
        '<p class="head">red: the token raises the explained output; blue: it lowers it; '
        "the strongest token of each line is the full colour. Hover a token for its score.</p>"
    )
    return (
        f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{legend}{''.join(rows)}</body></html>\n"
    )


def cjk_font() -> str:
    """The path of an installed CJK font for matplotlib (``CJK_FONTS``, in that order)."""
    from matplotlib import font_manager

    found = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in found:
            return found[name]
    font_manager.fontManager.__init__()  # fonts installed since matplotlib cached its list
    found = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    for name in CJK_FONTS:
        if name in found:
            return found[name]
    raise UserError(
        "drawing Chinese text needs a CJK font (one of " + ", ".join(CJK_FONTS) + "); on Debian/Ubuntu: "
        "apt install fonts-wqy-microhei (or fonts-noto-cjk)"
    )


def render_png(explanations: Sequence[Explanation], path: str | os.PathLike, *, font: str | None = None) -> Path:
    """The explanations as one PNG: each its target line and its shaded text, wrapped at 40 characters; at most 12
    explanations, ``PNG_LINES_EACH`` lines of each and ``PNG_LINES`` in all, so the picture's size is bounded
    whatever the input (what is left out is said in the picture and is on the HTML page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(fname=font or cjk_font(), size=15)
    small = FontProperties(fname=font or cjk_font(), size=10)
    width_em, line_h = 40.0, 1.9  # characters per line (a CJK character is 1 em, others ~0.6)
    layout, used = [], 0
    for ex in list(explanations)[:12]:
        lines = _png_lines(ex, width_em)
        if layout and used + len(lines) > PNG_LINES:
            break
        layout.append((ex, lines))
        used += len(lines)
    left_out = len(explanations) - len(layout)
    notes = [unread_note(ex) for ex, _ in layout]
    total = sum(1.2 + line_h * len(lines) + (0.9 if n else 0) for (_, lines), n in zip(layout, notes, strict=True))
    total += 0.5 + (1.2 if left_out else 0)
    fig = plt.figure(figsize=(width_em * 0.25 + 0.5, total * 0.25 + 0.2), dpi=120)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, width_em + 0.5)
    ax.set_ylim(total, 0)
    ax.axis("off")
    y = 0.5
    for (ex, lines), note in zip(layout, notes, strict=True):
        head = f"{ex.target} · {ex.value:.4f} · {ex.method}"
        ax.text(0, y + 0.5, head, fontproperties=small, color="#555555", va="center")
        y += 1.2
        for row, line in enumerate(lines):
            top = y + row * line_h
            for ch, x, w, score, scale in line:
                if score is not None:
                    ax.add_patch(plt.Rectangle((x, top), w, line_h * 0.9, color=_rgb(score, scale), lw=0))
                ax.text(x + w / 2, top + line_h * 0.45, ch, fontproperties=prop, ha="center", va="center")
        y += line_h * len(lines)
        if note:
            ax.text(0, y + 0.45, note, fontproperties=small, color="#888888", va="center")
            y += 0.9
    if left_out:
        more = f"… {left_out} more explanation{'s' if left_out > 1 else ''}: see the HTML page"
        ax.text(0, y + 0.6, more, fontproperties=small, color="#555555", va="center")
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _png_lines(ex: Explanation, width_em: float) -> list[list[tuple[str, float, float, float | None, float]]]:
    """The explanation's text wrapped into lines of (character, x, width, score, scale), at most
    ``PNG_LINES_EACH`` of them (the last ends with an ellipsis where the text goes on)."""
    scale, x, lines = _scale(ex), 0.0, [[]]
    for piece, score in _segments(ex):
        for ch in piece:
            w = 1.0 if ord(ch) > 0x2E7F else 0.6
            if x + w > width_em:
                if len(lines) == PNG_LINES_EACH:
                    lines[-1].append(("…", x, 1.0, None, scale))
                    return lines
                x = 0.0
                lines.append([])
            lines[-1].append((ch, x, w, score, scale))
            x += w
    return lines
