"""The iGRPO rollout: scheduling of drafts and refinements, selection, prompts, advantages,
DAPO dynamic sampling and overlong shaping, extra refinement rounds, the adaptive draft budget,
metrics, and that drafts receive no gradient.

Generation backends here are written in this file ONLY to test the rollout's scheduling and
selection logic (and `OverlappingBackend`, a stream that releases requests out of order, to
check that the pipelined rollout gives exactly the barrier rollout's batches): `ScriptedBackend` returns scripted texts (so rewards are known by hand) and
`TinyModelBackend` samples from the tiny char-tokenizer model with plain torch (so log-probs are
real). The real engines (vLLM, servers, Megatron) are covered by the generation and e2e tests.
Rewards come from the real `RewardManager` with the paper's terms (math_accuracy + format), run
inline (reward.num_workers=0) to keep this file fast; its worker pool is tested by the rewards
tests.
"""

from __future__ import annotations

import logging
import math
import random
import re
from concurrent.futures import Future
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from nemo_igrpo.algorithms.config import (
    AlgorithmConfig,
    DraftTemplateConfig,
    DynamicSamplingConfig,
    OverlongShapingConfig,
)
from nemo_igrpo.batch import LossInputs, LossNormalizer
from nemo_igrpo.algorithms.losses import make_loss_fn
from nemo_igrpo.algorithms.rollout import IGRPORollout, overlong_penalty, request_seed
from nemo_igrpo.algorithms.templates import PromptBuilder
from nemo_igrpo.data.datasets import Problem
from nemo_igrpo.generation.common import check_request
from nemo_igrpo.generation.config import GenerationConfig
from nemo_igrpo.generation.interface import GenerationBackend, GenerationResult, GenerationStream, SamplingParams
from nemo_igrpo.rewards.config import RewardConfig
from nemo_igrpo.rewards.manager import RewardManager
from nemo_igrpo.utils.tiny_model import make_char_tokenizer

EPS = 1e-6
SHORT_SYSTEM = "Think, then answer in <answer> tags."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("char_tok"), model_max_length=1024)


@pytest.fixture(scope="module")
def rewards():
    manager = RewardManager(RewardConfig(num_workers=0))
    yield manager
    manager.close()


def respond(answer: str) -> str:
    """Scripted response for `answer`; "RAW:" marks text returned as is."""
    return answer[4:] if answer.startswith("RAW:") else f"<think>work</think><answer>{answer}</answer>"


class ScriptedBackend(GenerationBackend):
    """Deterministic texts from a script: script[(problem, kind)] is a list of answers, consumed
    in call order, where kind is "conditioned" for prompts that carry a <draft> and "plain"
    otherwise. Log-probs are a fixed function of the request seed, so reproducibility and seed
    handling are visible. Tokens are the real char tokenizer's."""

    def __init__(self, tok, script: dict[tuple[str, str], list[str]]):
        self.tok = tok
        self.script = script
        self.cursor: dict[tuple[str, str], int] = {}
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts, params):
        check_request(prompts, params)  # the validation real backends apply
        self.calls.append((prompts, params))
        out = []
        for prompt in prompts:
            text = self.tok.decode(prompt)
            problem = re.search(r"<\|im_start\|>user\n(.*?)(?:\n\nPrior draft:|<\|im_end\|>)", text, re.S).group(1)
            key = (problem, "conditioned" if "<draft>" in text else "plain")
            results = []
            for i in range(params.n):
                k = self.cursor.get(key, 0)
                self.cursor[key] = k + 1
                ids = self.tok.encode(respond(self.script[key][k]), add_special_tokens=False)
                if len(ids) < params.max_new_tokens:
                    ids, finish = ids + [self.tok.eos_token_id], "stop"
                else:
                    ids, finish = ids[: params.max_new_tokens], "length"
                logprobs = [-0.05 * (1 + (params.seed + i + j) % 11) for j in range(len(ids))]
                results.append(
                    GenerationResult(
                        list(prompt), ids, self.tok.decode(ids, skip_special_tokens=True), logprobs, finish
                    )
                )
            out.append(results)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError("not needed by the rollout")


P1 = Problem(0, "What is 2+3?", "5")
P2 = Problem(1, "What is 3*3?", "9")


def gen_cfg(**kw) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 64, "max_prompt_tokens": 512, **kw})


def algo(**kw) -> AlgorithmConfig:
    template = kw.pop("template", DraftTemplateConfig(system_prompt=SHORT_SYSTEM))
    return AlgorithmConfig(**{"tie_break": "first", "template": template, **kw})


def make_rollout(tok, rewards, script, cfg=None, gen=None, **kw):
    backend = ScriptedBackend(tok, script)
    rollout = IGRPORollout(cfg or algo(), gen or gen_cfg(), backend, rewards, tok, seed=11, **kw)
    return rollout, backend


def grpo(rewards_list):
    r = torch.tensor(rewards_list, dtype=torch.float64)
    if r.max() == r.min():
        return [0.0] * len(rewards_list)
    return ((r - r.mean()) / (r.std(correction=1) + EPS)).tolist()


def response_text(tok, sample) -> str:
    return tok.decode(sample.token_ids[sample.response_start :], skip_special_tokens=True)


def prompt_text(tok, sample) -> str:
    return tok.decode(sample.token_ids[: sample.response_start])


