"""Imported by the RewardManager's forkserver before it forks any worker.

Importing and exercising math-verify here (once) means every forked worker, including the
replacement for a killed one, starts with sympy imported and math-verify's parser built.
"""

from nemo_igrpo.rewards import code, format, judge  # noqa: F401 - imported for the preload
from nemo_igrpo.rewards.math import _warm_up

_warm_up()
