"""Sandboxed execution of untrusted P-CoT programs (`def solution(): ... return result`).

    from reftkit.executor import ProgramExecutor, ExecutorConfig, ExecResult, Status

    with ProgramExecutor(ExecutorConfig(workers=2, timeout_s=2.0)) as ex:
        results = ex.run(sources)  # one ExecResult per source, same order

Programs never run in the caller's process: see docs/executor.md for the threat model, the isolation
layers and what each platform guarantees. Modules: config (types), pool (caller side), worker (the
pre-forked interpreter), sandbox (the per-program child), policy (in-interpreter checks), kernel (Linux
primitives through ctypes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reftkit.executor.config import (
    DEFAULT_ALLOWED_IMPORTS,
    NEVER_ALLOWED,
    ExecResult,
    ExecutorConfig,
    Status,
)

if TYPE_CHECKING:
    from reftkit.executor.pool import ExecutorError, ProgramExecutor

__all__ = [
    "DEFAULT_ALLOWED_IMPORTS",
    "NEVER_ALLOWED",
    "ExecResult",
    "ExecutorConfig",
    "ExecutorError",
    "ProgramExecutor",
    "Status",
]


def __getattr__(name: str) -> object:
    # The caller-side classes load lazily, so that the worker processes (which import this package) do not
    # carry subprocess, threading and selectors around in every child's memory.
    if name in ("ProgramExecutor", "ExecutorError"):
        from reftkit.executor import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
