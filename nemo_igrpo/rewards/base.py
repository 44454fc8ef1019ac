"""The reward contract.

A reward function scores one sample:

    def score(prompt: str, response: str, reference: Any, **kwargs) -> float

`prompt` is the original problem (never the draft-augmented prompt), `response` the model's
completion text, `reference` the dataset's answer field, `kwargs` the term's `kwargs` from
the config. It may raise or hang: the `RewardManager` runs it in worker processes with a
timeout and substitutes `reward.fallback_score` (counting the event) so one bad sample never
stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RewardSample:
    prompt: str
    response: str
    reference: Any
    metadata: dict = field(default_factory=dict)


@dataclass
class RewardOutput:
    scores: np.ndarray  # [num_samples] weighted sum of the terms
    correct: np.ndarray  # [num_samples] bool: the correctness term scored > 0.5
    per_term: dict[str, np.ndarray]  # [num_samples] raw score of each term
    metrics: dict[str, float]  # e.g. reward/errors, reward/timeouts