def length(answer: str) -> int:
    return len(respond(answer)) + 1  # char tokens + end-of-turn


# --- the main path, checked by hand ------------------------------------------------------------


BASE_SCRIPT = {
    # Paper reward = accuracy + format: formatted correct 2, formatted wrong 1, unformatted 0.
    (P1.prompt, "plain"): ["4", "5", "6", "5"],  # scores 1 2 1 2 -> first max: draft 1
    (P1.prompt, "conditioned"): ["5", "5", "7", "5"],  # 2 2 1 2
    (P2.prompt, "plain"): ["RAW:nine", "2", "3", "4"],  # 0 1 1 1 -> draft 1
    (P2.prompt, "conditioned"): ["9", "9", "9", "RAW:9"],  # 2 2 2 0
}


def test_igrpo_step_by_hand(tok, rewards):
    rollout, backend = make_rollout(tok, rewards, BASE_SCRIPT)
    batch = rollout.run([P1, P2], step=3)

    # Two generate calls: 4 drafts of each plain prompt, then 4 refinements of each q'.
    assert [(len(p), params.n) for p, params in backend.calls] == [(2, 4), (2, 4)]
    plain = PromptBuilder(tok, rollout.cfg.template, max_prompt_tokens=512, max_new_tokens=64)
    assert backend.calls[0][0] == [plain.plain(P1.prompt), plain.plain(P2.prompt)]
    seeds = [params.seed for _, params in backend.calls]
    assert seeds == [request_seed(11, 3, 0, 1, 4), request_seed(11, 3, 0, 100, 4)] and seeds[0] != seeds[1]

    assert batch.group_sizes == [4, 4] and len(batch.samples) == 8
    for k, sample in enumerate(batch.samples):
        problem, answers, draft = (
            (P1, BASE_SCRIPT[(P1.prompt, "conditioned")], "5")
            if k < 4
            else (P2, BASE_SCRIPT[(P2.prompt, "conditioned")], "2")
        )
        # The prompt is q' with the chosen draft; the response (and only it) is the refinement.
        assert prompt_text(tok, sample).endswith(
            f"{problem.prompt}\n\nPrior draft:\n<draft>\n{respond(draft)}\n</draft><|im_end|>\n<|im_start|>assistant\n"
        )
        assert response_text(tok, sample) == respond(answers[k % 4])
        assert sample.generation_logprobs.dtype == torch.float32 and sample.generation_logprobs.shape == (
            sample.response_length,
        )
    assert [s.advantage for s in batch.samples] == pytest.approx(grpo([2, 2, 1, 2]) + grpo([2, 2, 2, 0]), abs=1e-9)

    m = batch.metrics
    assert m["reward/draft_mean"] == pytest.approx((6 + 3) / 8)
    assert m["reward/best_draft_mean"] == pytest.approx((2 + 1) / 2)
    assert m["draft/best_correct_frac"] == pytest.approx(0.5)
    assert m["accuracy/draft"] == pytest.approx(2 / 8)
    assert m["reward/refine_mean"] == pytest.approx((7 + 6) / 8)
    assert m["accuracy/refine"] == pytest.approx(6 / 8)
    assert m["reward/refine_minus_draft"] == pytest.approx(((7 / 4 - 2) + (6 / 4 - 1)) / 2)
    assert m["reward/math_accuracy/draft_mean"] == pytest.approx(2 / 8)
    assert m["reward/format/refine_mean"] == pytest.approx(7 / 8)
    assert m["groups/zero_variance_frac"] == 0.0 and m["groups/dropped"] == 0.0
    assert m["samples/unfit"] == 0.0 and m["samples/trained"] == 8.0
    drafts = BASE_SCRIPT[(P1.prompt, "plain")] + BASE_SCRIPT[(P2.prompt, "plain")]
    refines = BASE_SCRIPT[(P1.prompt, "conditioned")] + BASE_SCRIPT[(P2.prompt, "conditioned")]
    assert m["response_length/draft_mean"] == pytest.approx(sum(map(length, drafts)) / 8)
    assert m["response_length/refine_mean"] == pytest.approx(sum(map(length, refines)) / 8)
    assert m["draft/tie_frac"] == 1.0 and m["draft/all_zero_frac"] == 0.0  # both prompts have tied maxima
    assert all(math.isfinite(v) for v in m.values())

    assert [r["chosen_draft"] for r in batch.records] == [1, 1]
    assert batch.records[0]["drafts"][1] == {"text": respond("5"), "reward": 2.0, "correct": True}


def test_plain_grpo_is_the_same_path_without_drafts(tok, rewards):
    script = {(P1.prompt, "plain"): ["5", "4", "5", "RAW:x"], (P2.prompt, "plain"): ["9", "9", "9", "9"]}
    rollout, backend = make_rollout(tok, rewards, script, cfg=algo(num_drafts=0))
    batch = rollout.run([P1, P2], step=0)
    assert [params.n for _, params in backend.calls] == [4]  # one stage only
    plain = PromptBuilder(tok, rollout.cfg.template, max_prompt_tokens=512, max_new_tokens=64)
    assert [s.token_ids[: s.response_start] for s in batch.samples] == [plain.plain(P1.prompt)] * 4 + [
        plain.plain(P2.prompt)
    ] * 4
    assert [s.advantage for s in batch.samples] == pytest.approx(grpo([2, 1, 2, 0]) + [0.0] * 4, abs=1e-9)
    assert "reward/draft_mean" not in batch.metrics and "reward/refine_minus_draft" not in batch.metrics
    assert batch.metrics["groups/zero_variance_frac"] == 0.5


