"""Prompt construction: the plain prompt q and the draft-conditioned prompt q' = Concat(q, d_hat).

One system prompt for everything (algorithm.template.system_prompt, default: the paper's,
verbatim). The paper publishes only that system prompt, and it already says "if the prompt
contains feedback or a prior draft, ..." so it is written to serve both stages. We therefore use
it for drafts, refinements, plain GRPO and evaluation alike; evaluation is then exactly the
draft prompt, i.e. the single-shot prompt the model is deployed with.

The user turn of a refinement prompt is `template.draft_wrapper` with {prompt} and {draft}
substituted (default: the problem, then the draft inside <draft> tags). Both go through the
tokenizer's chat template: apply_chat_template(..., tokenize=False, add_generation_prompt=True)
and then encode(text, add_special_tokens=False), because the template text already carries the
model's special tokens (a second BOS would be wrong) and because transformers 5 returns a dict,
not ids, from apply_chat_template(tokenize=True).

The draft is tokenized on its own and spliced in as token ids: the rendered prompt is split at
a sentinel standing where the draft goes, and prefix, draft and suffix are encoded separately.
This gives
- truncation at a token boundary (never mid-token), to a budget in tokens;
- the exact span of the draft inside the prompt (tests check that it lies before
  `response_start`, i.e. that the draft receives no gradient);
- safety against a draft that spells a special token ("<|im_end|>"): the draft is encoded with
  split_special_tokens=True, so it cannot close the user turn early.

A prompt that cannot fit is never cut silently: `PromptDoesNotFit` names the sample, the limit
and the setting, and the rollout counts it (samples/unfit) and leaves that problem out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, get_args

from nemo_igrpo.algorithms.config import DraftTemplateConfig, TruncationSide
from nemo_igrpo.utils.errors import PromptDoesNotFit

_DRAFT_SENTINEL = "\u2063NEMO_IGRPO_DRAFT_SLOT\u2063"  # invisible separators around a unique name
_PLACEHOLDER = re.compile(r"\{prompt\}|\{draft\}")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
TRUNCATION_SIDES: tuple[str, ...] = get_args(TruncationSide)


@dataclass
class RefinementPrompt:
    token_ids: list[int]
    draft_start: int  # draft tokens are token_ids[draft_start:draft_end]
    draft_end: int
    draft_tokens_before_truncation: int
    truncated: bool

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[self.draft_start : self.draft_end]


def strip_reasoning(text: str) -> str:
    """Remove the reasoning of a draft, keeping what follows it (the answer).

    - every complete <think>...</think> block is removed;
    - a `</think>` without an opening tag (templates that put <think> into the generation
      prompt, e.g. DeepSeek-R1 distills) removes everything up to and including it;
    - an unclosed `<think>` (a draft cut off while reasoning) removes everything from it on:
      such a draft reached no answer, so nothing after it is worth keeping.
    """
    out = _THINK_BLOCK.sub("", text)
    if "</think>" in out:
        out = out.rsplit("</think>", 1)[1]
    if "<think>" in out:
        out = out.split("<think>", 1)[0]
    return out.strip()


def check_draft_wrapper(wrapper: str) -> None:
    found = _PLACEHOLDER.findall(wrapper)
    if sorted(found) != ["{draft}", "{prompt}"]:
        raise ValueError(
            f"algorithm.template.draft_wrapper must contain {{prompt}} and {{draft}} exactly once each, got {wrapper!r}"
        )


def fill_wrapper(wrapper: str, prompt: str, draft: str) -> str:
    """Substitute the placeholders in one pass: braces inside the problem or the draft (LaTeX is
    full of them) are never interpreted, unlike str.format."""
    return _PLACEHOLDER.sub(lambda m: prompt if m.group(0) == "{prompt}" else draft, wrapper)


class PromptBuilder:
    """Builds token-id prompts for one tokenizer and one template configuration.

    max_prompt_tokens: limit on the plain prompt (generation.max_prompt_tokens).
    max_new_tokens: the response budget that must still fit after any prompt.
    max_context_tokens: the model's context (prompt + response); None means unknown, in which
        case only template.max_draft_tokens bounds the draft.
    apply_chat_template: False renders "system_prompt\\n\\nuser turn" as raw text (base models
        without a chat template) and encodes it with the tokenizer's own special tokens.
    """

    def __init__(
        self,
        tokenizer,
        template: DraftTemplateConfig,
        *,
        max_prompt_tokens: int,
        max_new_tokens: int,
        max_context_tokens: Optional[int] = None,
        apply_chat_template: bool = True,
    ):
        check_draft_wrapper(template.draft_wrapper)
        if template.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(
                f"algorithm.template.truncation_side: {template.truncation_side!r} is not one of {list(TRUNCATION_SIDES)}"
            )
        if template.max_draft_tokens is not None and template.max_draft_tokens < 0:
            raise ValueError(f"algorithm.template.max_draft_tokens must be >= 0, got {template.max_draft_tokens}")
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"data.apply_chat_template is true but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) "
                "has no chat template; set data.apply_chat_template=false for a base model"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.apply_chat_template = apply_chat_template
        self.max_draft_tokens = template.max_draft_tokens if template.max_draft_tokens is not None else max_new_tokens

    # --- rendering ---------------------------------------------------------------------------

    def render(self, user_content: str) -> str:
        """The full prompt text for one user turn (system prompt included, generation prompt open)."""
        system = self.template.system_prompt
        if not self.apply_chat_template:
            return f"{system}\n\n{user_content}" if system else user_content
        messages = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user_content})
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that rejects a system message
            raise ValueError(
                f"the tokenizer's chat template failed ({type(e).__name__}: {e}); "
                "try algorithm.template.system_prompt=null or data.apply_chat_template=false"
            ) from e
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
        return text

    def _encode(self, text: str, *, split_special: bool = False) -> list[int]:
        kwargs = {"add_special_tokens": not self.apply_chat_template}
        if split_special:
            kwargs["split_special_tokens"] = True
        return list(self.tokenizer.encode(text, **kwargs))

    # --- plain prompt ------------------------------------------------------------------------

    def plain(self, problem: str, problem_index: Optional[int] = None, where: Optional[str] = None) -> list[int]:
        """The prompt without a draft: drafts, plain GRPO, evaluation. `where` names the problem
        in a PromptDoesNotFit (its file and line)."""
        ids = self._encode(self.render(problem))
        if len(ids) > self.max_prompt_tokens:
            raise PromptDoesNotFit(
                "prompt is longer than the prompt budget",
                problem_index=problem_index,
                needed=len(ids),
                limit=self.max_prompt_tokens,
                key="generation.max_prompt_tokens",
                where=where,
            )
        if self.max_context_tokens is not None and len(ids) + self.max_new_tokens > self.max_context_tokens:
            raise PromptDoesNotFit(
                "prompt plus the response budget exceeds the model context",
                problem_index=problem_index,
                needed=len(ids) + self.max_new_tokens,
                limit=self.max_context_tokens,
                key="generation.max_new_tokens / the model's context length",
                where=where,
            )
        return ids

    # --- prompt with a draft -------------------------------------------------------------------

    def draft_budget(self, frame_tokens: int) -> int:
        """Tokens available for the draft given the prompt's other tokens (`frame_tokens`)."""
        budget = self.max_draft_tokens
        if self.max_context_tokens is not None:
            budget = min(budget, self.max_context_tokens - self.max_new_tokens - frame_tokens)
        return budget

    def with_draft(
        self, problem: str, draft: str, problem_index: Optional[int] = None, where: Optional[str] = None
    ) -> RefinementPrompt:
        """q' = the problem with the draft appended through the wrapper, as token ids."""
        if self.template.strip_reasoning:
            draft = strip_reasoning(draft)
        text = self.render(fill_wrapper(self.template.draft_wrapper, problem, _DRAFT_SENTINEL))
        if text.count(_DRAFT_SENTINEL) != 1:
            raise ValueError(
                "the chat template altered the draft placeholder; it cannot be used for refinement prompts"
            )
        prefix_text, suffix_text = text.split(_DRAFT_SENTINEL)
        prefix = self._encode(prefix_text)
        # The suffix never starts the sequence: no BOS for it even in raw-text mode.
        suffix = list(self.tokenizer.encode(suffix_text, add_special_tokens=False)) if suffix_text else []
        draft_ids = (
            list(self.tokenizer.encode(draft, add_special_tokens=False, split_special_tokens=True)) if draft else []
        )
        frame = len(prefix) + len(suffix)
        budget = self.draft_budget(frame)
        if budget < 0 or (budget == 0 and draft_ids):
            raise PromptDoesNotFit(
                "no room for the draft: prompt + wrapper + response budget exceed the model context",
                problem_index=problem_index,
                needed=frame + self.max_new_tokens + min(len(draft_ids), 1),
                limit=self.max_context_tokens if self.max_context_tokens is not None else frame,
                key="generation.max_new_tokens / the model's context length",
                where=where,
            )
        total = len(draft_ids)
        truncated = total > budget
        if truncated:
            # Cut whole tokens only. "left" keeps the end of the draft, where its final answer is.
            draft_ids = draft_ids[total - budget :] if self.template.truncation_side == "left" else draft_ids[:budget]
        ids = prefix + draft_ids + suffix
        return RefinementPrompt(
            token_ids=ids,
            draft_start=len(prefix),
            draft_end=len(prefix) + len(draft_ids),
            draft_tokens_before_truncation=total,
            truncated=truncated,
        )
