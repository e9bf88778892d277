"""A `reftkit reft` step against a step of TRL's GRPOTrainer, side by side on one CPU (issue 16, item 1).

    pip install -e ".[bench]"   # trl==1.16.0 (benchmark-only)
    python benchmarks/vs_trl.py [--model tiny|smollm2-135m] [--reps 3] [--modes natural forced]
                                [--betas 0.05 0] [--tools reftkit-ppo reftkit-grpo trl-grpo] [--threads 2]
                                [--data ../shared/data/gsm8k/train.jsonl] [--cache DIR] [--out results.json]
                                [--doc docs/vs-trl-results.md]

What is compared, per step (one rollout batch and its update):
- `reftkit-ppo`: `reftkit reft` as shipped (PPO with a value head, GAE, k1 KL in the reward);
- `reftkit-grpo`: `reftkit reft --advantage grpo --kl_in loss` (GRPO: group-normalised rewards, k3 KL in the loss);
- `trl-grpo`: TRL's `GRPOTrainer` (HF `generate`, no vLLM), `loss_type="grpo"`.
Equal on both sides: the checkpoint; the prompts (the first questions x steps rows of --data, the same
questions in the same step: TRL's dataset is laid out in the order reftkit's seeded loader drew, with
TRL's shuffling off); questions, samples per question, new tokens; 2 policy epochs (reftkit
`ppo_epochs=2`, TRL `num_iterations=2`); the minibatch (reftkit `mini_batch_size`, TRL
`per_device_train_batch_size` with `steps_per_generation` = sequences / minibatch and no gradient
accumulation, so both take 2 x sequences / minibatch AdamW steps per rollout); learning rate (constant,
no warm-up), AdamW (torch, betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping 1.0, clip
range 0.2; the KL coefficient beta (> 0: both run a reference forward; 0: neither does); temperature 1,
top-k and top-p off; fp32 without autocast (`--bf16`: bf16 autocast on both sides, float32 weights: reftkit
`--bf16 yes`, TRL `bf16=True`); no gradient checkpointing; torch threads; the seed; and the
reward, reftkit's own N-CoT grader (TRL gets a reward function that calls it: 1 correct, 0.1 answer
extracted but wrong, 0 none). `--modes forced` makes every response max_new_tokens long on both sides
(`min_new_tokens` = max: TRL's `generation_kwargs`; reftkit has no option for it, so its worker passes it
to reftkit's GenerationConfig, see `_force_length`).

The tiny model is a warm-up checkpoint: reftkit's `tiny` Llama (hidden 128, 4 layers, 0.92M parameters)
SFT'd with `reftkit sft` on 2,000 short GSM8K training rows (after the benchmark's prompts; reference
CoT <= 220 characters, so most references fit the 128-token budget and responses stop at EOS), cached in
--cache. `--model smollm2-135m` uses SmolLM2-135M-Instruct as shipped (reftkit.modeling.pretrained) at a smaller
shape (4 questions x 4 samples, <= 64 new tokens, 1 + 1 steps, forced mode, beta 0.05 by default) so
that a run takes about 15 minutes.

Each measurement is a fresh subprocess running one tool: one untimed warm-up step, then the timed steps.
Measurements alternate A B A B (never two at once) over --reps repetitions. A step's time runs from the
end of the previous step to the end of this one (reftkit: between its metrics.jsonl rows; TRL: between
the last optimizer steps of two generations), so it holds everything the trainer does. The split:
generation (reftkit `time_generation`; TRL `_generate`: prompt tokenisation, HF `generate`, decoding),
grading (`time_grading`; TRL `_calculate_rewards`), other rollout passes (`time_scoring`: old log-probs,
values, reference, advantages; TRL the rest of `_generate_and_score_completions`: old and reference
log-probs, advantages), update (`time_update`; TRL the optimizer steps' `on_step_begin` -> `on_step_end`
less the generation inside the first), rest (the step less all of these). Reported: per tool the median
over repetitions of each repetition's median step, and its min-max; sequences/s; the ratio per pair.
Skips with a message when the data, TRL or the model is missing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TOOLS = {
    "reftkit-ppo": "reftkit reft (PPO, value head, GAE)",
    "reftkit-grpo": "reftkit reft --advantage grpo --kl_in loss",
    "reftkit-ppo-padded": "reftkit reft --no-share_prompts (PPO, every row padded and whole)",
    "trl-grpo": "TRL GRPOTrainer (loss_type grpo)",
}
# Per model: questions per step, samples per question, max new tokens, minibatch, timed steps (after 1 warm-up).
SHAPES = {
    "tiny": {"questions": 16, "samples": 4, "max_new_tokens": 128, "mini_batch": 8, "timed_steps": 3},
    "smollm2-135m": {"questions": 4, "samples": 4, "max_new_tokens": 64, "mini_batch": 8, "timed_steps": 1},
}
# Default modes and KL coefficients per model: SmolLM2 (not SFT'd on the format) rarely stops inside
# 64 tokens, so its default run is the forced mode at one beta, which keeps it near 15 minutes.
DEFAULT_RUNS = {"tiny": (["natural", "forced"], [0.05, 0.0]), "smollm2-135m": (["forced"], [0.05])}
LR = 3e-6  # reftkit's default for small models; both tools get it, constant
POLICY_EPOCHS = 2
# The tiny warm-up: `reftkit sft` on short GSM8K rows after the benchmark's prompts.
WARMUP_SKIP, WARMUP_ROWS, WARMUP_MAX_QUESTION, WARMUP_MAX_COT = 64, 2000, 400, 220
WARMUP_ARGS = ["--epochs", "2", "--lr", "3e-3", "--batch_size", "32", "--warmup_ratio", "0.05",
               "--max_prompt_tokens", "200", "--max_length", "330", "--group_by_length", "--seed", "0"]


# ------------------------------------------------------------------------------------------ set-up


def _env(threads: int) -> dict[str, str]:
    """The children's environment: reftkit importable from this checkout, the thread count fixed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if importlib.util.find_spec("reftkit") is None or not _from_this_checkout():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _from_this_checkout() -> bool:
    spec = importlib.util.find_spec("reftkit")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(REPO)


