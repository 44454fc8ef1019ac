"""The GPU checks that bench/gpu_check.py runs, one per process (each writes one JSON file).

    python bench/gpu_check_steps.py make-model OUT_DIR
    python bench/gpu_check_steps.py te-step --hf DIR --impl local|transformer_engine --fp8 none|tensorwise|delayed --out J
    python bench/gpu_check_steps.py generate --hf DIR --out J

A fresh process per variant: TransformerEngine's FP8 state, megatron's parallel state and the CUDA
allocator are process-wide, so separate processes keep the variants from influencing each other,
and lets gpu_check run the four training variants side by side on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The Qwen2.5-1.5B shape (reference/environment.md's H100 measurements) with 4 of its 28 layers:
# every matrix has the real width (the FP8 GEMMs and attention kernels see real sizes) and the
# vocabulary is the real 151,936, but four layers keep the four variants within the time budget.
SHAPE = dict(hidden=1536, layers=4, heads=12, kv_heads=2, ffn=8960, vocab=151936)
if os.environ.get("GPU_CHECK_SMOKE_SHAPE"):  # a CPU smoke test of this script only
    SHAPE = dict(hidden=128, layers=2, heads=2, kv_heads=1, ffn=256, vocab=512)
BATCH, SEQ = 4, 1024  # 4,096 tokens per step, a multiple of 16 as FP8 GEMMs require
LR = 1e-7  # tiny: step 2 sees (nearly) the same weights as step 1, so both steps are comparable
STEPS = 2


def make_model(out: Path) -> Path:
    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    make_tiny_hf_model(
        tmp,
        arch="qwen2",
        num_layers=SHAPE["layers"],
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["ffn"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv_heads"],
        vocab_size=SHAPE["vocab"],
        max_position_embeddings=2 * SEQ,
        seed=0,
        dtype="bfloat16",
    )
    tmp.rename(out)
    return out


def nll_loss(inputs, norm):
    """Mean negative log-likelihood of the response tokens. The policy-gradient loss is not
    used here: on a first step its ratio is exactly 1 whatever the model computes (old
    log-probs = current), so its value could not tell two implementations apart; the
    likelihood goes through the same train_step path (packing, log-probs, backward, clipping,
    AdamW) and depends on every weight."""
    return -inputs.logprobs.sum() / max(norm.num_tokens, 1.0), {}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():  # CPU runs of these steps are for smoke-testing the script only
        torch.cuda.synchronize()


def te_step(args) -> dict:
    import torch

    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.batch import TrainSample
    from nemo_igrpo.policy.config import ModelConfig, OptimizerConfig, PolicyConfig

    fp8 = None if args.fp8 == "none" else args.fp8
    cfg = PolicyConfig(
        model=ModelConfig(hf_path=args.hf, transformer_impl=args.impl),
        precision="bf16",
        fp8=fp8,
        max_tokens_per_microbatch=BATCH * SEQ,
        optimizer=OptimizerConfig(lr=LR, warmup_ratio=0.0, min_lr_ratio=1.0, clip_grad=1.0),
    )
    t0 = time.perf_counter()
    actor = MegatronActor(cfg, seed=0, total_steps=100)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)  # the same samples in every variant
    ids = torch.randint(4, min(30000, SHAPE["vocab"]), (BATCH, SEQ), generator=gen)
    samples = [TrainSample(token_ids=ids[i].tolist(), response_start=SEQ // 2, advantage=1.0) for i in range(BATCH)]
    steps = []
    for _ in range(STEPS):
        _sync()
        t = time.perf_counter()
        r = actor.train_step(samples, nll_loss)
        _sync()
        steps.append(
            {
                "loss": r["loss"],
                "grad_norm": r["grad_norm"],
                "skipped": r.get("skipped", 0.0),
                "step_s": time.perf_counter() - t,
            }
        )
    return {
        "impl": actor.transformer_impl,
        "requested_impl": args.impl,
        "fp8": fp8,
        "shape": SHAPE,
        "batch": BATCH,
        "seq": SEQ,
        "build_s": build_s,
        "steps": steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


PROMPTS = ["What is 17 + 25?", "Name a primary colour.", "Write one sentence about the sea.", "What is 9 times 7?"]


def generate(args) -> dict:
    from nemo_igrpo.generation.config import GenerationConfig
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.generation.interface import SamplingParams
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.policy.config import ModelConfig, PolicyConfig

    actor = MegatronActor(PolicyConfig(model=ModelConfig(hf_path=args.hf), precision="bf16"), seed=0, total_steps=1)
    device = next(actor.model_chunks[0].parameters()).device
    gcfg = GenerationConfig(backend="megatron", temperature=0.7, max_new_tokens=args.max_new_tokens)
    backend = build_generation_backend(gcfg, args.hf, seed=1234, actor=actor)
    tok = actor.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in PROMPTS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=args.max_new_tokens, n=2, seed=1234)
    _sync()
    t0 = time.perf_counter()
    first = backend.generate(prompts, params)
    _sync()
    gen_s = time.perf_counter() - t0
    again = backend.generate(prompts, params)  # same request seed: the same tokens
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(args.hf).vocab_size)  # the real vocabulary, not a padded one
    problems = []
    n_tokens = 0
    for per_prompt, per_prompt2 in zip(first, again):
        if len(per_prompt) != params.n:
            problems.append(f"{len(per_prompt)} samples for n={params.n}")
        for r, r2 in zip(per_prompt, per_prompt2):
            n_tokens += len(r.token_ids)
            if not r.token_ids:
                problems.append("an empty completion")
            if len(r.token_ids) > params.max_new_tokens:
                problems.append(f"{len(r.token_ids)} tokens > max_new_tokens")
            if any(not (0 <= t < vocab) for t in r.token_ids):
                problems.append("a token id outside the vocabulary")
            if any(not math.isfinite(lp) or lp > 1e-3 for lp in r.logprobs):
                problems.append("a log-prob that is not finite or is > 0")
            if r.token_ids != r2.token_ids:
                problems.append("the same seed gave different tokens")
    sample = first[0][0]
    return {
        "device": str(device),
        "impl": actor.transformer_impl,
        "temperature": 0.7,
        "prompts": len(prompts),
        "n": params.n,
        "tokens": n_tokens,
        "generate_s": gen_s,
        "tokens_per_s": n_tokens / gen_s if gen_s else None,
        "mean_logprob": sum(sum(r.logprobs) for p in first for r in p) / max(n_tokens, 1),
        "example": {"prompt": PROMPTS[0], "completion": sample.text[:200]},
        "problems": sorted(set(problems)),
        "ok": device.type == "cuda" and not problems,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    t = sub.add_parser("te-step")
    t.add_argument("--hf", required=True)
    t.add_argument("--impl", choices=["local", "transformer_engine"], required=True)
    t.add_argument("--fp8", choices=["none", "tensorwise", "delayed"], default="none")
    t.add_argument("--out", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--hf", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "make-model":
        print(make_model(Path(args.out)))
        return 0
    result = te_step(args) if args.cmd == "te-step" else generate(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
