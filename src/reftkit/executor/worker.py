"""The worker ("zygote"): a clean interpreter that pre-imports the allowed modules, prepares every isolation
layer once, and forks one short-lived child per program (or per programs_per_child programs).

Started by pool.py as `python -I -S -B -c <boot>`; speaks JSON lines: the first line on stdin is the setup,
then one {"c": [[i, src], ...]} chunk of tasks per line; it answers one {"ready", "layers"} line, then one
{"r": [result, ...]} line per chunk, in order. It never runs untrusted code itself: that happens only in
the forked children.
"""

from __future__ import annotations

import builtins
import decimal
import gc
import importlib
import importlib.util
import json
import os
import pwd
import resource
import signal
import stat
import sys
import sysconfig
import time
import warnings

from reftkit.executor import kernel
from reftkit.executor.collect import children_list, collect, grow_pipe, kill_group, reap_strays
from reftkit.executor.config import ExecutorConfig, Status
from reftkit.executor.policy import AuditPolicy, Importer, module_valued_names, safe_builtins
from reftkit.executor.sandbox import (
    EXIT_INTERNAL,
    EXIT_MEMORY,
    EXIT_ORPHAN,
    RETIRE_PAYLOAD,
    ChildContext,
    child_main,
    decode_result,
    namespace_init,
    prepare,
    prepare_steps,
    probe_main,
    split_frames,
)
from reftkit.executor.warm import warm_child_path

# Imported for the answer classification, and where stdlib code would import them lazily in a child.
_ALWAYS_PRELOAD = ("fractions", "decimal", "numbers", "json")
_LAZY_COMPANIONS = {"datetime": ("_strptime",)}
# Optional kernel layers in the order a child applies them (the probe suspects the latest first).
_PROBE_ORDER = ("rlimit_as", "privileges", "parent_death_signal", "landlock", "seccomp")
# Details of results the worker or the sandbox produced, not the program: after one, the worker checks
# itself with a known-good program and leaves if that fails too (the pool replaces it).
_INTERNAL_DETAILS = ("executor internal error", "no result (the sandbox failed)", "sandbox setup failed")
_STATUSES = {status.value: status for status in Status}
_WORKER_HEADROOM = 2**30  # address space the worker may add to its start-up size (parsing, compiling, results)
_SHARED_SLACK_S = 0.1  # per program, on top of timeout_s, before the worker kills a shared child itself


def _sympy_warmup() -> None:
    """Runs the sympy code paths typical programs use, so that their lazy imports and generated code
    are already in memory when the children fork (and need not be read from disk)."""
    import sympy

    x, y, z = sympy.symbols("x y z")
    sympy.solve(sympy.Eq(2 * x + 3, 11), x)
    sympy.solve([x + y - 10, x - y - 2], [x, y])
    sympy.solve([x + y + z - 6, x - y, y - z], [x, y, z])
    sympy.solve(x**2 - 5 * x + 6, x)
    sympy.simplify((x**2 - 1) / (x - 1))
    sympy.factor(x**2 - 1)
    sympy.expand((x + 1) ** 3)
    sympy.nsimplify(0.5)
    sympy.N(sympy.sqrt(2))
    sympy.Rational(3, 4) + sympy.Integer(1)
    sympy.factorint(360)
    sympy.isprime(97)
    sympy.binomial(10, 3)
    sympy.sympify("x**2 + 1")
    float(sympy.pi)


