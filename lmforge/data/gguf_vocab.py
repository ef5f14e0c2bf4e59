"""Tokenizers from a GGUF file's metadata (``tokenizer.ggml.*``), as ``tokenizers`` objects.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokens``), each token's type
(``token_type``: 1 normal, 3 control, 4 user-defined, 6 byte), the BPE ``merges``, the special token ids and a
name for the pre-tokenizer (``pre``: the regular expressions that cut text into words before the merges apply,
``llama-vocab.cpp``). This module rebuilds the same tokenizer with Hugging Face ``tokenizers``:

- ``gpt2`` (byte-level BPE: SmolLM2, Qwen2, Llama 3): the vocabulary and merges as stored, the byte-level
  alphabet of GPT-2, the word-splitting rules named by ``pre`` (``PRE_TOKENIZERS``; an unknown name is refused
  rather than guessed, since it changes the ids), control tokens kept whole as special tokens and user-defined
  ones as added tokens, and a BOS prepended when ``add_bos_token`` says so.
- ``llama`` in a Gemma 3 file (SentencePiece BPE with byte fallback, Kudo & Richardson 2018): spaces become
  ``▁``, the text is one piece, bytes missing from the vocabulary fall back to ``<0xNN>``; the file stores no
  merges, so they are rebuilt from the vocabulary: every way of cutting a token into two tokens, ranked by the
  token's position in the file (Gemma's order of merging), as transformers' GGUF loader rebuilds them. Tokens of
  two or more spaces are stored as spaces and renamed to ``▁``s first. User-defined tokens (``\n``, HTML tags)
  are always whole.

``gguf_tokenizer_metadata`` is the inverse, for ``lmforge export --to gguf``: a byte-level BPE tokenizer (lmforge's
own, or one read from GGUF) becomes ``gpt2`` with the ``pre`` name whose rules it uses (lmforge's own tokenizers
use Qwen2's; those that split CJK characters first encode the same ids under Qwen2's rules, since none of their
merges joins bytes of two characters); a byte-fallback BPE (Gemma's) becomes ``llama`` with a score per token that
ranks merges as their position does. Tokens past the tokenizer's size up to the model's vocabulary are padding
(``[PAD<id>]``, type unused), as ``convert_hf_to_gguf.py`` writes them.

Written here rather than taken from transformers' GGUF loader, which is a development dependency only and which
builds the ``smollm`` vocabulary without its one-digit-per-token rule (llama.cpp and the model's own
``tokenizer.json`` split digits one by one; ``tests/data/test_gguf_vocab.py`` shows the difference).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.data.tokenizer import LMTokenizer
from lmforge.errors import UserError

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6

_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501 (verbatim, llama-vocab.cpp)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None = None, *, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    if split is not None:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated")]
        return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own expression
    if digits:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level])
    return level


PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama-v3": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
}
"""``tokenizer.ggml.pre`` -> the pre-tokenizer llama.cpp applies for it (``llama-vocab.cpp``)."""

_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}  # a word already in the vocabulary is one token (Llama 3)
_NFC = {"qwen2"}


def tokenizer_from_gguf(meta: Mapping[str, Any], where: str, *, architecture: str = "") -> LMTokenizer:
    """The tokenizer that the ``tokenizer.*`` metadata ``meta`` of the GGUF file ``where`` describes, with its
    special tokens' roles (bos, eos, unk, pad; im_start / im_end for ChatML vocabularies; Gemma's end of turn)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama" and architecture == "gemma3":
        return _gemma_tokenizer(meta, where)
    if kind != "gpt2":
        raise UserError(
            f"{where}: tokenizer.ggml.model={kind!r} is not supported here (architecture {architecture!r}); "
            "supported: 'gpt2' (byte-level BPE), and 'llama' (SentencePiece) in Gemma 3 files"
        )
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise UserError(f"{where}: a 'gpt2' tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{where}: tokenizer.ggml.pre={pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _NFC:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
    specials = _special_roles(meta, tokens, where)
    if meta.get("tokenizer.ggml.add_bos_token") and "bos" in specials:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != len(tokens):
        raise UserError(f"{where}: its control and user-defined tokens would grow the vocabulary past {len(tokens)}")
    return LMTokenizer(tok, "bpe", specials, chat_template=meta.get("tokenizer.chat_template"))


def _gemma_tokenizer(meta: Mapping[str, Any], where: str) -> LMTokenizer:
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in meta.get("tokenizer.ggml.tokens") or []]
    if not tokens:
        raise UserError(f"{where}: a 'llama' tokenizer needs tokenizer.ggml.tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    specials = _special_roles(meta, tokens, where)
    unk = specials.get("unk")
    tok = Tokenizer(models.BPE(vocab, rebuilt_merges(tokens, vocab), fuse_unk=True, unk_token=unk, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    kinds = list(zip(tokens, types, strict=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED])
    if meta.get("tokenizer.ggml.add_bos_token", True) and "bos" in specials:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    template = meta.get("tokenizer.chat_template")
    if "<end_of_turn>" in vocab:
        specials["eot"] = "<end_of_turn>"
        if template is None:  # a base model's file carries none: Gemma 3's own format, so that it can be taught to chat
            from lmforge.data.tokenizer import GEMMA3_CHAT_TEMPLATE

            template = GEMMA3_CHAT_TEMPLATE
    return LMTokenizer(tok, "bpe", specials, chat_template=template)


def rebuilt_merges(tokens: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: each (left, right) cut of a token into two tokens,
    ranked by the position of the merged token (first = merged first), ties by the longer left then right part;
    the order transformers' ``generate_merges`` gives with Gemma's positions as scores."""
    found = []
    for token, rank in vocab.items():
        cuts = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        cuts.sort(key=lambda cut: (vocab[cut[0]], vocab[cut[1]]))
        found.extend((rank, left, right) for left, right in cuts)
    found.sort(key=lambda m: (-m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _special_roles(meta: Mapping[str, Any], tokens: list[str], where: str) -> dict[str, str]:
    roles = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("eot", "eot")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if index is None:
            continue
        if not 0 <= int(index) < len(tokens):
            raise UserError(f"{where}: tokenizer.ggml.{key}_token_id={index} is outside the {len(tokens)} tokens")
        roles[role] = tokens[int(index)]
    if "eos" not in roles:
        raise UserError(f"{where}: the tokenizer has no tokenizer.ggml.eos_token_id; generation needs an end token")
    for role, token in (("im_start", "<|im_start|>"), ("im_end", "<|im_end|>")):
        if token in tokens:
            roles[role] = token
    return roles


def _rules(tok: Tokenizer) -> str:
    """The tokenizer's normalizer and pre-tokenizer as JSON, to compare with a candidate's."""
    state = json.loads(tok.to_str())
    return json.dumps([state.get("normalizer"), state.get("pre_tokenizer")], sort_keys=True)


def _candidate(normalizer: normalizers.Normalizer | None, pre: pre_tokenizers.PreTokenizer) -> str:
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    return _rules(tok)


def _pre_name(tok: Tokenizer, where: str) -> str:
    """The ``tokenizer.ggml.pre`` whose rules a byte-level BPE tokenizer applies, or a UserError."""
    from lmforge.data.tokenizer import _bpe

    rules = _rules(tok)
    for cjk in (False, True):  # lmforge's own: Qwen2's rules (and the CJK split that keeps the same ids)
        if rules == _rules(_bpe(300, cjk_characters=cjk)[0]):
            return "qwen2"
    for name, pre in PRE_TOKENIZERS.items():
        if rules == _candidate(normalizers.NFC() if name in _NFC else None, pre()):
            return name
    raise UserError(
        f"{where}: its pre-tokenizer is none that llama.cpp names (supported: lmforge's own, "
        f"{', '.join(sorted(PRE_TOKENIZERS))}); llama.cpp would cut text into other tokens"
    )


def gguf_tokenizer_metadata(tok: LMTokenizer, vocab_size: int, where: str) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of ``tok`` for a model of ``vocab_size`` rows (the inverse of
    ``tokenizer_from_gguf``); a UserError for a tokenizer llama.cpp cannot reproduce (WordPiece, Unigram)."""
    from lmforge.data.tokenizer import CHAT_TEMPLATE

    model = tok.tokenizer.model
    byte_fallback = isinstance(model, models.BPE) and model.byte_fallback
    byte_level = isinstance(tok.tokenizer.decoder, decoders.ByteLevel)
    if not isinstance(model, models.BPE) or not (byte_fallback or byte_level):
        raise UserError(
            f"{where}: a {tok.kind} tokenizer has no llama.cpp equivalent here; GGUF export takes byte-level BPE "
            "(lmforge's GPTs, SmolLM2, Qwen2, Llama 3) and byte-fallback BPE (Gemma)"
        )
    state = json.loads(tok.tokenizer.to_str())
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(vocab)} tokens, more than the model's {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, NORMAL
    for added in state.get("added_tokens", []):
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    ids = {role: tok.token_id(role) for role in ("bos", "eos", "unk", "pad", "eot")}
    bos_added = (
        ids["bos"] is not None and tok.encode("a")[:1] == [ids["bos"]] != tok.encode("a", special_tokens=False)[:1]
    )
    meta: dict[str, Any] = {}
    if byte_fallback:
        for i, token in enumerate(tokens):
            if types[i] == NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = BYTE
            elif types[i] == NORMAL and len(token) > 1 and not token.strip("\u2581"):
                tokens[i] = " " * len(token)  # Gemma stores runs of spaces as spaces (see _gemma_tokenizer)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
        meta["tokenizer.ggml.scores"] = [
            float(-i) if kind == NORMAL else 0.0 if kind == BYTE else -1000.0 for i, kind in enumerate(types)
        ]
        meta["tokenizer.ggml.add_space_prefix"] = False
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _pre_name(tok.tokenizer, where)
        merges = state["model"]["merges"]
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "eot": "eot"}
    meta.update({f"tokenizer.ggml.{names[role]}_token_id": i for role, i in ids.items() if i is not None})
    if ids["bos"] is None and ids["eos"] is not None:
        meta["tokenizer.ggml.bos_token_id"] = ids["eos"]  # as GPT-2: llama.cpp's BPE vocabularies expect one
    meta["tokenizer.ggml.add_bos_token"] = bos_added
    meta["tokenizer.ggml.add_eos_token"] = False
    template = tok.chat_template or (CHAT_TEMPLATE if "im_start" in tok.specials else None)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta
