"""The iGRPO rollout: drafts, best-draft selection, refinements, rewards and advantages.

One call of `IGRPORollout.run(problems, step)` produces the training batch of one step:

    Stage 1   N drafts per problem from the plain prompt q            (skipped when N = 0)
    select    d_hat = argmax_i R(d_i)  (tie rule, all-zero policy: selection.py)
    condition q' = Concat(q, d_hat) through the chat template         (templates.py)
    Stage 2   G refinements per problem from q'; rewards; advantages over the G
    [rounds]  with refinement_rounds > 1, the best refinement becomes the next draft
    [DAPO]    overlong shaping of refinement rewards; dynamic sampling drops zero-variance
              groups and refills from further problems, up to a bound

Plain GRPO is N = 0: the "refinement" stage then samples G completions of the bare prompt, the
same code path. Only refinements are returned as training samples: each sample's tokens are
q' followed by the refinement, and `response_start` marks where the refinement begins, so the
draft tokens inside q' are never scored (they get no gradient; the actor only trains response
tokens). Drafts receive no gradient at all, as in the paper.

Reproducibility: every generate call gets a base seed derived from (run seed, step, dynamic-
sampling attempt, stage, group size); the tie-break generator of a prompt depends on (run seed,
step, round, attempt, position in the step). A rerun with the same seed, weights and problems
draws the same samples on a deterministic backend.

Pipelining (`algorithm.pipeline_refinements`, default on when the backend's `open_stream()`
overlaps requests): instead of two barriers (all drafts, then all refinements), each prompt
moves on by itself: its drafts go into the backend's stream, are scored as soon as they are
back (on the reward manager's thread, while the engine keeps decoding), and its refinement
request is submitted into the same running engine right away; extra refinement rounds and the
adaptive budget's remaining drafts chain the same way. A step's generation time then tends to
max over prompts of (draft + refinement) instead of max(drafts) + max(refinements). Every
request carries the seed the two-barrier rollout gives it (the seeds never depended on which
other prompts share a batch), selection generators are per prompt, and advantages are computed
per round over the same groups in the same order, so on a backend whose per-request samples do
not depend on batching both modes return identical batches (tests: unit/test_rollout.py and
e2e/test_pipelined_rollout.py). Dynamic sampling keeps its loop: each extra batch is one
pipelined rollout.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nemo_igrpo.algorithms.advantages import compute_group_advantages, get_advantage_estimator
from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.selection import DraftSelection, select_best_draft, selection_rng
from nemo_igrpo.algorithms.templates import PromptBuilder, PromptDoesNotFit
from nemo_igrpo.algorithms.validation import check_algorithm_config, probe_drafts
from nemo_igrpo.data.datasets import Problem
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, SamplingParams
from nemo_igrpo.batch import TrainSample
from nemo_igrpo.rewards.base import RewardOutput, RewardSample

logger = logging.getLogger(__name__)

# Stage codes mixed into request seeds (never reuse a code for another stage).
_STAGE_DRAFT = 1
_STAGE_DRAFT_REST = 2
_STAGE_REFINE = 100  # + round index

_RECORD_TEXT_CHARS = 2000
_SUMMED_REWARD_METRICS = {
    "reward/errors",
    "reward/timeouts",
    "reward/nonfinite",
    "reward/out_of_range",
    "reward/seconds",
    "reward/judge_requests",
    "reward/judge_cache_hits",
}  # example texts in `records` are cut to this many characters


def overlong_penalty(length: int, max_new_tokens: int, buffer_tokens: int, penalty: float) -> float:
    """DAPO soft overlong punishment (<= 0), added to the reward of a response of `length` tokens:

    0                                       if length <= L_max - B
    (L_max - B - length) / B * penalty      if L_max - B < length <= L_max
    -penalty                                if length > L_max
    """
    expected = max_new_tokens - buffer_tokens
    if length <= expected:
        return 0.0
    if length > max_new_tokens:
        return -float(penalty)
    return (expected - length) / buffer_tokens * float(penalty)


def request_seed(seed: int, step: int, attempt: int, stage: int, extra: int = 0) -> int:
    """A 31-bit base seed for one generate call (the backend uses seed + i for sample i)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(attempt), int(stage), int(extra)])
    # Leave headroom below 2**31 for the "+ i" a backend adds per sample.
    return int(state.generate_state(1)[0] % (2**31 - 2**20))


def default_context_length(gen_cfg: GenerationConfig, tokenizer) -> Optional[int]:
    if gen_cfg.vllm.max_model_len:
        return int(gen_cfg.vllm.max_model_len)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return None


@dataclass
class RolloutBatch:
    samples: list[TrainSample]  # refinements only, grouped: group k is the next group_sizes[k]
    metrics: dict[str, float]
    records: list[dict]  # a few per-prompt examples (texts, rewards, choice) for logging
    group_sizes: list[int] = field(default_factory=list)


