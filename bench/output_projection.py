"""Microseconds per call of a GPT's output projection (hidden -> vocabulary logits) in each storage and precision.

The decoding step at batch 1 reads every weight once; the vocabulary matrix is the largest (21128 x 256 for
gpt-tiny with bert-base-chinese's vocabulary). This times one projection in fp32 (stored (V, D) and (D, V)),
bf16, and int8 weight-only (``torch._weight_int8pack_mm``, per-row scales) with fp32 and bf16 inputs, at batch
1 and 8, plus a small (256 -> 1024) projection for contrast. bf16 is fast only on CPUs with avx512_bf16 (or AMX).

    python bench/output_projection.py [--vocab 21128] [--d-model 256] [--threads 2] [--calls 300]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _time(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=21128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.vocab, args.d_model)
    w_t, w_bf16 = w.t().contiguous(), w.bfloat16()
    w_t_bf16 = w_t.bfloat16()
    scale = w.abs().amax(1) / 127
    w_int8 = torch.round(w / scale[:, None]).to(torch.int8)
    small = torch.randn(4 * args.d_model, args.d_model)
    small_t, small_bf16 = small.t().contiguous(), small.bfloat16()
    for batch in (1, 8):
        x = torch.randn(batch, args.d_model)
        for name, fn in _cases(x, w, w_t, w_bf16, w_t_bf16, w_int8, scale, small_t, small_bf16).items():
            print(f"batch {batch}  {name:28s} {_time(fn, args.calls):9.1f} us")


def _cases(x, w, w_t, w_bf16, w_t_bf16, w_int8, scale, small_t, small_bf16) -> dict:
    xb = x.bfloat16()
    return {
        "fp32, stored (V, D)": lambda: F.linear(x, w),
        "fp32, stored (D, V)": lambda: x @ w_t,
        "bf16, stored (V, D)": lambda: F.linear(xb, w_bf16),
        "bf16, stored (D, V)": lambda: xb @ w_t_bf16,
        "int8 weights, fp32 inputs": lambda: torch._weight_int8pack_mm(x, w_int8, scale),
        "int8 weights, bf16 inputs": lambda: torch._weight_int8pack_mm(xb, w_int8, scale.bfloat16()),
        "small 256->1024 fp32": lambda: x @ small_t,
        "small 256->1024 bf16": lambda: F.linear(xb, small_bf16),
    }


if __name__ == "__main__":
    main()
