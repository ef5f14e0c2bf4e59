"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, DeepSeekMath, section 4.1): the objective.

For each prompt the policy samples a group of G completions; each completion's reward is compared with the other
completions of its group, so no value model is needed:

- **Advantages** (outcome supervision, eq. after 3): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the group,
  the same for every token of completion i. ``std`` is the sample standard deviation (Bessel's correction, as
  TRL's ``GRPOTrainer``) and ``eps`` 1e-4 (TRL's); with ``scale=False`` the advantage is ``r_i - mean(r)``, as
  "Dr. GRPO" (Liu et al. 2025) recommends, since dividing by the group's std weights the questions that are
  almost always or almost never solved most. A group whose rewards are all equal has zero advantages: it teaches
  nothing, and ``zero_advantage_share`` counts such groups.
- **Objective** (eq. 3, maximised; here its negative is the loss): per token,
  ``min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip) * A) - beta * KL``, with ``ratio = pi(o_t) / pi_old(o_t)``
  (pi_old: the policy that sampled the group; the ratio is 1 on the first optimisation step of a group and the
  clip only acts on later ones) and the KL to a frozen reference by the unbiased, always non-negative k3 estimator
  (Schulman 2020; eq. 4): ``pi_ref / pi - log(pi_ref / pi) - 1``.
- **Length normalisation**, the choice the issue asks to document: ``"sequence"`` (the paper's eq. 3) averages
  each completion's tokens, then the completions, so a token of a short completion weighs more than one of a long
  completion; ``"constant"`` (Dr. GRPO) sums each completion's tokens and divides by one constant, the longest
  completion allowed (``max_tokens``), so every token weighs the same and length is not rewarded or punished
  through the normalisation.
"""

from __future__ import annotations

from typing import Literal

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True) -> tuple[torch.Tensor, float]:
    """The advantage of each completion (``rewards``: [prompts * group_size], the groups consecutive) and the share of
    groups whose rewards are all equal (their advantages are 0)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (at least 2)")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    flat = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean().item()
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    return centred.reshape(-1), flat


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    beta: float = 0.04,
    normalization: Literal["sequence", "constant"] = "sequence",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (the negative of eq. 3) over completions' tokens, and its parts.

    ``logp``, ``old_logp``, ``ref_logp``: [completions, tokens] log-probabilities of the sampled tokens under the
    policy being trained (with gradients), the policy that sampled them, and the reference (None: no KL term);
    ``advantages``: [completions]; ``mask``: [completions, tokens], 1 on the completion's tokens (its end-of-turn
    included), 0 on padding. Returns the loss and ``kl`` (mean k3 over tokens), ``clip_fraction`` (the share of
    tokens whose ratio was clipped where the clip mattered) and ``ratio`` (its mean over tokens)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    advantage = advantages.detach().to(logp.dtype).unsqueeze(1)
    unclipped, clipped = ratio * advantage, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    tokens = mask.sum().clamp(min=1)
    kl_mean = 0.0
    if ref_logp is not None and beta:
        delta = ref_logp.detach() - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        kl_mean = ((kl * mask).sum() / tokens).item()
    if normalization == "sequence":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif normalization == "constant":
        if not max_tokens:
            raise ValueError("normalization='constant' divides by max_tokens, the longest completion allowed")
        loss = (per_token * mask).sum(dim=1).mean() / max_tokens
    else:
        raise ValueError(f"normalization={normalization!r}: sequence or constant")
    was_clipped = (clipped < unclipped).to(logp.dtype)  # min() took the clipped term, which differs
    parts = {
        "kl": kl_mean,
        "clip_fraction": ((was_clipped * mask).sum() / tokens).item(),
        "ratio": ((ratio.detach() * mask).sum() / tokens).item(),
    }
    return loss, parts