@dataclass
class _Group:
    """The G refinements of one prompt in one round."""

    round_index: int
    prompt_ids: list[int]
    conditioned: bool  # a draft (or previous refinement) was appended to the prompt
    condition_reward: Optional[float]
    draft_truncated: bool
    # What the refinement was conditioned on, kept for the mechanism diagnostics only
    # (refinement accuracy split by the draft's correctness, verbatim copies of the draft).
    condition_correct: Optional[bool] = None
    condition_text: Optional[str] = None
    results: list[GenerationResult] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # task reward, before shaping
    correct: list[bool] = field(default_factory=list)
    shaped: list[float] = field(default_factory=list)  # what the advantages use
    advantages: list[float] = field(default_factory=list)

    @property
    def zero_variance(self) -> bool:
        return len(set(self.shaped)) <= 1


@dataclass
class _PromptState:
    problem: Problem
    position: int  # position among all problems of this step (all attempts)
    attempt: int
    plain_ids: list[int]
    num_refinements: int
    drafts: list[GenerationResult] = field(default_factory=list)
    draft_rewards: list[float] = field(default_factory=list)
    draft_correct: list[bool] = field(default_factory=list)
    unanimous_probe: bool = False
    selection: Optional[DraftSelection] = None
    groups: list[_Group] = field(default_factory=list)
    active: bool = True  # False once a prompt of a later round did not fit


_POLL_S = 0.005  # how long a stream wait may block while finished rewards could be waiting


@dataclass
class _Request:
    kind: str  # "draft" (all N, or the adaptive probe) | "draft_rest" | "refine"
    state: _PromptState
    prompt: list[int]
    n: int
    group: Optional[_Group] = None