class Zygote:
    """The worker's set-up: every isolation layer prepared, probed in a child and reported (`layers`), then
    the `ChildRunner` that runs programs in forked children (`runner`), health-checked once."""

    def __init__(self, config: ExecutorConfig, preload: list[str], scratch: str) -> None:
        self.config = config
        self.layers: dict[str, str] = {"process": f"on: clean interpreter (pid {os.getpid()})"}
        self._raw_fork = False  # until start-up is done and the worker is known to be single-threaded
        children_fd = children_list()
        self._unshare_namespaces()
        roots = self._preload(preload)
        self.ctx = self._context(scratch, roots)
        self._prepare_kernel_layers()
        self._limit_own_memory()  # before Landlock: it reads /proc/self/status
        self._confine_self()
        self._raw_fork = len(sys._current_frames()) == 1  # no other Python thread to leave half-copied
        self._prepare_pid_namespace()
        self.runner = ChildRunner(config, self.ctx, self._raw_fork, children_fd, self.ns_init_pid)
        self._probe()
        self._finalise_layers()
        moved = self._apply_in_worker()
        prepare_steps(self.ctx)
        if moved:
            self.runner.check_health()  # the layers as now split between worker and child, once, before any program
        warm_child_path(self.ctx)  # its code specialised once here, not written (and copied) by every child
        gc.collect()
        gc.freeze()  # children need not touch (copy) the pages of long-lived objects when collecting
        kernel.release_free_memory()

    # ------------------------------------------------------------------------------------------- setup

    def _unshare_namespaces(self) -> None:
        try:
            self.layers["network"], self.layers["ipc_namespace"] = kernel.unshare_namespaces()
        except OSError as exc:
            why = exc.strerror or exc
            self.layers["network"] = f"off: {why}; sockets are refused by seccomp and the audit hook"
            self.layers["ipc_namespace"] = f"off: {why}; SysV and POSIX message-queue calls are refused by seccomp"

    def _prepare_pid_namespace(self) -> None:
        """A PID namespace for the children: unshare(CLONE_NEWPID), then a first child that stays as its PID 1
        (sandbox.namespace_init). Every program's child is then created in it: it sees itself and that
        PID 1, never the worker, the trainer or anything else on the host."""
        self.ns_init_pid: int | None = None
        if not self._raw_fork:
            self.layers["pid_namespace"] = "off: the worker is not single-threaded"
            return
        try:
            kernel.unshare_pid_namespace()
        except OSError as exc:
            self.layers["pid_namespace"] = (f"off: {exc.strerror or exc}; other processes are out of reach through "
                                            "seccomp (kill, ptrace, prlimit64 on a pid) instead")
            return
        self.ctx.enabled.add("pid_namespace")  # before the fork: the orphan check must know
        alive_r, self._alive_w = os.pipe()  # the write end stays open in the worker, unused, until it dies
        pid = kernel.fork(self._raw_fork)  # an OSError here fails the worker's start: nothing would work
        if pid == 0:  # pragma: no cover -- child
            namespace_init(self.ctx, alive_r)
        os.close(alive_r)
        self.ns_init_pid = pid
        self.layers["pid_namespace"] = f"on: children see only themselves and the namespace's PID 1 (pid {pid} here)"

    def _preload(self, preload: list[str]) -> tuple[str, ...]:
        """Imports modules; returns the directories children may read: the standard library and where the
        allowed modules live (lazy imports), nothing else."""
        names = list(_ALWAYS_PRELOAD) + list(preload)
        names += [c for m in preload for c in _LAZY_COMPANIONS.get(m, ())]
        missing = []
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 -- a missing optional module only disables that import
                missing.append(name)
        if "sympy" in preload and "sympy" not in missing:
            _sympy_warmup()
        if missing:  # reported (and warned about) like a layer: those imports will fail in programs
            self.layers["preload"] = f"partial: cannot import {', '.join(missing)}"
        roots = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
        for name in self.config.allowed_imports:
            roots.add(_module_root(name))
        roots = {os.path.realpath(r) for r in roots if r and os.path.isdir(r)}
        sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) in roots]  # lazy imports look only here
        importlib.invalidate_caches()
        # The system's shared libraries, read (and mapped) by the dynamic loader when a program's import
        # loads a C extension the worker had not loaded (zlib's libz.so.1 in a venv whose start-up never
        # imported zlib): public files, and without them such an import fails under Landlock.
        libraries = {os.path.realpath(d) for d in _SYSTEM_LIBRARY_DIRS if os.path.isdir(d)}
        return tuple(sorted(roots | libraries))

    def _context(self, scratch: str, roots: tuple[str, ...]) -> ChildContext:
        allowed = frozenset(self.config.allowed_imports)
        policy = AuditPolicy(roots + (os.path.realpath(scratch),))
        importer = Importer(allowed, policy.deny)
        for name in sorted(allowed):
            if name in sys.modules:  # build proxies now, not in every child
                importer.proxy(sys.modules[name])
        module_valued_names()  # cached before forking: checking library code needs it
        max_fd = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        layers_on = self.config.python_layers
        return ChildContext(
            shared=self.config.programs_per_child > 1, decimal_context=decimal.getcontext().copy(),
            python_layers=layers_on,
            max_fd=max_fd if 0 < max_fd < 2**20 else 2**20,
            config=self.config, scratch=scratch, worker_pid=os.getpid(),
            read_roots=policy.read_roots, allowed=allowed, importer=importer, policy=policy,
            builtins=safe_builtins(importer) if layers_on else dict(vars(builtins)),
        )

    def _prepare_kernel_layers(self) -> None:
        ctx = self.ctx
        ctx.enabled = {"process_group"}
        self._inherited_layers()
        self._prepare_rlimits()
        self._prepare_privileges()
        if kernel.IS_LINUX:
            ctx.enabled.add("parent_death_signal")
            try:
                kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
                self.layers["stray_reaper"] = "on: worker is a child subreaper"
            except OSError as exc:
                self.layers["stray_reaper"] = f"off: {exc.strerror}"
        else:
            self.layers["parent_death_signal"] = "off: Linux only"
        self._prepare_landlock()
        self._prepare_seccomp()

    def _inherited_layers(self) -> None:
        """Layers a forked child inherits are applied once, here, rather than in every child."""
        os.chdir(self.ctx.scratch)
        self.layers["scratch_dir"] = "on: the working directory, set in the worker"
        try:
            kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)  # harmless for the worker: it never executes a file
            self.layers["no_new_privs"] = "on: set in the worker"
        except OSError as exc:
            self.layers["no_new_privs"] = f"off: {exc.strerror or exc}"
        try:  # RLIMIT_CORE=0 does not stop a core dump piped to a helper (core_pattern "|..."); this does
            kernel.prctl(kernel.PR_SET_DUMPABLE, 0)
            self.layers["not_dumpable"] = "on: set in the worker (no core dump of a child, whatever core_pattern says)"
        except OSError as exc:
            self.layers["not_dumpable"] = f"off: {exc.strerror or exc}"

    def _limit_own_memory(self) -> None:
        """A soft address-space limit on the worker itself, the one process here that reads program text with no
        limit of its own: parsing and compiling (the static check bounds what compiling costs, see
        policy.compile_violation; this is the backstop) then end in a MemoryError, reported as the program's
        error, not in the host running out of memory. Soft only, so that each child can still set its own."""
        base = _address_space_bytes()
        if base is None or not hasattr(resource, "RLIMIT_AS"):
            self.layers["worker_rlimit_as"] = "off: cannot read this process's address-space size"
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = base + _WORKER_HEADROOM
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        self.layers["worker_rlimit_as"] = f"on: {resource.getrlimit(resource.RLIMIT_AS)[0]}"

    def _prepare_rlimits(self) -> None:
        cfg, ctx = self.config, self.ctx
        cpu = cfg.cpu_limit_s * cfg.programs_per_child  # a shared child's programs have their own CPU timers
        wanted = {
            "rlimit_core": ("RLIMIT_CORE", 0, 0),
            "rlimit_fsize": ("RLIMIT_FSIZE", 0, 0),  # no file writes even if everything else failed
            "rlimit_nofile": ("RLIMIT_NOFILE", 16, 16),
            "rlimit_nproc": ("RLIMIT_NPROC", 0, 0),  # no fork/threads once uid or capabilities are dropped
            "rlimit_cpu": ("RLIMIT_CPU", cpu, cpu + 1),
        }
        base = _address_space_bytes()
        if base is not None:
            limit = base + cfg.memory_mb * 2**20
            wanted["rlimit_as"] = ("RLIMIT_AS", limit, limit)
        else:
            self.layers["rlimit_as"] = "off: cannot read this process's address-space size"
        for layer, (name, soft, hard) in wanted.items():
            if hasattr(resource, name):
                ctx.rlimits[layer] = (getattr(resource, name), soft, hard)
                ctx.enabled.add(layer)
            else:
                self.layers[layer] = f"off: no {name} here"

    def _prepare_privileges(self) -> None:
        ctx = self.ctx
        own_user_namespace = self.layers.get("network", "").startswith("on: new user")
        if os.geteuid() != 0:
            # Unprivileged: drop whatever capabilities we hold (they exist only in our user namespace).
            ctx.privilege = "capdrop" if kernel.IS_LINUX else "none"
            dropped = ", capabilities dropped" if kernel.IS_LINUX else ""
            self.layers["privileges"] = f"on: not root (uid {os.getuid()}){dropped}"
        elif own_user_namespace:  # root without CAP_SYS_ADMIN (a container): only uid 0 is mapped in here
            ctx.privilege = "capdrop"
            self.layers["privileges"] = "partial: uid 0 of the worker's user namespace, every capability dropped"
        else:
            ctx.uid, ctx.gid = _nobody_ids()
            unreadable = [r for r in ctx.read_roots if not _world_readable(r)]
            if not unreadable:
                ctx.privilege = "setuid"
                self.layers["privileges"] = f"on: runs as uid {ctx.uid} (nobody)"
            elif kernel.IS_LINUX:
                ctx.privilege = "capdrop"
                self.layers["privileges"] = (
                    f"partial: stays uid 0 with every capability dropped, because {unreadable[0]} is not "
                    "readable by nobody (root-owned files stay readable by owner rights: Landlock and seccomp "
                    "confine files, the PID namespace and seccomp other root processes)"
                )
            else:
                self.layers["privileges"] = f"off: {unreadable[0]} not readable by nobody"
        if ctx.privilege != "none":
            ctx.enabled.add("privileges")

    def _prepare_landlock(self) -> None:
        ctx = self.ctx
        try:  # /dev/null: each child opens it for its standard streams (sandbox._setup_fds)
            fd, abi = kernel.landlock_ruleset([*ctx.read_roots, os.devnull])
        except OSError as exc:
            self.layers["landlock"] = f"off: {exc.strerror or exc}; reads are confined by the audit hook only"
            return
        ctx.landlock_fd = fd
        ctx.enabled.add("landlock")
        self.layers["landlock"] = f"on: ABI {abi}, read-only access to {len(ctx.read_roots)} directories and /dev/null"

    def _prepare_seccomp(self) -> None:
        try:
            self.ctx.seccomp = kernel.SeccompProgram(kernel.seccomp_filter())
        except OSError as exc:
            self.layers["seccomp"] = f"off: {exc.strerror or exc}"
            return
        self.ctx.enabled.add("seccomp")
        self.layers["seccomp"] = ("on: processes, signals, ptrace, other processes' limits, SysV IPC, F_SETOWN, "
                                  "sockets, namespaces kill the program; file writes fail (named errno)")

    def _confine_self(self) -> None:
        """Landlock on the worker itself, before it forks anything: every process it forks then starts in its
        domain, the namespace's PID 1 included (the worker's death must still reach it: Landlock's signal
        scoping stops signals to processes outside the sender's domain, the parent-death signal included),
        and each program's child inherits the domain instead of applying the ruleset itself. From here on
        the worker opens no file: its children list and pipes are open
        already, and each child opens /dev/null, which the ruleset allows. The process that parses program
        text is confined too."""
        ctx = self.ctx
        if "landlock" not in ctx.enabled or ctx.landlock_fd is None:
            return
        try:
            kernel.landlock_restrict(ctx.landlock_fd)
        except OSError as exc:
            ctx.enabled.discard("landlock")
            self.layers["landlock"] = f"off: {exc.strerror or exc}; reads are confined by the audit hook only"
            return
        os.close(ctx.landlock_fd)
        ctx.landlock_fd = None  # no child needs it: each child's descriptor 4 is closed like the rest
        ctx.inherited.add("landlock")
        self.layers["landlock"] += "; applied once, to the worker itself, inherited by every child"

    def _apply_in_worker(self) -> bool:
        """Once the probe has shown that every layer works in a child: what each child would otherwise do for
        itself, and what the worker does not need for its own work, the worker does once, to itself, and every
        child inherits it (docs/executor.md, "Applied once, in the worker"): the capability drop, and the half
        of the seccomp filter for calls the worker never makes (each child still adds the other half); with
        the PID namespace, its PID 1's parent-death signal stands for each child's. The namespace's PID 1 and
        the probe, forked before this, applied every layer themselves. Returns whether anything moved."""
        ctx = self.ctx
        if ctx.privilege == "capdrop" and "privileges" in ctx.enabled:
            kernel.drop_capabilities()  # the probe child showed that capset works; an OSError fails the start
            ctx.inherited.add("privileges")
            self.layers["privileges"] += "; capabilities dropped once, by the worker, inherited by every child"
        if {"pid_namespace", "parent_death_signal"} <= ctx.enabled:
            # The namespace's PID 1 has the signal; when it dies, the kernel kills every process in the namespace.
            ctx.inherited.add("parent_death_signal")
            self.layers["parent_death_signal"] = ("on: through the PID namespace (its PID 1 dies with the worker, and "
                                                  "the kernel then kills every process in it)")
        if "seccomp" in ctx.enabled:
            try:
                kernel.SeccompProgram(kernel.seccomp_filter("worker")).install()
            except OSError:
                return bool(ctx.inherited)  # not applied: each child keeps installing the whole filter
            ctx.seccomp = kernel.SeccompProgram(kernel.seccomp_filter("child"))
            self.layers["seccomp"] += "; the filter for calls the worker never makes is the worker's, inherited"
            return True
        return bool(ctx.inherited)

    def _probe(self) -> None:
        """Forks one child that tries every layer; layers that fail there are disabled (and reported), so
        that a program never meets a half-applied sandbox. If the probe child dies outright (a filter that
        kills it, say), the kernel layers are switched off one at a time, latest first, until it lives."""
        suspects = [n for n in _PROBE_ORDER if n in self.ctx.enabled]
        while True:
            report = self._probe_once()
            if report is not None or not suspects:
                break
            layer = suspects.pop()
            self.ctx.enabled.discard(layer)
            self.layers[layer] = "off: the probe child died with this layer applied"
        if report is None:
            raise RuntimeError("sandbox probe failed even with every optional layer off")
        for layer, error in report["failures"].items():
            self.ctx.enabled.discard(layer)
            self.layers[layer] = f"off: {error}"
        if report["result"].get("s") != Status.OK.value:
            raise RuntimeError(f"sandbox probe program failed: {report['result']}")

    def _probe_once(self) -> dict | None:
        reply = self.runner.fork_and_collect(lambda fd: probe_main(self.ctx, fd))
        try:
            report = json.loads(reply["data"])
            return {"failures": dict(report["failures"]), "result": dict(report["result"])}
        except (ValueError, KeyError, TypeError):
            return None

    def _finalise_layers(self) -> None:
        for layer in sorted(self.ctx.enabled):
            self.layers.setdefault(layer, "on")
        for layer, (_, soft, _hard) in self.ctx.rlimits.items():
            if layer in self.ctx.enabled:
                self.layers[layer] = f"on: {soft}"
        if not self.config.python_layers:
            for name in ("audit_hook", "static_check", "restricted_builtins"):
                self.layers[name] = "off: python_layers=False (tests of the kernel layers alone)"
            return
        self.layers["audit_hook"] = "on: default-deny audit events"
        self.layers["static_check"] = "on: AST check of names, attributes and imports"
        self.layers["restricted_builtins"] = "on: no open/eval/exec/compile/getattr/...; allow-listed imports"