# --- drafts only matter through the choice ---------------------------------------------------------


def test_draft_reward_changes_only_which_draft_is_chosen(tok, rewards):
    refinements = ["5", "7", "RAW:5", "5"]  # the refinement script ignores the draft

    def run(drafts):
        script = {(P1.prompt, "plain"): drafts, (P1.prompt, "conditioned"): refinements}
        rollout, _ = make_rollout(tok, rewards, script)
        return rollout.run([P1], step=0)

    base = run(["4", "5", "RAW:4", "6"])  # rewards 1 2 0 1: draft 1
    lowered = run(["RAW:4", "5", "8", "RAW:6"])  # rewards 0 2 1 0: other drafts changed, still draft 1
    assert base.metrics["reward/draft_mean"] != lowered.metrics["reward/draft_mean"]
    for a, b in zip(base.samples, lowered.samples):
        assert a.token_ids == b.token_ids and a.response_start == b.response_start
        assert a.advantage == b.advantage and torch.equal(a.generation_logprobs, b.generation_logprobs)

    raised = run(["5.0", "5", "RAW:4", "6"])  # draft 0 now ties the maximum: "first" picks it
    assert raised.records[0]["chosen_draft"] == 0
    for a, b in zip(base.samples, raised.samples):
        # Only the draft inside the prompt differs; refinement tokens, log-probs and advantages not.
        assert respond("5.0") in prompt_text(tok, b) and respond("5.0") not in prompt_text(tok, a)
        assert a.token_ids[a.response_start :] == b.token_ids[b.response_start :]
        assert a.advantage == b.advantage and torch.equal(a.generation_logprobs, b.generation_logprobs)


def test_random_tie_break_is_reproducible(tok, rewards):
    drafts = ["5", "5.0", "10/2", "5.00"]  # all correct and formatted: a four-way tie
    script = {(P1.prompt, "plain"): drafts * 6, (P1.prompt, "conditioned"): ["5", "4", "5", "4"] * 6}

    def choices():
        rollout, backend = make_rollout(tok, rewards, script, cfg=algo(tie_break="random"))
        batches = [rollout.run([P1], step=s) for s in range(6)]
        return [b.records[0]["chosen_draft"] for b in batches], batches, backend

    first, batches_a, backend_a = choices()
    second, batches_b, backend_b = choices()
    assert first == second
    assert len(set(first)) > 1  # the draw really depends on the step
    assert [p.seed for _, p in backend_a.calls] == [p.seed for _, p in backend_b.calls]
    for a, b in zip(batches_a, batches_b):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert all(m == 1.0 for m in [b.metrics["draft/tie_frac"] for b in batches_a])


def test_all_zero_drafts_skip_and_append(tok, rewards):
    script = {
        (P1.prompt, "plain"): ["4", "5", "6", "5"],
        (P1.prompt, "conditioned"): ["5", "5", "7", "5"],
        (P2.prompt, "plain"): ["RAW:a", "RAW:b", "RAW:c", "RAW:d", "9", "1", "9", "1"],  # drafts, then refinements
        (P2.prompt, "conditioned"): ["9", "1", "9", "1"],
    }
    rollout, _ = make_rollout(tok, rewards, script, cfg=algo(all_zero_drafts="skip"))
    batch = rollout.run([P1, P2], step=0)
    plain = PromptBuilder(tok, rollout.cfg.template, max_prompt_tokens=512, max_new_tokens=64)
    assert all(s.token_ids[: s.response_start] == plain.plain(P2.prompt) for s in batch.samples[4:])
    assert batch.metrics["draft/skipped_frac"] == 0.5 and batch.metrics["draft/all_zero_frac"] == 0.5
    assert batch.metrics["reward/refine_minus_draft"] == pytest.approx(7 / 4 - 2)  # only the conditioned group
    assert batch.records[1]["chosen_draft"] is None

    rollout, _ = make_rollout(tok, rewards, script, cfg=algo(all_zero_drafts="append"))
    batch = rollout.run([P1, P2], step=0)
    assert all("<draft>\na\n</draft>" in prompt_text(tok, s) for s in batch.samples[4:])  # argmax = first of the zeros


# --- DAPO ------------------------------------------------------------------------------------------


def problem(i: int) -> Problem:
    return Problem(i, f"What is {i}+{i}?", str(2 * i))


def ds_script(problems, easy: set[int]):
    script = {}
    for p in problems:
        script[(p.prompt, "plain")] = [p.answer, "0"]
        # Easy problems: every refinement correct -> zero variance -> dropped.
        script[(p.prompt, "conditioned")] = [p.answer] * 2 if p.index in easy else [p.answer, "0"]
    return script


