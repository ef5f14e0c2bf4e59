"""What this CPU is and can do fast, read once from /proc/cpuinfo: its name (the key of cached peak FLOP/s)
and the run-time choices of int8 and bf16 paths.

- ``has_vnni``: 8-bit dot products summed into 32 bits (AVX-512 VNNI, AVX-VNNI): int8 inputs may use all 8 bits.
- ``has_bf16``: bf16 dot products (AVX-512 BF16, AMX-BF16): bf16 matmuls run ~2x fp32's speed. Without them
  (e.g. the Intel Xeons of FINDINGS) PyTorch emulates bf16 and it runs ~4x slower than fp32.
- ``bf16_is_fast(device)``: the one answer to "is bf16 native here" (a GPU's support, else ``has_bf16``), asked by
  the ``auto`` precisions of decoding (``models/decoding.py``) and training (``train/loop.py``).

On a machine without /proc/cpuinfo (not Linux) every answer is False: the exact fp32 paths.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line); empty where there is none."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 9B14"), not just the architecture; the platform's name where /proc has none."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def bf16_is_fast(device) -> bool:
    """Whether bf16 arithmetic is native on ``device`` (a ``torch.device``): a CUDA GPU that supports it, or a CPU
    with avx512_bf16 / amx_bf16 (elsewhere it is emulated, ~4x slower than fp32). Decoding's and training's
    ``auto`` precisions both ask this."""
    if device.type == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return has_bf16()
