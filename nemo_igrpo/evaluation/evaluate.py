"""Single-shot evaluation, as the model is deployed: the plain prompt (no draft), k samples per
problem at the paper's evaluation settings (T = 0.6, top-p 0.95), Pass@1 averaged over the k
samples, and unbiased pass@k. Used by the trainer (periodic held-out accuracy) and by
`igrpo eval` (benchmark files, a run's checkpoint or a Hugging Face directory)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from nemo_igrpo.config.schema import EvalConfig
from nemo_igrpo.data.datasets import Problem
from nemo_igrpo.evaluation.metrics import mean_pass_at_k
from nemo_igrpo.generation.interface import GenerationBackend, SamplingParams
from nemo_igrpo.rewards.base import RewardSample
from nemo_igrpo.utils.errors import UserError

logger = logging.getLogger(__name__)

# Seeds for evaluation samples live apart from training seeds, so evaluating never changes
# what training draws (and resume stays exact whatever the evaluation schedule).
EVAL_SEED_OFFSET = 7_919_000


@dataclass
class EvalResult:
    name: str
    num_problems: int
    num_samples: int
    accuracy: float  # Pass@1 averaged over num_samples samples per problem
    pass_at_k: dict[int, float]
    mean_response_length: float
    seconds: float
    examples: list[dict] = field(default_factory=list)

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/response_length": self.mean_response_length}
        for k, v in self.pass_at_k.items():
            out[f"{prefix}/pass@{k}"] = v
        return out


def evaluate(
    backend: GenerationBackend,
    prompt_builder,
    reward_manager,
    problems: Sequence[Problem],
    cfg: EvalConfig,
    *,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
    seed: int = 0,
    name: str = "eval",
    num_examples: int = 3,
) -> EvalResult:
    if not problems:
        raise UserError(f"{name}: no problems to evaluate")
    start = time.time()
    prompts = [prompt_builder.plain(p.prompt, p.index, where=p.location) for p in problems]
    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        n=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens or max_new_tokens,
        stop_token_ids=list(stop_token_ids),
        seed=seed + EVAL_SEED_OFFSET,
    )
    results = backend.generate(prompts, params)
    samples, lengths = [], []
    for prob, outs in zip(problems, results):
        for out in outs:
            samples.append(
                RewardSample(
                    prompt=prob.prompt, response=out.text, reference=prob.answer, metadata=dict(prob.extra or {})
                )
            )
            lengths.append(len(out.token_ids))
    scored = reward_manager.score(samples)
    n = cfg.num_samples
    correct_counts = [int(scored.correct[i * n : (i + 1) * n].sum()) for i in range(len(problems))]
    pass_k = {k: mean_pass_at_k(correct_counts, n, k) for k in sorted(set(cfg.pass_k)) if k <= n}
    examples = [
        {
            "problem": problems[i].prompt,
            "answer": str(problems[i].answer),
            "response": results[i][0].text,
            "correct": bool(scored.correct[i * n]),
        }
        for i in range(min(num_examples, len(problems)))
    ]
    return EvalResult(
        name=name,
        num_problems=len(problems),
        num_samples=n,
        accuracy=sum(correct_counts) / (n * len(problems)),
        pass_at_k=pass_k,
        mean_response_length=sum(lengths) / len(lengths),
        seconds=time.time() - start,
        examples=examples,
    )


def format_table(results: Sequence[EvalResult]) -> str:
    ks = sorted({k for r in results for k in r.pass_at_k})
    head = ["benchmark", "problems", "samples", "pass@1 (avg)"] + [f"pass@{k}" for k in ks if k != 1] + ["len"]
    rows = [head]
    for r in results:
        rows.append(
            [r.name, str(r.num_problems), str(r.num_samples), f"{100 * r.accuracy:.1f}"]
            + [f"{100 * r.pass_at_k[k]:.1f}" if k in r.pass_at_k else "-" for k in ks if k != 1]
            + [f"{r.mean_response_length:.0f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def _open_model_dir(checkpoint: str, cfg) -> tuple[str, Optional[str], Optional[object]]:
    """(HF directory, temp dir to clean up or None, the actor if one was built) for `checkpoint`:
    an HF dir as is, a run dir's final export, or a dist-checkpoint exported through the actor."""
    path = Path(checkpoint)
    if (path / "config.json").exists():
        return str(path), None, None
    if (path / "hf").is_dir() and (path / "hf" / "config.json").exists():
        return str(path / "hf"), None, None
    ckpt = path
    if (path / "checkpoints").is_dir():
        from nemo_igrpo.algorithms.checkpointing import latest_checkpoint

        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise UserError(f"{path}: no complete checkpoint under checkpoints/ and no hf/ export")
    if not ckpt.is_dir():
        raise UserError(f"--checkpoint {checkpoint}: not a HF directory, run directory or checkpoint")
    import tempfile

    from nemo_igrpo.policy.actor import MegatronActor

    out = tempfile.mkdtemp(prefix="igrpo-eval-hf-")
    actor = MegatronActor(cfg.policy, seed=cfg.seed, total_steps=max(1, cfg.trainer.max_steps))
    actor.load_checkpoint(str(ckpt))
    actor.save_hf(out)
    return out, out, actor


