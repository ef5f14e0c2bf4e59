"""GRPO's objective (tasks/grpo.py) against hand computations, on a toy policy, and the verifiable rewards
(tasks/rewards.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import UserError
from lmforge.tasks.grpo import ADVANTAGE_EPS, group_advantages, grpo_loss
from lmforge.tasks.rewards import BUILTIN_REWARDS, load_reward, rhyme_of, rhymes


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages, flat = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.5**2 / 3)  # the sample standard deviation of 1, 0, 0, 1
    expected = [0.5 / (std + ADVANTAGE_EPS), -0.5 / (std + ADVANTAGE_EPS)] * 2
    assert advantages[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1], expected[0]])
    assert advantages[4:].tolist() == [0.0] * 4 and flat == 0.5  # the all-equal group teaches nothing
    unscaled, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def _by_hand(logp, old, ref, adv, mask, clip_eps, beta, normalization, max_tokens=None) -> float:
    """eq. 3 of Shao et al. 2024, negated, with plain floats."""
    per_sequence = []
    for i, row in enumerate(mask):
        total = 0.0
        for t, on in enumerate(row):
            if not on:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            objective = min(ratio * adv[i], max(min(ratio, 1 + clip_eps), 1 - clip_eps) * adv[i])
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            total += -(objective - beta * kl)
        per_sequence.append(total / (sum(row) if normalization == "sequence" else max_tokens))
    return sum(per_sequence) / len(per_sequence)


@pytest.mark.parametrize("normalization", ["sequence", "constant"])
def test_the_loss_is_eq3_by_hand(normalization: str) -> None:
    logp = [[-1.0, -0.5, -3.0], [-2.0, -0.2, -1.5]]
    old = [[-1.2, -0.1, -3.0], [-1.5, -0.9, -1.0]]  # ratios from 0.67 to 2.0: some clipped
    ref = [[-0.8, -0.7, -2.0], [-2.5, -0.3, -1.1]]
    adv, mask = [1.5, -0.7], [[1, 1, 0], [1, 1, 1]]
    loss, parts = grpo_loss(
        torch.tensor(logp, requires_grad=True),
        torch.tensor(old),
        torch.tensor(ref),
        torch.tensor(adv),
        torch.tensor(mask),
        clip_eps=0.2,
        beta=0.04,
        normalization=normalization,
        max_tokens=4,
    )
    assert loss.item() == pytest.approx(_by_hand(logp, old, ref, adv, mask, 0.2, 0.04, normalization, 4), rel=1e-6)
    kls = [
        math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
        for i in range(2)
        for t in range(3)
        if mask[i][t]
    ]
    assert parts["kl"] == pytest.approx(sum(kls) / 5, rel=1e-6) and min(kls) >= 0
    # clipped where min() took the clipped term: (0, 0) ratio e^0.2 > 1.2 with A > 0, (1, 0) and (1, 2) e^-0.5 < 0.8
    # with A < 0; not (0, 1) e^-0.4 < 0.8 with A > 0 nor (1, 1) e^0.7 > 1.2 with A < 0 (the unclipped term is smaller)
    assert parts["clip_fraction"] == pytest.approx(3 / 5)


def test_the_gradient_on_a_groups_first_step_is_the_advantage_over_the_length() -> None:
    """With the sampling policy's own log-probabilities (ratio 1) and no KL, d loss / d logp[i, t] = -A_i / |o_i| / n:
    the policy gradient with a group-relative baseline; a clipped token passes no gradient."""
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    advantages, mask = torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2.0 / 2 / 2] * 2 + [0.0] + [1.0 / 3 / 2] * 3)
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, parts = grpo_loss(logp, torch.tensor([[-1.5]]), None, torch.tensor([1.0]), torch.tensor([[1]]), beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and logp.grad.item() == 0.0 and parts["clip_fraction"] == 1.0


def _toy_run(steps: int, reward_of, *, start: torch.Tensor, beta: float, seed: int = 0) -> torch.Tensor:
    """A one-token policy (logits over 5 tokens) trained by GRPO: 8 samples a step, Adam; its final probabilities."""
    generator = torch.Generator().manual_seed(seed)
    logits = start.clone().requires_grad_(True)
    reference = torch.log_softmax(start, dim=0).detach()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, dim=0), 8, replacement=True, generator=generator)
        advantages, _ = group_advantages(torch.tensor([reward_of(int(t)) for t in tokens]), 8)
        logp = torch.log_softmax(logits, dim=0)[tokens].unsqueeze(1)
        loss, _ = grpo_loss(
            logp, logp.detach(), reference[tokens].unsqueeze(1), advantages, torch.ones(8, 1), beta=beta
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.softmax(logits.detach(), dim=0)


def test_grpo_raises_a_verifiable_reward_on_a_toy_policy() -> None:
    """Reward 1 for emitting token 3: from a uniform policy (0.2) it is chosen > 90% of the time within 40 steps."""
    probabilities = _toy_run(40, lambda token: float(token == 3), start=torch.zeros(5), beta=0.04)
    assert probabilities[3] > 0.9, probabilities


def test_with_a_flat_reward_the_kl_term_pulls_the_policy_back_to_its_reference() -> None:
    """Every reward equal: the advantages are 0 and only the KL term acts. A policy moved away from its reference
    (by starting the trained logits elsewhere) drifts back."""
    reference = torch.zeros(5)
    moved = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    logits = moved.clone().requires_grad_(True)
    ref_logp = torch.log_softmax(reference, dim=0)
    optimizer = torch.optim.Adam([logits], lr=0.05)

    def kl_to_reference() -> float:
        p = torch.softmax(logits.detach(), dim=0)
        return float((p * (p.log() - ref_logp)).sum())

    before = kl_to_reference()
    for _ in range(60):
        with torch.no_grad():
            tokens = torch.multinomial(torch.softmax(logits, dim=0), 8, replacement=True, generator=generator)
        advantages, flat = group_advantages(torch.ones(8), 8)
        assert flat == 1.0 and advantages.abs().max() == 0
        logp = torch.log_softmax(logits, dim=0)[tokens].unsqueeze(1)
        loss, _ = grpo_loss(logp, logp.detach(), ref_logp[tokens].unsqueeze(1), advantages, torch.ones(8, 1), beta=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl_to_reference() < before / 4, (before, kl_to_reference())


def test_rhyme_groups_and_tones_of_modern_readings() -> None:
    assert rhyme_of("霜") == ("唐", "平") and rhyme_of("乡") == ("唐", "平")
    assert rhyme_of("诗") == ("支", "平") and rhyme_of("衣") == ("齐", "平")  # zhi/chi/shi's -i is not yi's i
    assert rhyme_of("山") == rhyme_of("天") == ("寒", "平")  # an and ian rhyme in the 中华新韵
    assert rhyme_of("雪")[1] == "仄" and rhyme_of("x") is None
    assert rhymes("床前明月光，疑是地上霜。举头望明月，低头思故乡。")  # 霜 / 乡
    assert rhymes("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")  # 流 / 楼
    assert not rhymes("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。")  # 鸟 / 少: oblique tones
    assert not rhymes("床前明月光，疑是地上霜。举头望明月，低头思故人。")  # 霜 / 人: two rhymes
    assert not rhymes("床前明月光，疑是地上霜。")  # not a well-formed poem (two lines)


def test_rewards_are_found_by_name_or_module_path_with_clear_errors() -> None:
    assert load_reward("poem_rhyme") is BUILTIN_REWARDS["poem_rhyme"]
    form = load_reward("lmforge.tasks.rewards:poem_form_reward")
    assert form("静夜思\n", "床前明月光，疑是地上霜。举头望明月，低头思故乡。", {}) == 1.0
    assert form("静夜思\n", "床前明月光", {}) == 0.0
    chrf = load_reward("chrf")
    assert chrf("", "I love you.", {"reference": "I love you."}) == pytest.approx(1.0)
    with pytest.raises(UserError, match="needs a 'reference'|need a 'reference'"):
        chrf("", "I love you.", {})
    with pytest.raises(UserError, match=r"reward 'rhyme': a built-in reward \(poem_form, poem_rhyme, chrf\)"):
        load_reward("rhyme")
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        load_reward("no_such_module:f")
    with pytest.raises(UserError, match="lmforge.tasks.rewards has no function 'missing'"):
        load_reward("lmforge.tasks.rewards:missing")
