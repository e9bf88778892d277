"""Run directories: a run never deletes its own inputs, a resumed
run notices changed data, one directory holds one live run, a failed start does not block its
retry, and the smaller bookkeeping slips (a checkpoint written twice, eval rows in a training run's
metrics, reproduce's train time, resume warnings)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reftkit
from conftest import LENGTHS, reft_config, sft_config, weights
from reftkit.config import EvalConfig, OfflineSTConfig, RerankerConfig, SampleConfig
from reftkit.data.readers import DataError
from reftkit.trainers import sft as sft_module
from reftkit.trainers.offline_st import train_offline_st
from reftkit.trainers.reft import train_reft
from reftkit.trainers.reranker import train_reranker
from reftkit.trainers.sft import train_sft
from reftkit.training import checkpoints, metrics, rundir
from reftkit.training.checkpoints import RUN_FILE, STATE_FILE, config_changes, step_checkpoints
from reftkit.training.errors import RunError
from reftkit.training.rundir import LOCK_FILE, try_lock
from reftkit.writers import write_examples
from test_run_safety import strict_rows


def saved_names(monkeypatch):
    """The name of every checkpoint directory written, in order."""
    names, real = [], checkpoints.save_checkpoint

    def recording(accelerator, model, tokenizer, output_dir, name, *args, **kwargs):
        names.append(name)
        return real(accelerator, model, tokenizer, output_dir, name, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", recording)
    return names


class Interrupt(Exception):
    """Stands for a kill: nothing after it runs (no clean-up either)."""


def interrupt_at_log(monkeypatch, calls):
    real, count = metrics.Metrics.log, {"n": 0}

    def log(self, record, step):
        if count["n"] == calls:
            raise Interrupt
        count["n"] += 1
        return real(self, record, step)

    monkeypatch.setattr(metrics.Metrics, "log", log)


# ----------------------------------------------------------------------------- 1. inputs are never removed

def test_overwrite_refuses_a_model_inside_the_run_it_would_remove(tmp_path, splits, tiny_checkpoint):
    run = tmp_path / "D"
    final = train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(RunError, match=r"model .*final lies in .*final, which this run writes or removes.*"
                                       r"Nothing was removed"):
        train_reft(reft_config(run, final, overwrite_output_dir=True), splits[0][:8])
    assert sorted(p.name for p in run.iterdir()) == before and (final / "model.safetensors").exists()
    with pytest.raises(RunError, match="model .*checkpoint-3 lies in"):  # pruning would delete it later
        train_sft(sft_config(run, run / "checkpoint-3", epochs=1, overwrite_output_dir=True), splits[0])
    assert (run / "checkpoint-3" / STATE_FILE).exists()


@pytest.mark.parametrize("field", ["train_file", "eval_file"])
def test_a_data_path_that_is_or_holds_the_output_dir_is_refused(tmp_path, splits, tiny_checkpoint, field):
    data = tmp_path / "data"
    write_examples(data / "train.jsonl", splits[0])
    for out, why in ((data, "is the output_dir itself"), (data / "run", "contains the output_dir")):
        with pytest.raises(RunError, match=f"{field} {data} {why}"):
            train_sft(sft_config(out, tiny_checkpoint, epochs=1, overwrite_output_dir=True, **{field: str(data)}),
                      splits[0])
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]


def test_an_input_beside_the_runs_own_files_is_kept(tmp_path, splits, tiny_checkpoint):
    run = tmp_path / "D"
    train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    write_examples(run / "train.jsonl", splits[0])  # not a name a run writes: overwrite leaves it
    train_sft(sft_config(run, tiny_checkpoint, epochs=1, overwrite_output_dir=True,
                         train_file=str(run / "train.jsonl")))
    assert (run / "train.jsonl").exists()


def test_offline_st_refuses_its_samples_inside_what_it_removes(tmp_path, splits, tiny_checkpoint, monkeypatch):
    run = tmp_path / "D"
    train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    samples = run / "predictions-mine.jsonl"
    samples.write_text("")
    cfg = OfflineSTConfig(model=str(tiny_checkpoint), output_dir=run, samples_file=str(samples), epochs=1,
                          overwrite_output_dir=True, progress=False, **LENGTHS)
    with pytest.raises(RunError, match="samples_file .*predictions-mine.jsonl lies in"):
        train_offline_st(cfg, splits[0])
    assert samples.exists()


def test_eval_and_sample_refuse_an_input_they_would_overwrite(tmp_path, splits, tiny_checkpoint):
    from reftkit.commands.evaluate import run_eval
    from reftkit.commands.sample import run_sample

    out, model = tmp_path / "E", shutil.copytree(tiny_checkpoint, tmp_path / "model")
    write_examples(out / "predictions.jsonl", splits[1])  # an earlier eval's file, given as the test set
    with pytest.raises(RunError, match="eval_file .*predictions.jsonl lies in"):
        run_eval(EvalConfig(model=str(tiny_checkpoint), eval_file=str(out / "predictions.jsonl"), output_dir=out,
                            progress=False, **LENGTHS))
    with pytest.raises(RunError, match="model .* is the output_dir itself"):
        run_sample(SampleConfig(model=str(model), eval_file=str(out / "predictions.jsonl"), output_dir=model,
                                num_samples=1, progress=False, **LENGTHS))
    assert not (model / "samples.jsonl").exists()


# ----------------------------------------------------------------------------- 6. changed data on --resume

@pytest.mark.parametrize("model", ["checkpoint", "tiny"])
def test_resume_refuses_a_train_file_changed_at_the_same_path(tmp_path, splits, tiny_checkpoint, model):
    data = tmp_path / "train.jsonl"
    write_examples(data, splits[0])
    model = str(tiny_checkpoint) if model == "checkpoint" else "tiny"
    run = tmp_path / "run"
    train_sft(sft_config(run, model, epochs=1, train_file=str(data)))
    shutil.rmtree(run / "final")
    edited = [splits[0][0].__class__(e.id, e.question, e.cot + " Checked.", e.answer, e.options) for e in splits[0]]
    write_examples(data, edited)
    with pytest.raises(RunError, match=f"train_file contents changed since the run started: {data}") as e:
        train_sft(sft_config(run, model, epochs=1, train_file=str(data), resume=True))
    assert "damaged" not in str(e.value)
    write_examples(data, splits[0])  # the same bytes again: resumes
    train_sft(sft_config(run, model, epochs=1, train_file=str(data), resume=True))


def test_resume_says_a_checkpoint_that_does_not_fit_the_model_is_not_damaged(tmp_path, splits):
    # Examples given in code have no file to fingerprint: the tiny model built from other text has
    # another vocabulary, and its checkpoint's whole files cannot load into it.
    run = tmp_path / "run"
    train_sft(sft_config(run, "tiny", epochs=1), splits[0])
    other = [e.__class__(e.id, e.question + " Zebra quux.", e.cot, e.answer, e.options) for e in splits[0]]
    with pytest.raises(RunError, match="no checkpoint in .* can be resumed: checkpoint-3 cannot be loaded into this "
                                       "run's model .*tiny builds its vocabulary from the training data") as e:
        train_sft(sft_config(run, "tiny", epochs=1, resume=True), other)
    assert "damaged" not in str(e.value)


def test_resume_refuses_a_changed_samples_file(tmp_path, splits, tiny_checkpoint):
    samples = tmp_path / "samples.jsonl"
    rows = [{"id": e.id, "output": f"The answer is {e.answer}", "correct": i % 2 == 0}
            for i, e in enumerate(splits[0][:16])]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(**kw):
        return RerankerConfig(model=str(tiny_checkpoint), output_dir=tmp_path / "rr", samples_file=str(samples),
                              epochs=1, batch_size=8, progress=False, **LENGTHS, **kw)

    train_reranker(cfg(), splits[0])
    samples.write_text("".join(json.dumps({**r, "correct": not r["correct"]}) + "\n" for r in rows))
    with pytest.raises(RunError, match="samples_file contents changed since the run started"):
        train_reranker(cfg(resume=True), splits[0])


# ----------------------------------------------------------------------------- 7. one live run per directory

HOLD = """import sys, time
from reftkit.config import SFTConfig
from reftkit.data.synthetic import make_splits
from reftkit.trainers import sft

