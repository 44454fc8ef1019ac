"""Run bookkeeping without a model: pass@k, metrics truncation on resume, checkpoint discovery
and pruning (a half-written checkpoint is never picked), the demo task's data."""

from __future__ import annotations

import json
import random

import pytest

from nemo_igrpo.algorithms.checkpointing import latest_checkpoint, prune_checkpoints
from nemo_igrpo.evaluation.metrics import mean_pass_at_k, pass_at_k
from nemo_igrpo.utils.metrics_log import read_metrics, truncate_metrics


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one."""
    from itertools import combinations

    items = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 6, 2), (6, 5, 6), (8, 3, 4)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_mean_accuracy_and_errors():
    counts = [0, 1, 4, 2]
    assert mean_pass_at_k(counts, 4, 1) == pytest.approx(sum(counts) / 16)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_truncate_metrics_drops_later_steps_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]


def test_latest_checkpoint_ignores_half_written_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 10):
        (root / f"step_{s}").mkdir(parents=True)
    (root / "step_12.tmp").mkdir()  # a save killed half-way
    (root / "step_x").mkdir()
    assert latest_checkpoint(root).name == "step_10"
    removed = prune_checkpoints(root, keep_last_k=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_4"]
    assert {p.name for p in removed} >= {"step_2", "step_12.tmp"}
    assert latest_checkpoint(tmp_path / "none") is None


def test_demo_data_split_is_disjoint_and_correct(tmp_path):
    from nemo_igrpo.demo.task import all_pairs, is_tricky, units_digit_mistake, write_demo_data

    train, held = write_demo_data(tmp_path, seed=3, num_eval=50)
    tr = [json.loads(l) for l in train.read_text().splitlines()]
    ev = [json.loads(l) for l in held.read_text().splitlines()]
    assert len(ev) == 50 and len(tr) == 90 * 89 - 50
    assert not {r["problem"] for r in tr} & {r["problem"] for r in ev}
    for r in random.Random(0).sample(tr, 20):
        a, b = map(int, r["problem"][len("max(") : -len(")=")].split(","))
        assert int(r["answer"]) == max(a, b)
    assert units_digit_mistake(38, 45) == 38 and units_digit_mistake(31, 45) == 45
    assert is_tricky(38, 45) and not is_tricky(31, 45) and not is_tricky(35, 45)
    frac = sum(is_tricky(a, b) for a, b in all_pairs()) / len(all_pairs())
    assert 0.3 < frac < 0.6  # room for RL to gain: the warm start is wrong only on these


def test_demo_reads_the_whole_runs_evaluations(tmp_path):
    """A rerun of `igrpo demo` on a finished run dir reports that run's before/after accuracy
    from its metrics file (this invocation evaluated nothing)."""
    import json

    from nemo_igrpo.demo.run import _eval_accuracies

    metrics = tmp_path / "metrics.jsonl"
    recs = [
        {"step": 0, "eval/accuracy": 0.5},
        {"step": 1, "loss": 0.1},
        {"step": 2, "eval/accuracy": 0.75, "loss": 0.2},
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert _eval_accuracies(metrics) == {0: 0.5, 2: 0.75}
    assert _eval_accuracies(tmp_path / "absent.jsonl") == {}