class ChildRunner:
    """Runs programs in children forked from the prepared worker, programs_per_child to a child, and
    collects each one's result frame; a child that ends abnormally is charged to the program it was
    running. `serve` is the worker's loop: chunks in from the trainer, results out."""

    def __init__(self, config: ExecutorConfig, ctx: ChildContext, raw_fork: bool, children_fd: int | None,
                 ns_init_pid: int | None) -> None:
        self.config, self.ctx, self.ns_init_pid = config, ctx, ns_init_pid
        self._raw_fork, self._children_fd = raw_fork, children_fd
        self._known_good = compile(f"def {config.entry}():\n    return 6 * 7\n", "<health check>", "exec")

    def run_chunk(self, sources: list[str]) -> list[dict]:
        """One result per source. Every program is parsed, checked and compiled before the first fork: the
        worker then writes few pages between forks, each of which would cost a copy-on-write fault."""
        prepared = [prepare(self.ctx, source) for source in sources]
        ran = self.run_codes([p for p in prepared if not isinstance(p, dict)])
        if any(r["s"] == Status.ERROR.value and r["d"].startswith(_INTERNAL_DETAILS) for r in ran):
            self.check_health()
        ran_iter = iter(ran)
        return [p if isinstance(p, dict) else next(ran_iter) for p in prepared]

    def check_health(self) -> None:
        """Runs a known-good program; raises WorkerBroken unless it gets its right answer."""
        try:
            result = self.run_codes([self._known_good])[0]
        except Exception as exc:  # noqa: BLE001 -- any failure here means the worker is broken
            result = _res(Status.ERROR, f"{type(exc).__name__}: {exc}")
        if (result["s"], result["v"]) != (Status.OK.value, "42"):
            raise WorkerBroken(f"known-good program failed: {result['s']}: {result['d']}")

    def run_codes(self, codes: list) -> list[dict]:
        """Runs compiled programs, programs_per_child to a child."""
        size = self.config.programs_per_child
        results: list[dict] = []
        for start in range(0, len(codes), size):
            group = codes[start : start + size]
            try:
                results += self._run_group(group)
            except Exception as exc:  # noqa: BLE001 -- e.g. fork failing (EAGAIN): report, keep serving
                results += [_res(Status.ERROR, f"executor internal error: {type(exc).__name__}: {exc}")] * len(group)
        return results

    def _run_group(self, codes: list) -> list[dict]:
        """One child for `codes`. Each frame it wrote before it ended is its program's result; if it ended
        abnormally, the program it was running is charged and the ones after it get a child each."""
        cap = _frame_cap(self.config)
        limit = self.config.timeout_s + (_SHARED_SLACK_S if self.ctx.shared else 0)
        deadline = time.monotonic() + len(codes) * limit
        reply = self.fork_and_collect(lambda fd: child_main(self.ctx, codes, fd), deadline, len(codes) * (cap + 12))
        frames = split_frames(reply["data"], cap)
        done = []
        for data in frames[: len(codes)]:
            parsed = _parse_child_result(data, self.config)  # None for the (empty) retire frame too
            if parsed is None:
                break
            done.append(parsed)
        ending = _ending(reply, self.config, self.ctx)
        if ending is None and len(done) == len(codes):
            return done
        if ending is None and done and frames[len(done) : len(done) + 1] == [RETIRE_PAYLOAD]:
            return done + self.run_codes(codes[len(done) :])
        culprit = min(len(done), len(codes) - 1)
        charged = ending or _res(Status.ERROR, "no result (malformed or missing)")
        return done[:culprit] + [charged] + [r for code in codes[culprit + 1 :] for r in self._run_group([code])]

    def fork_and_collect(self, child, deadline: float | None = None, cap: int | None = None) -> dict:
        """Forks `child(write_fd)`; collects its output until it exits, the deadline passes or the output
        cap is hit (then kills its process group). Returns data, why it stopped, exit status, CPU time."""
        if deadline is None:
            deadline = time.monotonic() + self.config.startup_timeout_s
        cap = cap or _frame_cap(self.config)
        read_fd, write_fd = os.pipe()
        roomy = grow_pipe(write_fd, cap)
        random = sys.modules.get("random")
        if random is not None:
            random.seed()  # here, not in the child: children must not share a random stream (os.fork would reseed)
        try:
            pid = kernel.fork(self._raw_fork)
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # pragma: no cover -- child
            os.close(read_fd)
            child(write_fd)
        _current_child[0] = pid
        os.close(write_fd)
        try:
            data, why = collect(pid, read_fd, deadline, cap, roomy)
        finally:
            os.close(read_fd)
        _, status, usage = os.wait4(pid, 0)
        _current_child[0] = None
        # a SIGKILL the worker did not send (its own: the wall clock, the output cap)
        killed = why not in ("timeout", "output") and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        namespace_died = self._namespace_init_died(wait_s=0.5 if killed else 0.0)
        reap_strays(self._children_fd, self.ns_init_pid)
        if namespace_died:  # the kernel killed every process of the namespace: not the program's doing
            raise WorkerBroken("the PID namespace's PID 1 died (killed from outside)")
        return {"data": data, "why": why, "status": status, "cpu": usage.ru_utime + usage.ru_stime}

    def _namespace_init_died(self, wait_s: float) -> bool:
        """True once the PID namespace's PID 1 has ended (then every child in it was SIGKILLed, which
        would otherwise read as a program out of memory, and no further fork can succeed there). A dying
        PID 1 finishes exiting only after its namespace's last process is reaped, so after a SIGKILLed
        child this waits up to `wait_s` for it."""
        if self.ns_init_pid is None:
            return False
        end = time.monotonic() + wait_s
        while True:
            try:
                if os.waitpid(self.ns_init_pid, os.WNOHANG)[0] != 0:
                    return True
            except ChildProcessError:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.005)

    def serve(self) -> None:
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline()
            if not line:
                return  # the trainer closed the pipe (or died): leave
            tasks = json.loads(line)["c"]
            try:
                results = self.run_chunk([source for _, source in tasks])
            except WorkerBroken as exc:
                _send({"broken": str(exc)})  # the pool replaces this worker and runs the chunk again
                return
            _send({"r": [dict(result, i=i) for (i, _), result in zip(tasks, results, strict=True)]})




