"""How well a GPT trained on tang-poems writes poems: the form share, distinct-n, perplexity and copying.

For the first ``--n`` test poems of the model's training corpus (``builtin:tang-verse`` or ``builtin:tang-poems``,
read from its ``config.yaml``; ``--corpus`` to choose) the model is given the end token (a document starts
after one in the training shards), the title and a newline, and
samples a body (temperature 0.8, top-p 0.9, fixed seeds; and greedily, a second setting) up to its end token.
Reported per setting:

- form share: generated bodies that ``data/poems.poem_form`` accepts (every line 5 characters or every line 7,
  in couplets, punctuation in place), and the same share over the real test poems for reference;
- distinct-1 / distinct-2 (Li et al. 2016): distinct characters and character bigrams over all generated bodies,
  divided by their counts (the real poems' values alongside);
- copied: generated bodies found verbatim in the training split;
- perplexity of the held-out test poems (every token of title, newline, body and the end token), and samples.

    python bench/poem_generation.py --model runs/gpt-tiny-poems [--n 200] [--corpus NAME] [--out FILE]

Writes bench/results/poem_generation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import yaml

from lmforge.data.builtin import load_builtin
from lmforge.data.poems import poem_form
from lmforge.inference.generate import GenerationConfig, Generator
from lmforge.rundir import load_run

RESULTS = Path(__file__).parent / "results" / "poem_generation.json"


def distinct(bodies: list[str], n: int) -> float:
    grams = [b[i : i + n] for b in bodies for i in range(len(b) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def perplexity(model, tok, texts: list[str], batch: int = 32) -> float:
    """exp(mean NLL per token) of ``texts``, each read after an end token and followed by one, as documents sit in
    the training shards (the first token's context is the previous document's end)."""
    eos = tok.token_id("eos")
    rows = [[eos, *tok.encode(t, special_tokens=False), eos] for t in texts]
    rows = [r[: model.cfg.max_seq_len] for r in rows]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), eos, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, : len(r)], mask[j, : len(r)] = torch.tensor(r), 1
            logits = model(ids, attention_mask=mask).float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            real = mask[:, 1:].bool()
            total += float(nll[real].sum())
            count += int(real.sum())
    return math.exp(total / count)


def training_corpus(model_dir: Path) -> str:
    """The poem corpus named in a run's ``config.yaml`` (``data.input``)."""
    config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    names = [i.removeprefix("builtin:") for i in config["data"]["input"] if i.startswith("builtin:tang-")]
    if len(names) != 1:
        raise SystemExit(f"{model_dir}/config.yaml: data.input names no tang-* corpus; pass --corpus")
    return names[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a GPT directory trained on tang-poems")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--corpus", choices=["tang-verse", "tang-poems"], help="default: the model's own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.model, task="chat")
    model, tok = run.model, run.task.tokenizer
    corpus = args.corpus or training_corpus(Path(args.model))
    splits = load_builtin(corpus)
    test = splits["test"][: args.n]
    train_bodies = {p["body"] for p in splits["train"]}
    real = [p["body"] for p in test]
    gen = Generator(model, tok)
    settings = {
        "sampled": dict(do_sample=True, temperature=0.8, top_p=0.9),
        "greedy": dict(do_sample=False),
    }
    results: dict = {
        "model": args.model,
        "corpus": corpus,
        "n": len(test),
        "real_test_poems": {
            "form_share": sum(poem_form(b) is not None for b in real) / len(real),
            "distinct_1": distinct(real, 1),
            "distinct_2": distinct(real, 2),
        },
    }
    started = time.perf_counter()
    results["test_perplexity"] = perplexity(model, tok, [p["text"] for p in splits["test"]])
    results["perplexity_seconds"] = time.perf_counter() - started
    for name, sampling in settings.items():
        bodies = []
        started = time.perf_counter()
        for i, poem in enumerate(test):
            cfg = GenerationConfig(max_new_tokens=120, seed=i, **sampling)
            prompt = [tok.token_id("eos"), *tok.encode(poem["title"] + "\n", special_tokens=False)]  # a document start
            text = gen.generate([prompt], cfg)[0].text
            bodies.append(text.split("\n", 1)[0].strip())
        seconds = time.perf_counter() - started
        forms = [poem_form(b) for b in bodies]
        results[name] = {
            "form_share": sum(f is not None for f in forms) / len(forms),
            "five": sum(f == 5 for f in forms),
            "seven": sum(f == 7 for f in forms),
            "distinct_1": distinct(bodies, 1),
            "distinct_2": distinct(bodies, 2),
            "copied_from_train": sum(b in train_bodies for b in bodies) / len(bodies),
            "seconds": seconds,
            "samples": [{"title": p["title"], "generated": b} for p, b in zip(test[:8], bodies[:8], strict=True)],
        }
        r = results[name]
        print(
            f"{name}: form {r['form_share']:.1%} ({r['five']} five, {r['seven']} seven of {len(forms)}), distinct-1 "
            f"{r['distinct_1']:.3f} distinct-2 {r['distinct_2']:.3f}, copied {r['copied_from_train']:.1%}, "
            f"{seconds:.0f} s",
            flush=True,
        )
        for s in r["samples"][:4]:
            print(f"   {s['title']}: {s['generated']}")
    ref = results["real_test_poems"]
    print(
        f"real test poems: form {ref['form_share']:.1%}, distinct-1 {ref['distinct_1']:.3f} distinct-2 "
        f"{ref['distinct_2']:.3f}; test perplexity {results['test_perplexity']:.1f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
