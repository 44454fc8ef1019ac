"""iGRPO (N drafts + G refinements) vs GRPO (0 + N+G) at a matched generation budget.

Both arms generate N+G completions per prompt from the same model, data, seed and machine;
iGRPO spends N of them on drafts (no gradient) and trains on the G refinements, GRPO trains on
all N+G. Each run is a separate `python -m nemo_igrpo train` process; runs are interleaved
A B A B ... so slow drifts of a shared machine hit both arms alike. Step 1 of every run is a
warm-up (vLLM's first batch, allocator growth) and is dropped. Reported per arm: the median
step time over all kept steps of all runs, per-phase medians, throughput, and the peak memory
of the whole process tree (trainer + vLLM engine core + reward workers), as a median over runs.
Ratios are iGRPO / GRPO.

    python bench/igrpo_vs_grpo.py                      # CPU default: tiny random Llama, 2 pairs
    python bench/igrpo_vs_grpo.py --pairs 3 --steps 8  # more samples
    python bench/igrpo_vs_grpo.py --set generation.vllm.enable_prefix_caching=false   # an A/B of a knob

Long, variable-length responses (the case where a few long drafts hold the draft/refinement
barrier): `--max-new-tokens 192 --stop-chars xq` lets the random tiny model stop whenever it
samples one of those characters (~1/64 per token), so lengths are roughly geometric, capped at
192. `--rollout-only` then measures generation alone, in one process and one vLLM engine with
fixed weights: iGRPO with the barrier (algorithm.pipeline_refinements=false), iGRPO pipelined
(refinements submitted per prompt as its drafts are scored) and GRPO, the three arms rotated
step by step on the same prompts:

    python bench/igrpo_vs_grpo.py --rollout-only --max-new-tokens 192 --stop-chars xq --steps 8
    python bench/igrpo_vs_grpo.py --max-new-tokens 192 --stop-chars xq --pairs 2 --steps 6   # step times

On a GPU machine pass --model <HF dir of a >= 0.5B model> and the GPU config overrides
(e.g. --config conf/base.yaml --set policy.precision=bf16 ...); see bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ROLLOUT_PHASES, TRAIN_PHASES, PHASE_LABELS, step_phases = (
    C.ROLLOUT_PHASES,
    C.TRAIN_PHASES,
    C.PHASE_LABELS,
    C.step_phases,
)


def build_arms(args) -> dict[str, list[str]]:
    budget = args.drafts + args.refinements
    arms = {
        "igrpo": [f"algorithm.num_drafts={args.drafts}", f"algorithm.num_refinements={args.refinements}"],
        "grpo": ["algorithm.num_drafts=0", f"algorithm.num_refinements={budget}"],
    }
    if args.barrier_arm:
        arms["igrpo_barrier"] = arms["igrpo"] + ["algorithm.pipeline_refinements=false"]
    return arms


def rollout_only(args, model_dir: Path, train_path: Path) -> dict:
    """Generation (and rewards) of the three arms in one process on one engine, fixed weights."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from nemo_igrpo.algorithms.rollout import IGRPORollout
    from nemo_igrpo.config.loader import load_config
    from nemo_igrpo.data.datasets import load_problems
    from nemo_igrpo.generation.factory import build_generation_backend
    from nemo_igrpo.rewards.manager import RewardManager

    cfg = load_config(
        args.config, common_overrides(args, model_dir, train_path) + ["data.eval_path=null"] + list(args.set)
    )
    budget = args.drafts + args.refinements
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    problems = load_problems(train_path, cfg.data.prompt_key, cfg.data.answer_key)
    backend = build_generation_backend(cfg.generation, str(model_dir), seed=cfg.seed)
    rewards = RewardManager(cfg.reward)
    igrpo = replace(cfg.algorithm, num_drafts=args.drafts, num_refinements=args.refinements)
    arms = {  # name -> (algorithm config, pipeline_refinements)
        "igrpo_barrier": (igrpo, False),
        "igrpo_pipelined": (igrpo, True),
        "grpo": (replace(cfg.algorithm, num_drafts=0, num_refinements=budget), None),  # None: the default
    }
    rollouts = {
        name: IGRPORollout(
            algo,
            cfg.generation,
            backend,
            rewards,
            tokenizer,
            cfg.seed,
            apply_chat_template=cfg.data.apply_chat_template,
            pipeline_refinements=flag,
        )
        for name, (algo, flag) in arms.items()
    }
    per_arm: dict[str, list[dict]] = {name: [] for name in arms}
    names = list(arms)
    try:
        for step in range(args.steps):
            batch = problems[step * args.prompts : (step + 1) * args.prompts]
            # Rotate the order every step so no arm always runs first (warm caches, load drifts).
            for name in names[step % 3 :] + names[: step % 3]:
                started = time.perf_counter()
                out = rollouts[name].run(batch, step)
                wall = time.perf_counter() - started
                m = out.metrics
                rec = {
                    "step": step,
                    "rollout_s": wall,
                    "generation_s": m["timing/generation_s"],
                    "draft_generation_s": m["timing/draft_generation_s"],
                    "refine_generation_s": m["timing/refine_generation_s"],
                    "draft_length_mean": m.get("response_length/draft_mean", 0.0),
                    "refine_length_mean": m["response_length/refine_mean"],
                    "refine_length_max": m["response_length/refine_max"],
                    "samples": len(out.samples),
                }
                if step >= args.warmup_steps:
                    per_arm[name].append(rec)
                print(
                    f"  step {step} {name:16s} generation {rec['generation_s']:6.2f} s (drafts {rec['draft_generation_s']:6.2f}, "
                    f"after {rec['refine_generation_s']:6.2f}), rollout {wall:6.2f} s, mean lengths draft "
                    f"{rec['draft_length_mean']:.0f} refine {rec['refine_length_mean']:.0f}",
                    flush=True,
                )
    finally:
        rewards.close()
        backend.close()
    summary = {
        name: {k: C.median([r[k] for r in recs]) for k in recs[0] if k != "step"} for name, recs in per_arm.items()
    }

    # Step-by-step ratios on the same prompts: the spread says how stable the medians are.
    def per_step(a: str, b: str, key: str = "generation_s") -> list[float]:
        return [x[key] / y[key] for x, y in zip(per_arm[a], per_arm[b])]

    ratios = {
        "pipelined_over_barrier_generation": summary["igrpo_pipelined"]["generation_s"]
        / summary["igrpo_barrier"]["generation_s"],
        "igrpo_pipelined_over_grpo_generation": summary["igrpo_pipelined"]["generation_s"]
        / summary["grpo"]["generation_s"],
        "igrpo_barrier_over_grpo_generation": summary["igrpo_barrier"]["generation_s"]
        / summary["grpo"]["generation_s"],
        "igrpo_pipelined_over_grpo_rollout": summary["igrpo_pipelined"]["rollout_s"] / summary["grpo"]["rollout_s"],
        "per_step_pipelined_over_barrier": per_step("igrpo_pipelined", "igrpo_barrier"),
        "per_step_pipelined_over_grpo": per_step("igrpo_pipelined", "grpo"),
    }
    print()
    C.print_table(
        f"Generation only, {args.prompts} prompts/step, iGRPO {args.drafts}+{args.refinements} vs GRPO 0+{budget} "
        f"(medians over {len(per_arm['grpo'])} steps)",
        ["arm", "generation (s)", "drafts part (s)", "after drafts (s)", "rollout (s)", "draft len", "refine len"],
        [
            [
                name,
                v["generation_s"],
                v["draft_generation_s"],
                v["refine_generation_s"],
                v["rollout_s"],
                v["draft_length_mean"],
                v["refine_length_mean"],
            ]
            for name, v in summary.items()
        ],
    )
    print(
        f"\npipelined / barrier generation: {ratios['pipelined_over_barrier_generation']:.3f} "
        f"(per step {', '.join(f'{r:.2f}' for r in ratios['per_step_pipelined_over_barrier'])})"
    )
    print(
        f"iGRPO / GRPO generation: pipelined {ratios['igrpo_pipelined_over_grpo_generation']:.3f}, "
        f"barrier {ratios['igrpo_barrier_over_grpo_generation']:.3f}"
    )
    return {"summary": summary, "ratios": ratios, "steps": per_arm}