def held(model, batch):  # a live run, past its claim, in its first step
    print("held", flush=True)
    time.sleep(300)

sft.lm_loss = held
sft.train_sft(SFTConfig.model_validate_json(sys.argv[1]), make_splits(48, 16, seed=1)[0])
"""


@pytest.fixture
def live_run():
    """Starts `train_sft(cfg)` in another process and returns it once it is training (killed at the end)."""
    procs = []

    def start(cfg):
        src = str(Path(reftkit.__file__).parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-c", HOLD, cfg.model_dump_json()], stdout=subprocess.PIPE, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == b"held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_second_run_on_a_live_runs_directory_is_refused(tmp_path, splits, tiny_checkpoint, live_run, monkeypatch):
    run = tmp_path / "run"
    interrupt_at_log(monkeypatch, calls=4)
    with pytest.raises(Interrupt):
        train_sft(sft_config(run, tiny_checkpoint, save_every=1), splits[0])
    monkeypatch.undo()
    rows = strict_rows(run)
    proc = live_run(sft_config(run, tiny_checkpoint, save_every=1, resume=True))  # in step 5
    for kw in ({"resume": True}, {"overwrite_output_dir": True}):
        with pytest.raises(RunError, match=f"output_dir {run} is in use by a live run \\(pid {proc.pid} on "):
            train_sft(sft_config(run, tiny_checkpoint, save_every=1, **kw), splits[0])
    assert strict_rows(run) == rows and [p.name for p in step_checkpoints(run)] == ["checkpoint-3", "checkpoint-4"]
    proc.kill()  # kill -9: its lock file stays, but the kernel dropped the lock
    proc.wait()
    assert (run / LOCK_FILE).exists()
    train_sft(sft_config(run, tiny_checkpoint, save_every=1, resume=True), splits[0])
    assert [r["step"] for r in strict_rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_blocks_neither_lock_nor_retry(tmp_path, splits, tiny_checkpoint,
                                                                                 live_run):
    run = tmp_path / "run"
    cfg = sft_config(run, tiny_checkpoint, epochs=1)
    proc = live_run(cfg)
    with pytest.raises(RunError, match="in use by a live run"):
        train_sft(cfg, splits[0])
    proc.kill()
    proc.wait()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, RUN_FILE]  # the claim and a stale lock file
    train_sft(cfg, splits[0])  # the same command again
    assert [r["step"] for r in strict_rows(run) if "loss" in r] == [1, 2, 3]


def test_any_exit_releases_the_directory(tmp_path, splits, tiny_checkpoint, monkeypatch):
    run = tmp_path / "run"
    interrupt_at_log(monkeypatch, calls=1)
    with pytest.raises(Interrupt):
        train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    assert not (run / LOCK_FILE).exists() and not rundir._HELD
    fd = try_lock(run)  # another open file of this process could not take a lock still held
    assert isinstance(fd, int)
    os.close(fd)


# ----------------------------------------------------------------------------- 10. a failed start and its retry

def test_a_start_that_failed_on_a_bad_row_does_not_block_its_retry(tmp_path, splits, tiny_checkpoint, monkeypatch):
    data, run = tmp_path / "train.jsonl", tmp_path / "run"
    write_examples(data, splits[0])
    with data.open("a") as f:
        f.write(json.dumps({"item_id": "bad", "question": "How many?"}) + "\n")  # no CoT, no answer
    cfg = sft_config(run, tiny_checkpoint, epochs=1, train_file=str(data), data_format="reft")
    with pytest.raises(DataError):  # the pre-flight check finds the bad row before the directory is claimed
        train_sft(cfg)
    assert not run.exists() or not (run / RUN_FILE).exists()
    # A failure after the claim (here the same bad row, with the pre-flight check off) leaves the claim behind.
    import reftkit.trainers.sft

    monkeypatch.setattr(reftkit.trainers.sft, "preflight", lambda *a, **k: None)
    with pytest.raises(DataError):
        train_sft(cfg)
    assert (run / RUN_FILE).exists()
    with pytest.raises(RunError, match=(
        "no complete checkpoint .*stopped before its first checkpoint.*without --resume"
    )):
        train_sft(cfg.model_copy(update={"resume": True}))
    write_examples(data, splits[0])
    train_sft(cfg)  # the same command, after the fix
    assert [p.name for p in step_checkpoints(run)] == ["checkpoint-3"]


def test_a_start_killed_before_its_first_checkpoint_does_not_block_its_retry(tmp_path, splits, tiny_checkpoint,
                                                                            monkeypatch):
    run = tmp_path / "run"
    interrupt_at_log(monkeypatch, calls=2)  # steps 1 and 2 logged, no checkpoint yet
    with pytest.raises(Interrupt):
        train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    monkeypatch.undo()
    assert [r["step"] for r in strict_rows(run)] == [1, 2] and not step_checkpoints(run)
    # Another command (other options) is not the same run: refused as before.
    with pytest.raises(RunError, match="is not empty"):
        train_reft(reft_config(run, tiny_checkpoint), splits[0][:8])
    train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    assert [r["step"] for r in strict_rows(run) if "loss" in r] == [1, 2, 3]


def test_a_finished_or_checkpointed_run_is_still_refused(tmp_path, splits, tiny_checkpoint):
    run = tmp_path / "run"
    train_sft(sft_config(run, tiny_checkpoint, epochs=1, save_every=1), splits[0])
    shutil.rmtree(run / "final")
    with pytest.raises(RunError, match="is not empty .*--resume"):
        train_sft(sft_config(run, tiny_checkpoint, epochs=1, save_every=1), splits[0])


# ----------------------------------------------------------------------------- 17. smaller

def test_a_step_at_an_epochs_end_is_checkpointed_once(tmp_path, splits, tiny_checkpoint, monkeypatch):
    names = saved_names(monkeypatch)
    train_sft(sft_config(tmp_path / "sft", tiny_checkpoint, epochs=2, save_every=3), splits[0])  # 3 steps an epoch
    assert names == ["checkpoint-3", "checkpoint-6", "final"]
    names.clear()
    train_reft(reft_config(tmp_path / "reft", tiny_checkpoint, epochs=1, save_every=1), splits[0][:16])  # 2 batches
    assert names == ["checkpoint-1", "checkpoint-2", "final"]


def test_eval_into_a_training_runs_directory_is_refused(tmp_path, splits, tiny_checkpoint):
    from reftkit.commands.evaluate import run_eval

    run = tmp_path / "run"
    final = train_sft(sft_config(run, tiny_checkpoint, epochs=1), splits[0])
    write_examples(tmp_path / "test.jsonl", splits[1])
    rows = (run / "metrics.jsonl").read_text()
    cfg = EvalConfig(model=str(final), eval_file=str(tmp_path / "test.jsonl"), output_dir=run, progress=False,
                     max_eval_examples=2, **LENGTHS)
    with pytest.raises(RunError, match="holds a training run: eval would add its rows to that run's metrics.jsonl"):
        run_eval(cfg)
    assert (run / "metrics.jsonl").read_text() == rows and not (run / "predictions.jsonl").exists()
    run_eval(cfg.model_copy(update={"output_dir": run / "eval"}))


@pytest.mark.slow
def test_reproduce_counts_the_train_time_of_every_part(tmp_path, splits, tiny_checkpoint, monkeypatch):
    from reftkit.commands.reproduce import STAGE_FILE, resumable_training

    real = sft_module.lm_loss

    def slow_loss(model, batch):
        time.sleep(1.5)
        return real(model, batch)

    monkeypatch.setattr(sft_module, "lm_loss", slow_loss)
    interrupt_at_log(monkeypatch, calls=4)  # 4 slow steps, checkpoint-4, then killed
    cfg = sft_config(tmp_path / "warmup", tiny_checkpoint, epochs=2, save_every=1)
    with pytest.raises(Interrupt):
        resumable_training("warmup", cfg, lambda c: train_sft(c, splits[0]))
    monkeypatch.undo()  # the last 2 steps are fast
    resumable_training("warmup", cfg.model_copy(), lambda c: train_sft(c, splits[0]))
    seconds = json.loads((cfg.output_dir / STAGE_FILE).read_text())["seconds"]
    assert seconds >= 6.0  # the interrupted part's 4 steps count too


def test_a_resume_reports_no_change_for_how_it_was_started(tmp_path, splits, tiny_checkpoint, caplog):
    saved = {"lr": 1e-3, "resume": False, "overwrite_output_dir": True}
    assert config_changes(saved, {**saved, "resume": True, "overwrite_output_dir": False}) == ([], [])
    run = tmp_path / "run"
    train_sft(sft_config(run, tiny_checkpoint, epochs=2, overwrite_output_dir=True), splits[0])
    shutil.rmtree(run / "final")
    with caplog.at_level("WARNING", logger="reftkit"):
        resumed = train_sft(sft_config(run, tiny_checkpoint, epochs=2, resume=True), splits[0])
    assert "changed settings" not in caplog.text and weights(resumed)
