"""A run directory's guards that need no model: one live run per directory (an flock held for the
run's life), inputs that must not lie where a run writes, fingerprints of the data it trains on. What a
training run may find there is reftkit.training.checkpoints'."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

from accelerate.utils import broadcast_object_list

from reftkit.training.errors import RunError

log = logging.getLogger("reftkit")

LOCK_FILE = ".reftkit.lock"  # flock-ed by the live run; the kernel drops the lock when its process dies
# Options that name something a command reads: none may lie where the run writes or removes.
INPUT_FIELDS = ("model", "ref_model", "train_file", "eval_file", "samples_file", "reranker")
DATA_FIELDS = ("train_file", "samples_file")  # what is trained on: a resumed run must read the same bytes


def check_writable(directory: Path) -> None:
    """Fails at once, before any work, when results could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".reftkit-write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output_dir {directory} is not writable: {e.strerror or e}") from None


def on_main_process(is_main: bool, check) -> None:
    """Runs `check` on the main process only; a RunError it raises is raised on every process (the
    message broadcast), so no process is left waiting for one that stopped."""
    problem = [None]
    if is_main:
        try:
            check()
        except RunError as e:
            problem = [str(e)]
    broadcast_object_list(problem)
    if problem[0] is not None:
        raise RunError(problem[0])


# ----------------------------------------------------------------------------- one live run per directory

_HELD: dict[Path, list] = {}  # directories this process holds: resolved path -> [lock descriptor, depth, created]


@contextmanager
def holding_output_dir(directory: Path | str, cfg=None):
    """Holds `directory` while the block runs: another run of it, fresh or resumed, is refused at
    once, naming the holder. The directory is created if needed, after refusing an input of `cfg`
    that is it or contains it. Only the main process holds the lock (the other processes of an
    `accelerate launch` run are the same run). A command run inside another on the same directory
    (Offline-ST's SFT) shares the hold; any exit releases it, and a killed process's lock is
    released by the kernel, so none is ever stale."""
    from reftkit.training.device import process_state  # lazy: runtime imports checkpoints, which imports this module

    out, held = Path(directory), []
    is_main = process_state().is_main_process
    on_main_process(is_main, lambda: held.append(_acquire(out, cfg)))
    try:
        yield
    finally:
        if held:
            _release(held[0])


def owns_output_dir(command):
    """Decorates a command `command(cfg, ...)`: it runs holding cfg.output_dir (`holding_output_dir`)."""
    @functools.wraps(command)
    def run(cfg, *args, **kwargs):
        with holding_output_dir(cfg.output_dir, cfg):
            return command(cfg, *args, **kwargs)
    return run


def _acquire(out: Path, cfg) -> Path:
    if cfg is not None:
        check_inputs(cfg, out, lambda name: False)
    created = not out.exists()
    check_writable(out)
    key = out.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    for _ in range(10):  # a refused run that had created the directory may remove it meanwhile
        try:
            got = try_lock(key)
            break
        except FileNotFoundError:
            check_writable(out)
        except OSError as e:  # a filesystem without flock (some network mounts)
            log.warning("cannot lock %s (%s): a second run in this directory would not be stopped", out,
                        e.strerror or e)
            got = None
            break
    else:
        raise RunError(f"output_dir {out}: its lock file could not be created (the directory keeps disappearing)")
    if isinstance(got, str):
        raise RunError(f"output_dir {out} is in use by a live run ({got}): wait for it to end, or choose another "
                       "--output_dir")
    _HELD[key] = [got, 1, created]
    return key


def _release(key: Path) -> None:
    """Drops the hold; the directory too when this hold created it and the run left it empty (a
    run refused before its claim leaves no trace)."""
    fd, depth, created = _HELD[key]
    if depth > 1:
        _HELD[key][1] -= 1
        return
    del _HELD[key]
    if fd is not None:
        release_lock(key, fd)
    if created:
        try:
            key.rmdir()
        except OSError:  # not empty: the run's files
            pass


