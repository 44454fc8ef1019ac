"""The trainer's calls into the generation backend, in order (GPU-path issue, item 7): a
colocated engine must sleep before the update and wake (weights first, then KV cache) for the
weight sync and the next rollout; when sleeping dropped its weights, they are sent even if the
update was skipped. A real run (megatron actor, megatron generation backend, tiny model) whose
backend is wrapped to record the calls; the wrapper changes nothing except, on one step,
reporting that sleep dropped the weights as vLLM's level-2 sleep does on a GPU."""

from __future__ import annotations


from helpers import REPO

RECORDED = ("generate", "sleep", "update_weights", "wake_up")


class RecordingBackend:
    def __init__(self, inner, calls: list, dropped_on_sleep: dict[int, bool]):
        self._inner, self._calls, self._dropped = inner, calls, dropped_on_sleep
        self._sleeps = 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in RECORDED:
            return attr

        def recorded(*args, **kwargs):
            self._calls.append(name)
            if name == "update_weights":
                args = (list(args[0]),)  # consume the export as a real backend would
            out = attr(*args, **kwargs)
            if name == "sleep":
                self._sleeps += 1
                return self._dropped.get(self._sleeps, bool(out))
            return out

        return recorded


def _collapse(calls: list[str]) -> list[str]:
    out: list[str] = []
    for c in calls:
        if not (out and out[-1] == c == "generate"):
            out.append(c)
    return out


def test_sleep_update_wake_order(tiny_llama_dir, tmp_path):
    from nemo_igrpo.algorithms.trainer import Trainer
    from nemo_igrpo.config.loader import load_config
    from nemo_igrpo.demo.task import split_pairs, write_jsonl

    train, held_out = split_pairs(0, 16)
    write_jsonl(train[:50], tmp_path / "train.jsonl")
    write_jsonl(held_out[:4], tmp_path / "eval.jsonl")
    cfg = load_config(
        REPO / "conf" / "demo.yaml",
        [
            f"policy.model.hf_path={tiny_llama_dir}",
            f"data.train_path={tmp_path / 'train.jsonl'}",
            f"data.eval_path={tmp_path / 'eval.jsonl'}",
            f"run.dir={tmp_path / 'run'}",
            "data.prompts_per_step=2",
            "algorithm.num_drafts=1",
            "algorithm.num_refinements=2",
            "generation.max_new_tokens=4",
            "generation.backend=megatron",
            "trainer.max_steps=3",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.export_hf=false",
            "trainer.progress_bars=false",
            "eval.num_samples=1",
            "logging.tensorboard=false",
        ],
    )
    calls: list[str] = []
    skip_steps = {2, 3}

    class Recorded(Trainer):
        def _setup(self):
            super()._setup()
            # Step 2's sleep reports dropped weights (vLLM sleep level 2); step 3's does not.
            self.backend = RecordingBackend(self.backend, calls, dropped_on_sleep={2: True, 3: False})
            self.rollout.backend = self.backend

        def _train_on(self, samples, timer):
            metrics = super()._train_on(samples, timer)
            if self._current_step in skip_steps:
                metrics["skipped"] = 1.0  # as a non-finite loss would: the update did not happen
            return metrics

        def _step(self, step):
            self._current_step = step
            return super()._step(step)

    Recorded(cfg, console=lambda msg: None).run()
    assert _collapse(calls) == [
        "generate",  # held-out evaluation before training + step 1's drafts and refinements
        "sleep",
        "update_weights",
        "wake_up",
        "generate",  # step 1: trained, synced
        "sleep",
        "update_weights",
        "wake_up",
        "generate",  # step 2: skipped, but the weights were dropped
        "sleep",
        "wake_up",
        "generate",  # step 3: skipped, weights kept: nothing to send; final evaluation
    ], calls
