"""Inputs are checked before the expensive work (reftkit.training.preflight): missing files and models, Hub names
while the Hub cannot be reached, tokenizer files, position limits and sandbox limits; Ctrl-C is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MptConfig,
    OPTConfig,
)

import reftkit
from reftkit.commands import cli
from reftkit.config import ReproduceConfig, SampleConfig
from reftkit.data.prompts import prompt_text, response_text
from reftkit.modeling.model import load_causal_lm, load_pretrained, load_tokenizer
from reftkit.modeling.tiny import build_model, build_tokenizer
from reftkit.training.preflight import check_model, position_limit
from reftkit.writers import write_examples

LENGTHS = ["--max_prompt_tokens", "64", "--max_length", "112"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test in which anything loads model weights (the expensive work a pre-flight precedes)."""
    def refuse(*args, **kwargs):
        pytest.fail(f"a model was loaded: from_pretrained{args}")

    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


@pytest.fixture
def data(tmp_path, splits):
    train, test = splits
    write_examples(tmp_path / "train.jsonl", train)
    write_examples(tmp_path / "test.jsonl", test)
    return tmp_path


def one_error_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def nothing_claimed(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------- item 2: every input, every command

@pytest.mark.parametrize("command, extra, error", [
    ("sft", ["--eval_file", "missing.jsonl"], "data 'missing.jsonl': no such file or directory"),
    ("online-st", ["--eval_file", "missing.jsonl"], "data 'missing.jsonl': no such file or directory"),
    ("reft", ["--ref_model", "./nope"], "ref_model: model './nope': no such file or directory"),
    ("reft", ["--train_file", "missing.jsonl"], "data 'missing.jsonl': no such file or directory"),
    ("offline-st", ["--samples_file", "nope.jsonl"], "samples_file 'nope.jsonl': no such file or directory"),
    ("train-reranker", ["--samples_file", "nope.jsonl"], "samples_file 'nope.jsonl': no such file or directory"),
    ("eval", ["--few_shot", "1", "--train_file", "missing.jsonl"], "data 'missing.jsonl': no such file or directory"),
    ("sample", ["--reranker", "./rm"], "reranker: model './rm': no such file or directory"),
    ("reproduce", ["--eval_file", "missing.jsonl"], "data 'missing.jsonl': no such file or directory"),
])
def test_a_bad_input_is_refused_before_any_model_loads_or_the_output_dir_is_claimed(
        data, tiny_checkpoint, monkeypatch, capsys, no_model_loads, command, extra, error):
    monkeypatch.chdir(data)
    data_args = {"eval": ["--eval_file", "test.jsonl"], "sample": ["--eval_file", "test.jsonl"],
                 "reproduce": ["--train_file", "train.jsonl", "--eval_file", "test.jsonl"]}
    argv = [command, "--model", str(tiny_checkpoint), *data_args.get(command, ["--train_file", "train.jsonl"]),
            "--output_dir", "out", "--no-progress", "--quiet", *LENGTHS, *extra]
    assert cli.main(argv) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"reftkit {command}: error: ") and error in line, line
    assert nothing_claimed(data / "out")


def test_a_missing_reranker_is_found_before_sampling(data, tiny_checkpoint, monkeypatch, capsys):
    import reftkit.commands.sample

    drawn = []
    monkeypatch.setattr(reftkit.commands.sample, "draw_samples", lambda *args, **kwargs: drawn.append(1) or [])
    monkeypatch.chdir(data)
    argv = ["sample", "--model", str(tiny_checkpoint), "--eval_file", "test.jsonl", "--reranker", "runs/rm/final",
            "--output_dir", "out", "--quiet", *LENGTHS]
    assert cli.main(argv) == 1
    assert "reranker: model 'runs/rm/final': no such file or directory" in one_error_line(capsys)
    assert drawn == []


