"""Pass@k, computed the unbiased way (Chen et al., 2021): with n samples of which c are
correct, pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems. Pass@1 is then the mean
accuracy over the n samples, which is what the paper reports (n = 4 at T = 0.6)."""

from __future__ import annotations

from math import comb
from typing import Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must be within [0, num_samples={num_samples}]")
    if k < 1 or k > num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= num_samples ({num_samples})")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def mean_pass_at_k(correct_counts: Sequence[int], num_samples: int, k: int) -> float:
    if not correct_counts:
        raise ValueError("no problems to score")
    return sum(pass_at_k(num_samples, c, k) for c in correct_counts) / len(correct_counts)
