"""Warm start for the demo: a short supervised run that teaches a tiny random model the task's
format and a *systematic mistake*, so that reinforcement learning has something to fix.

The supervised labels compare last digits instead of whole numbers on a fixed fraction of the
problems where that matters (max(38,45) -> 38). The warm-started model therefore answers those
problems correctly only part of the time, like a real model with a blind spot; the reward (math-verify
on the `<answer>` tag) tells right from wrong, and iGRPO must raise single-shot accuracy.

A quarter of the supervised prompts carry a prior draft (right or wrong, chosen at random and
independent of the label) in the same template the refinement stage uses, so the model has
seen that prompt shape before iGRPO starts; it is not taught to use the draft.

The result is cached under a key of every setting below. Training it takes tens of minutes on two
CPU cores, so the repository ships the result of
`python -m nemo_igrpo.demo.warm_start` (nemo_igrpo/demo/assets/warmstart-<key>/, 1.9 MB) and
the demo copies it when its key matches these settings; with other settings, or with the
asset deleted, the demo trains it here (slow but identical code).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nemo_igrpo.demo.task import answer_text, correct_answer, is_tricky, problem_text, split_pairs, units_digit_mistake

ASSETS = Path(__file__).resolve().parent / "assets"
# conf/demo.yaml's algorithm.template.draft_wrapper: the draft first, so a refinement prompt ends
# exactly like a plain one ("max(38,45)=") and the tiny model's continuation context is the same.
DEMO_DRAFT_WRAPPER = "Draft: {draft}\n{prompt}"


@dataclass(frozen=True)
class WarmStartConfig:
    seed: int = 0
    num_layers: int = 3
    hidden_size: int = 128  # 2 heads of 64: the head size vLLM's CPU attention supports
    intermediate_size: int = 256
    steps: int = 1200
    batch_size: int = 32
    lr: float = 1e-3
    mistake_rate: float = 0.7  # fraction of tricky problems labelled with the last-digit mistake
    draft_prompt_fraction: float = 0.25
    num_eval: int = 256  # held-out problems, excluded from the supervised data


def cache_key(cfg: WarmStartConfig, chat_prefix: str) -> str:
    blob = json.dumps({**asdict(cfg), "template": chat_prefix, "task": "max", "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _label(a: int, b: int, rng: random.Random, error_rate: float) -> int:
    if is_tricky(a, b) and rng.random() < error_rate:
        return units_digit_mistake(a, b)
    return correct_answer(a, b)


def supervised_step(model, opt, sched, ids: list[list[int]], labels: list[list[int]], pad_id: int, device):
    """One optimizer step of next-token loss on right-padded rows (label -100: not trained).
    Shared by the warm starts of both demo tasks; returns the loss tensor."""
    import torch  # lazily, like the rest of this module: `igrpo demo` with a cached asset needs no training

    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id)
    label_t = torch.full((len(ids), width), -100)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        label_t[i, : len(y)] = torch.tensor(y)
        attn[i, : len(x)] = 1
    loss = model(input_ids=input_ids.to(device), attention_mask=attn.to(device), labels=label_t.to(device)).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def warm_start(out_root: Path, cfg: WarmStartConfig, build_prompt, log=print) -> Path:
    """Train (or reuse) the warm-start model; returns its HF directory.

    `build_prompt(problem, draft_or_None) -> str` renders a prompt exactly as the trainer does
    (chat template, draft wrapper), so supervised and RL prompts match token for token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model

    key = cache_key(cfg, build_prompt("max(1,2)=", None) + "|" + build_prompt("max(1,2)=", "d"))
    out_dir = Path(out_root) / f"warmstart-{key}"
    if (out_dir / "WARM_START_DONE").exists():
        log(f"[demo] warm start: reusing cached model {out_dir}")
        return out_dir
    shipped = ASSETS / f"warmstart-{key}"
    if (shipped / "WARM_START_DONE").exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.copytree(shipped, out_dir)
        log(
            f"[demo] warm start: using the shipped model {shipped.name} (made by `python -m nemo_igrpo.demo.warm_start`)"
        )
        return out_dir
    start = time.time()
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    make_tiny_hf_model(
        tmp_dir,
        arch="llama",
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=512,
        seed=cfg.seed,
    )
    tok = AutoTokenizer.from_pretrained(tmp_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32).to(device)
    model.train()
    train_pairs, _ = split_pairs(cfg.seed, cfg.num_eval)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / cfg.steps))
    eos = tok.eos_token
    for step in range(cfg.steps):
        ids, labels = [], []
        for _ in range(cfg.batch_size):
            a, b = rng.choice(train_pairs)
            draft = None
            if rng.random() < cfg.draft_prompt_fraction:
                draft = answer_text(correct_answer(a, b) if rng.random() < 0.5 else units_digit_mistake(a, b))
            prompt = tok.encode(build_prompt(problem_text(a, b), draft), add_special_tokens=False)
            target = tok.encode(answer_text(_label(a, b, rng, cfg.mistake_rate)) + eos, add_special_tokens=False)
            ids.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        loss = supervised_step(model, opt, sched, ids, labels, tok.pad_token_id, device)
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"[demo] warm start step {step + 1}/{cfg.steps}: loss {loss.item():.4f}")
    model.to("cpu").save_pretrained(tmp_dir, safe_serialization=True)
    (tmp_dir / "WARM_START_DONE").write_text(json.dumps(asdict(cfg)))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    log(f"[demo] warm start done in {time.time() - start:.0f} s -> {out_dir}")
    return out_dir


def main() -> None:
    """Regenerate the shipped warm-start asset: `python -m nemo_igrpo.demo.warm_start [--out DIR]`.

    Needs only torch and transformers (it runs on a bare GPU machine). The prompt settings are
    conf/demo.yaml's (no system prompt, the default draft wrapper); the cache key records the
    rendered prompts, so a mismatch with the config makes the demo retrain instead of reusing.
    """
    import argparse
    import tempfile

    from nemo_igrpo.algorithms.config import DraftTemplateConfig
    from nemo_igrpo.algorithms.templates import PromptBuilder, fill_wrapper
    from nemo_igrpo.utils.tiny_model import make_char_tokenizer

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    template = DraftTemplateConfig(system_prompt=None, draft_wrapper=DEMO_DRAFT_WRAPPER)
    with tempfile.TemporaryDirectory() as tmp:
        builder = PromptBuilder(
            make_char_tokenizer(Path(tmp) / "tok"),
            template,
            max_prompt_tokens=160,
            max_new_tokens=24,
            apply_chat_template=False,
        )

        def render(problem, draft):
            return builder.render(problem if draft is None else fill_wrapper(template.draft_wrapper, problem, draft))

        print(warm_start(Path(args.out), WarmStartConfig(seed=args.seed), render))


if __name__ == "__main__":
    main()
