"""Runs that would end with exit 0 and a wrong result, or lose work: each test failed
before the fix. Gradient accumulation, output-directory ownership, resume with changed settings,
non-finite guards, damaged checkpoints, full disks and unwritable directories."""

import errno
import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import LENGTHS, reft_config, sft_config, weights
from reftkit.config import OnlineSTConfig, ReFTConfig, SFTConfig
from reftkit.trainers import reft as reft_module
from reftkit.trainers import sft as sft_module
from reftkit.trainers.reft import train_reft
from reftkit.trainers.sft import train_sft
from reftkit.training import checkpoints
from reftkit.training.checkpoints import (
    RUN_FILE,
    STATE_FILE,
    config_changes,
    latest_checkpoint,
    prune_checkpoints,
    step_checkpoints,
)
from reftkit.training.errors import NonFiniteError, RunError


def strict_rows(run_dir):
    """metrics.jsonl rows, parsed as strict JSON (a bare NaN or Infinity is an error)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- gradient accumulation

def test_grad_accum_makes_one_optimizer_step_per_two_micro_batches(tmp_path, splits, tiny_checkpoint):
    steps = []
    hook = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        train_sft(sft_config(tmp_path, tiny_checkpoint, batch_size=8, grad_accum=2), splits[0])
    finally:
        hook.remove()
    # 48 examples / 8 = 6 micro-batches = 3 optimiser steps per epoch, 2 epochs
    assert len(steps) == 6
    rows = [r for r in strict_rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The linear schedule spans the real number of steps: the last one still trains, at 1/6 of the peak.
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * (6 - i) / 6 for i in range(6)])


def test_commands_that_cannot_accumulate_do_not_accept_grad_accum():
    with pytest.raises(ValidationError, match="grad_accum"):
        ReFTConfig(grad_accum=2)
    assert OnlineSTConfig(grad_accum=2).grad_accum == 2  # Online-ST runs the same accumulating loop as SFT


# ----------------------------------------------------------------------------- output directories

def test_fresh_run_refuses_a_directory_holding_another_run(tmp_path, splits, tiny_checkpoint):
    first = train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1), splits[0])
    before = weights(first)
    with pytest.raises(RunError, match="not empty .*--resume.*--overwrite_output_dir"):
        train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, lr=5e-3), splits[0])
    assert all(torch.equal(before[k], weights(first)[k]) for k in before)  # nothing touched


def test_overwrite_output_dir_replaces_only_what_a_run_writes(tmp_path, splits, tiny_checkpoint):
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=2), splits[0])
    (tmp_path / "notes.txt").write_text("mine")
    old_id = json.loads((tmp_path / RUN_FILE).read_text())["run_id"]
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, overwrite_output_dir=True), splits[0])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / RUN_FILE).read_text())["run_id"] != old_id
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint-3"]  # the old checkpoint-6 is gone
    assert [r["step"] for r in strict_rows(tmp_path) if "loss" in r] == [1, 2, 3]  # not appended to the old log


def test_pruning_and_resume_touch_only_the_runs_own_checkpoints(tmp_path):
    class Main:
        is_main_process = True

    for step, run_id in ((8, "other"), (10, "other"), (1, "mine"), (2, "mine"), (3, "mine")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"run_id": run_id}))
    (tmp_path / "checkpoint-best").mkdir()  # a stray directory: neither a crash nor a candidate
    prune_checkpoints(Main(), tmp_path, "mine")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-10", "checkpoint-2", "checkpoint-3", "checkpoint-8", "checkpoint-best"]
    assert [p.name for p in step_checkpoints(tmp_path, "mine")] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"


def test_overwrite_leaves_a_stray_checkpoint_best_alone(tmp_path, splits, tiny_checkpoint):
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-best" / "model.txt").write_text("the user's pick")
    with pytest.raises(RunError, match="checkpoint-best"):
        train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1), splits[0])
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, overwrite_output_dir=True), splits[0])
    assert (tmp_path / "checkpoint-best" / "model.txt").read_text() == "the user's pick"
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_run_summary_counts_cut_prompts_and_targets(tmp_path, splits, tiny_checkpoint):
    train_sft(sft_config(tmp_path / "long", tiny_checkpoint, epochs=1), splits[0])
    assert json.loads((tmp_path / "long" / RUN_FILE).read_text())["summary"]["prompts_cut"] == 0
    train_sft(sft_config(tmp_path / "short", tiny_checkpoint, epochs=1, max_prompt_tokens=8, max_length=40), splits[0])
    summary = json.loads((tmp_path / "short" / RUN_FILE).read_text())["summary"]
    assert summary["prompts_cut"] == summary["prompts"] == len(splits[0])  # every synthetic prompt is > 8 tokens
    assert summary["sft_targets_cut"] > 0


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_or_deepspeed_without_a_gpu_is_refused_not_run_as_ddp(monkeypatch, variable):
    from reftkit.training.device import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, "true")
    with pytest.raises(RunError, match="no GPU: accelerate would run plain DDP"):
        make_accelerator(SFTConfig())


def test_demo_refuses_an_earlier_demos_directory(tmp_path, monkeypatch):
    from reftkit.commands import demo
    from reftkit.config import DemoConfig

    (tmp_path / "results.json").write_text("{}")
    monkeypatch.setattr(demo, "make_splits", lambda *a: pytest.fail("worked before the check"))
    with pytest.raises(RunError, match="not empty: rerun the demo with --overwrite_output_dir"):
        demo.run_demo(DemoConfig(output_dir=tmp_path, progress=False))


def test_reproduce_refuses_a_section_of_a_method_it_does_not_run():
    from reftkit.config import ReproduceConfig

    with pytest.raises(ValidationError, match="section 'online_st' is given but online_st is not in methods"):
        ReproduceConfig(demo=True, methods=["sft", "reft"], online_st={"lr": 1e-3})
    assert ReproduceConfig(demo=True, methods=["grpo"], reft={"lr": 1e-4}).stage("grpo").lr == 1e-4  # RL budget


def test_unwritable_output_dir_fails_before_any_work(tmp_path, splits, tiny_checkpoint, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    from reftkit.training import loop

    monkeypatch.setattr(loop, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(RunError, match="is not writable"):
        train_sft(sft_config(blocker / "run", tiny_checkpoint), splits[0])


def test_eval_checks_writability_before_decoding(tmp_path, splits, tiny_checkpoint, monkeypatch):
    from reftkit.commands import evaluate as evaluate_cli
    from reftkit.config import EvalConfig
    from reftkit.writers import write_examples

    write_examples(tmp_path / "test.jsonl", splits[1])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(evaluate_cli, "evaluate_run", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(RunError, match="is not writable"):
        evaluate_cli.run_eval(EvalConfig(model=str(tiny_checkpoint), eval_file=str(tmp_path / "test.jsonl"),
                                         output_dir=blocker / "eval", progress=False, **LENGTHS))


# ----------------------------------------------------------------------------- resume

def test_resume_refuses_settings_that_change_the_run(tmp_path, splits, tiny_checkpoint):
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, save_every=1), splits[0])
    for change in ({"lr": 5e-3}, {"batch_size": 8}, {"train_file": "other.jsonl"}, {"epochs": 3}):
        with pytest.raises(RunError, match=f"{next(iter(change))}: "):
            train_sft(sft_config(tmp_path, tiny_checkpoint, save_every=1, resume=True, **{"epochs": 1, **change}),
                      splits[0])


def test_config_changes_accepts_only_the_documented_few():
    saved = {"lr": 1e-3, "epochs": 1, "lr_schedule": "constant", "warmup_ratio": 0.0, "eval_file": "a", "kl_coef": 0.05}
    refused, accepted = config_changes(saved, {**saved, "epochs": 2, "eval_file": "b"})
    assert refused == [] and accepted == ["epochs: 1 -> 2", "eval_file: 'a' -> 'b'"]
    refused, _ = config_changes(saved, {**saved, "kl_coef": 0.1, "lr_schedule": "linear", "epochs": 2})
    assert refused == ["epochs: 1 -> 2", "kl_coef: 0.05 -> 0.1", "lr_schedule: 'constant' -> 'linear'"]
    # A checkpoint of an older reftkit lacks newer options: not comparable, accepted and listed.
    refused, accepted = config_changes({**saved, "grad_accum": 1}, {**saved, "nonfinite": "stop"})
    assert refused == [] and accepted == ["grad_accum: 1 -> '(absent)'", "nonfinite: '(absent)' -> 'stop'"]


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path, splits, tiny_checkpoint):
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, save_every=2), splits[0])
    # As if killed after logging steps 3 and 4 of a longer run but before checkpointing them.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    for old in ("final", "checkpoint-3"):
        import shutil
        shutil.rmtree(tmp_path / old)
    train_sft(sft_config(tmp_path, tiny_checkpoint, epochs=1, save_every=2, resume=True), splits[0])
    steps = [r["step"] for r in strict_rows(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3]


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, splits, tiny_checkpoint, caplog):
    full = train_sft(sft_config(tmp_path / "full", tiny_checkpoint, epochs=2, save_every=1), splits[0])
    cut = tmp_path / "cut"
    train_sft(sft_config(cut, tiny_checkpoint, epochs=2, save_every=1), splits[0])
    import shutil
    shutil.rmtree(cut / "final")
    optimizer_file = next((cut / "checkpoint-6" / "accelerate_state").glob("optimizer*.bin"))
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="reftkit"):
        resumed = train_sft(sft_config(cut, tiny_checkpoint, epochs=2, save_every=1, resume=True), splits[0])
    assert optimizer_file.name in caplog.text and "checkpoint-6 is damaged" in caplog.text
    a, b = weights(full), weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # redone from checkpoint-5, same result


# ----------------------------------------------------------------------------- non-finite values

def nan_at(monkeypatch, step):
    real, count = sft_module.lm_loss, {"n": 0}

    def loss(model, batch):
        count["n"] += 1
        value, extra = real(model, batch)
        return (value * float("nan") if count["n"] == step else value), extra

    monkeypatch.setattr(sft_module, "lm_loss", loss)


def test_nonfinite_loss_stops_the_run_and_saves_nothing_nonfinite(tmp_path, splits, tiny_checkpoint, monkeypatch):
    nan_at(monkeypatch, step=5)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 5 \\(epoch 2, batch 2\\)"):
        train_sft(sft_config(tmp_path, tiny_checkpoint, save_every=1), splits[0])
    assert not (tmp_path / "final").exists()
    assert [p.name for p in step_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    for ckpt in step_checkpoints(tmp_path):
        assert all(torch.isfinite(t).all() for t in weights(ckpt).values())


def test_nonfinite_skip_skips_the_step_and_logs_strict_json(tmp_path, splits, tiny_checkpoint, monkeypatch):
    nan_at(monkeypatch, step=2)
    final = train_sft(sft_config(tmp_path, tiny_checkpoint, nonfinite="skip"), splits[0])
    assert all(torch.isfinite(t).all() for t in weights(final).values())
    rows = [r for r in strict_rows(tmp_path) if "loss" in r]
    assert [r["skipped"] for r in rows] == [False, True, False, False, False, False]
    assert rows[1]["loss"] is None  # NaN written as null


@pytest.mark.slow
def test_reft_stops_on_a_nonfinite_policy_loss(tmp_path, splits, warm_checkpoint, monkeypatch):
    real = reft_module.ppo.policy_loss
    monkeypatch.setattr(reft_module.ppo, "policy_loss", lambda *a: (real(*a)[0] * math.inf, real(*a)[1]))
    with pytest.raises(NonFiniteError, match="rollout batch 1, PPO epoch 1, minibatch 1"):
        train_reft(reft_config(tmp_path, warm_checkpoint), splits[0][:8])
    assert not (tmp_path / "final").exists() and not step_checkpoints(tmp_path)


def test_nonfinite_weights_are_never_saved(tmp_path, splits, tiny_checkpoint, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(NonFiniteError, match="non-finite"):
        train_sft(sft_config(tmp_path, tiny_checkpoint, save_every=1), splits[0])
    assert not step_checkpoints(tmp_path) and not (tmp_path / "final").exists()


def test_infinite_or_nan_settings_are_rejected():
    for value in (math.inf, math.nan):
        with pytest.raises(ValidationError, match="finite"):
            SFTConfig(lr=value)


# ----------------------------------------------------------------------------- full disk

def test_full_disk_keeps_the_last_checkpoint_and_no_partial(tmp_path, splits, tiny_checkpoint, monkeypatch):
    real, calls = checkpoints.save_hf_model, {"n": 0}

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_hf_model", filling)
    with pytest.raises(RunError, match="checkpoint-3: no space left on device.*previous checkpoint is intact"):
        train_sft(sft_config(tmp_path, tiny_checkpoint, save_every=1), splits[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == [
        "checkpoint-1", "checkpoint-2"]
