"""ELECTRA's objective: replaced-token detection with a small generator (Clark et al., 2020), and its
adversarial variant. The model (``Electra``: generator + discriminator) is in ``models/electra.py``.

``Electra`` composes two encoders from ``models/bert.py``: the discriminator (a normal ``Bert``,
which is what pretraining saves) and a generator whose width is a fraction of the discriminator's
(1/4 by default, the paper's best), built from the same ``BertLayer`` blocks. As in the paper the
two share the token, position and segment embeddings: the generator reads the discriminator's
embedding output through a projection to its width, and its MLM head projects back to the
embedding width so that its output layer is the shared (tied) token embedding.

Per batch (``ElectraTask``, masking as in ``tasks/mlm.py``): the generator predicts the masked
tokens (MLM loss at the masked positions only); a token is sampled from its distribution at every
masked position (multinomial, or the Gumbel-max trick; no gradient flows through the sample); the
discriminator reads the text with the samples in place and classifies every token as original or
replaced. A sample equal to the original token counts as *original*, as in the paper. Loss =
generator MLM + ``disc_weight`` x discriminator binary cross-entropy (lambda = 50), both as means.

The adversarial variant (the paper's Appendix F, "a GAN for text") trains the generator to fool the
discriminator instead of (``adversarial``) or beside (``mixed``) maximum likelihood. Sampling is not
differentiable, so it uses REINFORCE (Williams, 1992): the reward of a sampled token is the
discriminator's log-probability that it is original, a running mean of rewards is the baseline,
and the generator's loss is -(reward - baseline) x log p(sampled token).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.data.tokenizer import LMTokenizer
from lmforge.models.electra import Electra
from lmforge.ops.linear_cross_entropy import linear_cross_entropy
from lmforge.tasks.base import LossOutput, flops_d_ff, transformer_train_flops
from lmforge.tasks.mlm import MLMTask


def corrupt(originals: Tensor, positions: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
    """The discriminator's input (the original ids with ``samples`` at the flat ``positions``) and its
    labels: 1.0 exactly where the sampled token differs from the original, 0.0 elsewhere."""
    corrupted = originals.clone().view(-1)
    corrupted[positions] = samples
    corrupted = corrupted.view_as(originals)
    return corrupted, (corrupted != originals).float()


class ElectraTask(MLMTask):
    """Replaced-token detection over the MLM task's batches (same shards, same dynamic masking)."""

    @classmethod
    def pretraining_model(cls, model_cfg: Any, electra: Any) -> Electra:
        """A generator and a discriminator of ``model_cfg``, sized by ``electra`` (``models/specs.ElectraSpec``)."""
        return Electra(model_cfg, electra)

    @classmethod
    def for_pretraining(cls, cfg: Any, tok: Any, shards: Any, entry: Any) -> ElectraTask:
        """The objective of a pretraining recipe (``runs/config.PretrainConfig``) over its token shards."""
        return cls(shards=str(shards), tokenizer=tok, seq_len=cfg.data.seq_len, mask_prob=cfg.mask_prob)

    def __init__(self, *, shards: str, tokenizer: LMTokenizer, seq_len: int, mask_prob: float = 0.15) -> None:
        super().__init__(shards=shards, tokenizer=tokenizer, seq_len=seq_len, mask_prob=mask_prob)
        self.name = "electra"

    def loss(self, model: Electra, batch: dict[str, Any]) -> LossOutput:
        spec, positions, labels = model.spec, batch["positions"], batch["labels"]
        masked = batch["input_ids"]
        originals = masked.clone().view(-1)
        originals[positions] = labels
        originals = originals.view_as(masked)
        hidden = model.generator_hidden(masked, positions)  # (N, D)
        adversarial = spec.generator_objective != "mle"
        with torch.set_grad_enabled(adversarial and torch.is_grad_enabled()):  # MLE: logits only to sample from
            logits = model.generator_logits(hidden)  # (N, V)
        samples = model.sample(logits)
        disc_input, replaced = corrupt(originals, positions, samples)
        disc_logits = model.discriminator_logits(disc_input)  # (B, T)
        disc_sum = F.binary_cross_entropy_with_logits(disc_logits.float(), replaced, reduction="sum")
        n, n_tokens = len(positions), replaced.numel()
        counts: dict[str, float] = {}
        gen_sum = torch.zeros((), device=hidden.device)
        if spec.generator_objective in ("mle", "mixed"):
            gen_sum, correct = linear_cross_entropy(hidden, model.embedding, labels, bias=model.gen_bias)
            counts["generator_correct"] = float(correct)
        if adversarial:
            gen_sum = gen_sum + spec.adversarial_weight * self._reinforce(
                model, logits, samples, disc_logits, positions
            )
        # Means as in the paper: the loop divides by n_targets (= masked positions), so the discriminator's
        # sum over all tokens is scaled by n / n_tokens.
        loss_sum = gen_sum + spec.disc_weight * disc_sum * (n / n_tokens)
        with torch.no_grad():
            counts.update(
                generator_loss_sum=float(gen_sum.detach()),
                disc_loss_sum=float(disc_sum.detach()),
                disc_correct=float(((disc_logits > 0) == replaced.bool()).sum()),
                disc_tokens=float(n_tokens),
                replaced=float(replaced.sum()),
            )
        return LossOutput(loss_sum, counts)

    @staticmethod
    def _reinforce(model: Electra, logits: Tensor, samples: Tensor, disc_logits: Tensor, positions: Tensor) -> Tensor:
        """REINFORCE: -(reward - baseline) * log p(sample), reward = log P_disc(original) at the sample."""
        log_p = logits.float().log_softmax(-1).gather(1, samples[:, None]).squeeze(1)  # (N,)
        reward = F.logsigmoid(-disc_logits.detach().float()).reshape(-1)[positions]  # log(1 - P(replaced))
        baseline = model.reward_baseline
        if model.training:  # the running mean moves only while training (a buffer: saved and restored)
            baseline.mul_(model.spec.baseline_decay).add_((1 - model.spec.baseline_decay) * reward.mean())
        return -((reward - baseline) * log_p).sum()

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["n_targets"], 1.0)
        out = {"loss": sums["loss_sum"] / n, "generator_loss": sums.get("generator_loss_sum", 0.0) / n}
        if "generator_correct" in sums:
            out["generator_accuracy"] = sums["generator_correct"] / n
        tokens = max(sums.get("disc_tokens", 0.0), 1.0)
        out.update(
            discriminator_loss=sums.get("disc_loss_sum", 0.0) / tokens,
            discriminator_accuracy=sums.get("disc_correct", 0.0) / tokens,
            replaced_fraction=sums.get("replaced", 0.0) / n,  # of the masked positions, how many samples differ
        )
        return out

    def flops(self, model: Electra, batch: dict[str, Any]) -> float:
        return electra_train_flops(model, batch)


def electra_train_flops(model: Electra, batch: dict[str, Any]) -> float:
    """Training FLOPs: the generator (all positions, head at the masked ones, plus the sampling pass over
    the vocabulary), the discriminator and its head at every position."""
    B, T = batch["input_ids"].shape
    n, d, g, V = batch["n_targets"], model.cfg.d_model, model.gen_cfg, model.cfg.vocab_size
    disc = transformer_train_flops(
        n_layers=model.cfg.n_layers,
        d_model=d,
        d_ff=flops_d_ff(model.cfg),
        n_tokens=B * T,
        seq_len=T,
        head_rows=B * T,
        head_flops_per_row=2 * d * d + 2 * d,
    )
    gen = transformer_train_flops(
        n_layers=g.n_layers,
        d_model=g.d_model,
        d_ff=flops_d_ff(g),
        n_tokens=B * T,
        seq_len=T,
        head_rows=n,
        head_flops_per_row=2 * g.d_model * d + 2 * d * V,
    )
    projection = 3.0 * 2 * d * g.d_model * B * T if g.d_model != d else 0.0
    return disc + gen + projection + 2.0 * d * V * n  # + the no-gradient logits the samples are drawn from
