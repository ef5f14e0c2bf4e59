"""The vocabulary head alone: lmforge's fused chunked linear + cross-entropy vs F.linear + F.cross_entropy.

Forward + backward of a summed cross-entropy over N rows (hidden (N, D), weight (V, D)), fp32, against
the floor of the three GEMMs any implementation needs (logits, grad of hidden, grad of weight).
Median of interleaved repeats in one process.

    python bench/linear_ce.py [--rows 4096] [--dim 256] [--vocab 21128] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.ops.linear_cross_entropy import linear_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=21128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.dim, generator=g, requires_grad=True)
    weight = (torch.randn(args.vocab, args.dim, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def reference() -> None:
        F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum").backward()

    def fused() -> None:
        linear_cross_entropy(hidden, weight, labels)[0].backward()

    def gemms() -> None:
        with torch.no_grad():
            logits = hidden @ weight.t()
            logits @ weight
            logits.t() @ hidden

    cases = {"F.linear + F.cross_entropy": reference, "lmforge fused": fused, "3 GEMMs (floor)": gemms}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            hidden.grad = weight.grad = None
    for name, ts in times.items():
        print(f"{name:28s} {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    main()
