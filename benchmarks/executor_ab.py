"""A/B throughput of the executor at two revisions, interleaved, for machines that are not idle.

    python benchmarks/executor_ab.py --base 86c32cb [--rounds 5] [--programs 1000] [--batch 100] [--workers 2]
                                     [--programs-per-child 1]

The base revision's `src/` is extracted with `git archive` into a temporary directory (the working tree is
not touched); the working tree's `src/` is the other side. Each round runs both, in alternating order, in
fresh processes, on the same template programs as benchmarks/executor_speed.py, and measures the wall
clock and the CPU time (user + system) of the workers and all their children per program. The report gives
the medians. On a loaded machine the absolute numbers move with the load; the interleaving makes the two
sides see the same load, so compare them with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])
from executor_speed import template_programs
from reftkit.executor import ExecutorConfig, ProgramExecutor
n, batch, workers, per_child = (int(a) for a in sys.argv[3:7])
programs = template_programs(n)
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
with ProgramExecutor(ExecutorConfig(workers=workers, timeout_s=5.0, programs_per_child=per_child)) as ex:
    ex.run(programs[:50])
    pids = [w.proc.pid for w in ex._workers]
    before = sum(cpu(p) for p in pids)
    start = time.perf_counter()
    results = [r for i in range(0, n, batch) for r in ex.run(programs[i:i + batch])]
    wall = time.perf_counter() - start
    used = sum(cpu(p) for p in pids) - before
assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
print(json.dumps({"per_s": n / wall, "cpu_ms": used / n * 1e3}))
"""


def _extract(rev: str, into: str) -> str:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return os.path.join(into, "src")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--programs-per-child", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reftkit-ab-") as tmp:
        sides = {args.base: _extract(args.base, tmp), "working tree": str(ROOT / "src")}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                argv = [sys.executable, "-c", RUN, sides[name], str(ROOT / "benchmarks"), str(args.programs),
                        str(args.batch), str(args.workers), str(args.programs_per_child)]
                out = subprocess.run(argv, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.programs} template programs in calls of {args.batch}, {args.workers} workers, programs_per_child="
          f"{args.programs_per_child}, median of {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print("\n| revision | programs / s | CPU ms per program (workers + children) |\n|---|---|---|")
    for name, results in runs.items():
        rate = statistics.median(r["per_s"] for r in results)
        cpu_ms = statistics.median(r["cpu_ms"] for r in results)
        print(f"| {name} | {rate:.0f} | {cpu_ms:.2f} |")


if __name__ == "__main__":
    main()