def _resolve_model_dir(checkpoint: str, cfg) -> tuple[str, Optional[str]]:
    """Return an HF directory for `checkpoint`: an HF dir as is, a run dir's final export, or a
    dist-checkpoint exported through the actor (returns the temp dir to clean up)."""
    model_dir, cleanup, _ = _open_model_dir(checkpoint, cfg)
    return model_dir, cleanup


class EvalModel:
    """One model opened for single-shot evaluation: its HF directory, tokenizer, prompt builder
    and generation backend (`generation.backend`; `megatron` generates with a MegatronActor
    built here, or the one that exported a dist-checkpoint). A context manager: leaving it
    closes the backend and removes a temporary export, so two models can be evaluated one
    after the other in one process (the suite's side-by-side)."""

    def __init__(self, cfg, source: str):
        self.cfg = cfg
        self.source = source
        self.backend = None
        self._actor = None
        self.model_dir, self._cleanup, actor = _open_model_dir(source, cfg)
        try:
            from transformers import AutoTokenizer

            from nemo_igrpo.algorithms.templates import PromptBuilder
            from nemo_igrpo.generation.factory import build_generation_backend

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.builder = PromptBuilder(
                self.tokenizer,
                cfg.algorithm.template,
                max_prompt_tokens=cfg.generation.max_prompt_tokens,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.generation.max_new_tokens,
                apply_chat_template=cfg.data.apply_chat_template,
            )
            if cfg.generation.backend == "megatron":
                # The in-framework backend generates with the policy itself: the actor that
                # exported a dist-checkpoint already holds its weights; otherwise load the HF dir.
                self._actor = actor if actor is not None else self._build_actor()
            self.backend = build_generation_backend(cfg.generation, self.model_dir, seed=cfg.seed, actor=self._actor)
        except BaseException:
            self.close()
            raise

    def _build_actor(self):
        import copy

        from nemo_igrpo.policy.actor import MegatronActor

        policy = copy.deepcopy(self.cfg.policy)
        policy.model.hf_path = self.model_dir
        return MegatronActor(policy, seed=self.cfg.seed, total_steps=max(1, self.cfg.trainer.max_steps))

    def evaluate(self, rewards, problems: Sequence[Problem], eval_cfg: EvalConfig, name: str) -> EvalResult:
        return evaluate(
            self.backend,
            self.builder,
            rewards,
            problems,
            eval_cfg,
            max_new_tokens=self.cfg.generation.max_new_tokens,
            stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.cfg.seed,
            name=name,
        )

    def close(self) -> None:
        import shutil

        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self._actor = None  # the last reference: its memory goes before the next model loads
        if self._cleanup:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None

    def __enter__(self) -> "EvalModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checkpoints(args) -> list[str]:
    """--checkpoint values as a list (repeatable; a single string from older callers)."""
    value = getattr(args, "checkpoint", None)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def run_eval_cli(args) -> int:
    from nemo_igrpo.config import load_config

    if getattr(args, "suite", None):
        from nemo_igrpo.evaluation.suite import run_suite_cli

        return run_suite_cli(args)
    cfg = load_config(args.config, args.overrides)
    from nemo_igrpo.utils import console

    # Model loading and vLLM are noisy: their output goes to <run.dir>/logs/ unless verbose;
    # leaving the block (by an error too) gives the terminal back before cli.main prints.
    mode = console.resolve_mode(cfg.logging.console, getattr(args, "verbose", False))
    with console.session(cfg.run.dir, mode, "eval"):
        return _run_eval(args, cfg)


def _run_eval(args, cfg) -> int:
    from nemo_igrpo.data.datasets import load_problems
    from nemo_igrpo.rewards.manager import RewardManager
    from nemo_igrpo.utils.console import echo

    checkpoints = _checkpoints(args)
    if len(checkpoints) > 1:
        raise UserError(
            "several --checkpoint values compare models side by side: that needs --suite (e.g. --suite paper)"
        )
    benchmarks = list(args.benchmark) or ([cfg.data.eval_path] if cfg.data.eval_path else [])
    if not benchmarks:
        raise UserError("no benchmark: pass --benchmark FILE.jsonl or set data.eval_path")
    sets = [
        (
            Path(b).stem,
            load_problems(b, cfg.data.prompt_key, cfg.data.answer_key, split="test", limit=cfg.data.max_eval_samples),
        )
        for b in benchmarks
    ]
    source = checkpoints[0] if checkpoints else cfg.policy.model.hf_path
    if not source:
        raise UserError("no model: pass --checkpoint (HF dir, run dir or checkpoint) or set policy.model.hf_path")
    results = []
    with EvalModel(cfg, source) as model, RewardManager(cfg.reward) as rewards:
        for name, problems in sets:
            results.append(model.evaluate(rewards, problems, cfg.eval, name))
    echo(format_table(results))
    out = Path(args.output) if args.output else Path(cfg.run.dir) / "eval" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": source,
                "settings": {
                    "temperature": cfg.eval.temperature,
                    "top_p": cfg.eval.top_p,
                    "num_samples": cfg.eval.num_samples,
                },
                "results": [r.__dict__ for r in results],
            },
            indent=2,
            default=str,
        )
    )
    echo(f"wrote {out}")
    return 0