def _use_this_checkout() -> None:
    """Import reftkit from this checkout's src/ when the installed one is elsewhere (or absent)."""
    if not _from_this_checkout():
        sys.path.insert(0, str(REPO / "src"))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def missing_inputs(args) -> str | None:
    if not args.data.exists():
        return f"no GSM8K data at {args.data} (give --data): benchmark skipped"
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install -e '.[bench]', which pins trl==1.16.0): benchmark skipped"
    if args.model != "tiny":
        _use_this_checkout()
        from reftkit.modeling.pretrained import locate_gguf

        try:
            locate_gguf(args.model)
        except (ImportError, ValueError) as e:
            return f"model {args.model} unavailable: {e}"
    return None


def warmup_checkpoint(args) -> Path:
    """The tiny warm-up model, built once per (data file, settings) and cached."""
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    chosen = [r for r in rows[WARMUP_SKIP:] if len(r["question"]) <= WARMUP_MAX_QUESTION
              and len(r["answer"].split("####")[0]) <= WARMUP_MAX_COT][:WARMUP_ROWS]
    key = hashlib.sha256(json.dumps([chosen, WARMUP_ARGS]).encode()).hexdigest()[:12]
    home = args.cache / f"tiny-gsm8k-warmup-{key}"
    final = home / "sft" / "final"
    if (final / "config.json").is_file():
        return final
    home.mkdir(parents=True, exist_ok=True)
    train = home / "sft-train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    print(f"building the tiny warm-up checkpoint in {home} (once; minutes)", flush=True)
    command = [sys.executable, "-m", "reftkit.commands.cli", "sft", "--model", "tiny", "--train_file", str(train),
               "--data_format", "gsm8k", "--output_dir", str(home / "sft"), "--no-eval_every_epoch", "--no-progress",
               "--overwrite_output_dir", *WARMUP_ARGS]
    subprocess.run(command, check=True, env=_env(args.threads), cwd=REPO)
    return final


