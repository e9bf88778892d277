"""A run's final model for others: its model card (README.md, huggingface_hub's card tools) and its upload
to the Hugging Face Hub (`push_to_hub`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from reftkit import __version__

# The settings a reader of the card needs first; the whole config is in trainer_state.json beside it.
_KEY_SETTINGS = ("model", "train_file", "cot", "epochs", "batch_size", "lr", "num_samples", "advantage", "kl_coef",
                 "ppo_epochs", "mini_batch_size", "reward", "sft_coef", "lora_r", "max_length", "bf16", "seed")
_METHODS = {"sft": "supervised fine-tuning", "reft": "ReFT (online RL from a warm-up SFT checkpoint)",
            "online-st": "online self-training", "offline-st": "offline self-training",
            "train-reranker": "an outcome reward model (reranker)"}
_PIPELINES = {"train-reranker": "text-classification"}  # the rest generate text


def final_metrics(metrics_file: Path) -> dict[str, float]:
    """The last value of each headline metric in metrics.jsonl (eval accuracy, train reward and accuracy, loss)."""
    last: dict[str, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            for key in ("eval_accuracy", "reward", "train_accuracy", "loss", "kl"):
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    last[key] = value
    return last


def model_card(config: dict, command: str, metrics: dict[str, float]) -> ModelCard:
    """A card for a model trained by `command` with `config` (the run's settings), `metrics` its last figures."""
    base = str(config.get("model", ""))
    method = _METHODS.get(command, command)
    if command == "reft" and config.get("advantage", "gae") != "gae":
        method += f", advantage estimator {config['advantage']}"
    data = ModelCardData(library_name="transformers", pipeline_tag=_PIPELINES.get(command, "text-generation"),
                         tags=["reftkit", command, "math-reasoning"], base_model=base or None)
    settings = "\n".join(f"| `{key}` | `{json.dumps(config[key])}` |" for key in _KEY_SETTINGS if key in config)
    figures = "\n".join(f"| {key} | {value:.4f} |" for key, value in metrics.items()) or "| (none logged) | |"
    text = f"""---
{data.to_yaml()}
---

# {Path(base).name or base or "model"}, trained with reftkit ({command})

Trained with reftkit {__version__}: {method}, from `{base}`.
It is a plain `transformers` checkpoint: `AutoModelForCausalLM.from_pretrained(this directory)` loads it.
The prompt format is the one it was trained on: `Question:\\n{{question}}\\nAnswer reasoning:\\n`, and it
ends its answer with `Therefore, the answer is: {{answer}}` (natural CoT) or a Python program (program CoT).

## Settings

| option | value |
|---|---|
{settings}

Every setting is in `trainer_state.json`, beside this card.

## Last figures of the run (metrics.jsonl)

| metric | value |
|---|---|
{figures}
"""
    return ModelCard(text)


def write_model_card(directory: Path, config: dict, command: str, metrics_file: Path) -> None:
    model_card(config, command, final_metrics(metrics_file)).save(Path(directory) / "README.md")


def push_to_hub(directory: Path, repo_id: str) -> str:
    """Uploads `directory` to the Hub model repo `repo_id` (created if missing); returns the commit's URL. Any
    failure (offline, no token, no rights) is one line that says the model is saved locally."""
    from huggingface_hub import HfApi

    from reftkit.training.errors import RunError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                                 commit_message=f"reftkit {__version__}: {Path(directory).parent.name}")
    except Exception as error:  # noqa: BLE001 -- whatever the Hub client raises, the run's model is safe
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RunError(f"push_to_hub {repo_id!r}: the upload failed ({type(error).__name__}: {first}); the model "
                       f"is saved in {directory}") from None
    return getattr(info, "commit_url", str(info))