def reranker_dir(path: Path, checkpoint: Path) -> Path:
    """A reranker as `reftkit train-reranker` saves one (untrained here): a one-output sequence classifier."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(path)
    return path


def test_a_causal_lm_given_as_the_reranker_is_refused_before_sampling(data, tiny_checkpoint, monkeypatch, capsys,
                                                                      no_model_loads):
    monkeypatch.chdir(data)
    argv = ["sample", "--model", str(tiny_checkpoint), "--eval_file", "test.jsonl", "--reranker", str(tiny_checkpoint),
            "--output_dir", "out", "--quiet", *LENGTHS]
    assert cli.main(argv) == 1
    assert f"reranker '{tiny_checkpoint}' is a LlamaForCausalLM checkpoint, not a reranker" in one_error_line(capsys)
    assert nothing_claimed(data / "out")


def test_the_samples_are_written_before_the_reranker_scores_them(data, tiny_checkpoint, monkeypatch):
    import reftkit.commands.sample
    from reftkit.commands.sample import run_sample

    def scoring_fails(*args, **kwargs):
        raise RuntimeError("the reranker ran out of memory")

    reranker = reranker_dir(data / "rm", tiny_checkpoint)
    monkeypatch.setattr(reftkit.commands.sample, "score_samples", scoring_fails)
    cfg = SampleConfig(model=str(tiny_checkpoint), reranker=str(reranker), eval_file=str(data / "test.jsonl"),
                       output_dir=data / "out", num_samples=2, max_eval_examples=3, progress=False,
                       max_prompt_tokens=64, max_length=80)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_sample(cfg)
    rows = [json.loads(line) for line in (data / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("output" in r and "score" not in r for r in rows)
    assert not (data / "out" / "results.json").exists()  # a stage is done only when its results are


@pytest.mark.parametrize("command", [name for name, cmd in cli.COMMANDS.items()
                                     if "exec_memory_mb" in cmd.config.model_fields])
def test_a_sandbox_limit_the_executor_refuses_is_a_config_error(command, capsys, monkeypatch):
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: pytest.fail(f"{name} was run"))
    assert cli.main([command, "--exec_memory_mb", "1", "--cot", "program"]) == 2
    assert one_error_line(capsys) == f"reftkit {command}: invalid configuration: exec_memory_mb must be >= 16"


def test_sandbox_limits_are_checked_in_every_stage_section_and_honoured_when_valid():
    with pytest.raises(ValueError, match=r"section 'reft': .*exec_memory_mb must be >= 16"):
        ReproduceConfig(demo=True, reft={"exec_memory_mb": 8})
    limits = SampleConfig(exec_memory_mb=64, exec_timeout=0.5, exec_workers=1).executor_config()
    assert (limits.memory_mb, limits.timeout_s, limits.workers) == (64, 0.5, 1)


# ----------------------------------------------------------------------------- item 12: the Hub, unreachable

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hub cannot be reached (its host does not resolve) and the local Hugging Face cache is empty."""
    import socket

    import huggingface_hub.constants

    from reftkit.modeling.hub import hub_unreachable

    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub_unreachable.cache_clear()
    yield cache
    hub_unreachable.cache_clear()


@pytest.mark.parametrize("name", ["nothere", "someone/nothere"])
@pytest.mark.parametrize("load", [load_causal_lm, load_tokenizer,
                                  lambda name: load_pretrained(AutoModelForSequenceClassification, name)])
def test_a_hub_name_fails_at_once_while_the_hub_is_unreachable(offline_hub, monkeypatch, tmp_path, no_model_loads,
                                                               name, load):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("the Hub client was asked"))
    with pytest.raises(FileNotFoundError) as info:
        load(name)
    assert str(info.value) == (f"model {name!r}: no such local path, and not in the local Hugging Face cache as a "
                               "Hub model; it cannot be downloaded, since huggingface.co does not resolve here")


def test_a_bare_hub_name_is_one_line_from_the_cli_while_the_hub_is_unreachable(offline_hub, data, monkeypatch, capsys,
                                                                               no_model_loads):
    monkeypatch.chdir(data)
    argv = ["eval", "--model", "nothere", "--eval_file", "test.jsonl", "--output_dir", "out", "--quiet"]
    assert cli.main(argv) == 1
    assert one_error_line(capsys) == ("reftkit eval: error: model 'nothere': no such local path, and not in the local "
                                      "Hugging Face cache as a Hub model; it cannot be downloaded, since "
                                      "huggingface.co does not resolve here")
    assert nothing_claimed(data / "out")


