"""Warm start of the two-part task (pairs.py): fine-tune the max demo's warm-start model on the
two-part format, each part labelled independently with the last-digit mistake on a fraction of
its tricky problems, so that drafts are often partly right.

Starting from the max model (not from random weights) is what makes this cheap: it already
knows `<answer>`, digits and the comparison, so a few hundred supervised steps teach the
two-part layout (minutes on two CPU cores instead of tens of minutes). As in warm_start.py, a
quarter of the prompts carry a prior draft (each part right or wrong at random, independent of
the label) in the refinement template, so the prompt shape is familiar but its use is not taught.

Cached under a key of every setting and of the base model's key; `python -m
nemo_igrpo.demo.warm_start_pairs` writes it into nemo_igrpo/demo/assets/ to ship it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nemo_igrpo.demo.pairs import answer_text, problem_text
from nemo_igrpo.demo.task import correct_answer, is_tricky, split_pairs, units_digit_mistake
from nemo_igrpo.demo.warm_start import ASSETS, supervised_step


@dataclass(frozen=True)
class PairsWarmStartConfig:
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    # Per part. Higher than the max demo's 0.7 so that a fully right two-part draft is the
    # exception on tricky parts: the best of N drafts is then often partly right.
    mistake_rate: float = 0.8
    draft_prompt_fraction: float = 0.25
    num_eval: int = 256  # held-out max pairs (the max demo's split), excluded from training


def cache_key(cfg: PairsWarmStartConfig, base_dir: Path, chat_prefix: str) -> str:
    blob = json.dumps(
        {**asdict(cfg), "base": Path(base_dir).name, "template": chat_prefix, "task": "max2", "version": 1},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _part(a: int, b: int, rng: random.Random, rate: float) -> int:
    if is_tricky(a, b) and rng.random() < rate:
        return units_digit_mistake(a, b)
    return correct_answer(a, b)


def warm_start_pairs(out_root: Path, base_dir: Path, cfg: PairsWarmStartConfig, build_prompt, log=print) -> Path:
    """Fine-tune (or reuse) the two-part model from the max model in `base_dir`; returns its HF dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = problem_text((1, 2), (3, 4))
    key = cache_key(cfg, base_dir, build_prompt(example, None) + "|" + build_prompt(example, "d"))
    out_dir = Path(out_root) / f"warmstart-max2-{key}"
    if (out_dir / "WARM_START_DONE").exists():
        log(f"[demo] warm start (max2): reusing cached model {out_dir}")
        return out_dir
    shipped = ASSETS / out_dir.name
    if (shipped / "WARM_START_DONE").exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(shipped, out_dir)
        log(f"[demo] warm start (max2): using the shipped model {shipped.name}")
        return out_dir
    start = time.time()
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.copytree(base_dir, tmp_dir)
    (tmp_dir / "WARM_START_DONE").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(tmp_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32)
    model.train()
    train_pairs, _ = split_pairs(cfg.seed, cfg.num_eval)
    rng = random.Random(cfg.seed + 17)
    torch.manual_seed(cfg.seed + 17)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.steps))
    eos = tok.eos_token
    for step in range(cfg.steps):
        ids, labels = [], []
        for _ in range(cfg.batch_size):
            p, q = rng.choice(train_pairs), rng.choice(train_pairs)
            draft = None
            if rng.random() < cfg.draft_prompt_fraction:
                # Each part of the shown draft right or mistaken at random, independent of the label.
                parts = [correct_answer(*x) if rng.random() < 0.5 else units_digit_mistake(*x) for x in (p, q)]
                draft = answer_text(*parts)
            prompt = tok.encode(build_prompt(problem_text(p, q), draft), add_special_tokens=False)
            target = tok.encode(
                answer_text(_part(*p, rng, cfg.mistake_rate), _part(*q, rng, cfg.mistake_rate)) + eos,
                add_special_tokens=False,
            )
            ids.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        loss = supervised_step(model, opt, sched, ids, labels, tok.pad_token_id, "cpu")
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"[demo] warm start (max2) step {step + 1}/{cfg.steps}: loss {loss.item():.4f}")
    model.save_pretrained(tmp_dir, safe_serialization=True)
    (tmp_dir / "WARM_START_DONE").write_text(json.dumps(asdict(cfg)))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    log(f"[demo] warm start (max2) done in {time.time() - start:.0f} s -> {out_dir}")
    return out_dir


def main() -> None:
    """Regenerate the shipped asset: `python -m nemo_igrpo.demo.warm_start_pairs [--out DIR]`.
    Builds (or reuses) the max demo's warm start and the two-part model with conf/demo_max2.yaml's
    prompt settings in a cache, then copies the two-part model into --out (default: the assets)."""
    import argparse

    from nemo_igrpo.demo.run import DEFAULT_CACHE, TASKS, prepare_demo

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    args = p.parse_args()
    model = Path(
        next(
            o for o in prepare_demo("max2", TASKS["max2"], args.cache_dir) if o.startswith("policy.model.hf_path=")
        ).split("=", 1)[1]
    )
    target = Path(args.out) / model.name
    if target.resolve() != model.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model, target)
    print(target)


if __name__ == "__main__":
    main()
