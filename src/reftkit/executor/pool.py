"""Trainer side: starts the workers, feeds them programs, enforces its own deadlines, restarts the dead.

Nothing here executes or even parses a program: sources go to the workers as JSON strings, and only
JSON strings come back. Each worker is `python -I -S -B -c <boot>` (a fresh interpreter: nothing of the
trainer's memory, CUDA state, open files or environment is inherited), in its own session.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
import weakref
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from reftkit.executor.config import ExecResult, ExecutorConfig, Status, check_workers

if TYPE_CHECKING:
    from typing_extensions import Self

MAX_SOURCE_CHARS = 100_000  # longer "programs" are refused without being sent anywhere (P-CoT: < 4k)
_DEPTH = 2  # chunks queued per worker: the next one is always there when one is answered
_CHUNK = 16  # programs per message at most (more with programs_per_child): one write and one reply per chunk
_GRACE_S = 2.0  # slack on top of the chunk's time limits before the trainer declares a worker hung
_PER_PROGRAM_S = 0.25  # slack per program of a chunk (parsing, forking) on top of timeout_s
_STDERR_TAIL = 4096
_MAX_START_FAILURES = 3
_BOOT = (
    "import sys; sys.path[:0] = sys.argv[3:]; "
    "from reftkit.executor.worker import main; main()"
)
_warned: set[str] = set()
logger = logging.getLogger("reftkit.executor")


class ExecutorError(RuntimeError):
    """The workers cannot be started at all (a broken environment, not a program's doing)."""


def _warn_once(key: str, message: str, pending: list[str]) -> None:
    """Queues a warning the first time this process sees `key` (emitted by the public method)."""
    if key not in _warned:
        _warned.add(key)
        pending.append(message)
        logger.info(message)


class _Worker:
    """One zygote process and the bookkeeping of the tasks queued on it."""

    def __init__(self, kind: str, config: ExecutorConfig, preload: list[str], scratch: str, tag: str) -> None:
        self.kind = kind
        self.config = config
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [package_root] + [p for p in sys.path if p and os.path.isdir(p)]
        env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch,
               # children cannot start threads (seccomp kills clone): BLAS libraries must not try
               **{f"{lib}_NUM_THREADS": "1" for lib in ("OPENBLAS", "OMP", "MKL", "NUMEXPR", "VECLIB_MAXIMUM")},
               # every library call resolved once in the worker: a child's first call of a function would
               # otherwise write the worker's (shared, copy-on-write) linkage table, a page fault per page
               "LD_BIND_NOW": "1"}
        # -S: no site module, so no site-packages .pth code runs in the worker (the trainer's sys.path is
        # passed in argv instead); it leaves the worker several MB smaller, and every fork copies less.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _BOOT, "reftkit-executor", tag, *paths],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=scratch, start_new_session=True, close_fds=True,
        )
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        self.started = time.monotonic()
        self.head_since = self.started
        self.ready = False
        self.layers: dict[str, str] = {}
        self.inflight: deque[list[int]] = deque()  # chunks sent, oldest first
        self.sendbuf = bytearray()
        self.recvbuf = bytearray()
        self.stderr_tail = bytearray()
        self.dead = False
        self.cpu: int | None = None  # the CPU it is pinned to, if any
        setup = {"config": config.to_dict(), "preload": preload, "scratch": scratch}
        self.queue_line(setup)

    def queue_line(self, message: dict) -> None:
        self.sendbuf += (json.dumps(message) + "\n").encode()

    def send_chunk(self, indices: list[int], sources: list[str]) -> None:
        if not self.inflight:
            self.head_since = time.monotonic()
        self.inflight.append(indices)
        self.queue_line({"c": [[i, src] for i, src in zip(indices, sources, strict=True)]})

    def flush(self) -> None:
        """Writes what the pipe takes now; marks the worker dead if it is gone."""
        if not self.sendbuf or self.dead:
            return
        try:
            written = os.write(self.proc.stdin.fileno(), self.sendbuf)
            del self.sendbuf[:written]
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):
            self.dead = True

    def read_messages(self) -> list[dict]:
        """Complete JSON lines available on stdout; sets dead on EOF or garbage."""
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return []
        except OSError:
            chunk = b""
        if not chunk:
            self.dead = True
            return []
        self.recvbuf += chunk
        *lines, rest = self.recvbuf.split(b"\n")
        self.recvbuf = bytearray(rest)
        messages = []
        for line in lines:
            try:
                messages.append(json.loads(line))
            except ValueError:
                self.dead = True  # the worker is ours and speaks JSON; anything else means it is broken
        return messages

    def read_stderr(self) -> None:
        try:
            chunk = os.read(self.proc.stderr.fileno(), 65536)
        except (BlockingIOError, OSError, ValueError):  # ValueError: pipe already closed
            return
        self.stderr_tail = (self.stderr_tail + chunk)[-_STDERR_TAIL:]

    def deadline(self) -> float | None:
        """When the head chunk must have answered, or None when idle."""
        if not self.inflight and self.ready:
            return None
        programs = len(self.inflight[0]) if self.inflight else 1
        budget = programs * (self.config.timeout_s + _PER_PROGRAM_S) + _GRACE_S
        return self.head_since + budget + (0 if self.ready else self.config.startup_timeout_s)

    def kill(self) -> None:
        """SIGKILL the worker's session; its children die with it (parent-death signal)."""
        self.dead = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass

    def terminate(self) -> None:
        """Asks the worker to stop: it kills its running program and exits."""
        try:
            self.proc.send_signal(signal.SIGTERM)
        except OSError:
            pass

    def wait(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            pass


def _shutdown(workers: list[_Worker], scratch: list[str], owner: int) -> None:
    """Finaliser: also runs at interpreter exit or when the executor is garbage-collected unclosed.
    Does nothing in a forked copy of the owner (its workers are not that process's to stop)."""
    if os.getpid() != owner:
        return
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + 0.5
    for worker in workers:
        worker.wait(deadline - time.monotonic())
        worker.kill()
    workers.clear()
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)
    scratch.clear()