def prompts_file(args, model_dir: str, work: Path) -> tuple[Path, int]:
    """The benchmark's questions as a GSM8K JSONL file, and the longest prompt in tokens (so no prompt is cut)."""
    _use_this_checkout()
    from reftkit.data.prompts import encode_prompt
    from reftkit.data.readers import load_examples
    from reftkit.modeling.model import load_tokenizer

    n = args.shape["questions"] * (1 + args.shape["timed_steps"])
    rows = [line for line in args.data.read_text().splitlines() if line.strip()][:n]
    path = work / "prompts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    tokenizer = load_tokenizer(model_dir)
    longest = max(len(encode_prompt(tokenizer, ex, 10**6)) for ex in load_examples(path, "gsm8k").examples)
    return path, longest


# ------------------------------------------------------------------------------------------ workers


def run_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = _reftkit_worker(spec) if spec["tool"].startswith("reftkit") else _trl_worker(spec)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    Path(spec["result"]).write_text(json.dumps(result))


def _force_length(module, tokens: int) -> None:
    """Every response exactly `tokens` long: min_new_tokens on the GenerationConfig that reftkit's
    rollout builds (reftkit has no option for it; the lead's code is not touched)."""
    from transformers import GenerationConfig

    module.GenerationConfig = functools.partial(GenerationConfig, min_new_tokens=tokens)


def _reftkit_worker(spec: dict) -> dict:
    import reftkit.rollout.generation
    import reftkit.trainers.reft as reft
    from reftkit.commands.cli import main

    if spec["mode"] == "forced":
        _force_length(reftkit.rollout.generation, spec["max_new_tokens"])
    order: list[list[str]] = []
    make_rollout = reft.make_rollout

    def recording(*args, **kwargs):  # make_rollout(accelerator, policy, ref_lm, tokenizer, examples, ...)
        order.append([ex.id for ex in (args[4] if len(args) > 4 else kwargs["examples"])])
        return make_rollout(*args, **kwargs)

    reft.make_rollout = recording
    # Checkpoints are written after the last step (outside every timed step); skipped to save minutes and disk.
    reft.save_step_checkpoint = lambda *a, **k: None
    reft.save_final = lambda accelerator, policy, lm, tokenizer, cfg, run: Path(cfg.output_dir)
    out = Path(spec["run_dir"])
    argv = ["reft", "--model", spec["model"], "--train_file", spec["prompts"], "--data_format", "gsm8k",
            "--output_dir", str(out), "--batch_size", str(spec["questions"]), "--num_samples", str(spec["samples"]),
            "--mini_batch_size", str(spec["mini_batch"]), "--ppo_epochs", str(POLICY_EPOCHS), "--epochs", "1",
            "--lr", str(LR), "--lr_schedule", "constant", "--warmup_ratio", "0", "--weight_decay", "0",
            "--max_grad_norm", "1.0", "--clip_range", "0.2", "--kl_coef", str(spec["beta"]), "--temperature", "1.0",
            "--top_k", "0", "--top_p", "1.0", "--max_prompt_tokens", str(spec["max_prompt_tokens"]),
            "--max_length", str(spec["max_prompt_tokens"] + spec["max_new_tokens"]), "--seed", str(spec["seed"]),
            "--bf16", "yes" if spec["bf16"] else "no", "--no-progress", "--quiet", "--save_every", "0"]
    if spec["tool"] == "reftkit-grpo":
        argv += ["--advantage", "grpo", "--kl_in", "loss"]
    if spec["tool"] == "reftkit-ppo-padded":  # the saving of prompt sharing, measured beside it
        argv += ["--no-share_prompts"]
    if main(argv) != 0:
        raise SystemExit(f"reftkit reft failed: {' '.join(argv)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_generation" in r]
    steps = []
    for previous, row in zip(rows, rows[1:], strict=False):  # the first row is the warm-up step
        wall = row["time"] - previous["time"]
        split = {"generation": row["time_generation"], "grading": row["time_grading"],
                 "other_rollout": row["time_scoring"], "update": row["time_update"]}
        steps.append({"wall": wall, **split, "rest": wall - sum(split.values()),
                      "new_tokens": row["sampled_tokens"], "reward": row["reward"]})
    return {"steps": steps, "order": order, "warmup_new_tokens": rows[0]["sampled_tokens"]}


