"""`math_accuracy`: 1.0 when the response's final answer equals the reference, else 0.0.

Two steps, both configurable through the term's kwargs:

1. Extract the final answer. `extract_from` lists the places to look, in order; the first that
   yields an answer wins:
   - "answer_tag": the content of the last <answer>...</answer> (the paper's template). If that
     content holds a \\boxed{...}, the boxed part is the answer.
   - "boxed": a \\boxed{...} or \\fbox{...} anywhere in the response; `boxed="last"` (default)
     or "first" picks which one when there are several.
   - "text": math-verify's own heuristics over the whole response (last number/expression).
     Off by default: it rewards numbers the model never committed to as its answer.
   No answer found -> 0.0.
2. Compare with the reference. Plain numbers on both sides ("12" vs 12, "12.0" vs "12") are
   compared exactly as decimals without sympy: the demo's integer task takes this path, and
   it is exact and fast. Anything else goes through math-verify (`parse` + `verify`, gold
   first because `verify` is not symmetric), which handles fractions/decimals, percent, sets,
   intervals, LaTeX variants, and units/text around the number.

Bounded cost: an extracted answer longer than `max_answer_chars` (1000) or with brackets
nested deeper than `max_nesting_depth` (30) scores 0.0 without parsing (no reference answer
looks like that, and sympy on a 10,000-character expression can take minutes); a number with
more than 10,000 digits (\\boxed{9^{9^{9^9}}}) is recognised from the parse tree and never
evaluated; math-verify's own signal-based timeouts bound parsing and comparison
(`parse_timeout_s`, `verify_timeout_s`, whole seconds). Those timeouts only work in a
process's main thread; elsewhere they are disabled and the caller must bound the time (the
RewardManager kills a worker that overruns `reward.timeout_s`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Optional, Sequence

# Imported at module level (not lazily) so that the RewardManager's forkserver, which preloads
# this module, hands every worker an already-imported sympy/math-verify.
import math_verify
from math_verify import ExprExtractionConfig, LatexExtractionConfig

from nemo_igrpo.rewards.registry import register_reward

EXTRACTION_SOURCES = ("answer_tag", "boxed", "text")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED_OPENERS = ("\\boxed{", "\\fbox{")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Math already delimited: an unescaped $ ("\\$" is a currency sign), \\( \\[ or a box.
_MATH_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
# Only so many candidate \boxed openers are tried when the chosen one is unbalanced (a cut-off
# response): each try scans forward, and this keeps a response full of "\boxed{" linear-ish.
_MAX_BOXED_TRIES = 4
# Numbers with more digits than this are not compared (see _has_huge_number).
_MAX_NUMBER_DIGITS = 10_000

# math-verify logs the whole input on a timeout; a 10,000-character answer would flood logs.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _balanced_content(text: str, open_brace: int) -> Optional[str]:
    """Content between text[open_brace] == '{' and its matching '}' (None if unbalanced)."""
    depth = 0
    for i in range(open_brace, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def extract_boxed(text: str, which: str = "last") -> Optional[str]:
    """The content of the first or last \\boxed{...} / \\fbox{...} with balanced braces."""
    if which not in ("first", "last"):
        raise ValueError(f"math_accuracy: boxed={which!r}: must be 'first' or 'last'")
    starts = sorted(
        {m.start() + len(opener) - 1 for opener in _BOXED_OPENERS for m in re.finditer(re.escape(opener), text)}
    )
    if which == "last":
        starts.reverse()
    for brace in starts[:_MAX_BOXED_TRIES]:
        content = _balanced_content(text, brace)
        if content is not None and content.strip():
            return content.strip()
    return None


def extract_answer_tag(text: str) -> Optional[str]:
    matches = _ANSWER_TAG.findall(text)
    if not matches or not matches[-1].strip():
        return None
    return matches[-1].strip()


def extract_answer(
    response: str, extract_from: Sequence[str] = ("answer_tag", "boxed"), boxed: str = "last"
) -> tuple[Optional[str], Optional[str]]:
    """(final answer text, the source that gave it), or (None, None).

    For "text" the answer is the whole response: math-verify's extraction picks the number.
    """
    for source in extract_from:
        if source == "answer_tag":
            content = extract_answer_tag(response)
            if content is not None:
                return extract_boxed(content, boxed) or content, source
        elif source == "boxed":
            content = extract_boxed(response, boxed)
            if content is not None:
                return content, source
        elif source == "text":
            if response.strip():
                return response, source
        else:
            raise ValueError(f"math_accuracy: extract_from entry {source!r} is not one of {EXTRACTION_SOURCES}")
    return None, None


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest


def _as_plain_number(text: str) -> Optional[Decimal]:
    stripped = text.strip().strip("$").strip()
    if not _PLAIN_NUMBER.fullmatch(stripped):
        return None
    try:
        return Decimal(stripped)
    except InvalidOperation:
        return None


def _reference_text(reference: Any) -> str:
    if isinstance(reference, bool) or reference is None:
        raise ValueError(f"math_accuracy: reference must be a number or a string, got {reference!r}")
    if isinstance(reference, (int, float, Decimal)):
        return str(reference)
    if isinstance(reference, str):
        return reference.strip()
    raise ValueError(f"math_accuracy: reference must be a number or a string, got {type(reference).__name__}")


def _timeouts_usable() -> bool:
    # math-verify's timeouts use signal.alarm, which Python allows only in the main thread.
    return threading.current_thread() is threading.main_thread()


def _parse(text: str, timeout_s: Optional[int], free_text: bool = False) -> list:
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    parse = math_verify.parse
    if free_text or _MATH_DELIMITED.search(text):
        return parse(text, extraction_config=configs, parsing_timeout=timeout_s)
    # A bare answer ("\frac{1}{2}", "[1, 2)", "50\%") is only recognised as LaTeX inside math
    # delimiters; wrapping keeps "12 apples"-style text working too (the number is found).
    parsed = parse(f"${text}$", extraction_config=configs, parsing_timeout=timeout_s)
    return parsed or parse(text, extraction_config=configs, parsing_timeout=timeout_s)


@lru_cache(maxsize=4096)
def _parse_reference(text: str, timeout_s: Optional[int]) -> list:
    # References repeat across the G samples of a group and across epochs.
    return _parse(text, timeout_s)


def _log10_magnitude(expr: Any) -> Optional[float]:
    """log10 |expr| for numbers and numeric power towers, without evaluating them; else None."""
    import sympy

    if isinstance(expr, sympy.Number):
        if expr == 0:
            return -math.inf
        if isinstance(expr, sympy.Integer):
            # Exact for any size: len(str(n)) would itself be slow on a huge integer.
            return (abs(int(expr)).bit_length() - 1) * math.log10(2)
        try:
            return math.log10(abs(float(expr)))
        except (OverflowError, ValueError):
            return None
    if isinstance(expr, sympy.Pow):
        base, exponent = _log10_magnitude(expr.base), _log10_magnitude(expr.exp)
        if base is None or exponent is None:
            return None
        if exponent > 300:  # the exponent alone has more than 300 digits
            return math.inf
        try:
            exponent_value = float(expr.exp)
        except (OverflowError, TypeError, ValueError):
            return None
        return exponent_value * base
    return None


def _has_huge_number(parsed: list, max_digits: int) -> bool:
    """Whether a parsed answer holds a number with more than `max_digits` digits.

    Such an answer (\\boxed{9^{9^{9^9}}}) cannot equal a reference of ordinary size, and sympy
    would try to evaluate it during comparison, holding a worker until the timeout kills it.
    """
    import sympy

    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        for node in sympy.preorder_traversal(item):
            if isinstance(node, sympy.Pow):
                magnitude = _log10_magnitude(node)
                if magnitude is not None and magnitude > max_digits:
                    return True
    return False


def answers_match(
    answer: str,
    reference: Any,
    *,
    parse_timeout_s: int = 2,
    verify_timeout_s: int = 2,
    float_rounding: int = 6,
    strict: bool = True,
    free_text: bool = False,
) -> bool:
    """Whether `answer` (an extracted answer, or a whole response when `free_text`) equals `reference`."""
    ref_text = _reference_text(reference)
    ans_number, ref_number = _as_plain_number(answer), _as_plain_number(ref_text)
    if ans_number is not None and ref_number is not None:
        return ans_number == ref_number
    verify = math_verify.verify
    use_timeouts = _timeouts_usable()
    parse_timeout = int(parse_timeout_s) if use_timeouts else None
    gold = _parse_reference(ref_text, parse_timeout)
    if not gold:
        raise ValueError(f"math_accuracy: math-verify cannot parse the reference {ref_text[:200]!r}")
    predicted = _parse(answer, parse_timeout, free_text)
    if not predicted:
        return False
    if _has_huge_number(predicted, max_digits=_MAX_NUMBER_DIGITS) and not _has_huge_number(gold, _MAX_NUMBER_DIGITS):
        return False
    return bool(
        verify(
            gold,
            predicted,
            float_rounding=float_rounding,
            strict=strict,
            timeout_seconds=int(verify_timeout_s) if use_timeouts else None,
        )
    )


@register_reward("math_accuracy")
def math_accuracy(
    prompt: str,
    response: str,
    reference: Any,
    *,
    extract_from: Sequence[str] = ("answer_tag", "boxed"),
    boxed: str = "last",
    max_answer_chars: int = 1000,
    max_nesting_depth: int = 30,
    parse_timeout_s: int = 2,
    verify_timeout_s: int = 2,
    float_rounding: int = 6,
    strict: bool = True,
) -> float:
    """1.0 if the extracted final answer equals `reference` (see the module docstring)."""
    if isinstance(extract_from, str):
        extract_from = (extract_from,)
    answer, source = extract_answer(response, extract_from, boxed)
    if answer is None:
        return 0.0
    if source != "text" and (len(answer) > max_answer_chars or _nesting_depth(answer) > max_nesting_depth):
        return 0.0
    matched = answers_match(
        answer,
        reference,
        parse_timeout_s=parse_timeout_s,
        verify_timeout_s=verify_timeout_s,
        float_rounding=float_rounding,
        strict=strict,
        free_text=source == "text",
    )
    return 1.0 if matched else 0.0


def _warm_up() -> None:
    # The first parse builds math-verify's regexes and the LaTeX parser (~0.5 s); doing it when
    # a worker starts keeps that cost out of the first sample's timeout.
    math_accuracy("", "<answer>\\frac{1}{2}</answer>", "0.5")


math_accuracy.warm_up = _warm_up  # type: ignore[attr-defined]
