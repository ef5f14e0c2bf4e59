"""Train, save and load tokenizers with the Hugging Face ``tokenizers`` library.

Two kinds:
- ``wordpiece`` for BERT, the bert-base-chinese convention: BERT normalisation (every CJK
  character becomes its own pre-token, optional lower-casing), ``##`` continuation pieces,
  [PAD] [UNK] [CLS] [SEP] [MASK], and the alphabet unlimited (the trainer's default keeps only
  1,000 characters, which left ~9% [UNK] on Chinese text; see shared/FINDINGS.md).
- ``bpe`` for GPT: byte-level BPE as in GPT-2 (no unknown token; exact round trips of NFC text),
  pre-tokenized the way Qwen2 does it (NFC, single digits), with an end-of-text token, a padding
  token and ChatML role tokens (``<|im_start|>``, ``<|im_end|>``) plus a chat template. With
  ``cjk_characters`` every CJK character and full-width punctuation mark is split off first, so no token spans
  two (a five-character line is five tokens; classical poems need that to learn their form, FINDINGS).

A tokenizer directory holds ``tokenizer.json`` plus ``tokenizer_config.json`` and
``special_tokens_map.json`` so that ``transformers.AutoTokenizer`` loads it unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import UserError, unicode_problem
from lmforge.files import atomic_write, read_json_object, write_json, write_yaml

TokenizerKind = Literal["wordpiece", "bpe", "unigram"]  # unigram: imported checkpoints (XLM-R pieces)
TrainableKind = Literal["wordpiece", "bpe"]
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
BPE_SPECIALS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's conversation format, as its instruction-tuned models' template writes text turns: ``<bos>``, each turn
``<start_of_turn>user|model\n`` + content + ``<end_of_turn>\n``, a system message folded into the first user turn,
roles alternating; for Gemma 3 files that carry no template (the base gemma-3-270m's GGUF)."""
# Qwen2's pre-tokenization (one digit per piece, letters and CJK runs kept whole). Using the very
# same rules means transformers' Qwen2Tokenizer, which rebuilds them itself, gives identical ids.
BPE_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (verbatim from Qwen2)
# A space that WordPiece decoding puts next to a CJK character or full-width punctuation is not
# in the original text (BERT splits every such character into its own token).
_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_SPACE = re.compile(rf"(?<=[{_CJK}]) (?=\S)|(?<=\S) (?=[{_CJK}])")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy whichever tokenizer files ``src`` has into ``dst`` (each atomically, tokenizer.json last: its presence
    means the directory is complete); returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in sorted(TOKENIZER_FILES, key=lambda n: n == "tokenizer.json"):
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            with atomic_write(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied


@dataclass
class LMTokenizer:
    """A ``tokenizers.Tokenizer`` with its kind, the ids of its special tokens, and its chat template (Jinja, as
    transformers stores it; None: lmforge's ChatML ``CHAT_TEMPLATE`` where the vocabulary has its tokens)."""

    tokenizer: Tokenizer
    kind: TokenizerKind
    specials: dict[str, str]
    chat_template: str | None = None

    def token_id(self, role: str) -> int | None:
        """Id of the special token with ``role`` (pad, unk, cls, sep, mask, eos, ...), or None."""
        token = self.specials.get(role)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, pair: str | None = None, *, special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, pair, add_special_tokens=special_tokens).ids
        except TypeError:  # what tokenizers raises for a str it cannot encode: say why
            for part in (text, pair):
                problem = unicode_problem(part) if isinstance(part, str) else None
                if problem is not None:
                    raise UserError(f"text {part[:20]!r}... is not valid Unicode: {problem}") from None
            raise

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _CJK_SPACE.sub("", text) if self.kind == "wordpiece" else text


