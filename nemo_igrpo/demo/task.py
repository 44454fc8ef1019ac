"""The demo's verifiable task: two-digit addition, answered as `<answer>N</answer>`.

Why this task: it is checkable by the same math-verify reward the paper uses, a model of a few
million parameters can learn it on two CPU cores in minutes, and it has a natural systematic
mistake (forgetting the carry) that a warm-started model makes and reinforcement learning can
remove. Everything is generated from a seed, so the data are identical on every machine.
"""
from __future__ import annotations

import json
import random
from pathlib import Path


def problem_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_text(value: int) -> str:
    return f"<answer>{value}</answer>"


def without_carry(a: int, b: int) -> int:
    """The typical wrong answer: add digit by digit and drop the carry (38+45 -> 73)."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def split_pairs(seed: int, num_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint train / held-out problem sets (held-out problems are never trained on)."""
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    return pairs[num_eval:], pairs[:num_eval]


def write_jsonl(pairs: list[tuple[int, int]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for a, b in pairs:
            f.write(json.dumps({"problem": problem_text(a, b), "answer": str(a + b)}) + "\n")
    return path


def write_demo_data(out_dir: Path, seed: int = 0, num_eval: int = 256) -> tuple[Path, Path]:
    train, held_out = split_pairs(seed, num_eval)
    return write_jsonl(train, out_dir / "train.jsonl"), write_jsonl(held_out, out_dir / "eval.jsonl")