class _Pipeline:
    """One pipelined rollout of a batch of prompts: a small event loop over the backend's
    stream (generation results) and the reward manager's futures (scores). Each prompt goes
    draft -> [rest of the drafts] -> select -> refine -> [next round] on its own, with exactly
    the seeds, selection generators and prompts of the two-barrier rollout.

    Timings (added to the rollout's): generation is the loop's wall time minus the time it sat
    blocked on rewards; the part until the last prompt finished its drafts counts as draft
    generation, the rest as refinement generation; blocked reward waits count as draft /
    refinement rewards (scoring that overlapped generation costs no wall time and shows only
    in reward/seconds)."""

    def __init__(self, rollout: "IGRPORollout", step: int, attempt: int):
        self.rollout = rollout
        self.cfg = rollout.cfg
        self.step = step
        self.attempt = attempt
        self.requests: dict[int, _Request] = {}
        self.scoring: deque[tuple[Future, str, list[tuple[_Request, list[GenerationResult]]]]] = deque()
        self.unscored: dict[str, list[tuple[_Request, list[GenerationResult]]]] = {"draft": [], "refine": []}
        self.keys = itertools.count()
        self.drafting = 0  # prompts whose draft phase has not ended
        self.blocked = {"draft": 0.0, "refine": 0.0}
        self.blocked_at_drafts_done = 0.0

    # -- the loop --

    def run(self, states: list[_PromptState]) -> None:
        t0 = time.perf_counter()
        self.t_drafts_done = t0
        self.stream = self.rollout.backend.open_stream()
        try:
            for state in states:
                if self.cfg.num_drafts > 0:
                    self.drafting += 1
                    first = probe_drafts(self.cfg) if self.cfg.adaptive_draft_budget else self.cfg.num_drafts
                    self._submit("draft", state, state.plain_ids, first, _STAGE_DRAFT)
                else:
                    self._start_round(state, 0)
            overlaps = self.stream.overlaps
            while self.requests or self.scoring:
                if self.scoring and (not self.requests or not overlaps):
                    # Nothing else can move (or a barrier stream must see every request that
                    # the pending scores will release before it generates): wait for rewards.
                    self._collect_rewards(block="all" if not overlaps else "first")
                    continue
                self._collect_rewards(block="none")
                if self.requests:
                    self._on_generated(self.stream.wait(timeout=_POLL_S if self.scoring else None))
        finally:
            self.stream.close()
        t_end = time.perf_counter()
        timing = self.rollout._timing
        timing["draft_generation"] += max(self.t_drafts_done - t0 - self.blocked_at_drafts_done, 0.0)
        timing["refine_generation"] += max(
            t_end - self.t_drafts_done - (sum(self.blocked.values()) - self.blocked_at_drafts_done), 0.0
        )
        timing["draft_reward"] += self.blocked["draft"]
        timing["refine_reward"] += self.blocked["refine"]

    def _submit(
        self, kind: str, state: _PromptState, prompt: list[int], n: int, stage: int, group: Optional[_Group] = None
    ) -> None:
        # The seed of the barrier rollout's call for this stage and group size: it never depended
        # on which prompts shared the call, so each prompt's request gets the same one here.
        params = self.rollout._sampling(n, request_seed(self.rollout.seed, self.step, self.attempt, stage, n))
        key = next(self.keys)
        self.stream.submit(key, prompt, params)
        self.requests[key] = _Request(kind, state, prompt, n, group)

    def _on_generated(self, finished: list) -> None:
        by_stage: dict[str, list[tuple[_Request, list[GenerationResult]]]] = {"draft": [], "refine": []}
        for key, results in finished:
            request = self.requests.pop(key)
            what = "refinement" if request.kind == "refine" else "draft"
            self.rollout._check_results(request.prompt, results, request.n, what, request.state.problem.index)
            by_stage["refine" if request.kind == "refine" else "draft"].append((request, list(results)))
        for stage, entries in by_stage.items():
            self.unscored[stage].extend(entries)
        self._flush_scoring()

    def _flush_scoring(self) -> None:
        """Send everything that finished generating since the last reward call, one call per
        stage, but only while no call is running: an overlapping engine returns a prompt or two
        per iteration, and a reward call per iteration would pay the manager's per-call cost
        (worker IPC, judge round trips) dozens of times a step. Batching what piles up during
        the previous call adapts the call size to the reward latency."""
        if self.scoring:
            return
        for stage in ("draft", "refine"):
            entries, self.unscored[stage] = self.unscored[stage], []
            if not entries:
                continue
            items = []
            for request, results in entries:
                meta = (
                    {"stage": "draft"}
                    if stage == "draft"
                    else {"stage": "refinement", "round": request.group.round_index}
                )
                items.extend((request.state.problem, r, meta) for r in results)
            self.scoring.append((self.rollout._score_async(items), stage, entries))

    def _collect_rewards(self, block: str) -> None:
        """Apply finished scores in submission order. block: "none" (only those done),
        "first" (wait for the oldest), "all" (wait for every pending one)."""
        while self.scoring:
            future, stage, entries = self.scoring[0]
            if not future.done():
                if block == "none":
                    return
                started = time.perf_counter()
                future.result()  # waits; errors are raised below, from the same call
                self.blocked[stage] += time.perf_counter() - started
                if block == "first":
                    block = "none"
            self.scoring.popleft()
            out = self.rollout._account_rewards(future.result(), sum(len(r) for _, r in entries), stage)
            scores, correct = out.scores.tolist(), out.correct.tolist()
            offset = 0
            for request, results in entries:
                size = len(results)
                self._on_scored(request, results, scores[offset : offset + size], correct[offset : offset + size])
                offset += size
            self._flush_scoring()

    # -- one prompt's progress --

    def _on_scored(
        self, request: _Request, results: list[GenerationResult], scores: list[float], correct: list[bool]
    ) -> None:
        state = request.state
        if request.kind == "refine":
            group = request.group
            group.results = results
            self.rollout._finish_group(group, scores, correct)
            state.groups.append(group)
            if group.round_index + 1 < self.cfg.refinement_rounds:
                self._start_round(state, group.round_index + 1)
            return
        for r, reward, ok in zip(results, scores, correct):
            state.drafts.append(r)
            state.draft_rewards.append(float(reward))
            state.draft_correct.append(bool(ok))
        cfg = self.cfg
        if request.kind == "draft" and cfg.adaptive_draft_budget:
            if len(set(state.draft_rewards)) <= 1:
                # Unanimous probe: the remaining draft budget moves to this prompt's refinements.
                state.unanimous_probe = True
                state.num_refinements = cfg.num_refinements + cfg.num_drafts - len(state.draft_rewards)
            else:
                self._submit(
                    "draft_rest", state, state.plain_ids, cfg.num_drafts - len(state.draft_rewards), _STAGE_DRAFT_REST
                )
                return
        rng = selection_rng(self.rollout.seed, self.step, 0, state.position, self.attempt)
        state.selection = select_best_draft(state.draft_rewards, cfg.tie_break, cfg.all_zero_drafts, rng)
        self.drafting -= 1
        if self.drafting == 0:
            self.t_drafts_done = time.perf_counter()
            self.blocked_at_drafts_done = sum(self.blocked.values())
        self._start_round(state, 0)

    def _start_round(self, state: _PromptState, round_index: int) -> None:
        group = self.rollout._build_group(state, round_index, self.step)
        if group is None:
            state.active = False  # its prompt no longer fits: no further rounds, as in the barrier rollout
            return
        self._submit("refine", state, group.prompt_ids, state.num_refinements, _STAGE_REFINE + round_index, group)


