"""Throughput of reftkit's sandboxed executor vs the paper's naive process pools, on the same programs.

    python benchmarks/executor_speed.py [--programs 1000] [--batch 4 100] [--programs-per-child 16] [--svamp]
                                        [--naive paper fork spawn] [--doc report.md]

Programs: P-CoT programs like the SVAMP/GSM8K training data (`def solution(): ... return result`), made
by a small template generator (some use math, fractions or statistics); with --svamp, the `answer_cot`
programs of ../shared/data/svamp/train_python.json instead (skipped cleanly when the file is absent).

Every approach gets the same programs in calls of --batch programs (one table per batch size):
- reftkit's ProgramExecutor, with its default of a fresh forked child per program, and with the opt-in
  programs_per_child (several programs of a call share one sandboxed child, see docs/executor.md);
- "paper": what the paper's code (src/python_engine.py of the ReFT repository) does for every call: a new
  pebble ProcessPool of 8 workers whose initializer sets RLIMIT_AS, one `schedule(..., timeout=...)` per
  program, `exec` of the program with `import math` and `import sympy` prepended, no other isolation.
  Its ReFT scripts call it with batch_size=4 programs per training process: the --batch 4 table.
  Needs `pip install pebble` (the row is skipped with a message without it). Like the paper's module, this
  process then imports sympy before measuring, so every fork-based naive pool forks a process holding it;
- "fork"/"spawn": a leaner naive pool: a new stdlib ProcessPoolExecutor with --workers workers per call,
  the same `exec`. Spawn starts fresh interpreters for every call, so it is measured only at the largest
  batch size (at 4 programs per call from a trainer-like process it would take many minutes).
All approaches run in alternating rounds so that they see the same machine load; the report gives the
median round. A second phase repeats the measurement from a trainer-like process: it imports what a
trainer's main module imports (--trainer-imports; spawned pool workers re-import them through this module)
and holds --trainer-memory-gb of touched memory standing for model weights and optimizer state, which every
forked pool worker must map (page tables) and which fork-based pools therefore pay for.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

from reftkit.executor import ExecutorConfig, ProgramExecutor, Status
from reftkit.executor.sandbox import answer

PAPER_PREFIX = "import math\nimport sympy\n"
PAPER_RLIMIT_AS = 120 * 2**30  # the paper's "20GB" allowance, as its code computes it (2**30 * 12 * 10)
PAPER_WORKERS = 8
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
    """exec in a pool process, no isolation. Answer text as reftkit would write it."""
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 -- the unsafe baseline being measured
    status, text, _ = answer(namespace["solution"](), 10**6)
    return text if status is Status.OK else None


def _paper_one(source: str) -> str | None:
    """The paper's task: its two imports prepended. (It execs with separate globals and locals dicts, which
    breaks programs that import at top level; one namespace here, so that the answers can be compared.)"""
    return _naive_one(PAPER_PREFIX + source)


def _paper_initializer(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


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


def run_paper(batches: list[list[str]], workers: int, timeout_s: float) -> list[str | None]:
    """The paper's run_python_code: a new pebble pool per call, one scheduled task with a timeout per program."""
    import pebble

    out: list[str | None] = []
    for batch in batches:
        with pebble.ProcessPool(max_workers=workers, initializer=_paper_initializer,
                                initargs=(PAPER_RLIMIT_AS,)) as pool:
            futures = [pool.schedule(_paper_one, args=[src], timeout=timeout_s) for src in batch]
            for future in futures:
                try:
                    out.append(future.result())
                except Exception:  # noqa: BLE001 -- as in the paper: any failure is "no answer"
                    out.append(None)
            pool.close()
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


def _approaches(args, batch: int) -> list[str]:
    """The naive approaches measured at this batch size (spawn only at the largest: see the docstring)."""
    return [a for a in args.naive if a != "spawn" or batch == max(args.batch)]