@pytest.mark.parametrize("name", ["cached", "someone/cached"])
def test_a_cached_hub_model_loads_from_its_snapshot_while_the_hub_is_unreachable(offline_hub, tiny_checkpoint, name):
    snapshot = offline_hub / f"models--{name.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    snapshot.mkdir()
    for file in Path(tiny_checkpoint).iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    assert load_causal_lm(name).config.vocab_size == load_causal_lm(str(tiny_checkpoint)).config.vocab_size
    assert load_tokenizer(name).pad_token is not None
    check_model(name, {"max_length": 112})


# ----------------------------------------------------------------------------- item 13b: position limits

def gpt2_dir(path: Path, train, n_positions: int) -> Path:
    """A tiny GPT-2 (a learned table of n_positions positions) with a tokenizer."""
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in train)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("config, limit", [
    (GPT2Config(n_positions=32), ("n_positions", 32)),
    (OPTConfig(max_position_embeddings=64), ("max_position_embeddings", 64)),
    (GPTNeoConfig(max_position_embeddings=128), ("max_position_embeddings", 128)),
    (MptConfig(max_seq_len=256), ("max_seq_len", 256)),  # ALiBi plus a learned table
    (LlamaConfig(max_position_embeddings=32), None),  # RoPE: the trained context, no table to run past
    (GPTNeoXConfig(max_position_embeddings=32), None),
    (GPTJConfig(n_positions=32), None),  # rotary_dim
    (FalconConfig(alibi=True, max_position_embeddings=32), None),
    (BloomConfig(), None),  # ALiBi, no positions field
])
def test_position_limit_is_the_learned_table_only(config, limit):
    assert position_limit(config) == limit


@pytest.mark.parametrize("command", ["sft", "eval", "sample-reranker"])
def test_a_model_with_fewer_positions_than_max_length_is_refused_before_the_output_dir_is_claimed(
        data, splits, monkeypatch, capsys, no_model_loads, tiny_checkpoint, command):
    gpt2 = gpt2_dir(data / "gpt2", splits[0], n_positions=32)
    if command == "sample-reranker":
        gpt2 = reranker_dir(data / "gpt2-rm", gpt2)
    monkeypatch.chdir(data)
    argv = {"sft": ["sft", "--model", str(gpt2), "--train_file", "train.jsonl"],
            "eval": ["eval", "--model", str(gpt2), "--eval_file", "test.jsonl"],
            "sample-reranker": ["sample", "--model", str(tiny_checkpoint), "--reranker", str(gpt2),
                                "--eval_file", "test.jsonl"]}[command]
    capsys.readouterr()  # saving the model's progress bar
    assert cli.main([*argv, "--output_dir", "out", "--quiet", *LENGTHS]) == 1
    what = "reranker" if command == "sample-reranker" else "model"
    line = one_error_line(capsys)
    assert f"{what} '{gpt2}' has 32 positions (n_positions in its config), fewer than max_length = 112" in line
    assert nothing_claimed(data / "out")


def test_reproduce_checks_the_model_against_every_stage_max_length(data, splits):
    gpt2 = gpt2_dir(data / "gpt2", splits[0], n_positions=100)
    cfg = ReproduceConfig(model=str(gpt2), train_file=str(data / "train.jsonl"), eval_file=str(data / "test.jsonl"),
                          output_dir=data / "out", max_prompt_tokens=64, max_length=96, reft={"max_length": 112})
    from reftkit.training.preflight import preflight

    with pytest.raises(ValueError, match=r"fewer than max_length of stage 'reft' = 112"):
        preflight(cfg)


def test_a_rotary_model_is_not_refused_for_a_longer_max_length(tmp_path, splits):
    tokenizer = build_tokenizer(prompt_text(e) + response_text(e) for e in splits[0])
    build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_positions=32).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    check_model(str(tmp_path), {"max_length": 112})


