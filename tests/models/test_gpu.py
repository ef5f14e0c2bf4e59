"""CUDA paths: the same weights give the same logits on the GPU, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.gpt import GPT
from lmforge.models.sizes import model_size

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("size", ["gpt-tiny", "llama-tiny"])
def test_cuda_matches_cpu(size: str) -> None:
    model = GPT(model_size(size, vocab_size=500)).eval()
    ids = torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        cpu = model(ids)
        gpu_model = model.to("cuda")
        fp32 = gpu_model(ids.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = gpu_model(ids.cuda()).float().cpu()
    torch.testing.assert_close(fp32, cpu, atol=1e-3, rtol=1e-3)
    # bf16 keeps ~3 significant digits: the error stays a few percent of the logit scale.
    assert (bf16 - cpu).abs().max() <= 0.05 * cpu.abs().max()