def measure(executors: dict[str, ProgramExecutor], programs: list[str], args, rounds: int) -> dict:
    """For each batch size, alternating rounds of every approach: times per approach and each one's answers."""
    tables = {}
    for size in args.batch:
        batches = [programs[i : i + size] for i in range(0, len(programs), size)]
        naive = _approaches(args, size)
        times: dict[str, list[float]] = {name: [] for name in [*executors, *naive]}
        answers: dict[str, list[str | None]] = {}
        for _ in range(rounds):
            for name, executor in executors.items():
                elapsed, answers[name] = _timed(run_reftkit, executor, batches)
                times[name].append(elapsed)
            for name in naive:
                if name == "paper":
                    elapsed, answers[name] = _timed(run_paper, batches, args.paper_workers, args.timeout)
                else:
                    elapsed, answers[name] = _timed(run_naive, batches, args.workers, args.timeout, name)
                times[name].append(elapsed)
        tables[size] = {"times": times, "answers": answers}
    return tables


def _hold_memory(gigabytes: float) -> bytearray:
    """Touched memory standing for a trainer's weights and optimizer state (every page resident)."""
    return bytearray(b"\x01") * int(gigabytes * 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 100],
                        help="programs per call, like one rollout batch (4: the paper's ReFT scripts); a table each")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="workers of reftkit and of the stdlib naive pools")
    parser.add_argument("--paper-workers", type=int, default=PAPER_WORKERS, help="workers of the paper's pebble pool")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--programs-per-child", type=int, default=16,
                        help="programs_per_child of the second reftkit row (opt-in mode); 1 to skip that row")
    parser.add_argument("--svamp", action="store_true", help=f"use the answer_cot programs of {SVAMP}")
    parser.add_argument("--naive", nargs="+", default=["paper", "fork", "spawn"],
                        choices=["paper", "fork", "spawn", "forkserver"], help="naive approaches to measure")
    parser.add_argument("--trainer-imports", default="torch,transformers",
                        help="modules a trainer imports, for the second phase ('' to skip it)")
    parser.add_argument("--trainer-memory-gb", type=float, default=1.0,
                        help="touched memory the process holds in the second phase (model weights, optimizer)")
    parser.add_argument("--trainer-rounds", type=int, default=1)
    parser.add_argument("--doc", default="", help="also write the markdown report to this path "
                        "(docs/reports/executor-speed-history.md keeps every run's report: paste, do not overwrite)")
    args = parser.parse_args()

    programs = svamp_programs(args.programs) if args.svamp else template_programs(args.programs)
    if programs is None:
        print(f"{SVAMP} not found: nothing to benchmark with --svamp (skipped)")
        return
    if "paper" in args.naive:
        if importlib.util.find_spec("pebble") is None:
            print("pebble is not installed (pip install pebble): the paper's approach is skipped")
            args.naive.remove("paper")
        else:
            import sympy  # noqa: F401 -- the paper's module imports it: its forked workers inherit it
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
            run_reftkit(executor, [programs[:100]])  # warm-up: pools started, caches hot
        phases = {"bare": measure(executors, programs, args, args.rounds)}
        if args.trainer_imports:
            os.environ[TRAINER_ENV] = args.trainer_imports
            _import_trainer_modules()
            held = _hold_memory(args.trainer_memory_gb)
            phases["trainer"] = measure(executors, programs, args, args.trainer_rounds)
            del held
        layers = dict(executors["reftkit"].layers)
    report(args, programs, phases, layers, startup, (load_before, _load()))


ROW_NAMES = {
    "reftkit": "reftkit ProgramExecutor (default: a fresh child per program)",
    "shared": "reftkit ProgramExecutor, programs_per_child={ppc} (opt-in)",
    "paper": "paper's code: new pebble ProcessPool ({pw} workers) per call + exec",
}
STDLIB_ROW_NAME = "naive: new ProcessPoolExecutor ({key}, {w} workers) per call + exec"  # fork, spawn, forkserver
OURS = ("reftkit", "shared")  # reftkit's rows; every other row is a naive approach
ISOLATION = {"reftkit": "all layers below",
             "shared": "all layers below; programs of a chunk share one child (docs/executor.md)",
             "paper": "RLIMIT_AS 120 GiB only"}


