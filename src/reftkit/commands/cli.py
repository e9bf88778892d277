"""`reftkit` command line: one subcommand per config model, options generated from its fields.

Precedence: field defaults < YAML config file < command-line options. The merged dict is validated
by the pydantic model only, so types, ranges and unknown keys are checked in one place.
Heavy modules (torch, transformers) are imported only when a command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from reftkit import __version__, yamlfile
from reftkit.config import (
    DemoConfig,
    EvalConfig,
    OfflineSTConfig,
    OnlineSTConfig,
    ReFTConfig,
    ReproduceConfig,
    RerankerConfig,
    SampleConfig,
    SFTConfig,
)


class Command(NamedTuple):
    module: str  # resolved with importlib at call time: lazy, and tests can swap the module
    function: str
    config: type[BaseModel]
    help: str


COMMANDS: dict[str, Command] = {
    "sft": Command("reftkit.trainers.sft", "train_sft", SFTConfig, "supervised fine-tuning (warm-up)"),
    "reft": Command("reftkit.trainers.reft", "train_reft", ReFTConfig, "ReFT: PPO from an SFT checkpoint"),
    "eval": Command("reftkit.commands.evaluate", "run_eval", EvalConfig, "greedy accuracy of a checkpoint"),
    "sample": Command("reftkit.commands.sample", "run_sample", SampleConfig, (
        "k samples per question: vote@k, pass@k, rerank@k"
    )),
    "offline-st": Command("reftkit.trainers.offline_st", "train_offline_st", OfflineSTConfig,
                          "offline self-training: SFT on the data plus the model's own correct samples"),
    "online-st": Command("reftkit.trainers.online_st", "train_online_st", OnlineSTConfig,
                         "online self-training: SFT on the policy's correct samples, mixed with the data"),
    "train-reranker": Command("reftkit.trainers.reranker", "train_reranker", RerankerConfig,
                              "outcome reward model for rerank@k, from an SFT checkpoint"),
    "reproduce": Command("reftkit.commands.reproduce", "run_reproduce", ReproduceConfig,
                         "the paper's protocol: every method and inference strategy, one table"),
    "demo": Command("reftkit.commands.demo", "run_demo", DemoConfig, (
        "synthetic end-to-end demo: SFT, then ReFT vs SFT"
    )),
}

CONVENTIONS = (
    "Values: defaults < CONFIG (YAML mapping of option: value) < options given here. "
    "Booleans: --flag / --no-flag. Lists: --log_with tensorboard wandb (no value: empty list). "
    "Optional values: 'none' sets None. Options may be spelled --snake_case or --kebab-case. "
    "Give CONFIG before list options."
)
_DEST = "cfg:"  # prefix keeping config fields apart from the parser's own dests (command, config_file)
_NONE_TYPES = (type(None),)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows the metavar once after all spellings: `--kl_coef, --kl-coef FLOAT`."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, action.dest)


class UsageError(Exception):
    """A bad config file or value: reported as one line per problem, exit code 2."""


def _yaml_option(text: str) -> Any:
    """A stage section given on the command line: the config file's YAML rules (yamlfile), errors as usage errors."""
    try:
        return yamlfile.load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"invalid YAML {text!r}: {yamlfile.problem(e)}") from None


def _none_or(value: str) -> str | None:
    return None if value.lower() in ("none", "null") else value


def _add_field(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    """One option per field; values stay strings (pydantic converts and checks them)."""
    annotation, optional = field.annotation, False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a not in _NONE_TYPES]
        optional, annotation = len(args) < len(typing.get_args(annotation)), args[0]
    nargs, parse = None, (_none_or if optional else str)
    if typing.get_origin(annotation) is dict:  # a stage section: --reft '{kl_coef: 0.01}'
        annotation, parse = "YAML", _yaml_option
    if typing.get_origin(annotation) is list:
        nargs, annotation = "*", typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        metavar = "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    else:
        metavar = annotation if isinstance(annotation, str) else annotation.__name__.upper()
    default = field.get_default(call_default_factory=True)
    shown = "none" if default is None else default
    help_ = f"{field.description + ' ' if field.description else ''}(default: {shown})"
    help_ = help_.replace("%", "%%")  # argparse %-formats help strings
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    kw: dict[str, Any] = dict(dest=_DEST + name, default=argparse.SUPPRESS, help=help_)
    if annotation is bool and nargs is None:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
    else:
        parser.add_argument(*flags, nargs=nargs, metavar=metavar, type=parse, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reftkit", description="ReFT: reinforced fine-tuning of LMs for math.")
    parser.add_argument("--version", action="version", version=f"reftkit {__version__}")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        # allow_abbrev=False: a prefix such as --lr must never silently mean another option
        p = sub.add_parser(name, help=cmd.help, description=cmd.config.__doc__, epilog=CONVENTIONS,
                           usage=(
                               f"reftkit {name} [CONFIG] [--option VALUE ...]"
                           ), allow_abbrev=False, formatter_class=_HelpFormatter)
        p.add_argument("config_file", nargs="?", type=Path, metavar="CONFIG", help="YAML config file")
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="log warnings and errors only")
        by_section: dict[type, list[str]] = {}
        for field_name in cmd.config.model_fields:
            by_section.setdefault(_declaring_section(cmd.config, field_name), []).append(field_name)
        order = list(_SECTION_TITLES)  # after the command's own options and those of a command it extends
        for section in sorted(by_section, key=lambda c: order.index(c.__name__) if c.__name__ in order else -1):
            title = _SECTION_TITLES.get(section.__name__, f"{name} options")
            group = p.add_argument_group(title)
            for field_name in by_section[section]:
                _add_field(group, field_name, cmd.config.model_fields[field_name])
    return parser


