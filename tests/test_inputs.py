"""Inputs and the messages about them: huge rows, silent truncation, model paths that
cannot be on the Hub, and the import graph of the data layer."""

from __future__ import annotations

import ast
import json
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reftkit.commands import cli
from reftkit.data import load_examples
from reftkit.data.prompts import (
    Truncations,
    encode_prompt,
    encode_prompts,
    encode_sft,
    encode_sft_examples,
    prompt_text,
    response_text,
)
from reftkit.data.records import Example
from reftkit.data.synthetic import make_splits
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.modeling.tiny import build_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def data():
    train, test = make_splits(16, 4, seed=5)
    return train, test, build_tokenizer(prompt_text(e) + response_text(e) for e in train)


class Spy:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):  # eos_token_id and the rest
        return getattr(self.tokenizer, name)


def whole_then_cut(tokenizer, example, max_prompt_tokens, cot="natural", shots=()):
    """The plain definition: tokenize everything, keep the last max_prompt_tokens."""
    texts = [t for s in shots for t in (prompt_text(s, cot), response_text(s, cot))] + [prompt_text(example, cot)]
    texts = [("\n\n" if n and n % 2 == 0 else "") + t for n, t in enumerate(texts)]
    ids = [i for n, t in enumerate(texts) for i in tokenizer(t, add_special_tokens=n == 0)["input_ids"]]
    return ids[-max_prompt_tokens:]


# ----------------------------------------------------------------------------- huge rows


@pytest.mark.parametrize("cot", ["natural", "program"])
def test_a_huge_question_is_tokenized_from_a_bounded_window_with_the_same_ids(data, cot):
    train, test, tokenizer = data
    sentence = "Tom has 3 apples and buys 4 more bags of 12 apples each. "
    huge = Example("huge", sentence * 100_000 + "How many apples?", "", "51")  # 5.8 MB
    spy = Spy(tokenizer)
    ids = encode_prompt(spy, huge, 64, cot)
    assert max(spy.lengths) <= 4 * (64 + 16) * 16  # before: the whole 5.8 MB (17 GB of RAM at 50 MB)
    small = Example("small", sentence * 400 + "How many apples?", "", "51")
    assert ids == whole_then_cut(tokenizer, small, 64, cot)  # the same last tokens as the plain definition


