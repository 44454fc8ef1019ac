"""The format term: exactly what earns 1.0 (see rewards/format.py)."""

from __future__ import annotations

import pytest

from nemo_igrpo.rewards.format import format_reward

FORMAT_TABLE = [
    # (response, kwargs, expected)
    ("<think>add 5 and 7</think><answer>12</answer>", {}, 1.0),
    ("  <think>\nadd\n</think>\n\n<answer> 12 </answer>\n", {}, 1.0),
    ("<answer>12</answer>", {}, 0.0),  # think required by default
    ("<answer>12</answer>", {"require_think": False}, 1.0),
    ("<think>t</think><answer>12</answer>", {"require_think": False}, 1.0),
    ("<think>t<answer>12</answer>", {"require_think": False}, 0.0),  # unclosed think still wrong
    ("<think></think><answer>12</answer>", {}, 0.0),  # empty think
    ("<think>t</think><answer>  </answer>", {}, 0.0),  # empty answer
    ("<answer>12</answer><think>t</think>", {}, 0.0),  # wrong order
    ("Sure! <think>t</think><answer>12</answer>", {}, 0.0),  # text before
    ("<think>t</think> so <answer>12</answer>", {}, 0.0),  # text between
    ("<think>t</think><answer>12</answer> hope this helps", {}, 0.0),  # text after
    ("<think>t</think><answer>12</answer><|im_end|>", {"allow_text_after_answer": True}, 1.0),
    ("<think>t</think><answer>1</answer><answer>2</answer>", {}, 0.0),  # two answers
    ("<think>a</think><think>b</think><answer>2</answer>", {}, 0.0),  # two thinks
    ("<think>t</think><answer>12", {}, 0.0),  # cut off at the token limit
    ("", {}, 0.0),
    ("reasoning here</think><answer>12</answer>", {"think_opened_in_prompt": True}, 1.0),
    ("<think>t</think><answer>12</answer>", {"think_opened_in_prompt": True}, 0.0),
]


@pytest.mark.parametrize("response,kwargs,expected", FORMAT_TABLE)
def test_format_table(response, kwargs, expected):
    assert format_reward("q", response, None, **kwargs) == expected