class WorkerBroken(RuntimeError):
    """The worker failed a known-good program: it must be replaced, not trusted with more programs."""


# ----------------------------------------------------------------------------------------------- helpers


def _frame_cap(config: ExecutorConfig) -> int:
    return 12 * config.max_output_bytes + 65536  # one capped answer + output as UTF-8, plus slack


def _ending(reply: dict, config: ExecutorConfig, ctx: ChildContext) -> dict | None:
    """The result of the program a child was running when it ended abnormally; None if it exited normally."""
    why, status = reply["why"], reply["status"]
    if why == "timeout":
        return _res(Status.TIMEOUT, f"wall-clock limit of {config.timeout_s:g} s exceeded")
    if why == "output":
        return _res(Status.ERROR, "output limit exceeded")
    if os.WIFSIGNALED(status):
        cpu_rlimit = ctx.rlimits.get("rlimit_cpu", (0, config.cpu_limit_s, 0))[1]
        return _signalled(os.WTERMSIG(status), reply["cpu"] >= cpu_rlimit, config)
    code = os.WEXITSTATUS(status)
    if code == EXIT_MEMORY:
        return _res(Status.MEMORY, "MemoryError")
    if code != 0:
        why = {EXIT_INTERNAL: "the sandbox failed", EXIT_ORPHAN: "the worker died"}.get(code, f"exit code {code}")
        return _res(Status.ERROR, f"no result ({why})")
    return None