def _medians_and_rates(n: int, table: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds for all n programs, and programs/s, per approach."""
    median = {k: statistics.median(v) for k, v in table["times"].items()}
    return median, {k: n / v for k, v in median.items()}


def _table(n: int, table: dict, args) -> list[str]:
    median, rate = _medians_and_rates(n, table)
    ours = table["answers"]["reftkit"]
    mine = [k for k in OURS if k in rate]
    ratio_heads = " | ".join((
        f"reftkit {'default' if k == 'reftkit' else 'programs_per_child'} speed / this"
    ) for k in mine)
    rows = [f"| approach | programs / s | median s for all | {ratio_heads} | isolation | answers |",
            "|---|---|---|" + "---|" * len(mine) + "---|---|"]
    for key, answers in table["answers"].items():
        ratios = " | ".join(f"{rate[k] / rate[key]:.2f}x" for k in mine)
        name = ROW_NAMES.get(key, STDLIB_ROW_NAME).format(key=key, ppc=args.programs_per_child,
                                                          pw=args.paper_workers, w=args.workers)
        agree = sum(_agree(a, b) for a, b in zip(ours, answers, strict=True))
        check = (f"{sum(a is not None for a in ours)}/{n} answered" if key == "reftkit" else
                 f"{agree}/{n} agree with {'default' if key == 'shared' else 'reftkit'}")
        rows.append(
            f"| {name} | {rate[key]:.0f} | {median[key]:.2f} | {ratios} | {ISOLATION.get(key, 'none')} | {check} |"
        )
    return rows


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _targets(n: int, phases: dict) -> list[str]:
    """The issue's targets (>= 500 programs/s, >= 10x the naive approach), per phase and batch size, computed."""
    lines = []
    for phase, tables in phases.items():
        for size, table in tables.items():
            _, rate = _medians_and_rates(n, table)
            for mine in (k for k in OURS if k in rate):
                against = ", ".join(f"{rate[mine] / rate[k]:.1f}x {k}" for k in rate if k not in OURS)
                tenfold = "yes" if "paper" in rate and rate[mine] >= 10 * rate["paper"] else "no"
                lines.append(f"- {phase}, {size} per call, reftkit {'default' if mine == 'reftkit' else 'shared'}: "
                             f"{rate[mine]:.0f}/s (>= 500: {'yes' if rate[mine] >= 500 else 'no'}); "
                             f"{against} (>= 10x the paper's code: {tenfold})")
    return lines


def report(args, programs, phases, layers, startup, loads) -> None:
    n = len(programs)
    source = f"SVAMP answer_cot ({SVAMP.name})" if args.svamp else "template generator (benchmarks/executor_speed.py)"
    off = {k: v for k, v in layers.items() if not v.startswith("on")}
    command = shlex.join(["python", "benchmarks/executor_speed.py", *sys.argv[1:]])  # quoted: --trainer-imports ''
    lines = [
        "# Program executor speed",
        "",
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()}-core CPU, {platform.platform()}, Python {platform.python_version()}  ",
        f"Date: {datetime.date.today().isoformat()}; 1-minute load average {loads[0]} before, {loads[1]} after  ",
        f"Programs: {n} from the {source}, in calls of {' and '.join(map(str, args.batch))} programs; "
        f"{args.workers} reftkit workers, {args.workers} workers per stdlib pool, {args.paper_workers} per pebble pool",
    ]
    titles = {"bare": f"Bare benchmark process (median of {args.rounds} alternating rounds)",
              "trainer": f"Trainer-like process: {args.trainer_imports} imported, {args.trainer_memory_gb:g} GB of "
                         f"memory held ({args.trainer_rounds} round(s))"}
    for phase, tables in phases.items():
        for size, table in tables.items():
            lines += ["", f"## {titles[phase]}, {size} programs per call", "", *_table(n, table, args)]
    lines += [
        "",
        "## Targets (computed from the tables above)",
        "",
        *_targets(n, phases),
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
