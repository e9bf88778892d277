"""bf16 autocast end to end (`bf16: yes`; CPU autocast stands in for a GPU's): sampling, the old
log-probs and values, the reference, the PPO update and evaluation all run in one precision.

What the first minibatch's ratio promises depends on what the kernels promise. When that minibatch
is the whole rollout, the update's forward is the scoring pass's very computation (same rows in the
same order, same shapes), so pi / pi_old is exactly 1 and the unchanged policy's KL exactly 0, on
any CPU or GPU. Another batch shape (a partial minibatch, the SFT term's wider forward) may pick other
kernels or blockings (AMX, AVX-512, cuBLAS by shape) that round bf16 differently: the claim there is
a tolerance, far inside the clip range, not bit-equality."""

import inspect
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import LENGTHS, REAL_CPU_BF16_UNITS
from reftkit.config import ReFTConfig, SFTConfig
from reftkit.modeling.loading import prepare_lm_for_training
from reftkit.modeling.model import PolicyWithValueHead, checkpointing_in_eval_mode, load_causal_lm
from reftkit.rl import ppo
from reftkit.training.device import make_accelerator


def bf16_reft_config(tmp_path, model, **kw):
    base = dict(model=str(model), output_dir=tmp_path, bf16="yes", epochs=1, batch_size=4, num_samples=2,
                mini_batch_size=8, ppo_epochs=1, lr=1e-3, progress=False, eval_batch_size=8, seed=3, **LENGTHS)
    return ReFTConfig(**{**base, **kw})


@pytest.fixture
def lm_calls(monkeypatch):
    """One row per forward of any Llama: (phase, autocast on, logits dtype); phase is "sample" or
    "greedy" inside `generate`, else "score" (old log-probs, values, reference, update)."""
    calls, phase = [], []
    real_generate = LlamaForCausalLM.generate

    def generate(self, *args, **kwargs):
        phase.append("sample" if kwargs["generation_config"].do_sample else "greedy")
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            phase.pop()

    def hook(module, args, output):
        if isinstance(module, LlamaForCausalLM):
            calls.append((phase[-1] if phase else "score", torch.is_autocast_enabled("cpu"), output.logits.dtype))

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield calls
    handle.remove()


@pytest.fixture
def first_objective(monkeypatch):
    """The arguments and terms of the first `ppo.ppo_objective` call of a run: the first minibatch,
    computed in the update's context before any optimiser step."""
    seen = {}
    real = ppo.ppo_objective
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        if not seen:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            seen.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                         for k, v in bound.arguments.items()})
            seen["terms"] = {k: v.detach().clone() for k, v in terms.items()}
        return loss, terms

    monkeypatch.setattr(ppo, "ppo_objective", spy)
    return seen


# Padded scoring: every row whole, so a row's numbers do not depend on the other rows of its batch.
# Prompt-shared scoring (`share_prompts`, where this reftkit has it) trims prompts and buckets
# responses by what else is in the batch: bit for bit only when the minibatch holds the rollout's rows.
PADDED = {"share_prompts": False} if "share_prompts" in ReFTConfig.model_fields else {}

# A bf16 log-prob may round differently under another batch shape: about 2.5e-4 measured on the tiny
# model (AMX CPU, 2026-12-07). 1e-2 bounds it with room for other kernels and is 20x inside the 0.2 clip.
BF16_SHAPE_TOLERANCE = 1e-2

# name: (options, exact): exact when the first minibatch is the whole rollout scored in the same shapes.
CASES = {
    # The first minibatch is 3 of the rollout's 8 rows: another batch shape than the rollout's passes.
    "reference model, value head, partial minibatch, padded scoring": (dict(mini_batch_size=3, **PADDED), False),
    "reference model, value head, default scoring": (dict(mini_batch_size=8), True),
    "LoRA (reference = adapters off), gradient checkpointing, KL in the loss":
        (dict(lora_r=4, lora_alpha=8, gradient_checkpointing=True, kl_in="loss"), True),
    # One forward over 4 rollout rows and their questions' reference CoTs, right-padded to the widest.
    "GRPO with the SFT term (one forward over rollout rows and reference CoTs)":
        (dict(advantage="grpo", sft_coef=0.2, mini_batch_size=4), False),
}


def assert_same(new: torch.Tensor, old: torch.Tensor, exact: bool):
    if exact:
        assert torch.equal(new, old)
    else:
        assert (new - old).abs().max().item() <= BF16_SHAPE_TOLERANCE