@pytest.mark.parametrize("cot", ["natural", "program"])
@pytest.mark.parametrize("max_prompt_tokens", [1, 5, 40, 90, 300, 10_000])
def test_windowed_prompts_equal_tokenizing_everything(cot, max_prompt_tokens):
    train, test = make_splits(8, 2, seed=5, cot=cot)
    tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
    long = Example("l", " ".join(e.question for e in train) * 3, "", "1")
    for example, shots in [(test[0], ()), (test[1], train[:3]), (long, ()), (long, train[:2])]:
        assert encode_prompt(tokenizer, example, max_prompt_tokens, cot, shots) == whole_then_cut(
            tokenizer, example, max_prompt_tokens, cot, shots)
    long_cot = Example("c", train[0].question, "\n".join([train[0].cot] * 40), train[0].answer)
    for example in (train[0], long_cot):
        prompt = whole_then_cut(tokenizer, example, max_prompt_tokens // 2 + 1, cot)
        response = tokenizer(response_text(example, cot), add_special_tokens=False)["input_ids"] + [2]
        got = encode_sft(tokenizer, example, max_prompt_tokens // 2 + 1, max_prompt_tokens + 1, cot)
        assert got.input_ids == (prompt + response)[: max_prompt_tokens + 1]
        assert got.truncated == (len(prompt) + len(response) > max_prompt_tokens + 1)


def test_reading_a_huge_row_takes_memory_proportional_to_it(tmp_path):
    row = {"question": "word " * 1_000_000 + "How many?", "answer": "2 + 3 = 5\n#### 5"}  # 5 MB
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    tracemalloc.start()
    try:
        (example,) = load_examples(path).examples
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert example.question.endswith("How many?") and example.answer == "5"
    assert peak < 8 * path.stat().st_size


# ----------------------------------------------------------------------------- truncation is never silent


def test_cut_prompts_are_warned_about_once_with_counts_and_counted(data, caplog):
    train, test, tokenizer = data
    cuts = Truncations()
    with caplog.at_level("WARNING", logger="reftkit"):
        assert all(len(p) == 8 for p in encode_prompts(tokenizer, train, 8, cuts=cuts))
        encode_prompts(tokenizer, train, 8, cuts=cuts)
        encode_prompts(tokenizer, test, 10_000, cuts=cuts)
    warnings = [r.getMessage() for r in caplog.records if "prompts exceed" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("16 of 16 prompts exceed max_prompt_tokens=8 and keep only their last 8 tokens")
    assert cuts.summary() == {"prompts_cut": 32, "prompts": 36}
    assert Truncations().summary() == {}  # a run's counts are its own


def test_cut_sft_targets_are_warned_about_once_with_counts_and_counted(data, caplog):
    train, test, tokenizer = data
    cuts = Truncations()
    longest = max(len(tokenizer(prompt_text(e) + response_text(e))["input_ids"]) for e in train)
    with caplog.at_level("WARNING", logger="reftkit"):
        features = encode_sft_examples(tokenizer, train, 10_000, 20, cuts=cuts)
        encode_sft_examples(tokenizer, train, 10_000, longest + 1, cuts=cuts)
    assert all(len(f.input_ids) == 20 and f.truncated for f in features)
    (warning,) = [r.getMessage() for r in caplog.records if "exceed" in r.getMessage()]
    assert warning.startswith("16 of 16 SFT targets (prompt, reference CoT, EOS) exceed max_length=20")
    assert cuts.summary() == {"prompts_cut": 0, "prompts": 32, "sft_targets_cut": 16, "sft_targets": 32}


def test_evaluation_with_a_tiny_prompt_budget_says_so(data, caplog):
    """The issue's run: `eval --max_prompt_tokens 8` cut 16 of 16 prompts without a word."""
    from accelerate import Accelerator

    from reftkit.grading.answers import NaturalLanguageGrader
    from reftkit.modeling.tiny import build_model
    from reftkit.rollout.decoding import evaluate

    train, test, tokenizer = data
    cuts = Truncations()
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0).eval()
    with caplog.at_level("WARNING", logger="reftkit"):
        evaluate(Accelerator(cpu=True), model, tokenizer, train, NaturalLanguageGrader(), batch_size=16,
                 max_prompt_tokens=8, max_new_tokens=2, progress=False, cuts=cuts)
    assert "16 of 16 prompts exceed max_prompt_tokens=8" in caplog.text
    assert cuts.summary()["prompts_cut"] == 16


# ----------------------------------------------------------------------------- model paths


@pytest.fixture
def no_hub(monkeypatch):
    """Fails a test that asks transformers to load anything."""
    def refuse(*args, **kwargs):
        pytest.fail(f"from_pretrained{args} was called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("name", ["./runs/sft", "../nope", "runs/sft/final", "/nonexistent/model", "~/nope-model",
                                  "outputs/sft"])
def test_a_missing_local_looking_model_path_is_an_error_at_once(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # "outputs/sft" names a child of an existing directory: local
    start = time.perf_counter()
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=rf"model '{name}': no such file or directory"):
            load(name)
    assert time.perf_counter() - start < 1


def test_a_directory_without_a_model_is_an_error_that_points_at_final(tmp_path, no_hub):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no config.json, not a model directory; the run's final model is"):
        load_causal_lm(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="a file, not a model directory"):
        load_tokenizer(str(tmp_path / "run" / "final" / "config.json"))


def test_a_local_model_directory_is_read_without_the_network(tmp_path, monkeypatch):
    from reftkit.modeling.tiny import build_model

    tokenizer = build_tokenizer(["a b c 1 2 3"] * 4, vocab_size=300)
    build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    seen = []
    real = AutoTokenizer.from_pretrained.__func__

    def spy(cls, source, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real(cls, source, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("m").pad_token is not None
    assert seen == [True]


def test_missing_model_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    eval_file = tmp_path / "test.json"  # the paper's test-set layout: no answer_cot
    eval_file.write_text(json.dumps([{"item_id": "t0", "question": "2 + 3?", "answer_value": "5"}]))
    argv = ["eval", "--model", "./runs/sft/final", "--eval_file", str(eval_file), "--output_dir", "out", "--quiet"]
    assert cli.main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"reftkit eval: error: model './runs/sft/final': no such file or directory (looked in {tmp_path})"


# ----------------------------------------------------------------------------- import graph


def module_imports(module: str) -> set[str]:
    """reftkit modules `module` imports when it is loaded (top-level statements, TYPE_CHECKING aside);
    importing a.b.c also runs a/__init__ and a/b/__init__, except the packages `module` is inside."""
    tree = ast.parse(module_path(module).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                names |= {alias.name for alias in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                names |= {sub.module} | {f"{sub.module}.{alias.name}" for alias in sub.names}
    found = set()
    for name in names:
        parts = name.split(".")
        for n in range(2, len(parts) + 1):
            candidate = ".".join(parts[:n])
            if module_path(candidate) is not None:
                found.add(candidate)
    return {name for name in found if name.startswith("reftkit.") and not (module + ".").startswith(name + ".")}


def module_path(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def cycle_through(start: str) -> list[str] | None:
    """An import cycle through `start`, as the list of modules, or None."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        name, trail = stack.pop()
        for nxt in sorted(module_imports(name)):
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


@pytest.mark.parametrize("module", ["reftkit.grading.answers", "reftkit.data", "reftkit.data.readers",
                                    "reftkit.data.prompts", "reftkit.grading.cot"])
def test_the_data_layer_has_no_import_cycle(module):
    assert cycle_through(module) is None


@pytest.fixture
def fresh_hub_check():
    """hub_unreachable asks once per process: each test asks anew, and leaves no answer behind."""
    from reftkit.modeling.hub import hub_unreachable

    hub_unreachable.cache_clear()
    yield hub_unreachable
    hub_unreachable.cache_clear()


def test_hub_unreachable_says_why_or_nothing(monkeypatch, fresh_hub_check):
    import socket

    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    asked = []

    def no_dns(host, port, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert fresh_hub_check() == "huggingface.co does not resolve here"
    fresh_hub_check.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    assert fresh_hub_check() == "hub.example.org does not resolve here"
    fresh_hub_check.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy resolves names, not this machine
    assert fresh_hub_check() is None
    fresh_hub_check.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fresh_hub_check() == "HF_HUB_OFFLINE is set"
    assert asked == ["huggingface.co", "hub.example.org"]
    fresh_hub_check.cache_clear()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # resolves: the Hub client decides
    assert fresh_hub_check() is None


def test_an_unreachable_hub_reads_the_cache_only_and_says_so(monkeypatch, tmp_path):
    """No network retries for a Hub id when the Hub cannot be reached (they took 25-55 s here before the same
    error): the model is its cached snapshot, read as a local directory, or an error at once."""
    import huggingface_hub.constants

    import reftkit.modeling.model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reftkit.modeling.model, "hub_unreachable", lambda: "huggingface.co does not resolve here")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "cache" / "models--someone--model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    (snapshot / "config.json").write_text("{}")
    calls = []

    def broken(source, **kwargs):
        calls.append((source, kwargs))
        raise OSError("Error no file named model.safetensors found in directory " + source)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ValueError) as info:
        load_causal_lm("someone/model")
    assert calls == [(str(snapshot), {"local_files_only": True, "dtype": torch.float32})]
    assert str(info.value) == ("cannot load model 'someone/model' (no such local path; read from the local Hugging "
                               "Face cache only, since huggingface.co does not resolve here): Error no file named "
                               f"model.safetensors found in directory {snapshot}")
    with pytest.raises(FileNotFoundError, match=r"model 'someone/other': no such local path, and not in the local "
                                                r"Hugging Face cache as a Hub model; it cannot be downloaded, since "
                                                r"huggingface.co does not resolve here"):
        load_causal_lm("someone/other")
    assert len(calls) == 1  # the uncached one never reached transformers


def test_an_unreachable_hub_reads_datasets_from_the_cache_only(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import reftkit.data.readers as readers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(readers, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    before = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(readers.DataError) as info:
        load_examples("someone/no-such-dataset")
    assert time.monotonic() - start < 20  # no network back-off (it took 25 s offline before)
    assert ("someone/no-such-dataset: cannot load Hugging Face dataset (no such local path; read from the local "
            "Hugging Face cache only, since HF_HUB_OFFLINE is set) (split 'train')") in str(info.value)
    assert datasets.config.HF_HUB_OFFLINE == before  # offline for that call only


def test_a_hub_failure_is_one_line_naming_the_model(monkeypatch, tmp_path):
    import reftkit.modeling.model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reftkit.modeling.model, "hub_unreachable", lambda: None)  # the Hub may be there: it is asked

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ValueError) as info:
        load_causal_lm("someone/model")
    assert str(info.value) == ("cannot load model 'someone/model' (no such local path, so it was looked up as a "
                               "Hugging Face Hub id): We couldn't connect to 'https://huggingface.co' "
                               "to load the files.")


def test_a_huge_reference_cot_is_tokenized_from_a_bounded_window_with_the_same_ids(data):
    from reftkit.grading.reward_model import encode_texts

    train, test, tokenizer = data
    step = "Then 3 * 12 = 36 apples, and 36 + 7 = 43. "
    huge, small = (Example("x", train[0].question, step * n, "43") for n in (100_000, 300))  # 4.3 MB, 13 KB
    spy = Spy(tokenizer)
    got = encode_sft(spy, huge, 64, 200)
    assert max(spy.lengths) <= 4 * (200 + 16) * 16
    assert got == encode_sft(tokenizer, small, 64, 200) and got.truncated and len(got.input_ids) == 200
    spy.lengths.clear()
    texts = [prompt_text(huge) + step * 100_000, prompt_text(small)]
    assert encode_texts(spy, texts, 100)[1] == tokenizer(texts[1])["input_ids"][-100:]
    assert max(spy.lengths) <= 4 * (100 + 16) * 16


# ----------------------------------------------------------------------------- who needs a reference CoT


def test_eval_data_and_reft_questions_need_no_cot_but_sft_data_does(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from reftkit.data.loading import load_examples_for, training_examples

    path = tmp_path / "gsm8k_test_set.json"  # the ReFT repository's test-set layout
    path.write_text(json.dumps([{"item_id": "t0", "question": "2 + 3?", "answer_value": "5"}]))
    cfg = SimpleNamespace(data_format="auto", skip_invalid=False, train_file=str(path), max_train_examples=None)
    assert load_examples_for(str(path), cfg, "eval") == [Example("t0", "2 + 3?", "", "5")]
    assert training_examples(None, cfg, require_cot=False) == [Example("t0", "2 + 3?", "", "5")]  # reft, reranker
    with pytest.raises(Exception, match=r"item 0: missing field 'answer_cot' \(the reference CoT, which training"):
        training_examples(None, cfg)  # sft, online-st, offline-st
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", "--model", "tiny", "--train_file", str(path), "--output_dir", "out", "--quiet"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"reftkit sft: error: {path} item 0: missing field 'answer_cot' (the reference CoT, which "
                    "training needs)")


def test_a_missing_reranker_is_a_one_line_error(tmp_path, monkeypatch, no_hub):
    from reftkit.grading.reward_model import new_reranker, score_samples

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model './rm': no such file or directory"):
        score_samples(None, "./rm", [], [], None)
    with pytest.raises(FileNotFoundError, match=r"model 'runs/sft/final': no such file or directory"):
        new_reranker("runs/sft/final", 0)


def test_a_checkpoint_without_a_trained_score_head_is_refused_as_reranker(tmp_path, splits, tiny_checkpoint, capsys):
    """A causal LM (an SFT checkpoint) loads as a sequence classifier with a random score head: refused, by
    its weights; a checkpoint that has the head (what train-reranker saves) is used."""
    from transformers import AutoModelForSequenceClassification

    from reftkit.grading.reward_model import load_reranker

    with pytest.raises(ValueError, match=r"not a trained reranker: its weights have no score\.weight"):
        load_reranker(str(tiny_checkpoint))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"item_id": e.id, "question": e.question, "answer_value": e.answer}) + "\n"
                            for e in splits[1][:2]))
    argv = ["sample", "--model", str(tiny_checkpoint), "--eval_file", str(data), "--num_samples", "2",
            "--max_prompt_tokens", "64", "--max_length", "72", "--output_dir", str(tmp_path / "s"), "--quiet",
            "--no-progress"]
    assert cli.main([*argv, "--reranker", str(tiny_checkpoint)]) == 1
    assert re.search(r"not a (trained )?reranker", capsys.readouterr().err)  # refused before sampling (preflight)
    head = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=1)
    head.save_pretrained(tmp_path / "rm")  # the score head is in its weights now (random or trained alike)
    assert load_reranker(str(tmp_path / "rm")).config.num_labels == 1
    two = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="has 2 outputs"):
        load_reranker(str(tmp_path / "two"))