def try_lock(directory: Path) -> int | str:
    """Takes `directory`'s exclusive lock: the open descriptor that holds it, or, when a live
    process holds it, that process's description. flock, not a pid file: a lock left by a killed
    process is released by the kernel, so no stale lock can block. The file is unlinked on
    release, so the inode is checked after locking (a lock on an unlinked file holds nothing)."""
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            return _describe(holder)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and unlinked it between our open and flock: again
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def release_lock(directory: Path, fd: int) -> None:
    """Unlinks the lock file, then drops the lock (in this order: nobody can lock the old inode
    and believe it holds the directory)."""
    try:
        (directory / LOCK_FILE).unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, started {started}: {' '.join(holder['argv'])}"
    except (ValueError, KeyError, TypeError):  # still being written
        return "another process"


# ----------------------------------------------------------------------------- inputs

def check_inputs(cfg, out: Path, written) -> None:
    """Refuses, before anything is written or removed, an input of `cfg` (model, data, reranker)
    that is output_dir, contains it, or lies in what the run writes (`written(name)`): a run never
    deletes or overwrites what it reads."""
    problems = input_overlaps(cfg, out, written)
    if problems:
        raise RunError(f"output_dir {out} overlaps an input of this run: {'; '.join(problems)}. Nothing was "
                       "removed: choose another --output_dir, or move the input out of it")


def input_overlaps(cfg, out: Path, written: Callable[[str], bool]) -> list[str]:
    """'FIELD PATH why' for each input of `cfg` (INPUT_FIELDS it has, existing local paths) that
    is `out`, contains it, or lies in an entry of `out` whose name `written(name)` says the run
    writes or removes. Both the path as given and its resolved target are compared (a symlink)."""
    problems = []
    for field in INPUT_FIELDS:
        value = getattr(cfg, field, None)  # reproduce's `reranker` is a stage section, not a path
        if not isinstance(value, str | Path) or (field == "model" and value == "tiny") or not Path(value).exists():
            continue
        for given, target in ((Path(os.path.abspath(value)), Path(os.path.abspath(out))),
                              (Path(value).resolve(), out.resolve())):
            why = _overlap(given, target, written, out)
            if why:
                problems.append(f"{field} {value} {why}")
                break
    return problems


def _overlap(path: Path, out: Path, written: Callable[[str], bool], shown: Path) -> str | None:
    if path == out:
        return "is the output_dir itself"
    if out.is_relative_to(path):
        return "contains the output_dir"
    if path.is_relative_to(out):
        entry = path.relative_to(out).parts[0]
        if written(entry):
            return f"lies in {shown / entry}, which this run writes or removes"
    return None


# ----------------------------------------------------------------------------- data fingerprints

def data_fingerprints(cfg) -> dict[str, str]:
    """sha256 of each local data file a run trains on (DATA_FIELDS it has), by option name. A
    source that is not a local path (a Hub dataset) has none."""
    return {field: digest for field in DATA_FIELDS
            if (digest := fingerprint(getattr(cfg, field, None))) is not None}


def fingerprint(source: str | None) -> str | None:
    """sha256 of a file's bytes, or of a directory's files (relative name and bytes of each, in
    name order, recursively); None when `source` is not a local path."""
    if source is None or not Path(source).exists():
        return None
    root = Path(source)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        if path is not root:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def data_changes(saved: Mapping[str, str] | None, now: Mapping[str, str], cfg) -> list[str]:
    """'FIELD contents changed since the run started: PATH' for each data file whose fingerprint
    differs from the one a checkpoint recorded; one only side has (an older checkpoint, a file
    now missing: the reader names it) cannot be compared."""
    saved = saved or {}
    return [f"{field} contents changed since the run started: {getattr(cfg, field)} "
            f"(sha256 {saved[field][:12]}... then, {now[field][:12]}... now)"
            for field in DATA_FIELDS if field in saved and field in now and saved[field] != now[field]]
