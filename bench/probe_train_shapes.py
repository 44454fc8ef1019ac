"""Same MegatronActor, iGRPO-shaped vs GRPO-shaped training batches (16 prompts, demo shapes: iGRPO
64 x (38-token prompt+draft + 24), GRPO 128 x (6 + 24)), interleaved in one process: separates
the structural cost of the update from machine contention.  python bench/probe_train_shapes.py"""

import sys, time, torch, statistics

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import _common as C
from nemo_igrpo.algorithms.config import AlgorithmConfig
from nemo_igrpo.algorithms.losses import make_loss_fn
from nemo_igrpo.policy.actor import MegatronActor
from nemo_igrpo.batch import TrainSample
from nemo_igrpo.policy.config import ModelConfig, PolicyConfig

m = C.tiny_model()
actor = MegatronActor(
    PolicyConfig(model=ModelConfig(hf_path=str(m)), max_tokens_per_microbatch=8192), seed=0, total_steps=100
)
loss_fn = make_loss_fn(AlgorithmConfig())
g = torch.Generator().manual_seed(0)


def batch(n, prompt_len, resp=24):
    return [
        TrainSample(
            token_ids=torch.randint(4, 100, (prompt_len + resp,), generator=g).tolist(),
            response_start=prompt_len,
            advantage=0.5,
            old_logprobs=torch.full((resp,), -4.0),
        )
        for _ in range(n)
    ]


shapes = {"igrpo 64x(38+24)": batch(64, 38), "grpo 128x(6+24)": batch(128, 6)}
t = {k: {"logprobs": [], "update": []} for k in shapes}
for i in range(6):
    for k, s in shapes.items() if i % 2 == 0 else reversed(list(shapes.items())):
        t0 = time.perf_counter()
        actor.compute_logprobs(s)
        t1 = time.perf_counter()
        actor.train_step(s, loss_fn)
        t2 = time.perf_counter()
        if i:
            t[k]["logprobs"].append(t1 - t0)
            t[k]["update"].append(t2 - t1)
for k, v in t.items():
    print(
        k,
        {p: round(statistics.median(x), 3) for p, x in v.items()},
        {p: [round(y, 2) for y in x] for p, x in v.items()},
    )
