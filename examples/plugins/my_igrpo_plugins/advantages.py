"""Example advantage estimator: rank-based, robust to the scale of the reward."""

from __future__ import annotations

import torch


def rank_advantage(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """A_j = centred rank of r_j within its group, scaled to [-1, 1] (ties share their mean rank).

    rewards: [num_groups, group_size]; returns the same shape. A constant group gets 0, as every
    built-in estimator does (there is nothing to prefer). `eps` is unused but part of the
    contract: the trainer calls every estimator as fn(rewards, eps).
    """
    r = rewards.to(torch.float64)
    g = r.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    # rank of each element = number of smaller ones + half the number of equal others.
    smaller = (r.unsqueeze(2) > r.unsqueeze(1)).sum(dim=2).to(torch.float64)
    equal = (r.unsqueeze(2) == r.unsqueeze(1)).sum(dim=2).to(torch.float64) - 1.0
    rank = smaller + 0.5 * equal  # in [0, g - 1]
    adv = 2.0 * rank / (g - 1) - 1.0
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(adv), adv).to(rewards.dtype)
