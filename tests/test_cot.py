"""The two CoT styles: prompt and target text, and program grading through the real sandbox."""

import ast
import json

import pytest

from reftkit.config import EvalConfig
from reftkit.data import load_examples
from reftkit.data.prompts import encode_prompt, encode_sft, prompt_text, response_text
from reftkit.data.records import Example
from reftkit.data.synthetic import make_splits
from reftkit.grading.cot import (
    ProgramGrader,
    open_grader,
    program_body,
    program_header,
    response_prefix,
    warn_if_not_programs,
)
from reftkit.modeling.tiny import build_tokenizer

SVAMP_STYLE = '''def solution():
    """there are 2 bananas . each comes in a package of 13 ."""
    num_bananas = 2
    result = num_bananas * 13
    return result'''


def test_program_body_strips_the_header_the_prompt_supplies():
    assert program_body(SVAMP_STYLE) == "    num_bananas = 2\n    result = num_bananas * 13\n    return result"
    assert program_body("    result = 3\n    return result") == "    result = 3\n    return result"  # body only


def test_program_prompt_plus_target_is_the_whole_program():
    ex = Example(id="q1", question=(
        "there are 2 bananas . each comes in a package of 13 ."
    ), cot=SVAMP_STYLE, answer="26")
    prompt = prompt_text(ex, "program")
    assert prompt.startswith("Question:\n") and prompt.endswith('"""\n')
    assert prompt.split("Answer reasoning:\n")[1] + response_text(ex, "program") == SVAMP_STYLE
    assert response_text(ex) == f"{SVAMP_STYLE}\nTherefore, the answer is: 26"  # natural CoT is unchanged


@pytest.mark.parametrize("question", ['He said "hi"', 'ends in a quote"', 'three """ quotes', "back\\slash \\n"])
def test_program_header_is_valid_python_for_any_question(question):
    tree = ast.parse(program_header(question) + "    return 1\n")
    assert ast.get_docstring(tree.body[0], clean=False) == question


def test_natural_language_cot_given_as_a_program_is_a_clear_error():
    ex = Example(id="svamp-7", question="How many?", cot="2 + 3 = 5", answer="5")
    with pytest.raises(ValueError, match=r"item 'svamp-7': the reference CoT is not a Python program body"):
        response_text(ex, "program")


def test_natural_cot_as_a_program_error_names_the_file_and_the_field_as_the_format_spells_it(tmp_path):
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}) + "\n")
    (ex,) = load_examples(path).examples
    with pytest.raises(ValueError) as info:
        response_text(ex, "program")
    assert str(info.value).startswith(f"{path} line 1, field 'answer' (item 'gsm8k_train-1'): the reference CoT is "
                                      "not a Python program body, as --cot program needs")
    assert "answer_cot" not in str(info.value)


class RecordingExecutor:
    """Stands in for the sandbox: every program 'fails', as unparsable ones do there."""

    def run(self, programs):
        from reftkit.executor import ExecResult, Status

        return [ExecResult(Status.ERROR, detail="SyntaxError") for _ in programs]


def test_program_grader_warns_once_when_nearly_no_program_is_python(caplog):
    """`reft`/`eval --cot program` on a natural-CoT model: rewards 0 without a word, before."""
    train, _ = make_splits(10, 1, seed=2)
    natural = [f"{response_text(e)}" for e in train]  # what an N-CoT model writes after the P-CoT prefix
    grader = ProgramGrader(RecordingExecutor())
    with caplog.at_level("WARNING", logger="reftkit"):
        grades = grader.grade(natural, train)
        grader.grade(natural, train)
    assert not any(g.correct or g.extracted for g in grades)
    (warning,) = [r.getMessage() for r in caplog.records if "--cot program" in r.getMessage()]
    assert warning.startswith("--cot program: 10 of 10 programs in the first graded batch are not valid Python")
    assert "trained on program CoT" in warning


def test_program_grader_is_quiet_when_most_programs_parse(caplog):
    train, _ = make_splits(10, 1, seed=2, cot="program")
    programs = [response_text(e, "program") for e in train]
    programs[:5] = ["    return (\n"] * 5  # half broken: a weak model, not the wrong kind of model
    with caplog.at_level("WARNING", logger="reftkit"):
        prompts = [response_prefix(e, "program") + p for e, p in zip(train, programs, strict=True)]
        assert warn_if_not_programs(prompts, train) is False
    assert "--cot program" not in caplog.text


def test_synthetic_reference_programs_are_bodies_after_the_header():
    train, _ = make_splits(50, 10, seed=3, cot="program")
    for ex in train:
        assert ex.cot.startswith(program_header(ex.question))
        ast.parse(ex.cot)
        assert response_text(ex, "program").startswith("    ") and "return result" in response_text(ex, "program")


