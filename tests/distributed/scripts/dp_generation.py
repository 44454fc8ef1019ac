"""Run under torchrun (2 CPU processes, actor DP=2). Usage: dp_generation.py MODE MODEL_DIR DATA_DIR OUT_DIR

MODE "dp": generation.data_parallel=true (a vLLM engine on each rank); "single": rank 0's engine
only. Records, on rank 0, a greedy rollout (token ids, rewards, advantages), then, after an
update of the policy and a weight sync, a second greedy rollout and an evaluation; and on every
rank, what its own engine (if any) generates greedily after the sync. The test compares modes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[3]

from nemo_igrpo.algorithms.trainer import Trainer  # noqa: E402
from nemo_igrpo.config.loader import load_config  # noqa: E402
from nemo_igrpo.generation.interface import SamplingParams  # noqa: E402
from nemo_igrpo.utils import collectives  # noqa: E402


def main() -> None:
    # vLLM starts its engine core with multiprocessing "spawn", which re-imports this file in the
    # child: everything runs under the __main__ guard.
    mode, model, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    if os.environ.get("IGRPO_TEST_DUMP_AFTER_S"):  # debugging a hang: every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["IGRPO_TEST_DUMP_AFTER_S"]), exit=True)
    cfg = load_config(
        REPO / "conf" / "demo.yaml",
        [
            f"policy.model.hf_path={model}",
            f"data.train_path={data / 'train.jsonl'}",
            f"data.eval_path={data / 'eval.jsonl'}",
            f"run.dir={out / ('run_' + mode)}",
            "data.prompts_per_step=4",
            "algorithm.num_drafts=2",
            "algorithm.num_refinements=2",
            "generation.max_new_tokens=8",
            "generation.temperature=0",
            "eval.temperature=0",
            "eval.num_samples=1",
            f"generation.data_parallel={'true' if mode == 'dp' else 'false'}",
            "trainer.progress_bars=false",
            "logging.tensorboard=false",
            "reward.num_workers=0",
            "reward.terms=[{name: math_accuracy, weight: 1.0}, {name: 'e2e_rewards:digit_fraction', weight: 1.0}]",
        ],
    )
    trainer = Trainer(cfg, console=lambda m: None)
    trainer._setup()
    rank = collectives.rank()
    report: dict = {"engines": trainer.generator is not None or rank == 0}

    def rollout(step: int):
        if trainer.is_main:
            with trainer._generation_session():
                batch = trainer.rollout.run(trainer.sampler.next_batch(), step)
            out = {
                "tokens": [s.token_ids for s in batch.samples],
                "advantages": [s.advantage for s in batch.samples],
                "rewards": {k: v for k, v in batch.metrics.items() if k.startswith("reward/") and "seconds" not in k},
            }
            return collectives.broadcast_object((out, batch.samples))
        if trainer.generator is not None:
            trainer.generator.serve()
        return collectives.broadcast_object(None)

    report["step1"], samples = rollout(1)
    # An update with fixed advantages (greedy groups have none), then the weight sync of a real step.
    for i, s in enumerate(samples):
        s.advantage = 1.0 if i % 2 else -1.0
    trainer.actor.train_step(samples, trainer.loss_fn)
    trainer._sync_weights()
    report["step2"], _ = rollout(2)
    report["eval"] = trainer._evaluate(2)
    report["eval"] = {k: v for k, v in report["eval"].items() if not k.startswith("timing")}
    engine = trainer.generator.local if trainer.generator is not None else (trainer.backend if rank == 0 else None)
    if engine is not None:  # this rank's own engine after the sync
        probe = [trainer.tokenizer.encode("max(12,34)="), trainer.tokenizer.encode("max(77,41)=")]
        report["own_engine"] = [
            r[0].token_ids for r in engine.generate(probe, SamplingParams(temperature=0, max_new_tokens=8))
        ]
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    trainer.close()


if __name__ == "__main__":
    main()
