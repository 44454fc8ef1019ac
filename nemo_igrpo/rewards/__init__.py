"""Reward terms (math accuracy, format, judge, code tests, user functions) and the RewardManager.

Names are resolved lazily so that `import nemo_igrpo.rewards` stays cheap (the manager and the
math term pull in sympy and math-verify). See docs/rewards.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RewardManager": "nemo_igrpo.rewards.manager",
    "RewardConfigError": "nemo_igrpo.rewards.manager",
    "RewardSample": "nemo_igrpo.rewards.base",
    "RewardOutput": "nemo_igrpo.rewards.base",
    "register_reward": "nemo_igrpo.rewards.registry",
    "resolve_reward": "nemo_igrpo.rewards.registry",
    "REWARD_FUNCTIONS": "nemo_igrpo.rewards.registry",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nemo_igrpo.rewards' has no attribute {name!r}")
