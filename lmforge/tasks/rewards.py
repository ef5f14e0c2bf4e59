"""Verifiable rewards: what a program can check about a completion, for reinforcement learning against verifiable
rewards (GRPO, Shao et al. 2024; issue 36).

A reward is any callable ``reward(prompt: str, completion: str, example: dict) -> float``: the prompt the policy
was given, what it wrote after it, and the training row the prompt came from (its other fields, e.g. a
``reference``). A recipe names rewards by a built-in name or as ``module:function`` (``load_reward``), so a user's
own check is a plain Python function. Built-ins:

- ``poem_form``: 1 when the completion (after a title) is a well-formed five- or seven-character regulated poem
  (``data/poems.poem_form``, the metric of the poem benchmark), else 0.
- ``poem_rhyme``: 1 when the poem is well formed and the last characters of its even lines (2, 4, ...) share one
  rhyme group and are all level-tone (平声) characters, else 0. Readings are modern Mandarin, from ``pypinyin``
  (each character's most common reading, without context), grouped by the fourteen rhymes of the 中华新韵 (2005):
  an / ian / uan / üan rhyme, eng / ing / ong / iong rhyme, zhi-chi-shi-ri-zi-ci-si's -i is its own rhyme (支),
  and tones 1 and 2 are level (平), 3 and 4 oblique (仄). Tang poets rhymed by the Qieyun / Pingshui groups of
  Middle Chinese, which modern readings only approximate: the entering tone (入声, words ending in -p / -t / -k) is
  gone from Mandarin and its characters are spread over all four modern tones, so some characters a Tang poet
  heard as oblique read as level today and the reverse, and some of their rhyme groups have split or merged. The
  share of real tang-verse poems that pass this check is therefore below 1; it is the target a trained model's
  share is measured against, not 1.
- ``chrf``: chrF (sacreBLEU's, 0-1) of the completion against the example's ``reference``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from lmforge.data.poems import poem_form, poem_lines
from lmforge.errors import UserError

Reward = Callable[[str, str, dict], float]

RHYMES: dict[str, str] = {
    **dict.fromkeys(("a", "ia", "ua"), "麻"),
    **dict.fromkeys(("o", "e", "uo"), "波"),
    **dict.fromkeys(("ie", "ve", "ue"), "皆"),
    **dict.fromkeys(("ai", "uai"), "开"),
    **dict.fromkeys(("ei", "ui", "uei"), "微"),
    **dict.fromkeys(("ao", "iao"), "豪"),
    **dict.fromkeys(("ou", "iu", "iou"), "尤"),
    **dict.fromkeys(("an", "ian", "uan", "van"), "寒"),
    **dict.fromkeys(("en", "in", "un", "uen", "vn"), "文"),
    **dict.fromkeys(("ang", "iang", "uang"), "唐"),
    **dict.fromkeys(("eng", "ing", "ueng", "ong", "iong"), "庚"),
    **dict.fromkeys(("i", "er", "v"), "齐"),
    "u": "姑",
}
"""The fourteen rhymes of the 中华新韵 by pinyin final (pypinyin's strict finals, ü written v); 支 is decided by the
initial (``rhyme_of``)."""
_BUZZING_INITIALS = frozenset(("zh", "ch", "sh", "r", "z", "c", "s"))  # their "i" is the apical vowel: 支


def rhyme_of(character: str) -> tuple[str, str] | None:
    """(rhyme group, tone class 平 / 仄) of a Han character's modern reading; None when it has none (not Han,
    a neutral tone, a final outside the table)."""
    from pypinyin import Style, pinyin

    final = pinyin(character, style=Style.FINALS_TONE3, strict=True, errors=lambda _: [""])[0][0]
    if not final or not final[-1].isdigit():
        return None
    final, tone = final[:-1], final[-1]
    if tone not in "1234":
        return None
    initial = pinyin(character, style=Style.INITIALS, strict=True)[0][0]
    group = "支" if final == "i" and initial in _BUZZING_INITIALS else RHYMES.get(final)
    if group is None:
        return None
    return group, "平" if tone in "12" else "仄"


def rhymes(body: str) -> bool:
    """Whether a well-formed poem's even lines end in characters of one rhyme group, every one level-toned."""
    if poem_form(body) is None:
        return False
    ends = [rhyme_of(text[-1]) for text, _ in poem_lines(body.strip())[1::2]]
    return all(ends) and len({group for group, _ in ends}) == 1 and all(tone == "平" for _, tone in ends)


def poem_form_reward(prompt: str, completion: str, example: dict) -> float:
    return float(poem_form(completion.strip()) is not None)


def poem_rhyme_reward(prompt: str, completion: str, example: dict) -> float:
    return float(rhymes(completion))


def chrf_reward(prompt: str, completion: str, example: dict) -> float:
    from sacrebleu.metrics import CHRF

    if "reference" not in example:
        raise UserError("reward chrf: the training rows need a 'reference' (the text the completion is scored against)")
    return CHRF().sentence_score(completion.strip(), [example["reference"]]).score / 100


BUILTIN_REWARDS: dict[str, Reward] = {
    "poem_form": poem_form_reward,
    "poem_rhyme": poem_rhyme_reward,
    "chrf": chrf_reward,
}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or ``module:function`` imported; a UserError naming ``spec`` and what is valid."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise UserError(
            f"reward {spec!r}: a built-in reward ({', '.join(BUILTIN_REWARDS)}) or module:function "
            "(e.g. my_rewards:length_bonus)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward {spec!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from None
    reward = getattr(module, attribute, None)
    if not callable(reward):
        raise UserError(f"reward {spec!r}: {module_name} has no function {attribute!r}")
    return reward
