"""Run by tests/distributed/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on CPU.

Warm-up SFT then ReFT with two processes (gloo). Each process records the whitened advantages
of its local rollout shard and a hash of its final weights into OUT/rank{r}.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for conftest
from conftest import LENGTHS, tiny_model_dir, warmup_config  # noqa: E402
from reftkit.config import ReFTConfig  # noqa: E402
from reftkit.data.synthetic import make_splits  # noqa: E402
from reftkit.rl import ppo  # noqa: E402
from reftkit.trainers import reft as reft_module  # noqa: E402
from reftkit.trainers.sft import train_sft  # noqa: E402
from reftkit.training.device import process_state  # noqa: E402
from reftkit.training.errors import RunError  # noqa: E402

out = Path(sys.argv[1])
state = process_state()
train, _ = make_splits(48, 16, seed=1)
if state.is_main_process:
    tiny_model_dir(out / "tiny", train)
state.wait_for_everyone()
warm = train_sft(warmup_config(out / "tiny", out / "warm"), train)

whitened = []  # (sum of local whitened advantages, local token count) per rollout
real_whiten = ppo.masked_whiten


def recording_whiten(x, mask, all_reduce=None, eps=1e-8):
    w = real_whiten(x, mask, all_reduce, eps)
    whitened.append(((w * mask).sum().item(), (w * w * mask).sum().item(), mask.sum().item()))
    return w


ppo.masked_whiten = recording_whiten
policies = []
real_update = reft_module.ppo_update


def recording_update(accelerator, policy, *args, **kwargs):
    policies.append(accelerator.unwrap_model(policy))
    return real_update(accelerator, policy, *args, **kwargs)


reft_module.ppo_update = recording_update
cfg = ReFTConfig(model=str(warm), output_dir=out / "reft", epochs=1, batch_size=4, num_samples=2,
                 mini_batch_size=4, lr=1e-4, progress=False, seed=3, **LENGTHS)
final = reft_module.train_reft(cfg, train[:16])
digest = hashlib.sha256()
for name, tensor in sorted(policies[-1].state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().to(torch.float32).numpy().tobytes())
# GRPO with dropped uniform groups: each process keeps a different number of rows, padded with
# empty rows to the same count, so both run the same minibatches and end with the same weights.
grpo_cfg = ReFTConfig(model=str(warm), output_dir=out / "grpo", epochs=1, batch_size=4, num_samples=2,
                      mini_batch_size=2, lr=1e-4, progress=False, seed=5, advantage="grpo", drop_uniform_groups=True,
                      **LENGTHS)
kept_rows = []  # rows this process kept per rollout (the rest of its minibatch rows are padding)
real_keep = reft_module._keep_rows


def recording_keep(accelerator, batch, keep):
    kept_rows.append(int(keep.sum()))
    return real_keep(accelerator, batch, keep)


reft_module._keep_rows = recording_keep
policies.clear()
reft_module.train_reft(grpo_cfg, train[:16])
grpo_digest = hashlib.sha256()
for name, tensor in sorted(policies[-1].state_dict().items()):
    grpo_digest.update(name.encode())
    grpo_digest.update(tensor.detach().cpu().to(torch.float32).numpy().tobytes())
dropped = [json.loads(line).get("dropped_groups") for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]

# A second fresh run in the same directory is refused on every process (none is left waiting).
try:
    reft_module.train_reft(cfg, train[:16])
    refused = None
except RunError as e:
    refused = str(e)
(out / f"rank{state.process_index}.json").write_text(json.dumps(
    {"world": state.num_processes, "whitened": whitened, "weights_sha256": digest.hexdigest(),
     "final": str(final), "refused": refused, "grpo_sha256": grpo_digest.hexdigest(), "dropped": dropped,
     "kept_rows": kept_rows}))