class ProgramExecutor:
    """Runs untrusted P-CoT programs in sandboxed worker processes; see docs/executor.md.

    `run` returns exactly one ExecResult per source, in order, whatever the programs do. It is safe to call
    from several threads (calls are serialised). Use as a context manager, or call close().
    """

    def __init__(self, config: ExecutorConfig | None = None) -> None:
        self.config = config or ExecutorConfig()
        check_workers(self.config.workers)  # a worker count the machine cannot run is refused, not slow
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._scratch: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._tag = f"{os.getpid()}-{id(self):x}-{time.monotonic_ns()}"
        self._start_failures = {"lean": 0, "full": 0}
        self._closed = False
        self._writers: set[tuple[str, _Worker]] = set()
        self._pending_warnings: list[str] = []
        self.layers: dict[str, str] = {}
        heavy = [m for m in self.config.allowed_imports if m.partition(".")[0] not in sys.stdlib_module_names]
        self._preload = {"lean": [m for m in self.config.allowed_imports if m not in heavy],
                         "full": list(self.config.allowed_imports)}
        tops = sorted({m.partition(".")[0] for m in heavy})
        self._heavy_re = re.compile(r"\b(?:" + "|".join(map(re.escape, tops)) + r")\b") if tops else None
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._scratch, os.getpid())

    # -------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Starts the stdlib pool and waits until it is ready (the third-party pool starts on first use)."""
        with self._lock:
            self._ensure_pool("lean")
            self._wait_ready("lean")
        self._flush_warnings()

    def close(self) -> None:
        """Stops every worker (and so every program still running). Idempotent."""
        with self._lock:
            self._closed = True
            for worker in self._workers:
                self._unregister(worker)
            self._finalizer()
            self._selector.close()

    # ------------------------------------------------------------------------------------------ run

    def run(self, sources: Sequence[str]) -> list[ExecResult]:
        """Executes each program's entry function; one result per program, in submission order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ProgramExecutor is closed")
            results = self._run(list(sources))
        self._flush_warnings()
        return results

    def _flush_warnings(self) -> None:
        while self._pending_warnings:
            warnings.warn(self._pending_warnings.pop(0), RuntimeWarning, stacklevel=3)

    def run_one(self, source: str) -> ExecResult:
        return self.run([source])[0]

    def _run(self, sources: list[str]) -> list[ExecResult]:
        batch = _Batch(sources)
        for index, source in enumerate(sources):
            if not isinstance(source, str):
                batch.settle(index, ExecResult(Status.ERROR, detail="program is not a string"))
            elif len(source) > MAX_SOURCE_CHARS:
                too_long = f"program longer than {MAX_SOURCE_CHARS} characters"
                batch.settle(index, ExecResult(Status.ERROR, detail=too_long))
            else:
                batch.queues[self._route(source)].append(index)
        try:
            while batch.left:
                self._dispatch(batch)
                self._pump(batch)
        except BaseException:
            self._kill_busy()  # interrupted mid-batch: the workers' queues are out of step with ours
            raise
        return batch.results  # type: ignore[return-value]

    def _route(self, source: str) -> str:
        """The pool with the third-party modules pre-loaded if the text names one. Python reads identifiers
        NFKC-normalised, so `import ｓｙｍｐｙ` is `import sympy`: normalise before looking."""
        if self._heavy_re is None:
            return "lean"
        text = source if source.isascii() else unicodedata.normalize("NFKC", source)
        return "full" if self._heavy_re.search(text) else "lean"

    def _dispatch(self, batch: _Batch) -> None:
        for kind, queue in batch.queues.items():
            if not queue:
                continue
            self._ensure_pool(kind)
            pool = [w for w in self._pool(kind) if not w.dead]
            size = self._chunk_size(len(queue), len(pool))
            for _ in range(_DEPTH):  # round-robin, so that a small batch is spread over every worker
                for worker in pool:
                    if queue and len(worker.inflight) < _DEPTH:
                        chunk = self._next_chunk(queue, batch, size)
                        worker.send_chunk(chunk, [batch.sources[i] for i in chunk])
        for worker in self._workers:
            worker.flush()
            self._want_write(worker, bool(worker.sendbuf) and not worker.dead)

    def _chunk_size(self, queued: int, workers: int) -> int:
        """Programs per chunk: a fair share each, so that the workers finish together. A share that fits in one
        chunk goes in one: the worker then parses and compiles them all before its first fork, and every
        page it writes in between costs a copy-on-write fault. Larger shares are cut into _DEPTH chunks or
        more, so that a worker always has its next chunk queued while it answers one."""
        cap = max(_CHUNK, self.config.programs_per_child)
        share = -(-queued // max(1, workers))
        return share if share <= cap else min(cap, -(-share // _DEPTH))

    @staticmethod
    def _next_chunk(queue: deque[int], batch: _Batch, size: int) -> list[int]:
        """The next `size` programs at most; a program whose worker died is sent alone."""
        chunk = [queue.popleft()]
        while len(chunk) < size and queue and not batch.attempts.get(chunk[0]) and not batch.attempts.get(queue[0]):
            chunk.append(queue.popleft())
        return chunk

    def _pump(self, batch: _Batch) -> None:
        """Waits for worker output (or the next deadline), then handles messages, deaths and hangs."""
        deadlines = [d for d in (w.deadline() for w in self._workers) if d is not None]
        timeout = min(1.0, max(0.0, min(deadlines) - time.monotonic())) if deadlines else 1.0
        for key, _ in self._selector.select(timeout):
            worker, stream = key.data
            if stream == "out":
                self._on_messages(worker, worker.read_messages(), batch)
            elif stream == "err":
                worker.read_stderr()
            else:
                worker.flush()
                self._want_write(worker, bool(worker.sendbuf) and not worker.dead)
        now = time.monotonic()
        for worker in list(self._workers):
            deadline = worker.deadline()
            hung = not worker.dead and deadline is not None and now > deadline
            if worker.dead or hung:
                self._on_death(worker, batch, hung)

    def _on_messages(self, worker: _Worker, messages: list[dict], batch: _Batch) -> None:
        now = time.monotonic()
        for msg in messages:
            if msg.get("ready"):
                worker.ready, worker.layers, worker.head_since = True, msg.get("layers", {}), now
                self._start_failures[worker.kind] = 0
                self._note_layers(worker)
                continue
            if msg.get("broken"):  # the worker failed its known-good program: replace it, run its chunk again
                logger.warning("reftkit executor: replacing a %s worker: %s", worker.kind, str(msg["broken"])[:300])
                worker.dead = True
                return
            results = msg.get("r")
            if not worker.inflight or not isinstance(results, list) or [
                r.get("i") if isinstance(r, dict) else None for r in results
            ] != worker.inflight[0]:
                worker.dead = True  # out of step with our queue: restart it rather than guess
                return
            for index, result in zip(worker.inflight.popleft(), results, strict=True):
                batch.settle(index, _to_result(result))
            worker.head_since = now

    def _on_death(self, worker: _Worker, batch: _Batch, hung: bool) -> None:
        """Replaces a dead or hung worker. The programs of the chunk it was running are sent again, each on
        its own; a program alone in its chunk is charged (timeout when the worker hung, error on a second
        crash). The chunks queued behind go back to the front of the queue."""
        self._unregister(worker)
        worker.read_stderr()
        worker.kill()
        self._workers.remove(worker)
        chunks = list(worker.inflight)
        pending = [i for chunk in chunks for i in chunk]
        if not worker.ready:
            self._start_failures[worker.kind] += 1
            if self._start_failures[worker.kind] >= _MAX_START_FAILURES:
                tail = worker.stderr_tail.decode(errors="replace").strip()
                raise ExecutorError(f"reftkit executor: {worker.kind} workers fail to start: {tail[-2000:]}")
        elif pending:
            head = chunks[0]
            for index in head:
                batch.attempts[index] = batch.attempts.get(index, 0) + 1
            if len(head) == 1 and (hung or batch.attempts[head[0]] >= 2):
                charged = (ExecResult(Status.TIMEOUT, detail="worker unresponsive; killed and replaced") if hung else
                           ExecResult(Status.ERROR, detail="the worker died twice while running this program"))
                batch.settle(head[0], charged)
                pending = pending[1:]
        batch.queues[worker.kind].extendleft(reversed(pending))

    # ------------------------------------------------------------------------------------- plumbing

    def _pool(self, kind: str) -> list[_Worker]:
        return [w for w in self._workers if w.kind == kind]

    def _ensure_pool(self, kind: str) -> None:
        if not self._scratch:
            self._scratch.append(_make_scratch())
        while len(self._pool(kind)) < self.config.workers:
            worker = _Worker(kind, self.config, self._preload[kind], self._scratch[0], self._tag)
            self._pin(worker, self._pool(kind))
            self._workers.append(worker)
            self._selector.register(worker.proc.stdout, selectors.EVENT_READ, (worker, "out"))
            self._selector.register(worker.proc.stderr, selectors.EVENT_READ, (worker, "err"))
            worker.flush()
            self._want_write(worker, bool(worker.sendbuf))

    def _pin(self, worker: _Worker, pool: list[_Worker]) -> None:
        """Puts a new worker on a CPU of its own in its pool when the pool has a worker for every CPU (see
        ExecutorConfig.pin_workers): its children inherit the CPU at fork."""
        if not self.config.pin_workers or not hasattr(os, "sched_setaffinity"):
            return
        cpus = sorted(os.sched_getaffinity(0))
        if self.config.workers < len(cpus):
            return  # pinned, fewer workers than CPUs could leave a CPU unused while another is busy
        taken = {w.cpu for w in pool}
        free = [c for c in cpus if c not in taken]
        cpu = free[0] if free else cpus[len(pool) % len(cpus)]
        try:
            os.sched_setaffinity(worker.proc.pid, {cpu})
            worker.cpu = cpu
        except OSError:  # the worker is already gone, or a container forbids it: the kernel places it
            pass

    def _wait_ready(self, kind: str) -> None:
        idle = _Batch([])
        while not all(w.ready for w in self._pool(kind)):
            self._pump(idle)
            self._ensure_pool(kind)

    def _want_write(self, worker: _Worker, want: bool) -> None:
        key = ("in", worker)
        registered = key in self._writers
        if want and not registered:
            self._selector.register(worker.proc.stdin, selectors.EVENT_WRITE, (worker, "in"))
            self._writers.add(key)
        elif not want and registered:
            self._selector.unregister(worker.proc.stdin)
            self._writers.discard(key)

    def _unregister(self, worker: _Worker) -> None:
        self._want_write(worker, False)
        for pipe in (worker.proc.stdout, worker.proc.stderr):
            try:
                self._selector.unregister(pipe)
            except (KeyError, ValueError):
                pass

    def _note_layers(self, worker: _Worker) -> None:
        """Publishes the isolation report and warns once per process about each degraded layer."""
        self.layers.update(worker.layers)
        for name, state in worker.layers.items():
            if not state.startswith("on"):
                message = f"reftkit executor: isolation layer {name!r} degraded: {state}"
                _warn_once(f"{name}:{state}", message, self._pending_warnings)

    def _kill_busy(self) -> None:
        for worker in [w for w in self._workers if w.inflight or w.sendbuf]:
            self._unregister(worker)
            worker.kill()
            self._workers.remove(worker)


class _Batch:
    """One run() call: results so far, programs waiting per pool, crash counts."""

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources
        self.results: list[ExecResult | None] = [None] * len(sources)
        self.left = len(sources)
        self.queues: dict[str, deque[int]] = {"lean": deque(), "full": deque()}
        self.attempts: dict[int, int] = {}

    def settle(self, index: int, result: ExecResult) -> None:
        if self.results[index] is None:
            self.left -= 1
        self.results[index] = result


def _to_result(msg: dict) -> ExecResult:
    try:
        status = Status(msg.get("s"))
    except ValueError:
        return ExecResult(Status.ERROR, detail="malformed result from worker")
    value = msg.get("v")
    if (status is Status.OK) != isinstance(value, str):  # ok has a text value, nothing else has one
        return ExecResult(Status.ERROR, detail="malformed result from worker")
    return ExecResult(status, value, str(msg.get("d", "")), str(msg.get("o", "")))


def _make_scratch() -> str:
    """An empty directory the programs run in: readable by everyone (children may run as nobody), writable
    by no one but its owner (and the children are neither the owner nor allowed to write)."""
    path = tempfile.mkdtemp(prefix="reftkit-exec-")
    os.chmod(path, 0o555)
    return path
