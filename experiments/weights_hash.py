"""Does a refactoring change what is trained? The sha256 of the final weights of default runs, to compare
two code trees: run it once per tree and compare the JSON lines.

    PYTHONPATH=/path/to/old/src python experiments/weights_hash.py > old.json
    PYTHONPATH=src python experiments/weights_hash.py > new.json

SFT from the tiny model (greedy eval each epoch, checkpoints), then from its final: default ReFT (eval every
2 batches), GRPO, ReFT + SFT term, Online-ST; natural CoT, float32, one thread. Minutes on a CPU.
"""

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from reftkit.config import OnlineSTConfig, ReFTConfig, SFTConfig
from reftkit.data.synthetic import make_splits
from reftkit.trainers.online_st import train_online_st
from reftkit.trainers.reft import train_reft
from reftkit.trainers.sft import train_sft

torch.set_num_threads(1)
LENGTHS = {"max_prompt_tokens": 64, "max_length": 112, "progress": False, "bf16": "no"}


def hashes(directory) -> dict[str, str]:
    files = sorted(Path(directory).glob("*.safetensors"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}


def main() -> None:
    train, test = make_splits(64, 16, seed=1)
    out = Path(tempfile.mkdtemp())
    sft = train_sft(SFTConfig(model="tiny", output_dir=out / "sft", epochs=6, batch_size=16, lr=1e-2, save_every=3,
                              **LENGTHS), train, test)
    result = {"sft": hashes(sft)}
    rl = dict(model=str(sft), epochs=1, batch_size=4, num_samples=4, mini_batch_size=8, lr=1e-4, save_every=2,
              **LENGTHS)
    reft = train_reft(ReFTConfig(output_dir=out / "reft", eval_every=2, max_eval_examples=8, **rl), train[:16], test)
    result["reft"] = hashes(reft)
    result["grpo"] = hashes(train_reft(ReFTConfig(output_dir=out / "grpo", advantage="grpo", **rl), train[:16]))
    result["reft_sft"] = hashes(train_reft(ReFTConfig(output_dir=out / "reft_sft", sft_coef=0.1,
                                                      sft_coef_schedule="linear", **rl), train[:16]))
    result["online_st"] = hashes(train_online_st(OnlineSTConfig(model=str(sft), output_dir=out / "ost", batch_size=8,
                                                                num_samples=2, **LENGTHS), train[:16], test[:8]))
    rows = [json.loads(line) for line in (out / "reft" / "metrics.jsonl").read_text().splitlines()]
    result["reft_eval"] = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