# --help shows a command's options by section (reftkit.config), its own options first.
_SECTION_TITLES = {
    "RunOptions": "run", "DataOptions": "data and prompts", "SandboxOptions": "program-CoT sandbox",
    "TrainData": "training data", "EvalData": "evaluation data", "Tracking": "tracking",
    "RunDirOptions": (
        "checkpoints and run directory"
    ), "OptimOptions": "optimiser", "MemoryOptions": "memory and batching",
    "LoraOptions": "LoRA", "AccumulationOptions": "gradient accumulation", "SamplingOptions": "sampling",
    "SamplesInput": "samples of the training questions",
}


def _declaring_section(config: type[BaseModel], field_name: str) -> type:
    """The class in `config`'s hierarchy that declares `field_name` (the first in method order)."""
    return next(c for c in config.__mro__ if field_name in getattr(c, "__annotations__", {}))


def load_yaml(path: Path, config: type[BaseModel]) -> dict[str, Any]:
    try:
        data = yamlfile.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"invalid YAML in {path} {yamlfile.problem(e)}") from None
    if data is None:  # an empty file configures nothing
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping of option: value, not a {type(data).__name__}")
    valid = list(config.model_fields)
    unknown = [str(k) for k in data if k not in config.model_fields]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}' in {path}{hint}")
        raise UsageError("\n".join(lines))
    return data


_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "path_type": "a path",
}


def format_validation_error(err: ValidationError, where: dict[str, str] | None = None,
                            typed: dict[str, Any] | None = None) -> str:
    """One line per problem; `where` names the source of each key (the config file, the command
    line), `typed` the command-line strings that were converted (the message shows what was typed)."""
    lines = []
    for e in err.errors():
        keys = [str(part) for part in e["loc"] if isinstance(part, str)]
        if not keys:  # a model-level check, e.g. max_prompt_tokens < max_length
            lines.append(f"invalid configuration: {e['msg'].removeprefix('Value error, ')}")
            continue
        source = f" {where[keys[0]]}" if where and keys[0] in where else ""
        if e["type"] in _EXPECTED:
            why = f"expected {_EXPECTED[e['type']]}"
        elif e["type"] == "literal_error":
            why = f"expected one of {e['ctx']['expected']}"
        else:
            why = e["msg"].replace("Input should be", "must be")
        shown = typed[keys[0]] if typed and keys[0] in typed and len(e["loc"]) == 1 else e["input"]
        lines.append(f"invalid value for '{keys[0]}'{source}: {shown!r} ({why})")
    return "\n".join(lines)


def make_config(cmd: Command, ns: argparse.Namespace) -> BaseModel:
    """Config file values must have their option's type already (strict: `batch_size: "8"` is an
    error); command-line strings are converted to the option's type first."""
    values = load_yaml(ns.config_file, cmd.config) if ns.config_file else {}
    where, typed = {key: f"in {ns.config_file}" for key in values}, {}
    for key, value in ((k[len(_DEST):], v) for k, v in vars(ns).items() if k.startswith(_DEST)):
        where[key], typed[key] = "on the command line", value
        try:
            value = TypeAdapter(cmd.config.model_fields[key].annotation).validate_python(value)
        except ValidationError as e:
            raise UsageError(format_validation_error(_at(e, key), where)) from None
        # a stage section given on the command line adds to the config file's, key by key
        merge = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if merge else value
    try:
        return cmd.config.model_validate(values)
    except ValidationError as e:
        raise UsageError(format_validation_error(e, where, typed)) from None


def _at(err: ValidationError, key: str) -> ValidationError:
    """The errors of one option's value, located at that option."""
    return ValidationError.from_exception_data(
        err.title, [{"type": e["type"], "loc": (key, *e["loc"]), "input": e["input"], "ctx": e.get("ctx", {})}
                    for e in err.errors()])


def _setup_logging(quiet: bool) -> None:
    # third-party loggers stay at the root's WARNING; only our own logger says INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("reftkit").setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return 2
    cfg = None
    try:
        _setup_logging(ns.quiet)
        cmd = COMMANDS[ns.command]
        try:
            cfg = make_config(cmd, ns)
        except UsageError as e:
            for line in str(e).splitlines():
                print(f"reftkit {ns.command}: {line}", file=sys.stderr)
            return 2
        from reftkit.data.readers import DataError  # lazy: keeps `--help` light

        run = getattr(importlib.import_module(cmd.module), cmd.function)
        try:
            result = run(cfg)
        except (DataError, FileNotFoundError, ValueError) as e:  # user-facing input problems, not bugs
            print(f"reftkit {ns.command}: error: {e}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT, and how to continue
        print(f"reftkit {ns.command}: interrupted{interrupted_hint(ns.command, cfg)}", file=sys.stderr)
        return 130
    if isinstance(result, Path):
        print(f"final model: {result}")
    elif isinstance(result, float):
        print(f"accuracy: {result:.4f}")
    elif isinstance(result, dict) and ns.command == "sample":
        print(json.dumps(result, indent=2))
    return 0


def interrupted_hint(command: str, cfg: BaseModel | None) -> str:
    """How to continue an interrupted run, when there is something to continue: a training run's checkpoint
    (--resume), or a reproduce run's directory (its stages resume by themselves)."""
    out = getattr(cfg, "output_dir", None)
    if out is None or not Path(out).is_dir():
        return ""
    if command == "reproduce":
        return "; rerun the same command to continue (finished stages are skipped, an interrupted one resumes)"
    if "resume" not in type(cfg).model_fields:
        return ""
    from reftkit.training.checkpoints import latest_checkpoint

    checkpoint = latest_checkpoint(Path(out))
    return f"; {checkpoint} is kept: continue with the same command and --resume" if checkpoint else ""


if __name__ == "__main__":
    sys.exit(main())
