"""A run's directory and checkpoints: claim it, save, resume, prune, and the guards that keep a run
from silently continuing another run, saving a broken model or deleting what it did not write.

Rules (README, "Run directories"):
- one directory, one live run: a command holds output_dir's lock for its whole life (`owns_output_dir`);
- a fresh run starts only in an empty or new output_dir, or one holding only a start of the same
  command that wrote no checkpoint; `overwrite_output_dir` first removes a previous run's files
  (only the names reftkit writes), `resume` continues the run that is there;
- no input of a run (model, data, reranker) may lie where it writes or removes: refused first;
- each run has an id in `reftkit_run.json`; its checkpoints carry it, and pruning and resuming
  touch only checkpoints of that id;
- a resumed run must have the settings its checkpoint was made with, except those in RESUMABLE,
  and the same data files (sha256 of their bytes);
- a checkpoint records its files' sizes: a damaged one is named and the previous one is used;
- a checkpoint is written to a temporary directory and renamed, never with non-finite weights.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from reftkit.config import TrainerOptions
from reftkit.data.prompts import Truncations
from reftkit.modeling.lora import plain_model_and_state
from reftkit.modeling.model import PolicyWithValueHead, language_model
from reftkit.training.errors import NonFiniteError, RunError
from reftkit.training.publish import write_model_card
from reftkit.training.rundir import (
    LOCK_FILE,
    check_inputs,
    check_writable,
    data_changes,
    data_fingerprints,
    on_main_process,
)
from reftkit.writers import write_json

log = logging.getLogger("reftkit")

STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate_state"  # optimizer, scheduler, per-process RNG, model (for --resume)
RUN_FILE = "reftkit_run.json"  # the run that owns this directory: id, command, config, data fingerprints
_STEP_DIR = re.compile(r"checkpoint-(\d+)")
# What a run writes into its directory: the only names `overwrite_output_dir` removes (checkpoint-N:
# `step_of`; a checkpoint-best/ is not a run's).
_RUN_OUTPUTS = (".checkpoint-*.tmp", "final", ".final.tmp", "metrics.jsonl", "samples.jsonl", "predictions*.jsonl",
               RUN_FILE)
# Settings a resumed run may change: how it is watched and evaluated, not what it trains.
RESUMABLE = frozenset({"resume", "overwrite_output_dir", "output_dir", "progress", "log_with", "eval_file",
                       "eval_batch_size", "max_eval_examples", "eval_every", "eval_every_epoch", "save_every",
                       "exec_workers", "nonfinite", "log_samples_every", "push_to_hub"})
NOT_SETTINGS = frozenset({"resume", "overwrite_output_dir"})  # how a run was started: never a change to report


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
    data: dict[str, str] = field(default_factory=dict)  # sha256 of the data files (rundir.data_fingerprints)
    seconds_before: float = 0.0  # training seconds of the parts before this one (0 unless resumed)
    started: float = field(default_factory=time.time)
    cuts: Truncations = field(default_factory=Truncations)  # rows this run cut at the length limits (its summary)

    def seconds(self) -> float:
        """Training seconds so far, over every part of a resumed run."""
        return self.seconds_before + time.time() - self.started


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

def previous_outputs(directory: Path) -> list[str]:
    """What `directory` holds, less the lock and write probes of the run that asks."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name != LOCK_FILE and not p.name.startswith(".reftkit-write-test"))


def is_run_output(name: str) -> bool:
    """Whether `name` in a run directory is one a training run writes (`overwrite_output_dir` removes it)."""
    if name.startswith("checkpoint-"):
        return _STEP_DIR.fullmatch(name) is not None
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _RUN_OUTPUTS)


def check_output_dir(cfg: TrainerOptions) -> None:
    """Raises at once, before any work, when cfg.output_dir cannot take this run: not writable,
    an input where the run writes, another run's files without resume or overwrite_output_dir,
    or resume with nothing to resume or with changed data."""
    out = Path(cfg.output_dir)
    check_writable(out)
    check_inputs(cfg, out, is_run_output)
    if cfg.resume:
        done = step_checkpoints(out, _run_id(out))
        if not done:
            raise RunError(_nothing_to_resume(out))
        recorded = next((s["data"] for s in map(_state, reversed(done)) if "data" in s), None)
        changed = data_changes(recorded, data_fingerprints(cfg), cfg)
        if changed:
            raise RunError(f"--resume: {'; '.join(changed)}. A resumed run trains on the data it started with: "
                           "restore it, or start a new run in another --output_dir")
        return
    found = previous_outputs(out)
    if found and not cfg.overwrite_output_dir and not _start_without_checkpoint(out, found, cfg):
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunError(f"output_dir {out} is not empty ({shown}): continue the run there with --resume, "
                       f"replace it with --overwrite_output_dir, or choose another --output_dir")


