"""The demo's verifiable task: the larger of two two-digit numbers, answered as
`<answer>N</answer>` ("max(38,45)=" -> "<answer>45</answer>").

Why this task: math-verify checks it like any numeric answer, a model of half a million
parameters learns it on two CPU cores in minutes (the answer is a copy of one of the inputs,
which attention learns fast; two-digit addition from scratch took far longer), and it has a
natural systematic mistake that a warm-started model makes and reinforcement learning can
remove: comparing the last digits instead of the whole numbers (max(38,45) -> 38).
Everything is generated from a seed, so the data are identical on every machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def problem_text(a: int, b: int) -> str:
    return f"max({a},{b})="


def answer_text(value: int) -> str:
    return f"<answer>{value}</answer>"


def correct_answer(a: int, b: int) -> int:
    return max(a, b)


def units_digit_mistake(a: int, b: int) -> int:
    """The typical wrong answer: the number with the larger last digit (38 vs 45 -> 38)."""
    if a % 10 == b % 10:
        return max(a, b)
    return a if a % 10 > b % 10 else b


def is_tricky(a: int, b: int) -> bool:
    """Problems where the last-digit comparison gives the wrong answer (about half)."""
    return units_digit_mistake(a, b) != correct_answer(a, b)


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]


def split_pairs(seed: int, num_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint train / held-out problem sets (held-out problems are never trained on)."""
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    return pairs[num_eval:], pairs[:num_eval]


def write_jsonl(pairs: list[tuple[int, int]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"problem": problem_text(a, b), "answer": str(correct_answer(a, b))}) + "\n")
    return path


def write_demo_data(out_dir: Path, seed: int = 0, num_eval: int = 256) -> tuple[Path, Path]:
    train, held_out = split_pairs(seed, num_eval)
    return write_jsonl(train, out_dir / "train.jsonl"), write_jsonl(held_out, out_dir / "eval.jsonl")
