"""`format`: 1.0 when the response follows the paper's template, else 0.0.

The paper's system prompt asks for `<think>...</think><answer>...</answer>`. With the default
kwargs a response earns 1.0 exactly when, after stripping leading/trailing whitespace, it is

    <think>T</think> (whitespace) <answer>A</answer>

where T and A contain at least one non-whitespace character, each tag appears exactly once, and
there is no other text before, between or after the two blocks. Everything else is 0.0:
a missing/empty/duplicated block, answer before think, prose around the blocks, an unclosed
tag (e.g. a response cut off at the token limit).

kwargs:
- require_think (default True): False also accepts a response that is just `<answer>A</answer>`
  (a think block, if present, must still be well formed). Small demo models often answer
  without thinking; this keeps the format term from being all-zero for them.
- think_opened_in_prompt (default False): the chat template already ends the prompt with
  `<think>` (DeepSeek-R1-style templates), so the response starts inside the think block:
  the expected shape is `T</think><answer>A</answer>`.
- allow_text_after_answer (default False): accept trailing text after `</answer>` (e.g. an
  end-of-turn marker the generation backend did not strip).
"""

from __future__ import annotations

import re

from nemo_igrpo.rewards.registry import register_reward

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK_THEN_ANSWER = re.compile(
    r"<think>(?P<think>.*)</think>\s*<answer>(?P<answer>.*)</answer>(?P<tail>.*)", re.DOTALL
)
_THINK_BODY_THEN_ANSWER = re.compile(r"(?P<think>.*)</think>\s*<answer>(?P<answer>.*)</answer>(?P<tail>.*)", re.DOTALL)
_ANSWER_ONLY = re.compile(r"<answer>(?P<answer>.*)</answer>(?P<tail>.*)", re.DOTALL)


def _tag_counts(text: str) -> dict[str, int]:
    return {tag: text.count(tag) for tag in _TAGS}


def format_ok(
    response: str,
    *,
    require_think: bool = True,
    think_opened_in_prompt: bool = False,
    allow_text_after_answer: bool = False,
) -> bool:
    text = response.strip()
    counts = _tag_counts(text)
    if counts["<answer>"] != 1 or counts["</answer>"] != 1:
        return False
    opened_think = 0 if think_opened_in_prompt else 1
    has_think = counts["</think>"] > 0
    if has_think or think_opened_in_prompt or require_think:
        if counts["<think>"] != opened_think or counts["</think>"] != 1:
            return False
        pattern = _THINK_BODY_THEN_ANSWER if think_opened_in_prompt else _THINK_THEN_ANSWER
        match = pattern.fullmatch(text)
        if match is None or not match.group("think").strip():
            return False
    else:
        if counts["<think>"] != 0:
            return False
        match = _ANSWER_ONLY.fullmatch(text)
        if match is None:
            return False
    if not match.group("answer").strip():
        return False
    return allow_text_after_answer or not match.group("tail").strip()


@register_reward("format")
def format_reward(
    prompt: str,
    response: str,
    reference: object,
    *,
    require_think: bool = True,
    think_opened_in_prompt: bool = False,
    allow_text_after_answer: bool = False,
) -> float:
    """1.0 for a well-formed `<think>..</think><answer>..</answer>` response (see module docstring)."""
    ok = format_ok(
        response,
        require_think=require_think,
        think_opened_in_prompt=think_opened_in_prompt,
        allow_text_after_answer=allow_text_after_answer,
    )
    return 1.0 if ok else 0.0