def check_results_dir(cfg, written: tuple[str, ...], *, training_runs: bool = True) -> None:
    """`eval` and `sample`: output_dir must be writable and must not hold an input where they
    write the files `written`; with training_runs=False, it must not hold a training run (eval's
    metrics.jsonl rows would be appended to the run's own)."""
    out = Path(cfg.output_dir)
    check_writable(out)
    check_inputs(cfg, out, lambda name: name.removeprefix(".").removesuffix(".tmp") in written)
    if not training_runs and ((out / RUN_FILE).exists() or (out / "final").exists() or step_checkpoints(out)):
        raise RunError(f"output_dir {out} holds a training run: eval would add its rows to that run's metrics.jsonl "
                       f"and its predictions beside the run's. "
                       f"Choose another --output_dir (for instance {out / 'eval'})")


def _nothing_to_resume(out: Path) -> str:
    run = _run_file(out)
    if run is None:
        return f"--resume: no complete checkpoint-* directory in {out}"
    return (f"--resume: no complete checkpoint in {out}: its `{run.get('command')}` run stopped before its first "
            "checkpoint, so there is nothing to resume. Run the same command without --resume: that start's "
            "files are replaced")


def _start_without_checkpoint(out: Path, found: list[str], cfg: TrainerOptions) -> bool:
    """Whether `found` is only what a start of the same command (a config with the same options,
    whatever their values: the retry may be the fix) left before its first checkpoint (a bad row, a
    kill -9): nothing there can be resumed, so the retry replaces it."""
    run = _run_file(out)
    return (run is not None and set(run.get("config", {})) == set(cfg.model_dump())
            and all(is_run_output(name) for name in found)
            and not any(name == "final" or step_of(Path(name)) is not None for name in found))


def claim_output_dir(accelerator: Accelerator, cfg: TrainerOptions, command: str) -> Run:
    """Checks cfg.output_dir (`check_output_dir`) and claims it for a fresh run of `command`, or
    names the run to resume (`resume_from` then loads its checkpoint). Only the main process writes;
    the caller holds the directory (`owns_output_dir`), so no other run checks or claims it meanwhile."""
    out = Path(cfg.output_dir)
    data = data_fingerprints(cfg)

    def claim() -> None:
        check_output_dir(cfg)
        if not cfg.resume:
            removed = _remove_run_outputs(out)
            if removed:
                why = "overwrite_output_dir" if cfg.overwrite_output_dir else "a start that wrote no checkpoint"
                log.warning("%s: removed %s from %s", why, ", ".join(removed), out)
            write_json(out / RUN_FILE, {"run_id": uuid.uuid4().hex, "command": command, "started": time.time(),
                                        "config": cfg.model_dump(mode="json"), "data": data})

    on_main_process(accelerator.is_main_process, claim)
    return Run(_run_id(out) or "", Progress(), None, data)


def _run_file(out: Path) -> dict | None:
    run_file = out / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.exists() else None


def _run_id(out: Path) -> str | None:
    """The id of the run in `out`; None for a directory written before runs had ids."""
    run = _run_file(out)
    return run["run_id"] if run else None


