"""Training-step throughput of MegatronActor vs Hugging Face transformers on the same shape.

Both sides start from the same HF checkpoint (a random Llama of the chosen shape), see the same
token batch, compute the same policy loss (nemo_igrpo's PolicyLoss over the response tokens:
log-probs of the sampled tokens, clipped ratio against fixed old log-probs, advantages), clip
gradients at 1.0 and take an AdamW step. Steps alternate actor / HF in one process (so machine
noise hits both alike); the first --warmup steps of each are dropped; medians are reported.

    python bench/actor_vs_hf.py                   # CPU: ratio of tokens/s (actor / HF)
    python bench/actor_vs_hf.py --device cuda --preset qwen2.5-1.5b
        # GPU: tokens/s, model TFLOP/s and MFU against the measured ~790 TFLOP/s bf16 peak of an H100

Model FLOPs per token = 6 x (matmul parameters, LM head included, embedding lookup excluded)
+ 6 x layers x hidden x seq (causal attention scores and values, fwd + bwd).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

PRESETS = {
    # CPU default: small enough for a few minutes on 2 cores, head_dim 64 like the real models.
    "cpu-small": dict(
        hidden=256, layers=4, heads=4, kv_heads=2, ffn=1024, vocab=128, seq=256, batch=8, dtype="float32"
    ),
    # The shape of reference/environment.md's H100 measurements (random weights).
    "qwen2.5-1.5b": dict(
        hidden=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936, seq=2048, batch=4, dtype="bfloat16"
    ),
    "qwen2.5-0.5b": dict(
        hidden=896, layers=24, heads=14, kv_heads=2, ffn=4864, vocab=151936, seq=2048, batch=8, dtype="bfloat16"
    ),
}


def model_flops_per_step(shape: dict, tokens: int) -> float:
    h, L, f, v, s = shape["hidden"], shape["layers"], shape["ffn"], shape["vocab"], shape["seq"]
    kv_dim = h // shape["heads"] * shape["kv_heads"]
    per_layer = h * h + 2 * h * kv_dim + h * h + 3 * h * f  # q, k, v, o, gate/up/down
    matmul_params = L * per_layer + h * v  # + LM head
    return 6.0 * matmul_params * tokens + 6.0 * L * h * s * tokens


def make_model(shape: dict, seed: int) -> Path:
    from nemo_igrpo.utils.tiny_model import make_tiny_hf_model
    import os

    name = "-".join(f"{k}{v}" for k, v in shape.items() if k not in ("seq", "batch"))
    out = C.CACHE_DIR / "models" / f"actor-vs-hf-{name}-s{seed}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        make_tiny_hf_model(
            tmp,
            arch="llama",
            num_layers=shape["layers"],
            hidden_size=shape["hidden"],
            intermediate_size=shape["ffn"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            vocab_size=shape["vocab"],
            max_position_embeddings=max(shape["seq"], 512),
            seed=seed,
            dtype=shape["dtype"],
        )
        os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="model shape (default: cpu-small, or qwen2.5-1.5b on cuda)"
    )
    p.add_argument("--seq", type=int, help="override the preset's sequence length")
    p.add_argument("--batch", type=int, help="override the preset's sequences per step")
    p.add_argument("--steps", type=int, default=8, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="dropped steps per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default bench/results/actor_vs_hf[_cuda].json)")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    preset = args.preset or ("qwen2.5-1.5b" if args.device == "cuda" else "cpu-small")
    shape = dict(PRESETS[preset])
    if args.seq:
        shape["seq"] = args.seq
    if args.batch:
        shape["batch"] = args.batch
    machine = C.machine_info(args.device)
    torch.manual_seed(args.seed)
    hf_dir = make_model(shape, args.seed)
    params = C.param_count(hf_dir)

    from nemo_igrpo.algorithms.config import AlgorithmConfig
    from nemo_igrpo.batch import LossInputs, LossNormalizer
    from nemo_igrpo.algorithms.losses import make_loss_fn
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.batch import TrainSample
    from nemo_igrpo.policy.config import ModelConfig, OptimizerConfig, PolicyConfig

    B, T = shape["batch"], shape["seq"]
    tokens_per_step = B * T
    response_start = T // 2  # half prompt, half response: only response tokens are scored
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, min(shape["vocab"], 100), (B, T), generator=gen)  # printable chars, no specials
    advantages = torch.randn(B, generator=gen)
    resp_len = T - response_start
    bf16 = shape["dtype"] == "bfloat16"
    lr = 1e-5
    loss_fn = make_loss_fn(AlgorithmConfig())

    # --- Hugging Face side --------------------------------------------------------------
    from transformers import AutoModelForCausalLM

    dev = torch.device(args.device)
    hf = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa"
    ).to(dev)
    hf.train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids_dev = ids.to(dev)
    targets = ids_dev[:, response_start:]
    with torch.no_grad():
        logits = hf(input_ids=ids_dev).logits[:, response_start - 1 : -1].float()
        old_lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, R]
        del logits
    old_lp_cpu = old_lp.cpu()
    norm = LossNormalizer(num_tokens=float(B * resp_len), num_seqs=float(B), max_response_length=resp_len)
    seq_ids = torch.arange(B, device=dev).repeat_interleave(resp_len)

    def hf_step() -> float:
        t0 = time.perf_counter()
        hf_opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=ids_dev).logits[:, response_start - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        inputs = LossInputs(
            logprobs=lp.reshape(-1),
            old_logprobs=old_lp.reshape(-1),
            advantages=advantages.to(dev).repeat_interleave(resp_len),
            seq_ids=seq_ids,
            num_seqs=B,
        )
        loss, _ = loss_fn(inputs, norm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # --- MegatronActor side -------------------------------------------------------------
    cfg = PolicyConfig(
        model=ModelConfig(hf_path=str(hf_dir)),
        precision="bf16" if bf16 else "fp32",
        max_tokens_per_microbatch=tokens_per_step,  # one micro-batch, like the HF side
        optimizer=OptimizerConfig(lr=lr, warmup_ratio=0.0, min_lr_ratio=1.0, clip_grad=1.0),
    )
    actor = MegatronActor(cfg, seed=args.seed, total_steps=10_000)
    samples = [
        TrainSample(
            token_ids=ids[i].tolist(),
            response_start=response_start,
            advantage=float(advantages[i]),
            old_logprobs=old_lp_cpu[i].clone(),
        )
        for i in range(B)
    ]

    def actor_step() -> float:
        t0 = time.perf_counter()
        actor.train_step(samples, loss_fn)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # --- interleaved measurement ----------------------------------------------------------
    times = {"actor": [], "hf": []}
    peaks = {}
    for i in range(args.warmup + args.steps):
        for name, fn in (
            (("actor", actor_step), ("hf", hf_step)) if i % 2 == 0 else (("hf", hf_step), ("actor", actor_step))
        ):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = fn()
            if dev.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            if i >= args.warmup:
                times[name].append(dt)
        print(f"  round {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}", flush=True)

    res = {}
    flops = model_flops_per_step(shape, tokens_per_step)
    for name in ("actor", "hf"):
        step_s = C.median(times[name])
        res[name] = {
            "step_s": step_s,
            "step_s_min_max": list(C.spread(times[name])),
            "tokens_per_s": tokens_per_step / step_s,
            "all_step_s": times[name],
        }
        if dev.type == "cuda":
            res[name]["model_tflops"] = flops / step_s / 1e12
            res[name]["mfu_vs_790"] = res[name]["model_tflops"] / C.H100_BF16_PEAK_TFLOPS
            res[name]["peak_allocated_gib"] = peaks.get(name)
    ratio = res["actor"]["tokens_per_s"] / res["hf"]["tokens_per_s"]

    title = (
        f"MegatronActor vs HF transformers train step ({preset}: {params / 1e6:.2f}M params, batch {B} x seq {T}, "
        f"{shape['dtype']}, {args.device}; {args.steps} steps each, medians)"
    )
    header = ["impl", "step (s)", "tokens/s"]
    rows = [[n, res[n]["step_s"], res[n]["tokens_per_s"]] for n in ("actor", "hf")]
    if dev.type == "cuda":
        header += ["model TFLOP/s", "MFU (790)", "peak GiB"]
        for r, n in zip(rows, ("actor", "hf")):
            r += [res[n]["model_tflops"], res[n]["mfu_vs_790"], res[n]["peak_allocated_gib"]]
    C.print_table(title, header, rows)
    print(f"tokens/s ratio actor / HF: {ratio:.3f}")
    C.write_json(
        "actor_vs_hf" + ("_cuda" if dev.type == "cuda" else ""),
        {
            "benchmark": "actor_vs_hf",
            "command": "python bench/actor_vs_hf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine,
            "load_at_end": C.other_load(),
            "settings": {
                "preset": preset,
                "shape": shape,
                "params": params,
                "tokens_per_step": tokens_per_step,
                "steps": args.steps,
                "warmup": args.warmup,
                "model_flops_per_step": flops,
                "actor_transformer_impl": getattr(actor, "transformer_impl", None),
            },
            "results": res,
            "tokens_per_s_ratio_actor_over_hf": ratio,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