def common_overrides(args, model_dir: Path, train_path: Path) -> list[str]:
    overrides = [
        f"seed={args.seed}",
        f"policy.model.hf_path={model_dir}",
        f"data.train_path={train_path}",
        f"data.prompts_per_step={args.prompts}",
        f"generation.max_new_tokens={args.max_new_tokens}",
    ]
    if args.stop_chars:
        # Each character is one token of the char tokenizer: a response ends when the model
        # samples any of them, which makes lengths vary the way real reasoning traces do.
        overrides.append("generation.stop_strings=[" + ",".join(args.stop_chars) + "]")
    return overrides


def run_once(args, arm: str, arm_overrides: list[str], index: int, model_dir: Path, train_path: Path) -> dict:
    overrides = common_overrides(args, model_dir, train_path) + arm_overrides + list(args.set)
    started = time.strftime("%H:%M:%S")
    run = C.train_run(
        f"igrpo_vs_grpo/{arm}-{index}",
        args.config,
        overrides,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        timeout=args.timeout,
    )
    print(
        f"  [{started}] {arm:5s} run {index}: {len(run['steps'])} steps, median step {C.median([s['step'] for s in run['steps']]):.2f} s, "
        f"peak tree RSS {run['peak_tree_rss_mb']:,.0f} MB, process wall {run['wall_s']:.0f} s",
        flush=True,
    )
    return {"arm": arm, "index": index, **run}


