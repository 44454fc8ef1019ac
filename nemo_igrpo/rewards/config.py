"""Configuration of the reward: a weighted sum of registered reward functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class RewardTermConfig:
    # A registered name (math_accuracy, format, judge, code_tests) or an import path
    # "my_pkg.rewards:score" for a user function.
    name: str = "math_accuracy"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    # The range a valid score of this term lies in; anything outside (or NaN) is replaced by
    # reward.fallback_score and counted, since it would silently skew advantages.
    min_score: float = 0.0
    max_score: float = 1.0


@dataclass
class JudgeConfig:
    url: str = "http://127.0.0.1:8001"
    model: Optional[str] = None
    api_key_env: Optional[str] = None
    rubric: Optional[str] = None  # None: the built-in rubric
    timeout_s: float = 60.0
    max_retries: int = 3
    max_concurrent_requests: int = 16
    max_tokens: int = 16
    temperature: float = 0.0
    # Sleep before retry k (k = 0, 1, ...) is retry_backoff_s * 2**k.
    retry_backoff_s: float = 0.5
    # Scores kept per (prompt, response), so re-scored samples cost no request.
    cache_size: int = 100_000


@dataclass
class RewardConfig:
    # Paper: accuracy + format, weight 1.0 each.
    terms: list[RewardTermConfig] = field(
        default_factory=lambda: [RewardTermConfig("math_accuracy", 1.0), RewardTermConfig("format", 1.0)]
    )
    num_workers: int = 2
    timeout_s: float = 10.0  # per sample, per term
    fallback_score: float = 0.0  # given to a sample whose reward raised, hung or was NaN
    # Which term decides "correct" for metrics (fraction of correct best drafts, accuracy).
    correctness_term: str = "math_accuracy"
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # How reward worker processes start. Not "fork": the trainer holds torch/gloo threads, and a
    # forked child can inherit a held lock. "forkserver" forks replacements (after a killed,
    # hung sample) from a clean pre-imported server in milliseconds; "spawn" is the portable one.
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    # A term that fails (raises, times out, NaN, out of range) on every sample of this many
    # consecutive training steps stops the run with its last error: every score it gave was
    # reward.fallback_score, so training on it only wastes the allocation. 0: never stop (the
    # per-step reward/<term>/errors metric and a warning per such step still show it).
    max_failing_steps: int = 10
