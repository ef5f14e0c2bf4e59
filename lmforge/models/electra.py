"""The ELECTRA pretraining model (Clark et al., 2020): a small generator and a BERT discriminator.

The discriminator is a normal ``Bert`` (what pretraining saves); the generator is built from the
same ``BertLayer`` blocks at ``spec.generator_fraction`` of the width and shares the token, position
and segment embeddings. The objective that trains it is ``tasks/electra.py``; its shape settings are
``ElectraSpec`` in ``models/specs.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.bert import Bert, BertConfig, BertLayer
from lmforge.models.layers import activation_fn, init_weights
from lmforge.models.specs import ElectraSpec


def generator_config(disc: BertConfig, spec: ElectraSpec) -> BertConfig:
    """The generator's shape: ``generator_fraction`` of the width, heads and feed-forward."""
    heads = max(1, round(disc.n_heads * spec.generator_fraction))
    width = max(heads, round(disc.d_model * spec.generator_fraction) // heads * heads)
    return dataclasses.replace(
        disc,
        d_model=width,
        n_heads=heads,
        d_ff=max(1, round(disc.d_ff * spec.generator_fraction)),
        n_layers=spec.generator_layers or disc.n_layers,
        pooler=False,
        mlm_head=False,
    )


class Electra(nn.Module):
    """Generator + discriminator with shared embeddings; ``discriminator`` is a plain lmforge BERT."""

    def __init__(self, cfg: BertConfig, spec: ElectraSpec) -> None:
        super().__init__()
        self.cfg = dataclasses.replace(cfg, pooler=False, mlm_head=False)  # the discriminator's config
        self.spec = spec
        self.discriminator = Bert(self.cfg)
        g = self.gen_cfg = generator_config(self.cfg, spec)
        d = self.cfg.d_model
        self.gen_in = nn.Linear(d, g.d_model) if g.d_model != d else nn.Identity()
        self.gen_layers = nn.ModuleList(BertLayer(g) for _ in range(g.n_layers))
        self.gen_head = nn.Sequential(nn.Linear(g.d_model, d), _Activation(g.activation), nn.LayerNorm(d))
        self.gen_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.disc_head = nn.Sequential(nn.Linear(d, d), _Activation(cfg.activation), nn.Linear(d, 1))
        for module in (self.gen_in, self.gen_layers, self.gen_head, self.disc_head):
            init_weights(module, cfg.init_std)
        self.register_buffer("reward_baseline", torch.zeros(()))  # saved with the weights: exact resume

    @property
    def embedding(self) -> Tensor:
        return self.discriminator.embed.word.weight  # (V, D), shared and tied

    def generator_hidden(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Generator outputs (N, D) at the flat ``positions`` (its head applied, before the vocabulary)."""
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.gen_in(self.discriminator.embed(input_ids, pos))  # (B, T, Dg)
        for layer in self.gen_layers:
            x = layer(x, None)
        return self.gen_head(x.reshape(B * T, -1)[positions])  # (N, D)

    def generator_logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embedding, self.gen_bias)  # (N, V)

    def sample(self, logits: Tensor) -> Tensor:
        """One token per row from softmax(logits) (N,), without gradient.

        ``multinomial`` inverts the cumulative distribution with one uniform draw per row (torch's own
        multinomial draws an exponential variate per vocabulary entry: ~23% of a training step here);
        ``gumbel`` takes the argmax of Gumbel-perturbed logits (one uniform per entry).
        """
        logits = logits.detach().float()
        if self.spec.sampling == "gumbel":
            u = torch.rand_like(logits).clamp_(1e-9, 1.0)
            return (logits - torch.log(-torch.log(u))).argmax(-1)
        cdf = logits.softmax(-1).cumsum_(-1)  # (N, V)
        u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)

    def discriminator_logits(self, input_ids: Tensor) -> Tensor:
        """Replaced-token logits (B, T): > 0 means 'replaced'."""
        return self.disc_head(self.discriminator(input_ids)).squeeze(-1)


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = activation_fn(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
