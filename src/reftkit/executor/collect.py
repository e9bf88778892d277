"""The worker's side of one child: waiting for it (a pidfd, or polling), reading its result pipe up to a cap,
killing its process group at the deadline, and reaping whatever it left behind. Used by worker.py only.
"""

from __future__ import annotations

import os
import select
import signal
import time

try:
    import fcntl
except ImportError:  # pragma: no cover -- not on this platform: pipes keep their default size
    fcntl = None


def collect(pid: int, fd: int, deadline: float, cap: int, roomy: bool) -> tuple[bytes, str | None]:
    """Waits for the child and reads its result pipe; kills it on timeout or past the output cap.
    Returns (data, None | "timeout" | "output"). The child is left unreaped (its pid stays ours)."""
    pidfd = _pidfd(pid)
    if pidfd is None or not roomy:
        data, why = _collect_while_running(pid, fd, deadline, cap, pidfd)
    else:
        # The pipe holds everything a well-behaved child writes, so one blocking poll on the pidfd is the
        # whole wait: every page the worker writes while the child lives costs a copy-on-write fault.
        try:
            exited = select.poll()
            exited.register(pidfd, select.POLLIN)
            why = None if exited.poll(max(1, int((deadline - time.monotonic()) * 1000))) else "timeout"
        finally:
            os.close(pidfd)
        if why is not None:
            kill_group(pid)  # before draining: a killed child cannot refill the pipe
        data = _drain(fd, cap + 1)
        return data, "output" if len(data) > cap else why
    if why is not None:
        kill_group(pid)
    return data, why


def _collect_while_running(pid: int, fd: int, deadline: float, cap: int, pidfd: int | None) -> tuple[bytes, str | None]:
    """The portable path: reads while the child runs (no pidfd, or a pipe that cannot hold the cap)."""
    chunks: list[bytes] = []
    size = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    try:
        open_pipe = True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), "timeout"
            timeout_ms = max(1, int(left * 1000)) if (open_pipe or pidfd is not None) else 5
            events = poller.poll(timeout_ms)
            exited = any(e_fd == pidfd for e_fd, _ in events) or (not open_pipe and pidfd is None and _exited(pid))
            if open_pipe and any(e_fd == fd for e_fd, _ in events):
                chunk = os.read(fd, 65536)
                if chunk:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > cap:
                        return b"".join(chunks), "output"
                else:
                    open_pipe = False
                    poller.unregister(fd)
            if exited:
                chunks.append(_drain(fd, cap + 1) if open_pipe else b"")
                return b"".join(chunks), None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def grow_pipe(fd: int, size: int) -> bool:
    """Whether the pipe could be made to hold `size` bytes (Linux F_SETPIPE_SZ)."""
    if fcntl is None:
        return False
    try:
        return fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size) >= size
    except OSError:
        return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _exited(pid: int) -> bool:
    """Without pidfds: whether the child is a zombie now (peek without reaping)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except (AttributeError, ChildProcessError):
        return True


def _drain(fd: int, limit: int) -> bytes:
    """What is in the pipe now, up to `limit` bytes, without blocking."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size < limit and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):  # the group (after the child's setsid), and the child itself before it
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def reap_strays(children_fd: int | None, keep: int | None) -> None:
    """Kills and reaps any process the child left behind: the worker is their subreaper, so orphans land
    here. Only reachable if fork was possible despite RLIMIT_NPROC, seccomp and the audit hook."""
    try:
        strays = [int(p) for p in os.pread(children_fd, 65536, 0).split()] if children_fd is not None else []
    except OSError:
        strays = []
    for pid in strays:
        if pid != keep:  # the PID namespace's PID 1 is the worker's child too, and must live
            kill_group(pid)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def children_list() -> int | None:
    """A descriptor on the worker's list of children, re-read from offset 0 after each child (cheaper than
    opening it each time); None where there is no such file."""
    try:
        return os.open(f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
