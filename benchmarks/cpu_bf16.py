"""float32 against bf16 autocast on this CPU, side by side: a SmolLM2-135M ReFT step and an SFT epoch.

    python benchmarks/cpu_bf16.py [--model smollm2-135m] [--reps 2] [--threads 2]
                                  [--data ../shared/data/svamp/train_python.json] [--out r.json] [--doc d.md]
    python benchmarks/cpu_bf16.py --profile [--out profile.json]     # top operators of one step per precision

What runs (each measurement a fresh process, the precisions alternating A B A B, never two at once):
- ReFT step: `reftkit reft --cot program` on SVAMP P-CoT prompts, 16 questions x 4 samples, 2 PPO epochs
  in minibatches of 16, KL 0.01 (a reference forward), every response forced to --new_tokens tokens so both
  precisions do the same work (the model's EOS is held back: `min_new_tokens`, as benchmarks/vs_trl.py). The
  step is the first rollout batch, timed by the trainer's own split (generation, grading, other rollout
  passes, update) from metrics.jsonl; loading and saving are outside it.
- SFT epoch: `reftkit sft --cot program` on the first --sft_rows rows, batch 16, one epoch, timed by the
  trainer's metrics rows, one per optimiser step (first to last, scaled by steps / (steps - 1)).
Both arms get the same checkpoint, data, seed and thread count; `--bf16 no` vs `--bf16 yes`.
Skips with a message when the data or the model is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import _env, _force_length, _load, _use_this_checkout  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "svamp" / "train_python.json"
PRECISIONS = ("no", "yes")  # --bf16
LENGTHS = {"max_prompt_tokens": 192}  # 99% of SVAMP P-CoT prompts are <= 175 SmolLM2 tokens


def reft_argv(spec: dict, prompts: Path, out: Path) -> list[str]:
    return ["reft", "--model", spec["model"], "--train_file", str(prompts), "--data_format", "reft", "--cot", "program",
            "--output_dir", str(out), "--batch_size", "16", "--num_samples", "4", "--mini_batch_size", "16",
            "--ppo_epochs", "2", "--epochs", "1", "--max_train_examples", "16", "--lr", "3e-6",
            "--kl_coef", "0.01", "--max_prompt_tokens", str(LENGTHS["max_prompt_tokens"]),
            "--max_length", str(LENGTHS["max_prompt_tokens"] + spec["new_tokens"]), "--seed", "0",
            "--bf16", spec["bf16"], "--no-progress", "--quiet", "--save_every", "0"]


def sft_argv(spec: dict, rows: Path, out: Path) -> list[str]:
    return ["sft", "--model", spec["model"], "--train_file", str(rows), "--data_format", "reft", "--cot", "program",
            "--output_dir", str(out), "--batch_size", "16", "--epochs", "1", "--lr", "5e-5", "--seed", "0",
            "--max_prompt_tokens", str(LENGTHS["max_prompt_tokens"]), "--max_length", "320",
            "--bf16", spec["bf16"], "--no-progress", "--quiet", "--save_every", "0", "--no-eval_every_epoch"]


def run_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    import reftkit.rollout.generation
    import reftkit.trainers.reft as reft
    import reftkit.training.loop as fit
    from reftkit.commands.cli import main

    out = Path(spec["run_dir"])
    # Saving is outside what is timed; skipped to save minutes and disk.
    reft.save_step_checkpoint = lambda *a, **k: None
    reft.save_final = lambda accelerator, policy, lm, tokenizer, cfg, run: Path(cfg.output_dir)
    fit.save_step_checkpoint = lambda *a, **k: None
    fit.save_final = lambda *a, **k: out
    profiler = None
    if spec["profile"]:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        real = reft.make_rollout

        def profiled(*args, **kwargs):  # profile the step itself: rollout and update, not loading
            profiler.start()
            return real(*args, **kwargs)

        reft.make_rollout = profiled
    if spec["what"] == "reft":
        _force_length(reftkit.rollout.generation, spec["new_tokens"])
        argv = reft_argv(spec, Path(spec["data"]), out)
    else:
        argv = sft_argv(spec, Path(spec["data"]), out)
    if main(argv) != 0:
        raise SystemExit(f"reftkit failed: {' '.join(argv)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if spec["what"] == "reft":
        row = next(r for r in rows if "time_generation" in r)
        split = {"generation": row["time_generation"], "grading": row["time_grading"],
                 "other_rollout": row["time_scoring"], "update": row["time_update"]}
        result.update(split, seconds=sum(split.values()), new_tokens=row["sampled_tokens"],
                      generation_tokens_per_s=row["sampled_tokens"] / row["time_generation"])
    else:
        # One row per optimiser step, stamped at its end: the first step's time is the mean of the others'.
        times = [r["time"] for r in rows if "loss" in r]
        result.update(seconds=(times[-1] - times[0]) * len(times) / (len(times) - 1), steps=len(times))
    if profiler is not None:
        profiler.stop()
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        result["profile"] = table
    Path(spec["result"]).write_text(json.dumps(result))


def measure(args, spec: dict, work: Path, index: int) -> dict:
    run_dir = work / f"run{index:02d}-{spec['what']}-bf16{spec['bf16']}"
    spec = {**spec, "run_dir": str(run_dir), "result": str(work / f"result{index:02d}.json")}
    load_before = _load()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          env=_env(args.threads), cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{spec['what']} --bf16 {spec['bf16']} failed:\n{done.stderr[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result.update(load_before=load_before, load_after=_load())
    print((
        f"  {spec['what']:4s} --bf16 {spec['bf16']:3s} {result['seconds']:7.1f} s  (load {load_before:.1f})"
    ), flush=True)
    return result


def data_files(args, work: Path) -> dict[str, Path]:
    """The ReFT step's 16 questions and the SFT epoch's rows (after them), as files in reftkit's format."""
    rows = json.loads(args.data.read_text())
    files = {"reft": rows[:16], "sft": rows[16 : 16 + args.sft_rows]}
    for name, chosen in files.items():
        (work / f"{name}.json").write_text(json.dumps(chosen))
    return {name: work / f"{name}.json" for name in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a model directory")
    parser.add_argument("--data", type=Path, default=DATA, help="SVAMP P-CoT train_python.json")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--what", nargs="+", default=["reft", "sft"], choices=["reft", "sft"])
    parser.add_argument("--new_tokens", type=int, default=96, help="tokens per ReFT response (forced)")
    parser.add_argument("--sft_rows", type=int, default=96, help="rows of the SFT epoch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", action="store_true", help="one profiled ReFT step per precision instead")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--doc", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if args.worker:
        return run_worker(json.loads(args.worker))
    if not args.data.exists():
        print(f"no SVAMP data at {args.data} (give --data): benchmark skipped")
        return
    _use_this_checkout()
    if not Path(args.model).is_dir():
        from reftkit.modeling.pretrained import locate_gguf

        try:
            locate_gguf(args.model)
        except (ImportError, ValueError) as e:
            print(f"model {args.model} unavailable: {e}: benchmark skipped")
            return
    meta = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "model": args.model,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    from reftkit.training.device import cpu_bf16_units

    meta["bf16_units"] = cpu_bf16_units()
    print(f"bf16 matrix units: {meta['bf16_units']}; threads {args.threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cpu-bf16-") as tmp:
        work = Path(tmp)
        files = data_files(args, work)
        runs: dict[str, dict[str, list]] = {}
        index = 0
        whats = ["reft"] if args.profile else args.what
        for what in whats:
            for _ in range(1 if args.profile else args.reps):
                for bf16 in PRECISIONS:
                    spec = {"what": what, "bf16": bf16, "model": args.model, "data": str(files[what]),
                            "threads": args.threads, "new_tokens": args.new_tokens, "profile": args.profile}
                    runs.setdefault(what, {}).setdefault(bf16, []).append(measure(args, spec, work, index))
                    index += 1
    summary = summarise(runs)
    report = {"meta": meta, "runs": runs, "summary": summary}
    if args.profile:
        for bf16, results in runs["reft"].items():
            print(f"\n--bf16 {bf16}: top operators by self CPU time, one ReFT step\n{results[0]['profile']}")
    text = markdown(summary, meta, args)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.doc:
        args.doc.write_text(text + "\n")


def summarise(runs: dict) -> dict:
    """Per workload and precision, the median over repetitions; the float32 / bf16 time ratio per pair."""
    out = {}
    for what, by_precision in runs.items():
        parts = {}
        for bf16, results in by_precision.items():
            keys = [k for k in ("seconds", "generation", "grading", "other_rollout", "update",
                                "generation_tokens_per_s")
                    if k in results[0]]
            parts[bf16] = {k: statistics.median(r[k] for r in results) for k in keys}
        pairs = [a["seconds"] / b["seconds"] for a, b in zip(by_precision["no"], by_precision["yes"], strict=True)]
        out[what] = {"float32": parts["no"], "bf16": parts["yes"], "speedup_pairs": pairs,
                     "speedup_median": statistics.median(pairs)}
    return out


def markdown(summary: dict, meta: dict, args) -> str:
    lines = [f"`python benchmarks/{meta['command']}`, {meta['date']}, {meta['cpus']} CPUs ({meta['machine']}), "
             f"{meta['threads']} threads, bf16 units: {meta['bf16_units']}, model {meta['model']}", ""]
    if "reft" in summary:
        s = summary["reft"]
        lines += [f"ReFT step (16 questions x 4 samples x {args.new_tokens} forced tokens, 2 PPO epochs), seconds "
                  "(median over repetitions):", "",
                  "| precision | step | generation | grading | other rollout passes | update | generated tokens/s |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("float32", "bf16"):
            p = s[name]
            lines.append(f"| {name} | {p['seconds']:.1f} | {p['generation']:.1f} | {p['grading']:.1f} | "
                         f"{p['other_rollout']:.1f} | {p['update']:.1f} | {p['generation_tokens_per_s']:.0f} |")
        lines += ["", f"float32 / bf16 per pair: {', '.join(f'{x:.2f}' for x in s['speedup_pairs'])} "
                  f"(median {s['speedup_median']:.2f}x)", ""]
    if "sft" in summary:
        s = summary["sft"]
        lines += [f"SFT epoch ({args.sft_rows} rows, batch 16): float32 {s['float32']['seconds']:.1f} s, "
                  f"bf16 {s['bf16']['seconds']:.1f} s; float32 / bf16 per pair: "
                  f"{', '.join(f'{x:.2f}' for x in s['speedup_pairs'])} (median {s['speedup_median']:.2f}x)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