def test_dynamic_sampling_drops_and_refills(tok, rewards):
    first, refill = [problem(1), problem(2)], [problem(3), problem(4)]
    script = ds_script(first + refill, easy={1, 3})
    requested = []

    def source(k):
        requested.append(k)
        return refill

    cfg = algo(
        num_drafts=2, num_refinements=2, dynamic_sampling=DynamicSamplingConfig(enabled=True, max_generation_batches=2)
    )
    rollout, backend = make_rollout(tok, rewards, script, cfg=cfg, problem_source=source)
    batch = rollout.run(first, step=0)
    assert requested == [2]  # one refill was enough
    assert batch.metrics["groups/dropped"] == 2 and batch.metrics["groups/kept"] == 2
    assert batch.metrics["groups/generation_batches"] == 2 and batch.metrics["groups/zero_variance_frac"] == 0.5
    kept_problems = {re.search(r"What is (\d)\+", prompt_text(tok, s)).group(1) for s in batch.samples}
    assert kept_problems == {"2", "4"} and len(batch.samples) == 4
    assert all(s.advantage != 0 for s in batch.samples)
    # Refill seeds differ from the first batch's (attempt is part of the seed).
    assert len({p.seed for _, p in backend.calls}) == len(backend.calls)


def test_dynamic_sampling_is_bounded(tok, rewards):
    always_easy = [problem(5), problem(6)]
    script = ds_script([problem(1), problem(2)] + always_easy, easy={1, 5, 6})
    calls = []

    def source(k):
        calls.append(k)
        return always_easy

    cfg = algo(
        num_drafts=2, num_refinements=2, dynamic_sampling=DynamicSamplingConfig(enabled=True, max_generation_batches=2)
    )
    # The easy refill problems are re-used, so let the script serve them twice.
    for p in always_easy:
        for kind in ("plain", "conditioned"):
            script[(p.prompt, kind)] = script[(p.prompt, kind)] * 2
    rollout, _ = make_rollout(tok, rewards, script, cfg=cfg, problem_source=source)
    batch = rollout.run([problem(1), problem(2)], step=0)
    assert calls == [2, 2]  # max_generation_batches extra batches, no more
    assert batch.metrics["groups/kept"] == 1 and batch.metrics["groups/dropped"] == 5 and len(batch.samples) == 2

    # Disabled: nothing is dropped; the zero-variance group trains with zero advantages.
    rollout, _ = make_rollout(
        tok,
        rewards,
        ds_script([problem(1), problem(2)], easy={1}),
        cfg=replace(cfg, dynamic_sampling=DynamicSamplingConfig()),
    )
    batch = rollout.run([problem(1), problem(2)], step=0)
    assert len(batch.samples) == 4 and batch.metrics["groups/dropped"] == 0


