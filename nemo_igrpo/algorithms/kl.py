"""Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3).

With x = log pi(t) - log pi_ref(t) for a token t sampled from (approximately) pi:
    k1 = x                       unbiased, high variance, can be negative
    k2 = x^2 / 2                 biased, low variance, >= 0
    k3 = exp(-x) + x - 1         unbiased, low variance, >= 0 (the paper's choice)

Both the log-ratio and the estimate are clamped, as NeMo-RL and verl do: a token whose
probability collapsed under one of the two models would otherwise produce exp(20+) and a
non-finite loss. The clamp bounds are module constants so a test can name them.
"""

from __future__ import annotations

from typing import Callable

import torch

from nemo_igrpo.utils.registry import Registry

LOG_RATIO_CLAMP = 20.0  # |log pi - log pi_ref| is clamped to this before the estimator
KL_VALUE_CLAMP = 10.0  # the per-token estimate is clamped to [-10, 10]

KLFn = Callable[[torch.Tensor], torch.Tensor]
KL_ESTIMATORS = Registry("KL estimator", "algorithm.kl_estimator", arity=1, signature="fn(log_ratio: Tensor) -> Tensor")
register_kl = KL_ESTIMATORS.register


@register_kl("k1")
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


@register_kl("k2")
def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


@register_kl("k3")
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, written in terms of x = -(ref - pi).
    return torch.exp(-log_ratio) + log_ratio - 1.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the current policy against the reference, clamped."""
    fn = KL_ESTIMATORS.lookup(estimator)
    log_ratio = (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return fn(log_ratio).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
