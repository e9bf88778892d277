"""metrics.jsonl, one strict-JSON row per record, and the trackers (TensorBoard, W&B) beside it."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate import Accelerator

from reftkit.config import RunOptions


class Metrics:
    """Appends one strict-JSON line per record to metrics.jsonl (a non-finite number is written as
    null); forwards to TensorBoard/W&B if configured. A resumed run first drops the rows logged
    after its checkpoint, so no step appears twice."""

    def __init__(self, accelerator: Accelerator, cfg: RunOptions, run_name: str, resumed_at: int | None = None,
                 file: str = "metrics.jsonl", track: bool = True):
        """`file`: the JSONL file under output_dir; `track`: also start and feed the configured trackers."""
        self.accelerator, self.track = accelerator, track
        self.path = Path(cfg.output_dir) / file
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _row_step(line) <= resumed_at]
                self.path.write_text("".join(line + "\n" for line in kept))
        if cfg.log_with and track:
            accelerator.init_trackers(run_name, config=json.loads(cfg.model_dump_json()))

    def log(self, record: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        row = {"step": step, "time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.track and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and a pipeline
        # (the demo: SFT then ReFT in one process) still needs it.
        for tracker in self.accelerator.trackers if self.track else ():
            tracker.finish()


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped with the rows after it
        return math.inf
