"""Step time and peak memory of the training options on SmolLM2-135M with real SVAMP questions.

    python benchmarks/train_options.py [--data ../shared/data/svamp/train_nl.json] [--pool 48]

Every configuration runs in a fresh subprocess, so its peak RSS (resource.getrusage ru_maxrss:
weights, gradients, optimiser state, activations and the Python/torch runtime) is its own. Each
runs one epoch over the same `pool` SVAMP examples (batch 8, at most 256 tokens) and reports the
mean seconds per AdamW step over it (no warm-up step: a 135M-parameter step takes tens of
seconds on 2 cores, so the first step's one-off allocations are noise). ReFT rows time one
PPO-shaped update on the same sequences (reference log-probs without grad, then policy + value
forward/backward), comparing a second reference copy with LoRA's adapters-off reference.
Prints markdown tables; skips with a message when the data or the model is missing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BATCH, MAX_LENGTH, MAX_PROMPT = 8, 256, 160
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["all-linear"]}
MODEL = "smollm2-135m"
CONFIGS = {  # name: (lora, gradient checkpointing, length-grouped batches, ReFT-shaped step)
    "full fine-tune (baseline)": (False, False, False, False),
    "full + gradient checkpointing": (False, True, False, False),
    "LoRA r=16": (True, False, False, False),
    "LoRA r=16 + gradient checkpointing": (True, True, False, False),
    "full + length-grouped batches": (False, False, True, False),
    "ReFT: full policy + reference copy": (False, False, False, True),
    "ReFT: LoRA policy, adapters-off reference": (True, False, False, True),
}


def missing_inputs(data: Path) -> str | None:
    if not data.exists():
        return f"no SVAMP data at {data}"
    try:
        from reftkit.modeling.pretrained import locate_gguf

        locate_gguf(MODEL)
    except (ImportError, ValueError) as e:
        return f"model {MODEL} unavailable: {e}"
    return None


def encoded_pool(data: Path, tokenizer, pool: int) -> list:
    import torch

    from reftkit.data.prompts import encode_sft
    from reftkit.data.readers import load_examples

    examples = load_examples(data).examples
    chosen = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:pool].tolist()
    return [encode_sft(tokenizer, examples[i], MAX_PROMPT, MAX_LENGTH) for i in chosen]


def batch_order(features: list, grouped: bool) -> list[list[int]]:
    import torch

    from reftkit.data.batching import length_grouped_order

    g = torch.Generator().manual_seed(1)
    order = (length_grouped_order([len(f.input_ids) for f in features], BATCH, g) if grouped
             else torch.randperm(len(features), generator=g).tolist())
    return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]


def worker(name: str, data: Path, pool: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from reftkit.data.batching import padding_fraction
    from reftkit.data.prompts import collate_sft
    from reftkit.modeling.lora import add_lora, reference_lm
    from reftkit.modeling.model import (
        PolicyWithValueHead,
        enable_gradient_checkpointing,
        load_causal_lm,
        load_tokenizer,
    )
    from reftkit.modeling.scoring import lm_response_logprobs

    use_lora, checkpointing, grouped, reft = CONFIGS[name]
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    lm = load_causal_lm(MODEL)
    if checkpointing:
        enable_gradient_checkpointing(lm)
    if use_lora:
        lm = add_lora(lm, **LORA)
    ref_lm = load_causal_lm(MODEL).eval().requires_grad_(False) if reft and not use_lora else None
    model = PolicyWithValueHead(lm) if reft else lm
    model.train(not reft)  # ReFT updates without dropout, as the trainer does
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    features = encoded_pool(data, tokenizer, pool)
    batches = batch_order(features, grouped)
    lengths = [len(f.input_ids) for f in features]

    def step(batch: dict) -> None:
        if reft:  # a stand-in rollout: the first tokens act as the prompt
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with torch.no_grad(), reference_lm(lm, ref_lm) as ref:
                lm_response_logprobs(ref, ids, mask, prompt_len=32)
            logits, values = model.position_logits(ids, mask)
            loss = -torch.log_softmax(logits[:, 31:-1].float(), -1).mean() + values.pow(2).mean()
        else:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    collate = [collate_sft([features[i] for i in b], tokenizer.pad_token_id) for b in batches]
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for batch in collate:
        step(batch)
    seconds = (time.perf_counter() - start) / len(collate)
    return {"name": name, "s_per_step": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mib": loaded_rss, "steps": len(collate),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "padding_fraction": padding_fraction(batches, lengths),
            "tokens": sum(max(lengths[i] for i in b) * len(b) for b in batches)}


def epoch_padding(data: Path) -> dict:
    """Padding over a whole SFT epoch of SVAMP (no model: token counts only), random vs grouped."""
    from reftkit.data.batching import padding_fraction
    from reftkit.modeling.model import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    features = encoded_pool(data, tokenizer, 10**9)
    lengths = [len(f.input_ids) for f in features]
    out = {"examples": len(features)}
    for grouped in (False, True):
        batches = batch_order(features, grouped)
        out["grouped" if grouped else "random"] = {
            "padding_fraction": padding_fraction(batches, lengths),
            "computed_tokens": sum(max(lengths[i] for i in b) * len(b) for b in batches)}
    out["real_tokens"] = sum(lengths)
    return out


def table(rows: list[dict], padding: dict) -> str:
    base = rows[0]
    lines = ["| configuration | trainable params | s / step | vs baseline | peak RSS (MiB) | RSS after load (MiB) |"
             " padding |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trainable_params'] / 1e6:.2f} M | {r['s_per_step']:.2f} | "
                     f"{r['s_per_step'] / base['s_per_step']:.2f}x | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_after_load_mib']:.0f} | {r['padding_fraction']:.0%} |")
    rand, grp = padding["random"], padding["grouped"]
    lines += ["", f"Whole SVAMP SFT epoch ({padding['examples']} examples, batch {BATCH}, "
              f"{padding['real_tokens']:,} real tokens):", "",
              "| batches | computed tokens | padding |", "|---|---|---|",
              f"| random | {rand['computed_tokens']:,} | {rand['padding_fraction']:.0%} |",
              f"| length-grouped | {grp['computed_tokens']:,} | {grp['padding_fraction']:.0%} |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/svamp/train_nl.json"))
    parser.add_argument("--pool", type=int, default=16, help="examples per configuration (one epoch)")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.pool)))
        return
    reason = missing_inputs(args.data)
    if reason:
        print(f"skipped: {reason}")
        return
    rows = []
    for name in CONFIGS:
        run = subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(args.data),
                              "--pool", str(args.pool)], capture_output=True, text=True, check=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['s_per_step']:.2f} s/step, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
              file=sys.stderr)
    print(table(rows, epoch_padding(args.data)))


if __name__ == "__main__":
    main()
