"""A run's directory and checkpoints: claim it, save, resume, prune, and the guards that keep a run
from silently continuing another run, saving a broken model or deleting what it did not write.

Rules (README, "Run directories"):
- a fresh run starts only in an empty or new output_dir; `overwrite_output_dir` first removes a
  previous run's files (only the names reftkit writes), `resume` continues the run that is there;
- each run has an id in `reftkit_run.json`; its checkpoints carry it, and pruning and resuming
  touch only checkpoints of that id;
- a resumed run must have the settings its checkpoint was made with, except those in RESUMABLE;
- a checkpoint records its files' sizes: a damaged one is named and the previous one is used;
- a checkpoint is written to a temporary directory and renamed, never with non-finite weights.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from reftkit.config import TrainerOptions
from reftkit.lora import plain_model_and_state
from reftkit.prompts import reset_truncation_counts, truncation_counts
from reftkit.writers import write_json

log = logging.getLogger("reftkit")

STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate_state"  # optimizer, scheduler, per-process RNG, model (for --resume)
RUN_FILE = "reftkit_run.json"  # the run that owns this directory: id, command, config
_STEP_DIR = re.compile(r"checkpoint-(\d+)")
# What a run writes into its directory: the only names `overwrite_output_dir` removes.
_RUN_OUTPUTS = ("checkpoint-*", ".checkpoint-*.tmp", "final", ".final.tmp", "metrics.jsonl", "predictions*.jsonl",
                RUN_FILE)
# Settings a resumed run may change: how it is watched and evaluated, not what it trains.
RESUMABLE = frozenset({"resume", "overwrite_output_dir", "output_dir", "progress", "log_with", "eval_file",
                       "eval_batch_size", "max_eval_examples", "eval_every", "eval_every_epoch", "save_every",
                       "exec_workers", "nonfinite"})


class RunError(ValueError):
    """A run cannot start, continue or save as asked; the message says why and what to do."""


class NonFiniteError(RunError):
    """A non-finite loss, gradient or weight; the run stopped and saved nothing non-finite."""


@dataclass
class Progress:
    """Where a run is: enough to continue it exactly (with the accelerate state beside it)."""

    step: int = 0  # optimiser steps (SFT) or rollout batches (ReFT) done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed


@dataclass(frozen=True)
class Run:
    """The run that owns output_dir, and where it starts (Progress() when fresh)."""

    id: str
    progress: Progress
    resumed_at: int | None  # the checkpoint's step when resumed


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def step_checkpoints(output_dir: Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoint-N directories, oldest first; with run_id, only that run's (a checkpoint
    from before run ids existed counts as the directory's own run)."""
    done = [p for p in output_dir.glob("checkpoint-*") if step_of(p) is not None and (p / STATE_FILE).exists()]
    if run_id is not None:
        done = [p for p in done if _state(p).get("run_id", run_id) == run_id]
    return sorted(done, key=step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    done = step_checkpoints(output_dir)
    return done[-1] if done else None


# ----------------------------------------------------------------------------- claiming a directory

def check_writable(directory: Path) -> None:
    """Fails at once, before any work, when results could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".reftkit-write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"output_dir {directory} is not writable: {e.strerror or e}") from None


def _previous_outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".reftkit-write-test"))


def check_output_dir(cfg: TrainerOptions) -> None:
    """Raises at once, before any work, when cfg.output_dir cannot take this run: not writable,
    another run's files without resume or overwrite_output_dir, or resume with nothing to resume."""
    out = Path(cfg.output_dir)
    check_writable(out)
    if cfg.resume:
        if not step_checkpoints(out, _run_id(out)):
            raise RunError(f"--resume: no complete checkpoint-* directory in {out}")
        return
    found = _previous_outputs(out)
    if found and not cfg.overwrite_output_dir:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunError(f"output_dir {out} is not empty ({shown}): continue the run there with --resume, "
                       f"replace it with --overwrite_output_dir, or choose another --output_dir")


def claim_output_dir(accelerator: Accelerator, cfg: TrainerOptions, command: str) -> Run:
    """Checks cfg.output_dir (`check_output_dir`) and claims it for a fresh run of `command`, or
    names the run to resume (`resume_from` then loads its checkpoint). Only the main process writes."""
    out = Path(cfg.output_dir)
    reset_truncation_counts()  # this run's summary counts its own cuts (a pipeline runs several in one process)

    def claim() -> None:
        check_output_dir(cfg)
        if not cfg.resume:
            removed = _remove_run_outputs(out)
            if removed:
                log.warning("overwrite_output_dir: removed %s from %s", ", ".join(removed), out)
            write_json(out / RUN_FILE, {"run_id": uuid.uuid4().hex, "command": command, "started": time.time(),
                                        "config": cfg.model_dump(mode="json")})

    on_main_process(accelerator.is_main_process, claim)
    return Run(_run_id(out) or "", Progress(), None)


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


def _run_id(out: Path) -> str | None:
    """The id of the run in `out`; None for a directory written before runs had ids."""
    run_file = out / RUN_FILE
    return json.loads(run_file.read_text())["run_id"] if run_file.exists() else None


def _remove_run_outputs(out: Path) -> list[str]:
    removed = []
    for pattern in _RUN_OUTPUTS:
        for path in sorted(out.glob(pattern)):
            if pattern == "checkpoint-*" and step_of(path) is None:
                continue  # checkpoint-best/ and the like are not a run's: left alone
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a checkpoint's config and the resumed run's, each
    as 'key: old -> new'. `epochs` may change only with a constant rate (a linear schedule's length
    would change under the optimizer's feet). An option only one side has (a checkpoint of an
    older reftkit) cannot be compared: it is accepted, and listed."""
    refused, accepted = [], []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, "(absent)"), now.get(key, "(absent)")
        if old == new:
            continue
        line = f"{key}: {old!r} -> {new!r}"
        ok = key in RESUMABLE or key not in saved or key not in now or (
            key == "epochs" and now.get("lr_schedule") == "constant" and not now.get("warmup_ratio"))
        (accepted if ok else refused).append(line)
    return refused, accepted


def resume_from(accelerator: Accelerator, cfg: TrainerOptions, run: Run) -> Run:
    """Loads the newest intact checkpoint of `run` (falling back past damaged ones, each named);
    refuses when the settings differ from the checkpoint's in a way that changes the run."""
    candidates = step_checkpoints(Path(cfg.output_dir), run.id or None)
    now = cfg.model_dump(mode="json")
    for ckpt in reversed(candidates):
        state = _state(ckpt)
        refused, accepted = config_changes(state.get("config", now), now)
        if refused:
            raise RunError(f"--resume: {ckpt} was made with other settings; these cannot change in a resumed run "
                           f"(start a new run in another output_dir instead): " + "; ".join(refused))
        damage = _damage(ckpt, state)
        if damage is None:
            try:
                accelerator.load_state(str(ckpt / ACCELERATE_DIR))
            except Exception as e:  # a file whose size is right but whose contents are not
                damage = f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if damage is not None:
            log.warning("--resume: %s is damaged: %s; trying the one before", ckpt, damage)
            continue
        if accepted:
            log.warning("--resume: continuing %s with changed settings: %s", ckpt, "; ".join(accepted))
        progress = Progress(**state["progress"])
        log.info("resumed from %s at step %d", ckpt, progress.step)
        return Run(run.id, progress, progress.step)
    raise RunError(f"--resume: every checkpoint in {cfg.output_dir} is damaged (see the warnings above)")


def _manifest(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def _damage(ckpt: Path, state: dict) -> str | None:
    """What is wrong with a checkpoint's files compared with the sizes it recorded, or None."""
    for name, size in state.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


# ----------------------------------------------------------------------------- saving

def weights_finite(model) -> bool:
    """True when every parameter is finite (one device sync, whatever the number of tensors)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def save_hf_model(accelerator: Accelerator, model, lm_of, tokenizer, directory: Path) -> None:
    """Writes a plain HF directory: `from_pretrained(directory)` loads the policy without reftkit."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers shards under FSDP / ZeRO-3
    lm = lm_of(unwrapped)
    prefix = "lm." if lm is not unwrapped else ""
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else None
    lm, lm_state = plain_model_and_state(lm, lm_state)  # LoRA: merged weights, no peft needed to load
    lm.save_pretrained(directory, state_dict=lm_state, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(directory)
        if hasattr(unwrapped, "save_value_head"):
            unwrapped.save_value_head(directory)


def save_checkpoint(
    accelerator: Accelerator, model, lm_of, tokenizer, output_dir: Path, name: str, progress: Progress | None,
    config: dict, run_id: str | None = None,
) -> Path:
    """Writes output_dir/name atomically: into a temporary directory, renamed when complete.

    With `progress`, the accelerate state (optimizer, scheduler, RNG of every process) is kept
    for --resume; without it (the final model) only the HF directory is written. Non-finite
    weights are never saved; a failed write (a full disk) removes its temporary directory and
    leaves the previous checkpoint as it was."""
    if not weights_finite(model):
        step = f" at step {progress.step}" if progress else ""
        raise NonFiniteError(f"non-finite weights{step}: {name} not saved; the last checkpoint is intact")
    final = output_dir / name
    tmp = output_dir / f".{name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        save_hf_model(accelerator, model, lm_of, tokenizer, tmp)
        if progress is not None:
            accelerator.save_state(str(tmp / ACCELERATE_DIR))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"progress": progress.__dict__ if progress else None, "config": config, "time": time.time(),
                     "run_id": run_id, "files": _manifest(tmp)}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise RunError(f"could not write {final}: {why}; nothing partial was kept and the previous checkpoint "
                       f"is intact (free space, then rerun with --resume)") from None
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(accelerator: Accelerator, output_dir: Path, run_id: str, keep: int = 2) -> None:
    """Keeps this run's newest `keep` checkpoints; never touches another run's."""
    if accelerator.is_main_process:
        for old in step_checkpoints(output_dir, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_step_checkpoint(accelerator: Accelerator, model, lm_of, tokenizer, cfg: TrainerOptions, run: Run,
                         progress: Progress) -> None:
    """checkpoint-{step} with everything --resume needs; this run's older ones beyond the last two go."""
    save_checkpoint(accelerator, model, lm_of, tokenizer, cfg.output_dir, f"checkpoint-{progress.step}", progress,
                    cfg.model_dump(mode="json"), run.id)
    prune_checkpoints(accelerator, cfg.output_dir, run.id)


def save_final(accelerator: Accelerator, model, lm_of, tokenizer, cfg: TrainerOptions, run: Run) -> Path:
    """final/, then the run's summary in reftkit_run.json: when it finished and how many prompts and
    SFT targets were cut at the length limits (main process's counts)."""
    final = save_checkpoint(accelerator, model, lm_of, tokenizer, cfg.output_dir, "final", None,
                            cfg.model_dump(mode="json"), run.id)
    run_file = Path(cfg.output_dir) / RUN_FILE
    if accelerator.is_main_process and run_file.exists():
        summary = {"finished": time.time(), **truncation_counts()}
        write_json(run_file, {**json.loads(run_file.read_text()), "summary": summary})
        log.info("run summary: %s", summary)
    return final
