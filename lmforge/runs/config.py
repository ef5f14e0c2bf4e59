"""The configs of the recipes in ``runs/`` (pretraining, the one fine-tuning recipe, demo, compare), torch-free.

They are the command line: tyro builds ``--help`` and the flags from these dataclasses and their field
docstrings, and a recipe YAML is validated against them (``config.from_dict``). Nothing here imports
torch, so ``lmforge COMMAND --help`` is instant. Every fine-tuning config extends ``FinetuneConfig``
(run directory, pretrained model, data files, epochs, checkpoint averaging and the loop settings
``training``, the same name as in pretraining); only task-specific options are declared per task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

from lmforge.config import check_range
from lmforge.errors import UserError
from lmforge.models.specs import ElectraSpec, LoRASpec, ModelSpec, Seq2SeqSpec
from lmforge.tasks import PRETRAIN_TASKS
from lmforge.train.config import TrainConfig, loop_defaults


def _finetune_training() -> TrainConfig:
    return loop_defaults(
        batch=32, every=200, log_every=20, lr=1e-4, warmup=100, schedule="linear", patience=5, min_evals=4
    )


RECIPE_FIELDS = (
    "out",
    "train",
    "dev",
    "test",
    "skip_bad_rows",
    "limit",
    "epochs",
    "average_last",
    "training",
    "resume",
    "lora",
)
"""The fields of a fine-tuning config that the recipe reads and the task never sees (``task_settings``)."""


@dataclass
class FinetuneConfig:
    """What every fine-tuning task takes: the run directory, the pretrained model, the data, the loop."""

    out: str
    """Run directory."""
    model: str
    """Pretrained lmforge model directory (config.json + model.safetensors + tokenizer)."""
    data: str | None = None
    """builtin:NAME instead of --train/--dev/--test (see `lmforge data list`)."""
    train: str | None = None
    """Training file."""
    dev: str | None = None
    """Dev file for early stopping; without one, 10% of --train (fixed seed) is held out."""
    test: str | None = None
    """Test file, evaluated once with the best checkpoint."""
    skip_bad_rows: bool = False
    """Skip malformed rows / sentences (reported with file:line) instead of stopping at the first."""
    limit: int = 0
    """Use only the first N examples of each split (0 = all): a quick check of a recipe, not a result."""
    max_len: int | None = None
    """Longest input in tokens (with special tokens); None = min(128, the model's max_seq_len)."""
    epochs: float = 3.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    average_last: int = 0
    """Average the last N checkpoints (needs training.keep_last >= N), kept if its dev score is as good; 0 = off."""
    training: TrainConfig = field(default_factory=_finetune_training)
    lora: LoRASpec = field(default_factory=LoRASpec)
    """--lora.rank R (> 0): train low-rank adapters on the frozen pretrained model instead of every weight (the task's
    head still trains); OUT/adapter/ gets them in PEFT's format, OUT/model.safetensors the merged model."""
    resume: bool = False
    """Continue a run from its last checkpoint: --resume RUN_DIR (its config.yaml is the recipe, it the output)."""

    def builtin_path(self) -> str | None:
        """The file a built-in corpus is read from, when the corpus needs one (Tatoeba); None: shipped."""
        return None

    def task_settings(self) -> SimpleNamespace:
        """What the task's hooks (``reader``, ``prepare_splits``, ``for_finetuning``) receive: this config's fields
        less the recipe's own (the run directory, the data files, epochs, checkpoint averaging, the loop, resume),
        plus ``seed`` (the loop's seed, which the head's initialisation and the augmentation follow). ``data``
        stays: which built-in corpus, if any, the task's examples come from."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RECIPE_FIELDS}
        return SimpleNamespace(**own, seed=self.training.seed)

    def initialisation(self) -> str | None:
        """How the encoder starts (pretrained or scratch), for results.json; None: the task has no such choice."""
        return None

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, at_least=0)
        check_range("limit", self.limit, at_least=0)
        check_range("max_len", self.max_len, at_least=3)  # [CLS], at least one token, [SEP]
        check_range("average_last", self.average_last, at_least=0)
        if self.average_last > self.training.keep_last:
            raise UserError(f"average_last={self.average_last} needs training.keep_last >= {self.average_last}")


@dataclass
class EncoderFinetuneConfig(FinetuneConfig):
    """A head on a pretrained BERT (classify, ner)."""

    init: Literal["pretrained", "scratch"] = "pretrained"
    """pretrained weights, or random initialisation of the same architecture (what pretraining buys)."""
    dropout: float | None = None
    """Encoder and head dropout; None keeps the pretrained model's."""

    def initialisation(self) -> str | None:
        return self.init

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("dropout", self.dropout, at_least=0, below=1)


@dataclass
class ClassifyConfig(EncoderFinetuneConfig):
    """Fine-tune a BERT or a decoder (GPT, SmolLM2, Gemma 3) for text or text-pair classification (CSV / TSV / JSONL:
    text, text_pair, label)."""

    pooling: Literal["auto", "cls", "pooler", "mean", "last"] = "auto"
    """Sentence representation: first token, first token through dense + tanh, mean of tokens, or last token (a
    decoder's); auto = pooler on a BERT, last on a decoder."""
    selection: Literal["accuracy", "macro_f1"] = "accuracy"
    """Dev metric for early stopping and best-checkpoint selection."""


@dataclass
class Distillation:
    """What distillation adds to a fine-tuning config (``DistillClassifyConfig``, ``DistillNERConfig``): the
    teacher, the unlabelled texts it labels and the loss mix (Hinton et al. 2015). It comes first among the
    bases, so its fields follow the task's in the command line and every one has a default. Field docstrings
    are one line each: tyro keeps their line breaks in --help."""

    model: str
    """The student: a pretrained lmforge BERT directory with its tokenizer (or, with --init scratch, its shape)."""
    teacher: str = ""
    """Required: a run directory of the same task from `lmforge finetune` (or an int8 / ONNX copy of one)."""
    unlabelled: list[str] = field(default_factory=list)
    """Texts the teacher labels: .txt files (a text per line) or builtin:NAME; cut to max_len characters."""
    unlabelled_limit: int = 20000
    """At most this many unlabelled texts (the first ones, in file order)."""
    augment: int = 0
    """Variants per training text for the teacher to label: TinyBERT's masked-LM character replacement; 0 = none."""
    augment_model: str | None = None
    """The masked LM of --augment: an lmforge BERT with its MLM head (a pretraining run); None = the student."""
    temperature: float = 2.0
    """Softmax temperature of the soft targets (the soft loss is scaled by temperature**2)."""
    alpha: float = 0.5
    """Weight of the soft loss on labelled texts (1 - alpha on the gold labels); unlabelled: the soft loss only."""

    def __post_init__(self) -> None:
        super().__post_init__()  # the task config's checks (the next base); --teacher: in runs/distill.py,
        # since a recipe file may leave it to the command line
        check_range("unlabelled_limit", self.unlabelled_limit, at_least=0)
        check_range("augment", self.augment, at_least=0)
        if not self.temperature > 0:
            raise UserError(f"temperature={self.temperature!r} must be > 0")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha={self.alpha!r} must be between 0 and 1")


@dataclass
class DistillClassifyConfig(Distillation, ClassifyConfig):
    """Distil a fine-tuned classify run (the teacher) into a smaller model (Hinton et al. 2015): the student
    learns the teacher's temperature-softened class probabilities on the labelled texts and on unlabelled
    in-domain texts that the teacher labels, plus the hard labels. The teacher's logits are computed once
    per text and cached in OUT/teacher/ (resumable). The result is a normal classify run."""


@dataclass
class NERConfig(EncoderFinetuneConfig):
    """Fine-tune a BERT for named-entity recognition (CoNLL or JSONL tokens/tags, BIO or BIOES)."""

    head: Literal["crf", "softmax"] = "crf"
    """Tag decoder: linear-chain CRF (Viterbi) or independent softmax per token."""
    overlap: int | None = None
    """Sub-tokens shared by consecutive windows of sentences longer than max_len; None = max_len // 4."""


def _chat_training() -> TrainConfig:
    return loop_defaults(
        batch=16, every=50, log_every=10, lr=3e-4, warmup=30, schedule="cosine", min_lr_ratio=0.1, patience=4
    )


@dataclass
class DistillNERConfig(Distillation, NERConfig):
    """Distil a fine-tuned NER run (the teacher) into a smaller model: the student's per-token tag scores learn
    the teacher's tag marginals (through its CRF) at a temperature on the labelled sentences and on
    unlabelled texts the teacher tags, plus the gold tags. The teacher's rows are computed once per text and
    cached in OUT/teacher/ (resumable). The result is a normal NER run."""


@dataclass
class ChatTrainConfig(FinetuneConfig):
    """Fine-tune a GPT on conversations (JSONL {"messages": [{"role", "content"}, ...]}), loss on assistant turns."""

    model: str
    """lmforge GPT directory: its chat template (an imported model's), else ChatML's <|im_start|> / <|im_end|>."""
    data: str | None = None
    """builtin:chatterbot-zh instead of --train/--dev/--test."""
    max_len: int | None = None
    """Longest conversation in tokens (longer ones are cut); None = the model's max_seq_len."""
    packing: bool = False
    """Pack short training conversations into rows of --max-len tokens (each attends only to itself)."""
    epochs: float = 10.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    training: TrainConfig = field(default_factory=_chat_training)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing and self.max_len is None:
            raise UserError(
                "--packing needs --max-len, the length of the rows conversations are packed into (e.g. 512): rows "
                "of the model's whole window would each carry an attention mask of that length squared"
            )


def _preference_training(lr: float) -> TrainConfig:
    return loop_defaults(batch=8, every=50, log_every=5, lr=lr, warmup=10, schedule="linear", patience=4)


@dataclass
class PreferenceConfig(FinetuneConfig):
    """What DPO and ORPO take: a GPT and pairs of replies (JSONL {"prompt" or "messages", "chosen", "rejected"})."""

    model: str
    """lmforge GPT directory to tune (for DPO also the frozen reference)."""
    max_len: int | None = None
    """Longest prompt + reply in tokens (prompt cut from the left first, counted); None = min(512, the window)."""
    epochs: float = 1.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    beta: float = 0.1
    """DPO: the pull towards the reference (Rafailov's beta); ORPO: the odds-ratio term's weight (Hong's lambda)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise UserError(f"beta={self.beta!r} must be > 0")


@dataclass
class DPOConfig(PreferenceConfig):
    """Direct Preference Optimization (Rafailov et al. 2023) against the starting model, frozen."""

    label_smoothing: float = 0.0
    """The share of pairs assumed to be flipped (conservative DPO, as TRL's label_smoothing); 0 = plain DPO."""
    training: TrainConfig = field(default_factory=lambda: _preference_training(5e-6))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("label_smoothing", self.label_smoothing, at_least=0, below=0.5)


@dataclass
class ORPOConfig(PreferenceConfig):
    """Odds-Ratio Preference Optimization (Hong et al. 2024): SFT on the chosen reply and the odds-ratio penalty in
    one stage, no reference model."""

    training: TrainConfig = field(default_factory=lambda: _preference_training(8e-6))


def _embed_training() -> TrainConfig:
    return loop_defaults(
        batch=64, every=100, log_every=10, lr=3e-5, warmup=0, schedule="linear", weight_decay=0.0, max_steps=500
    )


@dataclass
class EmbedTrainConfig(FinetuneConfig):
    """Fine-tune a BERT into a sentence embedder with SimCSE (unsupervised: texts; supervised: text pairs)."""

    model: str
    """Pretrained lmforge BERT directory."""
    data: str | None = None
    """builtin:reviews-sentiment (labels unused in training; dev scored by k-NN sentiment accuracy)."""
    train: str | None = None
    """.txt (one sentence per line), or .jsonl / .csv / .tsv with text[, text_pair, negative]."""
    dev: str | None = None
    """Dev file: text + label (k-NN accuracy), or text + text_pair + score (Spearman)."""
    mode: Literal["unsup", "sup"] = "unsup"
    """unsup: each text against itself under dropout; sup: text against text_pair (and negative)."""
    pooling: Literal["cls", "mean"] = "cls"
    """Sentence vector: the first token's hidden state, or the mean over real tokens."""
    temperature: float = 0.05
    """InfoNCE temperature."""
    max_len: int = 64
    """Longest text in tokens, with [CLS] and [SEP]."""
    dropout: float = 0.1
    """Encoder dropout: the noise that makes unsupervised SimCSE's two views differ."""
    epochs: float = 0.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps."""
    training: TrainConfig = field(default_factory=_embed_training)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("dropout", self.dropout, at_least=0, below=1)


def _translate_training() -> TrainConfig:
    return loop_defaults(
        batch=64,
        every=500,
        log_every=50,
        lr=1e-3,
        warmup=400,
        schedule="cosine",
        min_lr_ratio=0.05,
        max_steps=4000,
        keep_last=5,
    )


@dataclass
class TranslateTrainConfig(FinetuneConfig):
    """Train a Transformer encoder-decoder for translation (TSV source TAB target, or JSONL)."""

    model: str | None = None
    """Pretrained lmforge BERT that warm-starts the encoder (and its source vocabulary); None = from scratch."""
    src: str = "zh"
    """Source language code (JSONL field; 'zh' targets are scored with sacreBLEU's zh tokenizer)."""
    tgt: str = "en"
    """Target language code."""
    data: str | None = None
    """builtin:tatoeba-cmn-en (the Tatoeba pairs shipped with lmforge) instead of --train/--dev/--test."""
    data_path: str | None = None
    """Another Tatoeba TSV export for builtin:tatoeba-cmn-en (else $LMFORGE_TATOEBA, else the shipped pairs)."""

    def builtin_path(self) -> str | None:
        return self.data_path

    tokenizer: str | None = None
    """Shared tokenizer directory; None = train a byte-level BPE on both sides of --train into the run directory."""
    vocab_size: int = 8000
    """Vocabulary size of a tokenizer trained here."""
    seq2seq: Seq2SeqSpec = field(default_factory=Seq2SeqSpec)
    max_len: int = 128
    """Longest source or target in tokens (longer ones are truncated and counted)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    batch_tokens: int = 0
    """Token-budget batching: each item is a bucket of similar pairs, <= N padded tokens; batch sizes count buckets."""
    epochs: float = 0.0
    """Training epochs (sets training.max_steps); 0 = use training.max_steps (and training.max_minutes)."""
    num_beams: int = 4
    """Beam size for the test set (validation during training is greedy)."""
    length_penalty: float = 1.0
    """Beam search length penalty for the test set."""
    training: TrainConfig = field(default_factory=_translate_training)


@dataclass
class PretrainData:
    """Corpus, tokenizer and sequence length."""

    input: list[str] = field(default_factory=lambda: ["builtin:pretrain-zh"])
    """Corpora: text files, .jsonl files or builtin:NAME."""
    tokenizer: str | None = None
    """Tokenizer directory; None = train one into OUT/tokenizer."""
    vocab_size: int = 21128
    """Vocabulary size when a tokenizer is trained here."""
    cjk_characters: bool = False
    """GPT (byte-level BPE) tokenizer trained here: every CJK character and full-width punctuation mark its own
    token, none merged with its neighbours (a BERT's WordPiece always does this)."""
    shards: str | None = None
    """Prepared shard directory; None = prepare (or reuse) OUT/data."""
    seq_len: int = 128
    """Training sequence length in tokens."""
    val_fraction: float = 0.01
    """Documents held out for validation."""
    jsonl_field: str = "text"
    """Text field of .jsonl inputs."""


@dataclass
class PretrainConfig:
    """Pretrain a BERT (mlm, wwm-mlm, electra) or GPT (clm) on a corpus."""

    out: str
    """Run directory."""
    task: Literal[PRETRAIN_TASKS] = "mlm"  # type: ignore[valid-type]
    """mlm / wwm-mlm / electra (BERT sizes) or clm (GPT sizes)."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: PretrainData = field(default_factory=PretrainData)
    training: TrainConfig = field(default_factory=TrainConfig)
    mask_prob: float = 0.15
    """Share of tokens (words, for wwm-mlm) selected for MLM prediction (electra: for replacement)."""
    electra: ElectraSpec = field(default_factory=ElectraSpec)
    resume: bool = False
    """Continue a run from its last checkpoint: --resume RUN_DIR (its config.yaml is the recipe, it the output)."""


@dataclass
class DemoConfig:
    """Run the whole pipeline on built-in Chinese data with baselines side by side (what `make demo` runs)."""

    out: str = "runs/demo"
    """Output directory (its demo stage directories are replaced on every run)."""
    quick: bool = False
    """The same pipeline with small budgets (about 3 minutes on 2 cores)."""
    limit: int = 0
    """Use only the first N examples of each split (0 = all): for smoke tests."""
    pretrain_steps: int | None = None
    """Pretraining steps instead of the budget's."""
    seed: int = 1234
    """Seed for every stage."""
    progress: bool = True
    """Show progress bars."""
    with_e5: bool = False
    """Also fine-tune the built-in multilingual-e5-small on both tasks (vocabulary trimmed to pretrain-zh;
    about 45 more minutes on 2 cores with bf16; `make demo-e5`)."""


ObjectiveName = Literal["mlm", "electra", "electra-adversarial", "electra-mixed"]


@dataclass(frozen=True)
class Objective:
    """A pretraining objective as the comparison runs it."""

    task: str
    lr: float
    electra: ElectraSpec = field(default_factory=ElectraSpec)


# Learning rates: the masked LM's is the demo's; the ELECTRA discriminator did not learn at all at 2e-3 and
# learns at 5e-4 (shared/FINDINGS.md "ELECTRA on 2 cores"); the adversarial variants keep ELECTRA's.
OBJECTIVES: dict[str, Objective] = {
    "mlm": Objective("mlm", 2e-3),
    "electra": Objective("electra", 5e-4),
    "electra-adversarial": Objective("electra", 5e-4, ElectraSpec(generator_objective="adversarial")),
    "electra-mixed": Objective("electra", 5e-4, ElectraSpec(generator_objective="mixed")),
}


@dataclass(frozen=True)
class BuiltinFinetune:
    """How the demo and the comparison fine-tune on one built-in corpus (the recipe's choices, not dispatch)."""

    task: str
    """The TASKS entry fine-tuned."""
    metric: str
    """The test metric the comparison reports."""
    lr: float
    """The demo's learning rate."""
    epochs: str
    """The field of the demo's Budget and of CompareConfig that holds its epochs."""
    e5: tuple[tuple[str, str], ...]
    """Settings of the multilingual-e5-small fine-tune beyond the shared ones (as its configs/ recipe)."""
    baseline: str
    """The non-neural baseline's name in the results."""
    baseline_fn: str
    """``module:function`` ``(train, test) -> metrics`` of the baseline."""


BUILTIN_FINETUNES: dict[str, BuiltinFinetune] = {
    "reviews-sentiment": BuiltinFinetune(
        "classify",
        "accuracy",
        1e-3,
        "classify_epochs",
        (("pooling", "mean"),),
        "tfidf-svm",
        "lmforge.baselines:tfidf_svm",
    ),
    "peoples-daily-ner": BuiltinFinetune(
        "ner", "f1", 2e-3, "ner_epochs", (), "dictionary", "lmforge.baselines:dictionary_ner"
    ),
}
SCRATCH = "scratch"  # the same fine-tuning from random initialisation: what any pretraining buys


@dataclass
class CompareConfig:
    """Pretraining objectives (MLM, ELECTRA, adversarial ELECTRA) at equal FLOPs, fine-tuned on built-in tasks."""

    out: str = "runs/compare"
    """Output directory; finished stages found there are kept and the comparison continues."""
    objectives: list[ObjectiveName] = field(default_factory=lambda: ["mlm", "electra", "electra-adversarial"])
    """Pretraining objectives to compare."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One pretraining + fine-tuning per objective and seed."""
    budget_mlm_steps: int = 1000
    """The FLOP budget, as this many masked-LM steps of batch_size x seq_len tokens."""
    size: str = "bert-tiny"
    """BERT size of every encoder."""
    batch_size: int = 64
    """Pretraining sequences per step (every objective)."""
    seq_len: int = 128
    """Pretraining and fine-tuning sequence length."""
    classify_epochs: float = 3.0
    """Fine-tuning epochs on reviews-sentiment (the demo's)."""
    ner_epochs: float = 3.0
    """Fine-tuning epochs on peoples-daily-ner (the demo's)."""
    scratch_seeds: list[int] | None = None
    """Seeds that also fine-tune from random initialisation (the floor pretraining must beat); None = every seed."""
    limit: int = 0
    """Use only the first N examples of each split (0 = all): for smoke tests."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise UserError(f"objectives={self.objectives}: choose from {sorted(OBJECTIVES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds={self.seeds}: give at least one seed, each once")
        if self.budget_mlm_steps <= 0:
            raise UserError(f"budget_mlm_steps={self.budget_mlm_steps} must be positive")
