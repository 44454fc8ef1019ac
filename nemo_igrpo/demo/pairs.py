"""The second demo task, `igrpo demo --task max2`: two max problems in one prompt, a two-part
answer, and a graded reward (the fraction of the parts that are right).

    "max(38,45),max(12,71)="  ->  "<answer>45,71</answer>"      reward 1.0
                                  "<answer>38,71</answer>"      reward 0.5 (first part wrong)

Why this task (the max(a, b) demo cannot show what refinement adds): there the best of four
drafts is almost always fully right, the refinements copy it, and most refinement groups have
zero reward variance, so the refinement stage removes learning signal. Here

- a draft is often *partly* right: each part carries the warm start's last-digit blind spot on
  its own, so the best draft frequently has one part right and one wrong. It carries
  information a refinement can use (keep the right part) without being the answer;
- the reward is graded (the paper names graded rewards as open), so a refinement group that
  improves or damages one part has reward variance even when no sample is fully right;
- it stays cheap: the warm start fine-tunes the max demo's shipped model (which already knows
  the answer format and the comparison, blind spot included) on the two-part format, a few
  minutes on two CPU cores (warm_start_pairs).

Correctness (held-out accuracy, `correct` in the metrics) is "both parts right": the reward
manager counts a sample correct when the correctness term is > 0.5, and with two parts only
1.0 is. The held-out problems combine only held-out max pairs, never trained on.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from nemo_igrpo.demo.task import correct_answer, split_pairs

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

Pair = tuple[int, int]


def problem_text(p: Pair, q: Pair) -> str:
    return f"max({p[0]},{p[1]}),max({q[0]},{q[1]})="


def answer_text(x: int, y: int) -> str:
    return f"<answer>{x},{y}</answer>"


def reference_text(p: Pair, q: Pair) -> str:
    return f"{correct_answer(*p)},{correct_answer(*q)}"


def parts_fraction(prompt: str, response: str, reference, **kwargs) -> float:
    """Graded reward: the fraction of the reference's comma-separated parts that the response's
    last `<answer>` gets right, position by position; 0 without an answer tag or with a different
    number of parts (a malformed answer earns nothing, so the format cannot be traded away)."""
    found = _ANSWER.findall(response)
    if not found:
        return 0.0
    got = [x.strip() for x in found[-1].split(",")]
    want = [x.strip() for x in str(reference).split(",")]
    if len(got) != len(want) or not want:
        return 0.0
    return sum(g == w for g, w in zip(got, want)) / len(want)


def make_problems(pairs: list[Pair], count: int, seed: int) -> list[tuple[Pair, Pair]]:
    """`count` two-part problems drawn from `pairs` (with replacement, the two parts distinct)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        p, q = rng.choice(pairs), rng.choice(pairs)
        if p != q:
            out.append((p, q))
    return out


def write_jsonl(problems: list[tuple[Pair, Pair]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p, q in problems:
            f.write(json.dumps({"problem": problem_text(p, q), "answer": reference_text(p, q)}) + "\n")
    return path


def write_pairs_data(
    out_dir: Path, seed: int = 0, num_eval_pairs: int = 256, num_train: int = 8000, num_eval: int = 256
) -> tuple[Path, Path]:
    """Train problems from the max demo's training pairs, held-out problems from its held-out
    pairs (the same split, so the warm start, fine-tuned from the max model, never saw them)."""
    train_pairs, held_pairs = split_pairs(seed, num_eval_pairs)
    train = make_problems(train_pairs, num_train, seed + 1)
    held = make_problems(held_pairs, num_eval, seed + 2)
    return write_jsonl(train, out_dir / "train.jsonl"), write_jsonl(held, out_dir / "eval.jsonl")