def _signalled(sig: int, cpu_spent: bool, config: ExecutorConfig) -> dict:
    name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
    if sig == signal.SIGALRM:  # a shared child's per-program wall-clock timer
        return _res(Status.TIMEOUT, f"wall-clock limit of {config.timeout_s:g} s exceeded")
    if sig in (signal.SIGXCPU, signal.SIGPROF) or (sig == signal.SIGKILL and cpu_spent):
        return _res(Status.TIMEOUT, f"CPU limit of {config.cpu_limit_s} s exceeded")
    if sig == signal.SIGKILL:
        return _res(Status.MEMORY, "killed by SIGKILL (out of memory)")
    if sig == getattr(signal, "SIGSYS", None):
        return _res(Status.FORBIDDEN, "blocked system call: the seccomp filter killed the program (a process, "
                    "signal, ptrace, IPC, socket, namespace or resource-limit call on another process)")
    return _res(Status.ERROR, f"crashed with {name}")


def _parse_child_result(data: bytes, config: ExecutorConfig) -> dict | None:
    """Validates what the child wrote; the child is untrusted, so anything malformed is no result."""
    msg = decode_result(data)  # five strings, or None
    status = _STATUSES.get(msg["s"]) if msg is not None else None  # not Status(...): enum machinery
    if status is None or (status is Status.OK) != (msg["v"] is not None):  # ok has a value, nothing else has
        return None
    value, detail, output = msg["v"], msg["d"], msg["o"]
    limit = config.max_output_bytes
    value = value[:limit] if value is not None else None
    return {"s": status.value, "v": value, "d": detail[:300], "o": output[:limit]}


