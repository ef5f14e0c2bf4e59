"""Classification throughput and accuracy of a fine-tuned run on each CPU backend vs transformers' pipeline.

Backends, all from one classify run directory (default ``runs/e5-sent``: multilingual-e5-small fine-tuned on
``reviews-sentiment`` by ``configs/classify/e5-small-reviews.yaml``):

- ``fp32``: the run itself (PyTorch);
- ``int8``: ``lmforge quantize`` (int8 weights, dynamic int8 activations; torch.ao kernels);
- ``onnx-fp32`` / ``onnx-int8``: ``lmforge export --to onnx [--int8]`` run by ONNX Runtime;
- ``hf``: the same weights in transformers, through ``pipeline``: ``text-classification`` on a
  ``BertForSequenceClassification`` when the run pools with BERT's pooler; for a mean-pooling run
  (e5), ``feature-extraction`` on the exported ``BertModel`` followed by the run's mean pooling and head
  (transformers has no mean-pooling classification head). Batch size 32 (the pipeline's default, 1, is
  also timed and reported; each case's ``ratio`` is against the faster of the two).

Every lmforge backend classifies through ``ClassificationTask.predict`` from raw text (tokenization and
batching included, 32 texts per batch). Throughput: texts per second over the first ``--texts`` test
reviews, rounds interleaved (fp32, int8, onnx-fp32, onnx-int8, hf), in this process with the same thread
count (ONNX Runtime's intra-op threads = torch's); medians are compared. Accuracy: each backend on the
whole test split once.

    python bench/inference_vs_hf.py [--model runs/e5-sent] [--texts 320] [--rounds 3] [--threads 2] [--out FILE]

Writes bench/results/inference_vs_hf.json in the shape of the other benchmarks:
{"machine": {...}, "cases": {"int8": {"lmforge", "hf", "unit", "ratio", ...}, ...}}: each case compares a
backend ("lmforge") with transformers' pipeline ("hf"); ``vs_fp32`` compares it with lmforge's fp32.
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

import numpy as np
import torch
import transformers

from lmforge.cli import main as lmforge
from lmforge.data.builtin import load_builtin
from lmforge.models.convert import to_hf
from lmforge.models.registry import load_model
from lmforge.rundir import load_run, task_settings

RESULTS = Path(__file__).parent / "results" / "inference_vs_hf.json"
BATCH = 32


def _copies(model: Path, work: Path) -> dict[str, Path]:
    dirs = {"fp32": model, "int8": work / "int8", "onnx-fp32": work / "onnx", "onnx-int8": work / "onnx-int8"}
    for args in (
        ["quantize", "--model", str(model), "--out", str(dirs["int8"])],
        ["export", "--to", "onnx", str(model), "--out", str(dirs["onnx-fp32"])],
        ["export", "--to", "onnx", "--int8", str(model), "--out", str(dirs["onnx-int8"])],
    ):
        if lmforge(args) != 0:
            raise SystemExit(f"lmforge {' '.join(args)} failed")
    return dirs


class _HF:
    """The run's weights in transformers and a function from texts to class probabilities via ``pipeline``."""

    def __init__(self, run, work: Path) -> None:
        encoder, head, pooling = run.model.encoder, run.model.head, run.model.head.pooling
        tok = run.task.tokenizer
        hf_cfg, state = to_hf(encoder.cfg, encoder.state_dict(), token_ids={"pad": tok.token_id("pad")})
        hf_cfg = {k: v for k, v in hf_cfg.items() if k != "architectures"}
        state = {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("cls.")}
        (work / "hf").mkdir(exist_ok=True)
        from lmforge.data.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(run.directory, work / "hf")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(work / "hf"))
        self.head, self.pooling = head, pooling
        if pooling == "pooler":
            config = transformers.BertConfig(**hf_cfg, num_labels=len(run.task.labels))
            self.model = transformers.BertForSequenceClassification(config)
            state = {f"bert.{k}": v for k, v in state.items()}
            state["bert.pooler.dense.weight"], state["bert.pooler.dense.bias"] = head.dense.weight, head.dense.bias
            state["classifier.weight"], state["classifier.bias"] = head.out.weight, head.out.bias
            self.kind = "text-classification"
        elif pooling == "mean":
            self.model = transformers.BertModel(transformers.BertConfig(**hf_cfg), add_pooling_layer=False)
            self.kind = "feature-extraction"
        else:
            raise SystemExit(f"{run.directory}: pooling {pooling!r}; the benchmark handles 'pooler' and 'mean'")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        self.model.eval()
        self.pipe = transformers.pipeline(
            self.kind, model=self.model, tokenizer=self.tokenizer, device=-1, truncation=True, max_length=128
        )
        self.labels = run.task.labels

    @torch.inference_mode()
    def probabilities(self, texts: list[str], batch_size: int = BATCH) -> np.ndarray:
        if self.kind == "text-classification":
            out = self.pipe(texts, batch_size=batch_size, top_k=None, function_to_apply="softmax")
            return np.array(
                [[{d["label"]: d["score"] for d in row}[f"LABEL_{i}"] for i in range(len(self.labels))] for row in out]
            )
        # each row is (1, T, D) with T the longest text of its batch: the padding positions are kept, so the mean
        # is over each text's own tokens (the pipeline's tokenization: truncated to 128 with [CLS] and [SEP])
        rows = self.pipe(texts, batch_size=batch_size, return_tensors=True)
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
        pooled = torch.stack([r[0, :n].mean(0) for r, n in zip(rows, lengths, strict=True)])
        return self.head.out(pooled).softmax(-1).numpy()


