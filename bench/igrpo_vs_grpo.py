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

ROLLOUT_PHASES, TRAIN_PHASES, PHASE_LABELS, step_phases = C.ROLLOUT_PHASES, C.TRAIN_PHASES, C.PHASE_LABELS, C.step_phases


def build_arms(args) -> dict[str, list[str]]:
    budget = args.drafts + args.refinements
    return {
        "igrpo": [f"algorithm.num_drafts={args.drafts}", f"algorithm.num_refinements={args.refinements}"],
        "grpo": ["algorithm.num_drafts=0", f"algorithm.num_refinements={budget}"],
    }


def run_once(args, arm: str, arm_overrides: list[str], index: int, model_dir: Path, train_path: Path) -> dict:
    overrides = [
        f"seed={args.seed}",
        f"policy.model.hf_path={model_dir}",
        f"data.train_path={train_path}",
        f"data.prompts_per_step={args.prompts}",
        f"generation.max_new_tokens={args.max_new_tokens}",
    ] + arm_overrides + list(args.set)
    started = time.strftime("%H:%M:%S")
    run = C.train_run(f"igrpo_vs_grpo/{arm}-{index}", args.config, overrides, steps=args.steps,
                      warmup_steps=args.warmup_steps, timeout=args.timeout)
    print(f"  [{started}] {arm:5s} run {index}: {len(run['steps'])} steps, median step {C.median([s['step'] for s in run['steps']]):.2f} s, "
          f"peak tree RSS {run['peak_tree_rss_mb']:,.0f} MB, process wall {run['wall_s']:.0f} s", flush=True)
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
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")

    machine = C.machine_info()
    model_dir = Path(args.model) if args.model else C.tiny_model()
    train_path, _ = C.demo_data(args.seed)
    arms = build_arms(args)
    budget = args.drafts + args.refinements
    print(f"iGRPO {args.drafts}+{args.refinements} vs GRPO 0+{budget}: {args.pairs} pairs x {args.steps} steps "
          f"(first {args.warmup_steps} dropped), {args.prompts} prompts/step, model {model_dir}", flush=True)
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
    C.print_table(f"iGRPO {args.drafts}+{args.refinements} vs GRPO 0+{budget} (medians; ratio = iGRPO/GRPO)",
                  ["metric", "iGRPO", "GRPO", "ratio"], [
                      ["step time (s)", a["step_s"], b["step_s"], ratios["step_time"]],
                      ["prompts/s", a["prompts_per_s"], b["prompts_per_s"], ratios["prompts_per_s"]],
                      ["generated samples/s", a["generated_samples_per_s"], b["generated_samples_per_s"],
                       a["generated_samples_per_s"] / b["generated_samples_per_s"]],
                      ["trained samples/step", a["trained_samples_per_step"], b["trained_samples_per_step"],
                       a["trained_samples_per_step"] / b["trained_samples_per_step"]],
                      ["trained tokens/step", a["trained_tokens_per_step"], b["trained_tokens_per_step"],
                       a["trained_tokens_per_step"] / max(b["trained_tokens_per_step"], 1e-9)],
                      ["peak RSS, process tree (MB)", a["peak_tree_rss_mb"], b["peak_tree_rss_mb"], ratios["peak_tree_rss"]],
                      ["peak RSS, largest process (MB)", a["peak_single_rss_mb"], b["peak_single_rss_mb"],
                       ratios["peak_single_rss"]],
                      ["peak RSS, trainer process (MB)", a["peak_trainer_rss_mb"], b["peak_trainer_rss_mb"],
                       a["peak_trainer_rss_mb"] / b["peak_trainer_rss_mb"]],
                  ])
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

    C.write_json("igrpo_vs_grpo" if not args.out else "", {
        "benchmark": "igrpo_vs_grpo",
        "command": "python bench/igrpo_vs_grpo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "load_at_end": C.other_load(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model": str(model_dir),
                                                                           "model_params": C.param_count(model_dir)},
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
