"""Configuration of the iGRPO algorithm: rollout budget, selection, template, loss, advantages.

Every choice the paper leaves open is a setting here, with the paper's value (or the common
default, when the paper is silent) as its default. See docs/algorithm.md for the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# Enumerated settings (the loader rejects other values, naming the key; see generation/config.py).
TieBreak = Literal["random", "first"]
AllZeroDrafts = Literal["append", "skip"]
TruncationSide = Literal["left", "right"]

# The paper's only published template (arXiv 2602.09000, appendix), verbatim.
PAPER_SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. "
    "First think through your reasoning as an internal monologue, then give the answer: "
    "<think>...</think><answer>...</answer>. If the prompt contains feedback or a prior draft, "
    "treat it as guidance, not as ground truth. Use it to produce a strictly improved final "
    "answer: fix mistakes, fill gaps, strengthen justification, and improve clarity. Do not "
    "repeat the draft verbatim. If the feedback is wrong or incomplete, correct it and proceed."
)

# Not stated by the paper: how the draft is placed in the user turn. Ours: the problem first,
# then the draft in explicit tags, so a tokenizer's chat template sees one user message.
DEFAULT_DRAFT_WRAPPER = "{prompt}\n\nPrior draft:\n<draft>\n{draft}\n</draft>"


@dataclass
class DraftTemplateConfig:
    system_prompt: Optional[str] = PAPER_SYSTEM_PROMPT
    draft_wrapper: str = DEFAULT_DRAFT_WRAPPER
    # Remove <think>...</think> from the draft before appending it (paper: not stated).
    strip_reasoning: bool = False
    # Truncate the draft to this many tokens (at a token boundary, never mid-token) so that
    # prompt + draft + refinement fits the context; None: generation.max_new_tokens.
    max_draft_tokens: Optional[int] = None
    # Which end of an over-long draft is cut (whole tokens only): "left" keeps the draft's end,
    # where its final answer is; "right" keeps its beginning. Paper: not stated.
    truncation_side: TruncationSide = "left"


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop refinement groups whose rewards have zero variance."""

    enabled: bool = False
    max_generation_batches: int = 3  # refill from at most this many extra batches


@dataclass
class OverlongShapingConfig:
    """DAPO soft overlong punishment on responses near the length limit."""

    enabled: bool = False
    buffer_tokens: int = 4096
    penalty: float = 1.0


@dataclass
class AlgorithmConfig:
    # Matched budget: num_drafts + num_refinements = the GRPO group size (paper: 4 + 4 vs 8).
    # num_drafts = 0 is plain GRPO through the same code path.
    num_drafts: int = 4
    num_refinements: int = 4
    # Best-draft selection. Paper: argmax, ties and all-zero rewards not stated.
    tie_break: TieBreak = "random"  # random (seeded) | first
    all_zero_drafts: AllZeroDrafts = "append"  # append (paper behaviour) | skip (refine from the bare prompt)
    template: DraftTemplateConfig = field(default_factory=DraftTemplateConfig)
    # Advantage estimator (registered name): grpo | dr_grpo | rloo
    advantage: str = "grpo"
    advantage_eps: float = 1.0e-6  # A = (r - mean) / (std + eps); A = 0 where std = 0
    # Policy loss (registered name): clipped | gspo
    policy_loss: str = "clipped"
    # token-mean | seq-mean-token-mean (paper) | seq-mean-token-sum | seq-mean-token-sum-norm
    loss_aggregation: str = "seq-mean-token-mean"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # DAPO clip-higher: 0.28
    dual_clip_c: Optional[float] = None  # e.g. 3.0
    # KL to the reference policy. beta = 0 (paper's main runs): no reference model is built.
    kl_beta: float = 0.0
    kl_estimator: str = "k3"  # k1 | k2 | k3
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong_shaping: OverlongShapingConfig = field(default_factory=OverlongShapingConfig)
    # Beyond the paper (default off): extra refinement rounds, the best refinement becoming the
    # next draft; and moving budget from drafts to refinements when drafts are unanimous.
    refinement_rounds: int = 1
    adaptive_draft_budget: bool = False
    # Drafts generated first when adaptive_draft_budget is on; None: ceil(num_drafts / 2), at
    # least 2. If they all score the same, the remaining drafts move to the refinement stage.
    adaptive_probe_drafts: Optional[int] = None
    # Optimizer steps per rollout batch (the rollout is split into this many mini-batches).
    minibatches_per_step: int = 1
    # The old log-probs (the ratio's denominator) come from the trainer, never the generator.
    # With one optimizer step per batch the update's own forward pass runs on exactly those
    # weights, so by default they are taken from it (detached) and a whole forward pass over
    # the batch is saved; the train/inference mismatch is measured in the same pass. True: a
    # separate no-grad pass first (always the case when minibatches_per_step > 1, where later
    # mini-batches see updated weights).
    recompute_old_logprobs: bool = False
    # Submit a prompt's refinements as soon as its drafts are scored, into the running engine,
    # instead of waiting for every prompt's drafts (the same samples either way: requests carry
    # their seeds). None: on when the backend can overlap requests (vLLM colocated, the servers);
    # false: the two-barrier rollout; true on a backend that cannot overlap only warns.
    pipeline_refinements: Optional[bool] = None
    # Truncated importance sampling against the generator (Yao et al. 2025, "Your efficient RL
    # framework secretly brings you off-policy RL training"): each token's loss is weighted by
    # min(pi_old / pi_gen, tis_cap), detached, which corrects for a generator whose numbers
    # differ from the trainer's (FP8 generation, other kernels). None: off. verl uses 2.0.
    tis_cap: Optional[float] = None