def _remove_run_outputs(out: Path) -> list[str]:
    removed = []
    for path in sorted(out.iterdir()):
        if is_run_output(path.name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    return removed


def config_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a checkpoint's config and the resumed run's, each
    as 'key: old -> new'. `epochs` may change only with a constant rate (a linear schedule's length
    would change under the optimizer's feet). An option only one side has (a checkpoint of an
    older reftkit) cannot be compared: it is accepted, and listed. How the run was started
    (NOT_SETTINGS: resume, overwrite_output_dir) is no change at all."""
    refused, accepted = [], []
    for key in sorted((set(saved) | set(now)) - NOT_SETTINGS):
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
    refuses when the settings differ from the checkpoint's in a way that changes the run (changed
    data is refused earlier, by `check_output_dir`)."""
    candidates = step_checkpoints(Path(cfg.output_dir), run.id or None)
    now = cfg.model_dump(mode="json")
    problems = []
    for ckpt in reversed(candidates):
        state = _state(ckpt)
        refused, accepted = config_changes(state.get("config", now), now)
        if refused:
            raise RunError(f"--resume: {ckpt} was made with other settings; these cannot change in a resumed run "
                           f"(start a new run in another output_dir instead): " + "; ".join(refused))
        damage = _damage(ckpt, state)
        problem = f"is damaged: {damage}" if damage else None
        if damage is None:
            try:
                accelerator.load_state(str(ckpt / ACCELERATE_DIR))
            except Exception as e:  # contents that do not fit this run's model, or corrupt at the right size
                problem = f"cannot be loaded into this run's model ({type(e).__name__}: {_first_line(e)})"
        if problem is not None:
            log.warning("--resume: %s %s; trying the one before", ckpt, problem)
            problems.append(f"{ckpt.name} {problem}")
            continue
        if accepted:
            log.warning("--resume: continuing %s with changed settings: %s", ckpt, "; ".join(accepted))
        progress = Progress(**state["progress"])
        log.info("resumed from %s at step %d", ckpt, progress.step)
        return replace(run, progress=progress, resumed_at=progress.step, seconds_before=state.get("seconds") or 0.0)
    hint = "" if all("is damaged" in p for p in problems) else (
        ". Files that are whole but do not load were written for another model: one the run builds differently "
        "now (--model tiny builds its vocabulary from the training data) or one replaced at the same path")
    raise RunError(f"--resume: no checkpoint in {cfg.output_dir} can be resumed: {'; '.join(problems)}{hint}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


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


def save_hf_model(accelerator: Accelerator, model, tokenizer, directory: Path) -> None:
    """Writes a plain HF directory: `from_pretrained(directory)` loads the policy without reftkit."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers shards under FSDP / ZeRO-3
    lm = language_model(unwrapped)  # a policy with a value head: its LM as the plain model, the head beside it
    prefix = "lm." if lm is not unwrapped else ""
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else None
    lm, lm_state = plain_model_and_state(lm, lm_state)  # LoRA: merged weights, no peft needed to load
    lm.save_pretrained(directory, state_dict=lm_state, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(directory)
        if isinstance(unwrapped, PolicyWithValueHead):
            unwrapped.save_value_head(directory)


def save_checkpoint(
    accelerator: Accelerator, model, tokenizer, output_dir: Path, name: str, progress: Progress | None,
    config: dict, run: Run | None = None,
) -> Path:
    """Writes output_dir/name atomically: into a temporary directory, renamed when complete.

    With `progress`, the accelerate state (optimizer, scheduler, RNG of every process) is kept
    for --resume; without it (the final model) only the HF directory is written. The state records
    `run`'s id, data fingerprints and training seconds so far (all its parts). Non-finite
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
        save_hf_model(accelerator, model, tokenizer, tmp)
        if progress is not None:
            accelerator.save_state(str(tmp / ACCELERATE_DIR))
        elif accelerator.is_main_process:  # the final model: its card
            command = (_run_file(output_dir) or {}).get("command", "")
            write_model_card(tmp, config, command, output_dir / "metrics.jsonl")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"progress": progress.__dict__ if progress else None, "config": config, "time": time.time(),
                     "run_id": run.id if run else None, "data": run.data if run else {},
                     "seconds": round(run.seconds(), 3) if run else None, "files": _manifest(tmp)}
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


def save_step_checkpoint(accelerator: Accelerator, model, tokenizer, cfg: TrainerOptions, run: Run,
                         progress: Progress) -> None:
    """checkpoint-{step} with everything --resume needs; this run's older ones beyond the last two go."""
    save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, f"checkpoint-{progress.step}", progress,
                    cfg.model_dump(mode="json"), run)
    prune_checkpoints(accelerator, cfg.output_dir, run.id)


def step_checkpoint_due(cfg: TrainerOptions, progress: Progress, batches_in_epoch: int) -> bool:
    """Whether save_every asks for a checkpoint after this step. Not after an epoch's last batch: the
    end-of-epoch checkpoint of the same step follows, and a step is written once."""
    return bool(cfg.save_every) and progress.step % cfg.save_every == 0 and progress.batch_in_epoch < batches_in_epoch


def save_final(accelerator: Accelerator, model, tokenizer, cfg: TrainerOptions, run: Run) -> Path:
    """final/, then the run's summary in reftkit_run.json: when it finished and how many prompts and
    SFT targets were cut at the length limits (main process's counts)."""
    final = save_checkpoint(accelerator, model, tokenizer, cfg.output_dir, "final", None,
                            cfg.model_dump(mode="json"), run)
    run_file = Path(cfg.output_dir) / RUN_FILE
    if accelerator.is_main_process and run_file.exists():
        summary = {"finished": time.time(), **run.cuts.summary()}
        write_json(run_file, {**json.loads(run_file.read_text()), "summary": summary})
        log.info("run summary: %s", summary)
    return final
