"""benchmarks/gpu_speed.py is meant for a GPU machine reached rarely and briefly: its `--smoke`
mode runs every code path on the CPU with tiny sizes, so it cannot first fail on the GPU."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_every_path_and_writes_json(tmp_path, capsys):
    gpu_speed = load_script()
    out = tmp_path / "sub" / "gpu.json"
    gpu_speed.main(["--smoke", "--out", str(out), "--hbm_tbs", "0.1", "--peak_tflops", "1"])
    record = json.loads(out.read_text())
    assert record["smoke"] and record["stopped_early"] is None
    assert record["ceilings"]["source"] == "flag" and record["ceilings"]["hbm_tb_s"] == 0.1
    assert {(r["path"], r["batch"]) for r in record["generation"]} == \
        {(p, b) for p in ("hf-bf16", "reftkit-rollout") for b in (1, 2)}
    for row in record["generation"]:
        assert row["tokens_per_s"] > 0 and row["roofline_tokens_per_s"] > row["roofline_with_kv_tokens_per_s"] > 0
    # The roofline of one decode step: every bf16 weight read once at 0.1 TB/s.
    params = record["model"]["params"]
    row = record["generation"][0]
    assert row["roofline_tokens_per_s"] == pytest.approx(row["batch"] / (2 * params / 0.1e12))
    (train,) = record["training"]
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] and math.isfinite(train["achieved_tflops"])
    # bf16 autocast in the scoring pass and the update: the first minibatch's ratio is exactly 1.
    (precision,) = record["precision"]
    assert precision["max_abs_logprob_diff"] == 0.0
    printed = capsys.readouterr().out
    assert "| hf-bf16 | 2 |" in printed and "| PPO update |" in printed


def test_budget_stops_early_and_keeps_what_it_measured(tmp_path):
    gpu_speed = load_script()
    out = tmp_path / "gpu.json"
    record = gpu_speed.main(["--smoke", "--out", str(out), "--budget_s", "0"])
    assert record["stopped_early"] and not record["generation"] and not record["training"]
    assert json.loads(out.read_text())["stopped_early"] == record["stopped_early"]


def test_ceilings_from_the_table_by_gpu_name():
    gpu_speed = load_script()
    rows = {name: (bw, peak) for name, bw, peak in gpu_speed.GPU_TABLE}
    first = {n: next(r for r in gpu_speed.GPU_TABLE if r[0] in n)[0]
             for n in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB")}
    assert first == {"NVIDIA H200": "H200", "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe",
                     "NVIDIA A100-SXM4-40GB": "A100"}
    assert rows["H200"] == (4.8, 989.0)
