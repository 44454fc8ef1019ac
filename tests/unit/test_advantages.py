"""Advantage estimators: hand-computed values, an independent float64 re-implementation on
random groups (ties, all-equal groups, G = 1), and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_igrpo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_group_advantages,
    get_advantage_estimator,
    register_advantage,
)

EPS = 1e-6


# --- independent reference: plain Python floats, one group at a time -------------------------


def ref_grpo(group: list[float], eps: float) -> list[float]:
    g = len(group)
    if g < 2 or max(group) == min(group):
        return [0.0] * g
    mean = math.fsum(group) / g
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in group) / (g - 1))
    return [(x - mean) / (std + eps) for x in group]


def ref_dr_grpo(group: list[float], eps: float) -> list[float]:
    g = len(group)
    if g < 2 or max(group) == min(group):
        return [0.0] * g
    mean = math.fsum(group) / g
    return [x - mean for x in group]


def ref_rloo(group: list[float], eps: float) -> list[float]:
    g = len(group)
    if g < 2 or max(group) == min(group):
        return [0.0] * g
    return [x - math.fsum(group[:i] + group[i + 1 :]) / (g - 1) for i, x in enumerate(group)]


REFERENCES = {"grpo": ref_grpo, "dr_grpo": ref_dr_grpo, "rloo": ref_rloo}


# --- hand-computed values -----------------------------------------------------------------------


def test_grpo_hand_values():
    # [1, 0, 0, 1]: mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, 0.0, 0.0, 1.0]]), 0.0)
    expected = 0.5 / math.sqrt(1 / 3)  # 0.8660254
    assert torch.allclose(adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-6)
    # [1, 2, 3]: mean 2, sample std exactly 1, so A = (r - 2) / (1 + eps).
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), 0.5)
    assert adv.tolist() == [[-1 / 1.5, 0.0, 1 / 1.5]]


def test_population_std_would_differ():
    # Guards the ddof choice: with the population std (ddof=0) [1, 0] would give +-1, with
    # the sample std (ddof=1, the paper's) it gives +-1/sqrt(2).
    adv = ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.0)
    assert adv[0, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_dr_grpo_and_rloo_hand_values():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    assert ADVANTAGE_ESTIMATORS["dr_grpo"](r, EPS).tolist() == [[-2.0, -1.0, 0.0, 3.0]]
    # leave-one-out baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]
    assert ADVANTAGE_ESTIMATORS["rloo"](r, EPS)[0].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_constant_groups_and_single_samples_are_zero(name):
    fn = ADVANTAGE_ESTIMATORS[name]
    # 0.1 is not exactly representable; mean - 0.1 is rounding noise that must not be amplified.
    constant = torch.full((3, 5), 0.1, dtype=torch.float32)
    constant[1] = 1.0
    constant[2] = 0.0
    assert torch.equal(fn(constant, EPS), torch.zeros_like(constant))
    single = torch.tensor([[1.0], [0.0]])
    assert torch.equal(fn(single, EPS), torch.zeros_like(single))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_matches_float64_reference_on_random_groups(name):
    gen = torch.Generator().manual_seed(0)
    for group_size in (1, 2, 3, 4, 8):
        # Binary rewards (many ties and all-equal groups), graded rewards, and the paper's 0..2.
        binary = torch.randint(0, 2, (64, group_size), generator=gen).float()
        graded = torch.rand(64, group_size, generator=gen)
        two_terms = torch.randint(0, 3, (64, group_size), generator=gen).float()
        for rewards in (binary, graded, two_terms):
            got = ADVANTAGE_ESTIMATORS[name](rewards, EPS)
            assert got.dtype == rewards.dtype and got.shape == rewards.shape
            expected = torch.tensor(
                [REFERENCES[name](row, EPS) for row in rewards.double().tolist()], dtype=torch.float64
            )
            assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5), (name, group_size)


def test_grpo_group_is_standardised():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(16, 8, generator=gen, dtype=torch.float64)
    adv = ADVANTAGE_ESTIMATORS["grpo"](rewards, 0.0)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(adv.std(dim=1, correction=1), torch.ones(16, dtype=torch.float64), atol=1e-12)


def test_ragged_groups():
    groups = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2.0]]
    got = compute_group_advantages("grpo", groups, EPS)
    for group, adv in zip(groups, got):
        assert adv == pytest.approx(ref_grpo(group, EPS), abs=1e-9)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([[1.0, float("nan")]]), EPS)
    with pytest.raises(ValueError, match=r"\[num_groups, group_size\]"):
        ADVANTAGE_ESTIMATORS["grpo"](torch.tensor([1.0, 0.0]), EPS)
    with pytest.raises(ValueError, match="algorithm.advantage: 'nope' is not a registered estimator"):
        get_advantage_estimator("nope")


def test_registry_extension():
    @register_advantage("test_sign_only")
    def sign_only(rewards: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.sign(rewards - rewards.mean(dim=1, keepdim=True))

    try:
        assert get_advantage_estimator("test_sign_only") is sign_only
        assert compute_group_advantages("test_sign_only", [[0.0, 3.0]], EPS) == [[-1.0, 1.0]]
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("test_sign_only")(lambda r, e: r)
    finally:
        del ADVANTAGE_ESTIMATORS["test_sign_only"]
