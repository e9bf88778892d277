"""Where a program's time goes in reftkit's executor with its default of a fresh child per program.

    python benchmarks/executor_profile.py [--programs 300]

This process turns itself into an executor worker (a Zygote, as pool.py starts one: it moves into a new
network, IPC and PID namespaces where allowed and becomes a child subreaper), so run it on its own, never
import it. It times, per child, on the same worker: a bare fork + exit + wait4; the worker's own
fork-and-collect of
an empty child (pipe, pidfd wait, stray reaping); each hardening step as the child applies it; and the
whole path for real template programs (parse, check, compile, fork, harden, run, answer). Wall clock, and
CPU time (the worker's and its children's, user + system) with page faults, which move far less with the
load of a shared machine than the wall clock does. The workers pool.py starts run as `python -I -S -B`
with LD_BIND_NOW=1; for the same conditions run this as `LD_BIND_NOW=1 python -S benchmarks/executor_profile.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # also without site (python -S)

from executor_speed import template_programs  # noqa: E402

from reftkit.executor import kernel  # noqa: E402
from reftkit.executor.config import ExecutorConfig  # noqa: E402
from reftkit.executor.sandbox import RESULT_FD, _setup_fds  # noqa: E402
from reftkit.executor.worker import Zygote  # noqa: E402


def _per_call(fn, n: int) -> tuple[float, float, float]:
    """(wall ms, CPU ms of this process and its children, page faults of both) per call of fn."""
    def usage() -> tuple[float, float, int]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        return time.perf_counter(), cpu, own.ru_minflt + kids.ru_minflt
    before = usage()
    for _ in range(n):
        fn()
    after = usage()
    return tuple((a - b) / n * scale for a, b, scale in zip(after, before, (1e3, 1e3, 1), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=300)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="reftkit-profile-")
    os.chdir(scratch)
    config = ExecutorConfig(workers=1)
    stdlib = [m for m in config.allowed_imports if m.partition(".")[0] in sys.stdlib_module_names]
    zygote = Zygote(config, stdlib, scratch)  # the "lean" worker: what the template programs run in

    def bare_fork() -> None:
        pid = kernel.fork(zygote._raw_fork)
        if pid == 0:  # pragma: no cover -- child
            os._exit(0)
        os.wait4(pid, 0)

    def steps_child(fd: int) -> None:  # pragma: no cover -- child
        timings = {}
        start = _clocks()
        _setup_fds(zygote.ctx, fd)
        timings["descriptors (dup2, close_range)"] = _since(start)
        for name, step in zygote.ctx.steps:
            start = _clocks()
            step()
            timings[name] = _since(start)
        os.write(RESULT_FD, json.dumps(timings).encode())
        os._exit(0)

    n = args.programs
    rows = {"bare fork + exit + wait4 (into the worker's PID namespace)": _per_call(bare_fork, n),
            "worker fork-and-collect of an empty child": _per_call(
                lambda: zygote._fork_and_collect(lambda fd: os._exit(0)), n)}
    steps: dict[str, list[float]] = {}
    for _ in range(n):
        for name, values in json.loads(zygote._fork_and_collect(steps_child)["data"]).items():
            total = steps.setdefault(name, [0.0, 0.0, 0.0])
            for i, value in enumerate(values):
                total[i] += value / n
    programs = template_programs(n)
    zygote.run_chunk(programs[:10])  # warm
    next_program = iter(programs).__next__
    rows["whole path per template program"] = _per_call(lambda: zygote.run_chunk([next_program()]), n)

    print(f"{n} children each, one worker, pid {os.getpid()}; load average {os.getloadavg()[0]:.2f}; layers: "
          + ", ".join(k for k, v in sorted(zygote.layers.items()) if v.startswith("on")))
    print("\n| what | wall ms | CPU ms (worker + child) | page faults |\n|---|---|---|---|")
    for name, (wall, cpu, faults) in rows.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {faults:.0f} |")
    print("\n| hardening step, in the child | wall µs | CPU µs | page faults |\n|---|---|---|---|")
    steps["all steps"] = [sum(column) for column in zip(*steps.values(), strict=True)]
    for name, (wall, cpu, faults) in steps.items():
        print(f"| {name} | {wall * 1e6:.0f} | {cpu * 1e6:.0f} | {faults:.1f} |")


def _clocks() -> tuple[float, float, int]:
    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _since(start: tuple[float, float, int]) -> list[float]:
    return [now - then for now, then in zip(_clocks(), start, strict=True)]


if __name__ == "__main__":
    main()