def _trl_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reftkit.data.prompts import encode_prompt, prompt_text
    from reftkit.data.readers import load_examples
    from reftkit.grading.answers import NaturalLanguageGrader, reward_from_grade
    from reftkit.modeling.model import load_tokenizer

    examples = {ex.id: ex for ex in load_examples(spec["prompts"], "gsm8k").examples}
    order = [i for batch in spec["order"] for i in batch] if spec["order"] else list(examples)
    tokenizer = load_tokenizer(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    for i in order:  # TRL tokenises the prompt text itself: it must give reftkit's prompt tokens
        text, ids = prompt_text(examples[i]), encode_prompt(tokenizer, examples[i], spec["max_prompt_tokens"])
        if tokenizer(text=text)["input_ids"] != ids:
            raise SystemExit(f"prompt {i}: TRL's tokens differ from reftkit's")
    grader = NaturalLanguageGrader()
    rewards: list[float] = []

    def correct_answer(prompts, completions, example_id, **kwargs):
        """reftkit's reward: its N-CoT grader on the completion text (1 / 0.1 / 0)."""
        grades = grader.grade(completions, [examples[i] for i in example_id])
        out = [reward_from_grade(g, 1.0, 0.1) for g in grades]
        rewards.extend(out)
        return out

    n = spec["questions"] * spec["samples"]
    updates = POLICY_EPOCHS * n // spec["mini_batch"]  # optimizer steps per generation
    args = GRPOConfig(
        output_dir=spec["run_dir"], use_cpu=True, bf16=spec["bf16"], fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=spec["mini_batch"], gradient_accumulation_steps=1,
        steps_per_generation=n // spec["mini_batch"], num_generations=spec["samples"], num_iterations=POLICY_EPOCHS,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0, beta=spec["beta"],
        loss_type="grpo", epsilon=0.2, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", shuffle_dataset=False,
        max_steps=(1 + spec["timed_steps"]) * updates, logging_strategy="no", save_strategy="no", report_to="none",
        seed=spec["seed"], disable_dropout=True, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]} if spec["mode"] == "forced" else None,
    )
    dataset = Dataset.from_list([{"prompt": prompt_text(examples[i]), "example_id": i} for i in order])
    marks: dict[str, list[float]] = {"score": [], "generate": [], "grade": [], "begin": [], "end": [], "tokens": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks["end"].append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=correct_answer, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    if model.is_gradient_checkpointing or trainer.args.bf16 != spec["bf16"]:
        raise SystemExit(f"TRL set-up: gradient checkpointing on, or bf16 not {spec['bf16']}")

    def timed(name, method, count_tokens=False):
        @functools.wraps(method)
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = method(*a, **k)
            marks[name].append(time.perf_counter() - start)
            if count_tokens:  # _generate returns (prompt_ids, completion_ids, ...): tokens incl. EOS
                marks["tokens"].append(sum(len(c) for c in out[1]))
            return out
        return wrapper

    trainer._generate_and_score_completions = timed("score", trainer._generate_and_score_completions)
    trainer._generate = timed("generate", trainer._generate, count_tokens=True)
    trainer._calculate_rewards = timed("grade", trainer._calculate_rewards)
    trainer.train()
    steps = []
    for k in range(1, 1 + spec["timed_steps"]):
        cycle = slice(k * updates, (k + 1) * updates)
        wall = marks["end"][(k + 1) * updates - 1] - marks["end"][k * updates - 1]
        stepping = sum(e - b for b, e in zip(marks["begin"][cycle], marks["end"][cycle], strict=True))
        split = {"generation": marks["generate"][k], "grading": marks["grade"][k],
                 "other_rollout": marks["score"][k] - marks["generate"][k] - marks["grade"][k],
                 "update": stepping - marks["score"][k]}
        steps.append({"wall": wall, **split, "rest": wall - sum(split.values()), "new_tokens": marks["tokens"][k],
                      "reward": statistics.fmean(rewards[k * n:(k + 1) * n])})
    return {"steps": steps, "order": [], "warmup_new_tokens": marks["tokens"][0],
            "optimizer_steps": len(marks["end"]), "reference_model": trainer.ref_model is not None}


# ------------------------------------------------------------------------------------------ driver


def measure(args, spec: dict, work: Path, index: int) -> dict:
    run_dir = work / f"run{index:02d}-{spec['tool']}-{spec['mode']}-beta{spec['beta']:g}"
    spec = {**spec, "run_dir": str(run_dir), "result": str(work / f"result{index:02d}.json")}
    load_before = _load()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          env=_env(args.threads), cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{spec['tool']} ({spec['mode']}, beta {spec['beta']}) failed:\n{done.stderr[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result.update(load_before=load_before, load_after=_load(), process_seconds=time.perf_counter() - start)
    walls = [s["wall"] for s in result["steps"]]
    print(f"  {spec['tool']:13s} {spec['mode']:7s} beta {spec['beta']:<5g} "
          f"median step {statistics.median(walls):6.2f} s "
          f"(steps {', '.join(f'{w:.2f}' for w in walls)}), load {load_before:.1f}", flush=True)
    return result


def _median_step(result: dict, key: str) -> float:
    return statistics.median(s[key] for s in result["steps"])


def summarise(args, runs: dict) -> dict:
    """Per (mode, beta): per tool the repetitions' median steps, and reftkit / TRL ratios per pair."""
    n = args.shape["questions"] * args.shape["samples"]
    out = {}
    for (mode, beta), by_tool in runs.items():
        tools = {}
        for tool, results in by_tool.items():
            rates = [n / _median_step(r, "wall") for r in results]
            parts = {key: statistics.median(_median_step(r, key) for r in results)
                     for key in ("wall", "generation", "grading", "other_rollout", "update", "rest", "new_tokens")}
            gen_rate = statistics.median(_median_step(r, "new_tokens") / _median_step(r, "generation") for r in results)
            tools[tool] = {"seq_per_s": rates, "median_seq_per_s": statistics.median(rates), **parts,
                           "generation_tokens_per_s": gen_rate,
                           "reward": statistics.median(_median_step(r, "reward") for r in results)}
        ratios = {}
        if "trl-grpo" in tools:
            for tool in (t for t in tools if t != "trl-grpo"):
                pairs = [a / b for a, b in zip(tools[tool]["seq_per_s"], tools["trl-grpo"]["seq_per_s"], strict=True)]
                ratios[f"{tool} / trl-grpo"] = {"pairs": pairs, "median": statistics.median(pairs)}
        out[f"{mode}, beta={beta:g}"] = {"tools": tools, "ratios": ratios}
    return out


def markdown(args, summary: dict, meta: dict) -> str:
    s = args.shape
    n = s["questions"] * s["samples"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, {args.threads} torch threads per run  ",
        f"Date: {meta['date']}; 1-minute load average {meta['load_min']:.2f}-{meta['load_max']:.2f} over the runs  ",
        f"Model: {meta['model']}; shape: {s['questions']} questions x {s['samples']} samples = {n} sequences of "
        f"<= {s['max_new_tokens']} new tokens per step, minibatch {s['mini_batch']} "
        f"({POLICY_EPOCHS * n // s['mini_batch']} AdamW steps per step), {POLICY_EPOCHS} policy epochs, lr {LR:g}, "
        f"prompts <= {meta['max_prompt_tokens']} tokens (none cut), {'bf16 autocast' if args.bf16 else 'fp32'}; "
        f"1 warm-up + {s['timed_steps']} timed steps "
        f"per run, {args.reps} interleaved repetition(s)",
    ]
    for block, data in summary.items():
        mode, beta = block.split(", ")
        what = ("natural stopping at EOS" if mode == "natural"
                else f"every response forced to {s['max_new_tokens']} tokens")
        lines += ["", f"### {what}, {beta}", "",
                  "| tool | sequences/s (median, min-max) | step s | generation s | grading s | other rollout passes s "
                  "| update s | rest s | new tokens/step | generation tok/s | reward |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for tool, t in data["tools"].items():
            rates = t["seq_per_s"]
            lines.append(f"| {TOOLS[tool]} | {t['median_seq_per_s']:.2f} ({min(rates):.2f}-{max(rates):.2f}) | "
                         f"{t['wall']:.2f} | {t['generation']:.2f} | {t['grading']:.3f} | {t['other_rollout']:.2f} | "
                         f"{t['update']:.2f} | {t['rest']:.2f} | {t['new_tokens']:.0f} | "
                         f"{t['generation_tokens_per_s']:.0f} | {t['reward']:.3f} |")
        for name, r in data["ratios"].items():
            lines.append(f"\n{name} (sequences/s): **{r['median']:.2f}x** "
                         f"(pairs {', '.join(f'{p:.2f}' for p in r['pairs'])})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=["natural", "forced"],
                        help="natural stopping at EOS and/or every response forced to max new tokens "
                             "(default: tiny both, smollm2-135m forced)")
    parser.add_argument("--betas", nargs="+", type=float,
                        help="KL coefficients (both tools); > 0 runs a reference forward, 0 none "
                             "(default: tiny 0.05 0, smollm2-135m 0.05)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--data", type=Path, default=DATA, help="GSM8K train.jsonl")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the tiny warm-up checkpoint is kept (default: reftkit's cache, vs-trl/)")
    parser.add_argument("--checkpoint", type=Path, help="use this model directory instead (shape still from --model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of every run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (float32 weights)")
    for key in ("questions", "samples", "max_new_tokens", "mini_batch", "timed_steps"):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, help="override the model's shape")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, help="write every measurement and the summary as JSON here")
    parser.add_argument("--doc", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if args.worker:
        run_worker(json.loads(args.worker))
        return
    args.shape = {key: getattr(args, key) or value for key, value in SHAPES[args.model].items()}
    args.modes = args.modes or DEFAULT_RUNS[args.model][0]
    args.betas = args.betas if args.betas is not None else DEFAULT_RUNS[args.model][1]
    args.data = args.data.resolve()
    why = missing_inputs(args)
    if why:
        print(why)
        return
    _use_this_checkout()
    from reftkit.modeling.pretrained import cache_root, resolve

    args.cache = (args.cache or cache_root() / "vs-trl").resolve()
    if args.checkpoint:
        model_dir = str(args.checkpoint.resolve())
    else:
        model_dir = str(warmup_checkpoint(args) if args.model == "tiny" else resolve(args.model))
    tools = sorted(args.tools, key=lambda t: t.startswith("trl"))  # reftkit first: TRL takes its question order
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        work = Path(tmp)
        prompts, longest = prompts_file(args, model_dir, work)
        common = {"model": model_dir, "prompts": str(prompts), "max_prompt_tokens": longest, "threads": args.threads,
                  "seed": args.seed, "bf16": args.bf16, **args.shape}
        runs: dict = {}
        order: list | None = None
        index = 0
        loads = []
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            for mode in args.modes:
                for beta in args.betas:
                    for tool in tools:
                        spec = {**common, "tool": tool, "mode": mode, "beta": beta, "order": order or []}
                        result = measure(args, spec, work, index)
                        index += 1
                        loads += [result["load_before"], result["load_after"]]
                        if result["order"] and order is None:
                            order = result["order"]
                        elif result["order"] and result["order"] != order:
                            print("  note: reftkit drew another question order in this run")
                        runs.setdefault((mode, beta), {}).setdefault(tool, []).append(result)
    import torch

    meta = {"command": " ".join(["python", "benchmarks/vs_trl.py", *sys.argv[1:]]),
            "machine": f"{os.cpu_count()}-core CPU, {platform.platform()}, Python {platform.python_version()}",
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_min": min(loads), "load_max": max(loads), "max_prompt_tokens": longest,
            "model": f"{'tiny warm-up' if args.model == 'tiny' else args.model} ({model_dir})"}
    summary = summarise(args, runs)
    text = markdown(args, summary, meta)
    print("\n" + text)
    if args.doc:
        args.doc.write_text(text)
    if args.out:
        raw = {f"{mode}, beta={beta:g}": by_tool for (mode, beta), by_tool in runs.items()}
        args.out.write_text(json.dumps({"meta": meta, "shape": args.shape, "summary": summary, "runs": raw}, indent=1))


if __name__ == "__main__":
    main()
