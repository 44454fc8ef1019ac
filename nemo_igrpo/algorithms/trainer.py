"""The iGRPO training loop: one step = prompts -> drafts -> best draft -> refinements ->
rewards -> advantages -> policy update -> weight sync (-> evaluation, checkpoint).

Data flows one way and each module owns one step of it:
    data.PromptSampler            which problems this step sees (resumable order)
    algorithms.rollout            both generation stages, rewards, selection, advantages
    policy.MegatronActor          log-probs, the update, checkpoints, HF weight export
    generation backend            sampling, and taking the new weights after each step
    evaluation.evaluate           single-shot held-out accuracy, as deployed

Distributed layout: every rank runs the actor (TP/PP/DP come from the config and torchrun).
The rollout's logic, rewards and logging run on global rank 0; its samples are broadcast to the
other ranks. Generation runs on every rank with `generation.data_parallel` (each rank's vLLM
engine, or each Megatron replica, generates its share of every call: generation/data_parallel.py)
or on rank 0 alone; a separate server (`generation.backend=vllm_server`) scales out instead.
Rewards stay on rank 0: they are CPU work in worker processes (well under a percent of a step
here), and one RewardManager keeps one place for timeouts, failure counts and the stop rule.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from nemo_igrpo.algorithms.checkpointing import checkpoint_dir, latest_checkpoint, prune_checkpoints
from nemo_igrpo.config.loader import save_config
from nemo_igrpo.config.schema import IGRPOConfig
from nemo_igrpo.utils import collectives, console as run_console
from nemo_igrpo.utils.errors import GenerationServerError, RewardTermFailing, TrainingAborted
from nemo_igrpo.utils.metrics_log import MetricsLogger, step_summary, truncate_metrics
from nemo_igrpo.utils.samples import SampleLog

logger = logging.getLogger("nemo_igrpo.trainer")


@dataclass
class TrainResult:
    run_dir: Path
    last_step: int
    resumed_from: Optional[int]
    eval_history: list[dict] = field(default_factory=list)  # eval metrics per evaluated step
    stopped_by_signal: bool = False


# --------------------------------------------------------------------------------------------
# Small pieces


def _rank() -> int:
    return collectives.rank()


# Rank 0's rollout, metrics and failures reach the other ranks over the gloo control group
# (see utils/collectives.py): they wait there, not in an NCCL collective, while rank 0 generates.
_broadcast = collectives.broadcast_object
_all_ranks_agree = collectives.any_rank


class _Timer:
    """Per-phase wall times of one step; shows the running phase on the progress bar."""

    def __init__(self, bar=None):
        self.times: dict[str, float] = {}
        self.bar = bar

    @contextmanager
    def phase(self, name: str):
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class _StopFlag:
    """SIGTERM / SIGINT (Slurm pre-emption, scancel, Ctrl-C): finish the current phase, save a
    checkpoint, exit cleanly. A second signal exits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "received %s: will save a checkpoint and stop after the current phase", signal.Signals(signum).name
        )

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def _python_rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_python_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _split(seq: list, parts: int) -> list[list]:
    size = math.ceil(len(seq) / parts)
    return [seq[i : i + size] for i in range(0, len(seq), size)] if seq else []


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: IGRPOConfig, console=run_console.echo):
        self.cfg = cfg
        self.console = console
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.stop = _StopFlag()
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self.bar = None

    # --- set-up ----------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        from nemo_igrpo.data.datasets import PromptSampler, load_problems

        # Data first: a missing field fails in a second, before any model is built.
        self.train_problems = load_problems(
            cfg.data.train_path, cfg.data.prompt_key, cfg.data.answer_key, split=cfg.data.split
        )
        self.eval_problems = (
            load_problems(
                cfg.data.eval_path,
                cfg.data.prompt_key,
                cfg.data.answer_key,
                split="test",
                limit=cfg.data.max_eval_samples,
            )
            if cfg.data.eval_path
            else []
        )
        self.sampler = PromptSampler(
            self.train_problems, cfg.data.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle
        )
        if os.environ.get("RANK", "0").strip() in ("", "0"):  # torch.distributed is not up yet
            self.console(
                f"[igrpo] data: {len(self.train_problems)} training problems, {len(self.eval_problems)} held-out; "
                f"building the policy ({cfg.policy.model.hf_path or 'tiny model'})"
            )
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        from nemo_igrpo.policy.actor import MegatronActor

        self.actor = MegatronActor(
            cfg.policy,
            seed=cfg.seed,
            total_steps=cfg.trainer.max_steps * cfg.algorithm.minibatches_per_step,
            kl_beta=cfg.algorithm.kl_beta,
            cache_dir=str(self.run_dir / "model_cache"),
        )
        self.is_main = _rank() == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tokenizer = self.actor.tokenizer

        from nemo_igrpo.algorithms.losses import make_loss_fn

        self.loss_fn = make_loss_fn(cfg.algorithm)
        self.backend = None
        self.rewards = None
        self.rollout = None
        from nemo_igrpo.generation.data_parallel import (
            DataParallelGenerator,
            generation_group_size,
            uses_data_parallel_generation,
        )
        from nemo_igrpo.generation.factory import build_generation_backend

        # Generation on every rank (generation/data_parallel.py) or on rank 0 only.
        self.generator: Optional[DataParallelGenerator] = None
        if uses_data_parallel_generation(
            cfg.generation.backend, cfg.generation.data_parallel, collectives.world_size()
        ):
            group = generation_group_size(
                cfg.generation.backend,
                cfg.policy.tensor_parallel_size,
                cfg.policy.pipeline_parallel_size,
                cfg.generation.vllm.tensor_parallel_size,
            )
            # Each engine its own seed: requests carry seeds, but unseeded ones must not repeat
            # the same samples on every engine.
            local = build_generation_backend(
                cfg.generation,
                self.actor.hf_path,
                seed=cfg.seed + _rank() // group,
                actor=self.actor,
                per_rank_engine=True,
            )
            self.generator = DataParallelGenerator(local, group_size=group)
        if self.is_main:
            self.console(f"[igrpo] starting the generation backend ({cfg.generation.backend})")
            from nemo_igrpo.algorithms.rollout import IGRPORollout
            from nemo_igrpo.algorithms.templates import PromptBuilder
            from nemo_igrpo.rewards.manager import RewardManager

            self.rewards = RewardManager(cfg.reward)
            self.backend = self.generator or build_generation_backend(
                cfg.generation, self.actor.hf_path, seed=cfg.seed, actor=self.actor
            )
            self.rollout = IGRPORollout(
                cfg.algorithm,
                cfg.generation,
                self.backend,
                self.rewards,
                self.tokenizer,
                cfg.seed,
                problem_source=lambda k: self.sampler.next_batch(k),
                apply_chat_template=cfg.data.apply_chat_template,
                num_records=max(0, cfg.logging.samples_per_step),
            )
            self.eval_prompts = PromptBuilder(
                self.tokenizer,
                cfg.algorithm.template,
                max_prompt_tokens=cfg.generation.max_prompt_tokens,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.generation.max_new_tokens,
                apply_chat_template=cfg.data.apply_chat_template,
            )
        self.log = MetricsLogger(self.run_dir, cfg.logging, cfg.run.name, enabled=self.is_main, config_dict=asdict(cfg))
        self.samples = SampleLog(
            self.run_dir, cfg.logging.samples_max_mb, enabled=self.is_main and cfg.logging.samples_per_step > 0
        )

    # --- checkpoints -----------------------------------------------------------------------

    def _save(self, step: int, reason: str) -> None:
        extra = {
            "step": step,
            "sampler": self.sampler.state_dict(),
            "rng": _python_rng_state(),
            "nonfinite": {"consecutive": self.consecutive_nonfinite, "total": self.total_nonfinite},
            "reason": reason,
        }
        path = checkpoint_dir(self.ckpt_root, step)
        if path.exists():
            return  # already saved this step (e.g. periodic save, then a signal)
        start = time.perf_counter()
        self.actor.save_checkpoint(str(path), extra)
        if self.is_main:
            prune_checkpoints(self.ckpt_root, self.cfg.trainer.keep_last_k)
            self.console(f"[igrpo] saved checkpoint {path} ({reason}, {time.perf_counter() - start:.1f} s)")

    def _resume(self) -> int:
        path = _broadcast(latest_checkpoint(self.ckpt_root) if self.is_main else None)
        if path is None:
            if self.is_main:
                truncate_metrics(self.log.path, 0)  # a fresh run: drop records of an earlier try
                self.samples.truncate(0)
            return 0
        extra = self.actor.load_checkpoint(str(path))
        self.sampler.load_state_dict(extra["sampler"])
        _set_python_rng_state(extra["rng"])
        self.consecutive_nonfinite = extra["nonfinite"]["consecutive"]
        self.total_nonfinite = extra["nonfinite"]["total"]
        step = int(extra["step"])
        if self.is_main:
            truncate_metrics(self.log.path, step)
            self.samples.truncate(step)
            self.console(f"[igrpo] resuming from {path} (step {step})")
        self._sync_weights()  # the generator starts from the initial weights: give it the checkpoint's
        return step

    # --- phases ----------------------------------------------------------------------------

    def _sync_weights(self) -> float:
        """Stream the actor's weights into the generator (collective over the actor's ranks)."""
        start = time.perf_counter()
        named = self.actor.export_hf_weights()
        if self.generator is not None:
            self.generator.update_weights(named)  # every rank's own engine, from its own export
        elif self.is_main:
            self.backend.update_weights(named)
        else:
            for _ in named:  # the export is collective: every rank walks it
                pass
        return time.perf_counter() - start

    def _evaluate(self, step: int) -> dict:
        if not self.eval_problems:
            return {}
        metrics = {}
        if self.is_main:
            from nemo_igrpo.evaluation.evaluate import evaluate

            with self._generation_session():
                res = evaluate(
                    self.backend,
                    self.eval_prompts,
                    self.rewards,
                    self.eval_problems,
                    self.cfg.eval,
                    max_new_tokens=self.cfg.generation.max_new_tokens,
                    stop_token_ids=[self.tokenizer.eos_token_id],
                    seed=self.cfg.seed,
                    name="held-out",
                )
            metrics = res.as_metrics("eval")
            metrics["timing/eval_s"] = res.seconds
        elif self.generator is not None:
            self.generator.serve()
        return _broadcast(metrics)

    @contextmanager
    def _generation_session(self):
        """Rank 0's side of data-parallel generation: the other ranks serve generate() calls
        until this block ends (on success or error)."""
        try:
            yield
        finally:
            if self.generator is not None and self.is_main:
                self.generator.end_session()

    def _train_on(self, samples: list, timer: _Timer) -> dict:
        """Old log-probs from the trainer (the ratio's denominator), the train/inference
        mismatch, optional reference log-probs, then the update(s).

        With one optimizer step per batch (the default) the old log-probs are the update's own
        forward pass, detached: the same weights, so the same numbers, one forward pass fewer.
        A separate pass runs when later mini-batches would see updated weights, or when
        algorithm.recompute_old_logprobs asks for it."""
        metrics: dict[str, float] = {}
        algo = self.cfg.algorithm
        for s in samples:
            gen = s.generation_logprobs
            if gen is not None and not bool(torch.isfinite(gen).all()):
                # The generator's weights went non-finite before the trainer's did (it got the
                # last update): report it; the loss never uses the generator's log-probs.
                s.generation_logprobs = None
                metrics["generation/nonfinite_logprobs"] = 1.0
        if metrics:
            logger.warning("the generator returned non-finite log-probs; mismatch not measured for those samples")
        if algo.recompute_old_logprobs or algo.minibatches_per_step > 1:
            with timer.phase("logprobs"):
                train_lp = self.actor.compute_logprobs(samples)
            if not all(bool(torch.isfinite(lp).all()) for lp in train_lp):
                # The policy itself has gone non-finite (e.g. a diverged update): there is nothing
                # sound to train on. Count it with the other non-finite steps and skip the update.
                logger.warning("non-finite log-probs from the policy; skipping this step's update")
                return {"skipped": 1.0, "nonfinite/logprobs": 1.0}
            for s, lp in zip(samples, train_lp):
                s.old_logprobs = lp
        else:
            for s in samples:
                s.old_logprobs = None  # the actor uses the update's forward pass, detached
        if self.cfg.algorithm.kl_beta > 0:
            with timer.phase("ref_logprobs"):
                ref = self.actor.compute_logprobs(samples, reference=True)
            for s, lp in zip(samples, ref):
                s.ref_logprobs = lp
        updates = []
        with timer.phase("update"):
            for chunk in _split(samples, self.cfg.algorithm.minibatches_per_step):
                updates.append(
                    self.actor.train_step(chunk, self.loss_fn, max_response_length=self.cfg.generation.max_new_tokens)
                )
        skipped = sum(u.get("skipped", 0.0) for u in updates)
        from nemo_igrpo.algorithms.losses import finalize_loss_metrics

        for key in updates[-1] if updates else []:
            vals = [u[key] for u in updates if key in u]
            metrics[key] = float(sum(vals) / len(vals)) if key != "skipped" else float(skipped)
        # Measured against the weights the samples were generated with: the first mini-batch's
        # update (later ones see weights the generator never had).
        first = updates[0] if updates else {}
        metrics.pop("logprob_mismatch", None)
        metrics.pop("logprob_mismatch_tokens", None)
        if "logprob_mismatch" in first:
            from nemo_igrpo.generation.common import warn_on_logprob_mismatch

            value = first["logprob_mismatch"]
            metrics["generation/logprob_mismatch"] = value
            if self.is_main:
                warn_on_logprob_mismatch(
                    value, int(first["logprob_mismatch_tokens"]), self.cfg.generation.logprob_mismatch_warn
                )
        return finalize_loss_metrics(metrics)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._setup()
        self.stop.install()
        start_step = self._resume()
        self._open_progress_bar(start_step)
        result = TrainResult(run_dir=self.run_dir, last_step=start_step, resumed_from=start_step or None)
        try:
            if start_step == 0:
                ev = self._evaluate(0)
                if ev:
                    result.eval_history.append({"step": 0, **ev})
                    self.log.log({"step": 0, **ev})
                    if self.is_main:
                        self.console(f"[igrpo] step 0 (before training): held-out accuracy {ev['eval/accuracy']:.3f}")
            for step in range(start_step + 1, cfg.trainer.max_steps + 1):
                rec = self._step(step)
                result.last_step = step
                is_last = step == cfg.trainer.max_steps
                if (cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0) or is_last:
                    ev = self._evaluate(step)
                    rec.update(ev)
                    if ev:
                        result.eval_history.append({"step": step, **ev})
                self.log.log(rec)
                if self.bar is not None:
                    self.bar.update(1)
                if self.is_main:
                    self.console(step_summary(rec, cfg.trainer.max_steps))
                if self.consecutive_nonfinite >= cfg.trainer.max_consecutive_nonfinite:
                    self._save(step, "non-finite loss")
                    raise TrainingAborted(
                        f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                        f"(trainer.max_consecutive_nonfinite={cfg.trainer.max_consecutive_nonfinite}); the updates "
                        f"were skipped and a checkpoint was saved at {checkpoint_dir(self.ckpt_root, step)}. "
                        "Lower policy.optimizer.lr, check the data and rewards, or use bf16/fp32 consistently."
                    )
                if _all_ranks_agree(self.stop.requested):
                    self._save(step, "signal")
                    result.stopped_by_signal = True
                    break
                if (cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or is_last:
                    self._save(step, "periodic" if not is_last else "final")
            if not result.stopped_by_signal and result.last_step == cfg.trainer.max_steps and cfg.trainer.export_hf:
                # What `igrpo eval RUN_DIR`, vLLM and transformers load (collective over ranks).
                self.actor.save_hf(str(self.run_dir / "hf"))
                if self.is_main:
                    self.console(f"[igrpo] exported the trained policy to {self.run_dir / 'hf'} (Hugging Face format)")
        finally:
            self.stop.restore()
            self.close()
        return result

    def _step(self, step: int) -> dict:
        timer = _Timer(self.bar)
        t0 = time.perf_counter()
        batch = None
        failure = None
        if self.is_main:
            before = self.sampler.state_dict()
            try:
                with timer.phase("rollout"), self._generation_session():
                    problems = self.sampler.next_batch()
                    batch = self.rollout.run(problems, step)
            except (GenerationServerError, RewardTermFailing) as e:
                # Nothing of this step has touched the policy: put the data order back so the
                # checkpoint of the previous step resumes exactly here once the cause is fixed.
                self.sampler.load_state_dict(before)
                failure = (type(e).__name__, str(e))
        elif self.generator is not None:
            with timer.phase("rollout"):
                self.generator.serve()  # this rank's engine generates its share of the rollout
        # Every rank learns of rank 0's failure (they wait here), saves and stops the same way.
        failure = _broadcast(failure)
        if failure is not None:
            kind, message = failure
            if step > 1:
                self._save(
                    step - 1, "generation server failure" if kind == "GenerationServerError" else "reward failure"
                )
            saved = (
                f"No work was lost: the last completed step is checkpointed under {self.ckpt_root}; "
                if step > 1
                else ""
            )
            if kind == "GenerationServerError":
                raise GenerationServerError(
                    f"step {step}: {message}. {saved}rerun the same command when the server is back to resume."
                )
            raise RewardTermFailing(f"step {step}: {message}. {saved}rerun the same command to resume once fixed.")
        batch = _broadcast(batch)
        if self.is_main and batch.records:
            self._log_samples(step, batch.records)
        sampler_state = _broadcast(self.sampler.state_dict() if self.is_main else None)
        self.sampler.load_state_dict(sampler_state)
        rec: dict[str, Any] = {"step": step}
        rec.update(batch.metrics)
        weights_dropped = False
        engine = self._engine_here()
        if batch.samples:
            if engine is not None:
                # A colocated engine hands its GPU memory to the update (sleep mode); see
                # GenerationBackend.sleep for the order of calls.
                with timer.phase("generator_sleep"):
                    weights_dropped = bool(engine.sleep())
            rec.update(self._train_on(batch.samples, timer))
        else:
            rec["update/empty_batch"] = 1.0  # e.g. every group dropped by dynamic sampling
        skipped = rec.get("skipped", 0.0) > 0
        if skipped:
            self.consecutive_nonfinite += 1
            self.total_nonfinite += 1
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.consecutive_nonfinite
            )
        else:
            self.consecutive_nonfinite = 0
        rec["nonfinite/total"] = float(self.total_nonfinite)
        # The export is collective: every rank must agree whether it runs. A sleeping engine that
        # dropped its weights needs them back even when this step's update was skipped.
        weights_dropped = _all_ranks_agree(weights_dropped)
        if torch.cuda.is_available():
            # Hand the update's cached activation blocks back to the driver before the engine
            # wakes into the same GPU (the launcher's memory check counts on it).
            torch.cuda.empty_cache()
        if batch.samples and (not skipped or weights_dropped):
            with timer.phase("weight_sync"):
                self._sync_weights()
        if engine is not None:
            with timer.phase("generator_wake"):
                engine.wake_up()
        for name, secs in timer.times.items():
            rec[f"timing/{name}_s"] = secs
        rec["timing/step_s"] = time.perf_counter() - t0
        n_tokens = sum(s.response_length for s in batch.samples)
        rec["throughput/trained_tokens_per_s"] = n_tokens / max(rec["timing/step_s"], 1e-9)
        return rec

    def _log_samples(self, step: int, records: list[dict]) -> None:
        """What the model wrote this step: samples.jsonl, TensorBoard text, a W&B table. A
        logging failure (disk full, a W&B hiccup) is reported, never allowed to stop the run."""
        try:
            self.samples.write(records)
            self.log.log_samples(step, records)
        except Exception as e:
            logger.warning("step %d: could not log samples: %s", step, e)

    def _engine_here(self):
        """This rank's generation engine, if it has one (rank 0 always; every rank with
        data-parallel generation)."""
        return self.generator if self.generator is not None else (self.backend if self.is_main else None)

    def _open_progress_bar(self, start_step: int) -> None:
        """One bar for the run (steps done, current phase: rollout = drafts + refinements,
        logprobs, update, weight_sync); console lines go through it so they do not break it."""
        self.bar = None
        if not (self.is_main and self.cfg.trainer.progress_bars):
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.cfg.trainer.max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            file=run_console.progress_stream(),
        )
        plain_console = self.console
        if plain_console is run_console.echo and run_console.active():
            # The console session clears and redraws the bar around each of its lines (the
            # bar draws on the saved terminal, which tqdm.write does not know about).
            run_console.attach_progress_bar(self.bar)
        elif plain_console in (print, run_console.echo):
            self.console = lambda msg: self.bar.write(msg)

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            run_console.attach_progress_bar(None)
            self.bar.close()
        closers = [
            getattr(self, "generator", None) or getattr(self, "backend", None),
            getattr(self, "rewards", None),
            getattr(self, "log", None),
        ]
        for closer in closers:
            if closer is not None:
                try:
                    closer.close()
                except Exception as e:  # closing must not hide the error that got us here
                    logger.warning("while closing %s: %s", type(closer).__name__, e)


def train(cfg: IGRPOConfig, console=run_console.echo) -> TrainResult:
    logging.basicConfig(
        level=os.environ.get("IGRPO_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Trainer(cfg, console=console).run()