@pytest.mark.parametrize(("options", "exact"), CASES.values(), ids=list(CASES))
def test_bf16_run_starts_at_ratio_one_and_zero_kl(tmp_path, splits, tiny_checkpoint, lm_calls, first_objective,
                                                  options, exact):
    from reftkit.trainers.reft import train_reft

    train, test = splits
    cfg = bf16_reft_config(tmp_path / "run", tiny_checkpoint, **options)
    assert exact == (cfg.mini_batch_size >= 8 and not cfg.sft_coef)  # 4 questions x 2 samples per rollout
    final = train_reft(cfg, train[:8], test[:4])

    # Every forward ran under bf16 autocast: sampling, scoring/reference/update, greedy evaluation.
    assert {phase for phase, _, _ in lm_calls} == {"sample", "score", "greedy"}
    assert all(on and dtype == torch.bfloat16 for _, on, dtype in lm_calls), \
        sorted({(p, on, str(d)) for p, on, d in lm_calls if not on or d != torch.bfloat16})

    # First minibatch: log-probs (and values, and the reference) recomputed with gradients in the
    # update against the rollout's: bit for bit for the same computation, else within the tolerance;
    # either way nothing is clipped.
    first = first_objective
    mask = first["mask"].bool()
    assert mask.any()
    assert_same(first["logprobs"][mask], first["old_logprobs"][mask], exact)
    if exact:
        assert torch.equal(torch.exp(first["logprobs"] - first["old_logprobs"])[mask], torch.ones(int(mask.sum())))
    assert first["terms"]["clip_frac"].item() == 0.0
    if first["values"] is not None:
        assert_same(first["values"][mask], first["old_values"][mask], exact)
    if cfg.kl_in == "loss":
        assert_same(first["ref_logprobs"][mask], first["old_logprobs"][mask], exact)
        if exact:
            assert first["terms"]["kl_loss"].item() == 0.0

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "reward" in r]
    assert len(updates) == 2  # 8 questions / 4 per rollout batch
    assert updates[0]["kl"] == 0.0  # the first rollout's policy is its reference
    for r in updates:
        assert all(v is not None and math.isfinite(v) for v in r.values() if not isinstance(v, (str, bool)))
    assert any("eval_accuracy" in r for r in rows)

    # The checkpoint is a plain HF directory, float32 (autocast never touches the weights) and
    # finite. A random model earns no reward, so only the SFT term is sure to move the weights.
    lm = AutoModelForCausalLM.from_pretrained(final)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lm.parameters())
    if cfg.sft_coef:
        start = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in lm.state_dict().items())


def test_gradient_checkpointing_recomputes_in_bf16(tmp_path, tiny_checkpoint):
    """The backward's recomputation of checkpointed layers runs under the forward's autocast (the
    backward itself runs outside it): the same gradients, bit for bit, as keeping activations."""
    accelerator = make_accelerator(bf16_reft_config(tmp_path, tiny_checkpoint))
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    grads = []
    for checkpointing in (False, True):
        cfg = bf16_reft_config(tmp_path, tiny_checkpoint, gradient_checkpointing=checkpointing)
        policy = accelerator.prepare(PolicyWithValueHead(prepare_lm_for_training(load_causal_lm(cfg.model), cfg)))
        torch.manual_seed(1)
        torch.nn.init.normal_(policy.value_head.weight)  # a zero head sends no gradient into the backbone
        policy.eval()
        with accelerator.autocast(), checkpointing_in_eval_mode(policy):
            logits, values = policy("position_logits", ids, mask)
            loss = torch.log_softmax(logits.float(), -1)[..., 7].mean() + values.float().pow(2).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_bf16_setting_can_change_between_runs_in_one_process(tmp_path):
    """accelerate refuses a second Accelerator with another mixed precision in one process; a
    notebook, a pipeline or this test session switches freely, and each run gets what it asked for."""
    for bf16, expected in (("yes", True), ("no", False), ("yes", True), ("auto", torch.cuda.is_available())):
        accelerator = make_accelerator(SFTConfig(model="tiny", output_dir=tmp_path, bf16=bf16))
        assert accelerator.mixed_precision == ("bf16" if expected else "no")
        with accelerator.autocast():
            assert torch.is_autocast_enabled(accelerator.device.type) == expected


@pytest.mark.parametrize(("capability", "cuda", "expected"), [
    ({"amx_bf16": True, "avx512_bf16": True}, False, True),  # Sapphire Rapids and later
    ({"amx_bf16": False, "avx512_bf16": True}, False, True),  # Cooper Lake, Zen 4
    ({"amx_bf16": False, "avx512_bf16": False, "architecture": "x86_64"}, False, False),  # AVX2-only: emulated
    ({}, True, True),
])
def test_bf16_auto_follows_the_hardware(monkeypatch, capability, cuda, expected):
    """auto is on for CUDA and for CPUs whose matrix units run bf16 natively, read from torch's report."""
    from reftkit.training import device

    monkeypatch.setattr(device, "cpu_bf16_units", REAL_CPU_BF16_UNITS)  # undo conftest's pin
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    on, why = device.bf16_choice("auto")
    assert on == expected and why.startswith("--bf16 auto")
    assert ("amx_bf16" in why) == bool(capability.get("amx_bf16") and not cuda)
    assert device.bf16_choice("yes") == (True, "--bf16 yes") and device.bf16_choice("no") == (False, "--bf16 no")


def test_the_demo_runs_float32_unless_asked():
    """The tiny demo model is slower and learns worse under bf16 on a CPU (docs/cpu-bf16.md): `demo` and
    `reproduce --demo` pin float32 by default, and an explicit --bf16 is honoured."""
    from reftkit.config import DemoConfig, ReproduceConfig

    assert {c.bf16 for c in DemoConfig().stage_configs().values()} == {"no"}
    assert {c.bf16 for c in DemoConfig(bf16="yes").stage_configs().values()} == {"yes"}
    assert ReproduceConfig(demo=True).stage("reft").bf16 == "no"
    assert ReproduceConfig(demo=True, bf16="yes").stage("warmup").bf16 == "yes"
