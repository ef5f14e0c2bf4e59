"""Adversarial training on the word-embedding matrix: FGM (Miyato et al., 2017) and PGD (Madry et al., 2018).

After the clean backward pass, the word-embedding matrix is pushed along its gradient (FGM: one
step of size epsilon on the L2-normalised gradient; PGD: ``steps`` steps of size ``alpha``, each
projected back into the epsilon-ball around the clean weights), the loss is computed again at
the perturbed weights and its gradient is added to the clean one; then the weights are restored.
This is the form popular in Chinese NLP competitions (as in bert4torch's ``FGM`` / ``PGD``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.errors import UserError


def word_embedding(model: nn.Module) -> nn.Embedding:
    """The token-embedding table of an lmforge model (``embed.word``), wherever it sits in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.endswith("embed.word"):
            return module
    raise UserError(f"{type(model).__name__} has no word-embedding table 'embed.word' to perturb")


class EmbeddingAttack:
    """Adds the gradient of the loss under an adversarial perturbation of the word embeddings."""

    def __init__(
        self, model: nn.Module, *, kind: Literal["fgm", "pgd"], epsilon: float, alpha: float, steps: int
    ) -> None:
        if kind not in ("fgm", "pgd"):
            raise UserError(f"adversarial={kind!r} must be 'none', 'fgm' or 'pgd'")
        if epsilon <= 0 or (kind == "pgd" and (alpha <= 0 or steps < 1)):
            raise UserError(
                f"adversarial training needs adv_epsilon > 0 (got {epsilon}); PGD also adv_alpha > 0 and adv_steps >= 1"
            )
        self.model, self.kind, self.epsilon, self.alpha, self.steps = model, kind, epsilon, alpha, steps
        self.weight = word_embedding(model).weight
        self.passes = 1 if kind == "fgm" else steps  # extra forward + backward passes per batch

    @staticmethod
    def _direction(grad: Tensor) -> Tensor | None:
        norm = torch.linalg.vector_norm(grad.float())
        return None if norm == 0 or not torch.isfinite(norm) else grad / norm

    @torch.no_grad()
    def _set(self, value: Tensor) -> None:
        self.weight.copy_(value)

    def backward(self, adversarial_loss: Callable[[], Tensor]) -> None:
        """Call after the clean loss's backward: ``adversarial_loss()`` recomputes the (scaled) loss."""
        if self.weight.grad is None:
            return
        clean = self.weight.detach().clone()
        if self.kind == "fgm":
            step = self._direction(self.weight.grad)
            if step is None:
                return
            self._set(clean + self.epsilon * step)
            adversarial_loss().backward()
            self._set(clean)
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        clean_grads = [p.grad.clone() for p in params]
        delta = torch.zeros_like(clean)
        for k in range(self.steps):
            step = self._direction(self.weight.grad)
            if step is None:  # no signal to follow: keep the clean gradients
                for p, g in zip(params, clean_grads, strict=True):
                    p.grad.copy_(g)
                break
            delta += self.alpha * step
            norm = torch.linalg.vector_norm(delta.float())
            if norm > self.epsilon:
                delta *= self.epsilon / norm
            self._set(clean + delta)
            last = k == self.steps - 1
            for p, g in zip(params, clean_grads, strict=True):
                # intermediate steps only need the adversarial gradient's direction; the last adds to the clean one
                p.grad.copy_(g) if last else p.grad.zero_()
            adversarial_loss().backward()
        self._set(clean)
