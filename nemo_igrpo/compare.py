"""`igrpo compare`: iGRPO against GRPO (and other arms) at a matched rollout budget, over seeds.

    igrpo compare CONFIG --seeds K [--arms igrpo,grpo] [--out REPORT] [overrides]
    igrpo compare conf/demo.yaml --demo-task max --seeds 5       # the CPU demo task(s)

Arms. The budget is B = N + G of the resolved CONFIG (algorithm.num_drafts +
algorithm.num_refinements). Built-in arms, all at that budget:

    igrpo            N drafts + G refinements (the config as given)
    grpo             0 drafts + B samples per prompt (the paper's baseline)
    igrpo_skip       igrpo with algorithm.all_zero_drafts=skip
    igrpo_adaptive   igrpo with algorithm.adaptive_draft_budget=true

and any arm of your own as `--arm NAME=key=value,key=value` (e.g. a different template; keeping
the budget matched is then up to you: report.md prints every arm's N and G).

Every (arm, seed) is one `python -m nemo_igrpo train` process into REPORT/<arm>/seed<S>/,
interleaved seed by seed (igrpo s0, grpo s0, igrpo s1, ...) so that the drift of a shared
machine hits every arm alike. A run whose directory holds COMPARE_DONE is skipped; an
unfinished one is rerun in place, and `igrpo train` resumes it from its last checkpoint. So an
interrupted comparison is continued by running the same command again.

The report (REPORT/report.md, report.json, plots/*.png): held-out single-shot accuracy at step 0
and at the last step per arm (mean and a t-based 95% interval over seeds), the gain, the paired
difference of every arm against the first one (same seed = same data order and sampling seed,
so the difference is paired), wall time, and the per-step mechanism diagnostics (`diag/*`,
nemo_igrpo/algorithms/rollout.py) averaged over steps and seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.utils.errors import UserError

DONE_FILE = "COMPARE_DONE"

BUILTIN_ARMS = ("igrpo", "grpo", "igrpo_skip", "igrpo_adaptive")

# The diagnostics averaged per arm in the report (over all steps and seeds), with labels.
DIAG_KEYS = [
    ("diag/stage1_zero_variance_frac", "stage-1 (draft) groups with zero reward variance"),
    ("diag/stage2_zero_variance_frac", "trained groups with zero reward variance (no gradient)"),
    ("diag/best_draft_correct", "best draft correct"),
    ("diag/best_draft_prop31", "Prop. 3.1 prediction 1-(1-p)^N (per prompt)"),
    ("diag/chosen_draft_correct_frac", "appended draft correct"),
    ("diag/refine_acc_draft_correct", "refinement accuracy, appended draft correct"),
    ("diag/refine_acc_draft_wrong", "refinement accuracy, appended draft wrong"),
    ("diag/refine_copy_frac", "refinements repeating their draft verbatim"),
    ("diag/refine_copy_frac_draft_wrong", "... of those conditioned on a wrong draft"),
    ("reward/refine_mean", "reward of the trained samples"),
    ("entropy", "policy entropy"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config of the iGRPO arm (e.g. conf/demo.yaml, conf/paper/...igrpo.yaml)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per arm (default 3)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (seeds are seed-start .. seed-start+K-1)")
    p.add_argument(
        "--arms",
        default="igrpo,grpo",
        help=f"comma-separated arms; built-in: {', '.join(BUILTIN_ARMS)}; the first is the reference "
        "of the paired differences (default igrpo,grpo)",
    )
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="define an arm: NAME=key=value,key=value (repeatable); list NAME in --arms or it is appended",
    )
    p.add_argument("--out", default=None, help="report directory (default: runs/compare/<config name>)")
    p.add_argument(
        "--demo-task",
        default=None,
        help="prepare a CPU demo task first (warm start + data, as `igrpo demo --task`) and fill in "
        "the model and data paths: max | maxmin",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train nothing")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per training process (default: none)")
    p.add_argument(
        "--launcher",
        default=None,
        help="command that starts each training run instead of `python`, followed by `-m nemo_igrpo train "
        "...`; e.g. --launcher 'torchrun --nproc-per-node 8' on a GPU node",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides for every arm, e.g. trainer.max_steps=20")


# ---------------------------------------------------------------------------------------------
# statistics


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t; scipy when present, else a table (dof <= 30)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, dof))
    except ImportError:  # the table keeps the report working without scipy
        table = [
            12.706,
            4.303,
            3.182,
            2.776,
            2.571,
            2.447,
            2.365,
            2.306,
            2.262,
            2.228,
            2.201,
            2.179,
            2.160,
            2.145,
            2.131,
            2.120,
            2.110,
            2.101,
            2.093,
            2.086,
            2.080,
            2.074,
            2.069,
            2.064,
            2.060,
            2.056,
            2.052,
            2.048,
            2.045,
            2.042,
        ]
        return table[dof - 1] if dof <= len(table) else 1.96


def mean_ci(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and the t-based 95% interval of the mean (n >= 2)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


# ---------------------------------------------------------------------------------------------
# arms and runs


def arm_overrides(name: str, num_drafts: int, num_refinements: int, custom: dict[str, list[str]]) -> list[str]:
    if name in custom:
        return list(custom[name])
    budget = num_drafts + num_refinements
    igrpo = [f"algorithm.num_drafts={num_drafts}", f"algorithm.num_refinements={num_refinements}"]
    if name == "igrpo":
        return igrpo
    if name == "grpo":
        return ["algorithm.num_drafts=0", f"algorithm.num_refinements={budget}"]
    if name == "igrpo_skip":
        return igrpo + ["algorithm.all_zero_drafts=skip"]
    if name == "igrpo_adaptive":
        return igrpo + ["algorithm.adaptive_draft_budget=true"]
    raise UserError(
        f"--arms: unknown arm {name!r}; built-in: {', '.join(BUILTIN_ARMS)}, or define it with "
        f"--arm {name}=key=value,..."
    )


def parse_custom_arms(specs: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or "/" in name:
            raise UserError(f"--arm {spec!r}: expected NAME=key=value,key=value")
        out[name] = [o for o in rest.split(",") if o]
    return out


def _read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write; the resumed run rewrites it
    return out


def _by_step(records: list[dict]) -> dict[int, dict]:
    # A step can have several lines (the training record, the evaluation record): merge them.
    steps: dict[int, dict] = {}
    for r in records:
        if "step" in r:
            steps.setdefault(int(r["step"]), {}).update(r)
    return steps


def run_summary(run_dir: Path, max_steps: Optional[int] = None) -> Optional[dict]:
    """One finished run's numbers, or None when it has not finished. Finished: this tool wrote
    its marker, or (runs launched some other way, e.g. one Slurm job per arm and seed into
    REPORT/<arm>/seed<S>/) the metrics hold evaluations at step 0 and at `max_steps`; the wall
    time of those is unknown."""
    done = run_dir / DONE_FILE
    if done.exists():
        info = json.loads(done.read_text())
    elif max_steps is not None and _eval_complete(run_dir, max_steps):
        info = {"seconds": None}
    else:
        return None
    steps = _by_step(_read_records(run_dir))
    evals = {s: float(r["eval/accuracy"]) for s, r in steps.items() if isinstance(r.get("eval/accuracy"), (int, float))}
    last = max(steps) if steps else None
    out = {
        "run_dir": str(run_dir),
        "seconds": info.get("seconds"),
        "steps": last,
        "accuracy_before": evals.get(0),
        "accuracy_after": evals.get(last) if last is not None else None,
        "diag": {},
    }
    for key, _ in DIAG_KEYS:
        vals = [r[key] for s, r in steps.items() if s > 0 and isinstance(r.get(key), (int, float))]
        if vals:
            out["diag"][key] = sum(vals) / len(vals)
    return out


def _train(
    config: str,
    overrides: list[str],
    run_dir: Path,
    log_path: Path,
    timeout: Optional[float],
    launcher: Optional[str] = None,
) -> float:
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    cmd = [*prefix, "-m", "nemo_igrpo", "train", config, *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "compare_command.json").write_text(json.dumps(cmd, indent=1))
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise UserError(
            f"training run {run_dir} failed with exit code {proc.returncode}; see {log_path} "
            f"(rerun the same compare command to resume it)"
        )
    return seconds


def _eval_complete(run_dir: Path, max_steps: int) -> bool:
    steps = _by_step(_read_records(run_dir))
    return max_steps in steps and 0 in steps and "eval/accuracy" in steps[max_steps] and "eval/accuracy" in steps[0]


# ---------------------------------------------------------------------------------------------
# report


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _ci_pts(s: dict, signed: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    fmt = _pts if signed else _pct
    if s["ci95"] is None:
        return fmt(s["mean"])
    lo, hi = s["ci95"]
    return (
        f"{fmt(s['mean'])} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        if signed
        else f"{fmt(s['mean'])} [{100 * lo:.1f}, {100 * hi:.1f}]"
    )


def build_report(
    arms: list[str], seeds: list[int], runs: dict[str, dict[int, Optional[dict]]], arm_settings: dict[str, list[str]]
) -> dict:
    report: dict = {"arms": {}, "paired": {}, "seeds": seeds, "arm_overrides": arm_settings}
    for arm in arms:
        done = {s: r for s, r in runs[arm].items() if r is not None}
        before = [r["accuracy_before"] for r in done.values() if r["accuracy_before"] is not None]
        after = [r["accuracy_after"] for r in done.values() if r["accuracy_after"] is not None]
        gain = [
            r["accuracy_after"] - r["accuracy_before"]
            for r in done.values()
            if r["accuracy_after"] is not None and r["accuracy_before"] is not None
        ]
        secs = [r["seconds"] for r in done.values() if r["seconds"] is not None]
        diag = {}
        for key, _ in DIAG_KEYS:
            vals = [r["diag"][key] for r in done.values() if key in r["diag"]]
            if vals:
                diag[key] = mean_ci(vals)
        report["arms"][arm] = {
            "seeds_done": sorted(done),
            "accuracy_before": mean_ci(before),
            "accuracy_after": mean_ci(after),
            "gain": mean_ci(gain),
            "seconds": mean_ci(secs),
            "diag": diag,
            "per_seed": {str(s): r for s, r in sorted(done.items())},
        }
    ref = arms[0]
    for arm in arms[1:]:
        diffs = []
        for s in seeds:
            a, b = runs[ref].get(s), runs[arm].get(s)
            if a and b and a["accuracy_after"] is not None and b["accuracy_after"] is not None:
                diffs.append(a["accuracy_after"] - b["accuracy_after"])
        stats = mean_ci(diffs)
        stats["per_seed"] = diffs
        stats["wins"] = sum(d > 0 for d in diffs)
        report["paired"][f"{ref} - {arm}"] = stats
    return report


def report_markdown(report: dict, title: str, command: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        "Held-out single-shot accuracy (the run's `eval/accuracy`), mean over seeds with a t-based 95% "
        "interval of the mean; gain = after - before (points).",
        "",
        "| arm | settings | seeds | before | after | gain (points) | wall time per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in report["arms"].items():
        secs = a["seconds"]["mean"]
        lines.append(
            f"| {arm} | `{' '.join(report['arm_overrides'][arm])}` | {len(a['seeds_done'])} | "
            f"{_ci_pts(a['accuracy_before'])} | {_ci_pts(a['accuracy_after'])} | {_ci_pts(a['gain'], True)} | "
            f"{'n/a' if secs is None else f'{secs:.0f} s'} |"
        )
    if report["paired"]:
        lines += [
            "",
            "Paired difference of the final accuracy (same seed = same data order and sampling seed):",
            "",
            "| difference | seeds | mean [95% interval] (points) | first arm ahead | per seed (points) |",
            "|---|---|---|---|---|",
        ]
        for name, d in report["paired"].items():
            per = ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])
            lines.append(f"| {name} | {d['n']} | {_ci_pts(d, True)} | {d['wins']} of {d['n']} | {per} |")
    lines += [
        "",
        "Mechanism diagnostics, mean over training steps, then over seeds (`diag/*` in metrics.jsonl):",
        "",
        "| diagnostic | " + " | ".join(report["arms"]) + " |",
        "|---|" + "---|" * len(report["arms"]),
    ]
    for key, label in DIAG_KEYS:
        cells = []
        for a in report["arms"].values():
            s = a["diag"].get(key)
            # Fractions as percentages; rewards (any scale) and entropy as plain numbers.
            cells.append("-" if s is None else (_pct(s["mean"]) if key.startswith("diag/") else f"{s['mean']:.3f}"))
        if any(c != "-" for c in cells):
            lines.append(f"| {label} (`{key}`) | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (before -> after):", ""]
    for arm, a in report["arms"].items():
        per = "; ".join(
            f"seed {s}: {_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])}"
            + ("" if r["seconds"] is None else f" ({r['seconds']:.0f} s)")
            for s, r in a["per_seed"].items()
        )
        lines.append(f"- {arm}: {per}")
    lines += ["", "Plots: plots/*.png (per-step means over seeds, thin lines per seed)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    from nemo_igrpo.config import load_config
    from nemo_igrpo.utils.plotting import plot_comparison

    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    overrides = list(args.overrides)
    if args.demo_task:
        from nemo_igrpo.demo.run import prepare_demo

        overrides = prepare_demo(args.demo_task, args.config) + overrides
    base = load_config(args.config, overrides)  # validates the config and overrides before any run starts
    n, g = base.algorithm.num_drafts, base.algorithm.num_refinements
    custom = parse_custom_arms(args.arm)
    arms = [a for a in args.arms.split(",") if a]
    arms += [a for a in custom if a not in arms]
    if len(set(arms)) != len(arms):
        raise UserError(f"--arms: an arm is listed twice: {arms}")
    settings = {a: arm_overrides(a, n, g, custom) for a in arms}
    out = Path(args.out) if args.out else Path("runs") / "compare" / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed_start, args.seed_start + args.seeds))
    max_steps = base.trainer.max_steps
    for arm in arms:  # fail on a bad arm setting now, not after hours of other runs
        load_config(args.config, overrides + settings[arm] + ["seed=0"])

    if not args.report_only:
        for seed in seeds:
            for arm in arms:
                run_dir = out / arm / f"seed{seed}"
                if (run_dir / DONE_FILE).exists():
                    print(f"[compare] {arm} seed {seed}: done, skipped ({run_dir})", flush=True)
                    continue
                prev = run_dir / "compare_partial_seconds"
                spent = float(prev.read_text()) if prev.exists() else 0.0
                print(f"[compare] {arm} seed {seed}: training -> {run_dir}", flush=True)
                run_overrides = overrides + settings[arm] + [f"seed={seed}", f"run.dir={run_dir.resolve()}"]
                try:
                    seconds = _train(
                        args.config, run_overrides, run_dir, out / "train.log", args.run_timeout, args.launcher
                    )
                except subprocess.TimeoutExpired:
                    raise UserError(f"{run_dir}: over --run-timeout; rerun the same command to resume it") from None
                seconds += spent
                if not _eval_complete(run_dir, max_steps):
                    prev.write_text(str(seconds))
                    raise UserError(
                        f"{run_dir}: the run ended without held-out evaluations at step 0 and step "
                        f"{max_steps}; set trainer.eval_every so that the last step is evaluated"
                    )
                (run_dir / DONE_FILE).write_text(
                    json.dumps({"seconds": round(seconds, 1), "arm": arm, "seed": seed, "overrides": run_overrides})
                )
                print(f"[compare] {arm} seed {seed}: {seconds:.0f} s", flush=True)

    runs = {arm: {s: run_summary(out / arm / f"seed{s}", max_steps) for s in seeds} for arm in arms}
    report = build_report(arms, seeds, runs, settings)
    report["config"] = str(args.config)
    report["overrides"] = overrides
    report["budget"] = {"num_drafts": n, "num_refinements": g, "per_prompt": n + g}
    command = "igrpo compare " + " ".join(
        [args.config, f"--seeds {args.seeds}", f"--arms {','.join(arms)}"]
        + ([f"--demo-task {args.demo_task}"] if args.demo_task else [])
        + list(args.overrides)
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(
        report_markdown(report, f"Comparison: {', '.join(arms)} at {n} + {g} samples per prompt", command)
    )
    series = {arm: [_read_records(out / arm / f"seed{s}") for s in seeds if runs[arm].get(s)] for arm in arms}
    plots = plot_comparison(series, out / "plots")
    print((out / "report.md").read_text())
    print(f"[compare] report: {out / 'report.md'}; plots: {', '.join(p.name for p in plots)}")
    missing = [f"{a}/seed{s}" for a in arms for s in seeds if runs[a][s] is None]
    if missing:
        print(f"[compare] not finished: {', '.join(missing)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m nemo_igrpo.compare ...` (the same as `igrpo compare` once cli.py wires it)."""
    p = argparse.ArgumentParser(
        prog="igrpo compare", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    # Intermixed: options may come after CONFIG and between overrides (`CONFIG --seeds 5 k=v`).
    args = p.parse_intermixed_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
