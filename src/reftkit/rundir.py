"""Facts about a run directory, without policy (reftkit.checkpoints decides what to refuse): who
holds it, which input paths overlap what a run writes, and fingerprints of the data it reads."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

LOCK_FILE = ".reftkit.lock"  # flock-ed by the live run; the kernel drops the lock when its process dies
# Options that name something a command reads: none may lie where the run writes or removes.
INPUT_FIELDS = ("model", "ref_model", "train_file", "eval_file", "samples_file", "reranker")
DATA_FIELDS = ("train_file", "samples_file")  # what is trained on: a resumed run must read the same bytes


# ----------------------------------------------------------------------------- the lock

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

def input_overlaps(cfg, out: Path, written: Callable[[str], bool]) -> list[str]:
    """'field path: why' for each input of `cfg` (INPUT_FIELDS it has, existing local paths) that
    is `out`, contains it, or lies in an entry of `out` whose name `written(name)` says the run
    writes or removes. Both the path as given and its resolved target are compared (a symlink)."""
    problems = []
    for field in INPUT_FIELDS:
        value = getattr(cfg, field, None)
        if value is None or (field == "model" and value == "tiny") or not Path(value).exists():
            continue
        for given, target in ((Path(os.path.abspath(value)), Path(os.path.abspath(out))),
                              (Path(value).resolve(), out.resolve())):
            why = _overlap(given, target, written)
            if why:
                problems.append(f"{field} {value} {why}")
                break
    return problems


def _overlap(path: Path, out: Path, written: Callable[[str], bool]) -> str | None:
    if path == out:
        return "is the output_dir itself"
    if out.is_relative_to(path):
        return "contains the output_dir"
    if path.is_relative_to(out):
        entry = path.relative_to(out).parts[0]
        if written(entry):
            return f"lies in {out / entry}, which this run writes or removes"
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
