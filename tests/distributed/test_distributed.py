"""Two CPU processes under `accelerate launch` (gloo): global whitening and identical weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_two_process_reft(tmp_path):
    script = Path(__file__).parent / "distributed_reft.py"
    # --multi_gpu is accelerate's torchrun launcher; with no CUDA, reftkit runs it on gloo (CPU).
    # (`--cpu` would start a single process, or go through MPI.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    # Both processes end with bit-identical policy + value head weights.
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    # Whitening used the global batch: per rollout, mean 0 and variance 1 hold over both
    # processes' tokens together, while each process's own shard is not centred on its own.
    assert len(ranks[0]["whitened"]) == len(ranks[1]["whitened"]) == 2
    local_offsets = []
    for (s0, q0, n0), (s1, q1, n1) in zip(ranks[0]["whitened"], ranks[1]["whitened"], strict=True):
        n = n0 + n1
        assert (s0 + s1) / n == pytest.approx(0.0, abs=1e-4)
        assert (q0 + q1) / n == pytest.approx(1.0, abs=1e-3)
        local_offsets.append(abs(s0 / n0))
    assert max(local_offsets) > 1e-3  # local whitening would make every one of these 0

    # GRPO with dropped groups: the k samples of a question stay on one process (group statistics
    # are exact), and processes with different numbers of kept rows still end identical.
    assert ranks[0]["grpo_sha256"] == ranks[1]["grpo_sha256"]
    assert ranks[0]["dropped"] == ranks[1]["dropped"] and all(d is not None for d in ranks[0]["dropped"])
    assert ranks[0]["kept_rows"] != ranks[1]["kept_rows"]  # the padding path ran (seed 5 gives uneven groups)

    # Reusing the run's directory is refused with the same message on both processes.
    assert ranks[0]["refused"] == ranks[1]["refused"] and "not empty" in ranks[0]["refused"]

    final = Path(ranks[0]["final"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)
