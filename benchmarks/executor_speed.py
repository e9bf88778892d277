"""Throughput of reftkit's sandboxed executor vs the paper's naive process pool, on the same programs.

    python benchmarks/executor_speed.py [--programs 1000] [--batch 100] [--programs-per-child 16] [--svamp]
                                        [--doc docs/executor-speed.md]

Programs: P-CoT programs like the SVAMP/GSM8K training data (`def solution(): ... return result`), made
by a small template generator (some use math, fractions or statistics); with --svamp, the `answer_cot`
programs of ../shared/data/svamp/train_python.json instead (skipped cleanly when the file is absent).

Naive approach (the paper's code): a new concurrent.futures.ProcessPoolExecutor per batch, exec() of each
program in it, future.result(timeout=...). No isolation at all. Measured with the "fork" start method
(Python 3.11's default on Linux: the pool forks this small benchmark process) and with "spawn" (what a
trainer holding CUDA state has to use; its workers re-import the main module, which here is light).
reftkit runs twice: with its default of a fresh forked child per program, and with the opt-in
programs_per_child (several programs of a batch share one forked child, see docs/executor.md).
All approaches run the same batches, in alternating rounds so that they see the same machine load; the
report gives the median round. A second phase (--trainer-imports, default torch and transformers) repeats
the measurement after importing what a trainer's main module imports, in this process and (through the
main module) in spawned pool workers: the setting the paper's code actually runs in.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from reftkit.executor import ExecutorConfig, ProgramExecutor, Status
from reftkit.executor.sandbox import answer

SVAMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "svamp" / "train_python.json"
TRAINER_ENV = "REFTKIT_BENCH_TRAINER_IMPORTS"
NAMES = ["Tom", "Mia", "Ravi", "Lena", "Omar", "Sofia", "Jack", "Aiko"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "coins", "cards"]


def _import_trainer_modules() -> None:
    for name in filter(None, os.environ.get(TRAINER_ENV, "").split(",")):
        importlib.import_module(name)


# A spawned pool worker re-imports this module as its __main__: in the trainer-like phase it then pays the
# same imports as a worker spawned from a real trainer script would.
_import_trainer_modules()


# ------------------------------------------------------------------------------------------ programs


def _program(question: str, body: list[str], imports: tuple[str, ...] = ()) -> str:
    head = [f"import {m}" for m in imports]
    lines = [*head, "def solution():", f'    """{question}"""', *[f"    {line}" for line in body], "    return result"]
    return "\n".join(lines) + "\n"


def _subtract(r: random.Random) -> str:
    n, item, a = r.choice(NAMES), r.choice(ITEMS), r.randint(20, 500)
    b = r.randint(1, a)
    return _program(f"{n} has {a} {item} and gives away {b}. How many {item} are left?",
                    [f"{item}_initial = {a}", f"{item}_given = {b}", f"result = {item}_initial - {item}_given"])


def _multiply(r: random.Random) -> str:
    item, boxes, per = r.choice(ITEMS), r.randint(2, 40), r.randint(2, 25)
    return _program(f"There are {boxes} boxes with {per} {item} each. How many {item} are there?",
                    [f"num_boxes = {boxes}", f"{item}_per_box = {per}", f"result = num_boxes * {item}_per_box"])


def _share(r: random.Random) -> str:
    n, total, people = r.choice(NAMES), r.randint(10, 900), r.randint(2, 12)
    return _program(f"{n} shares ${total} equally among {people} friends. How much does each get?",
                    [f"total_money = {total}", f"num_friends = {people}", "result = total_money / num_friends"])


def _percent(r: random.Random) -> str:
    price, pct = r.randint(10, 400), r.choice([5, 10, 15, 20, 25, 30, 40, 50])
    return _program(f"A jacket costs ${price} and is {pct}% off. What is the sale price?",
                    [f"price = {price}", f"discount_percent = {pct}", "discount = price * discount_percent / 100",
                     "result = price - discount"])


def _ceil(r: random.Random) -> str:
    people, seats = r.randint(10, 300), r.randint(3, 50)
    return _program(f"{people} students ride buses with {seats} seats each. How many buses are needed?",
                    [f"students = {people}", f"seats_per_bus = {seats}",
                     "result = math.ceil(students / seats_per_bus)"],
                    ("math",))


def _fraction(r: random.Random) -> str:
    item, total, num, den = r.choice(ITEMS), r.randint(2, 60) * 12, r.randint(1, 5), r.choice([6, 12])
    return _program(f"A jar has {total} {item}; {num}/{den} of them are red. How many are red?",
                    [f"total_{item} = {total}", f"red_fraction = fractions.Fraction({num}, {den})",
                     f"result = total_{item} * red_fraction"], ("fractions",))


def _mean(r: random.Random) -> str:
    scores = [r.randint(50, 100) for _ in range(r.randint(3, 6))]
    return _program(f"The test scores were {scores}. What is the average score?",
                    [f"scores = {scores}", "result = statistics.mean(scores)"], ("statistics",))


def _multistep(r: random.Random) -> str:
    n, weeks, per_day, spent = r.choice(NAMES), r.randint(2, 8), r.randint(2, 15), r.randint(1, 30)
    return _program(f"{n} saves ${per_day} a day for {weeks} weeks and spends ${spent}. How much is left?",
                    [f"savings_per_day = {per_day}", f"num_weeks = {weeks}", "days_per_week = 7",
                     "total_saved = savings_per_day * days_per_week * num_weeks", f"amount_spent = {spent}",
                     "result = total_saved - amount_spent"])


TEMPLATES = [_subtract, _multiply, _share, _percent, _ceil, _fraction, _mean, _multistep]


def template_programs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [TEMPLATES[i % len(TEMPLATES)](rng) for i in range(count)]


def svamp_programs(count: int) -> list[str] | None:
    if not SVAMP.exists():
        return None
    programs = [row["answer_cot"] for row in json.loads(SVAMP.read_text())]
    return [programs[i % len(programs)] for i in range(count)]


# --------------------------------------------------------------------------------------- approaches


def _naive_one(source: str) -> str | None:
    """The paper's way: exec in a pool process, no isolation. Answer text as reftkit would write it."""
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 -- the unsafe baseline being measured
    status, text, _ = answer(namespace["solution"](), 10**6)
    return text if status is Status.OK else None