class IGRPORollout:
    """Runs the two-stage rollout for one step's problems (see module doc).

    problem_source(k) -> k more problems: used by dynamic sampling to refill dropped groups.
    apply_chat_template: data.apply_chat_template.
    max_context_tokens: the model's context length (prompt + response). None: take
        generation.vllm.max_model_len when set, else the tokenizer's model_max_length when it is
        a real limit (HF uses ~1e30 for "unknown"), else enforce only the token budgets.
    pipeline_refinements: overrides `algorithm.pipeline_refinements` (True / False; None: the
        config's value, whose None means "when the backend's stream overlaps requests").
    """

    def __init__(
        self,
        algo_cfg: AlgorithmConfig,
        gen_cfg: GenerationConfig,
        backend: GenerationBackend,
        reward_manager,
        tokenizer,
        seed: int,
        *,
        problem_source: Optional[Callable[[int], Sequence[Problem]]] = None,
        apply_chat_template: bool = True,
        max_context_tokens: Optional[int] = None,
        num_records: int = 2,
        pipeline_refinements: Optional[bool] = None,
    ):
        check_algorithm_config(algo_cfg, gen_cfg)
        get_advantage_estimator(algo_cfg.advantage)
        self.cfg = algo_cfg
        self.gen_cfg = gen_cfg
        self.backend = backend
        self.reward_manager = reward_manager
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.problem_source = problem_source
        self.num_records = num_records
        self.prompts = PromptBuilder(
            tokenizer,
            algo_cfg.template,
            max_prompt_tokens=gen_cfg.max_prompt_tokens,
            max_new_tokens=gen_cfg.max_new_tokens,
            max_context_tokens=max_context_tokens
            if max_context_tokens is not None
            else default_context_length(gen_cfg, tokenizer),
            apply_chat_template=apply_chat_template,
        )
        self._warned_no_source = False
        self.max_context_tokens = self.prompts.max_context_tokens
        # Problems left out because their prompt cannot fit (the same every time they are drawn):
        # each is logged once, with its file and line, and counted for the whole run.
        self._unfit_problems: set[str] = set()
        self.pipelined = self._resolve_pipelining(pipeline_refinements)

    def _resolve_pipelining(self, override: Optional[bool]) -> bool:
        # getattr: the key is optional in AlgorithmConfig objects built by older code and tests.
        value = override if override is not None else getattr(self.cfg, "pipeline_refinements", None)
        if value is not None and not isinstance(value, bool):
            raise ValueError(
                f"algorithm.pipeline_refinements: must be true, false or null (= true when the "
                f"generation backend can overlap requests), got {value!r}"
            )
        overlaps = bool(getattr(self.backend, "supports_streaming", False))
        if value is None:
            return overlaps
        if value and not overlaps:
            # Still correct (the default stream is generate() with barriers), just not faster.
            logger.warning(
                "algorithm.pipeline_refinements=true: the %s generation backend cannot overlap requests, so "
                "refinements still wait for every draft (same samples, no speed-up)",
                type(self.backend).__name__,
            )
        return value

    # --- public -----------------------------------------------------------------------------

    def run(self, problems: Sequence[Problem], step: int) -> RolloutBatch:
        cfg = self.cfg
        ds = cfg.dynamic_sampling
        target_groups = len(problems) * cfg.refinement_rounds
        self._timing = {"draft_generation": 0.0, "draft_reward": 0.0, "refine_generation": 0.0, "refine_reward": 0.0}
        self._reward_metrics: dict[str, float] = {}
        self._term_sums: dict[tuple[str, str], tuple[float, int]] = {}
        self._unfit = 0
        self._truncated_drafts = 0

        states: list[_PromptState] = []
        kept: list[_Group] = []
        dropped = 0
        attempt = 0
        consumed = 0  # problems fed so far this step: positions for the tie-break generators
        batch = list(problems)
        while True:
            rollout_prompts = self._rollout_prompts_pipelined if self.pipelined else self._rollout_prompts
            new_states = rollout_prompts(batch, step, attempt, position_offset=consumed)
            consumed += len(batch)
            states.extend(new_states)
            for state in new_states:
                for group in state.groups:
                    if ds.enabled and group.zero_variance:
                        dropped += 1
                    else:
                        kept.append(group)
            if not ds.enabled or len(kept) >= target_groups:
                break
            if attempt >= ds.max_generation_batches:
                logger.info(
                    "dynamic sampling: %d of %d groups kept after %d extra batch(es) (algorithm.dynamic_sampling."
                    "max_generation_batches); training on fewer groups",
                    len(kept),
                    target_groups,
                    attempt,
                )
                break
            if self.problem_source is None:
                if not self._warned_no_source:
                    logger.warning("dynamic sampling cannot refill dropped groups: the rollout has no problem_source")
                    self._warned_no_source = True
                break
            attempt += 1
            batch = list(self.problem_source(len(problems)))
        kept = kept[:target_groups] if ds.enabled else kept

        samples, group_sizes, zero_length = self._train_samples(kept)
        metrics = self._metrics(states, kept, dropped, attempt, zero_length)
        # Per-term failure counts of this step; raises RewardTermFailing for a term that has
        # failed on every sample for reward.max_failing_steps steps (a fake manager may lack it).
        end_step = getattr(self.reward_manager, "end_step", None)
        if end_step is not None:
            metrics.update(end_step())
        records = [self._record(s, step) for s in states[: self.num_records]]
        return RolloutBatch(samples=samples, metrics=metrics, records=records, group_sizes=group_sizes)

    # --- stages -------------------------------------------------------------------------------

    def _plain_states(self, problems: list[Problem], attempt: int, position_offset: int) -> list[_PromptState]:
        states: list[_PromptState] = []
        for i, problem in enumerate(problems):
            try:
                ids = self.prompts.plain(problem.prompt, problem_index=problem.index, where=problem.location)
            except PromptDoesNotFit as e:
                self._report_unfit(e)
                continue
            states.append(_PromptState(problem, position_offset + i, attempt, ids, self.cfg.num_refinements))
        return states

    def _rollout_prompts(
        self, problems: list[Problem], step: int, attempt: int, position_offset: int
    ) -> list[_PromptState]:
        """The two-barrier rollout: all drafts, then all refinements of each round."""
        cfg = self.cfg
        states = self._plain_states(problems, attempt, position_offset)
        if not states:
            return states

        if cfg.num_drafts > 0:
            self._draft_stage(states, step, attempt)

        for round_index in range(cfg.refinement_rounds):
            active = [s for s in states if s.active]
            groups: list[tuple[_PromptState, _Group]] = []
            for state in active:
                group = self._build_group(state, round_index, step)
                if group is None:
                    state.active = False
                    continue
                groups.append((state, group))
            self._refine_stage(groups, step, attempt, round_index)
            for state, group in groups:
                state.groups.append(group)
        return states

    def _rollout_prompts_pipelined(
        self, problems: list[Problem], step: int, attempt: int, position_offset: int
    ) -> list[_PromptState]:
        """The same rollout with no barrier between prompts (module doc, "Pipelining")."""
        states = self._plain_states(problems, attempt, position_offset)
        if not states:
            return states
        _Pipeline(self, step, attempt).run(states)
        # Advantages per round over that round's groups in prompt order: the very tensors the
        # barrier rollout's per-round call builds, so the numbers are identical to the bit.
        for round_index in range(self.cfg.refinement_rounds):
            groups = [s.groups[round_index] for s in states if len(s.groups) > round_index]
            if groups:
                advantages = compute_group_advantages(
                    self.cfg.advantage, [g.shaped for g in groups], self.cfg.advantage_eps
                )
                for group, adv in zip(groups, advantages):
                    group.advantages = adv
        return states

    def _finish_group(self, group: _Group, scores: list[float], correct: list[bool]) -> None:
        """Task rewards and (shaped) advantage inputs of one refinement group."""
        shaping = self.cfg.overlong_shaping
        for result, reward, ok in zip(group.results, scores, correct):
            group.rewards.append(float(reward))
            group.correct.append(bool(ok))
            shaped = float(reward)
            if shaping.enabled:
                shaped += overlong_penalty(
                    len(result.token_ids), self.gen_cfg.max_new_tokens, shaping.buffer_tokens, shaping.penalty
                )
            group.shaped.append(shaped)

    def _draft_stage(self, states: list[_PromptState], step: int, attempt: int) -> None:
        cfg = self.cfg
        if cfg.adaptive_draft_budget:
            probe = probe_drafts(cfg)
            self._generate_and_score_drafts(states, probe, step, attempt, _STAGE_DRAFT)
            # A unanimous probe means more drafts cannot change which reward is the best: spend
            # the remaining draft budget on refinements of this prompt instead.
            undecided = []
            for s in states:
                if len(set(s.draft_rewards)) <= 1:
                    s.unanimous_probe = True
                    s.num_refinements = cfg.num_refinements + cfg.num_drafts - probe
                else:
                    undecided.append(s)
            if undecided:
                self._generate_and_score_drafts(undecided, cfg.num_drafts - probe, step, attempt, _STAGE_DRAFT_REST)
        else:
            self._generate_and_score_drafts(states, cfg.num_drafts, step, attempt, _STAGE_DRAFT)
        for s in states:
            rng = selection_rng(self.seed, step, 0, s.position, attempt)
            s.selection = select_best_draft(s.draft_rewards, cfg.tie_break, cfg.all_zero_drafts, rng)

    def _generate_and_score_drafts(
        self, states: list[_PromptState], n: int, step: int, attempt: int, stage: int
    ) -> None:
        t0 = time.perf_counter()
        params = self._sampling(n, request_seed(self.seed, step, attempt, stage, n))
        outputs = self._generate([s.plain_ids for s in states], params, "draft")
        t1 = time.perf_counter()
        flat = [(s, r) for s, results in zip(states, outputs) for r in results]
        scored = self._score([(s.problem, r, {"stage": "draft"}) for s, r in flat], "draft")
        self._timing["draft_generation"] += t1 - t0
        self._timing["draft_reward"] += time.perf_counter() - t1
        for (s, r), reward, correct in zip(flat, scored.scores.tolist(), scored.correct.tolist()):
            s.drafts.append(r)
            s.draft_rewards.append(float(reward))
            s.draft_correct.append(bool(correct))

    def _build_group(self, state: _PromptState, round_index: int, step: int) -> Optional[_Group]:
        """The prompt of one refinement group: q' with the selected draft, or the bare q."""
        cfg = self.cfg
        if round_index == 0:
            if cfg.num_drafts == 0 or state.selection is None or state.selection.skipped:
                return _Group(0, state.plain_ids, False, None, False)
            source_text = self._response_text(state.drafts[state.selection.index])
            condition_reward = state.draft_rewards[state.selection.index]
            condition_correct = state.draft_correct[state.selection.index]
        else:
            prev = state.groups[-1]
            rng = selection_rng(self.seed, step, round_index, state.position, state.attempt)
            sel = select_best_draft(prev.rewards, cfg.tie_break, cfg.all_zero_drafts, rng)
            if sel.skipped:
                return _Group(round_index, state.plain_ids, False, None, False)
            source_text = self._response_text(prev.results[sel.index])
            condition_reward = prev.rewards[sel.index]
            condition_correct = prev.correct[sel.index]
        try:
            built = self.prompts.with_draft(
                state.problem.prompt, source_text, problem_index=state.problem.index, where=state.problem.location
            )
        except PromptDoesNotFit as e:
            self._report_unfit(e)
            return None
        if built.truncated:
            self._truncated_drafts += 1
        return _Group(
            round_index,
            built.token_ids,
            True,
            condition_reward,
            built.truncated,
            condition_correct=bool(condition_correct),
            condition_text=source_text,
        )

    def _refine_stage(
        self, groups: list[tuple[_PromptState, _Group]], step: int, attempt: int, round_index: int
    ) -> None:
        if not groups:
            return
        t0 = time.perf_counter()
        # One generate call per group size (the adaptive budget gives some prompts more samples).
        by_size: dict[int, list[tuple[_PromptState, _Group]]] = {}
        for state, group in groups:
            by_size.setdefault(state.num_refinements, []).append((state, group))
        for n, members in sorted(by_size.items()):
            params = self._sampling(n, request_seed(self.seed, step, attempt, _STAGE_REFINE + round_index, n))
            outputs = self._generate([g.prompt_ids for _, g in members], params, "refinement")
            for (_, group), results in zip(members, outputs):
                group.results = list(results)
        t1 = time.perf_counter()
        flat = [(s, g, r) for s, g in groups for r in g.results]
        scored = self._score(
            [(s.problem, r, {"stage": "refinement", "round": round_index}) for s, _, r in flat], "refine"
        )
        self._timing["refine_generation"] += t1 - t0
        self._timing["refine_reward"] += time.perf_counter() - t1
        scores, correct = scored.scores.tolist(), scored.correct.tolist()
        offset = 0
        for _, group in groups:
            size = len(group.results)
            self._finish_group(group, scores[offset : offset + size], correct[offset : offset + size])
            offset += size
        advantages = compute_group_advantages(self.cfg.advantage, [g.shaped for _, g in groups], self.cfg.advantage_eps)
        for (_, group), adv in zip(groups, advantages):
            group.advantages = adv

    # --- helpers --------------------------------------------------------------------------------

    def _sampling(self, n: int, seed: int) -> SamplingParams:
        g = self.gen_cfg
        stop_ids = [self.tokenizer.eos_token_id] if getattr(self.tokenizer, "eos_token_id", None) is not None else []
        return SamplingParams(
            temperature=g.temperature,
            top_p=g.top_p,
            max_new_tokens=g.max_new_tokens,
            n=n,
            stop_token_ids=stop_ids,
            stop_strings=list(g.stop_strings),
            seed=seed,
        )

    def _generate(self, prompts: list[list[int]], params: SamplingParams, what: str) -> list[list[GenerationResult]]:
        outputs = self.backend.generate(prompts, params)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"{what} generation returned {len(outputs)} result lists for {len(prompts)} prompts")
        for i, (prompt, results) in enumerate(zip(prompts, outputs)):
            self._check_results(prompt, results, params.n, what, i)
        return outputs

    @staticmethod
    def _check_results(prompt: list[int], results: list[GenerationResult], n: int, what: str, i) -> None:
        if len(results) != n:
            raise RuntimeError(f"{what} generation: prompt {i} got {len(results)} samples, asked for {n}")
        for r in results:
            # The training sample is built from our ids; a backend that changed them (e.g. by
            # re-tokenising text) would make old log-probs refer to another sequence.
            if list(r.prompt_token_ids) != prompt:
                raise RuntimeError(f"{what} generation: the backend reports different prompt token ids for prompt {i}")

    @staticmethod
    def _reward_samples(items: list[tuple[Problem, GenerationResult, dict]]) -> list[RewardSample]:
        return [
            RewardSample(
                prompt=p.prompt, response=r.text, reference=p.answer, metadata={"problem_index": p.index, **meta}
            )
            for p, r, meta in items
        ]

    def _score(self, items: list[tuple[Problem, GenerationResult, dict]], stage: str) -> RewardOutput:
        samples = self._reward_samples(items)
        return self._account_rewards(self.reward_manager.score(samples), len(samples), stage)

    def _score_async(self, items: list[tuple[Problem, GenerationResult, dict]]) -> "Future[RewardOutput]":
        """Scoring on the reward manager's own thread (its calls run one after another, in
        order), so the caller keeps driving generation; a manager without score_async (test
        fakes) scores here and returns a finished Future."""
        samples = self._reward_samples(items)
        score_async = getattr(self.reward_manager, "score_async", None)
        if score_async is not None:
            return score_async(samples)
        future: Future = Future()
        try:
            future.set_result(self.reward_manager.score(samples))
        except Exception as err:  # re-raised by future.result(), where the caller handles it
            future.set_exception(err)
        return future

    def _account_rewards(self, out: RewardOutput, num_samples: int, stage: str) -> RewardOutput:
        if len(out.scores) != num_samples or len(out.correct) != num_samples:
            raise RuntimeError(f"reward manager returned {len(out.scores)} scores for {num_samples} samples")
        for key, value in out.metrics.items():
            # Counters (errors, timeouts, seconds) add up over the step's reward calls; running
            # totals keep their latest value. Per-call means are recomputed per stage below.
            if key in _SUMMED_REWARD_METRICS:
                self._reward_metrics[key] = self._reward_metrics.get(key, 0.0) + float(value)
            elif key.endswith("_total"):
                self._reward_metrics[key] = float(value)
        for term, values in out.per_term.items():
            total, count = self._term_sums.get((stage, term), (0.0, 0))
            self._term_sums[(stage, term)] = (total + float(np.sum(values)), count + len(values))
        return out

    def _response_text(self, result: GenerationResult) -> str:
        """The text placed into the next prompt: exactly the sampled tokens, special tokens
        (the end-of-turn token) removed, independent of how a backend renders `text`."""
        return self.tokenizer.decode(result.token_ids, skip_special_tokens=True)

    def _report_unfit(self, error: PromptDoesNotFit) -> None:
        self._unfit += 1
        key = f"{error.where}|{error.key}"
        if key in self._unfit_problems:
            logger.debug("sample left out of this step: %s", error)
            return
        self._unfit_problems.add(key)
        logger.warning(
            "problem left out of this step, its prompt does not fit (logged once per problem; every "
            "occurrence is counted in samples/unfit, distinct problems in samples/unfit_problems_total): %s",
            error,
        )

    def _train_samples(self, groups: list[_Group]) -> tuple[list[TrainSample], list[int], int]:
        samples: list[TrainSample] = []
        sizes: list[int] = []
        zero_length = 0
        for group in groups:
            size = 0
            for result, adv in zip(group.results, group.advantages):
                if not result.token_ids:
                    zero_length += 1  # nothing to train on (a backend returned no token at all)
                    continue
                samples.append(
                    TrainSample(
                        token_ids=list(group.prompt_ids) + list(result.token_ids),
                        response_start=len(group.prompt_ids),
                        advantage=float(adv),
                        generation_logprobs=torch.tensor(result.logprobs, dtype=torch.float32),
                    )
                )
                size += 1
            if size:
                sizes.append(size)
        return samples, sizes, zero_length

    # --- metrics and records ----------------------------------------------------------------------

    def _metrics(
        self, states: list[_PromptState], kept: list[_Group], dropped: int, attempts: int, zero_length: int
    ) -> dict[str, float]:
        cfg = self.cfg
        m: dict[str, float] = {}
        groups = [g for s in states for g in s.groups]
        refine_rewards = [r for g in groups for r in g.rewards]
        if cfg.num_drafts > 0 and states:
            draft_rewards = [r for s in states for r in s.draft_rewards]
            draft_correct = [c for s in states for c in s.draft_correct]
            sels = [s.selection for s in states]
            m["reward/draft_mean"] = float(np.mean(draft_rewards))
            m["reward/best_draft_mean"] = float(np.mean([sel.best_reward for sel in sels]))
            m["accuracy/draft"] = float(np.mean(draft_correct))
            m["draft/best_correct_frac"] = float(np.mean([s.draft_correct[s.selection.best_index] for s in states]))
            m["draft/tie_frac"] = float(np.mean([sel.num_maxima > 1 for sel in sels]))
            m["draft/all_zero_frac"] = float(np.mean([sel.all_zero for sel in sels]))
            m["draft/skipped_frac"] = float(np.mean([sel.skipped for sel in sels]))
            m["draft/truncated"] = float(self._truncated_drafts)
            m["response_length/draft_mean"] = float(np.mean([len(r.token_ids) for s in states for r in s.drafts]))
            if cfg.adaptive_draft_budget:
                m["draft/unanimous_frac"] = float(np.mean([s.unanimous_probe for s in states]))
                m["draft/moved_samples"] = float(sum(s.num_refinements - cfg.num_refinements for s in states))
            gains = [np.mean(g.rewards) - g.condition_reward for g in groups if g.conditioned and g.rewards]
            if gains:
                m["reward/refine_minus_draft"] = float(np.mean(gains))
        if refine_rewards:
            m["reward/refine_mean"] = float(np.mean(refine_rewards))
            m["accuracy/refine"] = float(np.mean([c for g in groups for c in g.correct]))
            lengths = [len(r.token_ids) for g in groups for r in g.results]
            m["response_length/refine_mean"] = float(np.mean(lengths))
            m["response_length/refine_max"] = float(np.max(lengths))
            m["response_length/refine_clip_frac"] = float(
                np.mean([r.finish_reason == "length" for g in groups for r in g.results])
            )
            if cfg.overlong_shaping.enabled:
                m["reward/refine_shaped_mean"] = float(np.mean([x for g in groups for x in g.shaped]))
            if cfg.refinement_rounds > 1:
                for k in range(cfg.refinement_rounds):
                    rk = [r for g in groups if g.round_index == k for r in g.rewards]
                    if rk:
                        m[f"reward/refine_round{k + 1}_mean"] = float(np.mean(rk))
        m["groups/total"] = float(len(groups))
        m["groups/zero_variance_frac"] = float(np.mean([g.zero_variance for g in groups])) if groups else 0.0
        m["groups/dropped"] = float(dropped)
        m["groups/kept"] = float(len(kept))
        m["groups/generation_batches"] = float(attempts + 1)
        m["samples/unfit"] = float(self._unfit)
        m["samples/unfit_problems_total"] = float(len(self._unfit_problems))
        m["samples/zero_length"] = float(zero_length)
        kept_adv = [a for g in kept for a in g.advantages]
        m["samples/trained"] = float(sum(len(g.results) for g in kept) - zero_length)
        if kept_adv:
            m["advantage/mean"] = float(np.mean(kept_adv))
            m["advantage/abs_mean"] = float(np.mean(np.abs(kept_adv)))
        m.update(self._diagnostics(states, groups))
        for key, seconds in self._timing.items():
            m[f"timing/{key}_s"] = seconds
        # Wall time the rollout spent generating (both stages, reward waits excluded): the figure
        # that pipelining shortens; comparable between the two modes.
        m["timing/generation_s"] = self._timing["draft_generation"] + self._timing["refine_generation"]
        m["rollout/pipelined"] = float(self.pipelined)
        m.update(self._reward_metrics)
        for (stage, term), (total, count) in self._term_sums.items():
            if count:
                m[f"reward/{term}/{stage}_mean"] = total / count
        return m

    def _diagnostics(self, states: list[_PromptState], groups: list[_Group]) -> dict[str, float]:
        """Mechanism diagnostics (`diag/*`): does the refinement stage add learning signal or
        remove it? Computed from the per-prompt states, which the barrier and the pipelined
        rollout fill identically, so both modes log the same keys and values.

        diag/stage1_zero_variance_frac   prompts whose drafts all got the same reward (iGRPO)
        diag/stage2_zero_variance_frac   refinement groups (GRPO: its groups) with zero reward
                                         variance: no gradient from them
        diag/best_draft_correct          fraction of prompts whose best draft is correct
        diag/best_draft_prop31           Proposition 3.1's prediction of that, 1 - (1 - p)^N,
                                         averaged over prompts, p = that prompt's own draft accuracy
        diag/chosen_draft_correct_frac   conditioned groups whose appended draft was correct
        diag/refine_acc_draft_correct    refinement accuracy when the appended draft was correct
        diag/refine_acc_draft_wrong      ... when it was wrong (does refinement fix wrong drafts?)
        diag/refine_copy_frac            refinements that repeat their draft verbatim
        diag/refine_copy_frac_draft_wrong  ... among those conditioned on a wrong draft
        """
        d: dict[str, float] = {}
        if groups:
            # Per group's own rewards (unshaped): a stage-level statement about the task reward.
            d["diag/stage2_zero_variance_frac"] = float(np.mean([len(set(g.rewards)) <= 1 for g in groups]))
        drafted = [s for s in states if s.drafts]
        if drafted:
            d["diag/stage1_zero_variance_frac"] = float(np.mean([len(set(s.draft_rewards)) <= 1 for s in drafted]))
            d["diag/best_draft_correct"] = float(np.mean([s.draft_correct[s.selection.best_index] for s in drafted]))
            # Proposition 3.1 assumes independent drafts with one success rate p per prompt; using
            # each prompt's own empirical p (with its own N: the adaptive budget varies it) makes
            # the prediction comparable prompt by prompt with what selection achieved.
            predicted = []
            for s in drafted:
                n = len(s.draft_correct)
                p = float(np.mean(s.draft_correct))
                predicted.append(1.0 - (1.0 - p) ** n)
            d["diag/best_draft_prop31"] = float(np.mean(predicted))
        conditioned = [g for g in groups if g.conditioned and g.results]
        if conditioned:
            d["diag/chosen_draft_correct_frac"] = float(np.mean([bool(g.condition_correct) for g in conditioned]))
            for flag, name in ((True, "draft_correct"), (False, "draft_wrong")):
                sel = [c for g in conditioned if bool(g.condition_correct) == flag for c in g.correct]
                if sel:
                    d[f"diag/refine_acc_{name}"] = float(np.mean(sel))
            # Compared on the decoded tokens (what the draft placed into the prompt was decoded
            # the same way), whitespace at the ends ignored.
            copies = {True: [], False: []}
            for g in conditioned:
                draft = (g.condition_text or "").strip()
                for r in g.results:
                    copies[bool(g.condition_correct)].append(self._response_text(r).strip() == draft)
            d["diag/refine_copy_frac"] = float(np.mean(copies[True] + copies[False]))
            if copies[False]:
                d["diag/refine_copy_frac_draft_wrong"] = float(np.mean(copies[False]))
        return d

    def _record(self, state: _PromptState, step: int) -> dict:
        def cut(text: str) -> str:
            return text if len(text) <= _RECORD_TEXT_CHARS else text[:_RECORD_TEXT_CHARS] + " [...]"

        record = {
            "step": step,
            "problem_index": state.problem.index,
            "problem": cut(state.problem.prompt),
            "answer": str(state.problem.answer),
            "drafts": [
                {"text": cut(r.text), "reward": rw, "correct": c}
                for r, rw, c in zip(state.drafts, state.draft_rewards, state.draft_correct)
            ],
            "chosen_draft": None if state.selection is None else state.selection.index,
            "rounds": [
                {
                    "conditioned": g.conditioned,
                    "draft_truncated": g.draft_truncated,
                    "refinements": [
                        {"text": cut(r.text), "reward": rw, "advantage": a}
                        for r, rw, a in zip(g.results, g.rewards, g.advantages)
                    ],
                }
                for g in state.groups
            ],
        }
        return record
