"""reftkit from Python: a trainer object per method, running the same code as the CLI.

    from reftkit import ReFTConfig, ReFTTrainer, SFTConfig, SFTTrainer

    rows = [{"question": "...", "answer": "... #### 72"}, ...]              # or a datasets.Dataset
    warm = SFTTrainer("Qwen/Qwen2.5-0.5B", SFTConfig(output_dir="runs/sft"), train_dataset=rows).train()

    def brevity(prompts, completions, **kwargs):                             # TRL's reward signature
        return [-len(c) / 1000 for c in completions]

    result = ReFTTrainer(warm.final_dir, ReFTConfig(output_dir="runs/reft"), train_dataset=rows,
                         reward_funcs=["correctness", brevity], reward_weights=[1.0, 0.5]).train()
    result.final_dir, result.last["reward"]

`model` is a name or directory, or a loaded `transformers` / `peft` model (then pass its `tokenizer`).
Data is a list of dicts, a `datasets.Dataset`, a file path, or reftkit `Example`s; `columns` maps reftkit's
keys (question, cot, answer, id, options) to yours, and the data's other columns reach reward functions
as keyword arguments. A run keeps every guarantee of the CLI's: it owns its output_dir, resumes
(`resume=True`), stops on non-finite values, and writes a plain Hugging Face directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reftkit.config import ReFTConfig, SFTConfig, TrainerOptions
from reftkit.data.readers import examples_from_rows, load_examples
from reftkit.data.records import Example
from reftkit.grading.rewards import RewardFunction, Rewards


@dataclass
class TrainResult:
    """What a run left: its final model directory and the rows of its metrics.jsonl."""

    final_dir: Path
    metrics: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict[str, Any]:
        """The last logged value of every metric."""
        out: dict[str, Any] = {}
        for row in self.metrics:
            out.update({k: v for k, v in row.items() if v is not None})
        return out


def to_examples(data, columns: dict[str, str] | None = None, data_format: str = "auto", *,
                require_cot: bool = True, label: str = "dataset") -> list[Example] | None:
    """Examples of `data`: None, reftkit Examples, a file or dataset path, a list of dicts or a datasets.Dataset."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return load_examples(str(data), data_format, fields=columns, require_cot=require_cot).examples
    rows = list(data)
    if rows and all(isinstance(row, Example) for row in rows):
        return rows
    fmt = "auto" if data_format == "hf" else data_format  # rows in memory: their format, read off their columns
    return examples_from_rows(rows, fmt, fields=columns, require_cot=require_cot, label=label)


class _Trainer:
    config_class: type[TrainerOptions]

    def __init__(self, model=None, args: TrainerOptions | None = None, *, tokenizer=None, train_dataset=None,
                 eval_dataset=None, columns: dict[str, str] | None = None):
        args = (args or self.config_class()).model_copy()
        self.model = None
        if isinstance(model, (str, Path)):
            args.model = str(model)
        elif model is not None:
            if tokenizer is None and not getattr(model, "name_or_path", ""):
                raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
            self.model = model
            args.model = str(getattr(model, "name_or_path", "") or args.model)  # the card's and config's record
        self.args, self.tokenizer = args, tokenizer
        self.train_examples = to_examples(train_dataset, columns, args.data_format,
                                          require_cot=getattr(args, "train_needs_cot", True),
                                          label="train_dataset")
        self.eval_examples = to_examples(eval_dataset, columns, args.data_format, require_cot=False,
                                         label="eval_dataset")
        self.result: TrainResult | None = None

    def train(self) -> TrainResult:
        final = self._train()
        rows = [json.loads(line) for line in (Path(self.args.output_dir) / "metrics.jsonl").read_text().splitlines()]
        self.result = TrainResult(Path(final), rows)
        return self.result

    def _train(self) -> Path:
        raise NotImplementedError

    def evaluate(self, eval_dataset=None, columns: dict[str, str] | None = None) -> float:
        """Greedy top-1 accuracy of the trained model (before `train`: the given one) on `eval_dataset` (by
        default the trainer's); predictions go to output_dir/predictions-evaluate.jsonl."""
        from reftkit.grading.cot import open_grader
        from reftkit.modeling.model import load_causal_lm, load_tokenizer, prepare_tokenizer
        from reftkit.rollout.decoding import evaluate_run
        from reftkit.training.device import make_accelerator

        examples = to_examples(eval_dataset, columns, self.args.data_format, require_cot=False,
                               label="eval_dataset") if eval_dataset is not None else self.eval_examples
        if not examples:
            raise ValueError("evaluate: no eval data (pass eval_dataset here or to the trainer)")
        accelerator = make_accelerator(self.args)
        if self.result is not None:
            lm, tokenizer = load_causal_lm(str(self.result.final_dir)), load_tokenizer(str(self.result.final_dir))
        elif self.model is not None:
            lm, tokenizer = self.model, prepare_tokenizer(self.tokenizer or load_tokenizer(self.args.model))
        else:
            lm, tokenizer = load_causal_lm(self.args.model), load_tokenizer(self.args.model)
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open_grader(self.args) as grader:
            return evaluate_run(accelerator, lm.to(accelerator.device).eval(), tokenizer, examples, grader, self.args,
                                out / "predictions-evaluate.jsonl")

    def save_model(self, directory: str | Path) -> Path:
        """Copies the trained model (a plain Hugging Face directory, with its card) to `directory`."""
        if self.result is None:
            raise ValueError("save_model: nothing trained yet (call train() first)")
        shutil.copytree(self.result.final_dir, directory, dirs_exist_ok=True)
        return Path(directory)


class SFTTrainer(_Trainer):
    """Supervised fine-tuning on (question, reference CoT) pairs: the warm-up, or the SFT baseline."""

    config_class = SFTConfig

    def _train(self) -> Path:
        from reftkit.trainers.sft import train_sft

        return train_sft(self.args, self.train_examples, self.eval_examples, model=self.model, tokenizer=self.tokenizer)


class ReFTTrainer(_Trainer):
    """ReFT (or a method of its RL family, `args.advantage`) from a warm-up model. `reward_funcs`: callables with
    TRL's signature, built-in names or "module:function" strings (default: the config's `reward`, the paper's
    correctness); `reward_weights`: one per function."""

    config_class = ReFTConfig

    def __init__(self, model=None, args: ReFTConfig | None = None, *, tokenizer=None, train_dataset=None,
                 eval_dataset=None, columns: dict[str, str] | None = None,
                 reward_funcs: Sequence[str | RewardFunction] | None = None,
                 reward_weights: Sequence[float] | None = None):
        super().__init__(model, args, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         columns=columns)
        functions = list(reward_funcs) if reward_funcs is not None else self.args.reward
        weights = reward_weights if reward_weights is not None else (self.args.reward_weights or None)
        self.rewards = Rewards(functions, weights, correct_reward=self.args.correct_reward,
                               partial_reward=self.args.partial_reward)

    def _train(self) -> Path:
        from reftkit.trainers.reft import train_reft

        return train_reft(self.args, self.train_examples, self.eval_examples, rewards=self.rewards, model=self.model,
                          tokenizer=self.tokenizer)
