"""Best-draft selection: d_hat = argmax_i R(d_i), with the two rules the paper leaves open.

- Ties (several drafts share the maximum reward): `tie_break="random"` picks one uniformly with
  a generator seeded from (run seed, step, round, prompt position), so a rerun picks the same
  draft; `"first"` picks the lowest index (what a plain argmax does). Random is the default:
  "first" would systematically favour whatever the backend returns first.
- All-zero (no draft scored above zero): `all_zero_drafts="append"` still appends the argmax
  draft, as the paper's argmax implies; `"skip"` refines from the bare prompt instead, so a
  wrong draft cannot mislead the refinement. "All-zero" means max reward <= 0: with the
  paper's accuracy + format reward a well-formatted wrong draft scores 1 and is not all-zero.

Selection never touches gradients: it only decides which text is placed into the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, get_args

import numpy as np

from nemo_igrpo.algorithms.config import AllZeroDrafts, TieBreak

TIE_BREAK_RULES: tuple[str, ...] = get_args(TieBreak)
ALL_ZERO_POLICIES: tuple[str, ...] = get_args(AllZeroDrafts)


@dataclass
class DraftSelection:
    index: Optional[int]  # chosen draft; None when the all-zero policy skipped the draft
    best_index: int  # argmax under the tie rule (also set when skipped, for logging)
    best_reward: float
    num_maxima: int  # how many drafts share the maximum (1: no tie)
    all_zero: bool  # max reward <= 0

    @property
    def skipped(self) -> bool:
        return self.index is None


def selection_rng(seed: int, step: int, round_index: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The generator for one prompt's tie-break; depends only on where the prompt is in the run."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(round_index), int(attempt), int(position)])


def select_best_draft(
    rewards: Sequence[float],
    tie_break: str = "random",
    all_zero_drafts: str = "append",
    rng: Optional[np.random.Generator] = None,
) -> DraftSelection:
    if tie_break not in TIE_BREAK_RULES:
        raise ValueError(f"algorithm.tie_break: {tie_break!r} is not one of {list(TIE_BREAK_RULES)}")
    if all_zero_drafts not in ALL_ZERO_POLICIES:
        raise ValueError(f"algorithm.all_zero_drafts: {all_zero_drafts!r} is not one of {list(ALL_ZERO_POLICIES)}")
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"select_best_draft needs a non-empty 1-D list of rewards, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"draft rewards contain NaN/Inf: {r.tolist()}")
    best = r.max()
    maxima = np.flatnonzero(r == best)  # exact equality: rewards are compared as given
    if tie_break == "first" or maxima.size == 1:
        chosen = int(maxima[0])
    else:
        if rng is None:
            raise ValueError("tie_break='random' needs a seeded generator (see selection_rng)")
        chosen = int(maxima[rng.integers(maxima.size)])
    all_zero = bool(best <= 0.0)
    index: Optional[int] = None if (all_zero and all_zero_drafts == "skip") else chosen
    return DraftSelection(
        index=index, best_index=chosen, best_reward=float(best), num_maxima=int(maxima.size), all_zero=all_zero
    )
