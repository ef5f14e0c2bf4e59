"""The fused linear + cross-entropy used by every language-model head (MLM, CLM, ELECTRA's generator, chat).

It never holds the whole (N, V) logits matrix: it walks the rows in chunks, computing the loss and
both gradients chunk by chunk in the forward pass (the approach of Liger Kernel's fused linear
cross-entropy, Hsu et al., 2024), so no extra matmul is spent and the allocator never sees one huge
logits / log-softmax / gradient tensor per step (docs/FINDINGS.md: glibc's mmap churn on those cost
1.3-1.5x in training here). Only the gradients backward will ask for are computed: none in evaluation, and not the
vocabulary matrix's when it is frozen (under adapters: for Gemma 3's 262,144 x 640 matrix that is a third of the
head's arithmetic and a 671 MB buffer per call). Hand-written because torch has no fused op for it on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # label of positions that are not predicted (padding, prompt tokens, unmasked tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int, count: bool, needs: tuple
    ):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_hidden, need_weight = needs  # which gradients backward will ask for: the others are never computed
        autocast = torch.is_autocast_enabled(hidden.device.type)
        compute = torch.get_autocast_dtype(hidden.device.type) if autocast else hidden.dtype
        w = weight.to(compute)
        fp32 = compute == torch.float32
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = None
        if bias is not None and need_weight:
            grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        # One logits buffer for every chunk: the allocator sees a single (chunk, V) block per call.
        buffer = torch.empty((min(chunk, n), vocab), dtype=torch.float32, device=hidden.device) if fp32 else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk].to(compute)
                y = labels[start : start + chunk]
                # (C, V) logits; in fp32 written straight into the shared buffer
                logits = torch.mm(h, w.t(), out=buffer[: len(y)]) if fp32 else torch.mm(h, w.t()).float()
                if bias is not None:
                    logits += bias.float()
                valid = y != IGNORE
                target = y.clamp(min=0)
                picked = logits.gather(1, target[:, None]).squeeze(1)
                if count:
                    correct += ((logits.argmax(-1) == y) & valid).sum()
                # softmax in place, then d(sum of losses)/d(logits) = softmax - one_hot (zero on ignored rows)
                top = logits.amax(-1, keepdim=True)
                total = logits.sub_(top).exp_().sum(-1, keepdim=True)
                loss += ((top.squeeze(1) + total.squeeze(1).log() - picked) * valid).sum()
                if not (need_hidden or need_weight):
                    continue
                grad = logits.mul_(valid[:, None] / total)
                grad[torch.arange(len(y), device=y.device), target] -= valid.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
                if not fp32:
                    grad = grad.to(compute)
                if grad_hidden is not None:
                    if fp32:
                        torch.mm(grad, w, out=grad_hidden[start : start + len(y)])
                    else:
                        grad_hidden[start : start + len(y)] = (grad @ w).to(hidden.dtype)
                if grad_weight is not None:
                    if fp32:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)  # None where backward asks for no gradient
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Tensor):
        # The saved gradients were computed for a unit upstream gradient and are used once: scale in place.
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden.mul_(grad_loss)
        grad_weight = None if grad_weight is None else grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.mul_(grad_loss)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, chunk_bytes: int = 1 << 25
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` (IGNORE = -100 skipped),
    and the number of correct argmax predictions (counted only without gradients, i.e. in evaluation:
    the argmax is an extra pass over the logits). hidden (N, D), weight (V, D), labels (N,)."""
    chunk = max(16, chunk_bytes // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()
    needs = (
        grad and hidden.requires_grad,
        grad and (weight.requires_grad or (bias is not None and bias.requires_grad)),
    )
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, not grad, needs)


def sequence_log_likelihoods(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """(R,) summed log-probabilities of each row's target tokens: hidden (R, T, D), labels (R, T) with IGNORE where
    a position is not scored. One fused call per row (preference tuning's log pi(y | x) of each completion), so no
    (T, V) logits matrix outlives its chunk; differentiable like ``linear_cross_entropy``."""
    scored = labels != IGNORE  # only the scored positions meet the vocabulary
    rows = [linear_cross_entropy(hidden[r][scored[r]], weight, labels[r][scored[r]])[0] for r in range(len(hidden))]
    return -torch.stack(rows)