@pytest.mark.parametrize("per_child", [1, 8])
def test_program_grader_runs_the_programs_in_the_sandbox(per_child):
    train, _ = make_splits(40, 1, seed=5, one_line_fraction=0.5, cot="program")
    completions = [program_body(ex.cot) for ex in train]
    cfg = EvalConfig(cot="program", exec_workers=2, exec_timeout=5.0, exec_programs_per_child=per_child)
    with open_grader(cfg) as grader:
        assert grader.executor.config.programs_per_child == per_child
        grades = grader.grade(completions, train)  # every reference program returns its gold answer
        assert all(g.correct for g in grades), [g for g in grades if not g.correct][:3]
        wrong = grader.grade(["    return 1 + 1\n", "    return None\n", "    import os\n    return 3\n",
                              "    return (\n"], train[:4])
    assert [(g.extracted, g.correct) for g in wrong] == [("2", train[0].answer == "2"), (None, False),
                                                          (None, False), (None, False)]
    assert wrong[1].detail.startswith("wrong_type") and wrong[2].detail.startswith("forbidden")
    assert wrong[3].detail.startswith("error")


@pytest.mark.parametrize("cot", ["natural", "program"])
def test_few_shot_prompt_puts_whole_worked_examples_first(cot):
    train, test = make_splits(4, 1, seed=3, cot=cot)
    prompt = prompt_text(test[0], cot, shots=train[:2])
    demos = "".join(prompt_text(s, cot) + response_text(s, cot) + "\n\n" for s in train[:2])
    assert prompt == demos + prompt_text(test[0], cot)


@pytest.mark.parametrize("cot", ["natural", "program"])
def test_few_shot_prompt_tokenizes_each_worked_example_as_sft_does(cot):
    """The answer starts after the same token boundary in the shots as after the question."""
    train, test = make_splits(4, 1, seed=3, cot=cot)
    tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
    ids = encode_prompt(tokenizer, test[0], 10_000, cot, shots=train[:2])
    first_shot = encode_sft(tokenizer, train[0], 10_000, 10_000, cot).input_ids[:-1]  # without its EOS
    assert ids[: len(first_shot)] == first_shot
    assert tokenizer.decode(ids) == prompt_text(test[0], cot, shots=train[:2])
    assert encode_prompt(tokenizer, test[0], 5, cot, shots=train[:2]) == ids[-5:]


# ----------------------------------------------------------------------------- the sandbox's
# own limits are reported (per-status counts, a warning when they stop a noticeable share of the programs)

@pytest.mark.slow
def test_programs_stopped_by_the_time_limit_are_counted_and_warned_about(caplog):
    """The real sandbox: 4 programs that return their answer, 4 that never return; only the limit stops them."""
    from reftkit.grading.cot import status_counts, warn_if_sandbox_limited

    train, _ = make_splits(4, 1, seed=5, cot="program")
    completions = [program_body(ex.cot) for ex in train] + ["    while True:\n        pass\n"] * 4
    cfg = EvalConfig(cot="program", exec_workers=1, exec_timeout=0.5)
    with open_grader(cfg) as grader:
        grades = grader.grade(completions, train + train)
    counts = status_counts(g.detail for g in grades)
    assert counts == {"programs_ok": 4, "programs_wrong_type": 0, "programs_error": 0, "programs_timeout": 4,
                      "programs_memory": 0, "programs_forbidden": 0}
    with caplog.at_level("WARNING", logger="reftkit"):
        assert warn_if_sandbox_limited(counts, cfg, "eval") is True
    assert caplog.records[-1].getMessage().startswith(
        "eval: 4 of 8 programs were stopped by the sandbox's limits: 4 timeout (--exec_timeout 0.5)")
    caplog.clear()
    with caplog.at_level("WARNING", logger="reftkit"):  # a rare timeout is the program's doing: no warning
        assert warn_if_sandbox_limited(counts | {"programs_ok": 100, "programs_timeout": 4}, cfg, "eval") is False
        assert warn_if_sandbox_limited({}, cfg, "eval") is False  # natural CoT: nothing to count
    assert not caplog.records


class HalfTimeouts:
    """Stands in for the sandbox: every other program 'times out', the rest return a wrong answer."""

    def run(self, programs):
        from reftkit.executor import ExecResult, Status

        return [ExecResult(Status.OK, value="-0.5151") if i % 2 == 0
                else ExecResult(Status.TIMEOUT, detail="wall-clock")
                for i in range(len(programs))]


def _half_timeout_grader(cfg):
    from contextlib import nullcontext

    return nullcontext(ProgramGrader(HalfTimeouts()))