def _rate(fn, texts: list[str]) -> float:
    started = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/e5-sent", help="classify run directory (fp32, from lmforge finetune)")
    parser.add_argument("--texts", type=int, default=320, help="test reviews classified per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N test reviews for accuracy (0 = all; smoke runs)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Path(args.model)
    if (task_settings(model) or {}).get("task") != "classify":
        raise SystemExit(f"--model {model}: not a classify run directory")
    test = load_builtin("reviews-sentiment")["test"]
    test = test[: args.limit] if args.limit else test
    texts = [ex["text"] for ex in test]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dirs = _copies(model, work)
        runs = {name: load_run(path) for name, path in dirs.items()}
        labels = runs["fp32"].task.labels
        hf = _HF(runs["fp32"], work)

        def backend(name: str):
            run = runs[name]
            return lambda batch: run.task.predict(run.model, [{"text": t} for t in batch], device=torch.device("cpu"))

        predictors = {name: backend(name) for name in runs} | {"hf": hf.probabilities}
        predictors["hf-batch1"] = lambda batch: hf.probabilities(batch, batch_size=1)
        gold = np.array([labels.index(ex["label"]) for ex in test])
        accuracy, agreement = {}, {}
        fp32_labels = None
        for name, fn in predictors.items():
            if name == "hf-batch1":
                continue
            out = fn(texts)
            chosen = out.argmax(1) if isinstance(out, np.ndarray) else np.array([labels.index(p["label"]) for p in out])
            accuracy[name] = float((chosen == gold).mean())
            fp32_labels = chosen if name == "fp32" else fp32_labels
            agreement[name] = float((chosen == fp32_labels).mean())
            print(f"{name}: test accuracy {accuracy[name]:.4f}, same label as fp32 {agreement[name]:.4f}")
        timed = texts[: args.texts]
        rates: dict[str, list[float]] = {name: [] for name in predictors}
        for fn in predictors.values():  # warm-up: first calls allocate and pick kernels
            fn(timed[:BATCH])
        for r in range(args.rounds):
            for name, fn in predictors.items():
                rates[name].append(_rate(fn, timed))
            print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()) + " texts/s")
    median = {name: statistics.median(v) for name, v in rates.items()}
    # the pipeline at its faster batch size is the reference (batch 32 pads every text to its batch's longest)
    best_hf = max(median["hf"], median["hf-batch1"])
    cases = {}
    for name in dirs:
        cases[name] = {
            "lmforge": median[name],
            "hf": best_hf,
            "unit": "texts/s",
            "ratio": median[name] / best_hf,
            "vs_fp32": median[name] / median["fp32"],
            "ratio_vs_pipeline_batch32": median[name] / median["hf"],
            "ratio_vs_pipeline_batch1": median[name] / median["hf-batch1"],
            "accuracy": accuracy[name],
            "hf_accuracy": accuracy["hf"],
            "accuracy_change_vs_fp32": accuracy[name] - accuracy["fp32"],
            "same_label_as_fp32": agreement[name],
            "settings": {"texts": len(timed), "rounds": args.rounds, "batch": BATCH, "rounds_texts_per_s": rates[name]},
        }
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engine": torch.backends.quantized.engine,
        },
        "model": str(model),
        "parameters": sum(p.numel() for p in load_model(model).parameters()),
        "hf_pipeline": f"{hf.kind}: batch_size {BATCH} {median['hf']:.1f} texts/s, "
        f"batch_size 1 {median['hf-batch1']:.1f}; ratio is against the faster",
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, c in cases.items():
        print(
            f"{name:10s} {c['lmforge']:7.1f} texts/s  {c['vs_fp32']:.2f}x fp32  {c['ratio']:.2f}x pipeline  "
            f"accuracy {c['accuracy']:.4f} ({c['accuracy_change_vs_fp32']:+.4f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
