"""The `reftkit` CLI, driven through main() with fake command functions (no torch, no training)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from reftkit import __version__, yamlfile
from reftkit.commands import cli
from reftkit.config import DemoConfig, EvalConfig, ReFTConfig, SFTConfig
from reftkit.data.readers import DataError


@pytest.fixture
def calls(monkeypatch):
    """Replaces every command's module with a fake that records the config it receives."""
    received: list = []
    results = {name: None for name in cli.COMMANDS} | {"sft": Path("runs/x/final"), "reft": Path("runs/y/final"),
                                                       "eval": 0.625}
    for name, cmd in cli.COMMANDS.items():
        module = types.ModuleType(cmd.module)

        def fake(cfg, _result=results[name]):
            received.append(cfg)
            return _result

        setattr(module, cmd.function, fake)
        monkeypatch.setitem(sys.modules, cmd.module, module)
    return received


def run(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_yaml_and_cli_precedence(calls, tmp_path, capsys):
    cfg_file = write(tmp_path, "kl_coef: 0.01\nlr: 1.0e-6\nseed: 7\ntrain_file: a.jsonl\n")
    assert run(["reft", cfg_file, "--lr", "2e-6", "--top-k", "5", "--output_dir", "out"]) == 0
    (cfg,) = calls
    assert isinstance(cfg, ReFTConfig)
    assert cfg.kl_coef == 0.01 and cfg.seed == 7 and cfg.train_file == "a.jsonl"  # from YAML
    assert cfg.lr == 2e-6 and cfg.top_k == 5 and cfg.output_dir == Path("out")  # CLI wins, typed
    assert cfg.vf_coef == 5.0 and cfg.lr_schedule == "constant"  # untouched defaults
    assert "final model: runs/y/final" in capsys.readouterr().out


def test_untouched_options_do_not_clobber_yaml(calls, tmp_path):
    cfg_file = write(tmp_path, "progress: false\nlog_with: [wandb]\nmax_eval_examples: 3\n")
    assert run(["sft", cfg_file, "--epochs", "1"]) == 0
    assert calls[0].progress is False and calls[0].log_with == ["wandb"] and calls[0].max_eval_examples == 3


def test_none_booleans_and_lists(calls, tmp_path):
    cfg_file = write(tmp_path, "eval_file: e.jsonl\nmax_eval_examples: 10\nresume: false\n")
    assert run(["sft", cfg_file, "--eval-file", "none", "--max_eval_examples", "None", "--resume",
                "--no-progress", "--no-eval-every-epoch", "--log-with", "tensorboard", "wandb"]) == 0
    cfg = calls[0]
    assert cfg.eval_file is None and cfg.max_eval_examples is None
    assert cfg.resume is True and cfg.progress is False and cfg.eval_every_epoch is False
    assert cfg.log_with == ["tensorboard", "wandb"]


def test_list_option_without_values_clears(calls, tmp_path):
    assert run(["sft", write(tmp_path, "log_with: [wandb]\n"), "--log_with"]) == 0
    assert calls[0].log_with == []


def test_eval_and_demo_results(calls, capsys):
    assert run(["eval", "--model", "ckpt", "--eval_file", "t.jsonl"]) == 0
    assert isinstance(calls[0], EvalConfig) and calls[0].model == "ckpt"
    assert "accuracy: 0.6250" in capsys.readouterr().out
    assert run(["--quiet", "demo", "--n-train", "20"]) == 0
    assert isinstance(calls[1], DemoConfig) and calls[1].n_train == 20


@pytest.mark.parametrize("command,config", [("sft", SFTConfig), ("reft", ReFTConfig),
                                            ("eval", EvalConfig), ("demo", DemoConfig)])
def test_help_lists_every_field(command, config, capsys):
    assert run([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, field in config.model_fields.items():
        assert f"--{name}" in out
        if "_" in name:
            assert f"--{name.replace('_', '-')}" in out
        if field.description:
            assert " ".join(field.description.split()) in out, name
    assert "--no-progress" in out and "(default: True)" in out


def test_no_command_prints_help_and_version(capsys):
    assert run([]) == 2
    assert "sft" in capsys.readouterr().err
    assert run(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_yaml_key_names_key_file_and_suggestion(calls, tmp_path, capsys):
    cfg_file = write(tmp_path, "kl_coeff: 0.1\n")
    assert run(["reft", cfg_file]) == 2
    err = _error(capsys)
    assert "'kl_coeff'" in err and cfg_file in err and "did you mean 'kl_coef'" in err
    assert not calls


def test_bad_value_type_names_key_and_value(calls, tmp_path, capsys):
    assert run(["reft", "--kl_coef", "abc"]) == 2
    assert "reftkit reft: invalid value for 'kl_coef' on the command line: 'abc' (expected a number)" in _error(capsys)
    cfg_file = write(tmp_path, "bf16: maybe\nseed: x\n")
    assert run(["sft", cfg_file]) == 2
    err = _error(capsys)
    assert f"'bf16' in {cfg_file}: 'maybe'" in err and "'auto'" in err
    assert f"'seed' in {cfg_file}: 'x' (expected an integer)" in err
    assert run(["sft", "--log_with", "mlflow"]) == 2
    assert "'log_with' on the command line: 'mlflow'" in _error(capsys)
    assert not calls


def test_out_of_range_and_cross_field_checks(calls, capsys):
    assert run(["sft", "--lr", "-1"]) == 2
    assert "invalid value for 'lr' on the command line: '-1' (must be greater than 0)" in _error(capsys)
    assert run(["sft", "--max-length", "100"]) == 2
    assert "max_prompt_tokens (300) must be < max_length (100)" in _error(capsys)
    assert not calls


def test_bad_yaml_syntax_names_file_and_line(calls, tmp_path, capsys):
    cfg_file = write(tmp_path, "lr: 1.0\nlog_with: [wandb\nseed: 1\n")
    assert run(["sft", cfg_file]) == 2
    err = _error(capsys)
    assert cfg_file in err and "line 3" in err


def test_a_key_given_twice_is_refused_naming_the_file_key_and_both_lines(calls, tmp_path, capsys):
    cfg_file = write(tmp_path, "lr: 1.0e-5\nseed: 1\n\nlr: 2.0e-5\n")
    assert run(["sft", cfg_file]) == 2
    err = _error(capsys)
    assert cfg_file in err and "'lr'" in err and "line 1 and line 4" in err
    nested = write(tmp_path, "demo: true\nreft:\n  kl_coef: 0.1\n  epochs: 2\n  kl_coef: 0.2\n", "r.yaml")
    assert run(["reproduce", nested]) == 2
    err = _error(capsys)
    assert nested in err and "'kl_coef'" in err and "line 3 and line 5" in err
    assert run(["reproduce", "--demo", "--reft", "{epochs: 1, epochs: 2}"]) == 2  # a section on the command line
    assert "'epochs' is given twice" in _error(capsys)
    assert not calls
    merged = write(tmp_path, "demo: true\nbase: &b {epochs: 1, kl_coef: 0.1}\n", "m.yaml")
    assert yamlfile.load(Path(merged).read_text() + "x:\n  <<: *b\n  epochs: 2\n")["x"] == {"epochs": 2, "kl_coef": 0.1}


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1e3", "1.5e-3", "1.5E+3", "2e+2", ".5", "5.", "+1e-3", "-1e-3"])
def test_a_config_file_takes_the_numbers_the_command_line_takes(calls, tmp_path, capsys, text):
    cli_code = run(["sft", f"--lr={text}"])
    cli_err = capsys.readouterr().err
    assert run(["sft", write(tmp_path, f"lr: {text}\n")]) == cli_code
    yaml_err = capsys.readouterr().err
    if cli_code == 0:
        assert calls[0].lr == calls[1].lr == float(text)
    else:  # both refuse the value for the same reason (-1e-3 is not > 0), not the file for its spelling
        assert "expected a number" not in yaml_err and "greater than 0" in cli_err and "greater than 0" in yaml_err


def test_yaml_file_missing_or_not_a_mapping(calls, tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert run(["sft", missing]) == 2
    assert f"config file not found: {missing}" in _error(capsys)
    listing = write(tmp_path, "- 1\n- 2\n")
    assert run(["sft", listing]) == 2
    assert listing in _error(capsys)
    assert run(["sft", write(tmp_path, "")]) == 0  # an empty file configures nothing


def test_unknown_option_is_argparse_error(calls, capsys):
    assert run(["sft", "--lrr", "1"]) == 2
    assert "--lrr" in _error(capsys)
    assert run(["sft", "--l", "1"]) == 2  # no silent abbreviations
    assert not calls


def test_data_error_exits_1_with_message(monkeypatch, calls, capsys):
    def broken(cfg):
        raise DataError("train.jsonl line 3: missing field 'answer'")

    monkeypatch.setattr(sys.modules["reftkit.trainers.sft"], "train_sft", broken)
    assert run(["sft"]) == 1
    assert "reftkit sft: error: train.jsonl line 3: missing field 'answer'" in _error(capsys)


def test_unexpected_exceptions_propagate(monkeypatch, calls):
    def buggy(cfg):
        raise KeyError("bug")

    monkeypatch.setattr(sys.modules["reftkit.trainers.sft"], "train_sft", buggy)
    with pytest.raises(KeyError):
        cli.main(["sft"])


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from reftkit.commands.cli import COMMANDS

    command = next(c for c in ("reproduce", "demo", "reft", "sft") if c in path.stem)
    data = yamlfile.load(path.read_text())  # as the CLI reads them
    COMMANDS[command].config(**data)  # an unknown or ill-typed key raises
    if command == "demo":
        spelled, default = COMMANDS["demo"].config(**data).stage_configs(), COMMANDS["demo"].config().stage_configs()
        assert spelled == default, "demo.yaml must spell out the defaults"


def test_stage_sections_parse_as_yaml_and_add_to_the_config_file(calls, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("demo: true\nreft: {kl_coef: 0.02, epochs: 3}\n")
    assert run(["reproduce", str(path), "--reft", "{epochs: 1}", "--eval", "num_samples: 4"]) == 0
    cfg = calls[-1]
    assert cfg.reft == {"kl_coef": 0.02, "epochs": 1} and cfg.eval == {"num_samples": 4}
    assert cfg.stage("reft").kl_coef == 0.02 and cfg.stage("reft").epochs == 1


def test_a_bad_stage_option_is_a_one_line_error(calls, capsys):
    assert run(["reproduce", "--demo", "--reft", "{kl_coeff: 1}"]) == 2
    assert "section 'reft': kl_coeff: Extra inputs are not permitted" in capsys.readouterr().err