def test_overlong_penalty_formula():
    # L_max = 40, buffer 20: free up to 20 tokens, then linear down to -penalty at 40.
    assert [overlong_penalty(n, 40, 20, 1.0) for n in (1, 20, 21, 30, 40, 41)] == pytest.approx(
        [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    )
    assert overlong_penalty(30, 40, 20, 0.5) == pytest.approx(-0.25)


def test_overlong_shaping_enters_the_advantages(tok, rewards):
    answers = ["5", "5" + " " * 20, "5" + " " * 30, "RAW:<think>" + "x" * 100]  # last one hits the limit
    script = {(P1.prompt, "plain"): ["5", "4"], (P1.prompt, "conditioned"): answers}
    cfg = algo(num_drafts=2, overlong_shaping=OverlongShapingConfig(enabled=True, buffer_tokens=30, penalty=1.0))
    rollout, _ = make_rollout(tok, rewards, script, cfg=cfg, gen=gen_cfg(max_new_tokens=80))
    batch = rollout.run([P1], step=0)
    lengths = [s.response_length for s in batch.samples]
    assert lengths[-1] == 80 and lengths[0] <= 50 < lengths[1] < lengths[2] < 80
    task = [2.0, 2.0, 2.0, 0.0]  # spaces inside <answer> are fine; the cut-off one scores 0
    shaped = [r + overlong_penalty(n, 80, 30, 1.0) for r, n in zip(task, lengths)]
    assert shaped[0] == 2.0 and shaped[-1] == -1.0 and len(set(shaped)) == 4
    assert [s.advantage for s in batch.samples] == pytest.approx(grpo(shaped), abs=1e-9)
    assert batch.metrics["reward/refine_mean"] == pytest.approx(sum(task) / 4)  # task reward, unshaped
    assert batch.metrics["reward/refine_shaped_mean"] == pytest.approx(sum(shaped) / 4)
    assert batch.metrics["response_length/refine_clip_frac"] == 0.25


# --- beyond the paper -------------------------------------------------------------------------------


def test_two_refinement_rounds(tok, rewards):
    script = {
        (P1.prompt, "plain"): ["4", "6"],
        (P1.prompt, "conditioned"): ["7", "5", "5", "8"],  # round 1: 7 5 -> best "5"; round 2: 5 8
    }
    rollout, backend = make_rollout(
        tok, rewards, script, cfg=algo(num_drafts=2, num_refinements=2, refinement_rounds=2)
    )
    batch = rollout.run([P1], step=0)
    assert [p.n for _, p in backend.calls] == [2, 2, 2]
    assert batch.group_sizes == [2, 2]
    round1, round2 = batch.samples[:2], batch.samples[2:]
    assert all(f"<draft>\n{respond('4')}\n</draft>" in prompt_text(tok, s) for s in round1)  # first of the tied drafts
    assert all(f"<draft>\n{respond('5')}\n</draft>" in prompt_text(tok, s) for s in round2)  # best refinement
    assert [s.advantage for s in batch.samples] == pytest.approx(grpo([1, 2]) + grpo([2, 1]), abs=1e-9)
    assert batch.metrics["reward/refine_round1_mean"] == 1.5 and batch.metrics["reward/refine_round2_mean"] == 1.5
    # Improvement over the conditioning text: round 1 over the draft (1), round 2 over the refinement (2).
    assert batch.metrics["reward/refine_minus_draft"] == pytest.approx(((1.5 - 1) + (1.5 - 2)) / 2)


def test_adaptive_draft_budget_moves_samples_to_refinement(tok, rewards):
    script = {
        (P1.prompt, "plain"): ["4", "4"],  # unanimous probe: the 2 remaining drafts move to stage 2
        (P1.prompt, "conditioned"): ["5", "4", "5", "4", "5", "4"],
        (P2.prompt, "plain"): ["9", "1", "RAW:1", "9.0"],  # not unanimous: 2 more drafts
        (P2.prompt, "conditioned"): ["9", "1", "9", "1"],
    }
    cfg = algo(num_drafts=4, num_refinements=4, adaptive_draft_budget=True)
    rollout, backend = make_rollout(tok, rewards, script, cfg=cfg)
    batch = rollout.run([P1, P2], step=0)
    assert [(len(prompts), p.n) for prompts, p in backend.calls] == [(2, 2), (1, 2), (1, 4), (1, 6)]
    assert batch.group_sizes == [6, 4]
    # Matched budget per prompt: drafts + refinements = N + G.
    assert len(batch.records[0]["drafts"]) + 6 == 8 and len(batch.records[1]["drafts"]) + 4 == 8
    assert [s.advantage for s in batch.samples] == pytest.approx(grpo([2, 1] * 3) + grpo([2, 1, 2, 1]), abs=1e-9)
    assert batch.metrics["draft/unanimous_frac"] == 0.5 and batch.metrics["draft/moved_samples"] == 2


# --- limits and errors -------------------------------------------------------------------------------


def test_unfit_problem_is_counted_and_left_out(tok, rewards, caplog):
    long = Problem(2, "Explain " + "very " * 200 + "carefully.", "1")
    rollout, backend = make_rollout(tok, rewards, BASE_SCRIPT)
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.algorithms.rollout"):
        batch = rollout.run([P1, long, P2], step=0)
    assert batch.metrics["samples/unfit"] == 1 and len(batch.samples) == 8
    assert "problem 2:" in caplog.text and "generation.max_prompt_tokens" in caplog.text
    assert len(backend.calls[0][0]) == 2


def test_budget_validation_errors(tok, rewards):
    with pytest.raises(ValueError, match="algorithm.num_refinements.*always zero"):
        make_rollout(tok, rewards, {}, cfg=algo(num_refinements=1))
    with pytest.raises(ValueError, match="algorithm.refinement_rounds"):
        make_rollout(tok, rewards, {}, cfg=algo(num_drafts=0, refinement_rounds=2))
    with pytest.raises(ValueError, match="algorithm.adaptive_draft_budget"):
        make_rollout(tok, rewards, {}, cfg=algo(num_drafts=2, adaptive_draft_budget=True))
    with pytest.raises(ValueError, match="overlong_shaping.buffer_tokens"):
        make_rollout(tok, rewards, {}, cfg=algo(overlong_shaping=OverlongShapingConfig(enabled=True)))


def test_backend_that_changes_the_prompt_is_rejected(tok, rewards):
    class Retokenising(ScriptedBackend):
        def generate(self, prompts, params):
            out = super().generate(prompts, params)
            for results in out:
                for r in results:
                    r.prompt_token_ids = r.prompt_token_ids[1:]
            return out

    rollout = IGRPORollout(algo(), gen_cfg(), Retokenising(tok, BASE_SCRIPT), rewards, tok, seed=0)
    with pytest.raises(RuntimeError, match="different prompt token ids"):
        rollout.run([P1], step=0)


# --- a real model: log-prob alignment and no gradient into the draft ---------------------------------


class TinyModelBackend(GenerationBackend):
    """Samples from the tiny HF model with plain torch: sample i of a prompt uses seed + i.
    Reports raw log-probs (log-softmax of the unscaled logits), as generation.logprobs_mode
    "raw_logprobs" specifies."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    @torch.no_grad()
    def generate(self, prompts, params):
        check_request(prompts, params)
        out = []
        for prompt in prompts:
            results = []
            for i in range(params.n):
                gen = torch.Generator().manual_seed(params.seed + i)
                ids, new, logprobs, finish = list(prompt), [], [], "length"
                for _ in range(params.max_new_tokens):
                    logits = self.model(torch.tensor([ids])).logits[0, -1].double()
                    token = int(torch.multinomial(torch.softmax(logits / params.temperature, -1), 1, generator=gen))
                    logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                    new.append(token)
                    ids.append(token)
                    if token in params.stop_token_ids:
                        finish = "stop"
                        break
                results.append(
                    GenerationResult(
                        list(prompt), new, self.tok.decode(new, skip_special_tokens=True), logprobs, finish
                    )
                )
            out.append(results)
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError


def test_tiny_model_rollout_aligns_logprobs_and_masks_the_draft(tiny_llama_dir, rewards):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    cfg = algo(num_drafts=2, num_refinements=2)
    rollout = IGRPORollout(
        cfg, gen_cfg(max_new_tokens=6, temperature=1.0), TinyModelBackend(model, tok), rewards, tok, seed=5
    )
    batch = rollout.run([P1, P2], step=0)
    assert len(batch.samples) == 4 and batch.group_sizes == [2, 2]

    for k, sample in enumerate(batch.samples):
        record = batch.records[k // 2]
        draft_ids = tok.encode(record["drafts"][record["chosen_draft"]]["text"], add_special_tokens=False)
        prompt = sample.token_ids[: sample.response_start]
        # The chosen draft sits inside the prompt, i.e. before response_start.
        starts = [i for i in range(len(prompt) - len(draft_ids) + 1) if prompt[i : i + len(draft_ids)] == draft_ids]
        assert starts, "chosen draft not found in the refinement prompt"
        draft_positions = range(starts[-1], starts[-1] + len(draft_ids))

        # Teacher-forced log-probs of the sample reproduce the generator's: response_start and
        # generation_logprobs refer to the same tokens.
        ids = torch.tensor([sample.token_ids])
        with torch.no_grad():
            all_lp = torch.log_softmax(model(ids).logits[0].double(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(all_lp[sample.response_start - 1 :].float(), sample.generation_logprobs, atol=1e-4)

        # The loss sees only response tokens: its gradient w.r.t. every prompt token's
        # log-prob, the draft's included, is exactly zero; response tokens do get gradient.
        leaf = all_lp.clone().requires_grad_(True)  # leaf[t - 1] = log p(token t)
        response = leaf[sample.response_start - 1 :]
        inputs = LossInputs(
            logprobs=response,
            old_logprobs=sample.generation_logprobs.double(),
            advantages=torch.full_like(response, 1.0 if k % 2 == 0 else -1.0),  # non-zero, so gradients exist
            seq_ids=torch.zeros(response.shape[0], dtype=torch.int64),
            num_seqs=1,
        )
        loss, _ = make_loss_fn(cfg)(inputs, LossNormalizer(response.shape[0], 1, 6))
        loss.backward()
        assert torch.all(leaf.grad[: sample.response_start - 1] == 0)
        assert all(leaf.grad[p - 1] == 0 for p in draft_positions)
        assert torch.all(leaf.grad[sample.response_start - 1 :] != 0)


def test_draft_truncated_to_the_model_context(tok, rewards):
    script = {(P1.prompt, "plain"): ["4", "5"], (P1.prompt, "conditioned"): ["5", "4"]}
    cfg = algo(
        num_drafts=2,
        num_refinements=2,
        template=DraftTemplateConfig(system_prompt=SHORT_SYSTEM, truncation_side="left"),
    )
    frame = len(
        PromptBuilder(tok, cfg.template, max_prompt_tokens=512, max_new_tokens=64).with_draft(P1.prompt, "").token_ids
    )
    context = frame + 64 + 10  # room for 10 draft tokens
    rollout, _ = make_rollout(tok, rewards, script, cfg=cfg, max_context_tokens=context)
    batch = rollout.run([P1], step=0)
    assert batch.metrics["draft/truncated"] == 1 and batch.metrics["samples/unfit"] == 0
    for s in batch.samples:
        assert s.response_start + 64 == context
        assert f"<draft>\n{respond('5')[-10:]}\n</draft>" in prompt_text(tok, s)  # the draft's last 10 tokens
    assert batch.records[0]["rounds"][0]["draft_truncated"] is True


def test_algorithm_config_problems_lists_every_problem():
    from nemo_igrpo.algorithms.validation import algorithm_config_problems

    cfg = AlgorithmConfig(
        num_refinements=1,
        tie_break="last",
        advantage="nope",
        dual_clip_c=0.5,
        template=DraftTemplateConfig(draft_wrapper="{draft}"),
    )
    keys = [key for key, _ in algorithm_config_problems(cfg, gen_cfg())]
    assert keys == [
        "algorithm.num_refinements",
        "algorithm.tie_break",
        "algorithm.advantage",
        "algorithm.dual_clip_c",
        "algorithm.template.draft_wrapper",
    ]
    assert algorithm_config_problems(AlgorithmConfig(), gen_cfg()) == []


# --- pipelined refinements (no barrier between drafts and refinements) ------------------------------


class OverlappingBackend(GenerationBackend):
    """Wraps a backend whose per-prompt results do not depend on batching (each request is
    answered by `inner.generate([prompt], params)` when it is submitted) and releases finished
    requests one or two at a time in a seeded random order, like an engine whose prompts finish
    at different times. It records how many requests were in flight and whether a refinement
    was submitted while another prompt's drafts were still out (the overlap pipelining is for)."""

    def __init__(self, inner, order_seed: int = 0):
        self.inner = inner
        self.rng = random.Random(order_seed)
        self.max_in_flight = 0
        self.overlapped = False  # a conditioned prompt submitted while a plain one was in flight
        self.streams_opened = 0

    def generate(self, prompts, params):
        raise AssertionError("a pipelined rollout must use the stream")

    def update_weights(self, named_tensors):
        raise NotImplementedError

    def open_stream(self):
        backend = self
        backend.streams_opened += 1

        class Stream(GenerationStream):
            def __init__(self):
                self.pending = {}

            def submit(self, key, prompt, params):
                check_request([prompt], params)
                conditioned = "<draft>" in backend.inner.tok.decode(prompt)
                if conditioned and any(not c for c, _ in self.pending.values()):
                    backend.overlapped = True
                self.pending[key] = (conditioned, backend.inner.generate([prompt], params)[0])
                backend.max_in_flight = max(backend.max_in_flight, len(self.pending))

            def wait(self, timeout=None):
                if not self.pending:
                    return []
                keys = backend.rng.sample(sorted(self.pending), k=min(len(self.pending), backend.rng.choice([1, 1, 2])))
                return [(k, self.pending.pop(k)[1]) for k in keys]

            @property
            def num_pending(self):
                return len(self.pending)

        return Stream()


def random_script(problems, seed: int, length: int = 40) -> dict:
    """Answers drawn from correct / wrong / unformatted, so rewards (2 / 1 / 0) vary: ties,
    unanimous probes, zero-variance groups and all-zero drafts all occur."""
    rng = random.Random(seed)
    script = {}
    for p in problems:
        for kind in ("plain", "conditioned"):
            script[(p.prompt, kind)] = [rng.choice([p.answer, p.answer, "0", "RAW:" + p.answer]) for _ in range(length)]
    return script


def comparable(batch):
    """Everything a batch holds except wall times and the mode flag."""
    metrics = {
        k: v
        for k, v in batch.metrics.items()
        if not k.startswith("timing/") and k not in ("reward/seconds", "rollout/pipelined")
    }
    samples = [(s.token_ids, s.response_start, s.advantage, s.generation_logprobs.tolist()) for s in batch.samples]
    return samples, batch.group_sizes, metrics, batch.records


def run_both_modes(
    tok, rewards, make_backend, cfg, problems, gen=None, steps=(0, 1), source=None, max_context_tokens=None
):
    """The same steps through the two-barrier rollout and the pipelined one (fresh backends)."""
    batches = {}
    for pipelined in (False, True):
        backend = make_backend(pipelined)
        rollout = IGRPORollout(
            cfg,
            gen or gen_cfg(),
            backend,
            rewards,
            tok,
            seed=11,
            max_context_tokens=max_context_tokens,
            problem_source=source() if source else None,
        )
        assert rollout.pipelined is pipelined  # auto: on exactly when the backend's stream overlaps
        batches[pipelined] = [rollout.run(problems, step=s) for s in steps]
        if pipelined:
            assert backend.streams_opened >= len(steps)
    for barrier, pipelined in zip(batches[False], batches[True]):
        assert comparable(pipelined) == comparable(barrier)
        assert pipelined.metrics["rollout/pipelined"] == 1.0 and barrier.metrics["rollout/pipelined"] == 0.0
    return batches


SIX = [problem(i) for i in range(1, 7)]


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("igrpo", algo()),
        ("random_ties", algo(tie_break="random")),
        ("skip_all_zero", algo(all_zero_drafts="skip")),
        ("grpo", algo(num_drafts=0, num_refinements=4)),
        ("adaptive", algo(num_drafts=4, num_refinements=3, adaptive_draft_budget=True)),
        ("rounds", algo(num_drafts=2, num_refinements=3, refinement_rounds=3)),
        ("overlong", algo(overlong_shaping=OverlongShapingConfig(enabled=True, buffer_tokens=20, penalty=1.0))),
        (
            "dynamic_sampling",
            algo(num_drafts=3, num_refinements=2, dynamic_sampling=DynamicSamplingConfig(enabled=True)),
        ),
        (
            "everything",
            algo(
                num_drafts=4,
                num_refinements=2,
                adaptive_draft_budget=True,
                refinement_rounds=2,
                tie_break="random",
                dynamic_sampling=DynamicSamplingConfig(enabled=True, max_generation_batches=2),
                overlong_shaping=OverlongShapingConfig(enabled=True, buffer_tokens=20, penalty=0.5),
            ),
        ),
    ],
)
@pytest.mark.parametrize("order_seed", [0, 1])
def test_pipelined_rollout_gives_the_barrier_batches(tok, rewards, name, cfg, order_seed):
    refill = [problem(i) for i in range(7, 25)]
    script = random_script(SIX + refill, seed=order_seed + 100)

    def source():
        it = iter([refill[i : i + 6] for i in range(0, 18, 6)] * 4)
        return lambda k: next(it)[:k]

    backends = []

    def make(pipelined):
        inner = ScriptedBackend(tok, {k: list(v) for k, v in script.items()})
        backends.append(OverlappingBackend(inner, order_seed) if pipelined else inner)
        return backends[-1]

    # Scores inline (no score_async): which requests are in flight at a submit is then fixed by
    # the release order alone, so the overlap check below is deterministic. The real manager's
    # background scoring is exercised by the tiny-model test.
    inline = SimpleNamespace(score=rewards.score, end_step=rewards.end_step)
    batches = run_both_modes(tok, inline, make, cfg, SIX, gen=gen_cfg(max_new_tokens=40), source=source)
    pipelined_backend = backends[1]
    assert pipelined_backend.max_in_flight >= 2
    if cfg.num_drafts > 0:
        # Some prompt's refinement went in while another prompt's drafts were still generating.
        assert pipelined_backend.overlapped
    assert sum(len(b.samples) for b in batches[True]) > 0
    metrics = [b.metrics for b in batches[True]]
    # The scripts really exercise what the configuration turns on.
    if cfg.dynamic_sampling.enabled:
        assert max(m["groups/generation_batches"] for m in metrics) > 1
    if cfg.adaptive_draft_budget:
        assert 0 < sum(m["draft/unanimous_frac"] for m in metrics) < len(metrics)
    if cfg.refinement_rounds > 1:
        assert all(f"reward/refine_round{cfg.refinement_rounds}_mean" in m for m in metrics)


