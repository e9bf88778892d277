"""Short SFT and ReFT runs on a tiny model: checkpoints, metrics, and exact resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import LENGTHS, metrics, reft_config, sft_config, weights
from reftkit.config import SFTConfig
from reftkit.trainers import reft as reft_module
from reftkit.trainers.reft import train_reft
from reftkit.trainers.sft import train_sft
from reftkit.training import checkpoints as checkpoints_module
from reftkit.training.checkpoints import latest_checkpoint
from reftkit.training.metrics import Metrics


@pytest.mark.slow
def test_sft_then_reft_end_to_end(tmp_path, splits, warm_checkpoint):
    train, test = splits
    sft_dir = train_sft(sft_config(tmp_path / "sft", "tiny", eval_every_epoch=True), train, test)
    # A plain HF directory: loads without reftkit, and generates.
    lm = AutoModelForCausalLM.from_pretrained(sft_dir)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert lm.config.model_type == "llama" and tok.eos_token == "</s>"
    sft_rows = metrics(tmp_path / "sft")
    losses = [r["loss"] for r in sft_rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # 48 examples / 16 = 3 steps x 2 epochs
    assert [r["epoch"] for r in sft_rows if "eval_accuracy" in r] == [1, 2]
    preds = [json.loads(l) for l in (tmp_path / "sft" / "predictions-epoch2.jsonl").read_text().splitlines()]
    assert len(preds) == len(test) and set(preds[0]) == {"id", "question", "output", "extracted", "gold", "correct"}

    reft_dir = train_reft(reft_config(tmp_path / "reft", warm_checkpoint), train[:16], test)
    assert (reft_dir / "value_head.safetensors").exists()
    before, after = weights(warm_checkpoint), weights(reft_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # PPO changed the policy
    rows = [r for r in metrics(tmp_path / "reft") if "reward" in r]
    assert len(rows) == 2  # 16 questions / 8 per rollout batch
    for r in rows:  # 8 questions x 2 samples per rollout; each reward is 1 (correct), 0.1 (answered) or 0
        correct = r["train_accuracy"] * 16
        assert correct == pytest.approx(round(correct), abs=1e-6)
        assert r["train_accuracy"] - 1e-6 <= r["reward"] <= r["train_accuracy"] + 0.1 * (1 - r["train_accuracy"]) + 1e-6
        assert 1 <= r["response_tokens"] <= LENGTHS["max_length"] - LENGTHS["max_prompt_tokens"]
        assert r["value_loss"] > 0 and r["lr"] == 1e-4  # a fresh value head (V = 0) is wrong; constant rate
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    AutoModelForCausalLM.from_pretrained(reft_dir)


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, module, name, calls):
    real = getattr(module, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        if count["n"] == calls:
            raise Interrupt
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.slow
def test_reft_resume_matches_uninterrupted_run(tmp_path, splits, warm_checkpoint, monkeypatch):
    train, _ = splits
    cfg = dict(epochs=2, save_every=1)
    full = train_reft(reft_config(tmp_path / "full", warm_checkpoint, **cfg), train[:16])
    assert not torch.equal(weights(full)["model.norm.weight"], weights(warm_checkpoint)["model.norm.weight"])

    interrupt_after(monkeypatch, reft_module, "ppo_update", calls=3)  # dies in epoch 2, batch 2
    with pytest.raises(Interrupt):
        train_reft(reft_config(tmp_path / "cut", warm_checkpoint, **cfg), train[:16])
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    resumed = train_reft(reft_config(tmp_path / "cut", warm_checkpoint, resume=True, **cfg), train[:16])

    a, b = weights(full), weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert torch.allclose(load_file(str(full / "value_head.safetensors"))["weight"],
                          load_file(str(resumed / "value_head.safetensors"))["weight"], atol=1e-6)


def test_sft_resume_mid_epoch_matches_uninterrupted_run(tmp_path, splits, tiny_checkpoint, monkeypatch):
    train, _ = splits
    full = train_sft(sft_config(tmp_path / "full", tiny_checkpoint, save_every=1), train)
    # 3 steps per epoch: die after logging step 5, i.e. in epoch 2 with one batch of it consumed
    # and checkpointed (checkpoint-4): resume must skip exactly that batch of the same shuffle.
    interrupt_after(monkeypatch, Metrics, "log", calls=4)
    with pytest.raises(Interrupt):
        train_sft(sft_config(tmp_path / "cut", tiny_checkpoint, save_every=1), train)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-4"
    resumed = train_sft(sft_config(tmp_path / "cut", tiny_checkpoint, save_every=1, resume=True), train)
    a, b = weights(full), weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [r["step"] for r in metrics(tmp_path / "cut") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 5 is logged again by the resumed run, not lost


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, splits, tiny_checkpoint):
    with pytest.raises(checkpoints_module.RunError, match="no complete checkpoint"):
        train_sft(sft_config(tmp_path / "empty", tiny_checkpoint, resume=True), splits[0])


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, splits, tiny_checkpoint, monkeypatch):
    """A crash while writing a checkpoint must not leave a half-written checkpoint-* behind."""
    train, _ = splits
    real_save_state = checkpoints_module.Accelerator.save_state
    calls = {"n": 0}

    def failing_save_state(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return real_save_state(self, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module.Accelerator, "save_state", failing_save_state)
    with pytest.raises(Interrupt):
        train_sft(sft_config(tmp_path / "run", tiny_checkpoint), train)
    done = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert done == ["checkpoint-3"]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-3"


@pytest.mark.slow
@pytest.mark.parametrize("cot", ["natural", "program"])
def test_demo_runs_end_to_end_at_toy_size(tmp_path, capsys, cot):
    from reftkit.commands.demo import run_demo
    from reftkit.config import DemoConfig

    cfg = DemoConfig(output_dir=tmp_path, cot=cot, n_train=64, n_test=16, warmup={"epochs": 1}, sft={"epochs": 1},
                     reft={"max_train_examples": 16, "epochs": 1, "batch_size": 8, "num_samples": 2,
                           "mini_batch_size": 8}, progress=False)
    results = run_demo(cfg)
    assert list(results) == ["warm-up SFT", "SFT (continued)", "ReFT"]
    for r in results.values():  # each stage's accuracy is the share of its 16 graded test predictions
        graded = [json.loads(line) for line in (Path(r["model"]).parent / "test" / "predictions.jsonl").read_text()
                  .splitlines()]
        assert len(graded) == 16 and r["test_accuracy"] == sum(p["correct"] for p in graded) / 16
        AutoModelForCausalLM.from_pretrained(r["model"])
    table = capsys.readouterr().out
    assert "| ReFT |" in table and "| SFT (continued) |" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == results
    reft_rows = [json.loads(line) for line in (tmp_path / "reft" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "train_accuracy", "kl"} <= set(reft_rows[0])
    preds = [json.loads(line) for line in (tmp_path / "reft" / "test" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 16
    if cot == "program":  # outputs are whole programs, each graded by the sandbox with its exit status
        assert all(p["output"].startswith("def solution():") and p["detail"] for p in preds)


def perturbed_copy(source, destination, seed=0, std=0.02):
    """The model at `source` with noise added to every weight: a reference that differs from the policy."""
    lm = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    lm.save_pretrained(destination)
    return destination


def test_value_head_trains_at_value_head_lr_and_the_lm_at_lr(tmp_path, splits, tiny_checkpoint):
    """Through the real trainer. Adam's first step moves each weight by lr * sign(grad) (no weight
    decay), so the largest first-step change in each parameter group is that group's rate."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    lr, head_lr = 1e-4, 1e-2
    steps = []

    def before(optimizer, args, kwargs):
        steps.append({"lr": [g["lr"] for g in optimizer.param_groups],
                      "shapes": [[tuple(p.shape) for p in g["params"]] for g in optimizer.param_groups],
                      "old": [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]})

    def after(optimizer, args, kwargs):
        step = steps[-1]
        step["moved"] = [max((p.detach() - q).abs().max().item() for p, q in zip(g["params"], old, strict=True))
                         for g, old in zip(optimizer.param_groups, step.pop("old"), strict=True)]

    # A reference that differs from the policy puts a KL penalty on every token, so even an untrained
    # model (reward 0 on every sample) gives the policy and the value head non-zero gradients.
    ref = perturbed_copy(tiny_checkpoint, tmp_path / "ref")
    cfg = reft_config(tmp_path / "run", tiny_checkpoint, ref_model=str(ref), lr=lr, value_head_lr=head_lr,
                      batch_size=4, num_samples=2, mini_batch_size=8, kl_coef=0.5)
    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        train_reft(cfg, splits[0][:4])
    finally:
        for handle in handles:
            handle.remove()

    assert len(steps) == 2  # 4 questions x 2 samples = one minibatch of 8, times ppo_epochs=2
    hidden = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).config.hidden_size
    n_lm = len(list(AutoModelForCausalLM.from_pretrained(tiny_checkpoint).parameters()))
    (head,) = [i for i, shapes in enumerate(steps[0]["shapes"]) if shapes == [(1, hidden), (1,)]]
    (lm,) = [i for i, shapes in enumerate(steps[0]["shapes"]) if len(shapes) == n_lm]
    assert all(step["lr"][head] == head_lr and step["lr"][lm] == lr for step in steps)  # constant schedule
    assert steps[0]["moved"][head] == pytest.approx(head_lr, rel=1e-3)
    assert steps[0]["moved"][lm] == pytest.approx(lr, rel=1e-2)  # float32 weights near 1: rounding ~1e-7

    # The saved head is the trained one: it started at 0 and moved by at most ~head_lr per step.
    saved = load_file(str(tmp_path / "run" / "final" / "value_head.safetensors"))["weight"]
    assert 0.1 * head_lr < saved.abs().max().item() < 2 * 3.2 * head_lr  # at lr it would stay below 7e-4


def test_adamw_is_fused_on_cpu_and_steps_as_the_plain_loop():
    """make_optimizer takes AdamW's fused kernel where torch has it (this CPU); it updates as the loop does."""
    from reftkit.training.optim import make_optimizer

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    cfg = SFTConfig(model="tiny", output_dir="unused", lr=1e-2, weight_decay=0.1)
    fused, _ = make_optimizer(weights, cfg, total_steps=10)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(50) for _ in weights]
        for group, opt in ((weights, fused), (twins, plain)):
            for w, g in zip(group, grads, strict=True):
                w.grad = g.clone()
            opt.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, twins, strict=True))