# ----------------------------------------------------------------------------- item 14: tokenizer files

def vocabulary_files(directory: Path) -> None:
    """A GPT-2 BPE vocabulary in its slow files (vocab.json, merges.txt) with no tokenizer.json."""
    (directory / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4}))
    (directory / "merges.txt").write_text("#version: 0.2\na b\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))


@pytest.mark.parametrize("layout, missing", [
    ("no tokenizer files", "missing tokenizer.json, or tokenizer_config.json with its vocabulary files"),
    ("settings without the vocabulary", "missing tokenizer.json, or the vocabulary files of TokenizersBackend "
                                        "(its tokenizer_config.json): tokenizer.model"),
    ("GPT-2 files without merges.txt", "missing tokenizer.json, or the vocabulary files of GPT2Tokenizer "
                                       "(its tokenizer_config.json): merges.txt"),
])
def test_a_model_directory_without_tokenizer_files_names_them(tmp_path, tiny_checkpoint, layout, missing):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((Path(tiny_checkpoint) / name).read_bytes())
    if layout == "settings without the vocabulary":
        (model / "tokenizer_config.json").write_bytes((Path(tiny_checkpoint) / "tokenizer_config.json").read_bytes())
    elif layout == "GPT-2 files without merges.txt":
        vocabulary_files(model)
        (model / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(str(model))
    assert f"model '{model}': {model} has no tokenizer: {missing}" in str(info.value)
    assert "sentencepiece" not in str(info.value)


def test_a_tokenizer_of_vocabulary_files_alone_loads(tmp_path):
    vocabulary_files(tmp_path)
    (tmp_path / "config.json").write_text(GPT2Config(vocab_size=5).to_json_string())
    assert load_tokenizer(str(tmp_path))("ab a")["input_ids"] == [3, 4, 1]


def test_missing_tokenizer_files_are_a_one_line_cli_error_before_the_model_loads(data, tiny_checkpoint, monkeypatch,
                                                                                 capsys, no_model_loads):
    model = data / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((Path(tiny_checkpoint) / name).read_bytes())
    monkeypatch.chdir(data)
    assert cli.main(["eval", "--model", "model", "--eval_file", "test.jsonl", "--output_dir", "out", "--quiet"]) == 1
    line = one_error_line(capsys)
    assert line.startswith("reftkit eval: error: model 'model': model has no tokenizer: missing tokenizer.json")
    assert nothing_claimed(data / "out")


# ----------------------------------------------------------------------------- item 13a: Ctrl-C

@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_with_the_resume_hint(data):
    env = {**os.environ, "PYTHONPATH": str(Path(reftkit.__file__).parents[1])}
    out = data / "run"
    argv = [sys.executable, "-m", "reftkit.commands.cli", "sft", "--model", "tiny", "--train_file", "train.jsonl",
            "--output_dir", str(out), "--epochs", "1000", "--batch_size", "16", "--save_every", "1", "--no-progress",
            "--no-eval_every_epoch", *LENGTHS]
    process = subprocess.Popen(argv, cwd=data, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"reftkit sft: interrupted; {out}/checkpoint-")
    assert last.endswith(" is kept: continue with the same command and --resume")


def test_the_interrupted_line_hints_only_where_there_is_something_to_continue(tmp_path):
    from reftkit.config import EvalConfig, SFTConfig

    assert cli.interrupted_hint("sft", SFTConfig(output_dir=tmp_path / "none")) == ""
    assert cli.interrupted_hint("sft", SFTConfig(output_dir=tmp_path)) == ""  # no checkpoint yet
    assert cli.interrupted_hint("eval", EvalConfig(output_dir=tmp_path)) == ""
    assert cli.interrupted_hint("reproduce", ReproduceConfig(demo=True, output_dir=tmp_path)) == (
        "; rerun the same command to continue (finished stages are skipped, an interrupted one resumes)")
    assert cli.interrupted_hint("sft", None) == ""  # interrupted while the config was read
