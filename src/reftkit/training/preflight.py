"""Pre-flight: every input a command names is found and checked before its expensive work (loading a
model, sampling, training) and before a run claims its output_dir, so a mistyped path or an impossible
setting costs seconds and leaves nothing behind. Every command calls `preflight(cfg)` first.

Checked here: the models (`model`, `ref_model`, `reranker`): found (reftkit.modeling.model.model_source), their
config and tokenizer loadable, and enough positions for max_length (position_limit); the data files
(`train_file`, `eval_file`), read and validated as the command reads them (a Hub dataset name is left to
the command); `samples_file`. The sandbox's limits are checked when the config is built (SandboxOptions).
"""

from __future__ import annotations

import json
from pathlib import Path

from reftkit.config import EvalConfig, ReproduceConfig, SampleConfig, TrainData
from reftkit.modeling.hub import hub_unreachable, missing_path_message

# Config fields of relative positions (RoPE, ALiBi): no table to run past, so no hard length limit.
_RELATIVE_POSITIONS = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_pct",
                       "rotary_emb_base", "partial_rotary_factor", "alibi", "use_alibi")
# Config fields that size a learned position table, in the order transformers' configs use them.
_POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "max_sequence_length",
                    "seq_length")


def preflight(cfg, *, train_given: bool = False, eval_given: bool = False, model_given: bool = False) -> None:
    """Raises (ValueError, FileNotFoundError, DataError: one line each) when an input of `cfg` cannot
    serve the command. train_given / eval_given / model_given: the caller passes those examples, or the
    loaded model, itself, so the train_file / eval_file / model is not read."""
    if isinstance(cfg, ReproduceConfig) and cfg.demo:
        return  # synthetic data and the in-code model
    lengths = _max_lengths(cfg)
    if cfg.model != "tiny" and not model_given:  # tiny is built in code
        check_model(cfg.model, lengths)
    for name in ("ref_model", "reranker"):
        value = getattr(cfg, name, None)
        if isinstance(value, str):  # reproduce's `reranker` is a stage section, not a model
            check_model(value, lengths, what=name, tokenizer=name == "reranker")
    _check_data(cfg, train_given, eval_given)
    if getattr(cfg, "push_to_hub", None):  # known now, not after hours of training
        offline = hub_unreachable()
        if offline:
            raise ValueError(f"push_to_hub {cfg.push_to_hub!r}: the Hugging Face Hub cannot be reached ({offline}); "
                             "drop push_to_hub and upload the final model later")
    samples = getattr(cfg, "samples_file", None)
    if samples is not None and not Path(samples).expanduser().is_file():
        if Path(samples).expanduser().exists():
            raise ValueError(f"samples_file {samples!r}: not a file (`reftkit sample` writes samples.jsonl)")
        raise FileNotFoundError(missing_path_message("samples_file", samples))


def _max_lengths(cfg) -> dict[str, int]:
    """max_length by where it is set; every stage of `reproduce` runs on the model's architecture."""
    if isinstance(cfg, ReproduceConfig):
        return {f"max_length of stage '{name}'": cfg.stage(name).max_length for name in cfg.stage_names()}
    return {"max_length": cfg.max_length}


def _check_data(cfg, train_given: bool, eval_given: bool) -> None:
    """Reads the data files the command will read, as it reads them (rows validated, CoTs required where it
    trains on them); a missing file the command needs is refused as it would refuse it."""
    from reftkit.data.loading import load_examples_for
    from reftkit.data.readers import is_hub_dataset

    checks = []  # (role, path, required, needs_cot)
    if not train_given and (not isinstance(cfg, EvalConfig) or cfg.few_shot):  # eval: only few-shot reads it
        checks.append(("train", getattr(cfg, "train_file", None), isinstance(cfg, TrainData),
                       getattr(cfg, "train_needs_cot", True)))
    if not eval_given:
        checks.append(("eval", getattr(cfg, "eval_file", None), isinstance(cfg, (EvalConfig, SampleConfig)), False))
    for role, path, required, needs_cot in checks:
        if (path is None and not required) or (path is not None and is_hub_dataset(path, cfg.data_format)):
            continue  # not used; or a Hub dataset, read by the command from the Hub or its cache
        load_examples_for(path, cfg, role, require_cot=needs_cot, report_skipped=False)


def check_model(name: str, lengths: dict[str, int], *, what: str = "model", tokenizer: bool = True) -> None:
    """`name` is found, its config (and with `tokenizer` its tokenizer) loads, and it has positions for the
    longest of `lengths`. `what`: the option that names it, in the messages."""
    from reftkit.modeling.model import load_tokenizer

    try:
        config = _model_config(name)
        if tokenizer:
            load_tokenizer(name)
    except (FileNotFoundError, ValueError) as e:  # the loaders' one-line messages say "model": name the option
        if what == "model":
            raise
        raise type(e)(f"{what}: {e}") from None
    if what == "reranker" and config is not None:
        _check_reranker_config(name, config)
    limit = position_limit(config) if config is not None else None
    where, longest = max(lengths.items(), key=lambda item: item[1])
    if limit is not None and longest > limit[1]:
        field, positions = limit
        raise ValueError(f"{what} {name!r} has {positions} positions ({field} in its config), fewer than {where} = "
                         f"{longest}: its learned position table cannot encode longer sequences. Lower max_length "
                         f"to at most {positions} (max_prompt_tokens below it), or use a model with more positions")


def _check_reranker_config(name: str, config) -> None:
    """A reranker is a sequence classifier with one output, as `reftkit train-reranker` saves it: a causal LM
    given as one is refused from its config.json, before sampling (its weights are checked when it loads)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"reranker {name!r} is a {architectures[0]} checkpoint, not a reranker (a sequence "
                         "classifier); train one with `reftkit train-reranker --model <SFT checkpoint>`")
    if config.num_labels != 1:
        raise ValueError(f"reranker {name!r} has {config.num_labels} outputs; a reftkit reranker has one "
                         "(the logit that the answer is right)")


def _model_config(name: str):
    """The model's config; a peft adapter's is its base model's; None when a reachable Hub's answer is not a
    config (the model's own loading then reports it)."""
    from transformers import AutoConfig

    from reftkit.modeling.model import load_pretrained, model_source

    source, _ = model_source(name)
    adapter = Path(source) / "adapter_config.json"
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file() and adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        return _model_config(base) if isinstance(base, str) and base else None
    try:
        return load_pretrained(AutoConfig, name)
    except ValueError:
        if Path(source).is_dir():
            raise
        return None  # a Hub repo that is an adapter, say: left to the model's own loading


def position_limit(config) -> tuple[str, int] | None:
    """(config field, size) of a model whose positions are a learned table, such as GPT-2's n_positions or
    OPT's max_position_embeddings: a longer sequence fails inside the model (IndexError). None for relative
    positions (RoPE, ALiBi), whose max_position_embeddings is the trained context, not a hard limit."""
    text = config.get_text_config()
    relative = any(getattr(text, name, None) for name in _RELATIVE_POSITIONS) \
        or getattr(text, "position_embedding_type", None) in ("rotary", "alibi")
    if relative and not getattr(text, "learned_pos_emb", False):  # MPT: ALiBi and a learned table
        return None
    for name in _POSITION_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None