def test_pipelined_rollout_with_a_real_model_matches(tiny_llama_dir, rewards):
    """Real sampling (seeded torch generators per sample) and log-probs: identical samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()

    def make(pipelined):
        inner = TinyModelBackend(model, tok)
        inner.tok = tok
        return OverlappingBackend(inner, 3) if pipelined else inner

    cfg = algo(num_drafts=2, num_refinements=2, refinement_rounds=2, tie_break="random")
    run_both_modes(
        tok, rewards, make, cfg, [P1, P2, problem(4)], gen=gen_cfg(max_new_tokens=5, temperature=1.0), steps=(0,)
    )


def test_pipelining_on_a_backend_without_streams_keeps_the_barrier_calls(tok, rewards, caplog):
    with caplog.at_level(logging.WARNING, logger="nemo_igrpo.algorithms.rollout"):
        rollout, backend = make_rollout(tok, rewards, BASE_SCRIPT, pipeline_refinements=True)
    assert (
        rollout.pipelined
        and "cannot overlap requests" in caplog.text
        and "algorithm.pipeline_refinements" in caplog.text
    )
    batch = rollout.run([P1, P2], step=3)
    # The default stream (BarrierStream) sends the same two generate() calls, with the same seeds.
    assert [(len(p), params.n, params.seed) for p, params in backend.calls] == [
        (2, 4, request_seed(11, 3, 0, 1, 4)),
        (2, 4, request_seed(11, 3, 0, 100, 4)),
    ]
    reference, _ = make_rollout(tok, rewards, BASE_SCRIPT, pipeline_refinements=False)
    assert comparable(batch) == comparable(reference.run([P1, P2], step=3))


def test_pipeline_setting_is_checked(tok, rewards):
    with pytest.raises(ValueError, match="algorithm.pipeline_refinements"):
        make_rollout(tok, rewards, {}, pipeline_refinements="yes")
    rollout, _ = make_rollout(tok, rewards, {}, cfg=SimpleNamespaceConfig(pipeline_refinements=False))
    assert rollout.pipelined is False


class SimpleNamespaceConfig:
    """An AlgorithmConfig carrying the setting (the key is read with getattr)."""

    def __new__(cls, **extra):
        cfg = algo()
        for k, v in extra.items():
            object.__setattr__(cfg, k, v)
        return cfg


def test_pipelined_rollout_closes_its_stream_on_a_reward_error(tok):
    class Failing:
        def score_async(self, samples):
            raise_in = Future()
            raise_in.set_exception(RuntimeError("judge is down"))
            return raise_in

    closed = []

    class Backend(OverlappingBackend):
        def open_stream(self):
            stream = super().open_stream()
            stream.close = lambda: closed.append(True)
            return stream

    backend = Backend(ScriptedBackend(tok, BASE_SCRIPT))
    rollout = IGRPORollout(algo(), gen_cfg(), backend, Failing(), tok, seed=0)
    with pytest.raises(RuntimeError, match="judge is down"):
        rollout.run([P1, P2], step=0)
    assert closed == [True]


def test_server_stream_posts_prompts_concurrently_and_returns_them_as_they_finish():
    """The HTTP backends' stream (no server needed: the per-prompt request is replaced)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nemo_igrpo.generation.openai_server import OpenAIServerBackend

    backend = object.__new__(OpenAIServerBackend)  # skips the /v1/models check of __init__
    backend._pool = ThreadPoolExecutor(max_workers=4)
    released = {k: threading.Event() for k in (7, 8, 9)}
    posted = []

    def complete_one(index, prompt, params):
        posted.append(prompt[0])
        assert released[prompt[0]].wait(10)
        return [GenerationResult(list(prompt), [1, 2], "ab", [-0.5, -0.25], "stop") for _ in range(params.n)]

    backend._complete_one = complete_one
    assert backend.supports_streaming
    params = SamplingParams(n=2, seed=1)
    with backend.open_stream() as stream:
        for k in (7, 8, 9):
            stream.submit(f"p{k}", [k, 3], params)
        with pytest.raises(ValueError, match="empty token-id list"):
            stream.submit("bad", [], params)  # validated where it is submitted
        assert stream.wait(timeout=0.05) == []  # nothing answered yet
        released[8].set()
        ((key, results),) = stream.wait()
        assert key == "p8" and len(results) == 2 and results[0].prompt_token_ids == [8, 3]
        assert sorted(posted) == [7, 8, 9]  # all three were in flight at once
        released[7].set()
        released[9].set()
        rest = {}
        while stream.num_pending:
            rest.update(stream.wait())
        assert sorted(rest) == ["p7", "p9"]
    backend._pool.shutdown()