def run_naive(batches: list[list[str]], workers: int, timeout_s: float, method: str) -> list[str | None]:
    out: list[str | None] = []
    context = multiprocessing.get_context(method)
    for batch in batches:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_naive_one, src) for src in batch]
            for future in futures:
                try:
                    out.append(future.result(timeout=timeout_s))
                except Exception:  # noqa: BLE001 -- the baseline maps every failure to "no answer"
                    out.append(None)
    return out


def run_reftkit(executor: ProgramExecutor, batches: list[list[str]]) -> list[str | None]:
    out: list[str | None] = []
    for batch in batches:
        out += [r.value if r.status is Status.OK else None for r in executor.run(batch)]
    return out


def _agree(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    try:
        x, y = (float(eval_fraction(v)) for v in (a, b))
    except ValueError:
        return a == b
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def eval_fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


def _timed(fn, *args) -> tuple[float, list]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


# ---------------------------------------------------------------------------------------------- main


def measure(executors: dict[str, ProgramExecutor], batches: list[list[str]], args, rounds: int) -> dict:
    """Alternating rounds of every approach; times per approach, and each approach's answers."""
    times: dict[str, list[float]] = {**{name: [] for name in executors}, **{m: [] for m in args.naive}}
    answers: dict[str, list[str | None]] = {}
    for _ in range(rounds):
        for name, executor in executors.items():
            elapsed, answers[name] = _timed(run_reftkit, executor, batches)
            times[name].append(elapsed)
        for method in args.naive:
            elapsed, answers[method] = _timed(run_naive, batches, args.workers, args.timeout, method)
            times[method].append(elapsed)
    return {"times": times, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100, help="programs per call, like one rollout batch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--programs-per-child", type=int, default=16,
                        help="programs_per_child of the second reftkit row (opt-in mode); 1 to skip that row")
    parser.add_argument("--svamp", action="store_true", help=f"use the answer_cot programs of {SVAMP}")
    parser.add_argument("--naive", nargs="+", default=["fork", "spawn"], choices=["fork", "spawn", "forkserver"],
                        help="start methods of the naive pool to measure")
    parser.add_argument("--trainer-imports", default="torch,transformers",
                        help="modules a trainer imports, for the second phase ('' to skip it)")
    parser.add_argument("--trainer-rounds", type=int, default=1)
    parser.add_argument("--doc", default="docs/executor-speed.md", help="markdown report path; '' to skip writing")
    args = parser.parse_args()

    programs = svamp_programs(args.programs) if args.svamp else template_programs(args.programs)
    if programs is None:
        print(f"{SVAMP} not found: nothing to benchmark with --svamp (skipped)")
        return
    batches = [programs[i : i + args.batch] for i in range(0, len(programs), args.batch)]
    config = ExecutorConfig(workers=args.workers, timeout_s=args.timeout)
    load_before = _load()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        executors = {"reftkit": stack.enter_context(ProgramExecutor(config))}
        startup = time.perf_counter() - start
        if args.programs_per_child > 1:
            shared = dataclasses.replace(config, programs_per_child=args.programs_per_child)
            executors["shared"] = stack.enter_context(ProgramExecutor(shared))
        for executor in executors.values():
            run_reftkit(executor, batches[:1])  # warm-up: pools started, caches hot
        phases = {"bare": measure(executors, batches, args, args.rounds)}
        if args.trainer_imports:
            os.environ[TRAINER_ENV] = args.trainer_imports
            _import_trainer_modules()
            phases["trainer"] = measure(executors, batches, args, args.trainer_rounds)
        layers = dict(executors["reftkit"].layers)
    report(args, programs, phases, layers, startup, (load_before, _load()))


def _table(n: int, phase: dict, args) -> list[str]:
    median = {k: statistics.median(v) for k, v in phase["times"].items()}
    rate = {k: n / v for k, v in median.items()}
    ours = phase["answers"]["reftkit"]
    mine = [k for k in ("reftkit", "shared") if k in rate]
    names = {"reftkit": "reftkit ProgramExecutor (default: a fresh child per program)",
             "shared": f"reftkit ProgramExecutor, programs_per_child={args.programs_per_child} (opt-in)"}
    isolation = {"reftkit": "all layers below",
                 "shared": "all layers below; programs of a chunk share one child (docs/executor.md)"}
    ratio_heads = " | ".join(f"reftkit {'default' if k == 'reftkit' else 'programs_per_child'} speed / this" for k in mine)
    rows = [f"| approach | programs / s | median s for all | {ratio_heads} | isolation | answers |",
            "|---|---|---|" + "---|" * len(mine) + "---|---|"]
    for key, answers in phase["answers"].items():
        ratios = " | ".join(f"{rate[k] / rate[key]:.2f}x" for k in mine)
        if key in names:
            name, iso = names[key], isolation[key]
            check = (f"{sum(a is not None for a in ours)}/{n} answered" if key == "reftkit" else
                     f"{sum(_agree(a, b) for a, b in zip(ours, answers, strict=True))}/{n} agree with default")
        else:
            name, iso = f"naive: new ProcessPoolExecutor ({key}) per batch + exec", "none"
            check = f"{sum(_agree(a, b) for a, b in zip(ours, answers, strict=True))}/{n} agree with reftkit"
        rows.append(f"| {name} | {rate[key]:.0f} | {median[key]:.2f} | {ratios} | {iso} | {check} |")
    return rows


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def report(args, programs, phases, layers, startup, loads) -> None:
    n = len(programs)
    source = f"SVAMP answer_cot ({SVAMP.name})" if args.svamp else "template generator (benchmarks/executor_speed.py)"
    off = {k: v for k, v in layers.items() if not v.startswith("on")}
    command = " ".join(["python", "benchmarks/executor_speed.py", *sys.argv[1:]])
    lines = [
        "# Program executor speed",
        "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()}-core CPU, {platform.platform()}, Python {platform.python_version()}  ",
        f"Date: {datetime.date.today().isoformat()}; 1-minute load average {loads[0]} before, {loads[1]} after  ",
        f"Programs: {n} from the {source}, in batches of {args.batch}; {args.workers} workers for every approach",
        "",
        f"## Bare benchmark process (median of {args.rounds} alternating rounds)",
        "",
        *_table(n, phases["bare"], args),
    ]
    if "trainer" in phases:
        lines += [
            "",
            f"## Trainer-like process: {args.trainer_imports} imported ({args.trainer_rounds} round(s))",
            "",
            "The naive pool now forks a process holding what a trainer imports, or, with spawn, each of its "
            "workers re-imports the trainer's main module. (A real trainer also holds model weights and CUDA "
            "state, which make fork slower still, and unsafe.)",
            "",
            *_table(n, phases["trainer"], args),
        ]
    lines += [
        "",
        f"Executor start-up (stdlib pool ready): {startup:.2f} s, not included above (paid once per training run).",
        "",
        "Isolation layers reported by the workers during the run:",
        "",
        *[f"- {name}: {state}" for name, state in sorted(layers.items())],
        "",
        "Degraded layers: " + (", ".join(sorted(off)) if off else "none"),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.doc:
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(text)


if __name__ == "__main__":
    main()
