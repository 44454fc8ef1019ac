"""Group-relative advantage estimators, as small registered functions.

Every estimator has the same signature:

    fn(rewards: Tensor[num_groups, group_size], eps: float) -> Tensor[num_groups, group_size]

One row is one group: the G refinements sampled from one (prompt + best draft). The advantage
of a sample is repeated over every token of its response by the caller. A new estimator is one
decorated function:

    @register_advantage("my_estimator")
    def my_estimator(rewards, eps): ...

and is then selectable with `algorithm.advantage=my_estimator`; or, without registering (and
without a fork), by import path: `algorithm.advantage=my_pkg.advantages:my_estimator`.

Shared conventions (see docs/algorithm.md):
- the computation runs in float64 and the result is cast back to the rewards' dtype, so small
  reward differences are not lost to float32 rounding before they are divided by a small std;
- a group whose rewards are all equal (max == min, tested exactly, not through std < tol) gets
  A = 0 for every member: there is nothing to prefer, and this avoids dividing rounding noise
  by eps;
- a group of one sample (G = 1) gets A = 0: there is no baseline. Budget validation rejects
  num_refinements < 2 before a run starts, so this is only a safe fallback.
"""

from __future__ import annotations

from typing import Callable

import torch

from nemo_igrpo.utils.registry import Registry

AdvantageFn = Callable[[torch.Tensor, float], torch.Tensor]

ADVANTAGE_ESTIMATORS = Registry(
    "estimator",
    "algorithm.advantage",
    arity=2,
    signature="fn(rewards: Tensor[num_groups, group_size], eps: float) -> Tensor",
)
register_advantage = ADVANTAGE_ESTIMATORS.register  # @register_advantage("name"); names are unique
get_advantage_estimator: Callable[[str], AdvantageFn] = ADVANTAGE_ESTIMATORS.lookup


def _check(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a [num_groups, group_size] tensor, got {shape}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or Inf; the reward manager should have substituted its fallback score")
    return rewards.to(torch.float64)


def _constant_groups(r: torch.Tensor) -> torch.Tensor:
    """[num_groups, 1] bool: every reward in the group is identical."""
    return r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_j = (r_j - mean(r)) / (std(r) + eps), std with Bessel's correction (ddof = 1).

    The paper (and verl, NeMo-RL) use the sample standard deviation; eps only guards against
    division by a tiny std, since exactly-constant groups are set to zero beforehand.
    """
    r = _check(rewards)
    if r.shape[1] < 2:
        return torch.zeros_like(rewards)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=1)
    adv = (r - mean) / (std + eps)
    adv = torch.where(_constant_groups(r), torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr. GRPO: A_j = r_j - mean(r). No division by std, which the Dr. GRPO paper shows biases
    updates towards too-easy and too-hard groups. `eps` is unused (kept for the common signature)."""
    r = _check(rewards)
    if r.shape[1] < 2:
        return torch.zeros_like(rewards)
    adv = r - r.mean(dim=1, keepdim=True)
    adv = torch.where(_constant_groups(r), torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE leave-one-out: A_j = r_j - mean_{k != j} r_k = G / (G - 1) * (r_j - mean(r)).

    The baseline of a sample excludes the sample itself, so it is unbiased. `eps` is unused.
    """
    r = _check(rewards)
    g = r.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    loo_mean = (r.sum(dim=1, keepdim=True) - r) / (g - 1)
    adv = r - loo_mean
    adv = torch.where(_constant_groups(r), torch.zeros_like(adv), adv)
    return adv.to(rewards.dtype)


def compute_group_advantages(name: str, rewards_per_group: list[list[float]], eps: float) -> list[list[float]]:
    """Advantages for groups of possibly different sizes (the adaptive draft budget gives some
    prompts more refinements): groups of equal size are batched into one tensor call."""
    fn = get_advantage_estimator(name)
    out: list[list[float]] = [[] for _ in rewards_per_group]
    by_size: dict[int, list[int]] = {}
    for i, group in enumerate(rewards_per_group):
        by_size.setdefault(len(group), []).append(i)
    for size, indices in by_size.items():
        if size == 0:
            continue
        table = torch.tensor([rewards_per_group[i] for i in indices], dtype=torch.float64)
        adv = fn(table, eps)
        if adv.shape != table.shape:
            raise ValueError(f"advantage estimator {name!r} returned shape {tuple(adv.shape)} for {tuple(table.shape)}")
        for row, i in enumerate(indices):
            out[i] = [float(x) for x in adv[row].tolist()]
    return out
