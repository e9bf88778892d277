"""Where a program's time goes in reftkit's executor with its default of a fresh child per program.

    python benchmarks/executor_profile.py [--programs 300]

This process turns itself into an executor worker (a Zygote, as pool.py starts one: it moves into a new
network, IPC and PID namespaces where allowed and becomes a child subreaper), so run it on its own, never
import it. It times, per child, on the same worker: a bare fork + exit + wait4; the worker's own
fork-and-collect of
an empty child (pipe, pidfd wait, stray reaping); each hardening step as the child applies it; and the
whole path for real template programs (parse, check, compile, fork, harden, run, answer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from executor_speed import template_programs  # noqa: E402

from reftkit.executor import kernel  # noqa: E402
from reftkit.executor.config import ExecutorConfig  # noqa: E402
from reftkit.executor.sandbox import RESULT_FD, _setup_fds  # noqa: E402
from reftkit.executor.worker import Zygote  # noqa: E402


def _per_call_ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


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
        start = time.perf_counter()
        _setup_fds(zygote.ctx, fd)
        timings["descriptors (dup2, close_range)"] = time.perf_counter() - start
        for name, step in zygote.ctx.steps:
            start = time.perf_counter()
            step()
            timings[name] = time.perf_counter() - start
        os.write(RESULT_FD, json.dumps(timings).encode())
        os._exit(0)

    n = args.programs
    rows = {"bare fork + exit + wait4 (into the worker's PID namespace)": _per_call_ms(bare_fork, n),
            "worker fork-and-collect of an empty child": _per_call_ms(
                lambda: zygote._fork_and_collect(lambda fd: os._exit(0)), n)}
    steps: dict[str, float] = {}
    for _ in range(n):
        for name, seconds in json.loads(zygote._fork_and_collect(steps_child)["data"]).items():
            steps[name] = steps.get(name, 0.0) + seconds * 1e3 / n
    programs = template_programs(n)
    zygote.run_chunk(programs[:10])  # warm
    next_program = iter(programs).__next__
    rows["whole path per template program"] = _per_call_ms(lambda: zygote.run_chunk([next_program()]), n)

    print(f"{n} children each, one worker, pid {os.getpid()}; layers: "
          + ", ".join(k for k, v in sorted(zygote.layers.items()) if v.startswith("on")))
    print("\n| what | ms per child |\n|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"| hardening, all steps (in the child) | {sum(steps.values()):.2f} |")
    for name, ms in steps.items():
        print(f"| - {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