def _res(status: Status, detail: str) -> dict:
    return {"s": status.value, "v": None, "d": detail, "o": ""}


_protocol_fd = [1]  # where results go; main() moves it off fd 1 so stray prints cannot corrupt it
_current_child: list[int | None] = [None]  # the child being waited for, killed on SIGTERM


def _send(message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    view = memoryview(data)
    while view:
        view = view[os.write(_protocol_fd[0], view):]


def _on_sigterm(_signum: int, _frame: object) -> None:
    """Stop now, taking the running program along (its parent-death signal does the same on Linux)."""
    if os.getpid() == _worker_pid[0] and _current_child[0] is not None:
        kill_group(_current_child[0])
    os._exit(0)


_worker_pid = [os.getpid()]


def _module_root(name: str) -> str | None:
    """The sys.path entry holding a module (None if it cannot be found)."""
    try:
        spec = importlib.util.find_spec(name.partition(".")[0])
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None and spec.has_location else None
    if origin is None:
        return None
    origin = os.path.realpath(origin)
    candidates = [os.path.realpath(p) for p in sys.path if p]
    matches = [p for p in candidates if origin.startswith(p.rstrip(os.sep) + os.sep)]
    return max(matches, key=len) if matches else None


def _address_space_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _nobody_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


_SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")


def _world_readable(path: str) -> bool:
    """Whether uid nobody can reach and list `path` through "other" permission bits."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(prefix).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when workers stop
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.simplefilter("ignore")  # library warnings in a child would only cost time
    _worker_pid[0] = os.getpid()
    _protocol_fd[0] = os.dup(1)
    os.dup2(2, 1)  # anything printed by imported code goes to stderr, not into the protocol
    setup = json.loads(sys.stdin.buffer.readline())
    config = ExecutorConfig(**setup["config"])
    zygote = Zygote(config, setup["preload"], setup["scratch"])
    _send({"ready": True, "pid": os.getpid(), "layers": zygote.layers})
    zygote.runner.serve()


if __name__ == "__main__":
    main()