def summarise(runs: list[dict], prompts: int, budget: int) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    phases = {p: C.median([s[p] for s in steps]) for p in list(PHASE_LABELS) + ["step"]}
    step_s = phases["step"]
    trained = C.median([x for r in runs for x in r["trained_samples"]])
    tokens = C.median([x for r in runs for x in r["trained_tokens"]])
    lo, hi = C.spread([C.median([s["step"] for s in r["steps"]]) for r in runs])
    return {
        "step_s": step_s,
        "step_s_run_medians_min_max": [lo, hi],
        "prompts_per_s": prompts / step_s,
        "generated_samples_per_s": prompts * budget / step_s,
        "trained_samples_per_step": trained,
        "trained_samples_per_s": trained / step_s,
        "trained_tokens_per_step": tokens,
        "peak_tree_rss_mb": C.median([r["peak_tree_rss_mb"] for r in runs]),
        "peak_single_rss_mb": C.median([r["peak_single_rss_mb"] for r in runs]),
        "peak_trainer_rss_mb": C.median([r["peak_trainer_rss_mb"] for r in runs]),
        "phases_s": phases,
        "num_steps": len(steps),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="conf/demo.yaml")
    p.add_argument("--model", help="HF model dir (default: a tiny random Llama, hidden 128, 2 layers)")
    p.add_argument("--drafts", type=int, default=4, help="iGRPO N (GRPO gets 0 + N+G)")
    p.add_argument("--refinements", type=int, default=4, help="iGRPO G")
    p.add_argument("--pairs", type=int, default=2, help="A B pairs (each run is one process)")
    p.add_argument("--steps", type=int, default=6, help="steps per run, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra override for both arms (repeatable)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--out", help="JSON path (default bench/results/igrpo_vs_grpo.json)")
    p.add_argument(
        "--stop-chars", default="", help="characters that end a response (long, variable lengths; see above)"
    )
    p.add_argument(
        "--rollout-only",
        action="store_true",
        help="generation only, in process: iGRPO with and without the barrier, and GRPO",
    )
    p.add_argument(
        "--barrier-arm",
        action="store_true",
        help="also train iGRPO with algorithm.pipeline_refinements=false (needs that config key)",
    )
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")

    machine = C.machine_info()
    model_dir = Path(args.model) if args.model else C.tiny_model()
    train_path, _ = C.demo_data(args.seed)
    if args.rollout_only:
        print(
            f"generation only: iGRPO {args.drafts}+{args.refinements} (barrier, pipelined) vs GRPO, {args.steps} steps "
            f"(first {args.warmup_steps} dropped), {args.prompts} prompts/step, model {model_dir}",
            flush=True,
        )
        result = rollout_only(args, model_dir, train_path)
        C.write_json(
            "igrpo_vs_grpo_rollout" if not args.out else "",
            {
                "benchmark": "igrpo_vs_grpo --rollout-only",
                "command": "python bench/igrpo_vs_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": machine,
                "load_at_end": C.other_load(),
                "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model": str(model_dir)},
                **result,
            },
            out=args.out,
        )
        return 0
    arms = build_arms(args)
    budget = args.drafts + args.refinements
    print(
        f"iGRPO {args.drafts}+{args.refinements} vs GRPO 0+{budget}: {args.pairs} pairs x {args.steps} steps "
        f"(first {args.warmup_steps} dropped), {args.prompts} prompts/step, model {model_dir}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for i in range(args.pairs):
        # Alternate which arm goes first in a pair, so neither always runs on a "cold" machine.
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for arm in order:
            runs[arm].append(run_once(args, arm, arms[arm], i, model_dir, train_path))

    summary = {arm: summarise(runs[arm], args.prompts, budget) for arm in arms}
    a, b = summary["igrpo"], summary["grpo"]
    ratios = {
        "step_time": a["step_s"] / b["step_s"],
        "prompts_per_s": a["prompts_per_s"] / b["prompts_per_s"],
        "peak_tree_rss": a["peak_tree_rss_mb"] / b["peak_tree_rss_mb"],
        "peak_single_rss": a["peak_single_rss_mb"] / b["peak_single_rss_mb"],
        # Pair-wise ratios of run medians: how stable the step-time ratio is on this machine.
        "step_time_per_pair": [
            C.median([s["step"] for s in ra["steps"]]) / C.median([s["step"] for s in rb["steps"]])
            for ra, rb in zip(runs["igrpo"], runs["grpo"])
        ],
    }

    print()
    C.print_table(
        f"iGRPO {args.drafts}+{args.refinements} vs GRPO 0+{budget} (medians; ratio = iGRPO/GRPO)",
        ["metric", "iGRPO", "GRPO", "ratio"],
        [
            ["step time (s)", a["step_s"], b["step_s"], ratios["step_time"]],
            ["prompts/s", a["prompts_per_s"], b["prompts_per_s"], ratios["prompts_per_s"]],
            [
                "generated samples/s",
                a["generated_samples_per_s"],
                b["generated_samples_per_s"],
                a["generated_samples_per_s"] / b["generated_samples_per_s"],
            ],
            [
                "trained samples/step",
                a["trained_samples_per_step"],
                b["trained_samples_per_step"],
                a["trained_samples_per_step"] / b["trained_samples_per_step"],
            ],
            [
                "trained tokens/step",
                a["trained_tokens_per_step"],
                b["trained_tokens_per_step"],
                a["trained_tokens_per_step"] / max(b["trained_tokens_per_step"], 1e-9),
            ],
            ["peak RSS, process tree (MB)", a["peak_tree_rss_mb"], b["peak_tree_rss_mb"], ratios["peak_tree_rss"]],
            [
                "peak RSS, largest process (MB)",
                a["peak_single_rss_mb"],
                b["peak_single_rss_mb"],
                ratios["peak_single_rss"],
            ],
            [
                "peak RSS, trainer process (MB)",
                a["peak_trainer_rss_mb"],
                b["peak_trainer_rss_mb"],
                a["peak_trainer_rss_mb"] / b["peak_trainer_rss_mb"],
            ],
        ],
    )
    print()
    rows = []
    for ph, label in PHASE_LABELS.items():
        x, y = a["phases_s"][ph], b["phases_s"][ph]
        if x == 0 and y == 0:
            continue
        rows.append([label, x, y, x - y])
    rows.append(["step (median of totals)", a["step_s"], b["step_s"], a["step_s"] - b["step_s"]])
    C.print_table("Per-phase median seconds per step", ["phase", "iGRPO", "GRPO", "iGRPO-GRPO"], rows)
    print(f"\nstep-time ratio per pair: {', '.join(f'{r:.3f}' for r in ratios['step_time_per_pair'])}")

    C.write_json(
        "igrpo_vs_grpo" if not args.out else "",
        {
            "benchmark": "igrpo_vs_grpo",
            "command": "python bench/igrpo_vs_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine,
            "load_at_end": C.other_load(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}
            | {"model": str(model_dir), "model_params": C.param_count(model_dir)},
            "summary": summary,
            "ratios": ratios,
            "runs": runs,
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