def _bert_wordpiece(vocab: dict[str, int] | None, lowercase: bool) -> Tokenizer:
    model = (
        models.WordPiece(vocab, unk_token=WORDPIECE_SPECIALS["unk"])
        if vocab
        else models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk"])
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _train_wordpiece(corpus: Callable[[], Iterable[str]], vocab_size: int, lowercase: bool) -> Tokenizer:
    tok = _bert_wordpiece(None, lowercase)
    # The trainer numbers "##x" continuation pieces in hash-map order, and those ids break ties
    # between equally frequent merges, so the vocabulary changed from run to run (tokenizers
    # issue #1794). Declaring every continuation piece up front, sorted, fixes their ids.
    continuation: set[str] = set()
    for text in _nonempty(corpus()):
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            continuation.update(word[1:])
    pieces = ["##" + ch for ch in sorted(continuation)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(WORDPIECE_SPECIALS.values()) + pieces,
        limit_alphabet=1_000_000,  # keep every character: Chinese needs thousands
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(corpus()), trainer=trainer)
    # Rebuild so the pieces are ordinary vocabulary entries, not special (skipped) tokens.
    vocab = tok.get_vocab(with_added_tokens=True)
    tok = _bert_wordpiece(dict(sorted(vocab.items(), key=lambda kv: kv[1])), lowercase)
    tok.add_special_tokens(list(WORDPIECE_SPECIALS.values()))
    return tok


def _bpe(vocab_size: int, *, cjk_characters: bool = False) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # cjk_characters: every CJK character and full-width punctuation mark its own pre-token first, so no BPE token
    # spans two of them (the bert-base-chinese convention); else Qwen2's rules, which keep CJK runs whole
    cjk = [pre_tokenizers.Split(Regex(f"[{_CJK}]"), behavior="isolated")] if cjk_characters else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *cjk,
            pre_tokenizers.Split(Regex(BPE_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer(
    corpus: Callable[[], Iterable[str]],
    *,
    kind: TokenizerKind,
    vocab_size: int,
    lowercase: bool = True,
    cjk_characters: bool = False,
) -> LMTokenizer:
    """Train a tokenizer of ``kind``; ``corpus()`` returns a fresh stream of texts each call
    (WordPiece reads it twice; nothing is held in memory). ``cjk_characters`` (bpe): no token spans two CJK
    characters (WordPiece always splits them)."""
    if vocab_size < 300 and kind == "bpe":
        raise UserError(f"vocab_size={vocab_size}: byte-level BPE needs at least 256 bytes + specials (>= 300)")
    if vocab_size < 10:
        raise UserError(f"vocab_size={vocab_size} is too small")
    if kind == "wordpiece":
        tok = _train_wordpiece(corpus, vocab_size, lowercase)
        specials = dict(WORDPIECE_SPECIALS)
    elif kind == "bpe":
        tok, trainer = _bpe(vocab_size, cjk_characters=cjk_characters)
        tok.train_from_iterator(_nonempty(corpus()), trainer=trainer)
        specials = dict(BPE_SPECIALS)
    else:
        raise UserError(f"tokenizer kind {kind!r} is not one of 'wordpiece', 'bpe'")
    if kind == "wordpiece":
        cls, sep = specials["cls"], specials["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return LMTokenizer(tok, kind, specials)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text and not text.isspace():
            yield text


def save_tokenizer(tok: LMTokenizer, directory: str | os.PathLike, *, model_max_length: int = 512) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory``, each atomically.

    tokenizer.json comes last: callers take its presence to mean the directory is complete (a resumed run
    reloads it), so it must never exist beside a missing or older tokenizer_config.json.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    roles = {
        "pad": "pad_token",
        "unk": "unk_token",
        "cls": "cls_token",
        "sep": "sep_token",
        "mask": "mask_token",
        "eos": "eos_token",
    }
    special_map = {roles[r]: t for r, t in tok.specials.items() if r in roles}
    if tok.kind == "bpe":
        # GPT-2 convention where there is no BOS of its own: one <|endoftext|> for both
        special_map["bos_token"] = tok.specials.get("bos", tok.specials["eos"])
        chat = [tok.specials[r] for r in ("im_start", "im_end", "eot") if r in tok.specials]
        if chat:
            special_map["additional_special_tokens"] = chat
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "lmforge_kind": tok.kind,
        "lmforge_specials": tok.specials,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    elif tok.kind == "bpe" and "im_start" in tok.specials:
        config["chat_template"] = CHAT_TEMPLATE
    if tok.kind != "bpe":
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    write_json(directory / "tokenizer_config.json", config)
    write_json(directory / "special_tokens_map.json", special_map)
    with atomic_write(directory / "tokenizer.json") as tmp:
        tok.tokenizer.save(str(tmp))
    return directory


def load_tokenizer(directory: str | os.PathLike) -> LMTokenizer:
    """Load a tokenizer directory written by ``save_tokenizer`` (or any with a BERT/GPT tokenizer.json)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{directory}: no tokenizer.json (train one with `lmforge tokenizer train`)")
    tok = Tokenizer.from_file(str(path))
    # Padding and truncation are the collators' job; a tokenizer.json may carry its own (MiniLM's pads to 128).
    tok.no_padding()
    tok.no_truncation()
    cfg_path = directory / "tokenizer_config.json"
    cfg = read_json_object(cfg_path, what="tokenizer config") if cfg_path.is_file() else {}
    template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
    own_template = None if template == CHAT_TEMPLATE else template
    if "lmforge_kind" in cfg:
        return LMTokenizer(tok, cfg["lmforge_kind"], dict(cfg["lmforge_specials"]), chat_template=own_template)
    # A tokenizer from elsewhere (e.g. an imported Hugging Face model): infer kind and specials.
    kind: TokenizerKind = "wordpiece" if type(tok.model).__name__ == "WordPiece" else "bpe"
    roles = {
        "pad_token": "pad",
        "unk_token": "unk",
        "cls_token": "cls",
        "sep_token": "sep",
        "mask_token": "mask",
        "eos_token": "eos",
        "bos_token": "bos",
    }
    specials = {}
    for key, role in roles.items():
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and tok.token_to_id(value) is not None:
            specials[role] = value
    return LMTokenizer(tok, kind, specials, chat_template=own_template)


UNIGRAM_SPECIALS = {
    "cls": "<s>",
    "bos": "<s>",
    "sep": "</s>",
    "eos": "</s>",
    "pad": "<pad>",
    "unk": "<unk>",
    "mask": "<mask>",
}


def unigram_tokenizer(
    pieces: list[str], scores: list[float], *, unk_id: int, normalization: dict[int, str]
) -> LMTokenizer:
    """A SentencePiece-unigram tokenizer (XLM-R style) from its pieces and scores, in ``tokenizers``.

    ``normalization`` is a per-codepoint map (codepoint -> replacement), as SentencePiece's NFKC-based
    table: entries equal to NFKC of their codepoint are done by ``NFKC``; the rest (deletions, spaces) by
    one regex each; codepoints the map leaves alone but today's NFKC would change are shielded from it
    (replaced by private-use stand-ins around it). Runs of spaces collapse to one, then Metaspace (U+2581,
    prepended unless the text starts with a space, no splitting), then Viterbi over the pieces; the
    sequence is wrapped in <s> ... </s>. NFKC also composes a base letter with a following combining mark,
    which a per-codepoint map does not: decomposed accents (``e`` + U+0301) can tokenize differently.
    """
    import unicodedata

    replaced: dict[str, list[int]] = {}
    for cp, out in normalization.items():
        if unicodedata.normalize("NFKC", chr(cp)) != out:
            replaced.setdefault(out, []).append(cp)
    shielded = [
        cp
        for cp in range(0x110000)
        if not 0xD800 <= cp < 0xE000 and cp not in normalization and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)
    ]
    steps = [
        normalizers.Replace(Regex("[" + "".join(f"\\x{{{c:x}}}" for c in cps) + "]"), out)
        for out, cps in replaced.items()
    ]
    stand_in = 0xF0000  # supplementary private use area: NFKC leaves it alone
    steps += [normalizers.Replace(chr(cp), chr(stand_in + i)) for i, cp in enumerate(shielded)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(chr(stand_in + i), chr(cp)) for i, cp in enumerate(shielded)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(pieces, scores, strict=True)], unk_id=unk_id))
    tok.normalizer = normalizers.Sequence(steps)
    # A character that no piece contains can only be <unk>: isolating it makes each such character one <unk>,
    # as SentencePiece does (a Unigram model alone fuses a run of them into one), and changes nothing else.
    covered = sorted({ord(c) for p in pieces if not (p.startswith("<") and p.endswith(">")) for c in p})
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(f"[^{_char_ranges(covered)}]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    bos, eos = UNIGRAM_SPECIALS["cls"], UNIGRAM_SPECIALS["sep"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    tok.add_special_tokens(list(dict.fromkeys(UNIGRAM_SPECIALS.values())))
    return LMTokenizer(tok, "unigram", dict(UNIGRAM_SPECIALS))


def _char_ranges(codepoints: list[int]) -> str:
    """A regex character-class body for sorted ``codepoints``, as ranges."""
    parts, start = [], None
    for i, cp in enumerate(codepoints):
        if start is None:
            start = cp
        if i + 1 == len(codepoints) or codepoints[i + 1] != cp + 1:
            parts.append(f"\\x{{{start:x}}}" if start == cp else f"\\x{{{start:x}}}-\\x{{{cp:x}}}")
            start = None
    return "".join(parts)


@dataclass
class TokenizerTrainConfig:
    """Train a tokenizer: WordPiece (BERT, one token per CJK character) or byte-level BPE (GPT)."""

    input: list[str]
    """Corpora: text files (one document per line), .jsonl files (field --jsonl-field) or builtin:NAME."""
    out: str
    """Directory to write tokenizer.json, tokenizer_config.json, special_tokens_map.json into."""
    kind: TrainableKind = "wordpiece"
    """wordpiece for BERT models, bpe (byte-level) for GPT models."""
    vocab_size: int = 21128
    """Target vocabulary size (WordPiece keeps every character seen, even past this size)."""
    lowercase: bool = True
    """Lower-case text before WordPiece (the bert-base-chinese convention); ignored for bpe."""
    jsonl_field: str = "text"
    """Field holding the text in .jsonl inputs."""
    model_max_length: int = 512
    """Longest input recorded in tokenizer_config.json for transformers."""

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise UserError(f"vocab_size={self.vocab_size} must be positive")


def train_command(cfg: TokenizerTrainConfig) -> LMTokenizer:
    from lmforge.data.readers import corpus_texts

    if not cfg.input:
        raise UserError("--input needs at least one file or builtin:NAME")
    if not any(text.strip() for text in corpus_texts(cfg.input, jsonl_field=cfg.jsonl_field)):
        raise UserError(f"--input {' '.join(cfg.input)}: no text to learn a vocabulary from (empty or blank)")
    tok = train_tokenizer(
        lambda: corpus_texts(cfg.input, jsonl_field=cfg.jsonl_field),
        kind=cfg.kind,
        vocab_size=cfg.vocab_size,
        lowercase=cfg.lowercase,
    )
    save_tokenizer(tok, cfg.out, model_max_length=cfg.model_max_length)
    write_yaml(Path(cfg.out) / "tokenizer_train.yaml", cfg)  # how this tokenizer was made
    return tok
