"""Fine-tuning and inference throughput of lmforge vs Hugging Face transformers on the real reviews data.

Both sides hold the same BERT (bert-mini 4 x 256 unless --model names an lmforge model directory),
the same classification head weights and the same tokenizer, in this process, with the same
thread count and allocator; rounds alternate (lmforge, then transformers) and medians are compared.

- ``finetune``: real (non-padding) tokens per second of training on ``reviews-sentiment`` train,
  batch 32, max 128 tokens. lmforge: ``ClassificationTask`` batches exactly as ``fit`` draws them
  (length-grouped ``GlobalBatches``, dynamic padding), its loss, clipping and fused AdamW.
  transformers: ``Trainer`` with its defaults (random order, ``DataCollatorWithPadding``, its
  default optimizer) except the batch size (32, as ours) and no checkpoint saving; the time is
  taken between Trainer's own step callbacks, so data loading inside a step counts on both sides.
- ``inference``: texts per second (and real tokens per second) classifying the test split from raw
  text to labels: ``ClassificationTask.predict`` vs the ``text-classification`` pipeline with its
  default batch size (1) and with batch size 64 (reported as a second ratio).

    python bench/finetune_vs_hf.py [--rounds 3] [--steps 20] [--threads 2] [--model DIR] [--out FILE]

Writes bench/results/finetune_vs_hf.json in the shape of pretrain_vs_hf.json:
{"machine": {...}, "cases": {"finetune": {"lmforge", "hf", "unit", "ratio", "settings"}, "inference": {...}}}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from lmforge.data.batching import GlobalBatches
from lmforge.data.builtin import load_builtin
from lmforge.data.tokenizer import copy_tokenizer_files, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.models.bert import Bert
from lmforge.models.convert import to_hf
from lmforge.models.registry import read_config, read_safetensors
from lmforge.models.sizes import model_size
from lmforge.tasks.classification import ClassificationTask
from lmforge.train.optim import OptimConfig, build_optimizer

RESULTS = Path(__file__).parent / "results" / "finetune_vs_hf.json"
BATCH, MAX_LEN, LR = 32, 128, 1e-4


def _models(model_dir: str | None, work: Path, labels: list[str]):
    """(lmforge task, lmforge model, transformers model, transformers tokenizer) with identical weights."""
    if model_dir:
        tok_dir = Path(model_dir)
        cfg = read_config(model_dir)
        state = read_safetensors(tok_dir / "model.safetensors")
    else:
        texts = [ex["text"] for ex in load_builtin("pretrain-zh")["train"]]
        tok_dir = save_tokenizer(train_tokenizer(lambda: iter(texts), kind="wordpiece", vocab_size=21128), work / "tok")
        cfg = model_size("bert-mini", vocab_size=load_tokenizer(tok_dir).vocab_size)
        torch.manual_seed(0)
        state = Bert(cfg).state_dict()
    tok = load_tokenizer(tok_dir)
    cfg.mlm_head, cfg.pooler = False, False
    encoder = Bert(cfg)
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith(("mlm_head.", "pooler."))})
    task = ClassificationTask(tok, labels, max_len=MAX_LEN, pooling="pooler", dropout=cfg.dropout)
    torch.manual_seed(1)
    ours = task.build_model(encoder)
    hf_cfg, hf_state = to_hf(encoder.cfg, encoder.state_dict(), token_ids={"pad": tok.token_id("pad")})
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures",)}
    config = transformers.BertConfig(**hf_cfg, num_labels=len(labels))
    hf = transformers.BertForSequenceClassification(config)
    hf_state = {k if k.startswith("bert.") else f"bert.{k}": v for k, v in hf_state.items() if not k.startswith("cls.")}
    hf_state["bert.pooler.dense.weight"] = ours.head.dense.weight.detach().clone()
    hf_state["bert.pooler.dense.bias"] = ours.head.dense.bias.detach().clone()
    hf_state["classifier.weight"] = ours.head.out.weight.detach().clone()
    hf_state["classifier.bias"] = ours.head.out.bias.detach().clone()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    copy_tokenizer_files(tok_dir, work)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(work))
    return task, ours, hf, hf_tok


def _check_same_outputs(task, ours, hf, hf_tok, texts: list[str]) -> float:
    """Max |logit difference| of the two models on a few texts in eval mode (must be ~0)."""
    ours.eval(), hf.eval()
    with torch.no_grad():
        batch = task.collate(task.encode([{"text": t} for t in texts], split="check", need_labels=False))
        a = ours(batch["input_ids"], attention_mask=batch["attention_mask"])
        enc = hf_tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        b = hf(**enc).logits
    return float((a - b).abs().max())


class _Steps(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


class _CountingCollator(transformers.DataCollatorWithPadding):
    """The default collator, counting the real tokens of every batch it builds."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.tokens: list[int] = []

    def __call__(self, features):
        batch = super().__call__(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def finetune_case(task, ours, hf, hf_tok, train: list[dict], *, rounds: int, steps: int, work: Path) -> dict:
    task.train_items = task.encode(train, split="train")
    task.train_lengths = [len(it[0]) for it in task.train_items]
    batches = GlobalBatches(len(task.train_items), BATCH, seed=0, lengths=task.train_lengths)
    optimizer = build_optimizer(ours, OptimConfig(lr=LR))
    index = {name: i for i, name in enumerate(task.labels)}
    encoded = hf_tok([ex["text"] for ex in train], truncation=True, max_length=MAX_LEN)
    dataset = [
        {"input_ids": ids, "attention_mask": m, "labels": index[ex["label"]]}
        for ids, m, ex in zip(encoded["input_ids"], encoded["attention_mask"], train, strict=True)
    ]
    ours_rates, hf_rates, step = [], [], 0
    for r in range(rounds):
        ours.train()
        tokens, started = 0, None
        for k in range(steps + 1):
            if k == 1:  # the first step of a round warms up; time the rest
                started, tokens = time.perf_counter(), 0
            batch = task.collate([task.train_items[int(i)] for i in batches.at(step)])
            step += 1
            out = task.loss(ours, batch)
            (out.loss_sum / batch["n_targets"]).backward()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch["n_tokens"]
        ours_rates.append(tokens / (time.perf_counter() - started))
        callback, collator = _Steps(), _CountingCollator(hf_tok)
        args = transformers.TrainingArguments(
            output_dir=str(work / f"hf-{r}"),
            per_device_train_batch_size=BATCH,
            max_steps=steps + 1,
            learning_rate=LR,
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            use_cpu=True,
            seed=r,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(
            model=hf, args=args, train_dataset=dataset, data_collator=collator, callbacks=[callback]
        )
        trainer.train()
        # tokens of steps 2..n+1 over the time from the end of step 1 to the end of step n+1
        hf_rates.append(sum(collator.tokens[1 : steps + 1]) / (callback.times[-1] - callback.times[0]))
        print(f"round {r}: lmforge {ours_rates[-1]:,.0f} real tokens/s, transformers Trainer {hf_rates[-1]:,.0f}")
    hf_setup = "Trainer defaults except per_device_train_batch_size=32, save_strategy=no"
    settings = {"batch": BATCH, "max_len": MAX_LEN, "steps_per_round": steps, "rounds": rounds, "hf": hf_setup}
    return _case(ours_rates, hf_rates, "real tokens/s", settings)


def inference_case(task, ours, hf, hf_tok, test: list[dict], *, rounds: int) -> dict:
    texts = [ex["text"] for ex in test]
    examples = [{"text": t} for t in texts]
    pipe = transformers.pipeline(
        "text-classification", model=hf, tokenizer=hf_tok, device=-1, truncation=True, max_length=MAX_LEN
    )
    ours_rates, hf_rates, hf64_rates = [], [], []
    for r in range(rounds):
        ours.eval(), hf.eval()
        started = time.perf_counter()
        task.predict(ours, examples, device=torch.device("cpu"))
        ours_rates.append(len(texts) / (time.perf_counter() - started))
        with torch.inference_mode():
            started = time.perf_counter()
            pipe(texts)
            hf_rates.append(len(texts) / (time.perf_counter() - started))
            started = time.perf_counter()
            pipe(texts, batch_size=64)
            hf64_rates.append(len(texts) / (time.perf_counter() - started))
        print(
            f"round {r}: lmforge {ours_rates[-1]:,.0f} texts/s, pipeline {hf_rates[-1]:,.0f} (batch 1), "
            f"{hf64_rates[-1]:,.0f} (batch 64)"
        )
    case = _case(
        ours_rates,
        hf_rates,
        "texts/s",
        {
            "texts": len(texts),
            "rounds": rounds,
            "lmforge_batch": 64,
            "hf": "pipeline('text-classification') default batch_size (1)",
        },
    )
    case["hf_batch64"] = statistics.median(hf64_rates)
    case["ratio_vs_batch64"] = case["lmforge"] / case["hf_batch64"]
    return case


def _case(ours: list[float], hf: list[float], unit: str, settings: dict) -> dict:
    a, b = statistics.median(ours), statistics.median(hf)
    return {
        "lmforge": a,
        "hf": b,
        "unit": unit,
        "ratio": a / b,
        "settings": {**settings, "lmforge_rounds": ours, "hf_rounds": hf},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="lmforge BERT directory (default: random bert-mini)")
    parser.add_argument("--test-texts", type=int, default=600, help="test reviews classified per round")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_builtin("reviews-sentiment")
    labels = sorted({ex["label"] for ex in data["train"]})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task, ours, hf, hf_tok = _models(args.model, work, labels)
        diff = _check_same_outputs(task, ours, hf, hf_tok, [ex["text"] for ex in data["dev"][:8]])
        print(f"same weights: max |logit difference| {diff:.2e}")
        cases = {
            "inference": inference_case(task, ours, hf, hf_tok, data["test"][: args.test_texts], rounds=args.rounds),
            "finetune": finetune_case(
                task, ours, hf, hf_tok, data["train"], rounds=args.rounds, steps=args.steps, work=work
            ),
        }
    result = {
        "machine": {
            "processor": platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "allocator": "glibc malloc",
            "logit_difference": diff,
        },
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for name, case in cases.items():
        print(
            f"{name}: lmforge {case['lmforge']:,.0f} vs transformers {case['hf']:,.0f} {case['unit']}: "
            f"{case['ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