def test_reft_eval_and_sample_report_the_programs_statuses(tmp_path, splits, tiny_checkpoint, monkeypatch, caplog):
    """Training metrics (each rollout batch, and its evals as eval_*), eval's metrics and sample's results.json
    carry programs_<status> counts, and each warns when the time limit stopped a noticeable share."""
    from conftest import LENGTHS
    from reftkit.commands import evaluate as evaluate_cli
    from reftkit.commands import sample as sampling
    from reftkit.config import ReFTConfig, SampleConfig
    from reftkit.trainers import reft
    from reftkit.writers import write_examples

    for module in (reft, evaluate_cli, sampling):
        monkeypatch.setattr(module, "open_grader", _half_timeout_grader)
    write_examples(tmp_path / "test.jsonl", splits[1][:4])
    common = {"model": str(tiny_checkpoint), "progress": False, "cot": "program", "exec_timeout": 0.25, **LENGTHS}
    half = {"programs_ok": 8, "programs_wrong_type": 0, "programs_error": 0, "programs_timeout": 8,
            "programs_memory": 0, "programs_forbidden": 0}
    with caplog.at_level("WARNING", logger="reftkit"):
        reft.train_reft(ReFTConfig(output_dir=tmp_path / "reft", epochs=1, batch_size=4, num_samples=4,
                                   mini_batch_size=8, **common), splits[0][:8], splits[1][:16])
    metrics = [json.loads(line) for line in (tmp_path / "reft" / "metrics.jsonl").read_text().splitlines()]
    batches = [m for m in metrics if "reward" in m]
    assert len(batches) == 2 and all({k: m[k] for k in half} == half for m in batches)
    (evaluated,) = [m for m in metrics if "eval_accuracy" in m]
    assert {k: evaluated[f"eval_{k}"] for k in half} == {k: v for k, v in half.items()}  # 16 greedy answers
    warned = [r.getMessage() for r in caplog.records if "stopped by the sandbox's limits" in r.getMessage()]
    assert warned == ["rollout batch 1: 8 of 16 programs were stopped by the sandbox's limits: 8 timeout "
                      "(--exec_timeout 0.25). They count as wrong (reward 0); raise the limit if the programs are "
                      "meant to need more",  # once for the training batches; every eval warns for itself
                      "eval (predictions-epoch1.jsonl): 8 of 16 programs were stopped by the sandbox's limits: "
                      "8 timeout (--exec_timeout 0.25). They count as wrong (reward 0); raise the limit if the "
                      "programs are meant to need more"]

    caplog.clear()
    with caplog.at_level("WARNING", logger="reftkit"):
        evaluate_cli.run_eval(EvalConfig(eval_file=str(tmp_path / "test.jsonl"), output_dir=tmp_path / "eval",
                                         **common))
        summary = sampling.run_sample(SampleConfig(eval_file=str(tmp_path / "test.jsonl"),
                                                   output_dir=tmp_path / "sample", num_samples=4, **common))
    row = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())
    assert (row["programs_ok"], row["programs_timeout"]) == (2, 2)
    assert {k: summary[k] for k in half} == half
    assert json.loads((tmp_path / "sample" / "results.json").read_text()) == summary
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if "stopped by the sandbox's limits" in r.getMessage()] == ["eval (predictions.jsonl)", "sampling"]


def test_natural_cot_reports_no_program_statuses(tmp_path, splits, tiny_checkpoint):
    from conftest import LENGTHS
    from reftkit.commands.sample import run_sample
    from reftkit.config import SampleConfig
    from reftkit.writers import write_examples

    write_examples(tmp_path / "test.jsonl", splits[1][:2])
    summary = run_sample(SampleConfig(model=str(tiny_checkpoint), eval_file=str(tmp_path / "test.jsonl"),
                                      output_dir=tmp_path, num_samples=2, progress=False, **LENGTHS))
    assert not any(key.startswith("programs_") for key in summary)


def test_online_st_reports_the_programs_statuses_per_batch(tmp_path, monkeypatch):
    from conftest import LENGTHS, tiny_model_dir
    from reftkit.config import OnlineSTConfig
    from reftkit.trainers import online_st

    monkeypatch.setattr(online_st, "open_grader", _half_timeout_grader)
    train, _ = make_splits(8, 1, seed=4, cot="program")
    model = tiny_model_dir(tmp_path / "model", train)
    online_st.train_online_st(OnlineSTConfig(model=str(model), output_dir=tmp_path / "run", cot="program",
                                             batch_size=4, num_samples=2, progress=False, **LENGTHS), train)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["programs_ok"], r["programs_timeout"], r["programs_error"]) for r in steps if "own_samples" in r] \
        == [(4, 4, 0), (4, 4, 0)]
